//! Measures what gossip costs a node: bytes per second, and (on builds with
//! signed gossip) signature checks and the time they take.
//!
//! `cargo run --release -p tests --example gossip_cost -- [NODES] [--interval 500ms] [--secs 10]`
//!
//! Starts N in-process nodes (real QUIC + mTLS on 127.0.0.1, seeded with n1),
//! waits until
//! every node sees all N alive, then samples each node's gossip counters over
//! the window and prints per-node medians.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use node::{MemberState, Node};
use tests::Pki;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut n = 10usize;
    let mut interval = Duration::from_millis(500);
    let mut secs = 10u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--interval" => {
                interval = node::config::parse_duration(&args.next().unwrap_or_default())
                    .map_err(anyhow::Error::msg)?
            }
            "--secs" => secs = args.next().unwrap_or_default().parse()?,
            v => n = v.parse()?,
        }
    }
    let pki = Pki::new("cost.shoal");
    let mut nodes: Vec<Node> = Vec::new();
    for i in 1..=n {
        let mut c = pki.node_config(&format!("n{i}"), &[]);
        c.gossip_interval = interval;
        if let Some(seed) = nodes.first() {
            c.seeds = vec![seed.quic_addr().to_string()];
        }
        nodes.push(Node::start(c).await?);
    }
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = true;
        for node in &nodes {
            let alive = node
                .members()
                .await
                .iter()
                .filter(|m| m.state == MemberState::Alive)
                .count();
            all &= alive == n;
        }
        if all {
            break;
        }
        anyhow::ensure!(Instant::now() < end, "did not converge in 60 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let joins settle, then measure.
    tokio::time::sleep(interval * 4).await;
    let snap = |nodes: &[Node]| -> Vec<(u64, u64, u64, u64)> {
        nodes
            .iter()
            .map(|node| {
                let s = node.gossip().stats();
                let g = node.gossip().guard_stats();
                (
                    s.bytes_in.load(Ordering::Relaxed) + s.bytes_out.load(Ordering::Relaxed),
                    s.messages_in.load(Ordering::Relaxed) + s.messages_out.load(Ordering::Relaxed),
                    g.verified.load(Ordering::Relaxed),
                    g.verify_nanos.load(Ordering::Relaxed),
                )
            })
            .collect()
    };
    let before = snap(&nodes);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let after = snap(&nodes);
    let elapsed = started.elapsed().as_secs_f64();
    let mut bytes: Vec<f64> = Vec::new();
    let mut msgs: Vec<f64> = Vec::new();
    let (mut checks, mut nanos) = (0u64, 0u64);
    for (b, a) in before.iter().zip(&after) {
        bytes.push((a.0 - b.0) as f64 / elapsed);
        msgs.push((a.1 - b.1) as f64 / elapsed);
        checks += a.2 - b.2;
        nanos += a.3 - b.3;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|x, y| x.partial_cmp(y).unwrap());
        v[v.len() / 2]
    };
    println!(
        "nodes {n}, gossip interval {interval:?}, window {elapsed:.1} s (in + out per node, median)"
    );
    println!("gossip bytes/node/s   {:>10.0}", median(&mut bytes));
    println!("gossip msgs/node/s    {:>10.1}", median(&mut msgs));
    let (all_checks, all_nanos) = after
        .iter()
        .fold((0u64, 0u64), |acc, a| (acc.0 + a.2, acc.1 + a.3));
    println!(
        "signature checks/node/s {:>8.1} in the window ({:.0} us of checking per node per s)",
        checks as f64 / elapsed / n as f64,
        nanos as f64 / elapsed / n as f64 / 1000.0
    );
    println!(
        "since start: {all_checks} checks (certificates included), mean {:.1} us per received value",
        if all_checks > 0 {
            all_nanos as f64 / all_checks as f64 / 1000.0
        } else {
            0.0
        }
    );
    for node in nodes {
        node.shutdown().await;
    }
    Ok(())
}
