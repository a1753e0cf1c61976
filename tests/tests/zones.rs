//! Zone pools with a gossip backbone, on real in-process nodes: 3 zones × 3
//! nodes, each zone its own chitchat cluster over the same QUIC endpoints,
//! one representative per zone on the backbone. Checked from outside:
//! which instance answers an HTTP call through the outbound listener, what
//! each node's store applied, which node other zones learn as a zone's
//! representative. The representative rule is recomputed here with the
//! test's own FNV-1a, not the crate's.
//!
//! Figures print on stdout (`cargo test -p tests --test zones -- --nocapture`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use gossip::guard::Refusal;
use gossip::wire::{Body, DigestEntry, KeyValue, Message, NodeDelta, NodeId};
use node::Node;
use node::policy::Kind;
use tests::eventually;
use tests::rogue::Rogue;
use tests::traffic::{Mesh, Upstream, body_of, get, http1, ok};

const DEADLINE: Duration = Duration::from_secs(30);

/// 64-bit FNV-1a, written from the published definition (offset basis
/// 14695981039346656037, prime 1099511628211).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(14_695_981_039_346_656_037u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1_099_511_628_211)
    })
}

/// The representative of a zone whose alive members are `names` (one per zone).
fn rep_of<'a>(names: &[&'a str]) -> &'a str {
    names.iter().min_by_key(|n| (fnv(n), **n)).copied().unwrap()
}

