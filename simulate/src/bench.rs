//! `bench proxy`: what the Shoal data path costs, measured beside a direct
//! call and one nginx reverse-proxy hop, in one run, against the same small
//! upstream (an in-process hyper server answering 1 KiB).
//!
//! Paths:
//! - `direct`: client → upstream.
//! - `nginx`: client → nginx (one worker, keep-alive to the upstream) → upstream,
//!   when `nginx` is on `PATH`.
//! - `shoal`: client → node A (outbound listener) → QUIC/mTLS → node B → upstream,
//!   with A and B as real `shoal node` child processes so their CPU time and
//!   peak RSS can be read from `/proc/<pid>/stat` and `/proc/<pid>/status`.
//!
//! Per path: latency percentiles at a fixed rate (open loop: requests are
//! scheduled on a clock and latency counts from the scheduled time, so
//! queueing shows), then the maximum throughput of a closed loop of
//! keep-alive connections, then CPU-seconds per 1,000 requests over the
//! fixed-rate phase and peak RSS of every proxy process.
//!
//! This module drives processes and sockets only; it must not reach into a
//! node's internals (it uses the `shoal` binary the way an operator would).

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::sync::mpsc;

/// Published figures the issue measures against.
pub const TARGET_CPU_S_PER_1K: f64 = 0.05;
/// Peak RSS target per node, MiB.
pub const TARGET_RSS_MIB: f64 = 15.0;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Requests per second of the fixed-rate phase. Default 1000.
    pub rps: u32,
    /// Length of the fixed-rate phase per path. Default 10 s.
    pub duration: Duration,
    /// Fixed-rate warm-up before measuring, per path. Default 1 s.
    pub warmup: Duration,
    /// Length of the closed-loop throughput phase per path. Default 3 s.
    pub throughput_duration: Duration,
    /// Concurrent keep-alive connections of the throughput phase. Default 32.
    pub connections: usize,
    /// Response body size of the upstream. Default 1024.
    pub response_bytes: usize,
    /// The `shoal` binary. Default: `$SHOAL_BIN`, else the workspace's
    /// `target/release/shoal` (built with `cargo build --release -p node` if missing).
    pub shoal_bin: Option<PathBuf>,
    /// Paths to run, in order: any of `direct`, `nginx`, `shoal`. Default all three.
    pub paths: Vec<String>,
    /// `--worker-threads` of each Shoal node. Default 1, as for a sidecar (and
    /// nginx runs one worker); `None` leaves the node's default, one per CPU.
    pub node_worker_threads: Option<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            rps: 1000,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(1),
            throughput_duration: Duration::from_secs(3),
            connections: 32,
            response_bytes: 1024,
            shoal_bin: None,
            paths: vec!["direct".into(), "nginx".into(), "shoal".into()],
            node_worker_threads: Some(1),
        }
    }
}

/// Everything one run measured (printed by [`print_table`], written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Fixed rate, requests per second.
    pub rps: u32,
    /// Fixed-rate phase length, seconds.
    pub duration_s: f64,
    /// Closed-loop connections.
    pub connections: usize,
    /// Upstream response size, bytes.
    pub response_bytes: usize,
    /// One entry per path, in the order run.
    pub paths: Vec<PathReport>,
    /// p99 each proxied path adds over `direct`, ms.
    pub added_p99_ms: Added,
    /// p50 each proxied path adds over `direct`, ms (steadier than p99 on a
    /// shared machine, where p99 carries other processes' noise).
    pub added_p50_ms: Added,
    /// The issue's targets.
    pub targets: Targets,
    /// Things the reader should know (skipped paths, binary used).
    pub notes: Vec<String>,
}

/// Latency a proxied path adds over the direct path, ms.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Added {
    /// nginx hop.
    pub nginx: Option<f64>,
    /// Shoal path (two nodes).
    pub shoal: Option<f64>,
}

/// The targets the issue states.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// Shoal's added p99 must not exceed nginx's.
    pub shoal_added_p99: &'static str,
    /// CPU-seconds per 1,000 requests per node.
    pub cpu_s_per_1k_per_node: f64,
    /// Peak RSS per node, MiB.
    pub rss_mib_per_node: f64,
    /// Published reference figures.
    pub reference: &'static str,
}

/// One path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// `direct`, `nginx` or `shoal`.
    pub name: String,
    /// Why the path did not run, if it did not.
    pub skipped: Option<String>,
    /// The fixed-rate phase.
    pub fixed_rate: Option<FixedRate>,
    /// Closed-loop throughput, requests per second.
    pub max_rps: Option<f64>,
    /// Errors (non-200 or failed) in the closed loop.
    pub max_rps_errors: u64,
    /// Proxy processes of the path and what they used.
    pub processes: Vec<ProcessUsage>,
}

