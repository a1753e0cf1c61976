//! The Gateway API mesh (GAMMA) conformance suite, re-enacted against real
//! nodes: every manifest in tests/conformance/gateway-api-mesh applied
//! unchanged through the admin API (signed, `?wait=all`), then every case
//! of the matching upstream test (transcribed in `tests/src/gamma_cases.rs`)
//! sent through a client node's outbound listener to echo backends that
//! report what they received. Prints `test | passed/total`.
//! The caller nodes run in the suite's namespaces (`--namespace`): one in
//! `gateway-conformance-mesh`, one in `gateway-conformance-mesh-consumer`.
//! A failing case is printed with the reason it failed.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use node::Node;
use node::proxy::UpstreamListener;
use tests::echo::{self, EchoReport};
use tests::gamma_cases::{self, Case, GRPC_PATH};
use tests::operator::Operator;
use tests::traffic::{Body, Mesh, empty, full, http1, routable};

/// Every case must pass.
const FLOOR: usize = 85;

fn manifest_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/gateway-api-mesh")
}

/// The documents of a manifest file, unchanged, with their kind and name.
fn documents(file: &str) -> Vec<(String, String, String)> {
    let path = manifest_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.split("\n---")
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let v: serde_json::Value = serde_yaml::from_str(p).unwrap();
            (
                v["kind"].as_str().unwrap().to_string(),
                v["metadata"]["name"].as_str().unwrap().to_string(),
                p.trim_start_matches('\n').to_string(),
            )
        })
        .collect()
}

struct Rig {
    mesh: Mesh,
    op: Operator,
    _backends: Vec<tests::traffic::Upstream>,
    pod_v2: SocketAddr,
    nodes: Vec<Node>,
    /// The caller in the services' namespace, and the one in the consumer's.
    caller: usize,
    consumer: usize,
}

impl Rig {
    async fn start() -> Self {
        let mut mesh = Mesh::new();
        let v1 = echo::start("echo-v1").await;
        let v2 = echo::start("echo-v2").await;
        let pod_v2 = v2.addr;
        let c = mesh.config(
            "n-v1",
            &["echo", "echo-v1"],
            &[("echo", v1.addr), ("echo-v1", v1.addr)],
        );
        let n1 = mesh.start(c).await;
        let c = mesh.config(
            "n-v2",
            &["echo", "echo-v2"],
            &[("echo", v2.addr), ("echo-v2", v2.addr)],
        );
        let n2 = mesh.start(c).await;
        let caller = mesh
            .client("c-mesh", |c| {
                c.proxy.namespace = gamma_cases::MESH_NS.into();
                for svc in ["echo", "echo-v1", "echo-v2"] {
                    c.proxy.upstreams.push(UpstreamListener {
                        service: svc.into(),
                        listen: "127.0.0.1:0".parse().unwrap(),
                    });
                }
            })
            .await;
        let consumer = mesh
            .client("c-consumer", |c| {
                c.proxy.namespace = gamma_cases::CONSUMER_NS.into();
            })
            .await;
        for n in [&caller, &consumer] {
            routable(n, "echo", 2).await;
            routable(n, "echo-v1", 1).await;
            routable(n, "echo-v2", 1).await;
        }
        let op = mesh.pki.operator("alice");
        Rig {
            mesh,
            op,
            _backends: vec![v1, v2],
            pod_v2,
            nodes: vec![n1, n2, caller, consumer],
            caller: 2,
            consumer: 3,
        }
    }

    async fn apply(&self, kind: &str, name: &str, body: &str) {
        let admin = self.nodes[0].admin_addr();
        let (status, reply) = self
            .op
            .put(admin, kind, name, body, "?wait=all&timeout=10s", &[])
            .await;
        assert!(
            status == 200 || status == 201,
            "{kind}/{name}: {status} {reply}"
        );
    }

    async fn remove(&self, kind: &str, name: &str) {
        let admin = self.nodes[0].admin_addr();
        let (status, reply) = self.op.delete(admin, kind, name, "?wait=all").await;
        assert!(
            status == 200 || status == 404,
            "{kind}/{name}: {status} {reply}"
        );
    }
}

