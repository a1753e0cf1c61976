//! GRPCRoute through the mesh, exercised by a real gRPC stack: grpcio
//! (PyPI) servers behind two nodes and a grpcio client calling a third
//! node's outbound listener (`tests/python/grpc_echo.py`, generic API, raw
//! bytes, nothing generated). A signed GRPCRoute sends `pkg.Svc/Special`
//! to `echo-v2`, calls with `x-canary: true` to `echo-v1` (with a header the
//! backend reports) and splits everything else 80/20; a mesh failure
//! reaches the grpcio client as `UNAVAILABLE` with the mesh's reason.
//!
//! Needs `python3 -m pip install grpcio` (CI installs it); without it the
//! tests fail saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use node::Node;
use node::proxy::Protocol;
use serde_json::Value;
use tests::eventually;
use tests::traffic::{Mesh, WAIT, routable};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/grpc_echo.py")
}

/// Fails (never skips) when grpcio is not importable.
async fn require_grpcio() {
    let out = Command::new("python3")
        .args(["-c", "import grpc; print(grpc.__version__)"])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); these tests need python3 with grpcio: run `python3 -m pip install grpcio` (CI installs it)")
        });
    assert!(
        out.status.success(),
        "python3 cannot import grpc: run `python3 -m pip install grpcio` (CI installs it)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("grpcio {}", String::from_utf8_lossy(&out.stdout).trim_end());
}

/// A grpcio server process answering every method with its name. Killed
/// when dropped; it also exits when its stdin closes.
struct GrpcServer {
    addr: SocketAddr,
    _stdin: ChildStdin,
    _child: Child,
}

impl GrpcServer {
    async fn start(name: &str) -> Self {
        let mut child = Command::new("python3")
            .arg(script())
            .args(["serve", "--name", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python3 grpc_echo.py serve");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{name}: no port line within {WAIT:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("{name}: exited before printing its port"));
        let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
        let port = v["port"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name}: {first}"));
        GrpcServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port as u16)),
            _stdin: stdin,
            _child: child,
        }
    }
}

/// One call's outcome as the grpcio client saw it.
#[derive(Debug, Clone)]
enum Outcome {
    /// The backend's reply: its name, the method path it saw, its
    /// `x-route` metadata.
    Reply {
        backend: String,
        method: String,
        x_route: Option<String>,
    },
    /// A gRPC status other than OK: code name and details.
    Status { code: String, details: String },
}

impl Outcome {
    fn backend(&self) -> &str {
        match self {
            Outcome::Reply { backend, .. } => backend,
            Outcome::Status { code, details } => panic!("call failed: {code} {details}"),
        }
    }
}

/// `count` unary calls to `method` on one grpcio channel to `outbound`,
/// with `:authority` `authority` and `metadata`.
async fn calls(
    outbound: SocketAddr,
    authority: &str,
    method: &str,
    count: usize,
    metadata: &[(&str, &str)],
) -> Vec<Outcome> {
    let mut cmd = Command::new("python3");
    cmd.arg(script()).args([
        "call",
        "--target",
        &outbound.to_string(),
        "--authority",
        authority,
        "--method",
        method,
        "--count",
        &count.to_string(),
    ]);
    for (k, v) in metadata {
        cmd.args(["--metadata", &format!("{k}={v}")]);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        cmd.kill_on_drop(true).stdin(Stdio::null()).output(),
    )
    .await
    .expect("grpcio client within 60 s")
    .expect("run python3 grpc_echo.py call");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<Outcome> = stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            let s = |v: &Value| v.as_str().map(str::to_string);
            if v["ok"] == true {
                let r = &v["reply"];
                Outcome::Reply {
                    backend: s(&r["backend"]).unwrap(),
                    method: s(&r["method"]).unwrap(),
                    x_route: s(&r["x_route"]),
                }
            } else {
                Outcome::Status {
                    code: s(&v["code"]).unwrap(),
                    details: s(&v["details"]).unwrap_or_default(),
                }
            }
        })
        .collect();
    assert_eq!(got.len(), count, "{stdout}");
    got
}

/// The split's tolerance: mean ± 4.5 standard deviations of
/// Binomial(`n`, `p`) (a correct split falls outside about once in 150 000
/// runs).
fn binomial_band(n: usize, p: f64) -> (usize, usize) {
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    let lo = (mean - 4.5 * sd).ceil().max(0.0) as usize;
    let hi = (mean + 4.5 * sd).floor().min(n as f64) as usize;
    (lo, hi)
}

