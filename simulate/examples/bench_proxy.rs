//! Stand-in for `simulate bench proxy` until the CLI wires it:
//! `cargo run --release -p simulate --example bench_proxy -- --rps 1000 --duration 20s --json out.json`.

use std::path::PathBuf;

use clap::Parser;
use simulate::bench::{BenchOptions, bench_proxy, print_table};

/// Latency, throughput and node cost of the Shoal path beside direct and nginx.
#[derive(Debug, Parser)]
struct Args {
    /// Requests per second of the fixed-rate phase.
    #[arg(long, default_value_t = 1000)]
    rps: u32,
    /// Fixed-rate phase per path (e.g. 10s).
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Closed-loop throughput phase per path.
    #[arg(long, default_value = "3s")]
    throughput_duration: String,
    /// Concurrent keep-alive connections of the throughput phase.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// The `shoal` binary [default: target/release/shoal].
    #[arg(long)]
    shoal_bin: Option<PathBuf>,
    /// `--worker-threads` of each Shoal node (0: the node's default, one per CPU).
    #[arg(long, default_value_t = 1)]
    node_threads: usize,
    /// Paths to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "direct,nginx,shoal")]
    paths: Vec<String>,
}

fn main() {
    let args = Args::parse();
    let duration = |flag: &str, s: &str| {
        node::config::parse_duration(s).unwrap_or_else(|e| {
            eprintln!("bench_proxy: {flag}: {e}");
            std::process::exit(64);
        })
    };
    let opts = BenchOptions {
        rps: args.rps,
        duration: duration("--duration", &args.duration),
        throughput_duration: duration("--throughput-duration", &args.throughput_duration),
        connections: args.connections,
        shoal_bin: args.shoal_bin,
        paths: args.paths,
        node_worker_threads: (args.node_threads > 0).then_some(args.node_threads),
        ..BenchOptions::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let report = match runtime.block_on(bench_proxy(opts)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench_proxy: {e:#}");
            std::process::exit(1);
        }
    };
    print_table(&report);
    if let Some(path) = args.json {
        let json = serde_json::to_string_pretty(&report).expect("report serialises");
        if let Err(e) = std::fs::write(&path, json + "\n") {
            eprintln!("bench_proxy: {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
