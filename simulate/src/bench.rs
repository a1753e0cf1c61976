//! `bench proxy`: what the Shoal data path costs, measured side by side in
//! one run against a plaintext two-hop nginx chain and against the bare QUIC
//! transport, all ending at the same small upstream (1 KiB responses).
//!
//! Paths (rows):
//! - `direct`: client → upstream.
//! - `nginx-2hop`: client → nginx A → nginx B → upstream, plaintext, one
//!   worker each, keep-alive on every hop: the same shape as Shoal's two hops.
//! - `shoal`: client → node A (outbound listener) → QUIC/mTLS → node B →
//!   upstream, with A and B as real `shoal node` child processes.
//! - `quic-floor`: a bare request/response echo over two
//!   [`transport::Endpoint`]s built by the transport crate's own constructor
//!   (so the same quinn transport settings and mTLS as Shoal's hops), each on
//!   its own one-thread runtime in this process: 16 concurrent streams on one
//!   connection, a 64 B request, a 1 KiB answer. The limit of the transport
//!   under the proxy.
//!
//! The upstream is nginx serving a 1 KiB static file (one worker) when nginx
//! is installed, as in the issue's measurement; otherwise an in-process hyper
//! server (which then shares this process's CPU with the load generators).
//!
//! Per run and path: throughput and latency from `wrk` (1 thread, 16
//! connections, keep-alive; `quic-floor` uses its own closed loop of 16
//! streams), with the resident set of every proxy process sampled while it
//! runs; then a fixed rate (1,000 rps, open loop) during which the CPU time
//! of every proxy process is read from `/proc/<pid>/stat` (per thread for
//! `quic-floor`). Runs alternate the paths, so a burst of noise from other
//! processes on the machine lands on all of them; the table shows medians.
//!
//! TCP rows (path `tcp`): an in-process TCP server behind a `tcp://`
//! service; `direct` connects to it, `shoal` goes through node A's
//! `--upstream` listener → QUIC/mTLS → node B. Per run: a bulk transfer (the
//! client writes 64 MiB, shuts its write side, the server answers once it
//! read them all: MB/s) and a ping-pong (64 B each way on one connection for
//! the throughput duration: round trips per second).
//!
//! This module drives processes and sockets only; it must not reach into a
//! node's internals (it uses the `shoal` binary the way an operator would).

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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

/// CPU-seconds per 1,000 requests per node the issue sets (nginx's own cost
/// per hop on the reference machine).
pub const TARGET_CPU_S_PER_1K: f64 = 0.08;
/// RSS per node under load, MiB.
pub const TARGET_RSS_LOAD_MIB: f64 = 15.0;
/// RSS per node when idle, MiB.
pub const TARGET_RSS_IDLE_MIB: f64 = 10.0;
/// Shoal's throughput over the nginx chain's, at least.
pub const TARGET_RPS_RATIO: f64 = 0.8;
/// How long every path sits idle after start before its settled RSS is
/// read: longer than a node's code-release period (10 s).
pub const SETTLE: Duration = Duration::from_secs(15);
/// Shoal's p99 over the nginx chain's, at most.
pub const TARGET_P99_RATIO: f64 = 1.5;
/// Shoal's throughput over `quic-floor`'s, aim.
pub const TARGET_FLOOR_RATIO: f64 = 0.8;

/// The rows, in the order they run.
pub const PATHS: [&str; 5] = ["direct", "nginx-2hop", "shoal", "quic-floor", "tcp"];
/// Bytes of the TCP bulk transfer.
pub const TCP_BULK_BYTES: usize = 64 << 20;
/// Bytes of each TCP ping-pong message.
pub const TCP_PING_BYTES: usize = 64;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Requests per second of the fixed-rate (CPU) phase. Default 1000.
    pub rps: u32,
    /// Length of the fixed-rate phase per path and run. Default 5 s.
    pub duration: Duration,
    /// Fixed-rate warm-up per path before the first run. Default 1 s.
    pub warmup: Duration,
    /// Length of each `wrk` run per path. Default 5 s.
    pub throughput_duration: Duration,
    /// Connections of `wrk` (streams of `quic-floor`). Default 16.
    pub connections: usize,
    /// Runs; the table shows medians. Default 3.
    pub runs: usize,
    /// Response body size of the upstream. Default 1024.
    pub response_bytes: usize,
    /// The `shoal` binary. Default: `$SHOAL_BIN`, else the workspace's
    /// `target/release/shoal` (built with `cargo build --release -p node` if missing).
    pub shoal_bin: Option<PathBuf>,
    /// Paths to run, any of [`PATHS`]. Default all.
    pub paths: Vec<String>,
    /// `--worker-threads` of each Shoal node. Default 1, as for a sidecar
    /// (nginx runs one worker); `None` leaves the node's default, one per CPU.
    pub node_worker_threads: Option<usize>,
    /// The upstream: `nginx` (static 1 KiB file) or `hyper` (in process).
    /// Default: `nginx` when installed.
    pub upstream: Option<String>,
    /// More `shoal` rows, each `shoal:<name>` beside `shoal` (before/after
    /// figures from one run): the binary (`None`: the same as `shoal`'s)
    /// and node flags added to both nodes of that row. Default none.
    pub compare: Vec<Compared>,
}

/// One more `shoal` row of the bench.
#[derive(Debug, Clone, Default)]
pub struct Compared {
    /// The row is `shoal:<name>`.
    pub name: String,
    /// Its binary; `None` runs the `shoal` row's binary.
    pub bin: Option<PathBuf>,
    /// Flags given to both of its nodes, after the bench's own.
    pub node_args: Vec<String>,
}

impl Compared {
    /// Reads `NAME=PATH[ FLAG...]`: an empty PATH is the `shoal` row's
    /// binary, and whitespace separates the node flags that follow it.
    pub fn parse(s: &str) -> Result<Compared, String> {
        let expected = || format!("--compare {s:?}: expected NAME=PATH[ NODE-FLAGS...]");
        let (name, rest) = s.split_once('=').ok_or_else(expected)?;
        let mut words = rest.split_whitespace();
        let bin = if rest.starts_with(char::is_whitespace) || rest.is_empty() {
            None
        } else {
            words.next().map(PathBuf::from)
        };
        let node_args: Vec<String> = words.map(str::to_string).collect();
        if name.is_empty() || (bin.is_none() && node_args.is_empty()) {
            return Err(expected());
        }
        Ok(Compared {
            name: name.to_string(),
            bin,
            node_args,
        })
    }
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            rps: 1000,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            throughput_duration: Duration::from_secs(5),
            connections: 16,
            runs: 3,
            response_bytes: 1024,
            shoal_bin: None,
            paths: PATHS.iter().map(|p| p.to_string()).collect(),
            node_worker_threads: Some(1),
            upstream: None,
            compare: Vec::new(),
        }
    }
}

