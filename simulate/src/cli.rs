//! The `simulate` command line: parses flags and calls the library.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::model::{self, ModelConfig, ModelReport};

/// Exit code for bad usage (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
/// Exit code when an invariant fails.
pub const EXIT_FAILED: i32 = 1;

/// Shoal's chaos harness: scenarios against real in-process nodes, and a
/// large-N model of the gossip layer.
#[derive(Debug, Parser)]
#[command(name = "simulate", version)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List bundled scenarios, one line each.
    List {
        /// Folder to list [default: the bundled simulate/scenarios].
        dir: Option<PathBuf>,
    },
    /// Run one scenario and print a verdict per invariant.
    Run {
        /// Scenario: a file path, or a bundled name as `simulate list` prints
        /// it (`partition-heal`, `partition-heal.toml`, `ci/…`), from any folder.
        scenario: PathBuf,
        /// Seed for every random choice the harness makes [default: from the clock].
        #[arg(long)]
        seed: Option<u64>,
        /// Write report.json and timeline.svg into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Run real `shoal node` processes (crash = SIGKILL, pause = SIGSTOP)
        /// instead of in-process nodes; network-fault and skew steps are refused.
        #[arg(long)]
        processes: bool,
        /// The shoal binary for --processes [default: target/release/shoal].
        #[arg(long, requires = "processes")]
        shoal: Option<PathBuf>,
    },
    /// Run every scenario in a folder (the CI suite: simulate/scenarios/ci).
    RunSuite {
        /// Folder of scenario files.
        dir: PathBuf,
        /// Seed for every scenario [default: from the clock].
        #[arg(long, conflicts_with = "seeds")]
        seed: Option<u64>,
        /// Run the whole suite once per seed: a range and/or a list
        /// (`1-20`, `1,7,42`, `1-5,42`), then print a scenario × seed table.
        #[arg(long, value_parser = parse_seed_list)]
        seeds: Option<SeedList>,
        /// Write one report folder per scenario under this folder
        /// (`seed-<N>/<scenario>` with `--seeds`).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Run real `shoal node` processes (crash = SIGKILL, pause = SIGSTOP)
        /// instead of in-process nodes; network-fault and skew steps are refused.
        #[arg(long)]
        processes: bool,
        /// The shoal binary for --processes [default: target/release/shoal].
        #[arg(long, requires = "processes")]
        shoal: Option<PathBuf>,
    },
    /// Benchmarks (commands that print figures, never timed tests).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Model only the gossip layer: many chitchat nodes (the gossip crate's
    /// settings and schema) in one process, zone pools and a backbone,
    /// virtual time.
    Model {
        /// Node counts; repeat or comma-separate (each count runs in its own
        /// process so its peak memory is its own).
        #[arg(long, value_delimiter = ',', required = true)]
        nodes: Vec<usize>,
        /// Zones: each its own gossip pool; 3 representatives per zone in a
        /// backbone pool carry summaries between them.
        #[arg(long, default_value_t = 1)]
        zones: usize,
        /// Gossip interval [default: the shipped 300ms].
        #[arg(long, alias = "gossip-interval", value_parser = parse_duration)]
        interval: Option<Duration>,
        /// Fraction of messages lost, 0 to <1.
        #[arg(long, default_value_t = 0.0)]
        loss: f64,
        /// Failure-detector phi threshold [default: the shipped 8].
        #[arg(long)]
        phi_threshold: Option<f64>,
        /// Failure-detector samples kept per peer [default: the shipped 100].
        #[arg(long)]
        sampling_window: Option<usize>,
        /// Joins plus leaves per second after formation.
        #[arg(long, default_value_t = 0.0)]
        churn: f64,
        /// Cut this zone (0-based) off from the others after the detection
        /// phase, then heal.
        #[arg(long)]
        partition_zone: Option<usize>,
        /// Stop after this much wall time, printing what was measured.
        #[arg(long, default_value = "50m", value_parser = parse_duration)]
        wall_limit: Duration,
        /// Seed for loss, churn and choices [default: from the clock].
        #[arg(long)]
        seed: Option<u64>,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Write model.json into this folder.
        #[arg(long)]
        report: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Throughput and latency (wrk), CPU per 1,000 requests at a fixed rate
    /// and RSS per node, side by side: direct, a plaintext two-hop nginx
    /// chain, Shoal (client -> node A -> QUIC/mTLS -> node B -> upstream)
    /// and the bare QUIC transport (quic-floor); medians over several runs.
    Proxy {
        /// Requests per second of the fixed-rate (CPU) phase.
        #[arg(long, default_value_t = 1000)]
        rps: u32,
        /// Fixed-rate phase per path and run.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        /// wrk run per path and run.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        throughput_duration: Duration,
        /// wrk connections (quic-floor: concurrent streams).
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Runs; the table shows medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Also write the report as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// The `shoal` binary [default: $SHOAL_BIN, else target/release/shoal].
        #[arg(long)]
        shoal_bin: Option<PathBuf>,
        /// `--worker-threads` of each Shoal node (0: one per CPU).
        #[arg(long, default_value_t = 1)]
        node_threads: usize,
        /// Paths to run, comma-separated: direct, nginx-2hop, shoal,
        /// quic-floor, tcp (opaque TCP bulk and ping-pong, direct vs shoal).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "direct,nginx-2hop,shoal,quic-floor,tcp"
        )]
        paths: Vec<String>,
        /// The upstream: nginx (a static 1 KiB file) or hyper (in process)
        /// [default: nginx when installed].
        #[arg(long)]
        upstream: Option<String>,
        /// Another `shoal` row `shoal:NAME` (repeatable): before/after
        /// figures from one run. PATH is another binary (empty: the same
        /// one); node flags after it go to both of that row's nodes, e.g.
        /// `--compare 'batch= --sched-policy batch'`.
        #[arg(long, value_name = "NAME=PATH[ NODE-FLAGS...]")]
        compare: Vec<String>,
    },
}

