//! Model mode: the gossip layer alone, many chitchat instances in one
//! process on chitchat's in-memory [`ChannelTransport`], under tokio's paused
//! clock, so hundreds of nodes and minutes of gossip run in seconds.
//!
//! What it measures per N: time and rounds until 99% and 100% of nodes see
//! every node alive, how long a new key takes to reach 99% / 100% of nodes
//! (it stands in for a policy version), how long until 99% / 100% see a
//! stopped node dead, gossip bytes and messages per node per second in steady
//! state, the largest message, wall time and peak memory (VmHWM).
//!
//! Loss: [`ChannelTransport`] has none, so [`LossyTransport`] wraps it and
//! drops a seeded fraction of delivered messages on the receiving side.
//! Messages larger than a UDP datagram (65,507 bytes) fail as they would on
//! the wire ([`ChannelTransport::with_mtu`]).
//!
//! What is not reproducible: chitchat picks gossip peers with its own random
//! generator, seeded from the OS, so two runs with one seed differ slightly.
//!
//! This module must not touch the QUIC transport or real sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatEnvelope, ChitchatHandle, ChitchatId, FailureDetectorConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Largest UDP payload: chitchat's messages must fit in one datagram.
pub const MAX_DATAGRAM: usize = 65_507;

/// Settings for one model run.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Number of gossip nodes.
    pub nodes: usize,
    /// Gossip round interval. Default 200 ms.
    pub gossip_interval: Duration,
    /// Fraction of messages lost, 0.0..1.0. Default 0.
    pub loss: f64,
    /// Failure detector threshold. Default 8 (as Shoal's nodes).
    pub phi_threshold: f64,
    /// Seed for loss decisions.
    pub seed: u64,
    /// Give up waiting for any one phase after this much virtual time.
    /// Default 120 s.
    pub phase_limit: Duration,
    /// Steady-state window over which traffic is measured. Default 10 s.
    pub traffic_window: Duration,
    /// Stop with [`ModelError::Memory`] when resident memory passes this.
    pub memory_limit_bytes: u64,
}

impl ModelConfig {
    /// Defaults for `nodes` nodes (see each field).
    pub fn new(nodes: usize) -> Self {
        ModelConfig {
            nodes,
            gossip_interval: Duration::from_millis(200),
            loss: 0.0,
            phi_threshold: 8.0,
            seed: 0,
            phase_limit: Duration::from_secs(120),
            traffic_window: Duration::from_secs(10),
            memory_limit_bytes: default_memory_limit(),
        }
    }
}

/// Why a model run stopped without figures.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--nodes must be at least 2")]
    TooFew,
    #[error(
        "{nodes} nodes is beyond this machine's ceiling: {reason}. Largest accepted: {max}. \
         (Every node keeps a failure-detector window per peer, so memory grows as N²; \
         chitchat's digest lists every node in every message, so messages pass the \
         65,507-byte datagram limit near 2,300 nodes with model mode's short names and \
         sooner with longer ones.)"
    )]
    Ceiling {
        nodes: usize,
        max: usize,
        reason: String,
    },
    #[error(
        "stopped at {at:?} of virtual time: resident memory {rss_mb} MB passed the limit of \
         {limit_mb} MB (set by free memory); try fewer nodes"
    )]
    Memory {
        at: Duration,
        rss_mb: u64,
        limit_mb: u64,
    },
    #[error("starting node {0}: {1}")]
    Start(usize, String),
    #[error("runtime: {0}")]
    Runtime(String),
}

