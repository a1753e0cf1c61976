//! Policy under attack: a rogue peer holding a valid node certificate, and
//! HTTP writers without an operator's key. Every outcome is read from
//! outside: admin API answers, `/metrics`, member lists, traffic.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gossip::{Gossip, GossipConfig, NodeRecord};
use node::Node;
use node::policy::store::{Record, content_hash};
use node::policy::{Document, Kind, Signature};
use serde::Serialize;
use tests::operator::Operator;
use tests::traffic::{Mesh, Upstream, body_of, get, http1, ok, routable};
use tests::{Cluster, Pki, TEST_GOSSIP, admin_get, admin_request, eventually};
use transport::{Endpoint, EndpointConfig, TlsFiles};

const DEADLINE: Duration = Duration::from_secs(15);
const WRAPPED: &str = "18446744073709551615.4294967295@n1";

fn rate_limit(name: &str, rps: u32) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata:\n  name: {name}\nspec:\n  target: web\n  requestsPerSecond: {rps}\n"
    )
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The sum of `name` samples carrying every label in `labels`, from `/metrics`.
async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = admin_get(admin, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn refused(admin: SocketAddr, source: &str, reason: &str) -> f64 {
    metric(
        admin,
        "shoal_policy_refused_total",
        &[("source", source), ("reason", reason)],
    )
    .await
}

/// Waits until every node counts at least `n` refusals of `reason` from peers.
async fn all_refuse(nodes: &[&Node], reason: &str, n: f64) {
    for node in nodes {
        let admin = node.admin_addr();
        eventually(
            &format!("{} counts {n} peer refusals for {reason}", node.name()),
            DEADLINE,
            || async move { (refused(admin, "peer", reason).await >= n).then_some(()) },
        )
        .await;
    }
}

/// `(status, body)` of GET /v1/policies/RateLimit/<name> as JSON.
async fn rate_limit_on(node: &Node, name: &str) -> (u16, serde_json::Value) {
    let (status, body) =
        admin_get(node.admin_addr(), &format!("/v1/policies/RateLimit/{name}")).await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// The `/v1/policies` rows of `node`.
async fn list(node: &Node) -> Vec<serde_json::Value> {
    let (_, body) = admin_get(node.admin_addr(), "/v1/policies").await;
    serde_json::from_str(&body).unwrap()
}

/// The policy record as it was before signing existed (five fields).
#[derive(Serialize)]
struct LegacyRecord {
    kind: String,
    name: String,
    version: String,
    hash: String,
    body: Option<String>,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).unwrap()
}

/// A modified node: valid node certificate, real gossip, and a policy
/// channel that answers every body request with whatever it is told to.
struct Rogue {
    endpoint: Endpoint,
    gossip: Gossip,
    answer: Arc<Mutex<Option<Vec<u8>>>>,
    asked: Arc<Mutex<Vec<String>>>,
    cert_dir: std::path::PathBuf,
}

impl Rogue {
    async fn start(pki: &Pki, seed: String) -> Self {
        let cert_dir = pki.issue("rogue", &["other"]);
        let endpoint = Endpoint::bind(EndpointConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            TlsFiles::new(&cert_dir),
        ))
        .unwrap();
        let mut config = GossipConfig::new("rogue");
        config.seeds = vec![seed];
        config.interval = TEST_GOSSIP;
        let record = NodeRecord::new("z", "127.0.0.1:1", vec!["other".into()]);
        let trust = gossip::Trust::from_dir(&cert_dir).unwrap();
        let gossip = Gossip::start(endpoint.clone(), config, record, trust)
            .await
            .unwrap();
        let answer: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let mut requests = endpoint.subscribe(2, 64);
        let (ep, a, log) = (endpoint.clone(), answer.clone(), asked.clone());
        tokio::spawn(async move {
            while let Some(msg) = requests.recv().await {
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&msg.payload).into_owned());
                let reply = a.lock().unwrap().clone();
                if let Some(bytes) = reply {
                    let _ = ep.send_message(msg.from.addr(), 3, &bytes).await;
                }
            }
        });
        Rogue {
            endpoint,
            gossip,
            answer,
            asked,
            cert_dir,
        }
    }

    /// Advertises `value` for `policy:RateLimit/<name>` and answers body
    /// requests with `record`.
    async fn advertise(&self, name: &str, value: &str, record: &Record) {
        *self.answer.lock().unwrap() = Some(encode(record));
        self.gossip
            .set_key(&format!("policy:RateLimit/{name}"), value)
            .await;
    }

    async fn send(&self, to: SocketAddr, bytes: &[u8]) {
        self.endpoint.send_message(to, 3, bytes).await.unwrap();
    }

    async fn stop(self) {
        self.gossip.shutdown().await;
        self.endpoint.close();
    }
}