/// grpcio servers for `echo-v1` and `echo-v2` behind nodes `n-v1` and
/// `n-v2` (protocol h2c), `n-v1` also fronting `echo-dead` at an address
/// where nothing listens, and a caller node with an outbound listener.
/// Nothing serves `echo` itself: only the route makes it reachable.
struct Rig {
    mesh: Mesh,
    _servers: Vec<GrpcServer>,
    nodes: Vec<Node>,
}

impl Rig {
    async fn start() -> Self {
        require_grpcio().await;
        let v1 = GrpcServer::start("echo-v1").await;
        let v2 = GrpcServer::start("echo-v2").await;
        let dead: SocketAddr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let mut mesh = Mesh::new();
        let mut c = mesh.config(
            "n-v1",
            &["echo-v1", "echo-dead"],
            &[("echo-v1", v1.addr), ("echo-dead", dead)],
        );
        for s in &mut c.proxy.services {
            s.protocol = Protocol::H2c;
        }
        let n1 = mesh.start(c).await;
        let mut c = mesh.config("n-v2", &["echo-v2"], &[("echo-v2", v2.addr)]);
        for s in &mut c.proxy.services {
            s.protocol = Protocol::H2c;
        }
        let n2 = mesh.start(c).await;
        let caller = mesh.client("caller", |_| {}).await;
        routable(&caller, "echo-v1", 1).await;
        routable(&caller, "echo-v2", 1).await;
        Rig {
            mesh,
            _servers: vec![v1, v2],
            nodes: vec![n1, n2, caller],
        }
    }

    fn caller(&self) -> &Node {
        &self.nodes[2]
    }

    fn outbound(&self) -> SocketAddr {
        self.caller().outbound_addr().unwrap()
    }

    /// PUTs a signed GRPCRoute to the caller, held until every node has it.
    async fn route(&self, name: &str, doc: &str) {
        let (status, reply) = self
            .mesh
            .pki
            .operator("alice")
            .put(
                self.caller().admin_addr(),
                "GRPCRoute",
                name,
                doc,
                "?wait=all&timeout=10s",
                &[],
            )
            .await;
        assert!(status == 200 || status == 201, "{status} {reply}");
    }