/// Figures from one model run. Times are virtual; `None` means the phase
/// did not finish within [`ModelConfig::phase_limit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    /// Nodes.
    pub nodes: usize,
    /// Gossip interval in ms.
    pub interval_ms: u64,
    /// Loss fraction.
    pub loss: f64,
    /// Seed.
    pub seed: u64,
    /// Time until 99% of nodes saw every node alive.
    pub converge_99_ms: Option<u64>,
    /// Time until every node saw every node alive.
    pub converge_100_ms: Option<u64>,
    /// Epidemic baseline in rounds: log2 N + ln N.
    pub baseline_rounds: f64,
    /// Time until 99% of nodes had a key newly set on one node.
    pub key_99_ms: Option<u64>,
    /// Time until every node had it.
    pub key_100_ms: Option<u64>,
    /// Time until 99% of the others saw a stopped node dead.
    pub dead_99_ms: Option<u64>,
    /// Time until all of them did.
    pub dead_100_ms: Option<u64>,
    /// Gossip bytes sent per node per second, steady state.
    pub bytes_per_node_s: f64,
    /// Gossip messages sent per node per second, steady state.
    pub messages_per_node_s: f64,
    /// Largest message sent, bytes.
    pub max_message_bytes: usize,
    /// Sends that failed because the message passed 65,507 bytes.
    pub oversize_sends: u64,
    /// Messages dropped by the loss setting.
    pub lost_messages: u64,
    /// Wall-clock time for the run, ms.
    pub wall_ms: u64,
    /// Peak resident memory of the process (VmHWM), MB.
    pub peak_rss_mb: u64,
}

impl ModelReport {
    /// Rounds for a time in ms.
    pub fn rounds(&self, ms: Option<u64>) -> Option<f64> {
        ms.map(|ms| ms as f64 / self.interval_ms as f64)
    }
}

/// The epidemic baseline: push gossip reaches everyone in about
/// log2 N + ln N rounds.
pub fn baseline_rounds(n: usize) -> f64 {
    let n = n as f64;
    n.log2() + n.ln()
}

/// Checks `nodes` against this machine's ceiling before anything is started.
pub fn check_ceiling(nodes: usize, memory_limit_bytes: u64) -> Result<(), ModelError> {
    if nodes < 2 {
        return Err(ModelError::TooFew);
    }
    let by_datagram = max_nodes_by_datagram();
    let by_memory = max_nodes_by_memory(memory_limit_bytes);
    let max = by_datagram.min(by_memory);
    if nodes > by_datagram {
        return Err(ModelError::Ceiling {
            nodes,
            max,
            reason: format!(
                "a digest of {nodes} nodes is about {} bytes, over one datagram",
                estimated_digest_bytes(nodes)
            ),
        });
    }
    if nodes > by_memory {
        return Err(ModelError::Ceiling {
            nodes,
            max,
            reason: format!(
                "the run would need about {} MB, over the {} MB limit (80% of available memory)",
                estimated_peak_bytes(nodes) >> 20,
                memory_limit_bytes >> 20
            ),
        });
    }
    Ok(())
}

/// Bytes the largest message takes for `n` nodes. Measured: 10,951 bytes at
/// N = 500 and 21,020 at 750 with model mode's 10-character names; 28 bytes a
/// node is the conservative slope. Longer names make entries longer.
pub fn estimated_digest_bytes(n: usize) -> usize {
    64 + DIGEST_ENTRY_BYTES * n
}

/// Bytes per node in the largest message, measured.
const DIGEST_ENTRY_BYTES: usize = 28;

/// Largest N whose digest fits in one datagram.
pub fn max_nodes_by_datagram() -> usize {
    (MAX_DATAGRAM - 64) / DIGEST_ENTRY_BYTES
}

/// Rough wall time of a run of `n` nodes on the development machine (one
/// core; measured 7 s at 100, 50 s at 200, 816 s at 750: about N^2.2).
pub fn estimated_wall(n: usize) -> Duration {
    Duration::from_secs_f64(816.0 * (n as f64 / 750.0).powf(2.2))
}

/// Peak memory of a run of `n` nodes: a fixed part plus a part that grows
/// as N². Every node keeps every node's state and a failure-detector window
/// of 1,000 samples (8 KB) per peer, which dominates. Fitted to runs on the
/// development machine (472 MB at 200, 2,929 MB at 500, 6,468 MB at 750);
/// see docs/SIMULATE.md.
pub fn estimated_peak_bytes(n: usize) -> u64 {
    let n = n as u64;
    (20u64 << 20).saturating_add(n.saturating_mul(n).saturating_mul(PER_PAIR_BYTES))
}

