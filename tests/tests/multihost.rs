//! The real multi-host shape: three `shoal` processes, each in its own
//! network namespace with its own address on a veth bridge this test creates
//! (no loopback between nodes), seeded by one DNS-style name that resolves to
//! several addresses (`/etc/netns/<ns>/hosts`, which `ip netns exec` mounts
//! over /etc/hosts). It shows join, traffic from an app on one host to an
//! app on another, the seed name being resolved again (a host whose name
//! first pointed nowhere joins once the name is fixed), and a departure seen
//! by the others.
//!
//! Needs root and `ip netns`; prints why and passes without checking
//! anything otherwise (CI runs as root).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tests::{Pki, admin_get, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SEED_NAME: &str = "seeds.shoal.test";
const QUIC_PORT: u16 = 7000;
const ADMIN_PORT: u16 = 9000;
const OUTBOUND_PORT: u16 = 4140;
const APP_PORT: u16 = 8080;

/// Why this machine cannot run the test, if it cannot.
fn unsupported() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Some(format!(
                "`ip netns list` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Err(e) => return Some(format!("`ip` not available: {e}")),
    }
    if Command::new("python3").arg("--version").output().is_err() {
        return Some("python3 (the stand-in app) not available".into());
    }
    None
}

/// The `shoal` binary of this build: cargo puts it beside the `deps` folder
/// this test runs from (`cargo test --workspace` builds it, for node's own
/// tests). Built here only if missing: a nested `cargo build -p node` would
/// resolve features differently and rebuild half the tree every run.
fn shoal_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf();
    let bin = profile_dir.join("shoal");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "node", "--bin", "shoal"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "cargo build -p node --bin shoal failed");
    }
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bin) < modified(&exe) {
        println!(
            "note: {} is older than this test; `cargo build -p node` if node changed",
            bin.display()
        );
    }
    println!("using {}", bin.display());
    bin
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Namespaces, veths, the bridge, hosts files and processes, torn down on
/// drop (also when an assertion fails half-way).
struct Net {
    id: String,
    subnet: u8,
    namespaces: Vec<String>,
    bridge: String,
    children: Vec<(String, Child)>,
}

impl Net {
    fn new() -> Net {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        // Tests of one binary run at once: each gets its own subnet.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:x}", (std::process::id() ^ nanos ^ n) & 0xfffff);
        let subnet = ((std::process::id() + n * 97) % 200 + 20) as u8;
        Net {
            bridge: format!("shbr{id}"),
            id,
            subnet,
            namespaces: Vec::new(),
            children: Vec::new(),
        }
    }

    fn ip(&self, host: u8) -> String {
        format!("10.77.{}.{}", self.subnet, host)
    }

    fn bridge_up(&self) {
        run(&["ip", "link", "add", &self.bridge, "type", "bridge"]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", self.ip(1)),
            "dev",
            &self.bridge,
        ]);
        run(&["ip", "link", "set", &self.bridge, "up"]);
    }

    /// Adds namespace `i` (1-based) at 10.77.S.(i+1), plugged into the bridge.
    fn add_host(&mut self, i: u8) -> String {
        let ns = format!("shoal-{}-{i}", self.id);
        run(&["ip", "netns", "add", &ns]);
        self.namespaces.push(ns.clone());
        let host_side = format!("shv{}{i}", self.id);
        let ns_side = format!("shp{}{i}", self.id);
        run(&[
            "ip", "link", "add", &host_side, "type", "veth", "peer", "name", &ns_side,
        ]);
        run(&["ip", "link", "set", &ns_side, "netns", &ns]);
        run(&["ip", "link", "set", &host_side, "master", &self.bridge]);
        run(&["ip", "link", "set", &host_side, "up"]);
        let addr = format!("{}/24", self.ip(i + 1));
        run(&[
            "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &ns_side,
        ]);
        run(&[
            "ip", "netns", "exec", &ns, "ip", "link", "set", &ns_side, "up",
        ]);
        run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        ns
    }

    /// Writes `/etc/netns/<ns>/hosts` so [`SEED_NAME`] resolves to `addrs`
    /// inside `ns`. Rewritten in place: `ip netns exec` bind-mounts the
    /// file, so a new inode would not be seen by running processes.
    fn set_seeds(&self, ns: &str, addrs: &[String]) {
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir).expect("mkdir /etc/netns/<ns>");
        let mut text = String::from("127.0.0.1 localhost\n");
        for a in addrs {
            text.push_str(&format!("{a} {SEED_NAME}\n"));
        }
        std::fs::write(dir.join("hosts"), text).expect("write hosts");
    }

    fn spawn(&mut self, label: &str, ns: &str, argv: &[String], log: &Path) {
        let log = std::fs::File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn in namespace");
        self.children.push((label.to_string(), child));
    }

    /// Sends SIGTERM to the process called `label` and waits for it to exit.
    fn terminate(&mut self, label: &str) {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(l, _)| l == label)
            .expect("known process");
        run(&["kill", "-TERM", &child.id().to_string()]);
        let end = Instant::now() + Duration::from_secs(40);
        while child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < end, "{label} did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            // Deleting the namespace deletes its veth end, and so the pair.
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .status();
    }
}