fn bench_cmd(cmd: BenchCommand) -> i32 {
    let BenchCommand::Proxy {
        rps,
        duration,
        throughput_duration,
        connections,
        runs,
        json,
        shoal_bin,
        node_threads,
        paths,
        upstream,
        compare,
    } = cmd;
    let mut compared = Vec::new();
    for c in &compare {
        match crate::bench::Compared::parse(c) {
            Ok(c) => compared.push(c),
            Err(e) => {
                eprintln!("simulate: {e}");
                return EXIT_USAGE;
            }
        }
    }
    if rps == 0 || connections == 0 || runs == 0 {
        eprintln!("simulate: --rps, --connections and --runs must be at least 1");
        return EXIT_USAGE;
    }
    let opts = crate::bench::BenchOptions {
        rps,
        duration,
        throughput_duration,
        connections,
        runs,
        shoal_bin,
        paths,
        upstream,
        compare: compared,
        node_worker_threads: (node_threads > 0).then_some(node_threads),
        ..crate::bench::BenchOptions::default()
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulate: tokio runtime: {e}");
            return EXIT_FAILED;
        }
    };
    let report = match runtime.block_on(crate::bench::bench_proxy(opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulate: bench proxy: {e:#}");
            return EXIT_FAILED;
        }
    };
    crate::bench::print_table(&report);
    if let Some(path) = json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|j| std::fs::write(&path, j + "\n").map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("simulate: {}: {e}", path.display());
            return EXIT_FAILED;
        }
    }
    0
}

/// The most seeds one `--seeds` may name.
pub const MAX_SEEDS: usize = 10_000;

/// Parses `--seeds`: comma-separated seeds and inclusive ranges `A-B`
/// (`1-20`, `1,7,42`, `1-5,42`), in the order given, each seed once.
pub fn parse_seeds(s: &str) -> Result<Vec<u64>, String> {
    let number = |t: &str| {
        t.trim()
            .parse::<u64>()
            .map_err(|_| format!("`{}` is not a seed (a whole number ≥ 0)", t.trim()))
    };
    let mut out: Vec<u64> = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("`{s}`: an empty entry; write e.g. 1-20 or 1,7,42"));
        }
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let n = number(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(format!("`{part}`: the range runs backwards"));
        }
        if hi - lo >= MAX_SEEDS as u64 || out.len() + (hi - lo) as usize >= MAX_SEEDS {
            return Err(format!("`{s}`: more than {MAX_SEEDS} seeds"));
        }
        for n in lo..=hi {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    Ok(out)
}

