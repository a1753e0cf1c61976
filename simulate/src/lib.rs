//! Chaos harness and benchmarks for Shoal.
//!
//! - [`scenario`]: scenarios as data (TOML): cluster, timeline, invariants.
//! - [`faults`]: the fault-injection layer under each node's QUIC socket.
//! - [`runner`]: real in-process nodes driven through a timeline, sampled.
//! - [`invariants`]: verdicts from the recorded trace.
//! - [`report`]: the stdout table, `report.json`, `timeline.svg`.
//! - [`model`]: the gossip layer alone at large N in virtual time.
//! - [`workload`]: open-loop requests through the mesh, and the upstreams.
//! - [`byzantine`]: the rogue certificate holder a `byzantine` step starts.
//! - [`process`]: `--processes` mode, real `shoal node` processes.
//! - [`stall`]: moments the machine starved the harness's runtime.
//!
//! `main.rs` only calls [`cli::main`]. `simulate` uses nodes only through
//! the `node` library.
#![forbid(unsafe_code)]

pub mod bench;
pub mod byzantine;
pub mod cli;
pub mod faults;
pub mod invariants;
pub mod model;
pub mod model_net;
pub mod process;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod stall;
pub mod workload;
pub mod zones;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use report::Report;
pub use runner::{RunEvent, RunOptions};
pub use scenario::Scenario;

use crate::cli::{EXIT_FAILED, EXIT_USAGE};

/// The bundled scenarios folder (simulate/scenarios in the source tree).
pub fn bundled_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")
}

/// Runs a parsed scenario with `options` and judges it.
pub async fn run_scenario(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Report> {
    let trace = runner::run(scenario, options).await?;
    let verdicts = invariants::judge(scenario, &trace);
    Ok(Report::new(scenario, options.seed, trace, verdicts))
}

/// Scenario files under `dir` (recursively), sorted.
pub fn scenario_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(scenario_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// `simulate list`: one line per scenario file.
pub fn list(dir: &Path) -> i32 {
    let files = match scenario_files(dir) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("simulate: {}: {e}", dir.display());
            return EXIT_USAGE;
        }
    };
    let mut code = 0;
    for f in files {
        let shown = f.strip_prefix(dir).unwrap_or(&f).display().to_string();
        match Scenario::load(&f) {
            Ok(s) => println!(
                "{shown:<28} {:>3} nodes {:>5.0}s  {}",
                s.cluster.nodes.len(),
                s.duration.as_secs_f64(),
                s.description
            ),
            Err(e) => {
                println!("{shown:<28} INVALID: {e}");
                code = EXIT_FAILED;
            }
        }
    }
    code
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn init_tracing() {
    node::cli::init_tracing(node::LogFormat::Text);
}

fn printing_options(seed: u64, processes: Option<PathBuf>) -> RunOptions {
    RunOptions {
        seed,
        extra_layer: None,
        processes,
        on_event: Some(Arc::new(|e: &RunEvent| {
            match e {
                RunEvent::Formed { nodes, took } => {
                    println!(
                        "[  0.0s] {nodes} nodes formed a cluster in {took:.1?}; timeline starts"
                    )
                }
                RunEvent::Step { at, text } => println!("[{at:5.1}s] {text}"),
                RunEvent::Finished { at } => println!("[{at:5.1}s] done"),
            }
            let _ = std::io::stdout().flush();
        })),
    }
}

/// `simulate run`: runs one file, prints the table, writes the report.
pub fn run_file(
    path: &Path,
    seed: u64,
    report_dir: Option<&Path>,
    processes: Option<PathBuf>,
) -> i32 {
    let scenario = match Scenario::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("simulate: {e}");
            return EXIT_USAGE;
        }
    };
    if let Some(code) = check_processes(&[&scenario], processes.as_deref()) {
        return code;
    }
    init_tracing_quiet();
    println!(
        "scenario {}: {} (seed {seed})",
        scenario.name, scenario.description
    );
    let result = runtime().block_on(run_scenario(&scenario, &printing_options(seed, processes)));
    finish(result, report_dir)
}

