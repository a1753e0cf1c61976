//! The `shoal` binary tied to an app's life, as a Job or an entrypoint uses
//! it: `shoal run`, `shoal await`, `POST /shutdown`, `shoal check`,
//! `shoal cert renew` picked up by a running node, seed warnings, and logs
//! and errors as a user reads them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

/// A `shoal node` process and its addresses.
struct NodeProc {
    proc: Proc,
    quic: SocketAddr,
    admin: SocketAddr,
}

fn shoal(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(SHOAL)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_certs(dir: &Path, names: &[&str]) {
    ok(&shoal(
        &[
            "cert",
            "init",
            "--out",
            "certs",
            "--trust-domain",
            "demo.shoal",
        ],
        dir,
    ));
    for n in names {
        let out = format!("certs/{n}");
        ok(&shoal(
            &[
                "cert",
                "issue",
                "--ca",
                "certs",
                "--name",
                n,
                "--service",
                "web",
                "--out",
                &out,
            ],
            dir,
        ));
    }
}

fn node_args<'a>(name: &'a str, certs: &'a str) -> Vec<&'a str> {
    vec![
        "--name",
        name,
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--certs",
        certs,
        "--gossip-interval",
        "100ms",
    ]
}

/// Starts `shoal node NAME` with `extra` flags and reads its ready line.
fn start_node(dir: &Path, name: &str, extra: &[&str]) -> NodeProc {
    let certs = format!("certs/{name}");
    let mut child = Command::new(SHOAL)
        .current_dir(dir)
        .arg("node")
        .args(node_args(name, &certs))
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let field = |k: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .parse()
            .unwrap()
    };
    NodeProc {
        quic: field("quic="),
        admin: field("admin="),
        proc: Proc(child),
    }
}

/// One HTTP/1.1 request; `(0, "")` if nothing answers.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &str) -> (u16, String) {
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{headers}Connection: close\r\n\r\n"
    );
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, "")
}

fn state_of(admin: SocketAddr, name: &str) -> Option<String> {
    let members: Vec<serde_json::Value> =
        serde_json::from_str(&get(admin, "/v1/members").1).ok()?;
    members
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["state"].as_str().map(str::to_string))
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the child to exit, up to `deadline`.
fn wait_exit(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            start.elapsed() < deadline,
            "process still running after {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn run_starts_the_app_once_ready_and_exits_with_its_code_leaving_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n0", "n1"]);
    let n0 = start_node(dir.path(), "n0", &[]);
    let seed = n0.quic.to_string();
    // The app asks its node's /readyz once, first thing, then reports
    // what it was given.
    let script = "echo readyz=$(curl -s -o /dev/null -w '%{http_code}' http://$SHOAL_ADMIN/readyz); \
         echo \"outbound=$SHOAL_OUTBOUND proxy=$http_proxy\"; exit 7";
    let mut args = vec!["run"];
    args.extend(node_args("n1", "certs/n1"));
    args.extend(["--seed", &seed, "--", "sh", "-c", script]);
    let mut child = Command::new(SHOAL)
        .args(&args)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(20));
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(7), "{out}\n{err}");
    assert!(out.contains("readyz=200"), "{out}\n{err}");
    let outbound = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("outbound="))
        .unwrap_or_else(|| panic!("{out}"));
    let addr: SocketAddr = outbound.parse().unwrap();
    assert!(out.contains(&format!("proxy=http://{addr}")), "{out}");
    // Drained and left: n0 sees n1 `left`, not `dead`.
    wait_until("n0 sees n1 left", Duration::from_secs(5), || {
        state_of(n0.admin, "n1").as_deref() == Some("left")
    });
    assert!(!err.contains('\u{1b}'), "ANSI codes in piped logs: {err:?}");
    // A peer met for the first time is logged as joined, not as dead first.
    assert!(err.contains("member joined member=n0"), "{err}");
    assert!(!err.contains("to=dead"), "{err}");
}

#[test]
fn run_forwards_sigterm_to_the_app_and_returns_its_code() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    let script = "trap 'echo got-term; exit 3' TERM; echo started; while :; do sleep 0.05; done";
    let mut args = vec!["run"];
    args.extend(node_args("n1", "certs/n1"));
    args.extend(["--", "sh", "-c", script]);
    let mut child = Command::new(SHOAL)
        .args(&args)
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "started");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("got-term"), "{rest}");
    assert_eq!(status.code(), Some(3));
}

