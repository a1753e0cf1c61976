//! Failures are visible, against real `shoal node` processes: the access log
//! (JSON, default `errors`), the tap (`shoal tap` and its filters), `shoal
//! stat --json` / `--watch` agreeing with `/metrics`, and promtool on the
//! metrics after traffic.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn shoal(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(SHOAL)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn make_certs(dir: &Path) {
    let out = shoal(
        &[
            "cert",
            "init",
            "--out",
            "certs",
            "--trust-domain",
            "t.shoal",
        ],
        dir,
    );
    assert!(out.status.success(), "{out:?}");
    let out = shoal(
        &[
            "cert",
            "issue",
            "--ca",
            "certs",
            "--name",
            "n1",
            "--service",
            "web",
            "--out",
            "certs/n1",
        ],
        dir,
    );
    assert!(out.status.success(), "{out:?}");
}

/// An HTTP/1.1 app: `/fail*` answers 503 `down`, anything else 200 `hello`.
fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { continue };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(1) => head.push(b[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse().ok())?
                    })
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                let _ = c.read_exact(&mut body);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = if path.starts_with("/fail") {
                    ("503 Service Unavailable", "down")
                } else {
                    ("200 OK", "hello")
                };
                let _ = write!(
                    c,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// A running node and the lines of its stderr.
struct Node {
    _proc: Proc,
    admin: SocketAddr,
    outbound: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

fn start_node(dir: &Path, app: SocketAddr, extra: &[&str]) -> Node {
    let mut cmd = Command::new(SHOAL);
    cmd.current_dir(dir)
        .args(["node", "--name", "n1", "--listen", "127.0.0.1:0"])
        .args(["--admin", "127.0.0.1:0", "--outbound", "127.0.0.1:0"])
        .args(["--certs", "certs/n1", "--gossip-interval", "100ms"])
        .arg("--service")
        .arg(format!("web=http://{app}"))
        .args(extra)
        .env_remove("SHOAL_ACCESS_LOG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let field = |k: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .parse()
            .unwrap()
    };
    Node {
        admin: field("admin="),
        outbound: field("outbound="),
        _proc: Proc(child),
        stderr: lines,
    }
}

/// One HTTP/1.1 request; returns (status, headers+body text).
fn call(addr: SocketAddr, method: &str, host: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, resp)
}

fn wait_until<T>(what: &str, deadline: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the node routes to its own `web` instance.
fn routable(n: &Node) {
    wait_until("web routable", Duration::from_secs(20), || {
        (call(n.outbound, "GET", "web", "/warmup", "").0 == 200).then_some(())
    });
}

fn access_lines(n: &Node) -> Vec<serde_json::Value> {
    n.stderr
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "shoal::access")
        .map(|v| v["fields"].clone())
        .collect()
}

#[test]
fn access_log_is_one_json_line_per_failed_request_by_default() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let app = app();
    let n = start_node(dir.path(), app, &["--log-format", "json"]);
    routable(&n);
    // Requests before the instance was healthy failed (and were logged).
    let before = access_lines(&n).len();
    for _ in 0..3 {
        assert_eq!(call(n.outbound, "GET", "web", "/ok", "").0, 200);
    }
    assert_eq!(call(n.outbound, "GET", "web", "/fail?secret=1", "").0, 503);
    assert_eq!(
        call(n.outbound, "POST", "web", "/fail/post", "hello").0,
        503
    );
    let (status, resp) = call(n.outbound, "GET", "nowhere", "/x", "");
    assert_eq!(status, 503);
    assert!(resp.contains("unknown-service"), "{resp}");

    // Failures only (the default `errors`): 2 app failures seen outbound and
    // inbound, plus the unknown service (outbound only).
    let lines = wait_until("5 access lines", Duration::from_secs(10), || {
        let l = access_lines(&n).split_off(before);
        (l.len() >= 5).then_some(l)
    });
    assert_eq!(lines.len(), 5, "{lines:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l["path"] != "/ok" && l["path"] != "/warmup"),
        "successes are not logged by default: {lines:#?}"
    );
    let find = |dir: &str, path: &str| {
        lines
            .iter()
            .find(|l| l["direction"] == dir && l["path"] == path)
            .unwrap_or_else(|| panic!("no {dir} {path} line in {lines:#?}"))
    };
    let get = find("outbound", "/fail");
    assert_eq!(get["message"], "request");
    assert_eq!(get["service"], "web");
    assert_eq!(get["source"], "web");
    assert_eq!(get["endpoint"], "n1");
    assert_eq!(get["method"], "GET");
    assert_eq!(get["status"], 503);
    assert_eq!(get["classification"], "failure");
    assert_eq!(get["attempts"], 1, "one endpoint: nowhere to retry");
    assert_eq!(get["response_bytes"], 4, "the app's body `down`");
    assert_eq!(get["request_bytes"], 0);
    assert_eq!(get["shoal_error"], "");
    assert_eq!(get["route"], "");
    assert!(get["duration_ms"].as_f64().unwrap() > 0.0, "{get}");
    assert!(get.get("grpc_status").is_none(), "not a gRPC call: {get}");
    let post = find("outbound", "/fail/post");
    assert_eq!(post["method"], "POST");
    assert_eq!(post["request_bytes"], 5, "the body `hello`");
    let inbound = find("inbound", "/fail/post");
    assert_eq!(
        (inbound["status"].clone(), inbound["request_bytes"].clone()),
        (503.into(), 5.into())
    );
    let unknown = find("outbound", "/x");
    assert_eq!(unknown["service"], "unknown");
    assert_eq!(unknown["shoal_error"], "unknown-service");
    assert_eq!(unknown["attempts"], 0);
    assert_eq!(unknown["endpoint"], "");
}