/// The fixed-rate (open-loop) phase of one path.
#[derive(Debug, Clone, Serialize)]
pub struct FixedRate {
    /// Requests scheduled.
    pub sent: u64,
    /// Requests answered 200 with the whole body.
    pub ok: u64,
    /// Requests failed or answered otherwise.
    pub errors: u64,
    /// Latency from the scheduled send time, ms.
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// CPU and memory of one proxy process.
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    /// `node-a`, `node-b`, `nginx-worker`.
    pub name: String,
    /// CPU (user + system) over the fixed-rate phase, seconds.
    pub cpu_s: f64,
    /// CPU-seconds per 1,000 requests of the fixed-rate phase.
    pub cpu_s_per_1k: f64,
    /// Peak resident set (VmHWM) at the end of the path's run, MiB.
    pub peak_rss_mib: f64,
}

/// Runs the benchmark: direct, nginx (if installed), Shoal.
pub async fn bench_proxy(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    if opts.rps == 0 || opts.duration.is_zero() || opts.connections == 0 {
        bail!("--rps, --duration and --connections must be positive");
    }
    let mut notes = Vec::new();
    let shoal = shoal_binary(&opts)?;
    notes.push(format!("shoal binary: {}", shoal.display()));
    notes.push(match opts.node_worker_threads {
        Some(n) => format!("shoal nodes run with --worker-threads {n}; nginx with one worker"),
        None => "shoal nodes run one worker thread per CPU; nginx one worker".into(),
    });
    let upstream = Upstream::start(opts.response_bytes).await?;
    let dir = tempfile::tempdir().context("temp dir")?;
    let mut paths = Vec::new();

    for path in &opts.paths {
        match path.as_str() {
            "direct" => {
                eprintln!("bench: direct → {}", upstream.addr);
                paths.push(run_path(&opts, "direct", upstream.addr, &[]).await?);
            }
            "nginx" => match nginx_binary() {
                None => {
                    let why = "nginx is not on PATH; install it (apt-get install nginx) to compare one reverse-proxy hop";
                    eprintln!("bench: {why}");
                    notes.push(why.into());
                    paths.push(skipped("nginx", why));
                }
                Some(bin) => {
                    let nginx = Nginx::start(&bin, &dir.path().join("nginx"), upstream.addr)?;
                    wait_ready(nginx.addr, "bench", Duration::from_secs(10)).await?;
                    eprintln!("bench: nginx → {}", nginx.addr);
                    let procs = nginx.workers();
                    paths.push(run_path(&opts, "nginx", nginx.addr, &procs).await?);
                }
            },
            "shoal" => {
                let mesh = ShoalPair::start(
                    &shoal,
                    &dir.path().join("shoal"),
                    upstream.addr,
                    opts.node_worker_threads,
                )
                .await?;
                eprintln!("bench: shoal → {} (node-a) → node-b", mesh.outbound);
                let procs = [
                    ("node-a".to_string(), mesh.a.id()),
                    ("node-b".to_string(), mesh.b.id()),
                ];
                paths.push(run_path(&opts, "shoal", mesh.outbound, &procs).await?);
            }
            other => bail!("unknown path {other:?} (direct, nginx, shoal)"),
        }
    }

    let quantile = |name: &str, q: fn(&FixedRate) -> f64| {
        paths
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.fixed_rate.as_ref())
            .map(q)
    };
    let added = |q: fn(&FixedRate) -> f64| {
        let over = |name: &str| Some(round3(quantile(name, q)? - quantile("direct", q)?));
        Added {
            nginx: over("nginx"),
            shoal: over("shoal"),
        }
    };
    Ok(BenchReport {
        rps: opts.rps,
        duration_s: opts.duration.as_secs_f64(),
        connections: opts.connections,
        response_bytes: opts.response_bytes,
        added_p99_ms: added(|f| f.p99_ms),
        added_p50_ms: added(|f| f.p50_ms),
        paths,
        targets: Targets {
            shoal_added_p99: "no more than nginx's single plaintext hop adds",
            cpu_s_per_1k_per_node: TARGET_CPU_S_PER_1K,
            rss_mib_per_node: TARGET_RSS_MIB,
            reference: "Istio at 1,000 rps: ztunnel pair +0.20 ms p99, sidecar pair +0.30 ms; ztunnel 0.06 vCPU per 1,000 rps, 12 MB",
        },
        notes,
    })
}