/// The seeds of `--seeds`, in order (one value to clap, not many).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedList(pub Vec<u64>);

fn parse_seed_list(s: &str) -> Result<SeedList, String> {
    parse_seeds(s).map(SeedList)
}

/// The scenario file `arg` names: a path that exists, else a bundled
/// scenario by the name `simulate list` prints (with or without `.toml`; a
/// leading `simulate/scenarios/` as the README writes it is accepted too).
pub fn find_scenario(arg: &Path) -> Result<PathBuf, String> {
    if arg.is_file() {
        return Ok(arg.to_path_buf());
    }
    let bundled = crate::bundled_dir();
    let rel = arg.strip_prefix("simulate/scenarios").unwrap_or(arg);
    let mut candidates = vec![bundled.join(rel)];
    if rel.extension().is_none() {
        candidates.push(bundled.join(rel).with_extension("toml"));
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "{}: no such file, and no bundled scenario by that name (see `simulate list`)",
            arg.display()
        )
    })
}

/// `simulate list`: one line per scenario. Output stops quietly when the
/// reader goes away (`simulate list | head -3`).
fn list(dir: &Path) -> i32 {
    use std::io::Write;
    let files = match crate::scenario_files(dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("simulate: {}: {e}", dir.display());
            return EXIT_USAGE;
        }
    };
    let mut out = std::io::stdout().lock();
    let mut code = 0;
    for f in files {
        let shown = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        let line = match crate::scenario::Scenario::load(&f) {
            Ok(s) => format!(
                "{shown:<28} {:>3} nodes {:>5.0}s  {}",
                s.cluster.nodes.len(),
                s.duration.as_secs_f64(),
                s.description
            ),
            Err(e) => {
                code = EXIT_FAILED;
                format!("{shown:<28} INVALID: {e}")
            }
        };
        if writeln!(out, "{line}").is_err() {
            return code;
        }
    }
    let _ = out.flush();
    code
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    node::config::parse_duration(s)
}

/// Parses the command line, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    match cli.command {
        Command::List { dir } => list(&dir.unwrap_or_else(crate::bundled_dir)),
        Command::Run {
            scenario,
            seed,
            report,
            processes,
            shoal,
        } => {
            let scenario = match find_scenario(&scenario) {
                Ok(p) => p,
                Err(msg) => {
                    eprintln!("simulate: {msg}");
                    return EXIT_USAGE;
                }
            };
            crate::run_file(
                &scenario,
                seed.unwrap_or_else(clock_seed),
                report.as_deref(),
                processes.then(|| shoal.unwrap_or_else(crate::process::default_binary)),
            )
        }
        Command::RunSuite {
            dir,
            seed,
            seeds,
            report,
            processes,
            shoal,
        } => crate::run_suite(
            &dir,
            &seeds.map_or_else(|| vec![seed.unwrap_or_else(clock_seed)], |s| s.0),
            report.as_deref(),
            processes.then(|| shoal.unwrap_or_else(crate::process::default_binary)),
        ),
        Command::Bench(cmd) => bench_cmd(cmd),
        Command::Model {
            nodes,
            zones,
            interval,
            loss,
            phi_threshold,
            sampling_window,
            churn,
            partition_zone,
            wall_limit,
            seed,
            json,
            report,
        } => {
            if !(0.0..1.0).contains(&loss) {
                eprintln!("simulate: --loss: must be at least 0 and below 1");
                return EXIT_USAGE;
            }
            if interval.is_some_and(|i| i < Duration::from_millis(10)) {
                eprintln!("simulate: --interval: must be at least 10ms");
                return EXIT_USAGE;
            }
            if !(0.0..=1000.0).contains(&churn) {
                eprintln!("simulate: --churn: must be between 0 and 1000 per second");
                return EXIT_USAGE;
            }
            if sampling_window.is_some_and(|w| w == 0 || w > 100_000) {
                eprintln!("simulate: --sampling-window: must be 1 to 100000");
                return EXIT_USAGE;
            }
            if phi_threshold.is_some_and(|p| !(p > 0.0 && p <= 1000.0)) {
                eprintln!("simulate: --phi-threshold: must be above 0 and at most 1000");
                return EXIT_USAGE;
            }
            if partition_zone.is_some_and(|p| p >= zones) {
                eprintln!("simulate: --partition-zone: must be below --zones ({zones})");
                return EXIT_USAGE;
            }
            let seed = seed.unwrap_or_else(clock_seed);
            let mut config = ModelConfig::new(0);
            config.zones = zones;
            if let Some(i) = interval {
                config.tuning.interval = i;
            }
            if let Some(p) = phi_threshold {
                config.tuning.phi_threshold = p;
            }
            if let Some(w) = sampling_window {
                config.tuning.sampling_window = w;
            }
            config.loss = loss;
            config.churn = churn;
            config.partition_zone = partition_zone;
            config.wall_limit = wall_limit;
            config.progress = !json;
            config.seed = seed;
            model_cmd(&nodes, &config, json, report.as_deref())
        }
    }
}