/// Everything one invocation measured (printed by [`print_table`], written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Runs per path; figures are medians over them.
    pub runs: usize,
    /// Fixed rate of the CPU phase, requests per second.
    pub rps: u32,
    /// Fixed-rate phase length per run, seconds.
    pub duration_s: f64,
    /// Throughput phase length per run, seconds.
    pub throughput_s: f64,
    /// wrk connections (quic-floor streams).
    pub connections: usize,
    /// Upstream response size, bytes.
    pub response_bytes: usize,
    /// What served the 1 KiB responses.
    pub upstream: String,
    /// One entry per path, in the order run.
    pub paths: Vec<PathReport>,
    /// Opaque TCP rows (`direct`, `shoal`), when path `tcp` ran.
    pub tcp: Vec<TcpReport>,
    /// The issue's targets.
    pub targets: Targets,
    /// What the two nodes of each Shoal row cost together at the fixed
    /// rate, beside the least their work could cost here; when nginx-2hop
    /// and quic-floor ran too.
    pub pair_floors: Vec<PairFloor>,
    /// Things the reader should know (skipped paths, binary used).
    pub notes: Vec<String>,
}

/// The targets the issue states.
#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// Shoal throughput / nginx-2hop throughput, at least.
    pub rps_ratio_vs_nginx: f64,
    /// Shoal p99 / nginx-2hop p99, at most.
    pub p99_ratio_vs_nginx: f64,
    /// Shoal throughput / quic-floor throughput, aim.
    pub rps_ratio_vs_floor: f64,
    /// CPU-seconds per 1,000 requests per node, at most.
    pub cpu_s_per_1k_per_node: f64,
    /// RSS per node under load, MiB, at most.
    pub rss_load_mib: f64,
    /// RSS per node idle, MiB, at most.
    pub rss_idle_mib: f64,
}

/// The two Shoal nodes' CPU beside the least their work costs on this host.
///
/// Between them the nodes take a request in over TCP and hand it to the
/// instance over TCP, parsing HTTP on the way (what one nginx hop does: its
/// `nginx-a` worker), and they carry it across one QUIC exchange, both ends
/// (quic-floor's `client` and `server` threads: no HTTP, no TCP, and the
/// client also generates the load). The sum of those three is the floor of
/// the pair; what the nodes spend above it is the proxy's own work.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PairFloor {
    /// The Shoal row: `shoal` or `shoal:NAME`.
    pub path: String,
    /// `nginx-a`'s CPU-s per 1,000 requests.
    pub nginx_hop: f64,
    /// quic-floor's `client` and `server`, the same unit.
    pub quic_client: f64,
    pub quic_server: f64,
    /// Their sum: the floor for the two nodes together.
    pub floor: f64,
    /// `node-a` plus `node-b`.
    pub shoal_pair: f64,
    /// The target for the two nodes together (twice the per-node target).
    pub target: f64,
}

/// Reads a [`PairFloor`] for each Shoal row (`shoal`, `shoal:NAME`) from
/// the paths' medians (none unless nginx-2hop and quic-floor ran and were
/// metered).
pub fn pair_floors(paths: &[PathReport]) -> Vec<PairFloor> {
    let cpu = |path: &str, process: &str| {
        paths
            .iter()
            .find(|p| p.name == path)?
            .processes
            .iter()
            .find(|u| u.name == process)
            .map(|u| u.cpu_s_per_1k)
    };
    let (Some(nginx_hop), Some(quic_client), Some(quic_server)) = (
        cpu("nginx-2hop", "nginx-a"),
        cpu("quic-floor", "client"),
        cpu("quic-floor", "server"),
    ) else {
        return Vec::new();
    };
    let r4 = |v: f64| (v * 10_000.0).round() / 10_000.0;
    paths
        .iter()
        .filter(|p| p.name == "shoal" || p.name.starts_with("shoal:"))
        .filter_map(|p| {
            let shoal_pair = cpu(&p.name, "node-a")? + cpu(&p.name, "node-b")?;
            Some(PairFloor {
                path: p.name.clone(),
                nginx_hop,
                quic_client,
                quic_server,
                floor: r4(nginx_hop + quic_client + quic_server),
                shoal_pair: r4(shoal_pair),
                target: 2.0 * TARGET_CPU_S_PER_1K,
            })
        })
        .collect()
}

/// One path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// One of [`PATHS`].
    pub name: String,
    /// Why the path did not run, if it did not.
    pub skipped: Option<String>,
    /// Why the throughput phase did not run (no wrk), if it did not.
    pub throughput_skipped: Option<String>,
    /// Each run's throughput phase.
    pub runs: Vec<Throughput>,
    /// Medians over `runs`.
    pub median: Option<Throughput>,
    /// Median throughput over nginx-2hop's.
    pub rps_vs_nginx: Option<f64>,
    /// Median p99 over nginx-2hop's.
    pub p99_vs_nginx: Option<f64>,
    /// Median throughput over quic-floor's.
    pub rps_vs_floor: Option<f64>,
    /// The path's proxy processes (threads for quic-floor).
    pub processes: Vec<ProcessUsage>,
}

/// One opaque TCP path's figures.
#[derive(Debug, Clone, Serialize)]
pub struct TcpReport {
    /// `direct` or `shoal`.
    pub name: String,
    /// Bulk transfer MB/s (10^6 bytes) per run.
    pub bulk_mb_s_runs: Vec<f64>,
    /// Ping-pong round trips per second per run.
    pub round_trips_s_runs: Vec<f64>,
    /// Median bulk MB/s.
    pub bulk_mb_s: f64,
    /// Median round trips per second.
    pub round_trips_s: f64,
}

/// One throughput run.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// Requests per second.
    pub rps: f64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Non-2xx answers and socket errors.
    pub errors: u64,
}

/// CPU and memory of one proxy process (or thread, for quic-floor).
#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    /// `node-a`, `node-b`, `nginx-a`, `nginx-b`, `client`, `server`.
    pub name: String,
    /// CPU-seconds per 1,000 requests at the fixed rate, each run.
    pub cpu_s_per_1k_runs: Vec<f64>,
    /// Median of the above.
    pub cpu_s_per_1k: f64,
    /// Resident set after start, before any load, MiB (None for threads).
    pub rss_idle_mib: Option<f64>,
    /// Resident set after at least [`SETTLE`] idle since start, before any
    /// load, MiB: what a node holds once its start-up has passed.
    pub rss_settled_mib: Option<f64>,
    /// Largest resident set sampled under load, MiB.
    pub rss_load_mib: Option<f64>,
    /// Largest anonymous part of it (heap, stacks: not the binary's pages), MiB.
    pub rss_anon_load_mib: Option<f64>,
    /// Context switches (voluntary + not) per request at the fixed rate, median.
    pub switches_per_req: f64,
    /// Resident set 2 s after the last load, MiB.
    pub rss_after_mib: Option<f64>,
}

/// Something whose CPU time can be read: a process or one of our threads.
#[derive(Debug, Clone)]
enum Meter {
    Pid(u32),
    Thread(u32),
}

impl Meter {
    fn cpu_seconds(&self) -> f64 {
        match self {
            Meter::Pid(p) => cpu_seconds(&format!("/proc/{p}/stat")),
            Meter::Thread(t) => cpu_seconds(&format!("/proc/self/task/{t}/stat")),
        }
    }

    fn rss_mib(&self) -> Option<f64> {
        self.status_mib("VmRSS:")
    }

    fn anon_mib(&self) -> Option<f64> {
        self.status_mib("RssAnon:")
    }