/// Prints a report as tables.
pub fn print_table(r: &BenchReport) {
    println!(
        "fixed rate {} rps for {:.0}s (open loop, latency from the scheduled send), {} B responses",
        r.rps, r.duration_s, r.response_bytes
    );
    println!(
        "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13} {:>12}",
        "path", "p50", "p90", "p99", "p99.9", "max", "ok/sent", "max rps"
    );
    for p in &r.paths {
        if let Some(why) = &p.skipped {
            println!("{:<8} skipped: {why}", p.name);
            continue;
        }
        let ms = |v: f64| format!("{v:.3}ms");
        let (lat, okc) = match &p.fixed_rate {
            Some(f) => (
                [
                    ms(f.p50_ms),
                    ms(f.p90_ms),
                    ms(f.p99_ms),
                    ms(f.p999_ms),
                    ms(f.max_ms),
                ],
                format!("{}/{}", f.ok, f.sent),
            ),
            None => (std::array::from_fn(|_| "-".to_string()), "-".into()),
        };
        let max = match p.max_rps {
            Some(v) if p.max_rps_errors > 0 => format!("{v:.0} ({} err)", p.max_rps_errors),
            Some(v) => format!("{v:.0}"),
            None => "-".into(),
        };
        println!(
            "{:<8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>13} {:>12}",
            p.name, lat[0], lat[1], lat[2], lat[3], lat[4], okc, max
        );
    }
    println!();
    let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:+.3} ms"));
    println!(
        "added p99 over direct: nginx {}, shoal {}  (target: shoal ≤ nginx; Istio ztunnel pair +0.20 ms, sidecar pair +0.30 ms)",
        show(r.added_p99_ms.nginx),
        show(r.added_p99_ms.shoal)
    );
    println!(
        "added p50 over direct: nginx {}, shoal {}",
        show(r.added_p50_ms.nginx),
        show(r.added_p50_ms.shoal)
    );
    println!();
    println!(
        "{:<8} {:<13} {:>10} {:>12} {:>12}",
        "path", "process", "cpu-s", "cpu-s/1k", "peak RSS"
    );
    for p in &r.paths {
        for u in &p.processes {
            println!(
                "{:<8} {:<13} {:>10.3} {:>12.4} {:>9.1} MiB",
                p.name, u.name, u.cpu_s, u.cpu_s_per_1k, u.peak_rss_mib
            );
        }
    }
    println!(
        "targets per Shoal node: ≤ {} cpu-s per 1,000 requests, ≤ {} MiB RSS (ztunnel: 0.06 vCPU per 1,000 rps, 12 MB)",
        r.targets.cpu_s_per_1k_per_node, r.targets.rss_mib_per_node
    );
    for n in &r.notes {
        println!("note: {n}");
    }
}

