//! `shoal run`, `shoal await` and `shoal check`: tying a node to an app's
//! life, and checking a node's setup before it starts.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::signal::unix::{SignalKind, signal};

use crate::config::NodeConfig;
use crate::node::Node;

/// `shoal run [node flags] -- APP ARGS…`: starts the node in this process,
/// waits until it is ready, runs the app with `SHOAL_OUTBOUND` and
/// `http_proxy` pointing at the outbound listener (and `SHOAL_ADMIN` at the
/// admin API, so `shoal` commands the app runs find its node; `no_proxy`
/// keeps loopback direct unless already set), forwards SIGTERM and
/// SIGINT to it, and when it exits drains the node and returns its code.
pub(crate) async fn run_app(mut config: NodeConfig, app: Vec<String>) -> i32 {
    let Some((program, args)) = app.split_first() else {
        eprintln!("shoal run: no app given (shoal run [node flags] -- APP ARGS...)");
        return crate::config::EXIT_USAGE;
    };
    if config.proxy.outbound.is_none() {
        config.proxy.outbound = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let name = config.name.clone();
    let sched_policy = config.sched_policy;
    let node = match Node::start(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("shoal run: node {name}: {e}");
            return 1;
        }
    };
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            eprintln!("shoal run: cannot install signal handlers");
            node.kill().await;
            return 1;
        }
    };
    // Hold the app until the node is routable.
    let mut said = String::new();
    loop {
        match node.ready().await {
            Ok(()) => break,
            Err(why) if why != said => {
                tracing::info!(%why, "holding the app until the node is ready");
                said = why;
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = term.recv() => return stop_before_app(node, 15).await,
            _ = int.recv() => return stop_before_app(node, 2).await,
            _ = node.stop_requested() => return stop_before_app(node, 15).await,
            (code, why) = node.fatal() => {
                eprintln!("shoal run: node {name}: {why}");
                node.kill().await;
                return code;
            }
        }
    }
    let outbound = node
        .outbound_addr()
        .expect("shoal run always opens an outbound listener");
    eprintln!(
        "shoal run: node {} ready quic={} admin={} outbound={outbound}; starting {program}",
        node.name(),
        node.quic_addr(),
        node.admin_addr()
    );
    crate::resident::spawn_code_release();
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .env("SHOAL_OUTBOUND", outbound.to_string())
        .env("http_proxy", format!("http://{outbound}"))
        .env("SHOAL_ADMIN", node.admin_addr().to_string());
    // Loopback stays direct (the node's own admin API, local sidecars),
    // unless the caller chose otherwise.
    if std::env::var_os("no_proxy").is_none() && std::env::var_os("NO_PROXY").is_none() {
        command.env("no_proxy", "localhost,127.0.0.1,::1");
    }
    // The node's --sched-policy is the node's: the app starts under the
    // kernel's default.
    if sched_policy != crate::sched::SchedPolicy::Normal {
        crate::sched::child_starts_normal(&mut command);
    }
    let child = command.spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("shoal run: cannot start {program}: {e}");
            node.drain().await;
            // What a shell answers for a missing or unusable command.
            return if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
        }
    };
    let pid = child.id().unwrap_or(0);
    let mut asked_to_stop = false;
    let mut fatal: Option<i32> = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            _ = term.recv() => forward(pid, "TERM").await,
            _ = int.recv() => forward(pid, "INT").await,
            _ = node.stop_requested(), if !asked_to_stop => {
                asked_to_stop = true;
                tracing::info!("shutdown requested through the admin API; stopping the app");
                forward(pid, "TERM").await;
            }
            (code, why) = node.fatal(), if fatal.is_none() => {
                eprintln!("shoal run: node {name}: {why}; stopping the app");
                fatal = Some(code);
                forward(pid, "TERM").await;
            }
        }
    };
    let code = match status {
        Ok(s) => exit_code(s),
        Err(e) => {
            eprintln!("shoal run: waiting for {program}: {e}");
            1
        }
    };
    if let Some(node_code) = fatal {
        node.kill().await;
        return node_code;
    }
    tracing::info!(code, "app exited; draining, then leaving the mesh");
    let cut = node.drain().await;
    if cut > 0 {
        tracing::warn!(cut, "drain timeout passed with requests in flight");
    }
    code
}

