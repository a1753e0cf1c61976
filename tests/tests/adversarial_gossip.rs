//! A peer holding a valid mesh certificate lies in gossip. Each test plays
//! what a modified binary would send (raw chitchat bytes on the gossip
//! channel) and checks the defended outcome from outside: traffic through the
//! mesh, member lists, metrics.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gossip::wire::{Body, DigestEntry, Message, NodeDelta, NodeId};
use tests::rogue::{Rogue, id_of, metric, plain};
use tests::traffic::{Mesh, Upstream, WAIT, get, http1, ok, routable};
use tests::{admin_get, eventually};

const HEALTHY: &str = r#"{"health":"healthy","weight":100,"zone":"default","in_flight":0,"ewma_ms":0.1,"protocol":"auto"}"#;
const UNHEALTHY: &str = r#"{"health":"unhealthy","weight":100,"zone":"default","in_flight":0,"ewma_ms":0.1,"protocol":"auto"}"#;

fn ack(delta: Vec<NodeDelta>) -> Message {
    Message {
        version: 1,
        body: Body::Ack { delta },
    }
}

fn node_delta(id: &NodeId, key_values: Vec<gossip::wire::KeyValue>) -> NodeDelta {
    NodeDelta {
        id: id.clone(),
        last_gc_version: 0,
        from_version_excluded: 0,
        key_values,
        set_max_version: None,
    }
}

async fn send_get(out: std::net::SocketAddr, n: usize) -> usize {
    let client = http1();
    let mut ok = 0;
    for _ in 0..n {
        if let Ok(r) = client.request(get(out, "web", "/")).await
            && r.status().is_success()
        {
            ok += 1;
        }
    }
    ok
}