fn skipped(name: &str, why: &str) -> PathReport {
    PathReport {
        name: name.into(),
        skipped: Some(why.into()),
        fixed_rate: None,
        max_rps: None,
        max_rps_errors: 0,
        processes: Vec::new(),
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

// === one path ===

/// Warm-up, fixed rate (CPU measured around it), closed loop, peak RSS.
async fn run_path(
    opts: &BenchOptions,
    name: &str,
    addr: SocketAddr,
    procs: &[(String, u32)],
) -> anyhow::Result<PathReport> {
    let client = client();
    if !opts.warmup.is_zero() {
        open_loop(&client, addr, opts.rps, opts.warmup).await;
    }
    let before: Vec<f64> = procs.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    let fixed = open_loop(&client, addr, opts.rps, opts.duration).await;
    let after: Vec<f64> = procs.iter().map(|(_, pid)| cpu_seconds(*pid)).collect();
    drop(client);
    let (max_rps, max_errors) = closed_loop(addr, opts.connections, opts.throughput_duration).await;
    let processes = procs
        .iter()
        .zip(before.iter().zip(&after))
        .map(|((pname, pid), (b, a))| {
            let cpu = a - b;
            ProcessUsage {
                name: pname.clone(),
                cpu_s: round3(cpu),
                cpu_s_per_1k: (cpu / fixed.sent.max(1) as f64 * 1000.0 * 1e4).round() / 1e4,
                peak_rss_mib: (peak_rss_kib(*pid) as f64 / 1024.0 * 10.0).round() / 10.0,
            }
        })
        .collect();
    if fixed.errors > 0 {
        eprintln!(
            "bench: {name}: {} of {} fixed-rate requests failed",
            fixed.errors, fixed.sent
        );
    }
    Ok(PathReport {
        name: name.into(),
        skipped: None,
        fixed_rate: Some(fixed),
        max_rps: Some(max_rps.round()),
        max_rps_errors: max_errors,
        processes,
    })
}

type BenchClient = Client<HttpConnector, Empty<Bytes>>;

fn client() -> BenchClient {
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(conn)
}

fn request(addr: SocketAddr) -> Request<Empty<Bytes>> {
    Request::get(format!("http://{addr}/bench"))
        .header(hyper::header::HOST, "web")
        .body(Empty::new())
        .expect("static request")
}

/// Sends `rps` requests a second for `duration`, each at its scheduled time
/// whatever the previous ones are doing; latency counts from that time.
async fn open_loop(
    client: &BenchClient,
    addr: SocketAddr,
    rps: u32,
    duration: Duration,
) -> FixedRate {
    let total = (f64::from(rps) * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rps));
    let (tx, mut rx) = mpsc::unbounded_channel::<Option<Duration>>();
    let handle = tokio::runtime::Handle::current();
    let client = client.clone();
    // A plain thread paces the schedule: tokio's timer has 1 ms granularity,
    // which would add up to a millisecond to every path's latency.
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let (client, tx) = (client.clone(), tx.clone());
            handle.spawn(async move {
                let ok = match client.request(request(addr)).await {
                    Ok(resp) if resp.status() == 200 => resp.into_body().collect().await.is_ok(),
                    Ok(resp) => {
                        let _ = resp.into_body().collect().await;
                        false
                    }
                    Err(_) => false,
                };
                let _ = tx.send(ok.then(|| at.elapsed()));
            });
        }
    });
    let mut lat: Vec<Duration> = Vec::with_capacity(total as usize);
    let mut errors = 0;
    while let Some(r) = rx.recv().await {
        match r {
            Some(d) => lat.push(d),
            None => errors += 1,
        }
    }
    let _ = pacer.join();
    lat.sort_unstable();
    let q = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        round3(lat[i].as_secs_f64() * 1e3)
    };
    FixedRate {
        sent: total,
        ok: lat.len() as u64,
        errors,
        p50_ms: q(0.50),
        p90_ms: q(0.90),
        p99_ms: q(0.99),
        p999_ms: q(0.999),
        max_ms: q(1.0),
    }
}