    fn status_mib(&self, field: &str) -> Option<f64> {
        match self {
            Meter::Pid(p) => Some(round1(status_kib(*p, field) as f64 / 1024.0)),
            Meter::Thread(_) => None,
        }
    }

    /// Context switches of all its threads so far.
    fn switches(&self) -> u64 {
        let tasks: Vec<PathBuf> = match self {
            Meter::Pid(p) => std::fs::read_dir(format!("/proc/{p}/task"))
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default(),
            Meter::Thread(t) => vec![PathBuf::from(format!("/proc/self/task/{t}"))],
        };
        tasks
            .iter()
            .filter_map(|t| std::fs::read_to_string(t.join("status")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| {
                        l.strip_prefix("voluntary_ctxt_switches:")
                            .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                    .collect::<Vec<_>>()
            })
            .sum()
    }
}

/// How a path's load is driven.
enum Target {
    /// HTTP at this address (wrk and the hyper client).
    Http(SocketAddr),
    /// The QUIC echo.
    Quic(Arc<QuicFloor>),
}

struct Running {
    name: String,
    target: Target,
    meters: Vec<(String, Meter)>,
    report: PathReport,
    rss_idle: Vec<Option<f64>>,
    rss_settled: Vec<Option<f64>>,
    rss_load: Vec<Option<f64>>,
    anon_load: Vec<Option<f64>>,
    cpu: Vec<Vec<f64>>,
    switches: Vec<Vec<f64>>,
}

/// Runs the benchmark.
pub async fn bench_proxy(opts: BenchOptions) -> anyhow::Result<BenchReport> {
    if opts.rps == 0 || opts.duration.is_zero() || opts.connections == 0 || opts.runs == 0 {
        bail!("--rps, --duration, --connections and --runs must be positive");
    }
    for p in &opts.paths {
        if !PATHS.contains(&p.as_str()) {
            bail!("unknown path {p:?} (one of {})", PATHS.join(", "));
        }
    }
    let mut notes = Vec::new();
    let shoal = shoal_binary(&opts)?;
    notes.push(format!("shoal binary: {}", shoal.display()));
    notes.push(link_order_note(&shoal));
    notes.push(match opts.node_worker_threads {
        Some(n) => format!("shoal nodes run with --worker-threads {n}; each nginx with one worker"),
        None => "shoal nodes run one worker thread per CPU; each nginx one worker".into(),
    });
    let nginx = nginx_binary();
    let wrk = on_path("wrk");
    let dir = tempfile::tempdir().context("temp dir")?;

    // The upstream.
    let want_upstream = opts
        .upstream
        .clone()
        .unwrap_or_else(|| if nginx.is_some() { "nginx" } else { "hyper" }.into());
    let mut _hyper_upstream = None;
    let mut _nginx_upstream = None;
    let (upstream_addr, upstream_desc) = match (want_upstream.as_str(), &nginx) {
        ("nginx", Some(bin)) => {
            let n = Nginx::static_file(bin, &dir.path().join("upstream"), opts.response_bytes)?;
            wait_ready(n.addr, "the static file", Duration::from_secs(10)).await?;
            let a = n.addr;
            _nginx_upstream = Some(n);
            (
                a,
                format!(
                    "nginx (1 worker) serving a {} B static file",
                    opts.response_bytes
                ),
            )
        }
        ("nginx", None) => bail!("--upstream nginx: nginx is not on PATH (apt-get install nginx)"),
        ("hyper", _) => {
            let u = Upstream::start(opts.response_bytes).await?;
            let a = u.addr;
            _hyper_upstream = Some(u);
            (
                a,
                format!(
                    "in-process hyper server answering {} B (shares the bench process's CPU)",
                    opts.response_bytes
                ),
            )
        }
        (other, _) => bail!("unknown upstream {other:?} (nginx, hyper)"),
    };
    eprintln!("bench: upstream {upstream_addr}: {upstream_desc}");

    // Start every path once; they stay up across runs.
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mut rows: Vec<Running> = Vec::new();
    let mut skipped_rows: Vec<PathReport> = Vec::new();
    let mut wanted: Vec<(String, PathBuf, Vec<String>)> = Vec::new();
    for path in &opts.paths {
        wanted.push((path.clone(), shoal.clone(), Vec::new()));
        if path == "shoal" {
            for c in &opts.compare {
                let bin = c.bin.clone().unwrap_or_else(|| shoal.clone());
                if !bin.is_file() {
                    bail!("--compare {}={}: no such file", c.name, bin.display());
                }
                notes.push(format!(
                    "shoal:{} binary: {}{}",
                    c.name,
                    bin.display(),
                    if c.node_args.is_empty() {
                        String::new()
                    } else {
                        format!(", nodes also run with {}", c.node_args.join(" "))
                    }
                ));
                notes.push(link_order_note(&bin));
                wanted.push((format!("shoal:{}", c.name), bin, c.node_args.clone()));
            }
        }
    }
    for (path, bin, node_args) in &wanted {
        let name = path.as_str();
        if name == "tcp" {
            continue;
        }
        let kind = if name.starts_with("shoal:") {
            "shoal"
        } else {
            name
        };
        let started: Result<(Target, Vec<(String, Meter)>), String> = match kind {
            "direct" => Ok((Target::Http(upstream_addr), Vec::new())),
            "nginx-2hop" => match &nginx {
                None => Err("nginx is not on PATH; install it (apt-get install nginx) to compare a two-hop nginx chain".into()),
                Some(bin) => {
                    let b = Nginx::proxy(bin, &dir.path().join("nginx-b"), upstream_addr)?;
                    let a = Nginx::proxy(bin, &dir.path().join("nginx-a"), b.addr)?;
                    wait_ready(a.addr, "the chain", Duration::from_secs(10)).await?;
                    let meters = vec![
                        ("nginx-a".to_string(), Meter::Pid(a.worker())),
                        ("nginx-b".to_string(), Meter::Pid(b.worker())),
                    ];
                    let addr = a.addr;
                    keep.push(Box::new(a));
                    keep.push(Box::new(b));
                    Ok((Target::Http(addr), meters))
                }
            },
            "shoal" => {
                let mesh = ShoalPair::start(
                    bin,
                    &dir.path().join(name.replace(':', "-")),
                    upstream_addr,
                    opts.node_worker_threads,
                    node_args,
                )
                .await?;
                let meters = vec![
                    ("node-a".to_string(), Meter::Pid(mesh.a.id())),
                    ("node-b".to_string(), Meter::Pid(mesh.b.id())),
                ];
                let addr = mesh.outbound;
                keep.push(Box::new(mesh));
                Ok((Target::Http(addr), meters))
            }
            "quic-floor" => {
                let floor =
                    QuicFloor::start(&shoal, &dir.path().join("quic"), opts.response_bytes).await?;
                let meters = vec![
                    ("client".to_string(), Meter::Thread(floor.client_tid)),
                    ("server".to_string(), Meter::Thread(floor.server_tid)),
                ];
                Ok((Target::Quic(Arc::new(floor)), meters))
            }
            _ => unreachable!("checked above"),
        };
        match started {
            Err(why) => {
                eprintln!("bench: {name}: skipped: {why}");
                notes.push(format!("{name} skipped: {why}"));
                skipped_rows.push(empty_report(name, Some(why)));
            }
            Ok((target, meters)) => {
                let throughput_skipped = match (&target, &wrk) {
                    (Target::Http(_), None) => Some(
                        "wrk is not on PATH (apt-get install wrk); throughput not measured".into(),
                    ),
                    _ => None,
                };
                let mut report = empty_report(name, None);
                report.throughput_skipped = throughput_skipped;
                let n = meters.len();
                rows.push(Running {
                    name: name.into(),
                    rss_idle: meters.iter().map(|(_, m)| m.rss_mib()).collect(),
                    rss_settled: vec![None; meters.len()],
                    target,
                    meters,
                    report,
                    rss_load: vec![None; n],
                    anon_load: vec![None; n],
                    cpu: vec![Vec::new(); n],
                    switches: vec![Vec::new(); n],
                });
            }
        }
    }

    // Idle until the last path started has been up for SETTLE, then read
    // every process again: the start-up's transients (and, for a node, the
    // code only start-up ran) have passed.
    if rows.iter().any(|r| !r.meters.is_empty()) {
        eprintln!("bench: idle {}s to read settled RSS", SETTLE.as_secs());
        tokio::time::sleep(SETTLE).await;
        for row in rows.iter_mut() {
            row.rss_settled = row.meters.iter().map(|(_, m)| m.rss_mib()).collect();
        }
    }

    let client = client();
    if !opts.warmup.is_zero() {
        for row in &rows {
            eprintln!("bench: warm-up {}", row.name);
            fixed_rate(&client, &row.target, opts.rps, opts.warmup).await;
        }
    }
    for run in 1..=opts.runs {
        for row in rows.iter_mut() {
            if row.report.throughput_skipped.is_some() {
                continue;
            }
            let sampler = RssSampler::start(&row.meters);
            let t = match &row.target {
                Target::Http(addr) => {
                    let wrk = wrk.as_ref().expect("checked");
                    run_wrk(wrk, *addr, opts.connections, opts.throughput_duration).await?
                }
                Target::Quic(floor) => {
                    floor
                        .closed_loop(opts.connections, opts.throughput_duration)
                        .await?
                }
            };
            row.note_rss(sampler.finish());
            eprintln!(
                "bench: run {run}/{} {:<10} {:>8.0} rps  p50 {:.3} ms  p99 {:.3} ms  errors {}",
                opts.runs, row.name, t.rps, t.p50_ms, t.p99_ms, t.errors
            );
            row.report.runs.push(t);
        }
        for row in rows.iter_mut() {
            if row.meters.is_empty() {
                continue;
            }
            let sampler = RssSampler::start(&row.meters);
            let before: Vec<(f64, u64)> = row
                .meters
                .iter()
                .map(|(_, m)| (m.cpu_seconds(), m.switches()))
                .collect();
            let (sent, errors) = fixed_rate(&client, &row.target, opts.rps, opts.duration).await;
            let after: Vec<(f64, u64)> = row
                .meters
                .iter()
                .map(|(_, m)| (m.cpu_seconds(), m.switches()))
                .collect();
            row.note_rss(sampler.finish());
            for (i, (b, a)) in before.iter().zip(&after).enumerate() {
                row.cpu[i].push(round4((a.0 - b.0) / sent.max(1) as f64 * 1000.0));
                row.switches[i].push(a.1.saturating_sub(b.1) as f64 / sent.max(1) as f64);
            }
            if errors > 0 {
                eprintln!(
                    "bench: {}: {errors} of {sent} fixed-rate requests failed",
                    row.name
                );
            }
        }
    }
    drop(client);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut paths = Vec::new();
    for mut row in rows {
        row.report.median = median_of(&row.report.runs);
        row.report.processes = row
            .meters
            .iter()
            .enumerate()
            .map(|(i, (name, m))| ProcessUsage {
                name: name.clone(),
                cpu_s_per_1k: round4(median(&row.cpu[i])),
                cpu_s_per_1k_runs: row.cpu[i].clone(),
                rss_idle_mib: row.rss_idle[i],
                rss_settled_mib: row.rss_settled[i],
                rss_load_mib: row.rss_load[i],
                rss_anon_load_mib: row.anon_load[i],
                switches_per_req: round2(median(&row.switches[i])),
                rss_after_mib: m.rss_mib(),
            })
            .collect();
        paths.push(row.report);
    }
    paths.extend(skipped_rows);
    paths.sort_by_key(|p| {
        let kind = if p.name.starts_with("shoal:") {
            "shoal"
        } else {
            &p.name
        };
        PATHS.iter().position(|n| *n == kind)
    });
    let base = |name: &str| {
        paths
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.median.clone())
    };
    let (nginx_m, floor_m) = (base("nginx-2hop"), base("quic-floor"));
    for p in &mut paths {
        if let Some(m) = &p.median {
            if let Some(n) = &nginx_m {
                p.rps_vs_nginx = Some(round2(m.rps / n.rps));
                p.p99_vs_nginx = Some(round2(m.p99_ms / n.p99_ms));
            }
            if let Some(f) = &floor_m {
                p.rps_vs_floor = Some(round2(m.rps / f.rps));
            }
        }
    }
    drop(keep);
    let tcp = if opts.paths.iter().any(|p| p == "tcp") {
        bench_tcp(&shoal, &dir.path().join("tcp"), &opts).await?
    } else {
        Vec::new()
    };
    let floors = pair_floors(&paths);
    Ok(BenchReport {
        runs: opts.runs,
        rps: opts.rps,
        duration_s: opts.duration.as_secs_f64(),
        throughput_s: opts.throughput_duration.as_secs_f64(),
        connections: opts.connections,
        response_bytes: opts.response_bytes,
        upstream: upstream_desc,
        paths,
        tcp,
        targets: Targets {
            rps_ratio_vs_nginx: TARGET_RPS_RATIO,
            p99_ratio_vs_nginx: TARGET_P99_RATIO,
            rps_ratio_vs_floor: TARGET_FLOOR_RATIO,
            cpu_s_per_1k_per_node: TARGET_CPU_S_PER_1K,
            rss_load_mib: TARGET_RSS_LOAD_MIB,
            rss_idle_mib: TARGET_RSS_IDLE_MIB,
        },
        pair_floors: floors,
        notes,
    })
}