/// Reads a child's stdout lines into a channel.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Starts `shoal tap` and waits until it is subscribed.
fn tap(dir: &Path, admin: SocketAddr, args: &[&str]) -> (Proc, mpsc::Receiver<String>) {
    let mut child = Command::new(SHOAL)
        .current_dir(dir)
        .args(["tap", "--admin", &admin.to_string()])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("tapping"), "{first}");
    let rx = lines_of(&mut child);
    (Proc(child), rx)
}

fn take(rx: &mpsc::Receiver<String>, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            rx.recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("only {i} of {n} tap lines"))
        })
        .collect()
}

#[test]
fn tap_streams_filtered_events_and_stat_counts_what_the_metrics_count() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let app = app();
    let n = start_node(dir.path(), app, &["--access-log", "off"]);
    routable(&n);

    let (_t1, failures) = tap(
        dir.path(),
        n.admin,
        &["--service", "web", "--status", "5xx"],
    );
    let (_t2, all) = tap(dir.path(), n.admin, &["--json"]);
    let (_t3, other) = tap(dir.path(), n.admin, &["--service", "other"]);
    for _ in 0..3 {
        assert_eq!(call(n.outbound, "GET", "web", "/ok", "").0, 200);
    }
    for _ in 0..2 {
        assert_eq!(call(n.outbound, "GET", "web", "/fail", "").0, 503);
    }

    // Every request, seen outbound and inbound.
    let events: Vec<serde_json::Value> = take(&all, 10)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let count = |dir: &str, status: u64| {
        events
            .iter()
            .filter(|e| e["direction"] == dir && e["status"] == status)
            .count()
    };
    assert_eq!(
        (count("outbound", 200), count("outbound", 503)),
        (3, 2),
        "{events:#?}"
    );
    assert_eq!((count("inbound", 200), count("inbound", 503)), (3, 2));
    for e in &events {
        for k in [
            "time",
            "direction",
            "service",
            "route",
            "endpoint",
            "method",
            "path",
            "status",
            "grpc_status",
            "duration_ms",
        ] {
            assert!(e.get(k).is_some(), "no {k} in {e}");
        }
        assert_eq!(
            (e["service"].as_str(), e["endpoint"].as_str()),
            (Some("web"), Some("n1"))
        );
    }
    // The 5xx filter: the two failures, both ways, as lines.
    // Each event was logged (had it been) before it was tapped.
    assert_eq!(access_lines(&n).len(), 0, "--access-log off");
    let lines = take(&failures, 4);
    for l in &lines {
        assert!(
            l.contains("web->web") && l.contains("status=503") && l.contains("/fail"),
            "{l}"
        );
    }
    assert!(
        failures.recv_timeout(Duration::from_millis(300)).is_err(),
        "no successes pass the 5xx filter"
    );
    assert!(
        other.recv_timeout(Duration::from_millis(300)).is_err(),
        "nothing from or to `other` happened"
    );

    // `shoal stat --json` agrees with /metrics.
    let out = shoal(
        &["stat", "--admin", &n.admin.to_string(), "--json"],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["direction"] == "outbound" && r["destination"] == "web")
        .unwrap_or_else(|| panic!("{rows:#}"))
        .clone();
    let (_, metrics) = call(n.admin, "GET", "x", "/metrics", "");
    let sum = |class: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("shoal_proxy_responses_total{direction=\"outbound\"")
                    && l.contains("destination=\"web\"")
                    && l.contains(&format!("classification=\"{class}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (ok, failed) = (sum("success"), sum("failure"));
    assert_eq!(
        row["requests"].as_f64(),
        Some(ok + failed),
        "{row}\n{metrics}"
    );
    assert_eq!(row["failed"].as_f64(), Some(failed));
    assert!((row["success_rate"].as_f64().unwrap() - ok / (ok + failed)).abs() < 1e-9);
    assert!(
        metrics.contains("shoal_proxy_response_bytes_total{direction=\"outbound\",source=\"web\",destination=\"web\",route=\"\"}"),
        "{metrics}"
    );

    // promtool stays clean with every family populated.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus`");
    let body = metrics.split_once("\r\n\r\n").unwrap().1.to_string();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let res = promtool.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );

    // `--watch` into a pipe: a new table every interval.
    let mut watch = Command::new(SHOAL)
        .args(["stat", "--watch", "--admin", &n.admin.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines_of(&mut watch);
    let _watch = Proc(watch);
    let started = Instant::now();
    let mut tables = 0;
    while tables < 2 {
        let l = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a table every 2 s");
        assert!(!l.contains('\x1b'), "no terminal codes into a pipe: {l:?}");
        if l.starts_with("DIRECTION") {
            tables += 1;
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "redrawn every 2 s"
    );
}

#[test]
fn tap_needs_the_token_when_the_node_has_one() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    std::fs::write(dir.path().join("token"), "token-for-tests-0123456789\n").unwrap();
    let app = app();
    let n = start_node(dir.path(), app, &["--admin-token-file", "token"]);
    let admin = n.admin.to_string();
    let out = shoal(&["tap", "--admin", &admin], dir.path());
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let (status, _) = call(n.admin, "GET", "x", "/v1/tap?status=7xx", "");
    assert_eq!(status, 401, "auth is checked before the query");
    routable(&n);
    let (_t, rx) = tap(dir.path(), n.admin, &["--token-file", "token"]);
    assert_eq!(call(n.outbound, "GET", "web", "/fail", "").0, 503);
    assert!(take(&rx, 1)[0].contains("status=503"));
}