#[test]
fn await_waits_for_readyz_and_times_out_naming_the_address() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    let n1 = start_node(dir.path(), "n1", &[]);
    let out = shoal(
        &[
            "await",
            "--admin",
            &n1.admin.to_string(),
            "--timeout",
            "10s",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");

    // Nothing listens there: a closed port.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let started = Instant::now();
    let out = shoal(
        &[
            "await",
            "--admin",
            &closed.to_string(),
            "--timeout",
            "300ms",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.contains(&closed.to_string()) && err.contains("not ready after 300ms"),
        "{err}"
    );

    // A node that cannot join (its seed is not there) says why.
    let n2 = {
        make_more(dir.path(), "n2");
        start_node(dir.path(), "n2", &["--seed", &closed.to_string()])
    };
    let out = shoal(
        &[
            "await",
            "--admin",
            &n2.admin.to_string(),
            "--timeout",
            "500ms",
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("not ready: waiting for a first peer") && err.contains(&closed.to_string()),
        "{err}"
    );
}

fn make_more(dir: &Path, name: &str) {
    let out = format!("certs/{name}");
    ok(&shoal(
        &[
            "cert",
            "issue",
            "--ca",
            "certs",
            "--name",
            name,
            "--service",
            "web",
            "--out",
            &out,
        ],
        dir,
    ));
}

#[test]
fn post_shutdown_needs_the_token_then_drains_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    std::fs::write(dir.path().join("token"), "0123456789abcdef-token\n").unwrap();
    let mut n1 = start_node(dir.path(), "n1", &["--admin-token-file", "token"]);
    assert_eq!(http(n1.admin, "POST", "/shutdown", "").0, 401);
    let (status, _) = http(
        n1.admin,
        "POST",
        "/shutdown",
        "Authorization: Bearer wrong\r\n",
    );
    assert_eq!(status, 403);
    assert_eq!(http(n1.admin, "GET", "/shutdown", "").0, 405);
    assert!(
        n1.proc.0.try_wait().unwrap().is_none(),
        "refused requests stopped it"
    );
    let (status, body) = http(
        n1.admin,
        "POST",
        "/shutdown",
        "Authorization: Bearer 0123456789abcdef-token\r\n",
    );
    assert_eq!(status, 202, "{body}");
    let exit = wait_exit(&mut n1.proc.0, Duration::from_secs(30));
    assert_eq!(exit.code(), Some(0));
}

#[test]
fn check_reports_one_line_per_check_and_fails_on_bad_setup() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1", "n2"]);
    let n1 = start_node(dir.path(), "n1", &[]);
    std::fs::write(dir.path().join("good-token"), "0123456789abcdef").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.path().join("good-token"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let seed = n1.quic.to_string();
    let mut args = vec!["check"];
    args.extend(node_args("n2", "certs/n2"));
    args.extend([
        "--seed",
        &seed,
        "--data-dir",
        "state/n2",
        "--admin-token-file",
        "good-token",
    ]);
    let out = shoal(&args, dir.path());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    for want in [
        "ok    certificates: node n2 (services web, trust domain demo.shoal) chains to the CA",
        "ok    ports: free",
        "QUIC handshake with node n1",
        &format!("ok    clock vs {seed} ({seed}): peer clock "),
        "ok    data dir: state/n2 will be created",
        "ok    admin token:",
    ] {
        assert!(text.contains(want), "{want:?} missing in:\n{text}");
    }
    // Both processes read this host's one clock: the measured offset must be
    // within the probe's own uncertainty of zero (generously: 250 ms).
    let offset: f64 = text
        .lines()
        .find_map(|l| l.split("peer clock ").nth(1))
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no clock offset in:\n{text}"));
    assert!(
        offset.abs() < 250.0,
        "offset {offset} ms on one host:\n{text}"
    );
    assert!(
        !dir.path().join("state").exists(),
        "check created the data dir"
    );

    // A port in use, a seed that does not answer, a short token, a
    // certificate that names another node.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_addr = busy.local_addr().unwrap().to_string();
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::fs::write(dir.path().join("short-token"), "tooshort").unwrap();
    let out = shoal(
        &[
            "check",
            "--name",
            "n2",
            "--certs",
            "certs/n2",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            &busy_addr,
            "--seed",
            &silent_addr,
            "--admin-token-file",
            "short-token",
        ],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("FAIL  ports: {busy_addr}/tcp (admin)")),
        "{text}"
    );
    assert!(
        text.contains(&format!("FAIL  seed {silent_addr}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("skip  clock vs {silent_addr}")),
        "{text}"
    );
    assert!(
        text.contains("FAIL  admin token:") && text.contains("8 characters; at least 16"),
        "{text}"
    );
    let out = shoal(
        &["check", "--name", "n1", "--certs", "certs/n2"],
        dir.path(),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL  certificates:") && text.contains("names node \"n2\""),
        "{text}"
    );
    drop(n1);
}

#[test]
fn cert_renew_is_picked_up_by_the_running_node_and_shows_in_the_expiry_metric() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    let n1 = start_node(dir.path(), "n1", &[]);
    let node_expiry =
        "shoal_cert_expiry_timestamp_seconds{cert=\"node\",id=\"spiffe://demo.shoal/node/n1\"}";
    let ca_expiry = "shoal_cert_expiry_timestamp_seconds{cert=\"ca\",id=\"spiffe://demo.shoal\"}";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let body = get(n1.admin, "/metrics").1;
    let before = metric(&body, node_expiry).unwrap_or_else(|| panic!("{body}"));
    assert!(
        (before - (now + 365.0 * 86400.0)).abs() < 7200.0,
        "{before}"
    );
    let ca = metric(&body, ca_expiry).unwrap_or_else(|| panic!("{body}"));
    assert!((ca - (now + 3650.0 * 86400.0)).abs() < 7200.0, "{ca}");

    let out = ok(&shoal(
        &[
            "cert", "renew", "--ca", "certs", "--certs", "certs/n1", "--days", "10",
        ],
        dir.path(),
    ));
    assert!(out.contains("for node n1 (services web)"), "{out}");
    // The node's own hot reload takes it (its counter, not ours).
    wait_until("reloaded", Duration::from_secs(15), || {
        let body = get(n1.admin, "/metrics").1;
        metric(&body, "shoal_cert_reloads_total{result=\"ok\"}").unwrap_or(0.0) >= 1.0
    });
    let body = get(n1.admin, "/metrics").1;
    let after = metric(&body, node_expiry).unwrap();
    assert!((after - (now + 10.0 * 86400.0)).abs() < 7200.0, "{after}");
    // And a new peer completes a handshake with the renewed certificate.
    make_more(dir.path(), "n2");
    let seed = n1.quic.to_string();
    let n2 = start_node(dir.path(), "n2", &["--seed", &seed]);
    wait_until("n2 joins n1", Duration::from_secs(10), || {
        state_of(n1.admin, "n2").as_deref() == Some("alive")
    });
    drop(n2);
}

#[test]
fn an_unreachable_seed_is_a_warn_line_naming_it_without_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let seed = silent.local_addr().unwrap().to_string();
    let mut args = vec!["node"];
    args.extend(node_args("n1", "certs/n1"));
    args.extend(["--seed", &seed]);
    let mut child = Proc(
        Command::new(SHOAL)
            .args(&args)
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = BufReader::new(child.0.stderr.take().unwrap());
    let started = Instant::now();
    let mut warns = 0;
    for line in stderr.lines() {
        let line = line.unwrap();
        assert!(
            !line.contains('\u{1b}'),
            "ANSI codes in piped logs: {line:?}"
        );
        if line.contains("WARN") && line.contains("seed unreachable") && line.contains(&seed) {
            warns += 1;
            if warns == 2 {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no repeated WARN naming {seed}"
        );
    }
    // Repeated every few seconds, not once.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[test]
fn policy_commands_name_the_admin_address_they_could_not_reach() {
    let dir = tempfile::tempdir().unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    for cmd in ["list", "status"] {
        let out = shoal(&["policy", cmd, "--admin", &closed], dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("admin API at {closed}")),
            "{cmd}: {err}"
        );
    }
}
