//! The `shoal` binary as a user runs it: certificates, real node processes,
//! signals, bad usage, the members table, and promtool on /metrics.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A `shoal node` process, killed on drop.
struct Proc {
    child: Child,
    quic: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

fn shoal(args: &[&str], cwd: &Path) -> std::process::Output {
    Command::new(SHOAL)
        .args(args)
        .current_dir(cwd)
        .output()
        .unwrap()
}

fn make_certs(dir: &Path, names: &[&str]) {
    let out = shoal(
        &[
            "cert",
            "init",
            "--out",
            "certs",
            "--trust-domain",
            "demo.shoal",
        ],
        dir,
    );
    assert!(out.status.success(), "{out:?}");
    for n in names {
        let out = shoal(
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
                &format!("certs/{n}"),
            ],
            dir,
        );
        assert!(out.status.success(), "{out:?}");
    }
}

fn start(dir: &Path, name: &str, listen: &str, seed: Option<SocketAddr>) -> Proc {
    let mut cmd = Command::new(SHOAL);
    cmd.current_dir(dir)
        .args([
            "node",
            "--name",
            name,
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--certs",
            &format!("certs/{name}"),
            "--gossip-interval",
            "100ms",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(s) = seed {
        cmd.args(["--seed", &s.to_string()]);
    }
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    // "shoal node NAME ready quic=ADDR admin=ADDR"
    let field = |k: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
            .parse()
            .unwrap()
    };
    let (quic, admin) = (field("quic="), field("admin="));
    Proc { child, quic, admin }
}

fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(admin) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
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

fn state_of(admin: SocketAddr, name: &str) -> Option<String> {
    let (_, body) = get(admin, "/v1/members");
    let members: Vec<serde_json::Value> = serde_json::from_str(&body).ok()?;
    members
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["state"].as_str().map(str::to_string))
}

fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
fn nodes_join_leave_on_sigterm_and_recover_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1", "n2", "n3"]);
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", None);
    let n2 = start(dir.path(), "n2", "127.0.0.1:0", Some(n1.quic));
    let n3 = start(dir.path(), "n3", "127.0.0.1:0", Some(n1.quic));
    for n in ["n1", "n2", "n3"] {
        wait_until("all alive", Duration::from_secs(15), || {
            state_of(n1.admin, n).as_deref() == Some("alive")
                && state_of(n3.admin, n).as_deref() == Some("alive")
        });
    }
    wait_until("n2 ready", Duration::from_secs(5), || {
        get(n2.admin, "/readyz").0 == 200
    });

    // The members table.
    let out = shoal(&["members", "--admin", &n1.admin.to_string()], dir.path());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.starts_with("NAME"), "{table}");
    assert_eq!(
        table.lines().filter(|l| l.contains("alive")).count(),
        3,
        "{table}"
    );

    // SIGTERM: left within about one gossip round (100 ms), not after
    // failure detection.
    n3.signal("-TERM");
    let took = wait_until("n3 left", Duration::from_secs(3), || {
        state_of(n1.admin, "n3").as_deref() == Some("left")
    });
    eprintln!("left seen after {took:?}");

    // SIGKILL: dead after the detection window; a restart on the same
    // address with the same name is alive again.
    let quic = n2.quic;
    n2.signal("-KILL");
    let took = wait_until("n2 dead", Duration::from_secs(15), || {
        state_of(n1.admin, "n2").as_deref() == Some("dead")
    });
    eprintln!("dead seen after {took:?}");
    drop(n2);
    let n2 = start(dir.path(), "n2", &quic.to_string(), Some(n1.quic));
    wait_until("n2 alive again", Duration::from_secs(15), || {
        state_of(n1.admin, "n2").as_deref() == Some("alive")
    });
    drop(n2);
}

