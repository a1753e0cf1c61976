//! Routes in the golden signals: an HTTPRoute's name reaches
//! `shoal_proxy_responses_total{route}`, the byte counters, `/v1/stats`
//! route rows and the tap's events.

use hyper::StatusCode;
use tests::traffic::*;
use tests::{admin_get, eventually};

const CANARY: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-canary}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: web-v2}]\n  - backendRefs: [{name: web}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_names_its_rows_metrics_and_tap_events() {
    let (v1, v2) = (
        Upstream::start(ok("v1")).await,
        Upstream::start(failing()).await,
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
    // One request before the route exists: the edge's "" route row.
    let out = client.outbound_addr().unwrap();
    let resp = http1().request(get(out, "web", "/before")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    body_of(resp).await;

    let (status, body) = mesh
        .pki
        .operator("alice")
        .put(
            client.admin_addr(),
            "HTTPRoute",
            "web-canary",
            CANARY,
            "",
            &[],
        )
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    let mut tap = client.proxy().tap();
    for i in 0..10 {
        let mut req = get(out, "web", "/r");
        if i < 4 {
            req.headers_mut()
                .insert("x-canary", "true".parse().unwrap());
        }
        let resp = http1().request(req).await.unwrap();
        let want = if i < 4 { 503 } else { 200 };
        assert_eq!(resp.status(), want);
        body_of(resp).await;
    }

    // The tap saw the route on each outbound event.
    let mut seen = Vec::new();
    while seen.len() < 10 {
        let e = tokio::time::timeout(WAIT, tap.recv())
            .await
            .unwrap()
            .unwrap();
        if e.direction == "outbound" {
            seen.push(e);
        }
    }
    assert!(seen.iter().all(|e| e.route == "web-canary"), "{seen:#?}");
    let canary: Vec<_> = seen.iter().filter(|e| e.service == "web-v2").collect();
    assert_eq!(canary.len(), 4);
    assert!(
        canary
            .iter()
            .all(|e| e.status == 503 && e.endpoint == "s1" && e.response_bytes == 4)
    );

    let stats = eventually("route rows", WAIT, || async {
        let (_, s) = admin_get(client.admin_addr(), "/v1/stats").await;
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        let rows = v.as_array()?.clone();
        let web = rows
            .iter()
            .find(|r| r["direction"] == "outbound" && r["destination"] == "web")?;
        (web["requests"] == 7).then_some(rows)
    })
    .await;
    let row = |dest: &str| {
        stats
            .iter()
            .find(|r| r["direction"] == "outbound" && r["destination"] == dest)
            .unwrap()
    };
    let routes = |dest: &str| -> Vec<(String, u64, u64)> {
        row(dest)["routes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["route"].as_str().unwrap().to_string(),
                    r["requests"].as_u64().unwrap(),
                    r["failed"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(
        routes("web"),
        [("".into(), 1, 0), ("web-canary".into(), 6, 0)]
    );
    assert_eq!(routes("web-v2"), [("web-canary".into(), 4, 4)]);
    assert_eq!(row("web-v2")["success_rate"], 0.0);

    let (_, metrics) = admin_get(client.admin_addr(), "/metrics").await;
    for line in [
        "shoal_proxy_responses_total{direction=\"outbound\",source=\"client\",destination=\"web-v2\",route=\"web-canary\",status_code=\"503\",grpc_status=\"\",classification=\"failure\"} 4",
        "shoal_proxy_responses_total{direction=\"outbound\",source=\"client\",destination=\"web\",route=\"web-canary\",status_code=\"200\",grpc_status=\"\",classification=\"success\"} 6",
        // `down` four times; `v1` six times.
        "shoal_proxy_response_bytes_total{direction=\"outbound\",source=\"client\",destination=\"web-v2\",route=\"web-canary\"} 16",
        "shoal_proxy_response_bytes_total{direction=\"outbound\",source=\"client\",destination=\"web\",route=\"web-canary\"} 12",
    ] {
        assert!(metrics.contains(line), "missing {line}\n{metrics}");
    }
}