/// Bytes of peak memory per (node, node) pair, fitted from measured runs.
const PER_PAIR_BYTES: u64 = 12_000;

/// Largest N whose estimated peak fits under `limit`.
pub fn max_nodes_by_memory(limit: u64) -> usize {
    let mut n = 2usize;
    while n < 1_000_000 && estimated_peak_bytes(n + 1) <= limit {
        n += 1;
    }
    n
}

/// 80% of the memory the kernel says is available now.
pub fn default_memory_limit() -> u64 {
    let avail_kb = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| proc_field_kb(&s, "MemAvailable:"))
        .unwrap_or(4 << 20);
    avail_kb * 1024 / 10 * 8
}

/// Peak resident memory of this process, bytes (VmHWM).
pub fn peak_rss_bytes() -> u64 {
    status_field_kb("VmHWM:") * 1024
}

/// Resident memory of this process now, bytes (VmRSS).
pub fn rss_bytes() -> u64 {
    status_field_kb("VmRSS:") * 1024
}

fn status_field_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| proc_field_kb(&s, field))
        .unwrap_or(0)
}

fn proc_field_kb(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Runs one model on a fresh paused-clock runtime and returns its figures.
pub fn run(config: &ModelConfig) -> Result<ModelReport, ModelError> {
    check_ceiling(config.nodes, config.memory_limit_bytes)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| ModelError::Runtime(e.to_string()))?;
    let wall = Instant::now();
    let mut report = runtime.block_on(simulate(config))?;
    drop(runtime);
    report.wall_ms = wall.elapsed().as_millis() as u64;
    report.peak_rss_mb = peak_rss_bytes() >> 20;
    Ok(report)
}

/// One model node.
struct ModelNode {
    id: ChitchatId,
    handle: ChitchatHandle,
}

/// Per-socket traffic counters.
#[derive(Default)]
struct Traffic {
    bytes: AtomicU64,
    messages: AtomicU64,
    max_message: AtomicU64,
    oversize: AtomicU64,
    lost: AtomicU64,
}

