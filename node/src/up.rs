//! `shoal up`: a throwaway local mesh in one process, with two instances of a
//! demo HTTP service (`demo`) on different nodes and a light client calling it
//! through n1's outbound listener, so `shoal stat` shows live traffic.

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
                "shoal up: {n} nodes, certificates in {0}; sign policy with --operator-cert {0}/operator",
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
            if let Some(out) = nodes.first().and_then(|n| n.outbound_addr()) {
                println!(
                    "  demo service on {} node(s); n1 outbound at {out}",
                    nodes.len().clamp(1, 2)
                );
                println!("  try: curl -s -H 'Host: demo' http://{out}/hello");
                println!("       shoal stat --admin {}", nodes[0].admin_addr());
                let proxy_ready = async {
                    for _ in 0..100 {
                        let ready =
                            nodes[0].proxy().services().iter().any(|s| {
                                s.service == "demo" && s.endpoints.iter().any(|e| e.routable)
                            });
                        if ready {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                proxy_ready.await;
                tokio::spawn(crate::demo::run_client(out, "demo".into(), 5));
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
    let operator = ca.issue_operator("local", Validity::days(1))?;
    transport::certs::write_operator_dir(
        &dir.path().join("operator"),
        &ca.cert_pem(),
        &operator,
        false,
    )?;
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 1..=n {
        let name = format!("n{i}");
        let certs = dir.path().join(&name);
        // Two demo instances on different nodes (n2 and n3, or n1 alone).
        let serves_demo = (n == 1 && i == 1) || (n == 2 && i <= 2) || (n > 2 && (i == 2 || i == 3));
        let svc = if serves_demo { "demo" } else { "demo-client" };
        let cert = ca.issue(&name, &[svc.to_string()], Validity::days(1))?;
        write_node_dir(&certs, &ca.cert_pem(), &cert, false)?;
        let mut config = NodeConfig::local(&name, &certs);
        config.gossip_interval = gossip_interval;
        if i == 1 {
            config.proxy.outbound = Some(([127, 0, 0, 1], 0).into());
        }
        if serves_demo {
            let (addr, _task) = crate::demo::start_service(name.clone()).await?;
            let mut spec = proxy::ServiceSpec::new("demo", addr, proxy::Protocol::Auto);
            spec.health_path = Some("/healthz".into());
            config.proxy.services.push(spec);
        }
        if let Some(first) = nodes.first() {
            config.seeds = vec![first.quic_addr().to_string()];
        }
        nodes.push(Node::start(config).await?);
    }
    Ok((dir, nodes))
}
