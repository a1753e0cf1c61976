//! The QUIC endpoint on its own: dial merging, reconnects, certificate
//! reload without dropping established connections, and reloads refused
//! when the new certificate names someone else.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tests::{Cluster, Pki, admin_get, eventually};
use transport::certs::{Validity, write_node_dir};
use transport::{Endpoint, EndpointConfig, EndpointError, TlsFiles};

fn endpoint(dir: &std::path::Path) -> Endpoint {
    endpoint_as(dir, None).unwrap()
}

fn endpoint_as(dir: &std::path::Path, name: Option<&str>) -> Result<Endpoint, EndpointError> {
    transport::install_crypto_provider();
    let mut config = EndpointConfig::new("127.0.0.1:0".parse().unwrap(), TlsFiles::new(dir));
    config.reload_interval = Duration::from_millis(50);
    config.expected_node = name.map(str::to_string);
    Endpoint::bind(config)
}

/// Copies another certificate folder's files over `dir`, as an operator's
/// mistaken `cp` would.
fn swap_in(from: &std::path::Path, dir: &std::path::Path) {
    for f in ["ca.pem", "node.pem", "node.key"] {
        std::fs::copy(from.join(f), dir.join(f)).unwrap();
    }
}

/// The identity a fresh client sees when it dials `addr`.
async fn presented(pki: &Pki, addr: std::net::SocketAddr) -> transport::Identity {
    let folder = format!("probe-{}", addr.port());
    let probe = endpoint(&pki.issue_into(&folder, "probe", &[], Validity::days(1)));
    let c = probe.connect(addr).await.unwrap();
    let id = (*c.peer).clone();
    probe.close();
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dials_share_one_connection_and_reconnect_after_loss() {
    let pki = Pki::new("test.shoal");
    let a = endpoint(&pki.issue("a", &["web"]));
    let b = endpoint(&pki.issue("b", &[]));
    let dials = (0..16).map(|_| {
        let b = b.clone();
        let addr = a.local_addr();
        tokio::spawn(async move { b.connect(addr).await.unwrap() })
    });
    let conns: Vec<_> = futures_join(dials).await;
    let first = conns[0].conn.stable_id();
    assert!(conns.iter().all(|c| c.conn.stable_id() == first));
    assert_eq!(b.stats().connections_total.load(Ordering::Relaxed), 1);
    assert_eq!(conns[0].peer.node, "a");
    assert_eq!(conns[0].peer.services, vec!["web"]);

    b.disconnect(a.local_addr());
    let again = b.connect(a.local_addr()).await.unwrap();
    assert_ne!(again.conn.stable_id(), first);
    a.close();
    b.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_is_used_for_next_handshake_without_dropping_old_ones() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let a = endpoint(&a_dir);
    let b = endpoint(&pki.issue("b", &[]));
    let old = b.connect(a.local_addr()).await.unwrap();
    assert_eq!(old.peer.services, vec!["web"]);

    // Rotate a's certificate on disk: same node, one more service.
    let cert = pki
        .ca()
        .issue("a", &["web".into(), "api".into()], Validity::days(1))
        .unwrap();
    write_node_dir(&a_dir, &pki.ca().cert_pem(), &cert, true).unwrap();
    eventually(
        "a reloads its certificate",
        Duration::from_secs(10),
        || async { (a.stats().cert_reloads.load(Ordering::Relaxed) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(a.identity().services, vec!["web", "api"]);

    // A new handshake sees the new certificate...
    let c = endpoint(&pki.issue("c", &[]));
    let fresh = c.connect(a.local_addr()).await.unwrap();
    assert_eq!(fresh.peer.services, vec!["web", "api"]);

    // ...while the established connection still carries streams.
    assert!(old.conn.close_reason().is_none());
    let mut incoming = a.take_bi_streams().unwrap();
    let (mut send, _recv) = old.conn.open_bi().await.unwrap();
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .unwrap()
        .unwrap();
    let got = s.recv.read_to_end(64).await.unwrap();
    assert_eq!(got, b"still here");
    assert_eq!(s.from.peer.node, "b");
    for e in [a, b, c] {
        e.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_on_disk_keep_the_old_certificate() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let a = endpoint(&a_dir);
    std::fs::write(a_dir.join("node.pem"), "not a certificate").unwrap();
    eventually("reload error counted", Duration::from_secs(10), || async {
        (a.stats().cert_reload_errors.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    let b = endpoint(&pki.issue("b", &[]));
    let c = b.connect(a.local_addr()).await.unwrap();
    assert_eq!(c.peer.node, "a");
    a.close();
    b.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_nodes_certificate_on_disk_is_refused_and_the_old_identity_kept() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let b_dir = pki.issue("b", &["api"]);
    let a = endpoint_as(&a_dir, Some("a")).unwrap();

    swap_in(&b_dir, &a_dir);
    eventually(
        "wrong identity refused",
        Duration::from_secs(10),
        || async {
            (a.stats().cert_reload_wrong_identity.load(Ordering::Relaxed) >= 1).then_some(())
        },
    )
    .await;
    assert_eq!(a.stats().cert_reloads.load(Ordering::Relaxed), 0);
    assert_eq!(a.identity().node, "a");
    // A new handshake still meets a, not b.
    let seen = presented(&pki, a.local_addr()).await;
    assert_eq!(seen.node, "a");
    assert_eq!(seen.services, vec!["web"]);
    // Asked directly, the reload says why.
    match a.reload_certificates() {
        Err(EndpointError::WrongIdentity { expected, found }) => {
            assert_eq!(expected, "spiffe://test.shoal/node/a");
            assert_eq!(found, "spiffe://test.shoal/node/b");
        }
        other => panic!("reload of b's certificate: {other:?}"),
    }
    let refused = a.stats().cert_reload_wrong_identity.load(Ordering::Relaxed);

    // The same name from another trust domain (another CA) is refused too.
    let foreign = Pki::new("other.shoal");
    swap_in(&foreign.issue("a", &["web"]), &a_dir);
    eventually(
        "foreign trust domain refused",
        Duration::from_secs(10),
        || async {
            (a.stats().cert_reload_wrong_identity.load(Ordering::Relaxed) > refused).then_some(())
        },
    )
    .await;
    assert_eq!(a.identity().trust_domain, "test.shoal");
    assert_eq!(presented(&pki, a.local_addr()).await.node, "a");

    // A correct certificate is taken again; the refusal above was counted
    // once for that change of the files, not once per poll.
    let cert = pki
        .ca()
        .issue("a", &["web".into(), "api".into()], Validity::days(1))
        .unwrap();
    write_node_dir(&a_dir, &pki.ca().cert_pem(), &cert, true).unwrap();
    eventually(
        "a's own certificate reloads",
        Duration::from_secs(10),
        || async { (a.stats().cert_reloads.load(Ordering::Relaxed) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(
        a.stats().cert_reload_wrong_identity.load(Ordering::Relaxed),
        refused + 1
    );
    assert_eq!(
        presented(&pki, a.local_addr()).await.services,
        vec!["web", "api"]
    );
    a.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_configured_name_a_reload_must_keep_the_node_name() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let a = endpoint(&a_dir);
    swap_in(&pki.issue("b", &[]), &a_dir);
    eventually(
        "wrong identity refused",
        Duration::from_secs(10),
        || async {
            (a.stats().cert_reload_wrong_identity.load(Ordering::Relaxed) >= 1).then_some(())
        },
    )
    .await;
    assert_eq!(presented(&pki, a.local_addr()).await.node, "a");
    a.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_with_another_nodes_certificate_fails() {
    let pki = Pki::new("test.shoal");
    match endpoint_as(&pki.issue("b", &[]), Some("a")) {
        Err(EndpointError::WrongIdentity { expected, found }) => {
            assert!(expected.contains("\"a\""), "{expected}");
            assert!(found.contains("\"b\""), "{found}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("bound with another node's certificate"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_another_nodes_certificate_and_exports_the_refusal() {
    let cluster = Cluster::start(2).await;
    let n1 = &cluster.nodes[0];
    let n1_dir = cluster.pki.path().join("n1");
    swap_in(&cluster.pki.path().join("n2"), &n1_dir);
    let admin = n1.admin_addr();
    eventually("refusal exported", Duration::from_secs(15), || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        m.contains("shoal_cert_reloads_total{result=\"wrong_identity\"} 1")
            .then_some(())
    })
    .await;
    let (_, m) = admin_get(admin, "/metrics").await;
    assert!(
        m.contains("shoal_cert_reloads_total{result=\"ok\"} 0"),
        "{m}"
    );
    let seen = presented(&cluster.pki, n1.quic_addr()).await;
    assert_eq!(seen.node, "n1");
    assert_eq!(n1.endpoint().identity().node, "n1");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_travel_as_datagrams_or_streams() {
    let pki = Pki::new("test.shoal");
    let a = endpoint(&pki.issue("a", &[]));
    let b = endpoint(&pki.issue("b", &[]));
    let mut rx = a.subscribe(7, 16);
    let small = vec![1u8; 100];
    let large: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
    b.send_message(a.local_addr(), 7, &small).await.unwrap();
    b.send_message(a.local_addr(), 7, &large).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.channel, 7);
        assert_eq!(m.from.peer.node, "b");
        got.push(m.payload.to_vec());
    }
    got.sort_by_key(|p| p.len());
    assert_eq!(got, vec![small, large]);
    a.close();
    b.close();
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
