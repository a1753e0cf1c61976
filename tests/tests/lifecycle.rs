//! Readiness means routable: a node with `--data-dir` remembers its peers and
//! dials them after a restart without `--seed`; until it hears from one it is
//! not ready (and `/readyz` says why), for at most the join timeout. And the
//! CA file may hold two CAs at once, for rotating the CA without downtime.

use std::time::Duration;

use tests::{Pki, TEST_GOSSIP, admin_get, alive, eventually};
use transport::certs::Validity;
use transport::{Endpoint, EndpointConfig, TlsFiles};

fn config(pki: &Pki, name: &str, data: &std::path::Path, seeds: &[String]) -> node::NodeConfig {
    let mut c = node::NodeConfig::local(name, pki.path().join(name));
    c.gossip_interval = TEST_GOSSIP;
    c.seeds = seeds.to_vec();
    c.data_dir = Some(data.to_path_buf());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_finds_its_remembered_peers_and_is_unready_until_then() {
    let pki = Pki::new("test.shoal");
    pki.issue("n1", &["web"]);
    pki.issue("n2", &["web"]);
    let d1 = pki.path().join("data-n1");
    let d2 = pki.path().join("data-n2");
    let n1 = node::Node::start(config(&pki, "n1", &d1, &[]))
        .await
        .unwrap();
    let n2 = node::Node::start(config(&pki, "n2", &d2, &[n1.quic_addr().to_string()]))
        .await
        .unwrap();
    let n2_addr = n2.quic_addr();
    eventually("n1 remembers n2", Duration::from_secs(10), || {
        let d1 = d1.clone();
        async move {
            let peers = node::lifecycle::remembered_peers(&d1);
            peers
                .iter()
                .any(|p| p.name == "n2" && p.addr == n2_addr)
                .then_some(())
        }
    })
    .await;

    // n1 restarts on a new port with no --seed. n2 only knows n1's old
    // address, so only n1's memory can bring them together.
    n1.shutdown().await;
    let n1 = node::Node::start(config(&pki, "n1", &d1, &[]))
        .await
        .unwrap();
    eventually("n1 sees n2 again", Duration::from_secs(10), || {
        let n1 = &n1;
        async move { alive(n1).await.contains(&"n2".to_string()).then_some(()) }
    })
    .await;
    eventually("n1 ready", Duration::from_secs(10), || {
        let n1 = &n1;
        async move { n1.ready().await.ok() }
    })
    .await;
    n2.shutdown().await;
    n1.shutdown().await;

    // Alone now: n1 restarts while n2 is down. Not ready, and says why,
    // until the join timeout; then ready anyway.
    let mut c = config(&pki, "n1", &d1, &[]);
    c.join_timeout = Duration::from_millis(1500);
    let n1 = node::Node::start(c).await.unwrap();
    let (status, body) = admin_get(n1.admin_addr(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.starts_with("not ready: waiting for a first peer")
            && body.contains(&n2_addr.to_string()),
        "{body}"
    );
    eventually(
        "ready after the join timeout",
        Duration::from_secs(10),
        || {
            let n1 = &n1;
            async move { n1.ready().await.ok() }
        },
    )
    .await;
    let (status, body) = admin_get(n1.admin_addr(), "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_data_dir_or_seeds_is_ready_at_once() {
    let pki = Pki::new("test.shoal");
    let mut c = node::NodeConfig::local("solo", pki.issue("solo", &[]));
    c.gossip_interval = TEST_GOSSIP;
    let n = node::Node::start(c).await.unwrap();
    eventually("solo ready", Duration::from_secs(5), || {
        let n = &n;
        async move { n.ready().await.ok() }
    })
    .await;
    n.shutdown().await;
}

fn endpoint(dir: &std::path::Path) -> Endpoint {
    transport::install_crypto_provider();
    Endpoint::bind(EndpointConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        TlsFiles::new(dir),
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cas_in_ca_pem_are_both_trusted_during_a_ca_rotation() {
    let old = Pki::new("rot.shoal");
    let new = Pki::new("rot.shoal");
    let a = old.issue_into("a", "a", &[], Validity::days(1));
    let b = new.issue_into("b", "b", &[], Validity::days(1));
    let c = old.issue_into("c", "c", &[], Validity::days(1));
    let bundle = format!("{}{}", old.ca().cert_pem(), new.ca().cert_pem());
    for dir in [&a, &b] {
        std::fs::write(dir.join("ca.pem"), &bundle).unwrap();
    }
    let (ea, eb, ec) = (endpoint(&a), endpoint(&b), endpoint(&c));
    // Old-CA node and new-CA node, both trusting both: either may dial.
    assert_eq!(eb.connect(ea.local_addr()).await.unwrap().peer.node, "a");
    assert_eq!(ea.connect(eb.local_addr()).await.unwrap().peer.node, "b");
    // A node that trusts only the old CA refuses the new one's certificate.
    assert!(ec.connect(eb.local_addr()).await.is_err());
    for e in [ea, eb, ec] {
        e.close();
    }
}

/// `POST /shutdown` answered before anything waits on the stop request (the
/// process's main loop starts waiting only after it prints its ready line)
/// must still stop the node: the request once vanished and the process ran
/// on (the CI lifecycle test saw it about one run in five under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_request_made_before_anyone_waits_is_kept() {
    let pki = Pki::new("test.shoal");
    let mut c = node::NodeConfig::local("early", pki.issue("early", &[]));
    c.gossip_interval = TEST_GOSSIP;
    let n = node::Node::start(c).await.unwrap();
    let (status, body) = tests::admin_request(n.admin_addr(), "POST", "/shutdown", &[], "").await;
    assert_eq!(status, 202, "{body}");
    // Only now does anyone ask.
    tokio::time::timeout(Duration::from_secs(5), n.stop_requested())
        .await
        .expect("the stop request made before anyone waited was lost");
    n.shutdown().await;
}
