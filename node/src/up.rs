//! `shoal up`: a throwaway local mesh in one process.

use std::time::Duration;

use transport::certs::{Ca, Validity, write_node_dir};

use crate::config::NodeConfig;
use crate::node::Node;

/// Starts `n` nodes on loopback with fresh certificates, prints their admin
/// URLs, and runs until Ctrl-C / SIGTERM.
pub async fn run(n: usize) -> i32 {
    match start(n, Duration::from_millis(300)).await {
        Ok((dir, nodes)) => {
            println!(
                "shoal up: {n} nodes, certificates in {}",
                dir.path().display()
            );
            for node in &nodes {
                println!(
                    "  {:<4} quic={}  admin=http://{}  (try: curl -s http://{}/v1/members)",
                    node.name(),
                    node.quic_addr(),
                    node.admin_addr(),
                    node.admin_addr()
                );
            }
            println!("Ctrl-C to stop.");
            crate::cli::wait_for_signal().await;
            for node in nodes {
                node.shutdown().await;
            }
            0
        }
        Err(e) => {
            eprintln!("shoal up: {e}");
            1
        }
    }
}

/// Makes a CA and `n` node certificates in a temporary folder and starts
/// nodes `n1..nN`, all seeded with `n1`. The folder lives as long as the
/// returned guard.
pub async fn start(
    n: usize,
    gossip_interval: Duration,
) -> anyhow::Result<(tempfile::TempDir, Vec<Node>)> {
    let dir = tempfile::Builder::new().prefix("shoal-up-").tempdir()?;
    let ca = Ca::generate("local.shoal", 1)?;
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 1..=n {
        let name = format!("n{i}");
        let certs = dir.path().join(&name);
        let cert = ca.issue(&name, &["demo".to_string()], Validity::days(1))?;
        write_node_dir(&certs, &ca.cert_pem(), &cert, false)?;
        let mut config = NodeConfig::local(&name, &certs);
        config.gossip_interval = gossip_interval;
        if let Some(first) = nodes.first() {
            config.seeds = vec![first.quic_addr().to_string()];
        }
        nodes.push(Node::start(config).await?);
    }
    Ok((dir, nodes))
}