/// GET `path` with `Host: host` from `addr`; status and body.
async fn get(addr: SocketAddr, host: &str, path: &str) -> Option<(u16, String)> {
    let (status, body) = get_bytes(addr, host, path, Duration::from_secs(5)).await?;
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GET `path` with `Host: host` from `addr`, all within `limit`; status and
/// body bytes.
async fn get_bytes(
    addr: SocketAddr,
    host: &str,
    path: &str,
    limit: Duration,
) -> Option<(u16, Vec<u8>)> {
    tokio::time::timeout(limit, async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some((status, buf.split_off(end + 4)))
    })
    .await
    .ok()
    .flatten()
}

/// One counter's value in a node's `/metrics`, if the node answers.
async fn metric(admin: SocketAddr, name: &str) -> Option<u64> {
    let (code, text) = get(admin, &admin.to_string(), "/metrics").await?;
    if code != 200 {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// A send that finds the UDP socket's buffer full must wait for it to drain
/// and then go out: not spin on `EAGAIN`, not stall. A loopback send never
/// fills the buffer (the packet leaves the sender's account at once), so
/// this test shapes a namespace's loopback with a token bucket whose queue
/// holds far more than the socket's buffer: the packets queued there stay
/// charged to the sender, and a fast QUIC sender fills its buffer for real.
/// Two nodes in that namespace carry 4 MiB from the app to the caller.
#[tokio::test]
async fn sends_that_find_the_udp_buffer_full_wait_for_it_and_lose_nothing() {
    if let Some(why) = unsupported() {
        println!("SKIPPED multihost: {why}");
        return;
    }
    let shoal = shoal_binary();
    let pki = Pki::new("backpressure.shoal");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut net = Net::new();
    net.bridge_up();
    let ns = net.add_host(1);
    let ip = net.ip(2);
    // UDP (QUIC) on the loopback is held to 20 Mbit/s with a queue of up
    // to 10,000 packets, far more than the socket's buffer, so nothing is
    // dropped and every packet queued counts against the sending socket.
    // TCP (the app's answer into b) is not held back, so b always has more
    // to send than the link takes.
    let tc = |args: &str| {
        let mut argv = vec!["ip", "netns", "exec", &ns, "tc"];
        argv.extend(args.split(' '));
        run(&argv);
    };
    tc("qdisc add dev lo root handle 1: htb default 20 r2q 1000");
    tc("class add dev lo parent 1: classid 1:10 htb rate 20mbit ceil 20mbit burst 64k");
    tc("class add dev lo parent 1: classid 1:20 htb rate 10gbit ceil 10gbit");
    tc("qdisc add dev lo parent 1:10 handle 10: pfifo limit 10000");
    tc("filter add dev lo parent 1: protocol ip u32 match ip protocol 17 0xff flowid 1:10");

    const SIZE: usize = 4 << 20;
    let app_root = logs.path().join("app");
    std::fs::create_dir_all(&app_root).unwrap();
    let body: Vec<u8> = (0..SIZE)
        .map(|i| b"0123456789abcdefghijklmnopqrstuvwxyz"[(i * 7 + i / 4093) % 36])
        .collect();
    std::fs::write(app_root.join("big"), &body).unwrap();
    net.spawn(
        "app",
        &ns,
        &[
            "python3".into(),
            "-m".into(),
            "http.server".into(),
            APP_PORT.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            app_root.display().to_string(),
        ],
        &logs.path().join("app.log"),
    );
    // b serves the app; a is where the caller comes in. They reach each
    // other on the namespace's loopback, through the token bucket.
    let node = |name: &str, n: u16, services: &[&str]| -> Vec<String> {
        vec![
            shoal.display().to_string(),
            "node".into(),
            format!("--name={name}"),
            format!("--certs={}", pki.issue(name, services).display()),
            format!("--listen=127.0.0.1:{}", QUIC_PORT + n),
            format!("--admin={ip}:{}", ADMIN_PORT + n),
            format!("--outbound={ip}:{OUTBOUND_PORT}"),
            format!("--seed=127.0.0.1:{}", QUIC_PORT + 3 - n),
            "--gossip-interval=200ms".into(),
        ]
    };
    let mut b = node("b", 2, &["web"]);
    b.push(format!("--service=web=127.0.0.1:{APP_PORT}"));
    // Only a has the outbound port (one listener per address and port).
    b.retain(|a| !a.starts_with("--outbound"));
    net.spawn("b", &ns, &b, &logs.path().join("b.log"));
    net.spawn("a", &ns, &node("a", 1, &[]), &logs.path().join("a.log"));
    let admin_b: SocketAddr = format!("{ip}:{}", ADMIN_PORT + 2).parse().unwrap();
    let outbound: SocketAddr = format!("{ip}:{OUTBOUND_PORT}").parse().unwrap();

    eventually("a routes to web", Duration::from_secs(60), || async move {
        let (code, _) = get(outbound, "web", "/missing").await?;
        (code == 404).then_some(())
    })
    .await;
    let before = metric(admin_b, "shoal_quic_udp_sends_blocked_total")
        .await
        .expect("b's metrics list blocked UDP sends");

    let started = Instant::now();
    let tail = |name: &str| {
        let text = std::fs::read_to_string(logs.path().join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };
    let (code, got) = get_bytes(outbound, "web", "/big", Duration::from_secs(90))
        .await
        .unwrap_or_else(|| {
            panic!(
                "the 4 MiB answer did not arrive within 90 s\n--- a ---\n{}\n--- b ---\n{}",
                tail("a.log"),
                tail("b.log")
            )
        });
    println!("4 MiB through the shaped mesh in {:?}", started.elapsed());
    assert_eq!(code, 200);
    assert_eq!(got.len(), SIZE, "bytes lost or added");
    assert!(got == body, "the answer's bytes differ from the file's");

    let blocked = metric(admin_b, "shoal_quic_udp_sends_blocked_total")
        .await
        .expect("b answers /metrics")
        - before;
    println!("b's UDP sends that found the buffer full: {blocked}");
    assert!(
        blocked > 0,
        "the shaped loopback never filled b's send buffer"
    );
    // Each blocked send waits for the buffer to drain before it is tried
    // again, so there are at most as many as datagrams (about 1.2 KB each);
    // a sender that spun on EAGAIN would count millions.
    assert!(
        blocked < (SIZE / 1000) as u64,
        "{blocked} blocked sends for {SIZE} bytes: spinning on a full buffer"
    );
    // The connection is still good for the next request.
    let (code, small) = get(outbound, "web", "/missing")
        .await
        .expect("next request");
    assert_eq!(code, 404, "{small}");
}

/// Name → state, as the node at `admin` lists its members, if it answers.
async fn states(admin: SocketAddr) -> Option<Vec<(String, String, String)>> {
    let (code, body) = get(admin, &admin.to_string(), "/v1/members").await?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut out: Vec<(String, String, String)> = v
        .as_array()?
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("").to_string(),
                m["state"].as_str().unwrap_or("").to_string(),
                m["addr"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    out.sort();
    Some(out)
}

fn alive_names(list: &[(String, String, String)]) -> Vec<String> {
    list.iter()
        .filter(|(_, s, _)| s == "alive")
        .map(|(n, _, _)| n.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_in_namespaces_join_route_and_see_a_departure() {
    if let Some(why) = unsupported() {
        println!("SKIPPED multihost: {why}");
        return;
    }
    let shoal = shoal_binary();
    let pki = Pki::new("multihost.shoal");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut net = Net::new();
    net.bridge_up();
    let ns: Vec<String> = (1..=3).map(|i| net.add_host(i)).collect();
    let subnet = net.subnet;
    let ip = move |i: u8| format!("10.77.{subnet}.{}", i + 1);
    let (ip1, ip2, ip3) = (ip(1), ip(2), ip(3));

    // h1 and h2 find each other through one name naming both of them. h3's
    // copy of the name first points at an address where nothing runs (a
    // stale record); it is fixed later, and h3 must notice on its own.
    net.set_seeds(&ns[0], &[ip1.clone(), ip2.clone()]);
    net.set_seeds(&ns[1], &[ip1.clone(), ip2.clone()]);
    net.set_seeds(&ns[2], &[net.ip(99)]);

    // The app on host 3, on that host's loopback only.
    let app_root = logs.path().join("app");
    std::fs::create_dir_all(&app_root).unwrap();
    let token = format!("served-from-h3-{}", net.id);
    std::fs::write(app_root.join("who"), &token).unwrap();
    net.spawn(
        "app",
        &ns[2],
        &[
            "python3".into(),
            "-m".into(),
            "http.server".into(),
            APP_PORT.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--directory".into(),
            app_root.display().to_string(),
        ],
        &logs.path().join("app.log"),
    );

    for (i, name) in ["h1", "h2", "h3"].iter().enumerate() {
        let services: &[&str] = if i == 2 { &["web"] } else { &[] };
        let certs = pki.issue(name, services);
        let addr = ip(i as u8 + 1);
        let mut argv: Vec<String> = vec![
            shoal.display().to_string(),
            "node".into(),
            format!("--name={name}"),
            format!("--certs={}", certs.display()),
            format!("--listen={addr}:{QUIC_PORT}"),
            format!("--admin={addr}:{ADMIN_PORT}"),
            format!("--outbound={addr}:{OUTBOUND_PORT}"),
            format!("--seed={SEED_NAME}:{QUIC_PORT}"),
            "--gossip-interval=200ms".into(),
        ];
        if i == 2 {
            argv.push(format!("--service=web=127.0.0.1:{APP_PORT}"));
        }
        net.spawn(
            name,
            &ns[i],
            &argv,
            &logs.path().join(format!("{name}.log")),
        );
    }
    let admin = |a: &str| -> SocketAddr { format!("{a}:{ADMIN_PORT}").parse().unwrap() };
    let (a1, a2, a3) = (admin(&ip1), admin(&ip2), admin(&ip3));

    // Join: h1 and h2 through the name that names both.
    for a in [a1, a2] {
        eventually(
            "h1 and h2 see each other alive",
            Duration::from_secs(30),
            || async move {
                let list = states(a).await?;
                (alive_names(&list) == ["h1", "h2"]).then_some(())
            },
        )
        .await;
    }
    // Each member is listed at its namespace address, not loopback.
    let list = states(a1).await.expect("members");
    for (name, _, addr) in &list {
        assert!(
            addr.starts_with(&format!("10.77.{}.", net.subnet)),
            "{name} listed at {addr}"
        );
    }
    // h3's seed name points nowhere: it stays alone and unready.
    let alone = eventually("h3 answers", Duration::from_secs(20), || states(a3)).await;
    assert_eq!(alive_names(&alone), ["h3"]);
    let (code, _) = admin_get(a3, "/readyz").await;
    assert_eq!(code, 503, "h3 cannot be ready: its seeds name nobody");

    // The record is fixed (as a headless Service's would be); h3 resolves
    // the name again by itself and joins, well before chitchat's own 60 s
    // re-resolution.
    net.set_seeds(&ns[2], &[ip1.clone(), ip2.clone(), ip3.clone()]);
    let fixed = Instant::now();
    for a in [a1, a2, a3] {
        eventually(
            "all three alive everywhere",
            Duration::from_secs(40),
            || async move {
                let list = states(a).await?;
                (alive_names(&list) == ["h1", "h2", "h3"]).then_some(())
            },
        )
        .await;
    }
    let healed = fixed.elapsed();
    println!("h3 joined {healed:?} after its seed record was fixed");
    assert!(healed < Duration::from_secs(30), "took {healed:?}");
    eventually("h3 ready", Duration::from_secs(20), || async move {
        (admin_get(a3, "/readyz").await.0 == 200).then_some(())
    })
    .await;

    // Traffic: an app on host 1 calls `web` through its node; the answer
    // comes from the app on host 3's loopback, across the bridge.
    let outbound: SocketAddr = format!("{ip1}:{OUTBOUND_PORT}").parse().unwrap();
    let token2 = token.clone();
    eventually("h1 -> mesh -> h3 app", Duration::from_secs(30), || {
        let token = token2.clone();
        async move {
            let (code, body) = get(outbound, "web", "/who").await?;
            (code == 200 && body == token).then_some(())
        }
    })
    .await;
    let outbound2: SocketAddr = format!("{ip2}:{OUTBOUND_PORT}").parse().unwrap();
    let token3 = token.clone();
    eventually("h2 -> mesh -> h3 app", Duration::from_secs(30), || {
        let token = token3.clone();
        async move {
            let (code, body) = get(outbound2, "web", "/who").await?;
            (code == 200 && body == token).then_some(())
        }
    })
    .await;

    // Departure: h2 stops (SIGTERM drains and leaves); h1 and h3 see it go.
    net.terminate("h2");
    for a in [a1, a3] {
        eventually(
            "h2 gone from the others' view",
            Duration::from_secs(30),
            || async move {
                let list = states(a).await?;
                let h2 = list.iter().find(|(n, _, _)| n == "h2");
                (alive_names(&list) == ["h1", "h3"] && h2.is_none_or(|(_, s, _)| s != "alive"))
                    .then_some(())
            },
        )
        .await;
    }
    // Traffic still flows between the two hosts that remain.
    let (code, body) = get(outbound, "web", "/who")
        .await
        .expect("h1 outbound answers");
    assert_eq!((code, body.as_str()), (200, token.as_str()));
}