#[test]
fn metrics_pass_promtool() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", None);
    let (status, body) = get(n1.admin, "/metrics");
    assert_eq!(status, 200);
    assert!(body.contains("shoal_quic_handshake_refusals_total{reason=\"unknown_ca\"} 0"));
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_usage_exits_64_with_one_line_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["node", "--name", "x", "--bogus"], "--bogus"),
        (vec!["node", "--name", "x"], "--certs"),
        (vec!["node", "--certs", "."], "--name"),
        (vec!["node", "--name", "x", "--certs", "nowhere"], "--certs"),
        (vec!["up", "--nodes", "0"], "--nodes"),
    ];
    for (args, field) in cases {
        let out = shoal(&args, dir.path());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(field), "{args:?}: {err}");
    }

    make_certs(dir.path(), &["n1"]);
    std::fs::write(
        dir.path().join("shoal.toml"),
        "name = \"n1\"\ncerts = \"certs/n1\"\ngossip_interval = 5\n",
    )
    .unwrap();
    let out = shoal(&["node", "--config", "shoal.toml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("gossip_interval"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    std::fs::write(
        dir.path().join("shoal.toml"),
        "name = \"n1\"\ncertz = \"certs/n1\"\n",
    )
    .unwrap();
    let out = shoal(&["node", "--config", "shoal.toml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("certz"), "{err}");
}

#[test]
fn certificate_commands_refuse_to_overwrite_and_protect_keys() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1"]);
    for key in ["certs/ca.key", "certs/n1/node.key"] {
        let mode = std::fs::metadata(dir.path().join(key))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{key}");
    }
    let before = std::fs::read(dir.path().join("certs/n1/node.pem")).unwrap();
    let out = shoal(
        &[
            "cert", "issue", "--ca", "certs", "--name", "n1", "--out", "certs/n1",
        ],
        dir.path(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(
        std::fs::read(dir.path().join("certs/n1/node.pem")).unwrap(),
        before
    );
    let out = shoal(
        &[
            "cert", "issue", "--ca", "certs", "--name", "n1", "--out", "certs/n1", "--force",
        ],
        dir.path(),
    );
    assert!(out.status.success());
    assert_ne!(
        std::fs::read(dir.path().join("certs/n1/node.pem")).unwrap(),
        before
    );

    let help = shoal(&["cert", "issue", "--help"], dir.path());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("P-256") && help.contains("365"), "{help}");

    // A certificate for another name is refused at start.
    let out = shoal(
        &[
            "node",
            "--name",
            "n2",
            "--certs",
            "certs/n1",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("n1"));
}

#[test]
fn issue_operator_writes_an_operator_certificate_that_is_no_node_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &[]);
    let issue = |force: bool| {
        let mut args = vec![
            "cert",
            "issue-operator",
            "--ca",
            "certs",
            "--name",
            "alice",
            "--out",
            "ops/alice",
        ];
        if force {
            args.push("--force");
        }
        shoal(&args, dir.path())
    };
    let out = issue(false);
    assert!(out.status.success(), "{out:?}");
    let key = dir.path().join("ops/alice/operator.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(dir.path().join("ops/alice/operator.pem")).unwrap();
    assert!(pem.contains("BEGIN CERTIFICATE"));
    assert!(dir.path().join("ops/alice/ca.pem").is_file());
    let out = issue(false);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert!(issue(true).status.success());
    // A node cannot run on it: it names no node.
    std::fs::copy(
        dir.path().join("ops/alice/operator.pem"),
        dir.path().join("ops/alice/node.pem"),
    )
    .unwrap();
    std::fs::copy(&key, dir.path().join("ops/alice/node.key")).unwrap();
    let out = shoal(
        &[
            "node",
            "--name",
            "alice",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--certs",
            "ops/alice",
        ],
        dir.path(),
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node/<name>"),
        "{out:?}"
    );
}

#[test]
fn policy_commands_round_trip_through_a_node() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1", "n2"]);
    std::fs::write(dir.path().join("token"), "token-for-tests-0123456789\n").unwrap();
    let mut cmd = Command::new(SHOAL);
    cmd.current_dir(dir.path())
        .args([
            "node",
            "--name",
            "n1",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--certs",
            "certs/n1",
            "--gossip-interval",
            "100ms",
            "--admin-token-file",
            "token",
        ])
        .args(["--data-dir", "data1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = |k: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    let n1 = Proc {
        child,
        quic: addr("quic="),
        admin: addr("admin="),
    };
    let n2 = start(dir.path(), "n2", "127.0.0.1:0", Some(n1.quic));
    wait_until("joined", Duration::from_secs(15), || {
        state_of(n1.admin, "n2").as_deref() == Some("alive")
    });

    std::fs::write(
        dir.path().join("canary.yaml"),
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web-canary\nspec:\n  parentRefs:\n  - name: web\n  rules:\n  - backendRefs:\n    - name: web\n      weight: 90\n    - name: web-v2\n      weight: 10\n",
    )
    .unwrap();
    let admin = n1.admin.to_string();
    let policy = |args: &[&str]| {
        let mut all = vec!["policy", "--admin", admin.as_str()];
        all.extend_from_slice(args);
        shoal(&all, dir.path())
    };
    let out = shoal(
        &[
            "cert",
            "issue-operator",
            "--ca",
            "certs",
            "--name",
            "alice",
            "--out",
            "alice",
        ],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    // Without the token the write is refused.
    let out = policy(&["--operator-cert", "alice", "apply", "-f", "canary.yaml"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    // Without an operator certificate it is not even sent: one line, usage.
    let out = policy(&["--token-file", "token", "apply", "-f", "canary.yaml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--operator-cert"), "{stderr}");
    // Signed with a node's key instead of an operator's: one clear line.
    std::fs::create_dir_all(dir.path().join("fake-op")).unwrap();
    std::fs::copy(
        dir.path().join("certs/n2/node.pem"),
        dir.path().join("fake-op/operator.pem"),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("certs/n2/node.key"),
        dir.path().join("fake-op/operator.key"),
    )
    .unwrap();
    let out = policy(&[
        "--token-file",
        "token",
        "--operator-cert",
        "fake-op",
        "apply",
        "-f",
        "canary.yaml",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("403") && stderr.contains("not an operator certificate"),
        "{stderr}"
    );

    let out = Command::new(SHOAL)
        .args(["policy", "--admin", admin.as_str()])
        .args([
            "--token-file",
            "token",
            "apply",
            "-f",
            "canary.yaml",
            "--wait",
        ])
        .env("SHOAL_OPERATOR", "alice")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("HTTPRoute/web-canary configured"),
        "{stdout}"
    );
    assert!(stdout.contains("applied on 2/2"), "{stdout}");

    let out = policy(&["list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("web-canary") && stdout.contains("2/2") && stdout.contains("n1"),
        "{stdout}"
    );

    let out = policy(&["get", "HTTPRoute", "web-canary", "-o", "yaml"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("weight: 90"), "{stdout}");

    let out = policy(&["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("n2") && stdout.contains("HTTPRoute/web-canary"),
        "{stdout}"
    );

    // Invalid documents come back with every problem.
    std::fs::write(dir.path().join("bad.yaml"), "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {name: r}\nspec: {target: web, requestsPerSecond: -1, colour: red}\n").unwrap();
    let out = policy(&[
        "--token-file",
        "token",
        "--operator-cert",
        "alice",
        "apply",
        "-f",
        "bad.yaml",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("spec.colour") && stderr.contains("spec.requestsPerSecond"),
        "{stderr}"
    );

    let out = policy(&[
        "--token-file",
        "token",
        "--operator-cert",
        "alice",
        "delete",
        "HTTPRoute",
        "web-canary",
        "--wait",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = policy(&["get", "HTTPRoute", "web-canary"]);
    assert!(!out.status.success());
    assert!(
        dir.path()
            .join("data1/policies/HTTPRoute.web-canary.json")
            .is_file()
    );
    drop(n2);
}

/// The scheduling policy of every thread of `pid`, as /proc shows it
/// (field 41 of `stat`: 0 SCHED_OTHER, 3 SCHED_BATCH).
fn thread_policies(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.unwrap().path().join("stat")).ok())
        .map(|stat| {
            // The command name, in parentheses, may hold spaces: count after it.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
        })
        .collect()
}

#[test]
fn sched_policy_batch_reaches_every_thread_of_the_node_but_not_the_app() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path(), &["n1", "n2"]);
    let spawn = |name: &str, extra: &[&str]| {
        let mut child = Command::new(SHOAL)
            .current_dir(dir.path())
            .args(["node", "--name", name, "--certs", &format!("certs/{name}")])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--worker-threads", "2"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(" ready "), "{line:?}");
        child
    };
    let mut batch = spawn("n1", &["--sched-policy", "batch"]);
    let mut normal = spawn("n2", &[]);
    let (b, n) = (thread_policies(batch.id()), thread_policies(normal.id()));
    for c in [&mut batch, &mut normal] {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Two runtime workers and the main thread at least.
    assert!(b.len() >= 3, "{b:?}");
    assert!(b.iter().all(|p| *p == 3), "--sched-policy batch: {b:?}");
    assert!(n.iter().all(|p| *p == 0), "default: {n:?}");

    // `shoal run` starts its app under the kernel's default policy.
    let out = Command::new(SHOAL)
        .current_dir(dir.path())
        .args(["run", "--name", "n1", "--certs", "certs/n1"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(["--sched-policy", "batch", "--", "cat", "/proc/self/stat"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stat = String::from_utf8_lossy(&out.stdout);
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    assert_eq!(rest.split(' ').nth(41 - 3), Some("0"), "{stat}");

    // A bad value is a usage error naming the flag; the file key is read.
    let out = shoal(
        &[
            "node",
            "--name",
            "n1",
            "--certs",
            "certs/n1",
            "--sched-policy",
            "fast",
        ],
        dir.path(),
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sched-policy"));
    std::fs::write(
        dir.path().join("shoal.toml"),
        "name = \"n1\"\ncerts = \"certs/n1\"\nsched_policy = \"batch\"\n",
    )
    .unwrap();
    let out = shoal(
        &["node", "--config", "shoal.toml", "--print-config"],
        dir.path(),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("sched_policy = \"batch\""),
        "{out:?}"
    );
}
