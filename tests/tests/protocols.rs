//! The default (`auto`) protocol across HTTP versions, and failures made
//! visible to gRPC callers: real nodes, real HTTP/1.1 and h2c servers and
//! clients.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tests::traffic::*;
use tests::{admin_get, eventually};

/// Answers with the HTTP version it was spoken to in.
fn version_echo() -> Handler {
    Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let v = format!("{:?}", req.version());
            let _ = req.into_body().collect().await;
            Response::new(full(v))
        })
    })
}

/// An h2c (prior knowledge) connection to `addr`.
async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// A client node n1 and a node n2 fronting `service` at `addr` (protocol
/// auto, the default).
async fn pair(service: &str, addr: SocketAddr) -> (node::Node, node::Node) {
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &[service], &[(service, addr)]))
        .await;
    (n1, n2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_callers_reach_an_http1_only_app() {
    let up = Upstream::speaking(Speaks::Http1Only, version_echo()).await;
    let (n1, n2) = pair("web", up.addr).await;
    routable(&n1, "web", 1).await;
    let out = n1.outbound_addr().unwrap();
    // 10 h2c connections, 50 requests each, concurrently.
    let mut tasks = Vec::new();
    for c in 0..10 {
        tasks.push(tokio::spawn(async move {
            let mut sender = h2c(out).await;
            let mut errors = Vec::new();
            for i in 0..50 {
                let req = Request::get(format!("http://web/{c}/{i}"))
                    .body(empty())
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let body = r.into_body().collect().await.unwrap().to_bytes();
                        if &body[..] != b"HTTP/1.1" {
                            errors.push(format!("app saw {body:?}"));
                        }
                    }
                    Ok(r) => errors.push(format!("{} {:?}", r.status(), r.headers())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    println!(
        "h2c -> HTTP/1.1-only app: 500 requests, {} errors",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(up.hits(), 500);
    // Nothing counted against the endpoint; plain HTTP/1.1 callers get through.
    assert_eq!(n1.proxy().endpoint_view("web", "n2").status, "up");
    let resp = http1().request(get(out, "web", "/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_callers_reach_an_h2c_only_app() {
    let up = Upstream::speaking(Speaks::H2cOnly, version_echo()).await;
    let (n1, n2) = pair("web", up.addr).await;
    routable(&n1, "web", 1).await;
    let out = n1.outbound_addr().unwrap();
    let client = http1();
    let mut tasks = Vec::new();
    for c in 0..10 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for i in 0..50 {
                match client.request(get(out, "web", &format!("/{c}/{i}"))).await {
                    Ok(r) if r.status() == 200 => {
                        let body = body_of(r).await;
                        if &body[..] != b"HTTP/2.0" {
                            errors.push(format!("app saw {body:?}"));
                        }
                    }
                    Ok(r) => errors.push(format!("{} {:?}", r.status(), r.headers())),
                    Err(e) => errors.push(e.to_string()),
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for t in tasks {
        errors.extend(t.await.unwrap());
    }
    println!(
        "HTTP/1.1 -> h2c-only app: 500 requests, {} errors",
        errors.len()
    );
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(up.hits(), 500);
    assert_eq!(n1.proxy().endpoint_view("web", "n2").status, "up");
    n1.shutdown().await;
    n2.shutdown().await;
}

/// A gRPC-shaped call: POST, `application/grpc`, `te: trailers`, one
/// length-prefixed message.
fn grpc_call(service: &str, method: &str) -> Request<Body> {
    Request::post(format!("http://{service}/pkg.Svc/{method}"))
        .version(Version::HTTP_2)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\0\0\0\0\x02yo"[..]))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_unavailable_for_a_service_without_endpoints() {
    // n2 registers `grpc` at an address where nothing listens.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (n1, n2) = pair("grpc", dead).await;
    let out = n1.outbound_addr().unwrap();
    let mut sender = h2c(out).await;
    let (status, headers, data, trailers) = eventually(
        "a gRPC caller gets a no-healthy-endpoint status",
        WAIT,
        || {
            let req = grpc_call("grpc", "Get");
            let fut = sender.send_request(req);
            async move {
                let r = fut.await.unwrap();
                let no_healthy = r
                    .headers()
                    .get("shoal-error")
                    .is_some_and(|v| v == "no-healthy-endpoint");
                let (parts, body) = r.into_parts();
                let c = body.collect().await.unwrap();
                let trailers = c.trailers().cloned();
                no_healthy.then(|| (parts.status, parts.headers, c.to_bytes(), trailers))
            }
        },
    )
    .await;
    // Trailers-only: HTTP 200, the status in the one HEADERS frame.
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/grpc");
    assert_eq!(headers["grpc-status"], "14", "{headers:?}");
    let msg = headers["grpc-message"].to_str().unwrap();
    assert!(
        msg.contains("no-healthy-endpoint") && msg.contains("grpc"),
        "{msg}"
    );
    assert!(data.is_empty() && trailers.is_none());
    // A name nobody serves: UNAVAILABLE too, naming it.
    let r = sender
        .send_request(grpc_call("nosuch", "Get"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["grpc-status"], "14");
    let msg = r.headers()["grpc-message"].to_str().unwrap().to_string();
    assert!(
        msg.contains("unknown-service") && msg.contains("nosuch"),
        "{msg}"
    );
    // The failures count as such.
    eventually("the failures are in /v1/stats", WAIT, || async {
        let (_, stats) = admin_get(n1.admin_addr(), "/v1/stats").await;
        let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
        v.as_array()?
            .iter()
            .any(|e| e["destination"] == "grpc" && e["failed"].as_u64() >= Some(1))
            .then_some(())
    })
    .await;
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_error_statuses_in_trailers_count_as_failures() {
    // `Missing` answers NOT_FOUND (5) in trailers; `Found` answers OK.
    let grpc: Handler = Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let found = req.uri().path().ends_with("/Found");
            let _ = req.into_body().collect().await;
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert(
                "grpc-status",
                if found { "0" } else { "5" }.parse().unwrap(),
            );
            let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
                Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                .unwrap()
        })
    });
    let up = Upstream::speaking(Speaks::H2cOnly, grpc).await;
    let (n1, n2) = pair("grpc", up.addr).await;
    routable(&n1, "grpc", 1).await;
    let out = n1.outbound_addr().unwrap();
    let mut sender = h2c(out).await;
    for (method, n, want) in [("Missing", 10, "5"), ("Found", 5, "0")] {
        for _ in 0..n {
            let r = sender
                .send_request(grpc_call("grpc", method))
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let c = r.into_body().collect().await.unwrap();
            assert_eq!(c.trailers().unwrap()["grpc-status"], want);
        }
    }
    for (node, direction) in [(&n1, "outbound"), (&n2, "inbound")] {
        eventually(
            &format!("{direction} stats count 10 failures of 15"),
            WAIT,
            || async {
                let (_, stats) = admin_get(node.admin_addr(), "/v1/stats").await;
                let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
                let e = v
                    .as_array()?
                    .iter()
                    .find(|e| e["direction"] == direction && e["destination"] == "grpc")?
                    .clone();
                (e["requests"] == 15 && e["failed"] == 10).then_some(e)
            },
        )
        .await;
        let (_, metrics) = admin_get(node.admin_addr(), "/metrics").await;
        for line in [
            format!(
                "shoal_proxy_responses_total{{direction=\"{direction}\",source=\"client\",destination=\"grpc\",route=\"\",status_code=\"200\",grpc_status=\"5\",classification=\"failure\"}} 10"
            ),
            format!(
                "shoal_proxy_responses_total{{direction=\"{direction}\",source=\"client\",destination=\"grpc\",route=\"\",status_code=\"200\",grpc_status=\"0\",classification=\"success\"}} 5"
            ),
        ] {
            assert!(metrics.contains(&line), "missing {line}\n{metrics}");
        }
    }
    let (_, stats) = admin_get(n1.admin_addr(), "/v1/stats").await;
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let rate = v
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["direction"] == "outbound" && e["destination"] == "grpc")
        .unwrap()["success_rate"]
        .as_f64()
        .unwrap();
    assert!((rate - 5.0 / 15.0).abs() < 1e-6, "{stats}");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_callers_get_permission_denied_resource_exhausted_and_deadline_exceeded() {
    // A gRPC app that answers OK, after 500 ms for `Slow`.
    let grpc: Handler = Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            if req.uri().path().ends_with("/Slow") {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            let _ = req.into_body().collect().await;
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
                vec![Ok(Frame::trailers(trailers))];
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(futures::stream::iter(frames)).boxed())
                .unwrap()
        })
    });
    let up = Upstream::speaking(Speaks::H2cOnly, grpc).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config(
            "n2",
            &["locked", "limited"],
            &[("locked", up.addr), ("limited", up.addr)],
        ))
        .await;
    routable(&n1, "locked", 1).await;
    routable(&n1, "limited", 1).await;
    let out = n1.outbound_addr().unwrap();
    let sender = h2c(out).await;
    let policies = [
        (
            "AuthorizationPolicy",
            "locked-from-api",
            "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: locked-from-api}\nspec:\n  target: locked\n  rules:\n  - from: [api]\n",
        ),
        (
            "RateLimit",
            "limited-rl",
            "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {name: limited-rl}\nspec: {target: limited, requestsPerSecond: 1, burst: 1}\n",
        ),
    ];
    let alice = mesh.pki.operator("alice");
    for (kind, name, doc) in policies {
        let (status, body) = alice.put(n1.admin_addr(), kind, name, doc, "", &[]).await;
        assert!(status == 200 || status == 201, "{status} {body}");
    }
    // Sends a call, answers (HTTP status, grpc-status, grpc-message).
    async fn status_of(
        mut sender: hyper::client::conn::http2::SendRequest<Body>,
        req: Request<Body>,
    ) -> (u16, String, String) {
        let r = sender.send_request(req).await.unwrap();
        let h = |k: &str| {
            r.headers()
                .get(k)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        let (grpc, msg) = (h("grpc-status"), h("grpc-message"));
        let status = r.status().as_u16();
        let c = r.into_body().collect().await.unwrap();
        let grpc = if grpc.is_empty() {
            c.trailers()
                .and_then(|t| t.get("grpc-status"))
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        } else {
            grpc
        };
        (status, grpc, msg)
    }
    let (status, _, msg) = eventually("locked answers PERMISSION_DENIED", WAIT, || {
        let fut = status_of(sender.clone(), grpc_call("locked", "Get"));
        async move {
            let got = fut.await;
            (got.1 == "7").then_some(got)
        }
    })
    .await;
    assert_eq!(status, 200);
    assert!(msg.contains("forbidden") && msg.contains("locked"), "{msg}");
    let (_, grpc, msg) = eventually("limited answers RESOURCE_EXHAUSTED", WAIT, || {
        let fut = status_of(sender.clone(), grpc_call("limited", "Get"));
        async move {
            let got = fut.await;
            (got.1 == "8").then_some(got)
        }
    })
    .await;
    assert_eq!(grpc, "8");
    assert!(
        msg.contains("rate-limited") && msg.contains("limited"),
        "{msg}"
    );
    // A 100 ms deadline on a 500 ms call (the rate limit lets one a
    // second through).
    let (status, grpc, msg) = eventually("Slow answers DEADLINE_EXCEEDED", WAIT, || {
        let mut req = Request::post("http://limited/pkg.Svc/Slow")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("shoal-timeout", "100ms")
            .body(full(&b"\0\0\0\0\x02yo"[..]))
            .unwrap();
        *req.version_mut() = Version::HTTP_2;
        let fut = status_of(sender.clone(), req);
        async move {
            let got = fut.await;
            (got.1 == "4").then_some(got)
        }
    })
    .await;
    assert_eq!((status, grpc.as_str()), (200, "4"));
    assert!(msg.contains("timeout") && msg.contains("limited"), "{msg}");
    let (_, metrics) = admin_get(n1.admin_addr(), "/metrics").await;
    for class in ["denied", "rate_limited", "failure"] {
        assert!(
            metrics.lines().any(|l| l
                .starts_with("shoal_proxy_responses_total{direction=\"outbound\"")
                && l.contains(&format!("classification=\"{class}\""))),
            "no {class} responses counted\n{metrics}"
        );
    }
    n1.shutdown().await;
    n2.shutdown().await;
}