async fn simulate(config: &ModelConfig) -> Result<ModelReport, ModelError> {
    let n = config.nodes;
    let traffic = Arc::new(Traffic::default());
    let transport = LossyTransport {
        inner: ChannelTransport::with_mtu(MAX_DATAGRAM),
        loss: config.loss,
        rng: Arc::new(Mutex::new(StdRng::seed_from_u64(config.seed))),
        traffic: traffic.clone(),
    };
    let addrs: Vec<SocketAddr> = (0..n).map(model_addr).collect();
    let seeds: Vec<String> = addrs.iter().take(3).map(|a| a.to_string()).collect();
    let mut nodes = Vec::with_capacity(n);
    for (i, addr) in addrs.iter().enumerate() {
        let id = ChitchatId::new(format!("node-{i:05}"), 1, *addr);
        let chitchat_config = ChitchatConfig {
            chitchat_id: id.clone(),
            cluster_id: "shoal-model".into(),
            gossip_interval: config.gossip_interval,
            listen_addr: *addr,
            seed_nodes: seeds
                .iter()
                .filter(|s| **s != addr.to_string())
                .cloned()
                .collect(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: config.phi_threshold,
                sampling_window_size: 1000,
                max_interval: (config.gossip_interval * 20).max(Duration::from_secs(2)),
                initial_interval: config.gossip_interval,
                dead_node_grace_period: Duration::from_secs(3600),
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V1,
        };
        let handle = chitchat::spawn_chitchat(chitchat_config, record_keys(i), &transport)
            .await
            .map_err(|e| ModelError::Start(i, e.to_string()))?;
        nodes.push(ModelNode { id, handle });
    }
    let watch = Watch {
        config,
        started: tokio::time::Instant::now(),
        step: config.gossip_interval / 4,
    };

    // 1. Membership: every node sees every node alive.
    let (converge_99, converge_100) = watch
        .until_fraction(&nodes, |c| c.live_nodes().count() == n)
        .await?;

    // 2. Steady-state traffic over a window.
    let (b0, m0) = (
        traffic.bytes.load(Ordering::Relaxed),
        traffic.messages.load(Ordering::Relaxed),
    );
    watch.sleep(config.traffic_window).await?;
    let secs = config.traffic_window.as_secs_f64();
    let bytes_per_node_s = (traffic.bytes.load(Ordering::Relaxed) - b0) as f64 / n as f64 / secs;
    let messages_per_node_s =
        (traffic.messages.load(Ordering::Relaxed) - m0) as f64 / n as f64 / secs;

    // 3. A new key set on node 0 spreads.
    {
        let chitchat = nodes[0].handle.chitchat();
        let mut c = chitchat.lock().await;
        c.self_node_state().set("policy.version", "1");
    }
    let origin = nodes[0].id.clone();
    let (key_99, key_100) = watch
        .until_fraction(&nodes, |c| {
            c.node_state(&origin)
                .and_then(|s| s.get("policy.version"))
                .is_some_and(|v| v == "1")
        })
        .await?;

    // 4. The last node stops without a goodbye; the others detect it.
    let victim = nodes.pop().expect("at least two nodes");
    let victim_id = victim.id.clone();
    let _ = victim.handle.shutdown().await;
    let (dead_99, dead_100) = watch
        .until_fraction(&nodes, |c| !c.live_nodes().any(|id| *id == victim_id))
        .await?;

    for node in nodes {
        let _ = node.handle.initiate_shutdown();
    }
    Ok(ModelReport {
        nodes: n,
        interval_ms: config.gossip_interval.as_millis() as u64,
        loss: config.loss,
        seed: config.seed,
        converge_99_ms: converge_99,
        converge_100_ms: converge_100,
        baseline_rounds: baseline_rounds(n),
        key_99_ms: key_99,
        key_100_ms: key_100,
        dead_99_ms: dead_99,
        dead_100_ms: dead_100,
        bytes_per_node_s,
        messages_per_node_s,
        max_message_bytes: traffic.max_message.load(Ordering::Relaxed) as usize,
        oversize_sends: traffic.oversize.load(Ordering::Relaxed),
        lost_messages: traffic.lost.load(Ordering::Relaxed),
        wall_ms: 0,
        peak_rss_mb: 0,
    })
}

/// Polls the model in virtual time, guarding memory.
struct Watch<'a> {
    config: &'a ModelConfig,
    started: tokio::time::Instant,
    step: Duration,
}

impl Watch<'_> {
    /// Waits until `pred` holds on 99% and then 100% of `nodes`; returns
    /// both times in ms from the call (`None` past the phase limit).
    async fn until_fraction(
        &self,
        nodes: &[ModelNode],
        pred: impl Fn(&chitchat::Chitchat) -> bool,
    ) -> Result<(Option<u64>, Option<u64>), ModelError> {
        let start = tokio::time::Instant::now();
        let need_99 = (nodes.len() as f64 * 0.99).ceil() as usize;
        let mut t99 = None;
        loop {
            let mut ok = 0;
            for node in nodes {
                let chitchat = node.handle.chitchat();
                let c = chitchat.lock().await;
                if pred(&c) {
                    ok += 1;
                }
            }
            let elapsed = start.elapsed().as_millis() as u64;
            if ok >= need_99 && t99.is_none() {
                t99 = Some(elapsed);
            }
            if ok == nodes.len() {
                return Ok((t99, Some(elapsed)));
            }
            if start.elapsed() >= self.config.phase_limit {
                return Ok((t99, None));
            }
            self.sleep(self.step).await?;
        }
    }

    /// Sleeps in virtual time, checking memory every step.
    async fn sleep(&self, d: Duration) -> Result<(), ModelError> {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            let rss = rss_bytes();
            if rss > self.config.memory_limit_bytes {
                return Err(ModelError::Memory {
                    at: self.started.elapsed(),
                    rss_mb: rss >> 20,
                    limit_mb: self.config.memory_limit_bytes >> 20,
                });
            }
            tokio::time::sleep(self.step.min(end - tokio::time::Instant::now())).await;
        }
        Ok(())
    }
}

