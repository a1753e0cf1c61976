//! `--processes` mode: every node is a real `shoal node` process. `crash` is
//! SIGKILL, `pause`/`resume` are SIGSTOP/SIGCONT, a drain is SIGTERM (the
//! daemon drains, then leaves), and `restart` runs the same command again.
//! The harness reads what each node sees through its admin API.
//!
//! Signals are sent with the `kill` utility, so this crate keeps
//! `forbid(unsafe_code)`. This module owns the processes; it must not judge.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde::Deserialize;
use tokio::process::{Child, Command};

use crate::runner::View;

/// Where the `shoal` binary is expected: `target/release/shoal` in the
/// workspace (or under `CARGO_TARGET_DIR`).
pub fn default_binary() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release").join("shoal")
}

/// Checks that `binary` exists, with a message saying how to build it.
pub fn check_binary(binary: &Path) -> anyhow::Result<()> {
    if binary.is_file() {
        return Ok(());
    }
    anyhow::bail!(
        "--processes needs the shoal binary at {}; build it first with \
         `cargo build --release -p node --bin shoal` (or pass --shoal PATH)",
        binary.display()
    )
}

/// The command line of one node, fixed at the start so `restart` can run
/// exactly the same command again.
#[derive(Debug, Clone)]
pub struct NodeCommand {
    /// The binary.
    pub binary: PathBuf,
    /// Its arguments after `node`.
    pub args: Vec<String>,
    /// Admin address.
    pub admin: SocketAddr,
    /// QUIC address.
    pub quic: SocketAddr,
    /// Outbound listener, if any.
    pub outbound: Option<SocketAddr>,
    /// Log file (stdout and stderr).
    pub log: PathBuf,
}

/// A running `shoal node` process.
pub struct NodeProcess {
    child: Child,
    pid: u32,
    /// Its command.
    pub command: NodeCommand,
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_tcp() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// A free UDP port on 127.0.0.1 (bound, then released).
pub fn free_udp() -> std::io::Result<SocketAddr> {
    std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

impl NodeProcess {
    /// Runs `command`.
    pub async fn spawn(command: NodeCommand) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&command.log)
            .with_context(|| format!("log file {}", command.log.display()))?;
        let child = Command::new(&command.binary)
            .arg("node")
            .args(&command.args)
            .env_remove("SHOAL_CONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("running {}", command.binary.display()))?;
        let pid = child.id().context("the process has no id")?;
        let mut p = NodeProcess {
            child,
            pid,
            command,
        };
        if let Err(e) = p.wait_ready(Duration::from_secs(10)).await {
            let log = std::fs::read_to_string(&p.command.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!("{e}; its log ends:\n    {}", tail.join("\n    "));
        }
        Ok(p)
    }

    async fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let end = tokio::time::Instant::now() + within;
        let admin = self.command.admin.to_string();
        loop {
            if node::cli::get(&admin, "/healthz").await.is_ok() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                anyhow::bail!("shoal node exited at start ({status})");
            }
            if tokio::time::Instant::now() > end {
                anyhow::bail!(
                    "shoal node did not answer on {admin} within {within:?}; see {}",
                    self.command.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reap.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM: the daemon drains, then leaves; waits for it to exit.
    pub async fn drain(mut self, within: Duration) {
        signal(self.pid, "TERM").await;
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(pid = self.pid, "drain did not finish in time; killing");
            let _ = self.child.kill().await;
        }
    }

    /// SIGSTOP.
    pub async fn pause(&self) {
        signal(self.pid, "STOP").await;
    }

    /// SIGCONT.
    pub async fn resume(&self) {
        signal(self.pid, "CONT").await;
    }

    /// What the node sees, read from its admin API (`None` if it does not
    /// answer within 500 ms, as when stopped).
    pub async fn view(&self, name: &str, service: Option<&str>) -> Option<View> {
        let admin = self.command.admin.to_string();
        let read = async {
            let members: Vec<AdminMember> =
                serde_json::from_slice(&node::cli::get(&admin, "/v1/members").await.ok()?).ok()?;
            let policies: Vec<AdminPolicy> =
                serde_json::from_slice(&node::cli::get(&admin, "/v1/policies").await.ok()?).ok()?;
            let mut attempts = BTreeMap::new();
            if let Some(svc) = service {
                let services: Vec<AdminService> =
                    serde_json::from_slice(&node::cli::get(&admin, "/v1/services").await.ok()?)
                        .ok()?;
                for s in services.iter().filter(|s| s.service == svc) {
                    for e in &s.endpoints {
                        if let Some(h) = &e.from_here {
                            attempts.insert(e.node.clone(), h.attempts);
                        }
                    }
                }
            }
            let mut view = View::empty(name);
            for m in members {
                match m.state.as_str() {
                    "alive" => view.alive.insert(m.name.clone()),
                    "dead" => view.dead.insert(m.name.clone()),
                    _ => view.left.insert(m.name.clone()),
                };
                if m.serving == "draining" {
                    view.draining.insert(m.name);
                }
            }
            for p in policies {
                let v = if p.deleted {
                    format!("{} (deleted)", p.version)
                } else {
                    p.version
                };
                view.policies.insert(format!("{}/{}", p.kind, p.name), v);
            }
            view.attempts = attempts;
            Some(view)
        };
        tokio::time::timeout(Duration::from_millis(500), read)
            .await
            .ok()
            .flatten()
    }
}

async fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .await;
    if !status.is_ok_and(|s| s.success()) {
        tracing::warn!(pid, sig, "kill failed");
    }
}

#[derive(Deserialize)]
struct AdminMember {
    name: String,
    state: String,
    serving: String,
}

#[derive(Deserialize)]
struct AdminPolicy {
    kind: String,
    name: String,
    version: String,
    #[serde(default)]
    deleted: bool,
}

#[derive(Deserialize)]
struct AdminService {
    service: String,
    endpoints: Vec<AdminEndpoint>,
}

#[derive(Deserialize)]
struct AdminEndpoint {
    node: String,
    from_here: Option<AdminView>,
}

#[derive(Deserialize)]
struct AdminView {
    attempts: u64,
}

/// Names in a set, for messages.
pub fn names(s: &BTreeSet<String>) -> String {
    s.iter().cloned().collect::<Vec<_>>().join(", ")
}