fn zone_config(
    mesh: &Mesh,
    name: &str,
    zone: &str,
    services: &[(&str, SocketAddr)],
) -> node::NodeConfig {
    let cert: Vec<&str> = if services.is_empty() {
        vec!["client"]
    } else {
        services.iter().map(|(s, _)| *s).collect()
    };
    let mut c = mesh.config(name, &cert, services);
    c.zone = zone.into();
    c.zone_pools = true;
    c.zone_representatives = 1;
    c.proxy.outbound = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// One GET of service `host` through `node`'s outbound: the body on a 2xx.
async fn call(node: &Node, host: &str) -> Option<String> {
    let out = node.outbound_addr()?;
    let r = tokio::time::timeout(Duration::from_secs(3), http1().request(get(out, host, "/")))
        .await
        .ok()?
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(String::from_utf8_lossy(&body_of(r).await).into_owned())
}

/// The representatives of `zone` as `node` learns them from its own
/// representative's relayed summary (`xz.<zone>.reps`).
async fn relayed_reps(node: &Node, zone: &str) -> Vec<String> {
    let key = format!("xz.{zone}.reps");
    for p in node.gossip().scan("xz.").await {
        for (k, v) in p.keys {
            if k == key
                && let Ok(list) = serde_json::from_str::<Vec<(String, SocketAddr)>>(&v)
            {
                return list.into_iter().map(|(n, _)| n).collect();
            }
        }
    }
    Vec::new()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_zones_fail_over_reelect_and_share_policy() {
    let mesh = Mesh::new();
    let op = mesh.pki.operator("alice");
    let up_a3 = Upstream::start(ok("a3")).await;
    let up_b2 = Upstream::start(ok("b2")).await;
    let order = ["a1", "b1", "c1", "a2", "b2", "c2", "a3", "b3", "c3"];
    let mut seeds: Vec<String> = Vec::new();
    let mut nodes: HashMap<&str, Node> = HashMap::new();
    for name in order {
        let zone = &name[..1];
        let services: Vec<(&str, SocketAddr)> = match name {
            "a3" => vec![("api", up_a3.addr)],
            "b2" => vec![("api", up_b2.addr)],
            _ => vec![],
        };
        let mut c = zone_config(&mesh, name, zone, &services);
        c.seeds = seeds.clone();
        let node = Node::start(c).await.expect("start node");
        // The first node of each zone seeds everyone after it.
        if name.ends_with('1') {
            seeds.push(node.quic_addr().to_string());
        }
        nodes.insert(name, node);
    }

    // Each zone's pool lists only its own zone.
    for (name, node) in &nodes {
        let zone = &name[..1];
        let want: Vec<String> = (1..=3).map(|i| format!("{zone}{i}")).collect();
        eventually(&format!("{name} sees its zone alive"), DEADLINE, || async {
            (tests::alive(node).await == want).then_some(())
        })
        .await;
    }
    // Zone c has no instance of api: it routes to both other zones.
    eventually("c1 routes api to a3 and b2", DEADLINE, || async {
        let mut eps: Vec<String> = nodes["c1"]
            .proxy()
            .services()
            .into_iter()
            .filter(|s| s.service == "api")
            .flat_map(|s| s.endpoints)
            .filter(|e| e.routable)
            .map(|e| e.node)
            .collect();
        eps.sort();
        (eps == ["a3", "b2"]).then_some(())
    })
    .await;
    for name in ["a1", "a2"] {
        eventually(
            &format!("{name} routes api remotely too"),
            DEADLINE,
            || async {
                let n = nodes[name]
                    .proxy()
                    .services()
                    .into_iter()
                    .filter(|s| s.service == "api")
                    .flat_map(|s| s.endpoints)
                    .filter(|e| e.routable)
                    .count();
                (n == 2).then_some(())
            },
        )
        .await;
    }
    // Zone a prefers its own instance.
    for _ in 0..20 {
        assert_eq!(call(&nodes["a1"], "api").await.as_deref(), Some("a3"));
    }
    eventually("c1 reaches api in another zone", DEADLINE, || async {
        call(&nodes["c1"], "api")
            .await
            .filter(|b| b == "a3" || b == "b2")
    })
    .await;
    // Zone pools refuse each other: b1 and c1 were seeded with a1.
    let foreign: u64 = nodes
        .values()
        .map(|n| n.gossip().guard_stats().count(Refusal::ForeignCluster))
        .sum();
    assert!(foreign > 0, "zone pools refused each other's gossip");

    // Cross-zone failover: zone a's only api instance crashes.
    let started = Instant::now();
    nodes.remove("a3").unwrap().kill().await;
    eventually("a1 fails over to b2", DEADLINE, || async {
        call(&nodes["a1"], "api").await.filter(|b| b == "b2")
    })
    .await;
    let failover = started.elapsed();
    for _ in 0..20 {
        assert_eq!(call(&nodes["a1"], "api").await.as_deref(), Some("b2"));
    }
    println!("zones: cross-zone failover {} ms", failover.as_millis());

    // Zone c loses its only representative: the next lowest hash takes
    // over and the other zones learn it.
    let c_rep = rep_of(&["c1", "c2", "c3"]);
    let left: Vec<&str> = ["c1", "c2", "c3"]
        .into_iter()
        .filter(|n| *n != c_rep)
        .collect();
    let c_next = rep_of(&left);
    eventually("zone a knows zone c's representative", DEADLINE, || async {
        (relayed_reps(&nodes["a1"], "c").await == [c_rep]).then_some(())
    })
    .await;
    let started = Instant::now();
    nodes.remove(c_rep).unwrap().kill().await;
    eventually(
        &format!("zone a learns {c_next} represents zone c"),
        DEADLINE,
        || async { (relayed_reps(&nodes["a1"], "c").await == [c_next]).then_some(()) },
    )
    .await;
    let reelect = started.elapsed();
    assert!(nodes[c_next].zones().unwrap().is_representative());
    println!(
        "zones: representative {c_rep} killed, {c_next} represents zone c everywhere after {} ms",
        reelect.as_millis()
    );
    // The zone still reaches the others through its new representative.
    let caller = left
        .iter()
        .find(|n| **n != c_next)
        .copied()
        .unwrap_or(c_next);
    eventually(
        &format!("{caller} reaches api via b2"),
        DEADLINE,
        || async { call(&nodes[caller], "api").await.filter(|b| b == "b2") },
    )
    .await;

    // A policy written in zone b reaches every node of every zone.
    let body = "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata:\n  name: api-rl\nspec:\n  target: api\n  requestsPerSecond: 1000\n";
    let started = Instant::now();
    let (status, reply) = op
        .put(
            nodes["b3"].admin_addr(),
            "RateLimit",
            "api-rl",
            body,
            "",
            &[],
        )
        .await;
    assert_eq!(status, 201, "{reply}");
    let version = serde_json::from_str::<serde_json::Value>(&reply).unwrap()["version"]
        .as_str()
        .unwrap()
        .to_string();
    for (name, node) in &nodes {
        eventually(&format!("{name} applies {version}"), DEADLINE, || async {
            node.policies()
                .entry(Kind::RateLimit, "api-rl")
                .filter(|e| e.version.to_string() == version)
                .map(|_| ())
        })
        .await;
    }
    println!(
        "zones: policy written in zone b applied on all {} nodes of 3 zones after {} ms",
        nodes.len(),
        started.elapsed().as_millis()
    );

    for (_, n) in nodes {
        n.shutdown().await;
    }
}

fn delta(id: &NodeId, kvs: Vec<KeyValue>) -> Message {
    Message {
        version: 1,
        body: Body::Ack {
            delta: vec![NodeDelta {
                id: id.clone(),
                last_gc_version: 0,
                from_version_excluded: 0,
                key_values: kvs,
                set_max_version: None,
            }],
        },
    }
}

fn syn(cluster: &str, id: &NodeId, heartbeat: u64) -> Message {
    Message {
        version: 1,
        body: Body::Syn {
            cluster_id: cluster.into(),
            digest: vec![DigestEntry {
                id: id.clone(),
                heartbeat,
                last_gc_version: 0,
                max_version: 3,
            }],
        },
    }
}

/// A rogue representative that claims zone `claims` and publishes a
/// summary of zone `summarises` listing itself as the `web` endpoint.
fn summary_kvs(rogue: &Rogue, id: &NodeId, claims: &str, summarises: &str) -> Vec<KeyValue> {
    let summary = format!(
        r#"{{"endpoints":[{{"node":"{}","addr":"{}","weight":100,"ewma_ms":0.1,"in_flight":0}}]}}"#,
        id.name, id.addr
    );
    vec![
        rogue.cert_kv(id, 1),
        rogue.signed(id, "zone", 2, claims),
        rogue.signed(id, &format!("zsum.{summarises}.svc.web"), 3, &summary),
    ]
}

async fn send_on(rogue: &Rogue, to: SocketAddr, channel: u8, msg: &Message) {
    let _ = rogue
        .endpoint
        .send_message(to, channel, &msg.encode())
        .await;
}

fn web_endpoints(node: &Node) -> Vec<(String, bool, Option<&'static str>)> {
    node.proxy()
        .services()
        .into_iter()
        .filter(|s| s.service == "web")
        .flat_map(|s| s.endpoints)
        .map(|e| (e.node, e.routable, e.refused))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_zone_summaries_and_foreign_pools_are_refused() {
    let mesh = Mesh::new();
    let a1 = Node::start(zone_config(&mesh, "a1", "a", &[]))
        .await
        .expect("start a1");
    let bb = eventually("a1 represents zone a", DEADLINE, || async {
        a1.zones().unwrap().backbone().borrow().clone()
    })
    .await;
    // Two rogues with valid certificates that do not name `web`.
    let liar = Rogue::start(&mesh.pki, "liar", &["other"]).await;
    let honest = Rogue::start(&mesh.pki, "honest", &["other"]).await;
    let liar_id = NodeId {
        name: "liar".into(),
        generation: 1,
        addr: liar.addr(),
    };
    let honest_id = NodeId {
        name: "honest".into(),
        generation: 1,
        addr: honest.addr(),
    };
    let to = a1.quic_addr();

    // The liar claims zone a and publishes a summary for zone b; the honest
    // rogue claims zone b and publishes zone b's. Both keep heartbeating.
    let end = Instant::now() + Duration::from_secs(3);
    let mut hb = 1;
    while Instant::now() < end {
        hb += 1;
        for (r, id, claims) in [(&liar, &liar_id, "a"), (&honest, &honest_id, "b")] {
            let kvs = summary_kvs(r, id, claims, "b");
            send_on(r, to, gossip::BACKBONE_CHANNEL, &delta(id, kvs)).await;
            send_on(
                r,
                to,
                gossip::BACKBONE_CHANNEL,
                &syn("shoal/backbone", id, hb),
            )
            .await;
        }
        // A zone b member knocking on zone a's pool, and a member of zone
        // b's cluster: both refused.
        let kvs = vec![
            liar.cert_kv(&liar_id, 1),
            liar.signed(&liar_id, "zone", 2, "b"),
        ];
        send_on(&liar, to, gossip::GOSSIP_CHANNEL, &delta(&liar_id, kvs)).await;
        send_on(
            &liar,
            to,
            gossip::GOSSIP_CHANNEL,
            &syn("shoal/zone/b", &liar_id, hb),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The liar never became a backbone member nor a zone a member.
    let names: Vec<String> = bb.members().await.into_iter().map(|m| m.name).collect();
    assert!(!names.iter().any(|n| n == "liar"), "{names:?}");
    assert!(!tests::alive(&a1).await.iter().any(|n| n == "liar"));
    let refused = |g: &gossip::Gossip, r: Refusal| g.guard_stats().count(r);
    assert!(
        refused(&bb, Refusal::ForeignZone) >= 10,
        "liar's summary refused"
    );
    assert!(
        refused(a1.gossip(), Refusal::ForeignZone) >= 10,
        "zone b member refused in zone a"
    );
    assert!(
        refused(a1.gossip(), Refusal::ForeignCluster) >= 10,
        "zone b's cluster refused"
    );

    // The control: the honest summary was admitted and relayed, so a1
    // routes web to `honest` — and the mTLS check then refuses it, since
    // its certificate does not name web. No request reaches it.
    eventually("a1 learns web from zone b's summary", DEADLINE, || async {
        let eps = web_endpoints(&a1);
        (eps.iter().any(|(n, _, _)| n == "honest")).then_some(())
    })
    .await;
    assert!(!web_endpoints(&a1).iter().any(|(n, _, _)| n == "liar"));
    assert_eq!(call(&a1, "web").await, None);
    eventually(
        "the summary's endpoint is refused by its certificate",
        DEADLINE,
        || async {
            web_endpoints(&a1)
                .iter()
                .any(|(n, routable, refused)| {
                    n == "honest" && !routable && *refused == Some("peer-not-serving")
                })
                .then_some(())
        },
    )
    .await;
    assert_eq!(honest.streams(), 0);
    assert_eq!(liar.streams(), 0);
    a1.shutdown().await;
}
