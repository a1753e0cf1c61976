//! Policy without a control plane, through the admin API of real nodes:
//! push to one, every node applies it; bad input changes nothing; deletes,
//! restarts and lost origins lose nothing.

use std::time::Duration;

use node::Node;
use node::policy::Kind;
use tests::operator::Operator;
use tests::{Cluster, admin_get, eventually};

const DEADLINE: Duration = Duration::from_secs(15);

fn rate_limit(name: &str, rps: u32) -> String {
    format!(
        "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata:\n  name: {name}\nspec:\n  target: web\n  requestsPerSecond: {rps}\n"
    )
}

async fn put(
    op: &Operator,
    node: &Node,
    kind: &str,
    name: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let (status, body) = op.put(node.admin_addr(), kind, name, body, "", extra).await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null),
    )
}

fn version_on(node: &Node, name: &str) -> Option<String> {
    node.policies()
        .entry(Kind::RateLimit, name)
        .filter(|e| !e.is_tombstone())
        .map(|e| e.version.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_one_of_five_reaches_all_and_wait_all_confirms() {
    let cluster = Cluster::start(5).await;
    let op = cluster.pki.operator("alice");
    cluster
        .converged(&["n1", "n2", "n3", "n4", "n5"], DEADLINE)
        .await;

    let (status, reply) = put(
        &op,
        &cluster.nodes[3],
        "RateLimit",
        "web-rl",
        &rate_limit("web-rl", 100),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let version = reply["version"].as_str().unwrap().to_string();
    assert!(version.ends_with("@n4"), "{version}");
    for n in &cluster.nodes {
        let want = version.clone();
        eventually(&format!("{} applies {want}", n.name()), DEADLINE, || {
            let got = version_on(n, "web-rl");
            let want = want.clone();
            async move { (got == Some(want)).then_some(()) }
        })
        .await;
        assert_eq!(n.policies().snapshot().rate_limits("web").len(), 1);
    }

    // ?wait=all on another node: the reply comes once all five run it.
    let (status, reply) = put(
        &op,
        &cluster.nodes[1],
        "RateLimit",
        "web-rl",
        &rate_limit("web-rl", 50),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{reply}");
    let (status, reply) = put(
        &op,
        &cluster.nodes[0],
        "RateLimit",
        "web-rl2",
        &rate_limit("web-rl2", 10),
        &[],
    )
    .await;
    assert_eq!(status, 201, "{reply}");
    let (status, body) = op
        .put(
            cluster.nodes[2].admin_addr(),
            "RateLimit",
            "web-rl3",
            &rate_limit("web-rl3", 10),
            "?wait=all",
            &[],
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["applied_everywhere"], true, "{reply}");
    let v3 = reply["version"].as_str().unwrap().to_string();
    for n in &cluster.nodes {
        assert_eq!(
            version_on(n, "web-rl3").as_deref(),
            Some(v3.as_str()),
            "{}",
            n.name()
        );
    }

    // Any node's list soon shows it applied on all five (as gossip tells it).
    let admin = cluster.nodes[4].admin_addr();
    let row = eventually("list shows 5/5", DEADLINE, || async {
        let (_, list) = admin_get(admin, "/v1/policies").await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&list).ok()?;
        list.into_iter()
            .find(|r| r["name"] == "web-rl3" && r["applied_on"] == 5)
    })
    .await;
    assert_eq!(row["origin"], "n3");
    assert_eq!(row["live_nodes"], 5);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    let cluster = Cluster::start(2).await;
    let op = cluster.pki.operator("alice");
    cluster.converged(&["n1", "n2"], DEADLINE).await;
    let n1 = &cluster.nodes[0];

    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: web}]\n  bogus: 1\n  rules:\n  - backendRefs: [{name: a, weight: 0}]\n    retry: {attempts: 50}\n    timeouts: {request: soon}\n";
    let (status, reply) = put(&op, n1, "HTTPRoute", "r", bad, &[]).await;
    assert_eq!(status, 400);
    let errors: Vec<String> = serde_json::from_value(reply["errors"].clone()).unwrap();
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.bogus: unknown field")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("spec.rules[0].retry.attempts:")),
        "{errors:?}"
    );

    let (status, _) = put(&op, n1, "RateLimit", "other-name", &rate_limit("x", 1), &[]).await;
    assert_eq!(status, 400);
    let (status, reply) = put(&op, n1, "Gizmo", "x", &rate_limit("x", 1), &[]).await;
    assert_eq!(status, 400);
    assert!(
        reply["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("kind: unknown kind \"Gizmo\"")),
        "{reply}"
    );
    let huge = format!("{}# {}\n", rate_limit("big", 1), "x".repeat(1 << 20));
    let (status, _) = put(&op, n1, "RateLimit", "big", &huge, &[]).await;
    assert_eq!(status, 413);
    let (status, body) = op
        .put(
            n1.admin_addr(),
            "RateLimit",
            "x",
            &rate_limit("x", 1),
            "",
            &[("content-type", "image/png")],
        )
        .await;
    assert_eq!(status, 415, "{body}");
    let (status, body) = op
        .put(
            n1.admin_addr(),
            "RateLimit",
            "x",
            &rate_limit("x", 1),
            "",
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(status, 415, "{body}");

    // Compare-and-set.
    let (status, first) = put(&op, n1, "RateLimit", "cas", &rate_limit("cas", 1), &[]).await;
    assert_eq!(status, 201);
    let (status, _) = put(
        &op,
        n1,
        "RateLimit",
        "cas",
        &rate_limit("cas", 2),
        &[("if-match", "1.0@n9")],
    )
    .await;
    assert_eq!(status, 412);
    let v = format!("\"{}\"", first["version"].as_str().unwrap());
    let (status, _) = put(
        &op,
        n1,
        "RateLimit",
        "cas",
        &rate_limit("cas", 3),
        &[("if-match", &v)],
    )
    .await;
    assert_eq!(status, 200);

    // Nothing refused was stored or spread anywhere.
    let n2 = &cluster.nodes[1];
    eventually("cas reaches n2", DEADLINE, || async {
        version_on(n2, "cas").map(|_| ())
    })
    .await;
    for n in &cluster.nodes {
        let names: Vec<String> = n.policies().entries().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["cas".to_string()], "{}", n.name());
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_routes_have_their_own_url() {
    let cluster = Cluster::start(1).await;
    let op = cluster.pki.operator("alice");
    let n1 = &cluster.nodes[0];
    let grpc = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\nspec:\n  parentRefs: [{name: web, port: 7070}]\n  rules:\n  - matches: [{method: {service: pkg.v1.Store, method: Get}}]\n    backendRefs: [{name: web-v2, port: 7070}]\n";
    let (status, reply) = put(&op, n1, "GRPCRoute", "g", grpc, &[]).await;
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["kind"], "GRPCRoute", "{reply}");
    let (status, body) = admin_get(n1.admin_addr(), "/v1/policies/GRPCRoute/g").await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["metadata"]["namespace"], "shop", "{doc}");
    // The same document under the other route kind's URL is refused.
    let (status, reply) = put(&op, n1, "HTTPRoute", "g", grpc, &[]).await;
    assert_eq!(status, 400, "{reply}");
    let bad = grpc.replace("method: Get", "method: 9bad");
    let (status, reply) = put(&op, n1, "GRPCRoute", "g", &bad, &[]).await;
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("spec.rules[0].matches[0].method.method:")),
        "{reply}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_need_the_token_when_one_is_set() {
    let pki = tests::Pki::new("test.shoal");
    let op = pki.operator("alice");
    let token = pki.path().join("token");
    std::fs::write(&token, "s3cret-token-0123456789\n").unwrap();
    let mut config = pki.node_config("n1", &[]);
    config.admin_token_file = Some(token);
    let n1 = Node::start(config).await.unwrap();
    let doc = rate_limit("t", 1);
    let (status, _) = put(&op, &n1, "RateLimit", "t", &doc, &[]).await;
    assert_eq!(status, 401);
    let (status, _) = put(
        &op,
        &n1,
        "RateLimit",
        "t",
        &doc,
        &[("authorization", "Bearer nope")],
    )
    .await;
    assert_eq!(status, 403);
    assert!(n1.policies().entries().is_empty());
    let (status, _) = put(
        &op,
        &n1,
        "RateLimit",
        "t",
        &doc,
        &[("authorization", "Bearer s3cret-token-0123456789")],
    )
    .await;
    assert_eq!(status, 201);
    // Reads need no token.
    let (status, body) = admin_get(n1.admin_addr(), "/v1/policies/RateLimit/t?format=yaml").await;
    assert_eq!(status, 200);
    assert!(body.contains("requestsPerSecond: 1"), "{body}");
    n1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_propagate_and_losing_the_origin_loses_nothing() {
    let mut cluster = Cluster::start(3).await;
    let op = cluster.pki.operator("alice");
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;
    let origin = cluster.nodes.pop().unwrap();
    let (status, _) = put(
        &op,
        &origin,
        "RateLimit",
        "keep",
        &rate_limit("keep", 5),
        &[],
    )
    .await;
    assert_eq!(status, 201);
    let (status, _) = put(
        &op,
        &origin,
        "RateLimit",
        "gone",
        &rate_limit("gone", 5),
        &[],
    )
    .await;
    assert_eq!(status, 201);
    for n in &cluster.nodes {
        eventually("both applied", DEADLINE, || async {
            (version_on(n, "keep").is_some() && version_on(n, "gone").is_some()).then_some(())
        })
        .await;
    }
    let (status, _) = op
        .delete(origin.admin_addr(), "RateLimit", "gone", "?wait=all")
        .await;
    assert_eq!(status, 200);
    for n in &cluster.nodes {
        assert!(version_on(n, "gone").is_none());
        assert!(
            n.policies()
                .entry(Kind::RateLimit, "gone")
                .unwrap()
                .is_tombstone()
        );
    }
    // The origin crashes; a brand-new node still gets everything from the others.
    origin.kill().await;
    let newcomer = Node::start(cluster.pki.node_config("n4", &[cluster.seed()]))
        .await
        .unwrap();
    eventually("newcomer has keep and the tombstone", DEADLINE, || async {
        let tomb = newcomer
            .policies()
            .entry(Kind::RateLimit, "gone")
            .is_some_and(|e| e.is_tombstone());
        (version_on(&newcomer, "keep").is_some() && tomb).then_some(())
    })
    .await;
    cluster.nodes.push(newcomer);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_writes_survive_a_restart_and_concurrent_writes_converge() {
    let pki = tests::Pki::new("test.shoal");
    let op = pki.operator("alice");
    let data = pki.path().join("data-n1");
    let mut c1 = pki.node_config("n1", &[]);
    c1.data_dir = Some(data.clone());
    let n1 = Node::start(c1.clone()).await.unwrap();
    let (status, _) = put(
        &op,
        &n1,
        "RateLimit",
        "durable",
        &rate_limit("durable", 5),
        &[],
    )
    .await;
    assert_eq!(status, 201);
    n1.kill().await;
    let n1 = Node::start(c1).await.unwrap();
    assert!(version_on(&n1, "durable").is_some());

    // Two nodes write the same policy at once: both end on the same winner.
    let n2 = Node::start(pki.node_config("n2", &[n1.quic_addr().to_string()]))
        .await
        .unwrap();
    let (d1, d2) = (rate_limit("race", 1), rate_limit("race", 2));
    let (a, b) = tokio::join!(
        put(&op, &n1, "RateLimit", "race", &d1, &[]),
        put(&op, &n2, "RateLimit", "race", &d2, &[]),
    );
    assert!(a.0 == 201 && b.0 == 201);
    let va: node::policy::Version = a.1["version"].as_str().unwrap().parse().unwrap();
    let vb: node::policy::Version = b.1["version"].as_str().unwrap().parse().unwrap();
    let winner = va.max(vb).to_string();
    for n in [&n1, &n2] {
        let w = winner.clone();
        eventually("race converges", DEADLINE, || {
            let got = version_on(n, "race");
            let w = w.clone();
            async move { (got == Some(w)).then_some(()) }
        })
        .await;
    }
    n1.shutdown().await;
    n2.shutdown().await;
}
