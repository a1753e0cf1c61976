//! Opaque TCP services through the mesh, with real clients and servers:
//! redis-server and redis-cli, a server that speaks first, a half-close
//! echo, a refusing upstream, a serving node killed mid-connection, curl
//! CONNECT to `openssl s_server`, and AuthorizationPolicy by identity.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use node::proxy::{Protocol, ServiceSpec, UpstreamListener};
use node::{Node, NodeConfig};
use tests::eventually;
use tests::traffic::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// How long a close may take to reach the client to count as prompt.
const PROMPT: Duration = Duration::from_secs(5);

// === fixtures ===

/// A config for `name` fronting TCP services.
fn tcp_server(mesh: &Mesh, name: &str, services: &[(&str, SocketAddr)]) -> NodeConfig {
    let names: Vec<&str> = services.iter().map(|(s, _)| *s).collect();
    let mut c = mesh.config(name, &names, &[]);
    for (svc, addr) in services {
        let mut spec = ServiceSpec::new(*svc, *addr, Protocol::Tcp);
        spec.health_interval = Duration::from_millis(100);
        c.proxy.services.push(spec);
    }
    c
}

/// A client node (certificate names `client`) with an outbound listener and
/// an upstream listener for each of `services`.
async fn tcp_client(mesh: &mut Mesh, name: &str, services: &[&str]) -> Node {
    let services: Vec<String> = services.iter().map(|s| s.to_string()).collect();
    mesh.client(name, move |c| {
        for s in services {
            c.proxy.upstreams.push(UpstreamListener {
                service: s,
                listen: "127.0.0.1:0".parse().unwrap(),
            });
        }
    })
    .await
}

/// A free loopback port (for servers that take a port number).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server on a free port, killed on drop.
async fn redis() -> (Child, SocketAddr) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-server (apt install redis-server; .ci/run installs it)");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("redis-server answers", WAIT, || async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut b = [0u8; 7];
        s.read_exact(&mut b).await.ok()?;
        (&b == b"+PONG\r\n").then_some(())
    })
    .await;
    (child, addr)
}

/// Runs redis-cli against `addr` with `args` (and `stdin`); its stdout.
async fn redis_cli(addr: SocketAddr, args: &[&str], stdin: Option<Vec<u8>>) -> String {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("redis-cli (apt install redis-tools; .ci/run installs it)");
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
            let _ = w.shutdown().await;
        });
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("redis-cli finishes")
        .unwrap();
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `node` routes `service` and knows it is a TCP service.
async fn tcp_routable(node: &Node, service: &str, n: usize) {
    routable(node, service, n).await;
    eventually(&format!("{service} is published as tcp"), WAIT, || async {
        node.proxy()
            .services()
            .iter()
            .filter(|s| s.service == service)
            .flat_map(|s| s.endpoints.iter())
            .any(|e| e.record.protocol == "tcp")
            .then_some(())
    })
    .await;
}