/// Prints a report as tables.
pub fn print_table(r: &BenchReport) {
    println!(
        "throughput: wrk -t1 -c{} -d{:.0}s (quic-floor: {} streams on one connection), {} B responses, median of {} runs",
        r.connections, r.throughput_s, r.connections, r.response_bytes, r.runs
    );
    println!("upstream: {}", r.upstream);
    println!(
        "{:<13} {:>9} {:>10} {:>10} {:>7} {:>7} {:>8} {:>7}",
        "path", "rps", "p50", "p99", "rps×", "p99×", "÷floor", "errors"
    );
    let ratio = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    for p in &r.paths {
        if let Some(why) = p.skipped.as_ref().or(p.throughput_skipped.as_ref()) {
            println!("{:<13} skipped: {why}", p.name);
            continue;
        }
        let Some(m) = &p.median else { continue };
        println!(
            "{:<13} {:>9.0} {:>8.3}ms {:>8.3}ms {:>7} {:>7} {:>8} {:>7}",
            p.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            ratio(p.rps_vs_nginx),
            ratio(p.p99_vs_nginx),
            ratio(p.rps_vs_floor),
            p.runs.iter().map(|t| t.errors).sum::<u64>()
        );
    }
    println!(
        "(rps× and p99×: over nginx-2hop; ÷floor: rps over quic-floor. Targets for shoal: rps× ≥ {}, p99× ≤ {}, ÷floor ≥ {})",
        r.targets.rps_ratio_vs_nginx, r.targets.p99_ratio_vs_nginx, r.targets.rps_ratio_vs_floor
    );
    println!();
    println!(
        "per node at {} rps for {:.0}s (open loop), median of {} runs; switch/rq = context switches per request; RSS idle = after start, settled = after 15 s idle, load = peak sampled under load (anon: without the binary's own pages), after = 2 s after the last load",
        r.rps, r.duration_s, r.runs
    );
    println!(
        "{:<13} {:<8} {:>9} {:>9} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "path",
        "process",
        "cpu-s/1k",
        "switch/rq",
        "RSS idle",
        "settled",
        "RSS load",
        "anon load",
        "RSS after"
    );
    let mib = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} MiB"));
    for p in &r.paths {
        for u in &p.processes {
            println!(
                "{:<13} {:<8} {:>9.4} {:>9.2} {:>10} {:>10} {:>10} {:>10} {:>10}",
                p.name,
                u.name,
                u.cpu_s_per_1k,
                u.switches_per_req,
                mib(u.rss_idle_mib),
                mib(u.rss_settled_mib),
                mib(u.rss_load_mib),
                mib(u.rss_anon_load_mib),
                mib(u.rss_after_mib)
            );
        }
    }
    println!(
        "(targets per Shoal node: ≤ {} cpu-s per 1,000 requests, RSS ≤ {} MiB under load, ≤ {} MiB idle (the settled column; the idle column is read as the nodes first answer, before their code release 1 s after ready); quic-floor's two endpoints share this process, so no RSS)",
        r.targets.cpu_s_per_1k_per_node, r.targets.rss_load_mib, r.targets.rss_idle_mib
    );
    for f in &r.pair_floors {
        println!(
            "{}: the two nodes together: {:.4} cpu-s per 1,000 requests; their floor here, one nginx hop (nginx-a {:.4}) + both ends of the bare QUIC exchange (client {:.4} + server {:.4}) = {:.4}, the nodes {:+.4} from it (above it: the proxy's own work); the target for the two is {:.4}{}",
            f.path,
            f.shoal_pair,
            f.nginx_hop,
            f.quic_client,
            f.quic_server,
            f.floor,
            f.shoal_pair - f.floor,
            f.target,
            if f.floor > f.target {
                " (under the floor: on this host no proxy that carries QUIC between the nodes meets it)"
            } else {
                ""
            }
        );
    }
    if !r.tcp.is_empty() {
        println!();
        println!(
            "opaque TCP: bulk = one connection writes {} MiB then shuts its write side; ping-pong = {} B each way on one connection for {:.0}s; median of {} runs",
            TCP_BULK_BYTES >> 20,
            TCP_PING_BYTES,
            r.throughput_s,
            r.runs
        );
        println!("{:<13} {:>10} {:>14}", "path", "bulk MB/s", "round trips/s");
        for t in &r.tcp {
            println!(
                "{:<13} {:>10.1} {:>14.0}",
                format!("tcp-{}", t.name),
                t.bulk_mb_s,
                t.round_trips_s
            );
        }
    }
    for n in &r.notes {
        println!("note: {n}");
    }
}

