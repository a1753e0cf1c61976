//! HTTP Upgrade through the mesh, exercised by a real WebSocket stack: a
//! `websockets` (PyPI) echo server behind one node, and a `websockets`
//! client calling another node's outbound listener
//! (`tests/python/ws_echo.py`). The handshake's 101 comes back through both
//! nodes and then the connection is spliced as bytes over the QUIC stream:
//! 1,000 echoed messages, 100 pipelined, a 4 MiB message, a fragmented
//! message (the server sees the fragments as sent), ping/pong, close codes
//! and reasons both ways. An app that refuses the upgrade gets its answer
//! through unchanged. The same works to an instance behind the caller's own
//! node, and an `Upgrade: h2c` request (curl `--http2`) is answered in
//! HTTP/1.1.
//!
//! Needs `python3 -m pip install websockets` (CI installs it); without it
//! the tests fail saying so.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use node::proxy::{Protocol, ServiceSpec};
use serde_json::Value;
use tests::traffic::{Mesh, Upstream, WAIT, echo, routable};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

fn script() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/ws_echo.py")
}

/// Fails (never skips) when `websockets` is not importable.
async fn require_websockets() {
    let out = Command::new("python3")
        .args(["-c", "import websockets; print(websockets.__version__)"])
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}); these tests need python3 with websockets: run `python3 -m pip install websockets` (CI installs it)")
        });
    assert!(
        out.status.success(),
        "python3 cannot import websockets: run `python3 -m pip install websockets` (CI installs it)\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `websockets` echo server; one JSON line per finished connection.
/// Killed when dropped; it also exits when its stdin closes.
struct WsServer {
    addr: SocketAddr,
    ended: mpsc::UnboundedReceiver<Value>,
    _stdin: ChildStdin,
    _child: Child,
}

impl WsServer {
    async fn start() -> Self {
        let mut child = Command::new("python3")
            .arg(script())
            .arg("serve")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn python3 ws_echo.py serve");
        let stdin = child.stdin.take().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("ws server prints its port in time")
            .unwrap()
            .expect("ws server exited before printing its port");
        let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{first:?}: {e}"));
        let port = v["port"].as_u64().unwrap_or_else(|| panic!("{first}"));
        let (tx, ended) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(l)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    let _ = tx.send(v);
                }
            }
        });
        WsServer {
            addr: SocketAddr::from(([127, 0, 0, 1], port as u16)),
            ended,
            _stdin: stdin,
            _child: child,
        }
    }

    /// The next connection the server saw end.
    async fn next_end(&mut self) -> Value {
        tokio::time::timeout(WAIT, self.ended.recv())
            .await
            .expect("the server reports a finished connection in time")
            .expect("ws server still running")
    }
}

/// Runs the `websockets` client against `outbound` with Host `host`.
async fn client(outbound: SocketAddr, host: &str, args: &[&str]) -> Value {
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("python3")
            .arg(script())
            .args(["client", "--connect", &outbound.to_string(), "--host", host])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("ws client within 120 s")
    .expect("run python3 ws_echo.py client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ws client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{stdout:?}: {e}"))
}