/// The logical address of model node `i`.
fn model_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::new(ip.into(), 7000)
}

/// Keys shaped like what a Shoal node publishes (see the gossip schema).
fn record_keys(i: usize) -> Vec<(String, String)> {
    let mut kvs = HashMap::new();
    kvs.insert("schema", "1".to_string());
    kvs.insert("zone", format!("zone-{}", i % 3));
    kvs.insert("admin", format!("10.0.{}.{}:9000", (i >> 8) & 255, i & 255));
    kvs.insert("build", env!("CARGO_PKG_VERSION").to_string());
    kvs.insert("state", "serving".to_string());
    kvs.insert("services", "[\"web\"]".to_string());
    kvs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// A chitchat transport over [`ChannelTransport`] that drops a seeded
/// fraction of messages and counts traffic.
pub struct LossyTransport {
    inner: ChannelTransport,
    loss: f64,
    rng: Arc<Mutex<StdRng>>,
    traffic: Arc<Traffic>,
}

#[async_trait]
impl Transport for LossyTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        Ok(Box::new(LossySocket {
            inner,
            loss: self.loss,
            rng: self.rng.clone(),
            traffic: self.traffic.clone(),
        }))
    }
}

struct LossySocket {
    inner: Box<dyn Socket>,
    loss: f64,
    rng: Arc<Mutex<StdRng>>,
    traffic: Arc<Traffic>,
}

#[async_trait]
impl Socket for LossySocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        match self.inner.send(to, envelope).await {
            Ok(out) => {
                let t = &self.traffic;
                t.bytes
                    .fetch_add(out.num_bytes_sent as u64, Ordering::Relaxed);
                t.messages.fetch_add(1, Ordering::Relaxed);
                t.max_message
                    .fetch_max(out.num_bytes_sent as u64, Ordering::Relaxed);
                Ok(out)
            }
            Err(e) => {
                // Oversize: the wire would refuse it too. Report it and carry on,
                // as chitchat does with a failed UDP send.
                self.traffic.oversize.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let out = self.inner.recv().await?;
            if self.loss > 0.0 && self.rng.lock().unwrap().gen_bool(self.loss.min(1.0)) {
                self.traffic.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baseline_matches_the_formula() {
        assert!((baseline_rounds(1024) - (10.0 + 1024f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn ceiling_refuses_with_a_reason() {
        let err = check_ceiling(5_000, 1 << 40).unwrap_err().to_string();
        assert!(err.contains("datagram"), "{err}");
        let err = check_ceiling(500, 64 << 20).unwrap_err().to_string();
        assert!(err.contains("MB"), "{err}");
        assert!(check_ceiling(1, 1 << 30).is_err());
        assert!(check_ceiling(10, 1 << 30).is_ok());
    }

    #[test]
    fn small_model_converges_spreads_and_detects() {
        let mut config = ModelConfig::new(12);
        config.traffic_window = Duration::from_secs(2);
        config.memory_limit_bytes = u64::MAX;
        let r = run(&config).unwrap();
        assert!(r.converge_100_ms.is_some(), "{r:?}");
        assert!(r.key_100_ms.is_some(), "{r:?}");
        assert!(r.dead_100_ms.is_some(), "{r:?}");
        assert!(r.messages_per_node_s > 1.0, "{r:?}");
        assert_eq!(r.oversize_sends, 0);
    }

    #[test]
    fn loss_drops_messages_but_the_model_still_converges() {
        let mut config = ModelConfig::new(12);
        config.loss = 0.2;
        config.seed = 3;
        config.traffic_window = Duration::from_secs(2);
        config.memory_limit_bytes = u64::MAX;
        let r = run(&config).unwrap();
        assert!(r.lost_messages > 0, "{r:?}");
        assert!(r.converge_100_ms.is_some(), "{r:?}");
    }
}