// === opaque TCP ===

/// Runs the TCP rows: `direct` and `shoal` (two nodes, `tcp://` service).
async fn bench_tcp(
    shoal: &Path,
    dir: &Path,
    opts: &BenchOptions,
) -> anyhow::Result<Vec<TcpReport>> {
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let server_addr = server.local_addr()?;
    let serving = tokio::spawn(tcp_bench_server(server));
    std::fs::create_dir_all(dir)?;
    let common: Vec<String> = match opts.node_worker_threads {
        Some(n) => vec!["--worker-threads".into(), n.to_string()],
        None => Vec::new(),
    };
    issue_certs(shoal, dir, &[("a", "client"), ("b", "bulk")])?;
    let (b, b_quic) = start_node(
        shoal,
        dir,
        "b",
        &[
            &common[..],
            &["--service".into(), format!("bulk=tcp://{server_addr}")],
        ]
        .concat(),
    )?;
    let upstream = free_tcp_port()?;
    let (a, _) = start_node(
        shoal,
        dir,
        "a",
        &[
            &common[..],
            &[
                "--seed".into(),
                b_quic.to_string(),
                "--upstream".into(),
                format!("bulk={upstream}"),
            ],
        ]
        .concat(),
    )?;
    // Ready once a ping-pong goes through the mesh.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if tcp_ping_pong(upstream, Duration::from_millis(100))
            .await
            .is_ok_and(|n| n > 0)
        {
            break;
        }
        if Instant::now() > end {
            bail!(
                "the TCP path through shoal never answered\n--- node a log ---\n{}\n--- node b log ---\n{}",
                a.log_tail(),
                b.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut rows = vec![
        ("direct", server_addr, Vec::new(), Vec::new()),
        ("shoal", upstream, Vec::new(), Vec::new()),
    ];
    for run in 1..=opts.runs {
        for (name, addr, bulk, pp) in rows.iter_mut() {
            let mb_s = tcp_bulk(*addr).await?;
            let rt_s = tcp_ping_pong(*addr, opts.throughput_duration).await? as f64
                / opts.throughput_duration.as_secs_f64();
            eprintln!(
                "bench: run {run}/{} tcp-{name:<6} bulk {mb_s:.1} MB/s  ping-pong {rt_s:.0} round trips/s",
                opts.runs
            );
            bulk.push(round1(mb_s));
            pp.push(rt_s.round());
        }
    }
    drop((a, b));
    serving.abort();
    Ok(rows
        .into_iter()
        .map(|(name, _, bulk, pp)| TcpReport {
            name: name.into(),
            bulk_mb_s: round1(median(&bulk)),
            round_trips_s: median(&pp).round(),
            bulk_mb_s_runs: bulk,
            round_trips_s_runs: pp,
        })
        .collect())
}

/// The TCP bench server: the first byte picks the mode. `B`: reads to end
/// of file, then answers the byte count (8 bytes, big-endian) and closes.
/// `P`: echoes everything.
async fn tcp_bench_server(l: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut s, _)) = l.accept().await {
        let _ = s.set_nodelay(true);
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if s.read_exact(&mut mode).await.is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 << 10];
            match mode[0] {
                b'B' => {
                    let mut n = 0u64;
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) => break,
                            Ok(k) => n += k as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = s.write_all(&n.to_be_bytes()).await;
                    let _ = s.shutdown().await;
                }
                _ => loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => {
                            if s.write_all(&buf[..k]).await.is_err() {
                                return;
                            }
                        }
                    }
                },
            }
        });
    }
}