/// A server that greets each connection with `banner`, then echoes lines.
async fn banner_server(banner: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                if w.write_all(banner.as_bytes()).await.is_err() {
                    return;
                }
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The first line `s` receives.
async fn greeting(s: &mut TcpStream) -> String {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(WAIT, r.read_line(&mut line))
        .await
        .expect("a greeting")
        .unwrap();
    line
}

/// Reads until `s` is closed (EOF or reset); how long that took.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return t0.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

/// `promtool check metrics` finds nothing wrong with `text`.
async fn promtool_clean(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    let mut stdin = p.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = p.wait_with_output().await.unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of the first metric line starting with `prefix` and holding
/// every one of `labels`.
fn metric(text: &str, prefix: &str, labels: &[&str]) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix) && labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

// === tests ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_ping_a_1mib_value_and_a_10000_command_pipeline() {
    let (_redis, raddr) = redis().await;
    let mut mesh = Mesh::new();
    let server = mesh.start(tcp_server(&mesh, "s1", &[("db", raddr)])).await;
    let client = tcp_client(&mut mesh, "c1", &["db"]).await;
    tcp_routable(&client, "db", 1).await;
    let up = client.upstream_addr("db").unwrap();

    assert_eq!(redis_cli(up, &["PING"], None).await.trim(), "PONG");

    // SET/GET of a 1 MiB value (redis-cli -x takes the last argument from stdin).
    let value: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
    let set = redis_cli(up, &["-x", "SET", "big"], Some(value.clone())).await;
    assert_eq!(set.trim(), "OK");
    let got = redis_cli(up, &["GET", "big"], None).await;
    assert_eq!(got.trim_end().len(), value.len());
    assert!(
        got.trim_end().as_bytes() == value.as_slice(),
        "GET big differs"
    );
    // The server saw exactly those bytes (asked directly, not through the mesh).
    assert_eq!(
        redis_cli(raddr, &["STRLEN", "big"], None).await.trim(),
        (1 << 20).to_string()
    );

    // 10,000 commands in one pipeline (redis-cli --pipe, raw RESP).
    let mut pipe = Vec::new();
    for i in 0..10_000 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        pipe.extend_from_slice(
            format!(
                "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
                k.len(),
                v.len()
            )
            .as_bytes(),
        );
    }
    let out = redis_cli(up, &["--pipe"], Some(pipe)).await;
    assert!(out.contains("errors: 0, replies: 10000"), "{out}");
    assert_eq!(
        redis_cli(raddr, &["GET", "k9999"], None).await.trim(),
        "v9999"
    );
    assert_eq!(redis_cli(raddr, &["DBSIZE"], None).await.trim(), "10001");

    // Counted on both sides, clean, with the bytes.
    let (_, m) = tests::admin_get(client.admin_addr(), "/metrics").await;
    let clean = metric(
        &m,
        "shoal_tcp_connections_closed_total",
        &[
            "direction=\"outbound\"",
            "destination=\"db\"",
            "outcome=\"clean\"",
        ],
    );
    // PING, SET, GET and the pipeline went through the mesh.
    assert_eq!(clean, 4.0, "{m}");
    let to_service = metric(
        &m,
        "shoal_tcp_bytes_total",
        &["direction=\"outbound\"", "flow=\"to_service\""],
    );
    assert!(to_service > (1 << 20) as f64, "{to_service}");
    promtool_clean(&m).await;
    let (_, stats) = tests::admin_get(server.admin_addr(), "/v1/stats/tcp").await;
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let edge = &stats[0];
    assert_eq!(edge["direction"], "inbound", "{stats}");
    assert_eq!(edge["source"], "client", "{stats}");
    assert_eq!(edge["destination"], "db", "{stats}");
    assert!(
        edge["bytes_from_service"].as_u64().unwrap() > 1 << 20,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_speaks_first_and_a_half_close_echo() {
    let banner = banner_server("220 banner ready\r\n").await;
    // Reads to the client's end of file, then answers it all reversed.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rev = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut all = Vec::new();
                if s.read_to_end(&mut all).await.is_ok() {
                    all.reverse();
                    let _ = s.write_all(&all).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let mut mesh = Mesh::new();
    let _server = mesh
        .start(tcp_server(&mesh, "s1", &[("banner", banner), ("rev", rev)]))
        .await;
    let client = tcp_client(&mut mesh, "c1", &["banner", "rev"]).await;
    tcp_routable(&client, "banner", 1).await;
    tcp_routable(&client, "rev", 1).await;

    // The banner arrives without the client sending a byte.
    let mut s = TcpStream::connect(client.upstream_addr("banner").unwrap())
        .await
        .unwrap();
    let mut lines = BufReader::new(&mut s);
    let mut line = String::new();
    tokio::time::timeout(WAIT, lines.read_line(&mut line))
        .await
        .expect("the banner arrives")
        .unwrap();
    assert_eq!(line, "220 banner ready\r\n");
    s.write_all(b"HELO mesh\n").await.unwrap();
    let mut lines = BufReader::new(&mut s);
    let mut line = String::new();
    tokio::time::timeout(WAIT, lines.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, "HELO mesh\n");

    // Half-close: the client shuts its write side and still reads the answer.
    let data: Vec<u8> = (0..3 << 20).map(|i| (i % 251) as u8).collect();
    let mut s = TcpStream::connect(client.upstream_addr("rev").unwrap())
        .await
        .unwrap();
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, read) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(send, r.read_to_end(&mut back))
    })
    .await
    .expect("the answer arrives after the half-close");
    read.unwrap();
    let mut want = data.clone();
    want.reverse();
    assert_eq!(back.len(), want.len());
    assert!(back == want, "reversed bytes differ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_upstream_closes_the_client_promptly_and_is_counted() {
    // Health checks pass against a listener that is then closed: the
    // endpoint stays published for a moment while connects are refused.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut mesh = Mesh::new();
    let mut cfg = tcp_server(&mesh, "s1", &[("db", addr)]);
    cfg.proxy.services[0].health_interval = Duration::from_secs(30);
    let server = mesh.start(cfg).await;
    let client = tcp_client(&mut mesh, "c1", &["db"]).await;
    tcp_routable(&client, "db", 1).await;
    drop(l);
    let up = client.upstream_addr("db").unwrap();
    for _ in 0..3 {
        let mut s = TcpStream::connect(up).await.unwrap();
        let took = closed_within(&mut s, PROMPT)
            .await
            .expect("the client's connection is closed promptly");
        eprintln!("refused connection closed after {took:?}");
    }
    let (_, m) = tests::admin_get(client.admin_addr(), "/metrics").await;
    let refused = metric(
        &m,
        "shoal_tcp_connections_closed_total",
        &["direction=\"outbound\"", "outcome=\"refused\""],
    );
    assert!(refused >= 3.0, "{m}");
    let (_, m) = tests::admin_get(server.admin_addr(), "/metrics").await;
    let refused = metric(
        &m,
        "shoal_tcp_connections_closed_total",
        &["direction=\"inbound\"", "outcome=\"refused\""],
    );
    assert!(refused >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_serving_node_closes_the_connection_and_the_next_goes_to_the_other() {
    let b2 = banner_server("hello from s2\n").await;
    let b3 = banner_server("hello from s3\n").await;
    let mut mesh = Mesh::new();
    let s2 = mesh.start(tcp_server(&mesh, "s2", &[("greet", b2)])).await;
    let s3 = mesh.start(tcp_server(&mesh, "s3", &[("greet", b3)])).await;
    let client = tcp_client(&mut mesh, "c1", &["greet"]).await;
    tcp_routable(&client, "greet", 2).await;
    let up = client.upstream_addr("greet").unwrap();

    let mut s = TcpStream::connect(up).await.unwrap();
    let first = greeting(&mut s).await;
    let (victim, other) = if first.contains("s2") {
        (s2, s3)
    } else {
        assert!(first.contains("s3"), "{first}");
        (s3, s2)
    };
    let victim_name = victim.name().to_string();
    victim.kill().await;
    let took = closed_within(&mut s, PROMPT)
        .await
        .expect("killing the serving node closes the client's connection promptly");
    eprintln!("connection to the killed {victim_name} closed after {took:?}");

    let mut s = TcpStream::connect(up).await.unwrap();
    let next = greeting(&mut s).await;
    assert!(
        next.contains(other.name()),
        "the next connection goes to {}: {next}",
        other.name()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_connect_reaches_a_tls_service_and_a_non_service_gets_503() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=tls", "-addext", "subjectAltName=DNS:tls"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .expect("openssl");
    assert!(made.success());
    let port = free_port();
    let _tls = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("openssl s_server");
    let taddr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("s_server listens", WAIT, || async {
        TcpStream::connect(taddr).await.ok().map(|_| ())
    })
    .await;
    let mut mesh = Mesh::new();
    let _server = mesh.start(tcp_server(&mesh, "s1", &[("tls", taddr)])).await;
    let client = tcp_client(&mut mesh, "c1", &[]).await;
    tcp_routable(&client, "tls", 1).await;
    let out = client.outbound_addr().unwrap();

    let curl = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(&cert)
        .args(["-p", "-x", &format!("http://{out}"), "https://tls:443/"])
        .output()
        .await
        .expect("curl");
    let body = String::from_utf8_lossy(&curl.stdout);
    assert!(
        curl.status.success(),
        "curl: {:?} {}",
        curl.status,
        String::from_utf8_lossy(&curl.stderr)
    );
    // s_server -www answers with its session report over TLS.
    assert!(body.contains("s_server"), "{body}");
    assert!(body.contains("Cipher"), "{body}");

    // A host that is not a mesh service: 503 unknown-service, nothing tunnelled.
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"CONNECT nowhere.example:443 HTTP/1.1\r\nHost: nowhere.example:443\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, s.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 503"), "{head}");
    assert!(head.contains("shoal-error: unknown-service"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_by_identity_admits_or_closes_tcp_connections() {
    let (_redis, raddr) = redis().await;
    let mut mesh = Mesh::new();
    let server = mesh.start(tcp_server(&mesh, "s1", &[("db", raddr)])).await;
    let client = tcp_client(&mut mesh, "c1", &["db"]).await;
    tcp_routable(&client, "db", 1).await;
    let up = client.upstream_addr("db").unwrap();
    assert_eq!(redis_cli(up, &["PING"], None).await.trim(), "PONG");
    let push = |name: &'static str, doc: String| {
        let (mesh, server) = (&mesh, &server);
        async move {
            let (status, body) = mesh
                .pki
                .operator("alice")
                .put(
                    server.admin_addr(),
                    "AuthorizationPolicy",
                    name,
                    &doc,
                    "",
                    &[],
                )
                .await;
            assert!(status == 200 || status == 201, "{status} {body}");
        }
    };
    let policy = |from: &str, extra: &str| {
        format!(
            "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: db-acl}}\nspec:\n  target: db\n  rules:\n  - from: [{from}]\n{extra}"
        )
    };
    // Only `api` may connect: the client (`client`) is closed at once.
    push("db-acl", policy("api", "")).await;
    let denied = || async {
        let mut s = TcpStream::connect(up).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut b = Vec::new();
        let _ = tokio::time::timeout(PROMPT, s.read_to_end(&mut b))
            .await
            .ok()?;
        b.is_empty().then_some(())
    };
    eventually("the client is denied", WAIT, denied).await;
    // A rule naming the client but with paths cannot admit a TCP connection.
    push("db-acl", policy("client", "    paths: [/]\n")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually("still denied with a paths rule", WAIT, denied).await;
    // An identity-only rule naming the client admits it.
    push("db-acl", policy("client", "")).await;
    eventually("the client is admitted", WAIT, || async {
        let mut s = TcpStream::connect(up).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut b = [0u8; 7];
        tokio::time::timeout(PROMPT, s.read_exact(&mut b))
            .await
            .ok()?
            .ok()?;
        (&b == b"+PONG\r\n").then_some(())
    })
    .await;
    let (_, m) = tests::admin_get(server.admin_addr(), "/metrics").await;
    assert!(
        metric(
            &m,
            "shoal_tcp_connections_closed_total",
            &["direction=\"inbound\"", "outcome=\"denied\""]
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            "shoal_policy_denied_total",
            &["service=\"db\"", "authorization"]
        ) >= 1.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_caller_keeps_open_tcp_connections_until_they_close() {
    let echo = banner_server("ready\n").await;
    let mut mesh = Mesh::new();
    let _server = mesh.start(tcp_server(&mesh, "s1", &[("echo", echo)])).await;
    let services = ["echo".to_string()];
    let client = mesh
        .client("c1", move |c| {
            c.proxy.drain_timeout = Duration::from_secs(20);
            for s in services {
                c.proxy.upstreams.push(UpstreamListener {
                    service: s,
                    listen: "127.0.0.1:0".parse().unwrap(),
                });
            }
        })
        .await;
    tcp_routable(&client, "echo", 1).await;
    let mut s = TcpStream::connect(client.upstream_addr("echo").unwrap())
        .await
        .unwrap();
    assert_eq!(greeting(&mut s).await, "ready\n");
    assert_eq!(
        client.proxy().in_flight(),
        1,
        "the open connection is in flight"
    );
    let t0 = Instant::now();
    let drain = tokio::spawn(client.drain());
    // While the node drains, the open connection keeps working.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!drain.is_finished(), "the drain waits for the connection");
    s.write_all(b"still here\n").await.unwrap();
    assert_eq!(greeting(&mut s).await, "still here\n");
    // Closing it lets the drain finish with nothing cut off.
    drop(s);
    let left = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain ends once the connection closed")
        .unwrap();
    assert_eq!(left, 0);
    assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_its_own_tcp_service_directly_and_idle_connections_close() {
    let greet = banner_server("hello from here\n").await;
    let mut mesh = Mesh::new();
    let mut cfg = tcp_server(&mesh, "s1", &[("greet", greet)]);
    cfg.proxy.tcp_idle_timeout = Duration::from_millis(700);
    cfg.proxy.upstreams.push(UpstreamListener {
        service: "greet".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
    });
    let node = mesh.start(cfg).await;
    tcp_routable(&node, "greet", 1).await;
    let mut s = TcpStream::connect(node.upstream_addr("greet").unwrap())
        .await
        .unwrap();
    assert_eq!(greeting(&mut s).await, "hello from here\n");
    s.write_all(b"echo\n").await.unwrap();
    assert_eq!(greeting(&mut s).await, "echo\n");
    // Silent for the idle timeout: the node closes it.
    let took = closed_within(&mut s, PROMPT)
        .await
        .expect("an idle connection is closed");
    assert!(took >= Duration::from_millis(500), "{took:?}");
    let (_, m) = tests::admin_get(node.admin_addr(), "/metrics").await;
    assert_eq!(
        metric(
            &m,
            "shoal_tcp_connections_closed_total",
            &["direction=\"outbound\"", "outcome=\"idle\""]
        ),
        1.0,
        "{m}"
    );
}

/// A `tcp://` service whose address is another node's `--upstream`
/// listener for the same service (the sidecar's port given where the app's
/// belongs): each connection went from the listener's node to the serving
/// node, which dialled the listener again, and so on, with nothing logged,
/// until both ran out of descriptors (the health checks alone started a new
/// chain every interval; two real nodes gained about 50 descriptors a second
/// each). The serving node sees that the app connection came from its own
/// dial, refuses it (`forwarding-loop`) and says so; the chain stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_pointed_at_another_nodes_listener_for_it_is_a_refused_loop() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut mesh = Mesh::new();
    let server = mesh
        .start(tcp_server(&mesh, "s1", &[("bulk", listen)]))
        .await;
    let client = mesh
        .client("c1", move |c| {
            c.proxy.upstreams.push(UpstreamListener {
                service: "bulk".into(),
                listen,
            })
        })
        .await;
    tcp_routable(&client, "bulk", 1).await;

    let mut s = TcpStream::connect(listen).await.unwrap();
    let _ = s.write_all(b"ping\n").await;
    closed_within(&mut s, PROMPT)
        .await
        .expect("the looping connection is closed");
    eventually("s1 counts a refused loop", WAIT, || async {
        let (_, m) = tests::admin_get(server.admin_addr(), "/metrics").await;
        let loops = metric(
            &m,
            "shoal_tcp_connections_closed_total",
            &["direction=\"inbound\"", "outcome=\"forwarding_loop\""],
        );
        (loops >= 1.0).then_some(())
    })
    .await;
    // Every 100 ms a health check starts a chain; none may grow. Looping,
    // the open connections climbed into the hundreds within a second.
    let open = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("shoal_tcp_connections_open{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut most = 0.0f64;
    for _ in 0..20 {
        for n in [&server, &client] {
            let (_, m) = tests::admin_get(n.admin_addr(), "/metrics").await;
            most = most.max(open(&m));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        most <= 8.0,
        "{most} TCP connections open at once on one node"
    );
}
