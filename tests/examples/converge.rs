//! Measures membership convergence and failure detection on this machine.
//!
//! `cargo run --release -p tests --example converge -- [NODES...] [--interval 500ms] [--runs 3]`
//!
//! For each cluster size: starts N in-process nodes (real QUIC + mTLS on
//! 127.0.0.1, all seeded with n1), times how long until every node sees all
//! N alive, then kills one node without goodbye and times how long until
//! every other node sees it dead. Prints the median over runs.

use std::time::{Duration, Instant};

use node::{MemberState, Node};
use tests::Pki;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut sizes = Vec::new();
    let mut interval = Duration::from_millis(500);
    let mut runs = 3usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--interval" => {
                interval = node::config::parse_duration(&args.next().unwrap_or_default())
                    .map_err(anyhow::Error::msg)?
            }
            "--runs" => runs = args.next().unwrap_or_default().parse()?,
            n => sizes.push(n.parse::<usize>()?),
        }
    }
    if sizes.is_empty() {
        sizes = vec![3, 20];
    }
    println!("gossip interval {interval:?}, phi threshold 8, median of {runs} runs");
    println!(
        "{:>6}  {:>14}  {:>14}",
        "nodes", "converge_ms", "detect_dead_ms"
    );
    for n in sizes {
        let mut conv = Vec::new();
        let mut det = Vec::new();
        for _ in 0..runs {
            let (c, d) = once(n, interval).await?;
            conv.push(c.as_millis());
            det.push(d.as_millis());
        }
        conv.sort();
        det.sort();
        println!("{:>6}  {:>14}  {:>14}", n, conv[runs / 2], det[runs / 2]);
    }
    Ok(())
}

async fn once(n: usize, interval: Duration) -> anyhow::Result<(Duration, Duration)> {
    let pki = Pki::new("bench.shoal");
    let mut nodes: Vec<Node> = Vec::new();
    let mut configs = Vec::new();
    for i in 1..=n {
        let mut c = pki.node_config(&format!("n{i}"), &[]);
        c.gossip_interval = interval;
        configs.push(c);
    }
    let start = Instant::now();
    for mut c in configs {
        if let Some(first) = nodes.first() {
            c.seeds = vec![first.quic_addr().to_string()];
        }
        nodes.push(Node::start(c).await?);
    }
    wait(&nodes, |ms| {
        ms.iter().filter(|m| m.state == MemberState::Alive).count() == n
    })
    .await;
    let converge = start.elapsed();

    let victim = nodes.pop().expect("nodes");
    let name = victim.name().to_string();
    let killed = Instant::now();
    victim.kill().await;
    wait(&nodes, |ms| {
        ms.iter()
            .any(|m| m.name == name && m.state == MemberState::Dead)
    })
    .await;
    let detect = killed.elapsed();
    for node in nodes {
        node.kill().await;
    }
    Ok((converge, detect))
}

async fn wait(nodes: &[Node], pred: impl Fn(&[node::Member]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        assert!(Instant::now() < deadline, "no convergence within 120 s");
        let mut all = true;
        for node in nodes {
            if !pred(&node.members().await) {
                all = false;
                break;
            }
        }
        if all {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
