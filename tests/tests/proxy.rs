//! Service traffic through the mesh: real nodes on 127.0.0.1, real
//! certificates, real HTTP servers and clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tests::traffic::*;
use tests::{TEST_GOSSIP, admin_get, eventually};

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_get_and_10mib_streaming_post_are_byte_exact() {
    let up = Upstream::start(echo()).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up.addr)]))
        .await;
    routable(&n1, "web", 1).await;
    let out = n1.outbound_addr().unwrap();
    let client = http1();

    // GET by Host, with port and with the .shoal suffix.
    for host in ["web", "web:80", "web.shoal"] {
        let mut req = get(out, host, "/hello");
        req.headers_mut().insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "host {host}");
        assert_eq!(resp.headers()["x-path"], "/hello");
        assert_eq!(
            resp.headers()["x-seen-shoal-forwarded"],
            "by=n2;from=n1;svc=client"
        );
        assert_eq!(
            resp.headers()["x-seen-traceparent"],
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(resp.headers()["x-seen-host"], host);
    }

    // Forward proxy: absolute-form request line.
    let stream = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender
        .send_request(
            Request::get("http://web/proxied")
                .header("host", "web")
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-path"], "/proxied");

    // 10 MiB streamed up in 64 KiB chunks (no Content-Length), echoed back.
    let total = 10 * 1024 * 1024;
    let mut data = vec![0u8; total];
    let mut x: u32 = 12345;
    for b in data.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    let data = Bytes::from(data);
    let chunks: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = (0..total)
        .step_by(64 * 1024)
        .map(|i| Ok(Frame::data(data.slice(i..(i + 64 * 1024).min(total)))))
        .collect();
    let body = StreamBody::new(futures::stream::iter(chunks)).boxed();
    let req = Request::post(format!("http://{out}/upload"))
        .header("host", "web")
        .body(body)
        .unwrap();
    let started = Instant::now();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-method"], "POST");
    let back = body_of(resp).await;
    eprintln!("10 MiB echo through the mesh took {:?}", started.elapsed());
    assert_eq!(back.len(), total);
    assert!(back == data, "echoed body differs");

    // The admin API shows the service and the edge.
    let (status, services) = admin_get(n1.admin_addr(), "/v1/services").await;
    assert_eq!(status, 200);
    assert!(
        services.contains("\"service\": \"web\"") && services.contains("\"health\": \"healthy\""),
        "{services}"
    );
    let (_, stats) = admin_get(n1.admin_addr(), "/v1/stats").await;
    assert!(stats.contains("\"destination\": \"web\""), "{stats}");
    let (_, metrics) = admin_get(n2.admin_addr(), "/metrics").await;
    assert!(metrics.contains("shoal_proxy_requests_total{direction=\"inbound\",source=\"client\",destination=\"web\",class=\"2xx\"}"), "{metrics}");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_response_trailers_arrive() {
    let grpc: Handler = Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            assert_eq!(req.version(), hyper::Version::HTTP_2);
            let _ = req.into_body().collect().await;
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            trailers.insert("grpc-message", "fine".parse().unwrap());
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
    let up = Upstream::start(grpc).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["grpc"], &[("grpc", up.addr)]))
        .await;
    routable(&n1, "grpc", 1).await;
    let out = n1.outbound_addr().unwrap();
    let req = Request::post("http://grpc/pkg.Svc/Method")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(full(&b"\0\0\0\0\x02yo"[..]))
        .unwrap();
    // h2c prior knowledge to the outbound listener: connect to it, address `grpc`.
    let stream = tokio::net::TcpStream::connect(out).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/grpc");
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "fine");
    assert_eq!(&collected.to_bytes()[..], b"\0\0\0\0\x02hi");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_and_no_healthy_endpoint_are_503_with_shoal_error() {
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    // n2 registers `web` at an address where nothing listens.
    let dead: SocketAddr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", dead)]))
        .await;
    let out = n1.outbound_addr().unwrap();
    let client = http1();
    let started = Instant::now();
    let resp = client.request(get(out, "nope", "/")).await.unwrap();
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["shoal-error"], "unknown-service");
    assert!(!body_of(resp).await.is_empty());
    eventually("web is published unhealthy", WAIT, || async {
        let resp = client.request(get(out, "web", "/")).await.unwrap();
        let code = resp
            .headers()
            .get("shoal-error")
            .map(|v| v.to_str().unwrap().to_string());
        (resp.status() == 503 && code.as_deref() == Some("no-healthy-endpoint")).then_some(())
    })
    .await;
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_mid_load_loses_no_idempotent_request() {
    let a = Upstream::start(ok("a")).await;
    let b = Upstream::start(ok("b")).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", a.addr)]))
        .await;
    let n3 = mesh
        .start(mesh.config("n3", &["web"], &[("web", b.addr)]))
        .await;
    routable(&n1, "web", 2).await;
    let out = n1.outbound_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = http1();
            while !stop.load(Ordering::Relaxed) {
                match client.request(get(out, "web", "/x")).await {
                    Ok(r) if r.status() == 200 => {
                        body_of(r).await;
                    }
                    Ok(r) => {
                        eprintln!(
                            "failed: {} {:?}",
                            r.status(),
                            r.headers().get("shoal-error")
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("both instances take traffic", WAIT, || async {
        (a.hits() > 50 && b.hits() > 50).then_some(())
    })
    .await;
    n3.kill().await;
    let killed_at = Instant::now();
    // The first failure marks n3 down at once; from then on nothing goes there.
    eventually("n1 marks n3 down", WAIT, || async {
        (n1.proxy().endpoint_view("web", "n3").status != "up").then_some(())
    })
    .await;
    let attempts_at_down = n1.proxy().endpoint_view("web", "n3").attempts;
    let before = done.load(Ordering::Relaxed);
    eventually("load continues for 2 s after the kill", WAIT, || async {
        (killed_at.elapsed() > Duration::from_secs(2)).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let after = done.load(Ordering::Relaxed);
    eprintln!(
        "{before} requests before n3 was marked down, {} after; a={} b={}",
        after - before,
        a.hits(),
        b.hits()
    );
    assert!(after - before > 100, "load kept flowing");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "idempotent requests failed"
    );
    assert_eq!(
        n1.proxy().endpoint_view("web", "n3").attempts,
        attempts_at_down,
        "requests went to the dead node after it was marked down"
    );
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fires_and_far_side_stops() {
    let cancelled = Arc::new(AtomicBool::new(false));
    let c = cancelled.clone();
    struct OnDrop(Arc<AtomicBool>, bool);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            if !self.1 {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    let slow: Handler = Arc::new(move |_req| {
        let c = c.clone();
        Box::pin(async move {
            let mut guard = OnDrop(c, false);
            tokio::time::sleep(Duration::from_secs(20)).await;
            guard.1 = true;
            Response::new(full("late"))
        })
    });
    let up = Upstream::start(slow).await;
    let mut mesh = Mesh::new();
    let n1 = mesh
        .client("n1", |c| {
            c.proxy.request_timeout = Duration::from_millis(400)
        })
        .await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up.addr)]))
        .await;
    routable(&n1, "web", 1).await;
    let out = n1.outbound_addr().unwrap();
    let started = Instant::now();
    let resp = http1().request(get(out, "web", "/slow")).await.unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert_eq!(resp.headers()["shoal-error"], "timeout");
    assert!(
        took >= Duration::from_millis(380) && took < Duration::from_secs(2),
        "took {took:?}"
    );
    eventually(
        "the far side abandons the request",
        Duration::from_secs(3),
        || async { cancelled.load(Ordering::Relaxed).then_some(()) },
    )
    .await;
    eprintln!("timeout after {took:?}; upstream handler cancelled");
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_caps_retries_and_post_is_not_retried() {
    let a = Upstream::start(failing()).await;
    let b = Upstream::start(failing()).await;
    let mut mesh = Mesh::new();
    let n1 = mesh
        .client("n1", |c| {
            c.proxy.retry.budget_min_per_sec = 0.5;
            c.proxy.retry.backoff_base = Duration::from_millis(1);
            c.proxy.retry.backoff_max = Duration::from_millis(2);
        })
        .await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", a.addr)]))
        .await;
    let n3 = mesh
        .start(mesh.config("n3", &["web"], &[("web", b.addr)]))
        .await;
    routable(&n1, "web", 2).await;
    let out = n1.outbound_addr().unwrap();
    let client = http1();

    // A POST is not retried.
    let req = Request::post(format!("http://{out}/p"))
        .header("host", "web")
        .body(full("x"))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(a.hits() + b.hits(), 1, "the POST was retried");

    // 100 GETs against a failing service: retries stay within 20% + floor.
    let n = 100;
    for _ in 0..n {
        let resp = client.request(get(out, "web", "/g")).await.unwrap();
        assert_eq!(resp.status(), 503);
        body_of(resp).await;
    }
    let sent = a.hits() + b.hits() - 1;
    let retries = sent - n;
    // budget: 0.2 × 100 requests + 0.5/s × 10 s window = 25 (the POST counts as a request too).
    eprintln!("{n} GETs -> {sent} upstream requests ({retries} retries)");
    assert!(retries > 0, "some retries happen");
    assert!(retries <= 26, "{retries} retries exceed the budget");
    let (_, metrics) = admin_get(n1.admin_addr(), "/metrics").await;
    assert!(metrics.contains(&format!("shoal_proxy_retries_total{{direction=\"outbound\",source=\"client\",destination=\"web\",outcome=\"failure\"}} {retries}")), "{metrics}");
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_under_load_loses_nothing() {
    let a = Upstream::start(echo()).await;
    let b = Upstream::start(echo()).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", a.addr)]))
        .await;
    let mut c3 = mesh.config("n3", &["web"], &[("web", b.addr)]);
    c3.proxy.drain_timeout = Duration::from_secs(5);
    let n3 = mesh.start(c3).await;
    routable(&n1, "web", 2).await;
    let out = n1.outbound_addr().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for i in 0..8 {
        let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let client = http1();
            while !stop.load(Ordering::Relaxed) {
                // Half the workers POST (never retried), half GET.
                let req = if i % 2 == 0 {
                    Request::post(format!("http://{out}/p"))
                        .header("host", "web")
                        .body(full("payload"))
                        .unwrap()
                } else {
                    get(out, "web", "/g")
                };
                match client.request(req).await {
                    Ok(r) if r.status() == 200 => {
                        body_of(r).await;
                    }
                    Ok(r) => {
                        eprintln!(
                            "failed: {} {:?}",
                            r.status(),
                            r.headers().get("shoal-error")
                        );
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    eventually("both instances take traffic", WAIT, || async {
        (a.hits() > 50 && b.hits() > 50).then_some(())
    })
    .await;
    let started = Instant::now();
    let cut = n3.drain().await;
    eprintln!("n3 drained in {:?}, {cut} cut off", started.elapsed());
    assert_eq!(cut, 0);
    let b_after = b.hits();
    let before = done.load(Ordering::Relaxed);
    eventually("load continues after the drain", WAIT, || async {
        (done.load(Ordering::Relaxed) > before + 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the drain"
    );
    assert_eq!(
        b.hits(),
        b_after,
        "the drained instance got traffic after leaving"
    );
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_checks_take_an_instance_out_of_routing_in_time() {
    let sick = Arc::new(AtomicBool::new(false));
    let s = sick.clone();
    let b_handler: Handler = Arc::new(move |req: Request<Incoming>| {
        let sick = s.load(Ordering::Relaxed);
        Box::pin(async move {
            let mut r = Response::new(full("b"));
            if req.uri().path() == "/healthz" && sick {
                *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        })
    });
    let a = Upstream::start(ok("a")).await;
    let b = Upstream::start(b_handler).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", a.addr)]))
        .await;
    let mut c3 = mesh.config("n3", &["web"], &[("web", b.addr)]);
    c3.proxy.services[0].health_path = Some("/healthz".into());
    let interval = c3.proxy.services[0].health_interval;
    let n3 = mesh.start(c3).await;
    routable(&n1, "web", 2).await;

    sick.store(true, Ordering::Relaxed);
    let started = Instant::now();
    routable(&n1, "web", 1).await;
    let took = started.elapsed();
    // Two check intervals plus one gossip round, plus one routing-table tick.
    let bound = interval * 2 + TEST_GOSSIP * 2;
    eprintln!("unhealthy instance left routing after {took:?} (bound {bound:?})");
    assert!(took <= bound + Duration::from_millis(150), "took {took:?}");
    let out = n1.outbound_addr().unwrap();
    let before = b.hits();
    for _ in 0..20 {
        let resp = http1().request(get(out, "web", "/")).await.unwrap();
        assert_eq!(body_of(resp).await, "a");
    }
    assert_eq!(b.hits(), before);
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_refuses_unnamed_services_and_false_source_identities() {
    use node::proxy::frame::{
        FRAME_HEAD, FrameReader, FrameWriter, RequestHead, ResponseHead, STREAM_KIND_HTTP, encode,
    };
    let up = Upstream::start(ok("secret")).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    // n2 fronts `web` and `db`, but its certificate names only `web`.
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", up.addr), ("db", up.addr)]))
        .await;
    routable(&n1, "web", 1).await;
    assert!(
        !n1.proxy().services().iter().any(|s| s.service == "db"),
        "an unnamed service is not published"
    );

    let ask = |service: &'static str, source: &'static str| {
        let ep = n1.endpoint().clone();
        let addr = n2.quic_addr();
        async move {
            let (_c, send, recv) = ep.open_bi(addr).await.unwrap();
            let mut w = FrameWriter::new(send);
            w.kind(STREAM_KIND_HTTP);
            let head = RequestHead {
                service: service.into(),
                source: source.into(),
                deadline_ms: 2000,
                attempt: 1,
                version: 1,
                method: "GET".into(),
                uri: "/".into(),
                authority: service.into(),
                headers: vec![],
                has_body: false,
                upgrade: None,
            };
            w.frame(FRAME_HEAD, encode(&head).unwrap()).await.unwrap();
            w.end().await.unwrap();
            let mut r = FrameReader::new(recv);
            let rh: ResponseHead = r.head().await.unwrap();
            let code = rh
                .headers
                .iter()
                .find(|(k, _)| k == "shoal-error")
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            (rh.status, code)
        }
    };
    assert_eq!(ask("web", "client").await, (200, None));
    assert_eq!(ask("db", "client").await, (403, Some("not-served".into())));
    assert_eq!(
        ask("web", "admin").await,
        (403, Some("unauthorized".into()))
    );
    assert_eq!(
        ask("nope", "client").await,
        (404, Some("unknown-service".into()))
    );
    assert_eq!(up.hits(), 1);
    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_listener_sends_everything_to_its_service_through_policy() {
    let v1 = Upstream::start(echo()).await;
    let v2 = Upstream::start(ok("v2")).await;
    let mut mesh = Mesh::new();
    let n1 = mesh
        .client("n1", |c| {
            c.proxy.upstreams.push(node::proxy::UpstreamListener {
                service: "web".into(),
                listen: "127.0.0.1:0".parse().unwrap(),
            })
        })
        .await;
    let n2 = mesh
        .start(mesh.config(
            "n2",
            &["web", "web-v2"],
            &[("web", v1.addr), ("web-v2", v2.addr)],
        ))
        .await;
    routable(&n1, "web", 1).await;
    routable(&n1, "web-v2", 1).await;
    let listen = n1.upstream_addr("web").expect("upstream listener bound");
    let client = http1();

    // The app addresses the listener (or names anything else): it reaches
    // `web`, which sees its own name as Host.
    for host in [listen.to_string(), "elsewhere".to_string()] {
        let resp = client
            .request(get(listen, &host, "/via-upstream?q=1"))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "host {host}");
        assert_eq!(resp.headers()["x-path"], "/via-upstream");
        assert_eq!(resp.headers()["x-seen-host"], "web");
        assert_eq!(
            resp.headers()["x-seen-shoal-forwarded"],
            "by=n2;from=n1;svc=client"
        );
    }

    // Policies apply as on the shared outbound listener: a route sending
    // `web` to `web-v2` takes this listener's traffic too.
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: web-cutover}\nspec:\n  parentRefs: [{kind: Service, name: web}]\n  rules:\n  - backendRefs: [{name: web-v2, port: 80}]\n";
    let (status, body) = mesh
        .pki
        .operator("alice")
        .put(n1.admin_addr(), "HTTPRoute", "web-cutover", route, "", &[])
        .await;
    assert!(status == 200 || status == 201, "{status} {body}");
    eventually(
        "the route takes the upstream listener's traffic",
        WAIT,
        || async {
            let resp = client
                .request(get(listen, &listen.to_string(), "/"))
                .await
                .unwrap();
            (resp.status() == 200 && body_of(resp).await == "v2").then_some(())
        },
    )
    .await;
    n1.shutdown().await;
    n2.shutdown().await;
}
