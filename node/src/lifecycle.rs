//! A node's life beside its app: when it is ready (routable, not merely
//! started), the peers it remembers across restarts, warnings about seeds it
//! cannot reach and certificates about to expire, and stop requests made
//! through the admin API (`POST /shutdown`).
//!
//! It reads gossip and the proxy; it never changes what they route.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gossip::{Gossip, MemberState};
use serde::{Deserialize, Serialize};
use transport::Endpoint;

use crate::node::NodeState;

/// File in `--data-dir` holding the peers this node last knew.
pub const PEERS_FILE: &str = "peers.json";

/// How often an unreachable seed is reported while the node has not joined.
pub const SEED_WARN_EVERY: Duration = Duration::from_secs(5);

/// How often it is reported once the node has joined (the mesh works without
/// that seed, but its operator should know).
pub const SEED_WARN_JOINED_EVERY: Duration = Duration::from_secs(60);

/// A certificate with less than this left gets a WARN line every hour.
pub const CERT_WARN_DAYS: i64 = 30;

/// One peer as remembered in [`PEERS_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedPeer {
    /// Node name.
    pub name: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// Reads the peers remembered in `data_dir` (none if there is no file; a
/// damaged file is reported and ignored, never fatal).
pub fn remembered_peers(data_dir: &Path) -> Vec<RememberedPeer> {
    let path = data_dir.join(PEERS_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable remembered peers");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    }
}

/// Whether the node is ready to route, and why not.
pub(crate) struct Readiness {
    /// Every seed it dials: configured, then remembered.
    seeds: Vec<String>,
    /// It knew peers before this start (from `--data-dir`).
    remembered: bool,
    /// The bound on waiting for a remembered peer passed without one.
    gave_up: AtomicBool,
}

impl Readiness {
    pub(crate) fn new(seeds: Vec<String>, remembered: bool) -> Self {
        Readiness {
            seeds,
            remembered,
            gave_up: AtomicBool::new(false),
        }
    }

    /// `Ok` when routable; otherwise the reason, in words for `/readyz`.
    pub(crate) async fn check(&self, state: &NodeState) -> Result<(), String> {
        if let Some(why) = state.gossip.failure() {
            return Err(format!("gossip stopped: {why}"));
        }
        if let Some(other) = state.gossip.duplicate_of_self() {
            return Err(format!("another node with this name is alive at {other}"));
        }
        let joined = state.gossip.joined().await;
        if !joined && self.gave_up.load(Ordering::Relaxed) {
            // A mesh of one: the proxy latches its table only once gossip
            // joined, and there is nobody to route to yet.
            return Ok(());
        }
        if !joined {
            let what = if self.remembered {
                "waiting for a first peer (this node knew peers before it restarted)"
            } else {
                "waiting for a first peer"
            };
            return Err(format!("{what} (seeds: {})", self.seeds.join(", ")));
        }
        if !state.proxy.routes_ready() {
            return Err("routing table not built yet".into());
        }
        Ok(())
    }

    /// After `deadline`, a node that remembered peers but heard from none
    /// becomes ready anyway (it may be the first of the mesh to come back),
    /// and says so.
    pub(crate) async fn bound_wait(self: Arc<Self>, gossip: Gossip, deadline: Duration) {
        if !self.remembered {
            return;
        }
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if gossip.joined().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if gossip.joined().await {
            return;
        }
        self.gave_up.store(true, Ordering::Relaxed);
        tracing::warn!(
            seeds = %self.seeds.join(", "),
            waited = ?deadline,
            "no remembered peer or seed answered within the join timeout; ready anyway, as a mesh of one (raise --join-timeout to wait longer)"
        );
    }
}

/// Writes the peers this node knows to `data_dir/peers.json` whenever the
/// set changes (checked every 2 s), so a restart can dial them.
pub(crate) async fn remember_peers(gossip: Gossip, data_dir: PathBuf) {
    let path = data_dir.join(PEERS_FILE);
    let mut last: Option<Vec<RememberedPeer>> = None;
    loop {
        let mut peers: Vec<RememberedPeer> = gossip
            .members()
            .await
            .into_iter()
            .filter(|m| !m.is_self && m.state == MemberState::Alive)
            .map(|m| RememberedPeer {
                name: m.name,
                addr: m.addr,
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        // Forget nobody just because they are down right now: keep the
        // previous list until someone is alive again.
        if !peers.is_empty() && last.as_ref() != Some(&peers) {
            let tmp = path.with_extension("json.tmp");
            let written = serde_json::to_vec_pretty(&peers)
                .map_err(std::io::Error::other)
                .and_then(|bytes| std::fs::write(&tmp, bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            match written {
                Ok(()) => last = Some(peers),
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "could not remember peers")
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Every few seconds, names each seed this node cannot reach: a seed that is
/// not an alive member is dialled (a real QUIC handshake); a failure is a
/// WARN line naming the seed and why.
pub(crate) async fn warn_unreachable_seeds(gossip: Gossip, endpoint: Endpoint, seeds: Vec<String>) {
    if seeds.is_empty() {
        return;
    }
    let me = endpoint.local_addr();
    loop {
        let joined = gossip.joined().await;
        let alive: Vec<SocketAddr> = gossip
            .members()
            .await
            .into_iter()
            .filter(|m| !m.is_self && m.state == MemberState::Alive)
            .map(|m| m.addr)
            .collect();
        for seed in &seeds {
            let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(seed.as_str()).await {
                Ok(a) => a.filter(|a| *a != me).collect(),
                Err(e) => {
                    tracing::warn!(seed = %seed, error = %e, "seed does not resolve");
                    continue;
                }
            };
            for addr in addrs {
                if alive.contains(&addr) {
                    continue;
                }
                let dial = tokio::time::timeout(Duration::from_secs(3), endpoint.connect(addr));
                let why = match dial.await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no QUIC handshake within 3s".to_string(),
                };
                tracing::warn!(seed = %seed, %addr, error = %why, "seed unreachable");
            }
        }
        let every = if joined {
            SEED_WARN_JOINED_EVERY
        } else {
            SEED_WARN_EVERY
        };
        tokio::time::sleep(every).await;
    }
}

/// Once at start and then every hour, a WARN line for each certificate in
/// `certs` (node and CAs) with less than [`CERT_WARN_DAYS`] left.
pub(crate) async fn warn_expiring_certificates(certs: PathBuf) {
    loop {
        let now = unix_now();
        for (kind, file) in [
            ("node", transport::certs::NODE_CERT),
            ("ca", transport::certs::CA_CERT),
        ] {
            let Ok(list) = transport::certs::summarize_pem_file(&certs.join(file)) else {
                continue;
            };
            for c in list {
                let days = c.days_left(now);
                if days < CERT_WARN_DAYS {
                    tracing::warn!(
                        cert = kind,
                        subject = %c.subject,
                        file = %certs.join(file).display(),
                        days_left = days,
                        "certificate expires soon; renew it (shoal cert renew)"
                    );
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