/// A signal (or a stop request) came before the app started: drain and
/// exit as the signal would have ended us.
async fn stop_before_app(node: Node, signo: i32) -> i32 {
    tracing::info!("stopped before the app started; draining");
    node.drain().await;
    128 + signo
}

/// The app's exit code, or 128 + the signal that ended it (as a shell says).
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Sends `sig` to `pid` with the `kill` utility (this crate forbids unsafe
/// code, so no raw `kill(2)`).
async fn forward(pid: u32, sig: &str) {
    if pid == 0 {
        return;
    }
    let sent = tokio::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
    if !matches!(sent, Ok(s) if s.success()) {
        tracing::warn!(pid, sig, "could not forward the signal to the app");
    }
}

/// `shoal await --admin ADDR --timeout T`: waits until the node at ADDR
/// answers `/readyz` with 200. Exit 0 when ready, 1 on timeout (saying why).
pub(crate) async fn await_ready(admin: &str, timeout: Duration) -> i32 {
    let end = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(
            left.max(Duration::from_millis(10)),
            crate::cli::request(admin, http::Method::GET, "/readyz", &[], Default::default()),
        )
        .await;
        match attempt {
            Ok(Ok((status, _))) if status == http::StatusCode::OK => {
                println!("shoal await: {admin} is ready");
                return 0;
            }
            Ok(Ok((status, body))) => {
                last = format!("{status}: {}", String::from_utf8_lossy(&body).trim());
            }
            Ok(Err(e)) => last = e,
            Err(_) => {}
        }
        if Instant::now() >= end {
            eprintln!(
                "shoal await: {admin} not ready after {}: {last}",
                humantime(timeout)
            );
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// One line of `shoal check`.
struct Line {
    status: &'static str,
    check: String,
    detail: String,
}

impl Line {
    fn new(status: &'static str, check: impl Into<String>, detail: impl Into<String>) -> Self {
        Line {
            status,
            check: check.into(),
            detail: detail.into(),
        }
    }
}

/// `shoal check`: one line per check, exit 1 if any failed.
pub(crate) async fn check(config: NodeConfig) -> i32 {
    let mut lines = Vec::new();
    let probe = check_certificates(&config, &mut lines);
    check_ports(&config, &mut lines);
    check_seeds(&config, probe.as_ref(), &mut lines).await;
    check_clock(&config, probe.as_ref(), &mut lines).await;
    check_data_dir(config.data_dir.as_deref(), &mut lines);
    check_token(config.admin_token_file.as_deref(), &mut lines);
    if let Some(p) = probe {
        p.close();
    }
    let failed = lines.iter().filter(|l| l.status == "FAIL").count();
    for l in &lines {
        println!("{:<4}  {}: {}", l.status, l.check, l.detail);
    }
    if failed > 0 {
        println!("{failed} check(s) failed");
        1
    } else {
        0
    }
}

/// Chain, names and days left; returns a QUIC endpoint built from the
/// folder (which also proves the key matches the certificate), for probing
/// seeds.
fn check_certificates(config: &NodeConfig, lines: &mut Vec<Line>) -> Option<transport::Endpoint> {
    use transport::certs::{CA_CERT, NODE_CERT, summarize_pem_file};
    let dir = &config.certs;
    let now = crate::lifecycle::unix_now();
    let node_file = dir.join(NODE_CERT);
    let checker = match transport::signing::CertChecker::from_dir(dir) {
        Ok(c) => c,
        Err(e) => {
            lines.push(Line::new("FAIL", "certificates", e.to_string()));
            return None;
        }
    };
    let der = match transport::certs::first_cert_der(&node_file) {
        Ok(d) => d,
        Err(e) => {
            lines.push(Line::new("FAIL", "certificates", e.to_string()));
            return None;
        }
    };
    let checked = match checker.check_node(&der, std::time::SystemTime::now()) {
        Ok(c) => c,
        Err(e) => {
            lines.push(Line::new(
                "FAIL",
                "certificates",
                format!("{}: {e}", node_file.display()),
            ));
            return None;
        }
    };
    let id = &checked.identity;
    if id.node != config.name {
        lines.push(Line::new(
            "FAIL",
            "certificates",
            format!(
                "{} names node {:?} but this node is {:?}",
                node_file.display(),
                id.node,
                config.name
            ),
        ));
        return None;
    }
    let node_days = (checked.not_after - now).div_euclid(86_400);
    let cas = summarize_pem_file(&dir.join(CA_CERT)).unwrap_or_default();
    let ca_days: Vec<String> = cas
        .iter()
        .map(|c| format!("{} days", c.days_left(now)))
        .collect();
    let services = if id.services.is_empty() {
        "no services".to_string()
    } else {
        format!("services {}", id.services.join(","))
    };
    let detail = format!(
        "node {} ({services}, trust domain {}) chains to the CA; node certificate {node_days} days left; CA{} {}",
        id.node,
        id.trust_domain,
        if cas.len() > 1 { "s" } else { "" },
        ca_days.join(", ")
    );
    let soon = node_days < crate::lifecycle::CERT_WARN_DAYS
        || cas
            .iter()
            .any(|c| c.days_left(now) < crate::lifecycle::CERT_WARN_DAYS);
    let expired_ca = cas.iter().any(|c| c.not_after <= now);
    let status = if expired_ca {
        "FAIL"
    } else if soon {
        "warn"
    } else {
        "ok"
    };
    let detail = if soon && !expired_ca {
        format!(
            "{detail} (under {} days: shoal cert renew)",
            crate::lifecycle::CERT_WARN_DAYS
        )
    } else {
        detail
    };
    lines.push(Line::new(status, "certificates", detail));
    let probe_addr: SocketAddr = if config.listen.is_ipv6() {
        "[::1]:0".parse().unwrap()
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    };
    let ep_config = transport::EndpointConfig::new(probe_addr, transport::TlsFiles::new(dir));
    match transport::Endpoint::bind(ep_config) {
        Ok(ep) => Some(ep),
        Err(e) => {
            lines.push(Line::new(
                "FAIL",
                "certificates",
                format!("key or certificate: {e}"),
            ));
            None
        }
    }
}

fn check_ports(config: &NodeConfig, lines: &mut Vec<Line>) {
    let mut tcp = vec![("admin", config.admin)];
    if let Some(o) = config.proxy.outbound {
        tcp.push(("outbound", o));
    }
    for u in &config.proxy.upstreams {
        tcp.push(("upstream", u.listen));
    }
    let mut free = Vec::new();
    let mut busy = Vec::new();
    match std::net::UdpSocket::bind(config.listen) {
        Ok(_) => free.push(format!("{}/udp (listen)", config.listen)),
        Err(e) => busy.push(format!("{}/udp (listen): {e}", config.listen)),
    }
    for (what, addr) in tcp {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => free.push(format!("{addr}/tcp ({what})")),
            Err(e) => busy.push(format!("{addr}/tcp ({what}): {e}")),
        }
    }
    if busy.is_empty() {
        lines.push(Line::new(
            "ok",
            "ports",
            format!("free: {}", free.join(", ")),
        ));
    } else {
        lines.push(Line::new("FAIL", "ports", busy.join("; ")));
    }
}

async fn check_seeds(
    config: &NodeConfig,
    probe: Option<&transport::Endpoint>,
    lines: &mut Vec<Line>,
) {
    if config.seeds.is_empty() {
        lines.push(Line::new(
            "ok",
            "seeds",
            "none configured (this node starts a mesh, or finds remembered peers in --data-dir)",
        ));
        return;
    }
    for seed in &config.seeds {
        let check = format!("seed {seed}");
        let Some(probe) = probe else {
            lines.push(Line::new(
                "skip",
                check,
                "no usable certificate to dial with",
            ));
            continue;
        };
        let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(seed.as_str()).await {
            Ok(a) => a.collect(),
            Err(e) => {
                lines.push(Line::new("FAIL", check, format!("does not resolve: {e}")));
                continue;
            }
        };
        for addr in addrs {
            let started = Instant::now();
            let dial = tokio::time::timeout(Duration::from_secs(3), probe.connect(addr)).await;
            let check = format!("seed {seed} ({addr})");
            match dial {
                Ok(Ok(c)) => lines.push(Line::new(
                    "ok",
                    check,
                    format!(
                        "QUIC handshake with node {} in {:.1} ms",
                        c.peer.node,
                        started.elapsed().as_secs_f64() * 1000.0
                    ),
                )),
                Ok(Err(e)) => lines.push(Line::new("FAIL", check, e.to_string())),
                Err(_) => lines.push(Line::new(
                    "FAIL",
                    check,
                    "no QUIC handshake within 3s (nothing listening, or UDP blocked)",
                )),
            }
        }
    }
}

/// Clocks further apart than this fail the check: operator signatures,
/// policy versions and certificate validity all compare wall clocks.
const MAX_CLOCK_OFFSET_MS: f64 = 5_000.0;

async fn check_clock(
    config: &NodeConfig,
    probe: Option<&transport::Endpoint>,
    lines: &mut Vec<Line>,
) {
    let Some(probe) = probe else {
        lines.push(Line::new(
            "skip",
            "clock",
            "no usable certificate to dial with",
        ));
        return;
    };
    if config.seeds.is_empty() {
        lines.push(Line::new("skip", "clock", "no seeds to compare against"));
        return;
    }
    for seed in &config.seeds {
        let Ok(addrs) = tokio::net::lookup_host(seed.as_str()).await else {
            continue;
        };
        for addr in addrs {
            let check = format!("clock vs {seed} ({addr})");
            match crate::clock::probe(probe, addr, Duration::from_secs(3)).await {
                Some(r) => {
                    let status = if r.offset_ms.abs() > MAX_CLOCK_OFFSET_MS { "FAIL" } else { "ok" };
                    lines.push(Line::new(
                        status,
                        check,
                        format!(
                            "peer clock {:+.1} ms from ours (± {:.1} ms; fails beyond ±{} s)",
                            r.offset_ms,
                            r.rtt_ms / 2.0,
                            MAX_CLOCK_OFFSET_MS / 1000.0
                        ),
                    ))
                }
                None => lines.push(Line::new(
                    "skip",
                    check,
                    "no clock reading within 3s (the peer is unreachable or runs a version without clock readings)",
                )),
            }
        }
    }
}

fn check_data_dir(dir: Option<&Path>, lines: &mut Vec<Line>) {
    let Some(dir) = dir else {
        lines.push(Line::new(
            "ok",
            "data dir",
            "none (policies and remembered peers are kept in memory only)",
        ));
        return;
    };
    // The nearest folder that exists must take a new file; anything made
    // here is removed again.
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    if !at.is_dir() {
        lines.push(Line::new(
            "FAIL",
            "data dir",
            format!("{} is not a folder", at.display()),
        ));
        return;
    }
    let probe = at.join(format!(".shoal-check-{}", std::process::id()));
    match std::fs::write(&probe, b"x") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            let detail = if at == dir {
                format!("{} is writable", dir.display())
            } else {
                format!(
                    "{} will be created in {} (writable)",
                    dir.display(),
                    at.display()
                )
            };
            lines.push(Line::new("ok", "data dir", detail));
        }
        Err(e) => lines.push(Line::new(
            "FAIL",
            "data dir",
            format!("{} is not writable: {e}", at.display()),
        )),
    }
}