async fn metrics_of(node: &node::Node) -> String {
    admin_get(node.admin_addr(), "/metrics").await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_health_for_other_nodes_changes_nothing() {
    let mut mesh = Mesh::new();
    let up2 = Upstream::start(ok("n2")).await;
    let up3 = Upstream::start(ok("n3")).await;
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up2.addr)]))
        .await;
    let n3 = mesh
        .start(mesh.config("n3", &["web"], &[("web", up3.addr)]))
        .await;
    routable(&n1, "web", 2).await;
    let rogue = Rogue::start(&mesh.pki, "evil", &["other"]).await;
    let members = n1.members().await;
    let targets: Vec<NodeId> = members
        .iter()
        .filter(|m| m.name == "n2" || m.name == "n3")
        .map(id_of)
        .collect();
    assert_eq!(targets.len(), 2);

    // For 2 s, tell n1 that n2's and n3's web instances are unhealthy: once
    // signed with the rogue's own key, once unsigned, at versions far ahead.
    let end = Instant::now() + Duration::from_secs(2);
    let mut round = 0u64;
    while Instant::now() < end {
        round += 1;
        for id in &targets {
            let v = 1_000_000 + round;
            let signed = rogue.signed(id, "svc.web", v, UNHEALTHY);
            rogue
                .send(n1.quic_addr(), &ack(vec![node_delta(id, vec![signed])]))
                .await;
            let unsigned = plain("svc.web", v, UNHEALTHY);
            rogue
                .send(n1.quic_addr(), &ack(vec![node_delta(id, vec![unsigned])]))
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let out = n1.outbound_addr().unwrap();
    assert_eq!(send_get(out, 100).await, 100, "every web request succeeds");
    let services = admin_get(n1.admin_addr(), "/v1/services").await.1;
    assert!(!services.contains("unhealthy"), "{services}");
    let m = metrics_of(&n1).await;
    assert!(
        metric(&m, "shoal_gossip_refused_total{reason=\"bad_signature\"}") >= round as f64,
        "forgeries are counted: {}",
        metric(&m, "shoal_gossip_refused_total{reason=\"bad_signature\"}")
    );

    // n3's own later updates still reach n1: the forged high versions did
    // not freeze its key space.
    n3.shutdown().await;
    eventually("n1 sees n3 left", WAIT, || async {
        (tests::state_of(&n1, "n3").await == Some(node::MemberState::Left)).then_some(())
    })
    .await;
    assert_eq!(send_get(out, 20).await, 20);
    n2.shutdown().await;
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_member_never_gets_traffic() {
    let mut mesh = Mesh::new();
    let up2 = Upstream::start(ok("n2")).await;
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up2.addr)]))
        .await;
    routable(&n1, "web", 1).await;
    let rogue = Rogue::start(&mesh.pki, "evil", &["other"]).await;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let ghost = NodeId {
        name: "ghost".into(),
        generation,
        addr: rogue.addr(),
    };
    let entry = DigestEntry {
        id: ghost.clone(),
        heartbeat: 1,
        last_gc_version: 0,
        max_version: 0,
    };
    let keys = [
        ("schema", "1"),
        ("state", "serving"),
        ("services", r#"["web"]"#),
        ("svc.web", HEALTHY),
    ];
    let end = Instant::now() + Duration::from_secs(2);
    let mut hb = 1;
    while Instant::now() < end {
        hb += 1;
        // Unsigned, as an unmodified chitchat would carry it.
        let kvs = keys
            .iter()
            .enumerate()
            .map(|(i, (k, v))| plain(k, i as u64 + 1, v))
            .collect();
        // Signed with the rogue's key and a certificate naming someone else.
        let mut signed = vec![rogue.cert_kv(&ghost, 1)];
        signed.extend(
            keys.iter()
                .enumerate()
                .map(|(i, (k, v))| rogue.signed(&ghost, k, i as u64 + 2, v)),
        );
        for delta in [kvs, signed] {
            let msg = Message {
                version: 1,
                body: Body::SynAck {
                    digest: vec![DigestEntry {
                        heartbeat: hb,
                        ..entry.clone()
                    }],
                    delta: vec![node_delta(&ghost, delta)],
                },
            };
            rogue.send(n1.quic_addr(), &msg).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = n1.outbound_addr().unwrap();
    assert_eq!(send_get(out, 100).await, 100);
    assert_eq!(rogue.streams(), 0, "no request reached the rogue");
    assert_eq!(
        up2.hits(),
        100,
        "every request reached the genuine instance"
    );
    let members = admin_get(n1.admin_addr(), "/v1/members").await.1;
    assert!(!members.contains("ghost"), "{members}");
    let m = metrics_of(&n1).await;
    assert!(metric(&m, "shoal_gossip_refused_total{reason=\"unknown_member\"}") > 0.0);
    assert!(metric(&m, "shoal_gossip_refused_total{reason=\"unverified\"}") > 0.0);
    n2.shutdown().await;
    n1.shutdown().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_and_ghost_floods_do_not_stop_gossip() {
    let mut mesh = Mesh::new();
    let up2 = Upstream::start(ok("n2")).await;
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up2.addr)]))
        .await;
    routable(&n1, "web", 1).await;
    let rogue = Rogue::start(&mesh.pki, "evil", &["other"]).await;
    let fds_before = open_fds();

    // One message past chitchat's limit, one just under it full of garbage.
    let mut big = vec![0x53, 0xb0, 1, 0];
    big.resize(70_000, 0xff);
    rogue.send_raw(n1.quic_addr(), &big).await;
    big.truncate(65_000);
    rogue.send_raw(n1.quic_addr(), &big).await;

    // 2,000 ghost members with long ids, in messages that each fit.
    for batch in 0..4 {
        let digest = (0..500)
            .map(|i| DigestEntry {
                id: NodeId {
                    name: format!("ghost-{batch}-{i:0>48}"),
                    generation: 1,
                    addr: format!("127.0.0.{}:{}", 2 + batch, 10_000 + i)
                        .parse()
                        .unwrap(),
                },
                heartbeat: 1,
                last_gc_version: 0,
                max_version: 1,
            })
            .collect();
        let msg = Message {
            version: 1,
            body: Body::Syn {
                cluster_id: "shoal".into(),
                digest,
            },
        };
        rogue.send(n1.quic_addr(), &msg).await;
    }

    // Gossip still works: a node started after the flood joins and is routed to.
    let up3 = Upstream::start(ok("n3")).await;
    let n3 = mesh
        .start(mesh.config("n3", &["web"], &[("web", up3.addr)]))
        .await;
    routable(&n1, "web", 2).await;
    let out = n1.outbound_addr().unwrap();
    assert_eq!(send_get(out, 50).await, 50);
    let names: Vec<String> = n1.members().await.into_iter().map(|m| m.name).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    assert_eq!(admin_get(n1.admin_addr(), "/healthz").await.0, 200);
    let m = metrics_of(&n1).await;
    // The message past 64 KiB is refused by the transport's gossip channel
    // cap before it is read; the one under it by the gossip guard.
    assert!(
        metric(&m, "shoal_gossip_refused_total{reason=\"oversize\"}")
            + metric(&m, "shoal_quic_messages_refused_total{reason=\"oversize\"}")
            >= 1.0
    );
    assert!(metric(&m, "shoal_gossip_refused_total{reason=\"malformed\"}") >= 1.0);
    assert!(metric(&m, "shoal_gossip_refused_total{reason=\"unknown_member\"}") >= 2000.0);
    // No socket per ghost: gossip never tried to reach them.
    let fds_after = open_fds();
    assert!(
        fds_after < fds_before + 60,
        "fds {fds_before} -> {fds_after}"
    );
    n3.shutdown().await;
    n2.shutdown().await;
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_name_refuses_to_start_and_the_first_turns_unready() {
    let mut mesh = Mesh::new();
    let n1 = mesh.start(mesh.config("n1", &["web"], &[])).await;
    let n2 = mesh.start(mesh.config("n2", &["web"], &[])).await;
    eventually("n1 sees n2", WAIT, || async {
        (tests::alive(&n1).await.len() == 2).then_some(())
    })
    .await;
    assert_eq!(admin_get(n1.admin_addr(), "/readyz").await.0, 200);
    // The impostor reuses n2's name and certificate folder on another port.
    let mut cfg = mesh.config("n2-copy", &["web"], &[]);
    cfg.name = "n2".into();
    cfg.certs = mesh.pki.path().join("n2");
    let impostor = node::Node::start(cfg)
        .await
        .expect("impostor starts its endpoint");
    let (code, why) = tokio::time::timeout(Duration::from_secs(15), impostor.fatal())
        .await
        .expect("the impostor gives up");
    assert_eq!(code, 78, "{why}");
    assert!(why.contains(&n2.quic_addr().to_string()), "{why}");
    // The genuine n2 sees the impostor too and stops being ready.
    eventually("n2 turns unready", WAIT, || async {
        let (status, body) = admin_get(n2.admin_addr(), "/readyz").await;
        (status == 503 && body.contains("another node with this name")).then_some(())
    })
    .await;
    impostor.kill().await;
    n2.shutdown().await;
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_gossip_dies_reports_unhealthy_and_exits() {
    let mut mesh = Mesh::new();
    let n1 = mesh.start(mesh.config("n1", &["web"], &[])).await;
    assert_eq!(admin_get(n1.admin_addr(), "/healthz").await.0, 200);
    n1.gossip().break_loop_for_test();
    eventually("healthz turns 503", WAIT, || async {
        (admin_get(n1.admin_addr(), "/healthz").await.0 == 503).then_some(())
    })
    .await;
    let m = metrics_of(&n1).await;
    assert_eq!(metric(&m, "shoal_gossip_healthy"), 0.0);
    let (code, _) = tokio::time::timeout(Duration::from_secs(5), n1.fatal())
        .await
        .expect("fatal resolves");
    assert_eq!(code, 70);
    n1.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_republished_and_newcomers_verify_it() {
    let mut mesh = Mesh::new();
    let n1 = mesh.start(mesh.config("n1", &["web"], &[])).await;
    let n2 = mesh.start(mesh.config("n2", &["web"], &[])).await;
    eventually("n1 sees n2", WAIT, || async {
        (tests::alive(&n1).await.len() == 2).then_some(())
    })
    .await;
    let before = n1
        .gossip()
        .key_of("n2", "cert")
        .await
        .expect("n2 publishes its cert");
    mesh.pki
        .issue_into("n2", "n2", &["web"], node::certs::Validity::days(2));
    eventually("n1 sees n2's renewed certificate", WAIT, || async {
        let now = n1.gossip().key_of("n2", "cert").await?;
        (now != before).then_some(())
    })
    .await;
    // A node that meets n2 only now verifies all of n2's state.
    let n3 = mesh.start(mesh.config("n3", &["web"], &[])).await;
    eventually("n3 sees all three", WAIT, || async {
        (tests::alive(&n3).await.len() == 3).then_some(())
    })
    .await;
    n3.shutdown().await;
    n2.shutdown().await;
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_heartbeats_far_ahead_do_not_make_a_member_look_dead() {
    let mut mesh = Mesh::new();
    let mut nodes = Vec::new();
    for i in 1..=4 {
        nodes.push(
            mesh.start(mesh.config(&format!("n{i}"), &["web"], &[]))
                .await,
        );
    }
    let n1 = &nodes[0];
    eventually("n1 sees all four", WAIT, || async {
        (tests::alive(n1).await.len() == 4).then_some(())
    })
    .await;
    let rogue = Rogue::start(&mesh.pki, "evil", &["other"]).await;
    let n2_id = n1
        .members()
        .await
        .iter()
        .find(|m| m.name == "n2")
        .map(id_of)
        .unwrap();
    // For 2 s, relay n2 heartbeats far ahead of the truth to n1 (chitchat
    // keeps the highest it saw: unchecked, every genuine one after would
    // look old and n2 would be declared dead), then watch for 2 s more.
    let attack_end = Instant::now() + Duration::from_secs(2);
    let end = attack_end + Duration::from_secs(2);
    let mut round = 0u64;
    while Instant::now() < end {
        round += 1;
        if Instant::now() < attack_end {
            let msg = Message {
                version: 1,
                body: Body::Syn {
                    cluster_id: "shoal".into(),
                    digest: vec![DigestEntry {
                        id: n2_id.clone(),
                        heartbeat: (1 << 60) + round * 1000,
                        last_gc_version: 0,
                        max_version: 0,
                    }],
                },
            };
            rogue.send(n1.quic_addr(), &msg).await;
        }
        assert_eq!(
            tests::state_of(n1, "n2").await,
            Some(node::MemberState::Alive),
            "n2 must stay alive"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = metrics_of(n1).await;
    assert!(metric(&m, "shoal_gossip_refused_total{reason=\"heartbeat_ahead\"}") >= 1.0);
    for n in nodes {
        n.shutdown().await;
    }
}