/// A node `n-ws` fronting the echo server as `ws` (HTTP/1.1) with an
/// outbound listener of its own, and a caller node `caller`.
async fn rig(server: &WsServer) -> (Mesh, node::Node, node::Node) {
    let mut mesh = Mesh::new();
    let mut c = mesh.config("n-ws", &["ws"], &[]);
    let mut spec = ServiceSpec::new("ws", server.addr, Protocol::Http1);
    spec.health_interval = Duration::from_millis(100);
    c.proxy.services.push(spec);
    c.proxy.outbound = Some("127.0.0.1:0".parse().unwrap());
    let serving = mesh.start(c).await;
    let caller = mesh.client("caller", |_| {}).await;
    routable(&caller, "ws", 1).await;
    routable(&serving, "ws", 1).await;
    (mesh, serving, caller)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_crosses_two_nodes() {
    require_websockets().await;
    let mut server = WsServer::start().await;
    let (_mesh, serving, caller) = rig(&server).await;
    let out = caller.outbound_addr().unwrap();

    let r = client(out, "ws", &["--scenario", "full"]).await;
    eprintln!("websocket through two nodes: {r}");
    assert_eq!(r["messages"], 1000, "{r}");
    assert_eq!(r["mismatched"], 0, "{r}");
    assert_eq!(r["pipelined_in_order"], true, "{r}");
    assert!(r["pong_ms"].is_number(), "a pong came back: {r}");
    // Sec-WebSocket-Extensions crossed both ways: deflate was negotiated.
    assert_eq!(r["extensions"][0], "PerMessageDeflate", "{r}");
    assert_eq!(r["big_bytes"], 4 * 1024 * 1024, "{r}");
    assert_eq!(r["big_equal"], true, "{r}");
    assert_eq!(r["closed_by_server"][0], 4001, "{r}");
    assert_eq!(r["closed_by_server"][1], "server says bye", "{r}");
    // The fragments reached the app as the client sent them (7 parts and
    // the empty final frame `websockets` ends a fragmented message with).
    assert!(r["fragments_seen"].as_u64().unwrap() >= 7, "{r}");
    assert_eq!(r["fragments_joined_ok"], true, "{r}");
    assert_eq!(r["client_close_echoed"][0], 4002, "{r}");

    // What the app saw of the two connections' ends.
    let mut ends = vec![server.next_end().await, server.next_end().await];
    ends.sort_by_key(|v| v["path"].as_str().unwrap_or("").to_string());
    assert_eq!(ends[0]["path"], "/echo", "{ends:?}");
    assert_eq!(ends[0]["close_code"], 4001, "{ends:?}");
    assert_eq!(ends[1]["path"], "/fragments", "{ends:?}");
    assert_eq!(ends[1]["close_code"], 4002, "{ends:?}");
    assert_eq!(ends[1]["close_reason"], "client says bye", "{ends:?}");

    // The handshake counted as a 1xx on both nodes' edges.
    let (_, metrics) = tests::admin_get(caller.admin_addr(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shoal_proxy_requests_total")
                && l.contains("destination=\"ws\"")
                && l.contains("class=\"1xx\"")),
        "{metrics}"
    );
    let (_, metrics) = tests::admin_get(serving.admin_addr(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shoal_proxy_requests_total")
                && l.contains("direction=\"inbound\"")
                && l.contains("destination=\"ws\"")
                && l.contains("class=\"1xx\"")),
        "the handshake crossed the mesh to the serving node: {metrics}"
    );
    // The tunnels are counted as opaque connections on both nodes, with
    // their bytes (the 4 MiB message went both ways).
    for (node, direction) in [(&caller, "outbound"), (&serving, "inbound")] {
        let edge = format!("direction=\"{direction}\",source=\"client\",destination=\"ws\"");
        let m = tests::eventually(&format!("{direction} tunnels counted closed"), WAIT, || {
            let edge = edge.clone();
            async move {
                let (_, m) = tests::admin_get(node.admin_addr(), "/metrics").await;
                let closed: u64 = m
                    .lines()
                    .filter(|l| {
                        l.starts_with("shoal_tcp_connections_closed_total") && l.contains(&edge)
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum();
                (closed == 2).then_some(m)
            }
        })
        .await;
        assert!(
            m.contains(&format!("shoal_tcp_connections_opened_total{{{edge}}} 2")),
            "{m}"
        );
        for flow in ["to_service", "from_service"] {
            let bytes: u64 = m
                .lines()
                .find(|l| {
                    l.starts_with("shoal_tcp_bytes_total") && l.contains(&edge) && l.contains(flow)
                })
                .and_then(|l| l.rsplit(' ').next()?.parse().ok())
                .unwrap_or(0);
            assert!(bytes > 4 << 20, "{direction} {flow}: {bytes} bytes\n{m}");
        }
    }
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_passes_the_apps_answer_through() {
    require_websockets().await;
    let server = WsServer::start().await;
    let (_mesh, serving, caller) = rig(&server).await;
    let r = client(
        caller.outbound_addr().unwrap(),
        "ws",
        &["--scenario", "refuse", "--path", "/refuse"],
    )
    .await;
    eprintln!("refused upgrade: {r}");
    assert_eq!(r["status"], 403, "{r}");
    assert_eq!(r["body"], "no upgrade for you\n", "{r}");
    assert_eq!(r["x_refused_by"], "app", "{r}");
    assert!(
        r["shoal_error"].is_null(),
        "the app answered, not the mesh: {r}"
    );
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_an_instance_behind_the_same_node() {
    require_websockets().await;
    let mut server = WsServer::start().await;
    let (_mesh, serving, caller) = rig(&server).await;
    let r = client(
        serving.outbound_addr().unwrap(),
        "ws",
        &["--scenario", "small", "--messages", "200"],
    )
    .await;
    eprintln!("websocket on the same node: {r}");
    assert_eq!(r["messages"], 200, "{r}");
    assert_eq!(r["mismatched"], 0, "{r}");
    assert_eq!(r["pipelined_in_order"], true, "{r}");
    assert_eq!(r["closed_by_server"][0], 4001, "{r}");
    let end = server.next_end().await;
    assert_eq!(end["close_code"], 4001, "{end}");
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_answered_in_http1() {
    let web = Upstream::start(echo()).await;
    let mut mesh = Mesh::new();
    let c = mesh.config("n-web", &["web"], &[("web", web.addr)]);
    let serving = mesh.start(c).await;
    let caller = mesh.client("caller", |_| {}).await;
    routable(&caller, "web", 1).await;
    // curl --http2 on an http:// URL asks for `Upgrade: h2c`.
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        Command::new("curl")
            .args(["-s", "-i", "--http2", "-H", "Host: web", "--data", "hi"])
            .arg(format!(
                "http://{}/h2c-please",
                caller.outbound_addr().unwrap()
            ))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl within 30 s")
    .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "curl failed: {text}");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-path: /h2c-please"), "{text}");
    assert!(text.ends_with("hi"), "{text}");
    let (_, metrics) = tests::admin_get(caller.admin_addr(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shoal_proxy_requests_total")
                && l.contains("destination=\"web\"")
                && l.contains("class=\"2xx\"")),
        "{metrics}"
    );
    caller.shutdown().await;
    serving.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_serving_node_ends_the_websocket_promptly() {
    require_websockets().await;
    let server = WsServer::start().await;
    let (_mesh, serving, caller) = rig(&server).await;
    let mut child = Command::new("python3")
        .arg(script())
        .args([
            "client",
            "--connect",
            &caller.outbound_addr().unwrap().to_string(),
            "--host",
            "ws",
            "--scenario",
            "hold",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the ws client");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT * 3, lines.next_line())
        .await
        .expect("the client is connected in time")
        .unwrap()
        .expect("a ready line");
    assert!(ready.contains("ready"), "{ready}");
    let killed = std::time::Instant::now();
    serving.kill().await;
    let last = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the client's connection ends well before the 60 s idle timeout")
        .unwrap()
        .expect("a result line");
    let took = killed.elapsed();
    let r: Value = serde_json::from_str(&last).unwrap_or_else(|e| panic!("{last}: {e}"));
    eprintln!("serving node killed: the client saw the end after {took:?}: {r}");
    assert_eq!(r["echo"], "before", "{r}");
    assert!(r["closed_after_s"].as_f64().is_some(), "{r}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    caller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_an_egress_host() {
    require_websockets().await;
    let mut server = WsServer::start().await;
    let mut mesh = Mesh::new();
    let caller = mesh
        .client("caller", |c| c.proxy.egress = node::proxy::Egress::Allow)
        .await;
    let host = format!("localhost:{}", server.addr.port());
    let r = client(
        caller.outbound_addr().unwrap(),
        &host,
        &["--scenario", "small", "--messages", "50"],
    )
    .await;
    eprintln!("websocket to an egress host: {r}");
    assert_eq!(r["messages"], 50, "{r}");
    assert_eq!(r["mismatched"], 0, "{r}");
    assert_eq!(r["closed_by_server"][0], 4001, "{r}");
    assert_eq!(server.next_end().await["close_code"], 4001);
    let (_, metrics) = tests::admin_get(caller.admin_addr(), "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shoal_proxy_requests_total")
                && l.contains("destination=\"egress:localhost\"")
                && l.contains("class=\"1xx\"")),
        "{metrics}"
    );
    caller.shutdown().await;
}

/// A bare upgrade app on 127.0.0.1: reads a request head, answers 101 with
/// `Upgrade: shoal-test` and, in the same write, a banner; then echoes
/// every byte upper-cased until the client's end of file, writes "bye" and
/// closes. Requests to `/no` get 426 with a body instead; `/sneaky` gets a
/// 101 without having asked for an upgrade.
async fn raw_upgrade_app() -> (SocketAddr, tokio::task::JoinHandle<Vec<String>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut heads = Vec::new();
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                break;
            };
            let mut buf = Vec::new();
            let mut b = [0u8; 4096];
            // The head (and whatever came with it).
            let split = loop {
                let n = s.read(&mut b).await.unwrap_or(0);
                if n == 0 {
                    break None;
                }
                buf.extend_from_slice(&b[..n]);
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(split) = split else { continue };
            let head = String::from_utf8_lossy(&buf[..split]).to_string();
            heads.push(head.clone());
            if head.starts_with("GET /no ") {
                let _ = s
                    .write_all(b"HTTP/1.1 426 Upgrade Required\r\ncontent-length: 11\r\nx-app: raw\r\n\r\nnot for you")
                    .await;
                continue;
            }
            if head.starts_with("GET /sneaky ") {
                // Switches protocols though nobody asked.
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: shoal-test\r\n\r\nSURPRISE")
                    .await;
                continue;
            }
            if !head.to_ascii_lowercase().contains("upgrade: shoal-test") {
                continue; // health checks and the like
            }
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: shoal-test\r\n\r\nBANNER;")
                .await;
            let mut early = buf[split..].to_vec();
            loop {
                for c in &mut early {
                    c.make_ascii_uppercase();
                }
                if !early.is_empty() && s.write_all(&early).await.is_err() {
                    break;
                }
                let n = s.read(&mut b).await.unwrap_or(0);
                if n == 0 {
                    let _ = s.write_all(b"bye").await;
                    let _ = s.shutdown().await;
                    break;
                }
                early = b[..n].to_vec();
            }
        }
        heads
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_upgrade_keeps_early_bytes_and_half_close_both_ways() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (app, _task) = raw_upgrade_app().await;
    let mut mesh = Mesh::new();
    let mut c = mesh.config("n-raw", &["raw"], &[]);
    c.proxy
        .services
        .push(ServiceSpec::new("raw", app, Protocol::Http1));
    let serving = mesh.start(c).await;
    let caller = mesh.client("caller", |_| {}).await;
    routable(&caller, "raw", 1).await;
    let out = caller.outbound_addr().unwrap();

    // The request head and the first tunnel bytes in one write, before the
    // 101: they must reach the app after the head.
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    s.write_all(
        b"GET /t HTTP/1.1\r\nHost: raw\r\nConnection: Upgrade\r\nUpgrade: shoal-test\r\n\r\nearly,",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    let want_first = b"BANNER;EARLY,";
    while !got.ends_with(want_first) {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("the 101, banner and early echo in time")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("upgrade: shoal-test"),
        "{text}"
    );
    assert!(text.ends_with("\r\n\r\nBANNER;EARLY,"), "{text}");
    // Interactive bytes, then our end of file; the app still answers.
    s.write_all(b"more").await.unwrap();
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("the rest and the app's close in time")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rest), "MOREbye");

    // A refusal on the same path is an ordinary answer.
    let mut s = tokio::net::TcpStream::connect(out).await.unwrap();
    s.write_all(
        b"GET /no HTTP/1.1\r\nHost: raw\r\nConnection: Upgrade\r\nUpgrade: shoal-test\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"not for you") {
        let n = tokio::time::timeout(WAIT, s.read(&mut b))
            .await
            .expect("the 426 in time")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&b[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 426"), "{text}");
    assert!(text.contains("x-app: raw"), "{text}");
    assert!(!text.contains("shoal-error"), "{text}");

    // A 101 nobody asked for never reaches the client as a switch.
    let curl = tokio::time::timeout(
        WAIT,
        Command::new("curl")
            .args(["-s", "-i", "-H", "Host: raw"])
            .arg(format!("http://{out}/sneaky"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("curl in time")
    .expect("run curl");
    let text = String::from_utf8_lossy(&curl.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 502"), "{text}");
    assert!(text.contains("shoal-error: upstream-reset"), "{text}");
    assert!(!text.contains("surprise"), "{text}");
    caller.shutdown().await;
    serving.shutdown().await;
}