fn check_token(file: Option<&Path>, lines: &mut Vec<Line>) {
    use std::os::unix::fs::PermissionsExt;
    let Some(file) = file else {
        lines.push(Line::new(
            "ok",
            "admin token",
            "none set: policy writes and /shutdown are accepted from loopback only",
        ));
        return;
    };
    let token = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            lines.push(Line::new(
                "FAIL",
                "admin token",
                format!("{}: {e}", file.display()),
            ));
            return;
        }
    };
    let n = token.trim().chars().count();
    if n < crate::node::MIN_TOKEN_CHARS {
        lines.push(Line::new(
            "FAIL",
            "admin token",
            format!(
                "{}: {n} characters; at least {} needed (e.g. openssl rand -hex 16)",
                file.display(),
                crate::node::MIN_TOKEN_CHARS
            ),
        ));
        return;
    }
    let loose = std::fs::metadata(file)
        .map(|m| m.permissions().mode() & 0o077 != 0)
        .unwrap_or(false);
    if loose {
        lines.push(Line::new(
            "warn",
            "admin token",
            format!(
                "{}: {n} characters, but readable by other users (chmod 600)",
                file.display()
            ),
        ));
    } else {
        lines.push(Line::new(
            "ok",
            "admin token",
            format!("{}: {n} characters", file.display()),
        ));
    }
}