/// `simulate run-suite`: every scenario in a folder, once per seed, one
/// table each, then the scenario × seed grid (and a line per failure).
/// With more than one seed, `--report DIR` gets `DIR/seed-<N>/<scenario>`.
pub fn run_suite(
    dir: &Path,
    seeds: &[u64],
    report_dir: Option<&Path>,
    processes: Option<PathBuf>,
) -> i32 {
    let files = match scenario_files(dir) {
        Ok(f) if !f.is_empty() => f,
        Ok(_) => {
            eprintln!("simulate: {}: no scenario files", dir.display());
            return EXIT_USAGE;
        }
        Err(e) => {
            eprintln!("simulate: {}: {e}", dir.display());
            return EXIT_USAGE;
        }
    };
    if seeds.is_empty() {
        eprintln!("simulate: no seeds to run");
        return EXIT_USAGE;
    }
    let mut scenarios = Vec::new();
    for f in &files {
        match Scenario::load(f) {
            Ok(s) => scenarios.push(s),
            Err(e) => {
                eprintln!("simulate: {e}");
                return EXIT_USAGE;
            }
        }
    }
    let refs: Vec<&Scenario> = scenarios.iter().collect();
    if let Some(code) = check_processes(&refs, processes.as_deref()) {
        return code;
    }
    init_tracing_quiet();
    let started = std::time::Instant::now();
    let names: Vec<String> = scenarios.iter().map(|s| s.name.clone()).collect();
    let mut table = report::SuiteTable::new(&names, seeds);
    for &seed in seeds {
        for s in &scenarios {
            println!("\n=== scenario {}: {} (seed {seed})", s.name, s.description);
            let result =
                runtime().block_on(run_scenario(s, &printing_options(seed, processes.clone())));
            let dir = report_dir.map(|d| {
                if seeds.len() > 1 {
                    d.join(format!("seed-{seed}")).join(&s.name)
                } else {
                    d.join(&s.name)
                }
            });
            let outcome = finish_outcome(result, dir.as_deref());
            println!(
                "=== {} seed {seed}: {}{}",
                s.name,
                match &outcome {
                    report::SuiteOutcome::Pass => "PASS".to_string(),
                    report::SuiteOutcome::Fail(v) => format!("FAIL {}", v.join("; ")),
                    report::SuiteOutcome::Error(e) => format!("ERR {e}"),
                },
                load_note()
            );
            let _ = std::io::stdout().flush();
            table.record(&s.name, seed, outcome);
        }
    }
    println!(
        "\nsuite {} — {} {} — {:.0?}",
        dir.display(),
        if seeds.len() == 1 { "seed" } else { "seeds" },
        seeds
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(","),
        started.elapsed()
    );
    print!("{}", table.render());
    if table.all_passed() { 0 } else { EXIT_FAILED }
}

/// ` (load 1.23)`: the machine's one-minute load average, where the OS
/// says (`/proc/loadavg`), so a failure on a starved machine shows as such.
fn load_note() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(|l| format!(" (load {l})")))
        .unwrap_or_default()
}

/// In `--processes` mode: the binary must exist and every scenario must
/// be runnable with processes; else the exit code, after saying why.
fn check_processes(scenarios: &[&Scenario], processes: Option<&Path>) -> Option<i32> {
    let bin = processes?;
    if let Err(e) = process::check_binary(bin) {
        eprintln!("simulate: {e}");
        return Some(EXIT_USAGE);
    }
    let mut code = None;
    for s in scenarios {
        let problems = s.process_mode_problems();
        if !problems.is_empty() {
            eprintln!(
                "simulate: scenario {} cannot run with --processes:\n  {}",
                s.name,
                problems.join("\n  ")
            );
            code = Some(EXIT_USAGE);
        }
    }
    code
}

fn init_tracing_quiet() {
    if std::env::var_os("RUST_LOG").is_some() {
        init_tracing();
    }
}

fn finish(result: anyhow::Result<Report>, report_dir: Option<&Path>) -> i32 {
    match finish_outcome(result, report_dir) {
        report::SuiteOutcome::Pass => 0,
        _ => EXIT_FAILED,
    }
}

/// Prints the run's table, writes its report, and says how it fared.
fn finish_outcome(
    result: anyhow::Result<Report>,
    report_dir: Option<&Path>,
) -> report::SuiteOutcome {
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("simulate: the run could not complete: {e:#}");
            return report::SuiteOutcome::Error(format!("{e:#}"));
        }
    };
    print!("{}", report.table());
    if let Some(dir) = report_dir {
        match report.write(dir) {
            Ok(()) => println!(
                "report: {} and {}",
                dir.join("report.json").display(),
                dir.join("timeline.svg").display()
            ),
            Err(e) => {
                eprintln!("simulate: writing {}: {e}", dir.display());
                return report::SuiteOutcome::Error(format!("writing {}: {e}", dir.display()));
            }
        }
    }
    if report.passed {
        report::SuiteOutcome::Pass
    } else {
        report::SuiteOutcome::Fail(
            report
                .verdicts
                .iter()
                .filter(|v| !v.passed)
                .map(|v| format!("{} ({})", v.name, v.figure))
                .collect(),
        )
    }
}