/// Writes [`TCP_BULK_BYTES`] to `addr` (mode `B`); MB/s until the server
/// confirmed it read them all.
async fn tcp_bulk(addr: SocketAddr) -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let _ = s.set_nodelay(true);
    let chunk = vec![0x5au8; 256 << 10];
    let t0 = Instant::now();
    s.write_all(b"B").await?;
    let mut left = TCP_BULK_BYTES;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await?;
        left -= n;
    }
    s.shutdown().await?;
    let mut count = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(120), s.read_exact(&mut count))
        .await
        .context("bulk: no answer")??;
    let secs = t0.elapsed().as_secs_f64();
    let got = u64::from_be_bytes(count);
    if got != TCP_BULK_BYTES as u64 {
        bail!("bulk: the server read {got} of {TCP_BULK_BYTES} bytes");
    }
    Ok(TCP_BULK_BYTES as f64 / 1e6 / secs)
}

/// Ping-pongs [`TCP_PING_BYTES`] with `addr` (mode `P`) for `d`; round trips.
async fn tcp_ping_pong(addr: SocketAddr, d: Duration) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .context("connect timed out")??;
    let _ = s.set_nodelay(true);
    s.write_all(b"P").await?;
    let msg = [0x42u8; TCP_PING_BYTES];
    let mut back = [0u8; TCP_PING_BYTES];
    let end = Instant::now() + d;
    let mut n = 0;
    while Instant::now() < end {
        s.write_all(&msg).await?;
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .context("ping-pong: no answer")??;
        n += 1;
    }
    Ok(n)
}

fn empty_report(name: &str, skipped: Option<String>) -> PathReport {
    PathReport {
        name: name.into(),
        skipped,
        throughput_skipped: None,
        runs: Vec::new(),
        median: None,
        rps_vs_nginx: None,
        p99_vs_nginx: None,
        rps_vs_floor: None,
        processes: Vec::new(),
    }
}

fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Per-figure medians (each figure on its own).
fn median_of(runs: &[Throughput]) -> Option<Throughput> {
    if runs.is_empty() {
        return None;
    }
    let m = |f: fn(&Throughput) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Some(Throughput {
        rps: m(|t| t.rps).round(),
        p50_ms: round3(m(|t| t.p50_ms)),
        p99_ms: round3(m(|t| t.p99_ms)),
        errors: runs.iter().map(|t| t.errors).sum(),
    })
}

fn max_opt(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

fn round4(v: f64) -> f64 {
    (v * 1e4).round() / 1e4
}

impl Running {
    fn note_rss(&mut self, peaks: Vec<(Option<f64>, Option<f64>)>) {
        for (i, (rss, anon)) in peaks.into_iter().enumerate() {
            self.rss_load[i] = max_opt(self.rss_load[i], rss);
            self.anon_load[i] = max_opt(self.anon_load[i], anon);
        }
    }
}

// === load ===

/// Samples the resident set of some processes every 100 ms until finished.
struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Option<f64>, Option<f64>)>>,
}

impl RssSampler {
    fn start(meters: &[(String, Meter)]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let meters: Vec<Meter> = meters.iter().map(|(_, m)| m.clone()).collect();
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = vec![(None, None); meters.len()];
            loop {
                for (p, m) in peak.iter_mut().zip(&meters) {
                    p.0 = max_opt(p.0, m.rss_mib());
                    p.1 = max_opt(p.1, m.anon_mib());
                }
                if s.load(Ordering::Relaxed) {
                    return peak;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        RssSampler { stop, thread }
    }

    fn finish(self) -> Vec<(Option<f64>, Option<f64>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// Runs `wrk -t1 -c<connections> -d<duration> --latency` against `addr`
/// (with `Host: web`, which Shoal routes by) and parses its summary.
async fn run_wrk(
    wrk: &Path,
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
) -> anyhow::Result<Throughput> {
    let out = tokio::process::Command::new(wrk)
        .args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .args(["--latency", "-H", "Host: web"])
        .arg(format!("http://{addr}/bench"))
        .output()
        .await
        .with_context(|| format!("running {}", wrk.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "wrk failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&text).ok_or_else(|| anyhow!("could not read wrk's output:\n{text}"))
}

/// Reads requests/s, the 50 % and 99 % latencies, and errors from wrk's summary.
fn parse_wrk(text: &str) -> Option<Throughput> {
    let mut rps = None;
    let (mut p50, mut p99) = (None, None);
    let mut errors = 0u64;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => rps = v.parse::<f64>().ok(),
            ["50%", v] => p50 = wrk_ms(v),
            ["99%", v] => p99 = wrk_ms(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().unwrap_or(0),
            ["Socket", "errors:", rest @ ..] => {
                errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>()
            }
            _ => {}
        }
    }
    Some(Throughput {
        rps: rps?.round(),
        p50_ms: round3(p50?),
        p99_ms: round3(p99?),
        errors,
    })
}

/// A wrk latency (`310.00us`, `1.20ms`, `2.00s`) in ms.
fn wrk_ms(v: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1e-3)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|n| n * scale)
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

async fn http_ok(client: &BenchClient, addr: SocketAddr) -> bool {
    match client.request(request(addr)).await {
        Ok(resp) if resp.status() == 200 => resp.into_body().collect().await.is_ok(),
        Ok(resp) => {
            let _ = resp.into_body().collect().await;
            false
        }
        Err(_) => false,
    }
}

type OneRequest = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Sends `rps` requests a second for `duration` at `target`, each at its
/// scheduled time whatever the previous ones are doing (open loop). Returns
/// (sent, failed).
async fn fixed_rate(
    client: &BenchClient,
    target: &Target,
    rps: u32,
    duration: Duration,
) -> (u64, u64) {
    let (one, handle): (OneRequest, tokio::runtime::Handle) = match target {
        Target::Http(addr) => {
            let (client, addr) = (client.clone(), *addr);
            (
                Arc::new(move || {
                    let client = client.clone();
                    Box::pin(async move { http_ok(&client, addr).await })
                }),
                tokio::runtime::Handle::current(),
            )
        }
        Target::Quic(floor) => {
            let f = floor.clone();
            (
                Arc::new(move || {
                    let f = f.clone();
                    Box::pin(async move { f.one().await.is_ok() })
                }),
                floor.client.clone(),
            )
        }
    };
    let total = (f64::from(rps) * duration.as_secs_f64()).round() as u64;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rps));
    let (tx, mut rx) = mpsc::unbounded_channel::<bool>();
    // A plain thread paces the schedule (tokio's timer has 1 ms granularity).
    let pacer = std::thread::spawn(move || {
        let start = Instant::now() + Duration::from_millis(5);
        for i in 0..total {
            let at = start + interval.mul_f64(i as f64);
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            let (one, tx) = (one.clone(), tx.clone());
            handle.spawn(async move {
                let _ = tx.send(one().await);
            });
        }
    });
    let mut errors = 0;
    while let Some(ok) = rx.recv().await {
        if !ok {
            errors += 1;
        }
    }
    let _ = pacer.join();
    (total, errors)
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

// === quic-floor ===

/// Two transport endpoints, each on a one-thread runtime of its own thread:
/// the server answers every bidirectional stream with the response body.
struct QuicFloor {
    client: tokio::runtime::Handle,
    client_tid: u32,
    server_tid: u32,
    conn: quinn::Connection,
    _client_ep: transport::Endpoint,
    _stop: Vec<std::sync::mpsc::Sender<()>>,
}

/// The request the floor's client sends (about a Shoal request head's size).
const FLOOR_REQUEST: [u8; 64] = [b'r'; 64];

impl QuicFloor {
    async fn start(shoal: &Path, dir: &Path, response_bytes: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        issue_certs(shoal, dir, &[("qa", "client"), ("qb", "web")])?;
        transport::install_crypto_provider();
        let body = Bytes::from(vec![b'x'; response_bytes]);
        let (server_dir, client_dir) = (dir.join("qb"), dir.join("qa"));
        let (_server, server_addr, server_tid, stop_s) =
            runtime_thread("floor-server", move || async move {
                let ep = transport::Endpoint::bind(transport::EndpointConfig::new(
                    "127.0.0.1:0".parse().expect("addr"),
                    transport::TlsFiles::new(server_dir),
                ))
                .map_err(|e| anyhow!("quic-floor server: {e}"))?;
                let mut streams = ep
                    .take_bi_streams()
                    .ok_or_else(|| anyhow!("no bi-stream receiver"))?;
                let addr = ep.local_addr();
                tokio::spawn(async move {
                    let _ep = ep;
                    while let Some(mut s) = streams.recv().await {
                        let body = body.clone();
                        tokio::spawn(async move {
                            if s.recv.read_to_end(64 << 10).await.is_ok()
                                && s.send.write_chunk(body).await.is_ok()
                            {
                                let _ = s.send.finish();
                            }
                        });
                    }
                });
                Ok(addr)
            })?;
        let (client, (client_ep, conn), client_tid, stop_c) =
            runtime_thread("floor-client", move || async move {
                let ep = transport::Endpoint::bind(transport::EndpointConfig::new(
                    "127.0.0.1:0".parse().expect("addr"),
                    transport::TlsFiles::new(client_dir),
                ))
                .map_err(|e| anyhow!("quic-floor client: {e}"))?;
                let c = ep
                    .connect(server_addr)
                    .await
                    .map_err(|e| anyhow!("quic-floor connect: {e}"))?;
                Ok((ep, c.conn))
            })?;
        let floor = QuicFloor {
            client,
            client_tid,
            server_tid,
            conn,
            _client_ep: client_ep,
            _stop: vec![stop_s, stop_c],
        };
        floor
            .one()
            .await
            .map_err(|e| anyhow!("quic-floor first request: {e}"))?;
        Ok(floor)
    }

    /// One request/response on a new stream.
    fn one(&self) -> impl Future<Output = anyhow::Result<()>> + Send + 'static {
        let conn = self.conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(&FLOOR_REQUEST).await?;
            send.finish()?;
            recv.read_to_end(1 << 20).await?;
            Ok(())
        }
    }

    /// `streams` concurrent request loops for `duration` on the client runtime.
    async fn closed_loop(
        self: &Arc<Self>,
        streams: usize,
        duration: Duration,
    ) -> anyhow::Result<Throughput> {
        let me = self.clone();
        let run = self.client.spawn(async move {
            let start = Instant::now();
            let end = start + duration;
            let mut tasks = Vec::new();
            for _ in 0..streams {
                let me = me.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut errors = 0u64;
                    while Instant::now() < end {
                        let t = Instant::now();
                        match me.one().await {
                            Ok(()) => lat.push(t.elapsed()),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                }));
            }
            let mut lat = Vec::new();
            let mut errors = 0;
            for t in tasks {
                if let Ok((l, e)) = t.await {
                    lat.extend(l);
                    errors += e;
                }
            }
            (lat, errors, start.elapsed())
        });
        let (mut lat, errors, took) = run.await?;
        lat.sort_unstable();
        let q = |p: f64| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
            round3(lat[i].as_secs_f64() * 1e3)
        };
        Ok(Throughput {
            rps: (lat.len() as f64 / took.as_secs_f64()).round(),
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            errors,
        })
    }
}

