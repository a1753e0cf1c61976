//! Policy observed through traffic: what one node accepts, every node's data
//! plane enforces (routes, splits, authorization, rate limits, faults).

use std::time::{Duration, Instant};

use hyper::StatusCode;
use node::Node;
use tests::traffic::*;
use tests::{admin_get, eventually};

/// PUTs `doc` to `node`, signed by an operator of `mesh`'s CA.
async fn push(mesh: &Mesh, node: &Node, kind: &str, name: &str, doc: &str) {
    let (status, body) = mesh
        .pki
        .operator("alice")
        .put(node.admin_addr(), kind, name, doc, "", &[])
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
}

/// GETs `path` from `host` through `node`'s outbound listener.
async fn call(
    node: &Node,
    host: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, Option<String>) {
    let mut req = get(node.outbound_addr().unwrap(), host, "/");
    for (k, v) in headers {
        let name = hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, v.parse().unwrap());
    }
    let resp = http1().request(req).await.unwrap();
    let status = resp.status();
    let err = resp
        .headers()
        .get("shoal-error")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = String::from_utf8_lossy(&body_of(resp).await).into_owned();
    (status, body, err)
}

const ALL_TO_V2: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-cutover}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web-v2, port: 80}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_one_of_five_is_enforced_by_every_node() {
    let (v1, v2) = (
        Upstream::start(ok("v1")).await,
        Upstream::start(ok("v2")).await,
    );
    let mut mesh = Mesh::new();
    let server = mesh
        .start(mesh.config(
            "s1",
            &["web", "web-v2"],
            &[("web", v1.addr), ("web-v2", v2.addr)],
        ))
        .await;
    let mut clients = Vec::new();
    for i in 1..=4 {
        clients.push(mesh.client(&format!("c{i}"), |_| {}).await);
    }
    for c in &clients {
        routable(c, "web", 1).await;
        routable(c, "web-v2", 1).await;
        assert_eq!(call(c, "web", &[]).await.1, "v1");
    }
    let pushed = Instant::now();
    push(&mesh, &clients[1], "HTTPRoute", "web-cutover", ALL_TO_V2).await;
    for c in &clients {
        eventually(&format!("{} sends web to v2", c.name()), WAIT, || async {
            (call(c, "web", &[]).await.1 == "v2").then_some(())
        })
        .await;
    }
    eprintln!(
        "all 4 callers enforce the route {:?} after the push",
        pushed.elapsed()
    );
    // The server node applies it too (it is one of the five); it may be the
    // last to hear, since no test request waits on it.
    eventually("the server node holds the route", WAIT, || async {
        (server.policies().entries().len() == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_is_about_ninety_ten_and_a_header_match_overrides_it() {
    let (v1, v2) = (
        Upstream::start(ok("v1")).await,
        Upstream::start(ok("v2")).await,
    );
    let mut mesh = Mesh::new();
    let _server = mesh
        .start(mesh.config(
            "s1",
            &["web", "web-v2"],
            &[("web", v1.addr), ("web-v2", v2.addr)],
        ))
        .await;
    let client = mesh.client("c1", |_| {}).await;
    routable(&client, "web", 1).await;
    routable(&client, "web-v2", 1).await;
    let split = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-canary}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: web-v2}]\n    filters:\n    - type: ResponseHeaderModifier\n      responseHeaderModifier: {set: [{name: x-route, value: canary}]}\n  - backendRefs: [{name: web, weight: 90}, {name: web-v2, weight: 10}]\n";
    push(&mesh, &client, "HTTPRoute", "web-canary", split).await;
    assert!(client.policies().entries().len() == 1);

    let mut v2_count = 0;
    for _ in 0..1000 {
        let (status, body, _) = call(&client, "web", &[]).await;
        assert_eq!(status, 200);
        if body == "v2" {
            v2_count += 1;
        }
    }
    eprintln!("90/10 split over 1000 requests: {v2_count} to v2");
    // Binomial(1000, 0.1): mean 100, sd 9.5; ±4 sd.
    assert!(
        (62..=138).contains(&v2_count),
        "{v2_count} of 1000 went to v2"
    );

    for _ in 0..50 {
        let mut req = get(client.outbound_addr().unwrap(), "web", "/");
        req.headers_mut()
            .insert("x-canary", "true".parse().unwrap());
        let resp = http1().request(req).await.unwrap();
        assert_eq!(resp.headers()["x-route"], "canary");
        assert_eq!(body_of(resp).await, "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_allows_the_named_caller_and_the_mesh_default_switches() {
    let (web, other) = (
        Upstream::start(ok("web")).await,
        Upstream::start(ok("other")).await,
    );
    let mut mesh = Mesh::new();
    let server = mesh
        .start(mesh.config(
            "s1",
            &["web", "other"],
            &[("web", web.addr), ("other", other.addr)],
        ))
        .await;
    let mut api_cfg = mesh.config("c-api", &["api"], &[]);
    api_cfg.proxy.outbound = Some("127.0.0.1:0".parse().unwrap());
    let api = mesh.start(api_cfg).await;
    let mut batch_cfg = mesh.config("c-batch", &["batch"], &[]);
    batch_cfg.proxy.outbound = Some("127.0.0.1:0".parse().unwrap());
    let batch = mesh.start(batch_cfg).await;
    for c in [&api, &batch] {
        routable(c, "web", 1).await;
        routable(c, "other", 1).await;
        assert_eq!(call(c, "web", &[]).await.0, 200);
    }

    let authz = "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-from-api}\nspec:\n  target: web\n  rules:\n  - from: [api]\n";
    push(&mesh, &batch, "AuthorizationPolicy", "web-from-api", authz).await;
    eventually("batch is refused", WAIT, || async {
        let (status, _, err) = call(&batch, "web", &[]).await;
        (status == 403 && err.as_deref() == Some("forbidden")).then_some(())
    })
    .await;
    for _ in 0..20 {
        assert_eq!(call(&api, "web", &[]).await.0, 200);
        assert_eq!(call(&batch, "web", &[]).await.0, 403);
    }
    // Services no policy names follow the mesh default: allow, then deny.
    assert_eq!(call(&batch, "other", &[]).await.0, 200);
    let deny = "apiVersion: shoal.dev/v1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {defaultAuthorization: deny}\n";
    push(&mesh, &api, "MeshConfig", "default", deny).await;
    eventually("default deny reaches the server", WAIT, || async {
        (call(&batch, "other", &[]).await.0 == 403).then_some(())
    })
    .await;
    assert_eq!(call(&api, "other", &[]).await.0, 403);
    assert_eq!(call(&api, "web", &[]).await.0, 200);

    let (_, metrics) = admin_get(server.admin_addr(), "/metrics").await;
    let denied = metrics
        .lines()
        .find(|l| {
            l.starts_with("shoal_policy_denied_total")
                && l.contains("service=\"web\"")
                && l.contains("authorization")
        })
        .unwrap_or_else(|| panic!("no denied counter:\n{metrics}"));
    let n: f64 = denied.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 20.0, "{denied}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_past_the_rate_and_faults_abort_about_their_share() {
    let (web, flaky) = (
        Upstream::start(ok("web")).await,
        Upstream::start(ok("flaky")).await,
    );
    let mut mesh = Mesh::new();
    let _server = mesh
        .start(mesh.config(
            "s1",
            &["web", "flaky"],
            &[("web", web.addr), ("flaky", flaky.addr)],
        ))
        .await;
    let client = mesh.client("c1", |_| {}).await;
    routable(&client, "web", 1).await;
    routable(&client, "flaky", 1).await;

    let limit = "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {name: web-rl}\nspec: {target: web, requestsPerSecond: 20, burst: 5}\n";
    push(&mesh, &client, "RateLimit", "web-rl", limit).await;
    eventually("the limit bites", WAIT, || async {
        (call(&client, "web", &[]).await.0 == 429).then_some(())
    })
    .await;
    // Let the bucket refill, then send 200 requests as fast as we can.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (mut ok_count, mut limited) = (0u32, 0u32);
    for _ in 0..200 {
        let mut req = get(client.outbound_addr().unwrap(), "web", "/");
        req.headers_mut().insert("x-n", "1".parse().unwrap());
        let resp = http1().request(req).await.unwrap();
        match resp.status().as_u16() {
            200 => ok_count += 1,
            429 => {
                assert!(resp.headers().contains_key("retry-after"));
                limited += 1;
            }
            s => panic!("unexpected {s}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let allowed = 5.0 + 20.0 * secs;
    eprintln!(
        "rate limit 20/s burst 5: {ok_count} passed, {limited} got 429 in {secs:.2}s (bound {allowed:.1})"
    );
    assert!(limited > 0);
    assert!(
        f64::from(ok_count) <= allowed + 2.0,
        "{ok_count} > {allowed}"
    );
    assert!(ok_count >= 5, "{ok_count}");

    let fault = "apiVersion: shoal.dev/v1\nkind: FaultInjection\nmetadata: {name: flaky}\nspec: {target: flaky, abort: {percent: 30, status: 503}}\n";
    push(&mesh, &client, "FaultInjection", "flaky", fault).await;
    eventually("faults start", WAIT, || async {
        let mut hit = false;
        for _ in 0..20 {
            hit |= call(&client, "flaky", &[]).await.2.as_deref() == Some("fault-injected");
        }
        hit.then_some(())
    })
    .await;
    let before = flaky.hits();
    let mut aborted = 0;
    for _ in 0..500 {
        let (status, _, err) = call(&client, "flaky", &[]).await;
        if err.as_deref() == Some("fault-injected") {
            assert_eq!(status, 503);
            aborted += 1;
        }
    }
    eprintln!("fault 30%: {aborted} of 500 aborted");
    // Binomial(500, 0.3): mean 150, sd 10.2; ±4 sd. Aborts are never retried.
    assert!((109..=191).contains(&aborted), "{aborted}");
    assert_eq!(flaky.hits() - before, 500 - aborted);
}

/// RequestMirror on live traffic: every request to `web` is answered by
/// `web`, and a copy reaches `shadow`, whose answer nobody waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_mirror_copies_reach_the_mirror_and_the_caller_gets_the_backend() {
    let (web, shadow) = (
        Upstream::start(ok("web")).await,
        Upstream::start(ok("shadow")).await,
    );
    let mut mesh = Mesh::new();
    let _server = mesh
        .start(mesh.config(
            "s1",
            &["web", "shadow"],
            &[("web", web.addr), ("shadow", shadow.addr)],
        ))
        .await;
    let client = mesh.client("c1", |_| {}).await;
    routable(&client, "web", 1).await;
    routable(&client, "shadow", 1).await;
    let doc = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-mirror}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - filters:\n    - type: RequestMirror\n      requestMirror: {backendRef: {name: shadow}}\n";
    push(&mesh, &client, "HTTPRoute", "web-mirror", doc).await;
    for _ in 0..20 {
        let (status, body, _) = call(&client, "web", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "web"));
    }
    assert_eq!(web.hits(), 20);
    eventually(
        "20 mirrored copies at shadow",
        Duration::from_secs(10),
        || async { (shadow.hits() == 20).then_some(()) },
    )
    .await;
}