/// `connections` keep-alive connections, each sending its next request as
/// soon as the previous answer is read, for `duration`. Returns requests per
/// second answered 200, and the number of failures.
async fn closed_loop(addr: SocketAddr, connections: usize, duration: Duration) -> (f64, u64) {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = tokio::time::Instant::now();
    let end = start + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < end {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let Ok((mut send, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                tokio::spawn(conn);
                while tokio::time::Instant::now() < end {
                    if send.ready().await.is_err() {
                        break;
                    }
                    let req = Request::get("/bench")
                        .header(hyper::header::HOST, "web")
                        .body(Empty::<Bytes>::new())
                        .expect("static request");
                    match send.send_request(req).await {
                        Ok(resp) => {
                            let status = resp.status();
                            let read = resp.into_body().collect().await.is_ok();
                            if status == 200 && read {
                                ok.fetch_add(1, Ordering::Relaxed);
                            } else {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = start.elapsed().as_secs_f64();
    (
        ok.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed),
    )
}

async fn wait_ready(addr: SocketAddr, what: &str, deadline: Duration) -> anyhow::Result<()> {
    let client = client();
    let end = Instant::now() + deadline;
    let mut last = String::from("no answer yet");
    while Instant::now() < end {
        match client.request(request(addr)).await {
            Ok(r) if r.status() == 200 => {
                let _ = r.into_body().collect().await;
                return Ok(());
            }
            Ok(r) => last = format!("status {}", r.status()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{addr} did not serve {what} within {deadline:?}: {last}")
}

// === /proc ===

/// User + system CPU of a process (all its threads), seconds. 0 if unreadable.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Peak resident set (VmHWM) of a process, KiB. 0 if unreadable.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// === upstream ===

/// The small upstream every path ends at.
struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(size: usize) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let body = Bytes::from(vec![b'x'; size]);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, task })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === child processes ===

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn id(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_millis(500);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.name;
    }
}

fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

// === nginx ===

fn nginx_binary() -> Option<PathBuf> {
    on_path("nginx")
}

/// One nginx master with one worker, reverse-proxying to the upstream over
/// keep-alive connections.
struct Nginx {
    addr: SocketAddr,
    proc: Proc,
}

impl Nginx {
    fn start(bin: &Path, dir: &Path, upstream: SocketAddr) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let addr = free_tcp_port()?;
        let d = dir.display();
        let conf = format!(
            r#"worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream bench_upstream {{
        server {upstream};
        keepalive 64;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf)?;
        let log = dir.join("stderr.log");
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Nginx {
            addr,
            proc: Proc {
                name: "nginx".into(),
                child,
                log,
            },
        })
    }

    /// The worker processes (children of the master).
    fn workers(&self) -> Vec<(String, u32)> {
        let pid = self.proc.id();
        let kids =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        let mut out: Vec<(String, u32)> = kids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .map(|p| ("nginx-worker".to_string(), p))
            .collect();
        if out.is_empty() {
            out.push(("nginx-master".into(), pid));
        }
        out
    }
}

// === shoal ===

/// Finds (or builds) the `shoal` binary.
fn shoal_binary(opts: &BenchOptions) -> anyhow::Result<PathBuf> {
    if let Some(p) = opts
        .shoal_bin
        .clone()
        .or_else(|| std::env::var_os("SHOAL_BIN").map(PathBuf::from))
    {
        if !p.is_file() {
            bail!("shoal binary {} does not exist", p.display());
        }
        return Ok(p);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("no workspace folder"))?
        .to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let bin = target.join("release").join("shoal");
    if !bin.is_file() {
        eprintln!(
            "bench: {} is missing; running `cargo build --release -p node`",
            bin.display()
        );
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "--release", "-p", "node", "-j", "2"])
            .current_dir(&workspace)
            .status()
            .context("running cargo")?;
        if !status.success() || !bin.is_file() {
            bail!(
                "could not build {}; build it with `cargo build --release -p node` or pass the binary (SHOAL_BIN)",
                bin.display()
            );
        }
    }
    Ok(bin)
}

/// Two `shoal node` processes: A with an outbound listener, B fronting `web`.
struct ShoalPair {
    outbound: SocketAddr,
    a: Proc,
    b: Proc,
}

impl ShoalPair {
    async fn start(
        bin: &Path,
        dir: &Path,
        upstream: SocketAddr,
        threads: Option<usize>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let common: Vec<String> = match threads {
            Some(n) => vec!["--worker-threads".into(), n.to_string()],
            None => Vec::new(),
        };
        let ca = dir.join("ca");
        run(Command::new(bin)
            .args(["cert", "init", "--trust-domain", "bench.shoal", "--out"])
            .arg(&ca))?;
        for (name, svc) in [("a", "client"), ("b", "web")] {
            run(Command::new(bin)
                .args(["cert", "issue", "--ca"])
                .arg(&ca)
                .args(["--name", name, "--service", svc, "--out"])
                .arg(dir.join(name)))?;
        }
        let (b, b_quic) = start_node(
            bin,
            dir,
            "b",
            &[
                &common[..],
                &["--service".into(), format!("web={upstream}")],
            ]
            .concat(),
        )?;
        let outbound = free_tcp_port()?;
        let (a, _) = start_node(
            bin,
            dir,
            "a",
            &[
                &common[..],
                &[
                    "--seed".into(),
                    b_quic.to_string(),
                    "--outbound".into(),
                    outbound.to_string(),
                ],
            ]
            .concat(),
        )?;
        let pair = ShoalPair { outbound, a, b };
        if let Err(e) = wait_ready(outbound, "web", Duration::from_secs(20)).await {
            bail!(
                "{e}\n--- node a log ---\n{}\n--- node b log ---\n{}",
                pair.a.log_tail(),
                pair.b.log_tail()
            );
        }
        Ok(pair)
    }
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `shoal node --name <name>` on ephemeral ports; returns it and its
/// QUIC address once it printed its ready line.
fn start_node(
    bin: &Path,
    dir: &Path,
    name: &str,
    extra: &[String],
) -> anyhow::Result<(Proc, SocketAddr)> {
    let log = dir.join(format!("{name}.log"));
    let mut child = Command::new(bin)
        .args(["node", "--name", name, "--certs"])
        .arg(dir.join(name))
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.contains(" ready ") {
                let _ = tx.send(line);
                break;
            }
        }
        // Keep draining so the node never writes into a closed pipe.
        for _ in lines {}
    });
    let proc = Proc {
        name: format!("node-{name}"),
        child,
        log,
    };
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .map_err(|_| anyhow!("node {name} did not start:\n{}", proc.log_tail()))?;
    let quic = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("quic="))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| anyhow!("node {name}: unexpected ready line {line:?}"))?;
    Ok((proc, quic))
}