/// A seed from the clock, printed with every report so the run can be repeated.
fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000)
        .unwrap_or(1)
}

fn model_cmd(counts: &[usize], base: &ModelConfig, json: bool, report: Option<&Path>) -> i32 {
    for &n in counts {
        let mut c = base.clone();
        c.nodes = n;
        if let Err(e) = model::check_ceiling(&c) {
            eprintln!("simulate model: {e}");
            return EXIT_USAGE;
        }
    }
    if !json {
        println!(
            "model: {} zone(s), interval {:?}, phi {}, sampling window {}, loss {:.0}%, churn {}/s{}, seed {} \
             (chitchat's own peer choice is not seeded); virtual time",
            base.zones,
            base.tuning.interval,
            base.tuning.phi_threshold,
            base.tuning.sampling_window,
            base.loss * 100.0,
            base.churn,
            base.partition_zone.map_or(String::new(), |p| format!(
                ", zone {p} partitioned after detection"
            )),
            base.seed
        );
        println!("{}", model_header());
    }
    let mut results = Vec::new();
    let mut code = 0;
    for &n in counts {
        let mut config = base.clone();
        config.nodes = n;
        if !json && n >= 300 {
            eprintln!(
                "simulate model: N = {n}: expect about {} MB",
                model::estimated_peak_bytes(&config) >> 20
            );
        }
        let outcome = if counts.len() == 1 {
            model::run(&config).map_err(|e| e.to_string())
        } else {
            model_in_child(&config)
        };
        match outcome {
            Ok(r) => {
                if json {
                    println!("{}", serde_json::to_string(&r).unwrap_or_default());
                } else {
                    println!("{}", model_row(&r));
                    if let Some(p) = &r.partition {
                        println!(
                            "partition of zone {}: others dropped its endpoint in {}, routed to it again {} after the heal; {} false dead inside it",
                            p.zone,
                            secs_or_never(p.withdrawn_99_ms),
                            secs_or_never(p.restored_99_ms),
                            p.false_dead_inside
                        );
                    }
                    if let Some(why) = &r.stopped {
                        println!("stopped early: {why}");
                    }
                }
                if r.endpoint_100_ms.is_none() || r.oversize_sends > 0 || r.stopped.is_some() {
                    code = EXIT_FAILED;
                }
                results.push(r);
            }
            Err(e) => {
                eprintln!("simulate model: N = {n}: {e}");
                code = EXIT_FAILED;
            }
        }
    }
    if !json {
        println!(
            "times are virtual (99% of every zone / every node); endpoint = a new svc key routable \
             (own zone: its key; other zones: a representative's summary); policy = an advert \
             reaching every node; detect = a silent node seen dead by its zone; B/node/s = \
             chitchat payload sent per node per second in steady state, mean / busiest node \
             (QUIC adds its own overhead); peak MB is the process's VmHWM"
        );
    }
    if let Some(dir) = report {
        let written = std::fs::create_dir_all(dir).and_then(|_| {
            std::fs::write(
                dir.join("model.json"),
                serde_json::to_vec_pretty(&results).unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            eprintln!("simulate model: writing {}: {e}", dir.display());
            return EXIT_FAILED;
        }
    }
    code
}

/// Runs one N in a child process so its peak memory is measured alone and an
/// out-of-memory kill cannot take the whole table down.
fn model_in_child(config: &ModelConfig) -> Result<ModelReport, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut args = vec![
        "model".to_string(),
        "--json".into(),
        "--nodes".into(),
        config.nodes.to_string(),
        "--zones".into(),
        config.zones.to_string(),
        "--interval".into(),
        format!("{}ms", config.tuning.interval.as_millis()),
        "--loss".into(),
        config.loss.to_string(),
        "--phi-threshold".into(),
        config.tuning.phi_threshold.to_string(),
        "--sampling-window".into(),
        config.tuning.sampling_window.to_string(),
        "--churn".into(),
        config.churn.to_string(),
        "--wall-limit".into(),
        format!("{}s", config.wall_limit.as_secs()),
        "--seed".into(),
        config.seed.to_string(),
    ];
    if let Some(p) = config.partition_zone {
        args.extend(["--partition-zone".into(), p.to_string()]);
    }
    let out = std::process::Command::new(exe)
        .args(&args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() && out.stdout.is_empty() {
        use std::os::unix::process::ExitStatusExt;
        return Err(match out.status.signal() {
            Some(9) => "killed (SIGKILL; out of memory?)".into(),
            Some(sig) => format!("killed by signal {sig}"),
            None => format!("failed with {}", out.status),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .map_err(|e| format!("unreadable child output ({e}): {text}"))
}

fn secs_or_never(ms: Option<u64>) -> String {
    match ms {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "never".into(),
    }
}

fn model_header() -> String {
    format!(
        "{:>6} | {:>5} | {:>13} | {:>13} | {:>13} | {:>13} | {:>10} | {:>15} | {:>8} | {:>8} | {:>7} | {:>8}",
        "N",
        "zones",
        "formed 99/100",
        "endpoint 99%",
        "policy 100%",
        "detect 99/100",
        "false dead",
        "B/node/s mean/max",
        "max msg",
        "peak MB",
        "wall",
        "churn j/l"
    )
}

fn model_row(r: &ModelReport) -> String {
    let t = secs_or_never;
    format!(
        "{:>6} | {:>5} | {:>13} | {:>13} | {:>13} | {:>13} | {:>10} | {:>15} | {:>8} | {:>8} | {:>6.0}s | {:>8}",
        r.nodes,
        r.zones,
        format!("{} / {}", t(r.formed_99_ms), t(r.formed_100_ms)),
        format!("{} ({})", t(r.endpoint_99_ms), t(r.endpoint_100_ms)),
        format!("{} ({})", t(r.policy_100_ms), t(r.policy_99_ms)),
        format!("{} / {}", t(r.detect_99_ms), t(r.detect_100_ms)),
        r.false_dead,
        format!("{:.0} / {:.0}", r.bytes_per_node_s, r.bytes_max_node_s),
        r.max_message_bytes,
        r.peak_rss_mb,
        r.wall_ms as f64 / 1000.0,
        format!("{}/{}", r.joins, r.leaves),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_take_ranges_and_lists_and_refuse_nonsense() {
        assert_eq!(parse_seeds("1-20"), Ok((1..=20).collect::<Vec<u64>>()));
        assert_eq!(parse_seeds("42"), Ok(vec![42]));
        assert_eq!(parse_seeds("7, 1-3,42,2"), Ok(vec![7, 1, 2, 3, 42]));
        assert_eq!(parse_seeds("0-0"), Ok(vec![0]));
        for bad in ["", "1,", "a", "5-1", "1-", "-3", "1-2-3", "0-10000", "1.5"] {
            assert!(parse_seeds(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_seeds("5-1").unwrap_err().contains("backwards"));
    }

    #[test]
    fn run_suite_takes_seeds_or_one_seed_not_both() {
        let cli = Cli::try_parse_from(["simulate", "run-suite", "d", "--seeds", "1-3"]).unwrap();
        match cli.command {
            Command::RunSuite { seeds, seed, .. } => {
                assert_eq!(seeds, Some(SeedList(vec![1, 2, 3])));
                assert_eq!(seed, None);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["simulate", "run-suite", "d", "--seed", "42"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::RunSuite {
                seed: Some(42),
                seeds: None,
                ..
            }
        ));
        assert!(
            Cli::try_parse_from([
                "simulate",
                "run-suite",
                "d",
                "--seed",
                "1",
                "--seeds",
                "1-2"
            ])
            .is_err()
        );
        assert!(Cli::try_parse_from(["simulate", "run-suite", "d", "--seeds", "x"]).is_err());
    }
}
