//! A cluster of real in-process nodes on 127.0.0.1: joining, failure
//! detection, foreign certificates, certificate reload, garbage packets.

use std::time::Duration;

use node::{MemberState, Node};
use tests::{Cluster, Pki, admin_get, alive, eventually, state_of};
use transport::certs::Validity;

const DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_join_through_one_seed() {
    let cluster = Cluster::start(3).await;
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;

    // Every node lists the others with their published record.
    let (status, body) = admin_get(cluster.nodes[2].admin_addr(), "/v1/members").await;
    assert_eq!(status, 200);
    let members: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    assert_eq!(members.len(), 3);
    for m in &members {
        assert_eq!(m["state"], "alive");
        assert_eq!(m["zone"], "default");
        assert_eq!(m["services"], serde_json::json!(["web"]));
        assert!(m["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(m["last_seen_ms"].is_u64());
    }
    let admin = cluster.nodes[1].admin_addr();
    eventually("n2 ready", DEADLINE, || async {
        (admin_get(admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    let (status, _) = admin_get(cluster.nodes[1].admin_addr(), "/healthz").await;
    assert_eq!(status, 200);

    // Gossip really flowed over QUIC, and is counted.
    let (_, metrics) = admin_get(cluster.nodes[0].admin_addr(), "/metrics").await;
    assert!(
        metrics.contains("shoal_members{state=\"alive\"} 3"),
        "{metrics}"
    );
    let gossip_in = metric(&metrics, "shoal_gossip_messages_total{direction=\"in\"}");
    assert!(gossip_in > 0.0);
    assert!(metric(&metrics, "shoal_quic_connections") >= 2.0);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_is_dead_then_alive_after_restart() {
    let mut cluster = Cluster::start(3).await;
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;

    let victim = cluster.nodes.pop().unwrap();
    victim.kill().await;
    // Detection window: phi 8 × 100 ms gossip ≈ 0.8 s plus smoothing; allow slack.
    for n in &cluster.nodes {
        eventually("n3 seen dead", DEADLINE, || async {
            (state_of(n, "n3").await == Some(MemberState::Dead)).then_some(())
        })
        .await;
    }

    let restarted = Node::start(cluster.pki.node_config("n3", &[cluster.seed()]))
        .await
        .unwrap();
    cluster.nodes.push(restarted);
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_shows_left_within_about_a_round() {
    let mut cluster = Cluster::start(3).await;
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;
    let leaver = cluster.nodes.pop().unwrap();
    let started = std::time::Instant::now();
    leaver.shutdown().await;
    for n in &cluster.nodes {
        eventually("n3 seen left", Duration::from_secs(2), || async {
            (state_of(n, "n3").await == Some(MemberState::Left)).then_some(())
        })
        .await;
    }
    // Far quicker than failure detection would be.
    assert!(started.elapsed() < Duration::from_secs(2));
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_from_another_ca_never_joins_and_is_counted() {
    let cluster = Cluster::start(2).await;
    cluster.converged(&["n1", "n2"], DEADLINE).await;

    // Same trust domain name, different CA: must still be refused.
    let rogue_pki = Pki::new("test.shoal");
    let rogue = Node::start(rogue_pki.node_config("rogue", &[cluster.seed()]))
        .await
        .unwrap();
    // The rogue refuses the mesh's certificate (unknown CA) and counts it.
    let rogue_admin = rogue.admin_addr();
    eventually("refusal counted by the rogue", DEADLINE, || async {
        let (_, m) = admin_get(rogue_admin, "/metrics").await;
        (metric(
            &m,
            "shoal_quic_handshake_refusals_total{reason=\"unknown_ca\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    // Give gossip several more rounds to (not) spread it.
    let end = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < end {
        for n in &cluster.nodes {
            assert!(
                state_of(n, "rogue").await.is_none(),
                "rogue listed by {}",
                n.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(alive(&rogue).await, vec!["rogue".to_string()]);
    rogue.kill().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificate_is_refused() {
    let cluster = Cluster::start(1).await;
    let pki = &cluster.pki;
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(10),
        not_after: now - time::Duration::days(1),
    };
    let dir = pki.issue_into("old", "old", &[], expired);
    let mut config = node::NodeConfig::local("old", dir);
    config.gossip_interval = tests::TEST_GOSSIP;
    config.seeds = vec![cluster.seed()];
    let old = Node::start(config).await.unwrap();
    let admin = cluster.nodes[0].admin_addr();
    eventually("expired refusal counted", DEADLINE, || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        (metric(
            &m,
            "shoal_quic_handshake_refusals_total{reason=\"expired\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert!(state_of(&cluster.nodes[0], "old").await.is_none());
    old.kill().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_change_nothing() {
    let cluster = Cluster::start(2).await;
    cluster.converged(&["n1", "n2"], DEADLINE).await;
    let target = cluster.nodes[0].quic_addr();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..2000usize {
        let len = 1 + (i * 7919) % 1400;
        let mut buf = vec![0u8; len];
        for b in buf.iter_mut() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            *b = seed as u8;
        }
        // Some look like QUIC long headers, most are noise.
        if i % 3 == 0 {
            buf[0] = 0xc0 | (buf[0] & 0x0f);
        }
        let _ = sock.send_to(&buf, target).await;
    }
    // Still healthy and still converged, with nothing new listed.
    cluster.converged(&["n1", "n2"], DEADLINE).await;
    let (status, _) = admin_get(cluster.nodes[0].admin_addr(), "/healthz").await;
    assert_eq!(status, 200);
    let members = cluster.nodes[0].members().await;
    assert_eq!(members.len(), 2);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_ignores_our_certificate_is_refused_by_the_mesh() {
    // An attacker's client may skip checking the server; the mesh node must
    // still refuse its foreign certificate, and count it.
    let cluster = Cluster::start(1).await;
    let rogue_pki = Pki::new("test.shoal");
    let dir = rogue_pki.issue("rogue", &["web"]);
    let err = tests::danger::dial_without_verifying(&dir, cluster.nodes[0].quic_addr()).await;
    assert!(err.is_err(), "foreign client was accepted");
    let admin = cluster.nodes[0].admin_addr();
    eventually("refusal counted by the mesh node", DEADLINE, || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        (metric(
            &m,
            "shoal_quic_handshake_refusals_total{reason=\"unknown_ca\"}",
        ) >= 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(cluster.nodes[0].members().await.len(), 1);
    cluster.shutdown().await;
}

/// Reads one sample's value from Prometheus text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}