/// What came back for one request.
struct Got {
    status: u16,
    headers: hyper::HeaderMap,
    echo: Option<EchoReport>,
}

async fn send(
    rig: &Rig,
    case: &Case,
    extra: Option<(&'static str, String)>,
) -> Result<Got, String> {
    let node = if case.caller_ns == gamma_cases::CONSUMER_NS {
        &rig.nodes[rig.consumer]
    } else {
        &rig.nodes[rig.caller]
    };
    let (addr, host) = match (case.host_header, case.dial.strip_prefix("pod:")) {
        // ClusterIP-style: the address dialled is the service's listener.
        (Some(h), _) => (
            node.upstream_addr(case.dial)
                .ok_or("no upstream listener")?,
            h.to_string(),
        ),
        (None, Some(_)) => (node.outbound_addr().unwrap(), rig.pod_v2.to_string()),
        (None, None) => (node.outbound_addr().unwrap(), case.dial.to_string()),
    };
    let mut b = Request::builder()
        .uri(format!("http://{addr}{}", case.path))
        .header("host", host);
    for (k, v) in &case.headers {
        b = b.header(*k, *v);
    }
    if let Some((k, v)) = extra {
        b = b.header(k, v);
    }
    let resp = if case.grpc {
        // h2c with prior knowledge, `:authority` the address dialled.
        let req = b
            .method("POST")
            .uri(format!("http://{}{GRPC_PATH}", case.dial))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(full(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, Body>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())
    } else {
        http1()
            .request(b.body(empty()).unwrap())
            .await
            .map_err(|e| e.to_string())
    }
    .map_err(|e| format!("request failed: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let echo = serde_json::from_slice::<EchoReport>(&body).ok();
    Ok(Got {
        status,
        headers,
        echo,
    })
}

/// The upstream comparisons (echo/pod.go compareRequest, http.go redirects).
fn check(case: &Case, got: &Got) -> Result<(), String> {
    if got.status != case.status {
        let why = got
            .headers
            .get("shoal-error")
            .map(|v| format!(" shoal-error {v:?}"))
            .unwrap_or_default();
        return Err(format!("status {} (want {}){why}", got.status, case.status));
    }
    if let Some(want) = &case.redirect {
        let l = got
            .headers
            .get("location")
            .and_then(|v| v.to_str().ok())
            .ok_or("no Location")?;
        let u: hyper::Uri = l.parse().map_err(|_| format!("Location {l:?}"))?;
        let (scheme, host) = (u.scheme_str().unwrap_or(""), u.host().unwrap_or(""));
        let port = u.port_u16().map(|p| p.to_string()).unwrap_or_default();
        let req_path = case.path.split('?').next().unwrap();
        let want_scheme = if want.scheme.is_empty() {
            "http"
        } else {
            want.scheme
        };
        let want_path = if want.path.is_empty() {
            req_path
        } else {
            want.path
        };
        let port_ok = if want.port.is_empty() {
            match scheme {
                "http" => port.is_empty() || port == "80",
                "https" => port.is_empty() || port == "443",
                _ => true,
            }
        } else {
            port == want.port
        };
        let host_ok = want.host.is_empty() || host == want.host;
        if !(port_ok && host_ok && scheme == want_scheme && u.path() == want_path) {
            return Err(format!("Location {l}"));
        }
        return Ok(());
    }
    if got.status != 200 {
        return Ok(());
    }
    let echo = got.echo.as_ref().ok_or_else(|| {
        let h = |k: &str| {
            got.headers
                .get(k)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string()
        };
        format!(
            "no echo report (shoal-error {}, grpc-status {}, grpc-message {})",
            h("shoal-error"),
            h("grpc-status"),
            h("grpc-message")
        )
    })?;
    if !echo.backend.starts_with(case.backend) {
        return Err(format!("backend {} (want {})", echo.backend, case.backend));
    }
    if let Some(p) = case.expect_path
        && echo.path != p
    {
        return Err(format!("backend saw path {}", echo.path));
    }
    for (k, v) in &case.expect_headers {
        if echo.header(k).as_deref() != Some(*v) {
            return Err(format!("backend saw {k}: {:?} (want {v})", echo.header(k)));
        }
    }
    for k in &case.absent_headers {
        if echo.header(k).is_some() {
            return Err(format!("backend saw {k}"));
        }
    }
    for (k, v) in &case.response_headers {
        if got.headers.get(*k).is_none_or(|g| g != v) {
            return Err(format!(
                "response {k}: {:?} (want {v})",
                got.headers.get(*k)
            ));
        }
    }
    for k in &case.response_absent {
        if got.headers.contains_key(*k) {
            return Err(format!("response has {k}"));
        }
    }
    Ok(())
}

/// A weight case: 500 requests, each backend's share within 5 points.
async fn weights(rig: &Rig, case: &Case) -> Result<(), String> {
    let total = 500;
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for chunk in 0..(total / 10) {
        let mut batch = Vec::new();
        for i in 0..10 {
            batch.push(send(
                rig,
                case,
                Some(("x-jitter", format!("{}", chunk * 10 + i))),
            ));
        }
        for got in futures::future::join_all(batch).await {
            let got = got?;
            check(case, &got)?;
            let b = got.echo.map(|e| e.backend).unwrap_or_default();
            *seen.entry(b).or_default() += 1;
        }
    }
    for (backend, share) in &case.weights {
        let got = *seen.get(*backend).unwrap_or(&0) as f64 / total as f64;
        if (got - share).abs() > 0.05 {
            return Err(format!(
                "{backend} got {got:.2} of traffic (want {share}): {seen:?}"
            ));
        }
    }
    if seen
        .keys()
        .any(|b| !case.weights.iter().any(|(w, _)| w == b))
    {
        return Err(format!("traffic went elsewhere: {seen:?}"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_mesh_suite_against_real_nodes() {
    let rig = Rig::start().await;
    let cases = gamma_cases::all();
    assert_eq!(cases.len(), 85);
    let mut table: Vec<(&str, usize, usize)> = Vec::new();
    let mut failures = Vec::new();
    let mut applied: Vec<(String, String)> = Vec::new();
    let mut current: Option<&[&str]> = None;
    for case in &cases {
        if current != Some(case.manifests) {
            for (kind, name) in applied.drain(..) {
                rig.remove(&kind, &name).await;
            }
            for file in case.manifests {
                for (kind, name, body) in documents(file) {
                    rig.apply(&kind, &name, &body).await;
                    applied.push((kind, name));
                }
            }
            current = Some(case.manifests);
        }
        if table.last().is_none_or(|(t, _, _)| *t != case.test) {
            table.push((case.test, 0, 0));
        }
        let result = if case.weights.is_empty() {
            match send(&rig, case, None).await {
                Ok(got) => check(case, &got),
                Err(e) => Err(e),
            }
        } else {
            // As upstream: up to ten distribution runs, one within
            // tolerance passes.
            let mut last = Err(String::new());
            for _ in 0..10 {
                last = weights(&rig, case).await;
                if last.is_ok() {
                    break;
                }
            }
            last
        };
        let row = table.last_mut().unwrap();
        row.2 += 1;
        match result {
            Ok(()) => row.1 += 1,
            Err(e) => failures.push(format!(
                "{} ({}) {} {}: {e}",
                case.test, case.file, case.dial, case.path
            )),
        }
    }
    let passed: usize = table.iter().map(|r| r.1).sum();
    let tests_passed = table.iter().filter(|r| r.1 == r.2).count();
    println!("test | passed/total");
    for (t, p, n) in &table {
        println!("{t} | {p}/{n}");
    }
    println!(
        "TOTAL | {passed}/85 cases, {tests_passed}/{} tests",
        table.len()
    );
    for f in &failures {
        println!("FAILED {f}");
    }
    assert!(
        passed >= FLOOR,
        "{passed}/85 passed, below the floor of {FLOOR}"
    );
    drop(rig.mesh);
    for n in rig.nodes {
        n.shutdown().await;
    }
}