    async fn shutdown(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc}
spec:
  parentRefs: [{kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: pkg.Svc, method: Special}}]
    backendRefs: [{name: echo-v2}]
  - matches: [{method: {service: pkg.Svc, method: Broken}}]
    backendRefs: [{name: echo-dead}]
  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: canary}]}
    backendRefs: [{name: echo-v1}]
  - backendRefs: [{name: echo-v1, weight: 80}, {name: echo-v2, weight: 20}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_calls_follow_grpcroute_methods_headers_and_weights() {
    let rig = Rig::start().await;
    let out = rig.outbound();
    // Before the route nothing serves `echo`.
    let before = calls(out, "echo", "/pkg.Svc/Plain", 1, &[]).await;
    assert!(
        matches!(&before[0], Outcome::Status { code, details }
            if code == "UNAVAILABLE" && details.contains("unknown-service")),
        "{before:?}"
    );
    rig.route("echo-grpc", ROUTE).await;

    // Method match: every Special call reaches v2, the path unchanged.
    let special = calls(out, "echo", "/pkg.Svc/Special", 50, &[]).await;
    for o in &special {
        match o {
            Outcome::Reply {
                backend,
                method,
                x_route,
            } => {
                assert_eq!(backend, "echo-v2", "{o:?}");
                assert_eq!(method, "/pkg.Svc/Special");
                assert_eq!(x_route, &None);
            }
            o => panic!("{o:?}"),
        }
    }
    eprintln!("pkg.Svc/Special: 50 of 50 to echo-v2");

    // Everything else: 80/20 by weight, within a binomial band.
    let n = 200;
    let plain = calls(out, "echo", "/pkg.Svc/Plain", n, &[]).await;
    let v2 = plain.iter().filter(|o| o.backend() == "echo-v2").count();
    let v1 = plain.iter().filter(|o| o.backend() == "echo-v1").count();
    let (lo, hi) = binomial_band(n, 0.2);
    eprintln!(
        "pkg.Svc/Plain 80/20 split over {n} grpcio calls: echo-v1 {v1}, echo-v2 {v2} (band for v2 {lo}..={hi})"
    );
    assert_eq!(v1 + v2, n, "{plain:?}");
    assert!(
        (lo..=hi).contains(&v2),
        "{v2} of {n} went to echo-v2, outside {lo}..={hi}"
    );
    for o in &plain {
        assert!(
            matches!(o, Outcome::Reply { method, x_route: None, .. } if method == "/pkg.Svc/Plain"),
            "{o:?}"
        );
    }

    // The service is part of the match: pkg.Other/Special is split too
    // (all 40 landing on v2 by chance: 0.2^40).
    let other = calls(out, "echo", "/pkg.Other/Special", 40, &[]).await;
    let other_v1 = other.iter().filter(|o| o.backend() == "echo-v1").count();
    eprintln!("pkg.Other/Special: {other_v1} of 40 to echo-v1");
    assert!(other_v1 > 0, "{other:?}");

    // Header match: x-canary metadata goes to v1 through the rule's
    // filter (x-route is set by that rule only).
    let canary = calls(out, "echo", "/pkg.Svc/Plain", 50, &[("x-canary", "true")]).await;
    for o in &canary {
        assert!(
            matches!(o, Outcome::Reply { backend, x_route: Some(r), .. }
                if backend == "echo-v1" && r == "canary"),
            "{o:?}"
        );
    }
    eprintln!("x-canary: true: 50 of 50 to echo-v1 with x-route: canary");
    // A method match outranks a header match: Special with x-canary is v2's.
    let both = calls(out, "echo", "/pkg.Svc/Special", 20, &[("x-canary", "true")]).await;
    for o in &both {
        assert!(
            matches!(o, Outcome::Reply { backend, x_route: None, .. } if backend == "echo-v2"),
            "{o:?}"
        );
    }
    // A different header value is not a match: the canary rule's filter
    // never runs, the calls are split like the rest.
    let not_canary = calls(out, "echo", "/pkg.Svc/Plain", 40, &[("x-canary", "no")]).await;
    assert!(
        not_canary
            .iter()
            .all(|o| matches!(o, Outcome::Reply { x_route: None, .. })
                && ["echo-v1", "echo-v2"].contains(&o.backend())),
        "{not_canary:?}"
    );
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_failures_reach_grpcio_as_unavailable() {
    let rig = Rig::start().await;
    let out = rig.outbound();
    rig.route("echo-grpc", ROUTE).await;
    // The route works for a healthy backend on the same channel kind.
    let ok = calls(out, "echo", "/pkg.Svc/Special", 1, &[]).await;
    assert_eq!(ok[0].backend(), "echo-v2");

    // Broken goes to echo-dead, whose only instance is down: once the
    // caller knows the instance, the answer is no-healthy-endpoint.
    let first = eventually(
        "Broken answers UNAVAILABLE no-healthy-endpoint",
        WAIT,
        || async {
            let o = calls(out, "echo", "/pkg.Svc/Broken", 1, &[]).await;
            match &o[0] {
                Outcome::Status { code, details } if details.contains("no-healthy-endpoint") => {
                    Some((code.clone(), details.clone()))
                }
                _ => None,
            }
        },
    )
    .await;
    eprintln!("pkg.Svc/Broken -> grpcio: {} {:?}", first.0, first.1);
    let mut broken = calls(out, "echo", "/pkg.Svc/Broken", 10, &[]).await;
    broken.push(Outcome::Status {
        code: first.0,
        details: first.1,
    });
    for o in &broken {
        // A gRPC status from the mesh, not grpcio's reading of an HTTP
        // error status ("Received http2 header with status: 503").
        assert!(
            matches!(o, Outcome::Status { code, details }
                if code == "UNAVAILABLE"
                    && details.contains("no-healthy-endpoint")
                    && details.contains("echo-dead")
                    && !details.contains("http2 header")),
            "{o:?}"
        );
    }

    // A name nobody serves: UNAVAILABLE naming it.
    let nosuch = calls(out, "nosuch", "/pkg.Svc/Plain", 3, &[]).await;
    for o in &nosuch {
        assert!(
            matches!(o, Outcome::Status { code, details }
                if code == "UNAVAILABLE"
                    && details.contains("unknown-service")
                    && details.contains("nosuch")
                    && !details.contains("http2 header")),
            "{o:?}"
        );
    }
    eprintln!("authority nosuch -> grpcio: {nosuch:?}");
    rig.shutdown().await;
}