/// Starts a thread with a one-thread runtime, runs `setup` on it and keeps
/// the runtime alive until the returned sender is dropped. Returns the
/// runtime's handle, what `setup` produced, and the thread's id.
fn runtime_thread<T, F, Fut>(
    name: &str,
    setup: F,
) -> anyhow::Result<(tokio::runtime::Handle, T, u32, std::sync::mpsc::Sender<()>)>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow!("runtime: {e}")));
                    return;
                }
            };
            let tid = thread_id();
            let out = rt.block_on(setup());
            let ok = out.is_ok();
            let _ = tx.send(out.map(|v| (rt.handle().clone(), v, tid)));
            if ok {
                // Drive the runtime until told to stop (the sender drops).
                rt.block_on(async move {
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = stop_rx.recv();
                    })
                    .await;
                });
            }
        })?;
    let (handle, v, tid) = rx
        .recv()
        .map_err(|_| anyhow!("{name} thread ended early"))??;
    Ok((handle, v, tid, stop_tx))
}

/// The calling thread's kernel id.
fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

// === /proc ===

/// User + system CPU of a process or thread (`/proc/.../stat`), seconds. 0 if unreadable.
fn cpu_seconds(stat_path: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
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

/// A KiB field (`VmRSS:`, `RssAnon:`) of a process's status. 0 if unreadable.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

// === in-process upstream ===

/// The in-process upstream (`--upstream hyper`).
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

// === link order ===

/// The node's link-order list (`node/build.rs` hands it to the linker).
const HOT_SYMBOLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../node/hot-symbols.txt");

/// How many names of the link-order list `bin` still has. The names are
/// mangled with a hash of their crate's build (its dependencies and
/// features), so a change can rename many of them at once; the ones
/// missing are left where the linker puts them, spread over the binary's
/// code, and a node's resident code grows (docs/PROXY.md, "Code layout").
fn link_order_note(bin: &Path) -> String {
    let list = match std::fs::read_to_string(HOT_SYMBOLS) {
        Ok(l) => l,
        Err(e) => return format!("link order of {}: {HOT_SYMBOLS}: {e}", bin.display()),
    };
    let out = match Command::new("nm").arg("--defined-only").arg(bin).output() {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            return format!(
                "link order of {}: nm failed: {}",
                bin.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Err(e) => return format!("link order of {}: nm: {e} (binutils)", bin.display()),
    };
    let (found, listed) = hot_symbols_present(&list, &String::from_utf8_lossy(&out));
    let stale = if listed > 0 && found * 10 < listed * 9 {
        "; under 90 %: regenerate it (node/proxy/bench/runtime-symbols.sh)"
    } else {
        ""
    };
    format!(
        "link order: {found} of the {listed} names of node/hot-symbols.txt are in {}{stale}",
        bin.display()
    )
}

/// Names of `list` (one a line) that `nm` output defines, and how many
/// `list` has.
fn hot_symbols_present(list: &str, nm: &str) -> (usize, usize) {
    let defined: std::collections::HashSet<&str> = nm
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let names: std::collections::HashSet<&str> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let found = names.iter().filter(|n| defined.contains(*n)).count();
    (found, names.len())
}

// === nginx ===

fn nginx_binary() -> Option<PathBuf> {
    on_path("nginx")
}

/// One nginx master with one worker.
struct Nginx {
    addr: SocketAddr,
    proc: Proc,
}

impl Nginx {
    /// Serves a static file of `size` bytes at every path.
    fn static_file(bin: &Path, dir: &Path, size: usize) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("www"))?;
        std::fs::write(dir.join("www").join("bench.bin"), vec![b'x'; size])?;
        let www = dir.join("www");
        let server = format!(
            "location / {{ root {}; try_files /bench.bin =404; }}",
            www.display()
        );
        Self::start(bin, dir, "", &server)
    }

    /// Reverse-proxies to `upstream` over keep-alive connections.
    fn proxy(bin: &Path, dir: &Path, upstream: SocketAddr) -> anyhow::Result<Self> {
        let http = format!(
            "upstream next_hop {{ server {upstream}; keepalive 64; keepalive_requests 100000000; }}"
        );
        let server = "location / { proxy_pass http://next_hop; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
        Self::start(bin, dir, &http, server)
    }

    fn start(bin: &Path, dir: &Path, http: &str, server: &str) -> anyhow::Result<Self> {
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
    keepalive_requests 100000000;
    keepalive_timeout 75s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    {http}
    server {{
        listen {addr};
        {server}
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
            proc: Proc { child, log },
        })
    }

    /// The worker process (child of the master); the master if none is seen.
    fn worker(&self) -> u32 {
        let pid = self.proc.id();
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .find_map(|p| p.parse().ok())
            .unwrap_or(pid)
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

/// A CA in `dir/ca` and, per `(name, service)`, a node certificate in `dir/<name>`.
fn issue_certs(bin: &Path, dir: &Path, nodes: &[(&str, &str)]) -> anyhow::Result<()> {
    let ca = dir.join("ca");
    run(Command::new(bin)
        .args(["cert", "init", "--trust-domain", "bench.shoal", "--out"])
        .arg(&ca))?;
    for (name, svc) in nodes {
        run(Command::new(bin)
            .args(["cert", "issue", "--ca"])
            .arg(&ca)
            .args(["--name", name, "--service", svc, "--out"])
            .arg(dir.join(name)))?;
    }
    Ok(())
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
        node_args: &[String],
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut common: Vec<String> = match threads {
            Some(n) => vec!["--worker-threads".into(), n.to_string()],
            None => Vec::new(),
        };
        common.extend(node_args.iter().cloned());
        issue_certs(bin, dir, &[("a", "client"), ("b", "web")])?;
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
    let proc = Proc { child, log };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_the_listed_names_the_binary_defines() {
        let list = "_ZN5quinn4poll17h1E\nfoo\n\nfoo\n_ZN3bar17h2E\n";
        let nm = "0000000000001000 T _ZN5quinn4poll17h1E\n                 U malloc\n0000000000002000 t foo\n0000000000003000 T _ZN3bar17h9E\n";
        // Three distinct names listed; `bar` was renamed (another hash),
        // `malloc` is undefined and has no third field.
        assert_eq!(hot_symbols_present(list, nm), (2, 3));
        assert_eq!(hot_symbols_present("", nm), (0, 0));
    }

    #[test]
    fn reads_wrk_summary() {
        let out = "Running 5s test @ http://127.0.0.1:1/bench
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   612.31us  201.20us   9.87ms   90.00%
    Req/Sec    26.10k     1.20k   28.00k    70.00%
  Latency Distribution
     50%  580.00us
     75%  650.00us
     90%  800.00us
     99%    1.52ms
  130000 requests in 5.00s, 150.00MB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:  26000.42
Transfer/sec:     30.00MB
";
        let t = parse_wrk(out).expect("parsed");
        assert_eq!(t.rps, 26000.0);
        assert_eq!(t.p50_ms, 0.58);
        assert_eq!(t.p99_ms, 1.52);
        assert_eq!(t.errors, 6);
        assert_eq!(wrk_ms("2.00s"), Some(2000.0));
    }

    #[test]
    fn compare_rows_read_a_binary_and_node_flags() {
        let c = Compared::parse("old=/tmp/shoal").unwrap();
        assert_eq!(
            (c.name.as_str(), c.bin, c.node_args.len()),
            ("old", Some(PathBuf::from("/tmp/shoal")), 0)
        );
        let c = Compared::parse("batch= --sched-policy batch").unwrap();
        assert_eq!(c.bin, None);
        assert_eq!(c.node_args, ["--sched-policy", "batch"]);
        let c = Compared::parse("b=/x/shoal --sched-policy batch").unwrap();
        assert_eq!(c.bin, Some(PathBuf::from("/x/shoal")));
        assert_eq!(c.node_args, ["--sched-policy", "batch"]);
        for bad in ["", "noequals", "=/x", "empty="] {
            assert!(Compared::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn medians_per_figure() {
        let t = |rps, p99| Throughput {
            rps,
            p50_ms: 1.0,
            p99_ms: p99,
            errors: 0,
        };
        let m = median_of(&[t(10.0, 3.0), t(30.0, 1.0), t(20.0, 2.0)]).unwrap();
        assert_eq!((m.rps, m.p99_ms), (20.0, 2.0));
    }

    fn metered(name: &str, processes: &[(&str, f64)]) -> PathReport {
        PathReport {
            name: name.to_string(),
            skipped: None,
            throughput_skipped: None,
            runs: Vec::new(),
            median: None,
            rps_vs_nginx: None,
            p99_vs_nginx: None,
            rps_vs_floor: None,
            processes: processes
                .iter()
                .map(|(n, cpu)| ProcessUsage {
                    name: n.to_string(),
                    cpu_s_per_1k_runs: vec![*cpu],
                    cpu_s_per_1k: *cpu,
                    rss_idle_mib: None,
                    rss_settled_mib: None,
                    rss_load_mib: None,
                    rss_anon_load_mib: None,
                    switches_per_req: 0.0,
                    rss_after_mib: None,
                })
                .collect(),
        }
    }

    #[test]
    fn the_pair_floor_is_an_nginx_hop_plus_both_quic_ends() {
        let paths = vec![
            metered("nginx-2hop", &[("nginx-a", 0.094), ("nginx-b", 0.086)]),
            metered("shoal", &[("node-a", 0.162), ("node-b", 0.148)]),
            metered("quic-floor", &[("client", 0.084), ("server", 0.076)]),
            metered("shoal:batch", &[("node-a", 0.11), ("node-b", 0.108)]),
        ];
        let mut f = pair_floors(&paths);
        let batch = f.pop().expect("two shoal rows");
        assert_eq!(
            (batch.path.as_str(), batch.shoal_pair),
            ("shoal:batch", 0.218)
        );
        assert_eq!(
            f,
            vec![PairFloor {
                path: "shoal".into(),
                nginx_hop: 0.094,
                quic_client: 0.084,
                quic_server: 0.076,
                floor: 0.254,
                shoal_pair: 0.31,
                target: 0.16,
            }]
        );
        // Without the floor's row there is nothing to compare against.
        assert_eq!(pair_floors(&paths[..2]), vec![]);
    }
}