fn record(name: &str, version: &str, body: Option<&str>, sig: Option<Signature>) -> Record {
    let hash = match body {
        Some(b) => content_hash(&Document::parse(b).unwrap().canonical),
        None => "-".into(),
    };
    Record {
        kind: "RateLimit".into(),
        name: name.into(),
        version: version.into(),
        hash,
        body: body.map(str::to_string),
        prev: None,
        signature: sig,
        operator: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_node_cannot_inject_wrap_roll_back_or_delete_policy() {
    let cluster = Cluster::start(3).await;
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;
    let nodes: Vec<&Node> = cluster.nodes.iter().collect();
    let op = cluster.pki.operator("alice");

    // Two signed versions: `old` is then superseded by `new`.
    let old = rate_limit("web-rl", 1000);
    let (status, body) = op
        .put(
            nodes[0].admin_addr(),
            "RateLimit",
            "web-rl",
            &old,
            "?wait=all",
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let old_version: node::policy::Version = serde_json::from_str::<serde_json::Value>(&body)
        .unwrap()["version"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let new = rate_limit("web-rl", 2000);
    let (status, body) = op
        .put(
            nodes[1].admin_addr(),
            "RateLimit",
            "web-rl",
            &new,
            "?wait=all",
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let in_force: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(in_force["applied_everywhere"], true, "{in_force}");

    let rogue = Rogue::start(&cluster.pki, cluster.seed()).await;
    cluster
        .converged(&["n1", "n2", "n3", "rogue"], DEADLINE)
        .await;

    // (a) Unsolicited records on channel 3, one even validly signed by the
    // operator, one unsigned, one in the pre-signing format.
    let body_a = rate_limit("injected", 1);
    let t = now_ms();
    let signed = op.sign_at(Kind::RateLimit, "injected", Some(&body_a), t);
    let valid = record(
        "injected",
        &format!("{t}.0@n1"),
        Some(&body_a),
        Some(signed),
    );
    let unsigned = record("injected", &format!("{t}.0@n1"), Some(&body_a), None);
    // (b) The wrapped version, in both formats.
    let wrapped = record("web-rl", WRAPPED, Some(&rate_limit("web-rl", 1)), None);
    let legacy = LegacyRecord {
        kind: "RateLimit".into(),
        name: "web-rl".into(),
        version: WRAPPED.into(),
        hash: wrapped.hash.clone(),
        body: wrapped.body.clone(),
    };
    for n in &nodes {
        for bytes in [
            encode(&valid),
            encode(&unsigned),
            encode(&wrapped),
            encode(&legacy),
        ] {
            rogue.send(n.quic_addr(), &bytes).await;
        }
    }
    all_refuse(&nodes, "unsolicited", 3.0).await;
    all_refuse(&nodes, "malformed", 1.0).await;
    // The wrapped version is also advertised; no node ever asks for it.
    rogue
        .advertise("web-rl", &format!("{WRAPPED} {}", wrapped.hash), &wrapped)
        .await;
    for n in &nodes {
        let admin = n.admin_addr();
        eventually(
            &format!("{} sees the wrapped advert", n.name()),
            DEADLINE,
            || async move {
                let (_, body) = admin_get(admin, "/v1/policies/status").await;
                body.contains(WRAPPED).then_some(())
            },
        )
        .await;
    }

    // (c) Roll back: the old signed body re-advertised at a higher version.
    let high = now_ms() + 60_000;
    let old_sig = op.sign_at(Kind::RateLimit, "web-rl", Some(&old), old_version.wall_ms);
    let rollback = record(
        "web-rl",
        &format!("{high}.0@rogue"),
        Some(&old),
        Some(old_sig),
    );
    rogue
        .advertise(
            "web-rl",
            &format!("{} {}", rollback.version, rollback.hash),
            &rollback,
        )
        .await;
    all_refuse(&nodes, "version_mismatch", 1.0).await;

    // (d) Deletes: an unsigned tombstone, then one signed with the rogue's
    // own (valid, CA-issued) node key.
    let tomb = record("web-rl", &format!("{}.0@rogue", high + 1000), None, None);
    rogue
        .advertise("web-rl", &format!("{} -", tomb.version), &tomb)
        .await;
    all_refuse(&nodes, "unsigned", 1.0).await;
    let node_key = Operator::from_pem_files(
        &cluster.pki.path().join("rogue-signer"),
        &rogue.cert_dir.join("node.pem"),
        &rogue.cert_dir.join("node.key"),
    );
    let forged_at = high + 2000;
    let forged = record(
        "web-rl",
        &format!("{forged_at}.0@rogue"),
        None,
        Some(node_key.sign_at(Kind::RateLimit, "web-rl", None, forged_at)),
    );
    rogue
        .advertise("web-rl", &format!("{} -", forged.version), &forged)
        .await;
    all_refuse(&nodes, "not_operator", 1.0).await;

    // (e) The write in force relabelled with a maximal tie-breaker.
    let current: node::policy::Version = in_force["version"].as_str().unwrap().parse().unwrap();
    let same = op.sign_at(Kind::RateLimit, "web-rl", Some(&new), current.wall_ms);
    let relabel = record(
        "web-rl",
        &format!("{}.{}@zzz", current.wall_ms, u32::MAX),
        Some(&new),
        Some(same),
    );
    rogue
        .advertise(
            "web-rl",
            &format!("{} {}", relabel.version, relabel.hash),
            &relabel,
        )
        .await;
    all_refuse(&nodes, "relabeled", 1.0).await;

    // Nothing of it applied anywhere: the operator's version is in force.
    for n in &nodes {
        let (status, doc) = rate_limit_on(n, "web-rl").await;
        assert_eq!(status, 200, "{}: {doc}", n.name());
        assert_eq!(doc["spec"]["requestsPerSecond"], 2000, "{}", n.name());
        let rows = list(n).await;
        assert_eq!(rows.len(), 1, "{}: {rows:?}", n.name());
        assert_eq!(rows[0]["version"], in_force["version"], "{}", n.name());
        assert_eq!(rows[0]["operator"], "spiffe://test.shoal/operator/alice");
    }
    let asked = rogue.asked.lock().unwrap().clone();
    assert!(
        !asked.iter().any(|a| a.contains(WRAPPED)),
        "a node asked for the wrapped version: {asked:?}"
    );
    assert!(!asked.is_empty(), "no node ever asked the rogue anything");

    // The operator's next PUT and DELETE take effect everywhere.
    let (status, body) = op
        .put(
            nodes[2].admin_addr(),
            "RateLimit",
            "web-rl",
            &rate_limit("web-rl", 3000),
            "",
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for n in &nodes {
        eventually(
            &format!("{} runs 3000", n.name()),
            DEADLINE,
            || async move {
                let (_, doc) = rate_limit_on(n, "web-rl").await;
                (doc["spec"]["requestsPerSecond"] == 3000).then_some(())
            },
        )
        .await;
    }
    let (status, body) = op
        .delete(nodes[0].admin_addr(), "RateLimit", "web-rl", "")
        .await;
    assert_eq!(status, 200, "{body}");
    for n in &nodes {
        eventually(&format!("{} deletes", n.name()), DEADLINE, || async move {
            let (status, doc) = rate_limit_on(n, "web-rl").await;
            (status == 404 && doc.to_string().contains("deleted")).then_some(())
        })
        .await;
        assert_eq!(n.policies().snapshot().rate_limits("web").len(), 0);
    }
    rogue.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_writes_need_a_valid_operator_signature_of_this_mesh() {
    let pki = Pki::new("test.shoal");
    let n1 = Node::start(pki.node_config("n1", &[])).await.unwrap();
    let admin = n1.admin_addr();
    let alice = pki.operator("alice");
    let doc = rate_limit("rl", 5);
    let path = "/v1/policies/RateLimit/rl";
    let errors = |body: &str| -> String {
        serde_json::from_str::<serde_json::Value>(body).unwrap()["errors"].to_string()
    };

    // Unsigned PUT and DELETE.
    let (status, body) = admin_request(
        admin,
        "PUT",
        path,
        &[("content-type", "application/yaml")],
        &doc,
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert!(errors(&body).contains("not signed"), "{body}");
    let (status, _) = admin_request(admin, "DELETE", path, &[], "").await;
    assert_eq!(status, 401);

    // Signed by an operator of another CA (same trust domain name).
    let foreign = Pki::new("test.shoal").operator("alice");
    let (status, body) = foreign.put(admin, "RateLimit", "rl", &doc, "", &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        errors(&body).contains("not signed by this mesh's CA"),
        "{body}"
    );

    // Signed with a node certificate of this mesh.
    let n2 = pki.issue("n2", &["web"]);
    let node_signer = Operator::from_pem_files(
        &pki.path().join("n2-signer"),
        &n2.join("node.pem"),
        &n2.join("node.key"),
    );
    let (status, body) = node_signer
        .put(admin, "RateLimit", "rl", &doc, "", &[])
        .await;
    assert_eq!(status, 403, "{body}");
    assert!(
        errors(&body).contains("not an operator certificate"),
        "{body}"
    );

    // Tampered: the signature is over another body.
    let sig = alice.headers(Kind::RateLimit, "rl", Some(&doc));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/yaml")];
    headers.extend(sig.iter().map(|(k, v)| (*k, v.as_str())));
    let (status, body) = admin_request(admin, "PUT", path, &headers, &rate_limit("rl", 5000)).await;
    assert_eq!(status, 403, "{body}");
    assert!(errors(&body).contains("does not verify"), "{body}");
    // ... or for another policy name.
    let (status, _) = admin_request(
        admin,
        "PUT",
        "/v1/policies/RateLimit/rl2",
        &headers,
        &rate_limit("rl2", 5),
    )
    .await;
    assert_eq!(status, 403);

    // Signed eleven minutes ahead, and eleven minutes ago.
    for at in [now_ms() + 11 * 60_000, now_ms() - 11 * 60_000] {
        let (status, body) = put_signed_at(admin, &alice, &doc, at).await;
        assert_eq!(status, 400, "{body}");
        assert!(errors(&body).contains("signed-at"), "{body}");
    }
    assert!(list(&n1).await.is_empty(), "a refused write was stored");

    // The operator's write works; replaying it changes nothing; an older
    // signature than the one in force is refused.
    let (status, body) = alice.put(admin, "RateLimit", "rl", &doc, "", &[]).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = put_signed_at(admin, &alice, &doc, now_ms() - 5000).await;
    assert_eq!(status, 409, "{body}");
    assert!(errors(&body).contains("older"), "{body}");
    let rows = list(&n1).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["operator"], "spiffe://test.shoal/operator/alice");

    for (reason, n) in [
        ("unsigned", 2.0),
        ("unknown_ca", 1.0),
        ("not_operator", 1.0),
        ("bad_signature", 2.0),
        ("clock_ahead", 1.0),
        ("signed_too_long_ago", 1.0),
        ("stale", 1.0),
    ] {
        assert_eq!(refused(admin, "http", reason).await, n, "{reason}");
    }
    n1.shutdown().await;
}

/// A signed PUT of RateLimit/rl with the signature made at `at`.
async fn put_signed_at(admin: SocketAddr, op: &Operator, doc: &str, at: u64) -> (u16, String) {
    let sig = node::policy::trust::to_headers(&op.sign_at(Kind::RateLimit, "rl", Some(doc), at));
    let mut headers: Vec<(&str, &str)> = vec![("content-type", "application/yaml")];
    headers.extend(sig.iter().map(|(k, v)| (*k, v.as_str())));
    admin_request(admin, "PUT", "/v1/policies/RateLimit/rl", &headers, doc).await
}

/// ~120 KB of nesting inside an otherwise ordinary RateLimit.
fn nested(name: &str) -> String {
    let depth = 60_000;
    format!(
        "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {{name: {name}}}\nspec: {{target: web, requestsPerSecond: 1, x: {}{}}}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_documents_get_400_while_traffic_through_the_node_flows() {
    let up = Upstream::start(ok("v1")).await;
    let mut mesh = Mesh::new();
    let server = mesh
        .start(mesh.config("s1", &["web"], &[("web", up.addr)]))
        .await;
    let client = mesh.client("c1", |_| {}).await;
    routable(&client, "web", 1).await;
    let alice = mesh.pki.operator("alice");
    let doc = nested("deep");
    assert!(doc.len() > 110_000, "{}", doc.len());

    // Traffic through c1 for as long as the attack lasts.
    let outbound = client.outbound_addr().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let http = http1();
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || ok < 50 {
                match http.request(get(outbound, "web", "/")).await {
                    Ok(r) => {
                        let status = r.status();
                        let body = body_of(r).await;
                        if status == 200 && body == "v1" {
                            ok += 1;
                        } else {
                            failed.push(format!("{status} {body:?}"));
                        }
                    }
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let started = Instant::now();
    let (a, b) = tokio::join!(
        alice.put(client.admin_addr(), "RateLimit", "deep", &doc, "", &[]),
        alice.put(client.admin_addr(), "RateLimit", "deep", &doc, "", &[]),
    );
    eprintln!("two nested PUTs answered in {:?}", started.elapsed());
    for (status, body) in [a, b] {
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("nested deeper than 64"), "{body}");
    }

    // The same body as a peer's record, pulled because a rogue advertised it.
    let rogue = Rogue::start(&mesh.pki, mesh.seed.clone().unwrap()).await;
    let t = now_ms();
    let sig = alice.sign_at(Kind::RateLimit, "deep", Some(&doc), t);
    let rec = Record {
        kind: "RateLimit".into(),
        name: "deep".into(),
        version: format!("{t}.0@rogue"),
        hash: "0".repeat(64),
        body: Some(doc.clone()),
        prev: None,
        signature: Some(sig),
        operator: None,
    };
    rogue
        .advertise("deep", &format!("{} {}", rec.version, rec.hash), &rec)
        .await;
    all_refuse(&[&client, &server], "invalid_document", 1.0).await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    eprintln!(
        "{ok} requests through c1 during the attack, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the attack: {failed:?}"
    );
    assert!(ok >= 50);
    for n in [&client, &server] {
        assert!(list(n).await.is_empty(), "{} stored something", n.name());
    }
    rogue.stop().await;
    client.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_two_sides_show_a_conflict_until_written_again() {
    let pki = Pki::new("test.shoal");
    let alice = pki.operator("alice");
    let bob = pki.operator("bob");
    // n1 and n2 are apart (n2 does not know n1 yet): each takes a write.
    let n1 = Node::start(pki.node_config("n1", &[])).await.unwrap();
    let mut c2 = pki.node_config("n2", &[]);
    c2.data_dir = Some(pki.path().join("data-n2"));
    let n2 = Node::start(c2.clone()).await.unwrap();
    let (s1, b1) = alice
        .put(
            n1.admin_addr(),
            "RateLimit",
            "race",
            &rate_limit("race", 1),
            "",
            &[],
        )
        .await;
    assert_eq!(s1, 201, "{b1}");
    let (s2, b2) = bob
        .put(
            n2.admin_addr(),
            "RateLimit",
            "race",
            &rate_limit("race", 2),
            "",
            &[],
        )
        .await;
    assert_eq!(s2, 201, "{b2}");
    let v1 = serde_json::from_str::<serde_json::Value>(&b1).unwrap()["version"].clone();
    let v2 = serde_json::from_str::<serde_json::Value>(&b2).unwrap()["version"].clone();
    // The partition heals: n2 comes back seeded with n1.
    n2.kill().await;
    c2.seeds = vec![n1.quic_addr().to_string()];
    let n2 = Node::start(c2).await.unwrap();

    // Last writer (bob, signed later) wins everywhere; both sides show the conflict.
    for n in [&n1, &n2] {
        let row = eventually(
            &format!("{} shows the conflict", n.name()),
            DEADLINE,
            || async move {
                list(n)
                    .await
                    .into_iter()
                    .find(|r| r["name"] == "race" && r["conflict"].is_object())
            },
        )
        .await;
        assert_eq!(row["version"], v2, "{}: {row}", n.name());
        assert_eq!(row["conflict"]["winner"], v2);
        assert_eq!(row["conflict"]["loser"], v1);
        assert_eq!(row["operator"], "spiffe://test.shoal/operator/bob");
        let (status, doc) = rate_limit_on(n, "race").await;
        assert_eq!(status, 200);
        assert_eq!(doc["spec"]["requestsPerSecond"], 2);
        assert!(
            metric(n.admin_addr(), "shoal_policy_conflicts_total", &[]).await >= 1.0,
            "{}",
            n.name()
        );
        let headers = get_headers(n.admin_addr(), "/v1/policies/RateLimit/race").await;
        assert!(
            headers
                .get("shoal-conflict")
                .is_some_and(|h| h.contains(v1.as_str().unwrap())),
            "{}: {headers:?}",
            n.name()
        );
    }
    // What `shoal policy status` shows.
    let admin = n1.admin_addr();
    eventually("status marks the conflict", DEADLINE, || async move {
        let (_, body) = admin_get(admin, "/v1/policies/status").await;
        body.contains("conflict").then_some(())
    })
    .await;

    // The operator writes again, having seen the winner: resolved everywhere.
    let (status, body) = alice
        .put(
            n1.admin_addr(),
            "RateLimit",
            "race",
            &rate_limit("race", 3),
            "?wait=all",
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for n in [&n1, &n2] {
        eventually(&format!("{} resolved", n.name()), DEADLINE, || async move {
            list(n)
                .await
                .into_iter()
                .find(|r| r["name"] == "race" && r["conflict"].is_null())
                .filter(|r| r["operator"] == "spiffe://test.shoal/operator/alice")
        })
        .await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_all_counts_a_silent_member_as_pending_until_it_is_declared_dead() {
    // A slow failure detector (about 3 s), so the crashed member stays
    // undeclared for a while whatever the machine's load.
    let pki = Pki::new("test.shoal");
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=3 {
        let seeds: Vec<String> = nodes
            .first()
            .map(|n| n.quic_addr().to_string())
            .into_iter()
            .collect();
        let mut c = pki.node_config(&format!("n{i}"), &seeds);
        c.phi_threshold = 30.0;
        nodes.push(Node::start(c).await.unwrap());
    }
    let mut cluster = Cluster { pki, nodes };
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;
    let op = cluster.pki.operator("alice");
    let n3 = cluster.nodes.pop().unwrap();
    n3.kill().await;
    let admin = cluster.nodes[0].admin_addr();
    // Right after the crash n3 is not yet declared dead: it must not count
    // as applied, and it is listed as pending.
    let (status, body) = op
        .put(
            admin,
            "RateLimit",
            "w",
            &rate_limit("w", 1),
            "?wait=all&timeout=200ms",
            &[],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["applied_everywhere"], false, "{reply}");
    let pending: Vec<String> = reply["pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pending, vec!["n3".to_string()], "{reply}");
    // Once n3 is declared dead, the two that remain are everywhere.
    let n1 = &cluster.nodes[0];
    eventually("n3 dead", DEADLINE, || async move {
        (tests::state_of(n1, "n3").await == Some(node::MemberState::Dead)).then_some(())
    })
    .await;
    let (status, body) = op
        .put(
            admin,
            "RateLimit",
            "w",
            &rate_limit("w", 2),
            "?wait=all",
            &[],
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["applied_everywhere"], true, "{reply}");
    assert_eq!(reply["nodes"].as_array().unwrap().len(), 2, "{reply}");
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_certificate_is_refused_as_a_quic_peer() {
    let pki = Pki::new("test.shoal");
    let n1 = Node::start(pki.node_config("n1", &[])).await.unwrap();
    let op = pki.operator("mallory");
    // Present the operator certificate and key as if they were a node's.
    let dir = pki.path().join("operator-as-node");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(op.dir.join("operator.pem"), dir.join("node.pem")).unwrap();
    std::fs::copy(op.dir.join("operator.key"), dir.join("node.key")).unwrap();
    let result = tests::danger::dial_without_verifying(&dir, n1.quic_addr()).await;
    assert!(
        result.is_err(),
        "an operator certificate was accepted as a peer"
    );
    let refusals = metric(
        n1.admin_addr(),
        "shoal_quic_handshake_refusals_total",
        &[("reason", "no_node_san")],
    )
    .await;
    assert_eq!(refusals, 1.0);
    assert_eq!(tests::alive(&n1).await, vec!["n1".to_string()]);
    // Nor can a node be started on it.
    let mut config = pki.node_config("mallory", &[]);
    config.certs = dir;
    assert!(Node::start(config).await.is_err());
    n1.shutdown().await;
}

/// The response headers of a GET, lower-cased names.
async fn get_headers(addr: SocketAddr, path: &str) -> std::collections::HashMap<String, String> {
    use http_body_util::Empty;
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    resp.headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect()
}
