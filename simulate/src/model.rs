//! Model mode: the gossip layer alone at large N, many chitchat instances in
//! one process on chitchat's in-memory transport under tokio's paused clock.
//!
//! What is shipped code here: chitchat itself (its Scuttlebutt exchange,
//! digests, deltas, phi-accrual failure detector and wire codec: the
//! in-memory transport serialises every message), the chitchat
//! configuration, node ids and key schema from [`node::gossip::settings`] and
//! [`node::gossip::schema`] (the same functions `Gossip::start` calls), and the
//! policy advert key from `node::policy::sync`.
//!
//! What is modelled: the network ([`crate::model_net`]: seeded loss, a
//! zone cut off from the others, no latency beyond chitchat's own rounds);
//! the zone-pool design (each zone its own chitchat cluster, the
//! [`zones::REPRESENTATIVES`] alive members of a zone that rank first by the
//! nodes' rule (`gossip::zone::rank_representatives`) also in a backbone
//! cluster, republishing summaries both ways under the keys of
//! [`node::gossip::settings::zones`]); values are published unsigned (a real node
//! prefixes each value with an 88-byte signature and publishes its
//! certificate once: that costs bytes when a value changes, not per round);
//! nodes do not refresh their load figures; policy bodies are not pulled
//! (a node "applies" a version when its advert or a zone summary of it
//! reaches the node).
//!
//! Phases, each in virtual time: the pools form; steady-state traffic over a
//! window; a new endpoint in one zone becomes routable from every zone
//! (directly in its own zone, through the zone summaries elsewhere); a
//! policy advert in another zone reaches every node; a node stops without a
//! goodbye and its zone detects it; optionally a zone is cut off (the others
//! drop its endpoints, it keeps its own pool) and healed. False `dead`
//! verdicts about running nodes are counted throughout.
//!
//! Not reproducible: chitchat picks gossip peers with its own random
//! generator, seeded from the OS, so two runs with one seed differ slightly.
//!
//! This module must not touch the QUIC transport or real sockets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chitchat::{ChitchatHandle, ChitchatId};
use node::gossip::schema::{Health, NodeRecord, ServiceRecord, keys};
use node::gossip::settings::{self, Tuning, zones};
use node::gossip::zone::{ServiceSummary, SummaryEndpoint, ZoneLoad};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::model_net::{self, MAX_DATAGRAM, ModelTransport, Net};

/// The service every tenth node fronts, so zone summaries carry endpoints.
const BACKGROUND_SERVICE: &str = "web";
/// The service whose new endpoint the model follows.
const NEW_SERVICE: &str = "fresh";
/// The policy whose advert the model follows.
const MODEL_POLICY: &str = "AuthorizationPolicy/model";

/// Settings for one model run.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Gossip nodes at the start.
    pub nodes: usize,
    /// Zones (1: one pool, no backbone).
    pub zones: usize,
    /// chitchat tuning: interval, phi threshold, sampling window.
    pub tuning: Tuning,
    /// Fraction of messages lost, 0.0..1.0.
    pub loss: f64,
    /// Joins plus leaves per second from the end of formation on (half
    /// each, alternating).
    pub churn: f64,
    /// Cut this zone off from the others after the detection phase.
    pub partition_zone: Option<usize>,
    /// Seed for loss, churn and choices.
    pub seed: u64,
    /// Give up waiting for any one phase after this much virtual time.
    pub phase_limit: Duration,
    /// Steady-state window over which traffic is measured.
    pub traffic_window: Duration,
    /// Stop with [`ModelError::Memory`] when resident memory passes this.
    pub memory_limit_bytes: u64,
    /// Stop the run (reporting what was measured) after this much wall time.
    pub wall_limit: Duration,
    /// Print a line on stderr as each phase ends.
    pub progress: bool,
}

impl ModelConfig {
    /// Shoal's shipped settings ([`node::gossip::settings`]) for `nodes` nodes in
    /// one zone.
    pub fn new(nodes: usize) -> Self {
        ModelConfig {
            nodes,
            zones: 1,
            tuning: Tuning::default(),
            loss: 0.0,
            churn: 0.0,
            partition_zone: None,
            seed: 0,
            phase_limit: Duration::from_secs(120),
            traffic_window: Duration::from_secs(10),
            memory_limit_bytes: default_memory_limit(),
            wall_limit: Duration::from_secs(3000),
            progress: false,
        }
    }

    /// Nodes in the largest zone.
    pub fn largest_zone(&self) -> usize {
        self.nodes.div_ceil(self.zones.max(1))
    }
}

/// Why a model run stopped without figures.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("--nodes must be at least 2, and --zones between 1 and --nodes / 2")]
    TooFew,
    #[error(
        "{nodes} nodes in {zones} zone(s) is beyond this machine's ceiling: {reason}. \
         (Every node keeps a failure-detector window per member of its pool, so memory \
         grows as the pool size squared times the zone count; chitchat's digest lists \
         every member of the pool in every message, so a pool passes the 65,507-byte \
         datagram limit near {max_pool} members.)"
    )]
    Ceiling {
        nodes: usize,
        zones: usize,
        max_pool: usize,
        reason: String,
    },
    #[error(
        "stopped at {at:?} of virtual time: resident memory {rss_mb} MB passed the limit of \
         {limit_mb} MB (set by free memory); try fewer nodes or a smaller --sampling-window"
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

/// What happened while one zone was cut off from the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionReport {
    /// The zone cut off.
    pub zone: usize,
    /// Time until 99% of the other zones' nodes stopped routing to the
    /// zone's endpoint (its summaries withdrawn).
    pub withdrawn_99_ms: Option<u64>,
    /// After the heal: time until 99% of them route to it again.
    pub restored_99_ms: Option<u64>,
    /// False dead verdicts inside the cut-off zone's own pool meanwhile.
    pub false_dead_inside: u64,
}

/// Figures from one model run. Times are virtual; `None` means the phase
/// did not finish within [`ModelConfig::phase_limit`] (or the run stopped).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    /// Nodes at the start.
    pub nodes: usize,
    /// Zones.
    pub zones: usize,
    /// Gossip interval in ms.
    pub interval_ms: u64,
    /// Phi threshold.
    pub phi_threshold: f64,
    /// Failure-detector samples per peer.
    pub sampling_window: usize,
    /// Loss fraction.
    pub loss: f64,
    /// Churn, joins + leaves per second.
    pub churn: f64,
    /// Seed.
    pub seed: u64,
    /// Time until 99% of nodes saw every member of their zone alive (and
    /// the backbone held every zone's representatives).
    pub formed_99_ms: Option<u64>,
    /// Time until all of them did.
    pub formed_100_ms: Option<u64>,
    /// Epidemic baseline for the largest pool, rounds: log2 N + ln N.
    pub baseline_rounds: f64,
    /// New endpoint: time until 99% of the nodes of every zone could route
    /// to it (the slowest zone).
    pub endpoint_99_ms: Option<u64>,
    /// Time until every node could.
    pub endpoint_100_ms: Option<u64>,
    /// Policy advert: time until 99% of all nodes had it.
    pub policy_99_ms: Option<u64>,
    /// Time until every node had it.
    pub policy_100_ms: Option<u64>,
    /// Time until 99% of its zone saw a stopped node dead.
    pub detect_99_ms: Option<u64>,
    /// Time until all of its zone did.
    pub detect_100_ms: Option<u64>,
    /// Dead verdicts about running, settled nodes, in zone pools, after
    /// formation (each flap counts).
    pub false_dead: u64,
    /// Gossip bytes sent per node per second in steady state, mean.
    pub bytes_per_node_s: f64,
    /// The busiest node's (a representative's) bytes per second.
    pub bytes_max_node_s: f64,
    /// Messages sent per node per second in steady state.
    pub messages_per_node_s: f64,
    /// Largest message sent, bytes.
    pub max_message_bytes: usize,
    /// Sends refused: over 65,507 bytes.
    pub oversize_sends: u64,
    /// Messages dropped by the loss setting.
    pub lost_messages: u64,
    /// Nodes that joined and left under churn.
    pub joins: u64,
    /// Nodes that left under churn.
    pub leaves: u64,
    /// Backbone members at the end.
    pub representatives: usize,
    /// The partition phase, when asked for.
    pub partition: Option<PartitionReport>,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// Wall-clock time for the run, ms.
    pub wall_ms: u64,
    /// Peak resident memory of the process (VmHWM), MB.
    pub peak_rss_mb: u64,
}

/// The epidemic baseline: push gossip reaches everyone in about
/// log2 N + ln N rounds.
pub fn baseline_rounds(n: usize) -> f64 {
    let n = n as f64;
    n.log2() + n.ln()
}

/// Checks the run against this machine's ceiling before anything starts.
pub fn check_ceiling(config: &ModelConfig) -> Result<(), ModelError> {
    let (nodes, zones) = (config.nodes, config.zones);
    if nodes < 2 || zones == 0 || zones > nodes / 2 {
        return Err(ModelError::TooFew);
    }
    let pool = config.largest_zone();
    let max_pool = max_pool_by_datagram();
    let ceiling = |reason: String| ModelError::Ceiling {
        nodes,
        zones,
        max_pool,
        reason,
    };
    if pool > max_pool {
        return Err(ceiling(format!(
            "a digest of a {pool}-member pool is about {} bytes, over one datagram",
            estimated_digest_bytes(pool)
        )));
    }
    let need = estimated_peak_bytes(config);
    if need > config.memory_limit_bytes {
        return Err(ceiling(format!(
            "the run would need about {} MB, over the {} MB limit (80% of available memory)",
            need >> 20,
            config.memory_limit_bytes >> 20
        )));
    }
    Ok(())
}

/// Bytes the largest message takes for a pool of `n`: 28 bytes a member
/// (measured with model names `n<index>`), plus a header.
pub fn estimated_digest_bytes(n: usize) -> usize {
    64 + DIGEST_ENTRY_BYTES * n
}

const DIGEST_ENTRY_BYTES: usize = 28;

/// Largest pool whose digest fits in one datagram.
pub fn max_pool_by_datagram() -> usize {
    (MAX_DATAGRAM - 64) / DIGEST_ENTRY_BYTES
}

/// Peak memory: per (member, member) pair of each pool, the sampling
/// window (8 bytes a sample) plus the member's state as the other holds it.
pub fn estimated_peak_bytes(config: &ModelConfig) -> u64 {
    let pool = config.largest_zone() as u64;
    let pairs = pool
        .saturating_mul(pool)
        .saturating_mul(config.zones as u64);
    let per_pair = PER_PAIR_STATE_BYTES + 8 * config.tuning.sampling_window as u64;
    (64u64 << 20).saturating_add(pairs.saturating_mul(per_pair))
}

/// Bytes a member's state costs each other member of its pool, besides the
/// sampling window. Fitted to 1,000 nodes in one pool: peak 3,339 MiB with
/// the 100-sample window and 2,739 MiB with a 20-sample one, both about
/// 2,640 bytes a pair besides the window (docs/SIMULATE.md). Before chitchat's
/// live-node watch channel was kept empty it was about 4,100.
const PER_PAIR_STATE_BYTES: u64 = 2_650;

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
    check_ceiling(config)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .map_err(|e| ModelError::Runtime(e.to_string()))?;
    let wall = Instant::now();
    let mut report = runtime.block_on(simulate(config, wall))?;
    drop(runtime);
    report.wall_ms = wall.elapsed().as_millis() as u64;
    report.peak_rss_mb = peak_rss_bytes() >> 20;
    Ok(report)
}

/// Why a phase loop stopped.
enum Stop {
    Memory(ModelError),
    Wall(String),
}

/// One model node.
struct MNode {
    name: String,
    zone: usize,
    id: ChitchatId,
    handle: Option<ChitchatHandle>,
    backbone: Option<ChitchatHandle>,
    /// Virtual time it started.
    born: tokio::time::Instant,
    /// Left, crashed or stopped: no longer measured.
    gone: bool,
    /// Summary keys it published in the backbone / republished in its pool.
    in_backbone: HashMap<String, String>,
    in_pool: HashMap<String, String>,
}

struct Model<'a> {
    config: &'a ModelConfig,
    net: Arc<Net>,
    transport: ModelTransport,
    nodes: Vec<MNode>,
    /// Per zone, the seeds of its pool.
    zone_seeds: Vec<Vec<String>>,
    /// The backbone seeds (the first representatives of every zone).
    backbone_seeds: Vec<String>,
    /// Per zone, every node that ever held a backbone seat.
    ever_reps: Vec<Vec<usize>>,
    rng: StdRng,
    wall_start: Instant,
    started: tokio::time::Instant,
    /// Counting false dead from here on.
    counting: bool,
    false_dead: u64,
    false_now: HashSet<(usize, usize)>,
    false_in_zone: Vec<u64>,
    /// Churn: next event, whether it is a join, pending stops.
    next_churn: Option<tokio::time::Instant>,
    churn_join: bool,
    pending_stop: Vec<(tokio::time::Instant, usize)>,
    joins: u64,
    leaves: u64,
    /// Nodes the phases rely on (never churned away).
    protected: HashSet<usize>,
    tick: u64,
    /// Nodes holding a backbone seat now.
    seats: usize,
}

fn zone_name(z: usize) -> String {
    format!("z{z}")
}

async fn simulate(config: &ModelConfig, wall_start: Instant) -> Result<ModelReport, ModelError> {
    let n = config.nodes;
    let zones_n = config.zones;
    let net = Net::new(config.loss, config.seed);
    let transport = ModelTransport::new(net.clone());
    let zone_of = |i: usize| i % zones_n;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); zones_n];
    for i in 0..n {
        members[zone_of(i)].push(i);
    }
    let zone_seeds: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            m.iter()
                .take(3)
                .map(|&i| model_net::zone_addr(i).to_string())
                .collect()
        })
        .collect();
    let mut backbone_seeds = Vec::new();
    for m in &members {
        let names: Vec<String> = m.iter().map(|i| format!("n{i}")).collect();
        for r in zones::representatives(names.iter().map(String::as_str)) {
            let i: usize = r[1..].parse().expect("model names are n<index>");
            backbone_seeds.push(model_net::backbone_addr(i).to_string());
        }
    }
    let mut model = Model {
        config,
        net,
        transport,
        nodes: Vec::with_capacity(n),
        zone_seeds,
        backbone_seeds,
        ever_reps: vec![Vec::new(); zones_n],
        rng: StdRng::seed_from_u64(config.seed ^ 0x5eed),
        wall_start,
        started: tokio::time::Instant::now(),
        counting: false,
        false_dead: 0,
        false_now: HashSet::new(),
        false_in_zone: vec![0; zones_n],
        next_churn: None,
        churn_join: false,
        pending_stop: Vec::new(),
        joins: 0,
        leaves: 0,
        protected: HashSet::new(),
        tick: 0,
        seats: 0,
    };
    for i in 0..n {
        model.spawn(i, zone_of(i)).await?;
    }
    let mut report = ModelReport {
        nodes: n,
        zones: zones_n,
        interval_ms: config.tuning.interval.as_millis() as u64,
        phi_threshold: config.tuning.phi_threshold,
        sampling_window: config.tuning.sampling_window,
        loss: config.loss,
        churn: config.churn,
        seed: config.seed,
        formed_99_ms: None,
        formed_100_ms: None,
        baseline_rounds: baseline_rounds(config.largest_zone()),
        endpoint_99_ms: None,
        endpoint_100_ms: None,
        policy_99_ms: None,
        policy_100_ms: None,
        detect_99_ms: None,
        detect_100_ms: None,
        false_dead: 0,
        bytes_per_node_s: 0.0,
        bytes_max_node_s: 0.0,
        messages_per_node_s: 0.0,
        max_message_bytes: 0,
        oversize_sends: 0,
        lost_messages: 0,
        joins: 0,
        leaves: 0,
        representatives: 0,
        partition: None,
        stopped: None,
        wall_ms: 0,
        peak_rss_mb: 0,
    };
    match model.phases(&mut report).await {
        Ok(()) => {}
        Err(Stop::Memory(e)) => return Err(e),
        Err(Stop::Wall(why)) => report.stopped = Some(why),
    }
    report.false_dead = model.false_dead;
    report.max_message_bytes = model.net.max_message.load(Ordering::Relaxed) as usize;
    report.oversize_sends = model.net.oversize.load(Ordering::Relaxed);
    report.lost_messages = model.net.lost.load(Ordering::Relaxed);
    report.joins = model.joins;
    report.leaves = model.leaves;
    report.representatives = model.nodes.iter().filter(|m| m.backbone.is_some()).count();
    for node in &model.nodes {
        if let Some(h) = &node.handle {
            let _ = h.initiate_shutdown();
        }
        if let Some(h) = &node.backbone {
            let _ = h.initiate_shutdown();
        }
    }
    Ok(report)
}

impl Model<'_> {
    /// Starts node `i` in `zone` with the shipped configuration and schema.
    async fn spawn(&mut self, i: usize, zone: usize) -> Result<(), ModelError> {
        self.net.place(i, zone as u16);
        let name = format!("n{i}");
        let addr = model_net::zone_addr(i);
        let generation = 1 + self.started.elapsed().as_millis() as u64;
        let id = settings::node_id(&name, generation, addr);
        let cluster = if self.config.zones > 1 {
            zones::zone_cluster(settings::CLUSTER_ID, &zone_name(zone))
        } else {
            settings::CLUSTER_ID.to_string()
        };
        let seeds = settings::seeds_without_self(&self.zone_seeds[zone], addr);
        let config = settings::chitchat_config(id.clone(), &cluster, seeds, &self.config.tuning);
        let services = if i % 10 == 9 {
            vec![BACKGROUND_SERVICE.to_string()]
        } else {
            Vec::new()
        };
        let record = NodeRecord::new(
            zone_name(zone),
            format!("{}:9000", addr.ip()),
            services.clone(),
        );
        let mut kvs = record.to_kvs();
        for s in &services {
            kvs.push((keys::service(s), service_value(zone)));
        }
        let handle = chitchat::spawn_chitchat(config, kvs, &self.transport)
            .await
            .map_err(|e| ModelError::Start(i, e.to_string()))?;
        let node = MNode {
            name,
            zone,
            id,
            handle: Some(handle),
            backbone: None,
            born: tokio::time::Instant::now(),
            gone: false,
            in_backbone: HashMap::new(),
            in_pool: HashMap::new(),
        };
        if i < self.nodes.len() {
            self.nodes[i] = node;
        } else {
            self.nodes.push(node);
        }
        Ok(())
    }

    fn settle(&self) -> Duration {
        (self.config.tuning.interval * 20).max(Duration::from_secs(10))
    }

    /// Running nodes settled long enough to be measured.
    fn measured(&self) -> Vec<usize> {
        let settle = self.settle();
        (0..self.nodes.len())
            .filter(|&i| {
                let m = &self.nodes[i];
                !m.gone && m.handle.is_some() && m.born.elapsed() >= settle
            })
            .collect()
    }

    async fn phases(&mut self, report: &mut ModelReport) -> Result<(), Stop> {
        let zones_n = self.config.zones;
        // 1. The pools (and the backbone) form.
        let sizes: Vec<usize> = (0..zones_n)
            .map(|z| self.nodes.iter().filter(|m| m.zone == z).count())
            .collect();
        let reps_wanted: usize = sizes.iter().map(|s| (*s).min(zones::REPRESENTATIVES)).sum();
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        let (f99, f100) = self
            .until(&all, "formation", |m, i, c, _| {
                let zone_ok = c.live_nodes().count() == sizes[m.nodes[i].zone];
                zone_ok && (zones_n == 1 || m.backbone_complete(reps_wanted))
            })
            .await?;
        report.formed_99_ms = f99;
        report.formed_100_ms = f100;
        self.counting = true;
        if self.config.churn > 0.0 {
            self.next_churn = Some(tokio::time::Instant::now());
        }

        // 2. Steady-state traffic.
        let b0 = self.net.sent_by_node();
        let m0 = self.net.messages.load(Ordering::Relaxed);
        self.run_for(self.config.traffic_window).await?;
        let b1 = self.net.sent_by_node();
        let secs = self.config.traffic_window.as_secs_f64();
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| !self.nodes[i].gone && i < b0.len())
            .collect();
        let per: Vec<f64> = running
            .iter()
            .map(|&i| (b1[i] - b0[i]) as f64 / secs)
            .collect();
        report.bytes_per_node_s = per.iter().sum::<f64>() / per.len().max(1) as f64;
        report.bytes_max_node_s = per.iter().cloned().fold(0.0, f64::max);
        report.messages_per_node_s = (self.net.messages.load(Ordering::Relaxed) - m0) as f64
            / running.len().max(1) as f64
            / secs;

        // 3. A new endpoint in one zone.
        let ez = self.config.partition_zone.unwrap_or(0).min(zones_n - 1);
        let x = self.plain_member(ez);
        self.protected.insert(x);
        {
            let h = self.nodes[x].handle.as_ref().expect("running");
            let cc = h.chitchat();
            let mut c = cc.lock().await;
            let st = c.self_node_state();
            st.set(keys::service(NEW_SERVICE), service_value(ez));
            st.set(keys::SERVICES, format!("[\"{NEW_SERVICE}\"]"));
        }
        let measured = self.measured();
        let (e99, e100) = self
            .until_per_zone(&measured, "new endpoint", |m, i, c| m.routes(i, c, x))
            .await?;
        self.note("new endpoint", (e99, e100));
        report.endpoint_99_ms = e99;
        report.endpoint_100_ms = e100;

        // 4. A policy advert in another zone.
        let pz = zones_n - 1;
        let y = self.plain_member(pz);
        self.protected.insert(y);
        let policy_key = format!("{}{MODEL_POLICY}", node::policy::sync::KEY_PREFIX);
        let version = format!("1764072000000.0@{}", self.nodes[y].name);
        let advert = format!("{version} 6d6f64656c");
        {
            let h = self.nodes[y].handle.as_ref().expect("running");
            let cc = h.chitchat();
            let mut c = cc.lock().await;
            c.self_node_state().set(&policy_key, &advert);
        }
        let measured = self.measured();
        let (p99, p100) = self
            .until(&measured, "policy", |m, i, c, _| {
                m.has_policy(i, c, y, &policy_key, &version)
            })
            .await?;
        report.policy_99_ms = p99;
        report.policy_100_ms = p100;

        // 5. A node stops without a goodbye; its zone detects it.
        let v = self.plain_member(0);
        self.protected.insert(v);
        let victim = self.nodes[v].id.clone();
        if let Some(h) = self.nodes[v].handle.take() {
            let _ = h.shutdown().await;
        }
        self.nodes[v].gone = true;
        let watchers: Vec<usize> = self
            .measured()
            .into_iter()
            .filter(|&i| self.nodes[i].zone == 0)
            .collect();
        let (d99, d100) = self
            .until(&watchers, "detection", |_, _, c, _| {
                c.dead_nodes().any(|d| *d == victim)
            })
            .await?;
        report.detect_99_ms = d99;
        report.detect_100_ms = d100;

        // 6. Optionally, a zone cut off and healed.
        if let Some(p) = self.config.partition_zone.filter(|_| zones_n > 1) {
            let p = p.min(zones_n - 1);
            let before = self.false_in_zone[p];
            let outside: Vec<usize> = self
                .measured()
                .into_iter()
                .filter(|&i| self.nodes[i].zone != p)
                .collect();
            self.net.partition(Some(p as u16));
            let (w99, _) = self
                .until(&outside, "partition", |m, i, c, _| !m.routes(i, c, x))
                .await?;
            self.run_for(self.config.tuning.interval * 10).await?;
            self.net.partition(None);
            let (r99, _) = self
                .until(&outside, "heal", |m, i, c, _| m.routes(i, c, x))
                .await?;
            report.partition = Some(PartitionReport {
                zone: p,
                withdrawn_99_ms: w99,
                restored_99_ms: r99,
                false_dead_inside: self.false_in_zone[p] - before,
            });
        }
        Ok(())
    }

    /// A running member of `zone` that is no representative and not yet
    /// used by a phase (the highest name: representatives are the lowest).
    fn plain_member(&self, zone: usize) -> usize {
        (0..self.nodes.len())
            .filter(|&i| {
                let m = &self.nodes[i];
                m.zone == zone && !m.gone && m.handle.is_some() && m.backbone.is_none()
            })
            .filter(|i| !self.protected.contains(i))
            .max_by(|a, b| self.nodes[*a].name.cmp(&self.nodes[*b].name))
            .expect("a zone has more members than representatives")
    }

    /// Whether the backbone holds `want` members (every zone's
    /// representatives and nobody else).
    fn backbone_complete(&self, want: usize) -> bool {
        self.seats == want
    }

    /// Whether node `i` (its pool state locked as `c`) can route to the
    /// new endpoint on node `x`: in `x`'s zone from `x`'s own key, elsewhere
    /// from a zone summary a representative republished.
    fn routes(&self, i: usize, c: &chitchat::Chitchat, x: usize) -> bool {
        if i == x {
            return true;
        }
        let xn = &self.nodes[x];
        if self.nodes[i].zone == xn.zone {
            let live = c.dead_nodes().all(|d| *d != xn.id);
            return live
                && c.node_state(&xn.id)
                    .and_then(|s| s.get(&keys::service(NEW_SERVICE)))
                    .is_some_and(|v| !v.is_empty());
        }
        let key = zones::service_key(&zone_name(xn.zone), NEW_SERVICE);
        let quoted = format!("\"node\":\"{}\"", xn.name);
        self.summary_values(i, c, &key)
            .any(|v| v.contains(quoted.as_str()))
    }

    /// Whether node `i` has the policy advert `version` of node `y`.
    fn has_policy(
        &self,
        i: usize,
        c: &chitchat::Chitchat,
        y: usize,
        key: &str,
        version: &str,
    ) -> bool {
        if i == y {
            return true;
        }
        let yn = &self.nodes[y];
        if self.nodes[i].zone == yn.zone {
            return c
                .node_state(&yn.id)
                .and_then(|s| s.get(key))
                .is_some_and(|v| v.starts_with(version));
        }
        let skey = zones::policy_key(&zone_name(yn.zone), MODEL_POLICY);
        self.summary_values(i, c, &skey)
            .any(|v| v.starts_with(version))
    }

    /// Values of summary key `key` as node `i` sees them in its pool,
    /// republished by any node that ever represented its zone.
    fn summary_values<'c>(
        &'c self,
        i: usize,
        c: &'c chitchat::Chitchat,
        key: &'c str,
    ) -> impl Iterator<Item = &'c str> + 'c {
        let z = self.nodes[i].zone;
        self.ever_reps[z].iter().filter_map(move |&r| {
            c.node_state(&self.nodes[r].id)
                .and_then(|s| s.get(key))
                .filter(|v| !v.is_empty())
        })
    }

    /// Advances virtual time by `d`, keeping the model's own loops running.
    async fn run_for(&mut self, d: Duration) -> Result<(), Stop> {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            self.step().await?;
        }
        Ok(())
    }

    /// One step (a quarter interval): memory and wall guards, the
    /// representatives' republishing, and every interval elections, churn
    /// and the false-dead scan.
    async fn step(&mut self) -> Result<(), Stop> {
        let rss = rss_bytes();
        if rss > self.config.memory_limit_bytes {
            return Err(Stop::Memory(ModelError::Memory {
                at: self.started.elapsed(),
                rss_mb: rss >> 20,
                limit_mb: self.config.memory_limit_bytes >> 20,
            }));
        }
        if self.wall_start.elapsed() > self.config.wall_limit {
            return Err(Stop::Wall(format!(
                "wall limit {:?} reached at {:.1}s of virtual time",
                self.config.wall_limit,
                self.started.elapsed().as_secs_f64()
            )));
        }
        let quarter = self.config.tuning.interval / 4;
        tokio::time::sleep(quarter).await;
        self.tick += 1;
        if self.config.zones > 1 {
            self.republish().await;
        }
        if self.tick.is_multiple_of(4) {
            if self.config.zones > 1 {
                self.elect().await;
            }
            self.churn().await;
            if self.counting {
                self.scan_false_dead().await;
            }
        }
        Ok(())
    }

    /// Waits until `pred` holds on 99% and then 100% of `who`; returns both
    /// times in ms from the call (`None` past the phase limit). A node that
    /// is gone meanwhile no longer counts.
    async fn until(
        &mut self,
        who: &[usize],
        phase: &str,
        pred: impl Fn(&Model<'_>, usize, &chitchat::Chitchat, usize) -> bool,
    ) -> Result<(Option<u64>, Option<u64>), Stop> {
        let out = self.until_inner(who, phase, pred).await?;
        self.note(phase, out);
        Ok(out)
    }

    fn note(&self, phase: &str, (t99, t100): (Option<u64>, Option<u64>)) {
        if self.config.progress {
            eprintln!(
                "simulate model: {phase}: 99% {t99:?} ms, 100% {t100:?} ms; at {:.1}s virtual, {:.0}s wall, {} MB resident (peak {} MB)",
                self.started.elapsed().as_secs_f64(),
                self.wall_start.elapsed().as_secs_f64(),
                rss_bytes() >> 20,
                peak_rss_bytes() >> 20
            );
        }
    }

    async fn until_inner(
        &mut self,
        who: &[usize],
        phase: &str,
        pred: impl Fn(&Model<'_>, usize, &chitchat::Chitchat, usize) -> bool,
    ) -> Result<(Option<u64>, Option<u64>), Stop> {
        let start = tokio::time::Instant::now();
        let mut done = vec![false; who.len()];
        let mut t99 = None;
        loop {
            let mut ok = 0;
            let mut total = 0;
            for (k, &i) in who.iter().enumerate() {
                if self.nodes[i].gone {
                    continue;
                }
                total += 1;
                if done[k] {
                    ok += 1;
                    continue;
                }
                let Some(h) = &self.nodes[i].handle else {
                    continue;
                };
                let cc = h.chitchat();
                let c = cc.lock().await;
                if pred(self, i, &c, k) {
                    done[k] = true;
                    ok += 1;
                }
            }
            let elapsed = start.elapsed().as_millis() as u64;
            if t99.is_none() && ok * 100 >= total * 99 {
                t99 = Some(elapsed);
            }
            if ok == total {
                return Ok((t99, Some(elapsed)));
            }
            if start.elapsed() >= self.config.phase_limit {
                return Ok((t99, None));
            }
            self.step().await.map_err(|e| match e {
                Stop::Wall(w) => Stop::Wall(format!("{w}, during {phase}")),
                other => other,
            })?;
        }
    }

    /// Like [`Model::until`], with 99% reached when every zone reached it.
    async fn until_per_zone(
        &mut self,
        who: &[usize],
        phase: &str,
        pred: impl Fn(&Model<'_>, usize, &chitchat::Chitchat) -> bool,
    ) -> Result<(Option<u64>, Option<u64>), Stop> {
        let zones_n = self.config.zones;
        let start = tokio::time::Instant::now();
        let mut zone_99: Vec<Option<u64>> = vec![None; zones_n];
        let mut seen = vec![false; who.len()];
        loop {
            let mut ok = vec![0usize; zones_n];
            let mut total = vec![0usize; zones_n];
            for (k, &i) in who.iter().enumerate() {
                let m = &self.nodes[i];
                if m.gone {
                    continue;
                }
                total[m.zone] += 1;
                if !seen[k] {
                    let Some(h) = &m.handle else { continue };
                    let cc = h.chitchat();
                    let c = cc.lock().await;
                    seen[k] = pred(self, i, &c);
                }
                if seen[k] {
                    ok[m.zone] += 1;
                }
            }
            let elapsed = start.elapsed().as_millis() as u64;
            for z in 0..zones_n {
                if zone_99[z].is_none() && ok[z] * 100 >= total[z] * 99 {
                    zone_99[z] = Some(elapsed);
                }
            }
            let t99 = zone_99
                .iter()
                .try_fold(0u64, |acc, t| t.map(|t| acc.max(t)));
            if ok == total {
                return Ok((t99, Some(elapsed)));
            }
            if start.elapsed() >= self.config.phase_limit {
                return Ok((t99, None));
            }
            self.step().await.map_err(|e| match e {
                Stop::Wall(w) => Stop::Wall(format!("{w}, during {phase}")),
                other => other,
            })?;
        }
    }

    /// Each node decides from its own pool view whether it is one of its
    /// zone's representatives by the nodes' rule (fewer than three alive
    /// members rank below it: lowest FNV-1a hash of the name first)
    /// and joins or leaves the backbone. A node decides only after ten
    /// rounds in its pool, so a half-formed view elects nobody.
    async fn elect(&mut self) {
        let wait = self.config.tuning.interval * 10;
        for i in 0..self.nodes.len() {
            let m = &self.nodes[i];
            let Some(h) = &m.handle else { continue };
            if m.gone || m.born.elapsed() < wait {
                continue;
            }
            let is_rep = {
                let cc = h.chitchat();
                let c = cc.lock().await;
                let own = (zones::fnv1a(&m.name), m.name.as_str());
                let below = c
                    .live_nodes()
                    .filter(|id| (zones::fnv1a(&id.node_id), &*id.node_id) < own)
                    .take(zones::REPRESENTATIVES)
                    .count();
                below < zones::REPRESENTATIVES
            };
            match (is_rep, self.nodes[i].backbone.is_some()) {
                (true, false) => self.join_backbone(i).await,
                (false, true) => self.leave_backbone(i).await,
                _ => {}
            }
        }
    }

    async fn join_backbone(&mut self, i: usize) {
        let addr = model_net::backbone_addr(i);
        let m = &self.nodes[i];
        let id = settings::node_id(&m.name, m.id.generation_id, addr);
        let seeds = settings::seeds_without_self(&self.backbone_seeds, addr);
        let config = settings::chitchat_config(
            id,
            &zones::backbone_cluster(settings::CLUSTER_ID),
            seeds,
            &self.config.tuning,
        );
        let kvs = vec![(keys::ZONE.to_string(), zone_name(m.zone))];
        if let Ok(h) = chitchat::spawn_chitchat(config, kvs, &self.transport).await {
            let z = self.nodes[i].zone;
            self.nodes[i].backbone = Some(h);
            self.seats += 1;
            self.nodes[i].in_backbone.clear();
            if !self.ever_reps[z].contains(&i) {
                self.ever_reps[z].push(i);
            }
        }
    }

    async fn leave_backbone(&mut self, i: usize) {
        if let Some(h) = self.nodes[i].backbone.take() {
            self.seats -= 1;
            let _ = h.shutdown().await;
        }
        // Withdraw what it republished into its pool (empty = deleted).
        let withdrawn: Vec<String> = self.nodes[i].in_pool.drain().map(|(k, _)| k).collect();
        if let Some(h) = &self.nodes[i].handle {
            let cc = h.chitchat();
            let mut c = cc.lock().await;
            for k in withdrawn {
                c.self_node_state().set(k, "");
            }
        }
    }

    /// Every representative: its zone's summary into the backbone, the
    /// other zones' summaries from the backbone into its pool.
    async fn republish(&mut self) {
        for i in 0..self.nodes.len() {
            if self.nodes[i].gone {
                continue;
            }
            let (Some(pool), Some(bb)) = (&self.nodes[i].handle, &self.nodes[i].backbone) else {
                continue;
            };
            let zone = zone_name(self.nodes[i].zone);
            // This zone's summary, from the pool.
            let mine = {
                let cc = pool.chitchat();
                let c = cc.lock().await;
                zone_summary(&c, &zone)
            };
            // Other zones' summaries, from the backbone.
            let theirs = {
                let cc = bb.chitchat();
                let mut c = cc.lock().await;
                let node = &mut self.nodes[i];
                sync_keys(c.self_node_state(), &mut node.in_backbone, &mine);
                remote_summaries(&c, &zone)
            };
            let cc = self.nodes[i].handle.as_ref().expect("checked").chitchat();
            let mut c = cc.lock().await;
            let node = &mut self.nodes[i];
            sync_keys(c.self_node_state(), &mut node.in_pool, &theirs);
        }
    }

    /// Counts dead verdicts about running, settled nodes (zone pools).
    async fn scan_false_dead(&mut self) {
        let settle = self.settle();
        let mut now = HashSet::new();
        for i in 0..self.nodes.len() {
            let m = &self.nodes[i];
            if m.gone {
                continue;
            }
            let Some(h) = &m.handle else { continue };
            let cc = h.chitchat();
            let c = cc.lock().await;
            for d in c.dead_nodes() {
                let j = model_net::index_of(d.gossip_advertise_addr);
                let Some(s) = self.nodes.get(j) else { continue };
                if !s.gone && s.handle.is_some() && s.id == *d && s.born.elapsed() >= settle {
                    now.insert((i, j));
                }
            }
        }
        for p in &now {
            if !self.false_now.contains(p) {
                self.false_dead += 1;
                self.false_in_zone[self.nodes[p.0].zone] += 1;
            }
        }
        self.false_now = now;
    }

    /// Joins and leaves at the configured rate, alternating.
    async fn churn(&mut self) {
        let now = tokio::time::Instant::now();
        let due: Vec<usize> = self
            .pending_stop
            .iter()
            .filter(|(t, _)| *t <= now)
            .map(|(_, i)| *i)
            .collect();
        self.pending_stop.retain(|(t, _)| *t > now);
        for i in due {
            if let Some(h) = self.nodes[i].handle.take() {
                let _ = h.shutdown().await;
            }
        }
        let Some(next) = self.next_churn else { return };
        if now < next {
            return;
        }
        self.next_churn = Some(next + Duration::from_secs_f64(1.0 / self.config.churn));
        self.churn_join = !self.churn_join;
        if self.churn_join {
            let i = self.nodes.len();
            let z = self.rng.gen_range(0..self.config.zones);
            if self.spawn(i, z).await.is_ok() {
                self.joins += 1;
            }
            return;
        }
        let candidates: Vec<usize> = (0..self.nodes.len())
            .filter(|i| {
                let m = &self.nodes[*i];
                !m.gone && m.handle.is_some() && m.backbone.is_none()
            })
            .filter(|i| !self.protected.contains(i) && *i >= self.config.zones * 3)
            .collect();
        if candidates.is_empty() {
            return;
        }
        let i = candidates[self.rng.gen_range(0..candidates.len())];
        if let Some(h) = &self.nodes[i].handle {
            let cc = h.chitchat();
            let mut c = cc.lock().await;
            c.self_node_state()
                .set(keys::STATE, node::gossip::ServingState::Left.to_string());
        }
        self.nodes[i].gone = true;
        self.leaves += 1;
        self.pending_stop
            .push((now + self.config.tuning.interval * 2, i));
    }
}

/// A healthy instance record, as a node publishes it under `svc.<name>`.
fn service_value(zone: usize) -> String {
    let record = ServiceRecord {
        health: Health::Healthy,
        zone: zone_name(zone),
        ..ServiceRecord::default()
    };
    serde_json::to_string(&record).unwrap_or_default()
}

/// A zone's summary from its pool: each service's healthy endpoints on
/// serving nodes (bounded), the highest advert of each policy, the load.
fn zone_summary(c: &chitchat::Chitchat, zone: &str) -> BTreeMap<String, String> {
    let mut services: BTreeMap<String, Vec<(String, std::net::SocketAddr)>> = BTreeMap::new();
    let mut policies: BTreeMap<String, (node::policy::Version, String)> = BTreeMap::new();
    let mut alive = 0usize;
    let live: HashSet<&ChitchatId> = c.live_nodes().collect();
    for (id, st) in c.node_states() {
        if !live.contains(id) {
            continue;
        }
        alive += 1;
        if st.get(keys::STATE).is_some_and(|s| s != "serving") {
            continue;
        }
        for (k, v) in st.iter_prefix(keys::SERVICE_PREFIX) {
            let Ok(rec) = serde_json::from_str::<ServiceRecord>(&v.value) else {
                continue;
            };
            if rec.health == Health::Healthy {
                services
                    .entry(k[keys::SERVICE_PREFIX.len()..].to_string())
                    .or_default()
                    .push((id.node_id.to_string(), id.gossip_advertise_addr));
            }
        }
        for (k, v) in st.iter_prefix(node::policy::sync::KEY_PREFIX) {
            let Some(ver) = v
                .value
                .split(' ')
                .next()
                .and_then(|s| s.parse::<node::policy::Version>().ok())
            else {
                continue;
            };
            let name = k[node::policy::sync::KEY_PREFIX.len()..].to_string();
            match policies.get(&name) {
                Some((have, _)) if *have >= ver => {}
                _ => {
                    policies.insert(name, (ver, v.value.clone()));
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    // The nodes' summary value (`gossip::zone::ServiceSummary`), so its
    // bytes are what a representative sends; load figures stay at zero.
    for (svc, mut names) in services {
        names.sort_unstable();
        names.truncate(zones::MAX_ENDPOINTS);
        let summary = ServiceSummary {
            endpoints: names
                .into_iter()
                .map(|(node, addr)| SummaryEndpoint {
                    node,
                    addr,
                    weight: 1,
                    ewma_ms: 0.0,
                    in_flight: 0,
                })
                .collect(),
        };
        out.insert(
            zones::service_key(zone, &svc),
            serde_json::to_string(&summary).unwrap_or_default(),
        );
    }
    for (name, (_, advert)) in policies {
        out.insert(zones::policy_key(zone, &name), advert);
    }
    let load = ZoneLoad {
        nodes: alive,
        in_flight: 0,
    };
    out.insert(
        zones::load_key(zone),
        serde_json::to_string(&load).unwrap_or_default(),
    );
    out
}

/// Summaries of the other zones, as alive backbone members publish them
/// (the first alive publisher of a key, by member id, wins).
fn remote_summaries(c: &chitchat::Chitchat, own_zone: &str) -> BTreeMap<String, String> {
    let live: HashSet<&ChitchatId> = c.live_nodes().collect();
    let mut out = BTreeMap::new();
    for (id, st) in c.node_states() {
        if !live.contains(id) {
            continue;
        }
        for (k, v) in st.iter_prefix(zones::SUMMARY_PREFIX) {
            let Some((zone, _)) = zones::parse_key(k) else {
                continue;
            };
            if zone == own_zone || v.value.is_empty() {
                continue;
            }
            out.entry(k.to_string()).or_insert_with(|| v.value.clone());
        }
    }
    out
}

/// Sets the keys of `want` that changed, and empties the ones published
/// before and no longer wanted (Shoal never sends chitchat deletes).
fn sync_keys(
    st: &mut chitchat::NodeState,
    published: &mut HashMap<String, String>,
    want: &BTreeMap<String, String>,
) {
    for (k, v) in want {
        if published.get(k) != Some(v) {
            st.set(k, v);
            published.insert(k.clone(), v.clone());
        }
    }
    let stale: Vec<String> = published
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for k in stale {
        st.set(&k, "");
        published.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(nodes: usize, zones: usize) -> ModelConfig {
        let mut c = ModelConfig::new(nodes);
        c.zones = zones;
        c.traffic_window = Duration::from_secs(2);
        c.phase_limit = Duration::from_secs(60);
        c.memory_limit_bytes = u64::MAX;
        c
    }

    #[test]
    fn baseline_matches_the_formula() {
        assert!((baseline_rounds(1024) - (10.0 + 1024f64.ln())).abs() < 1e-9);
    }

    #[test]
    fn ceiling_refuses_with_a_reason() {
        let mut c = small(5_000, 1);
        let err = check_ceiling(&c).unwrap_err().to_string();
        assert!(err.contains("datagram"), "{err}");
        c.zones = 10;
        assert!(check_ceiling(&c).is_ok(), "500-member pools fit");
        let mut c = small(500, 1);
        c.memory_limit_bytes = 64 << 20;
        let err = check_ceiling(&c).unwrap_err().to_string();
        assert!(err.contains("MB"), "{err}");
        assert!(check_ceiling(&small(1, 1)).is_err());
        assert!(check_ceiling(&small(10, 6)).is_err(), "zones of one node");
        assert!(check_ceiling(&small(10, 1)).is_ok());
    }

    #[test]
    fn the_model_runs_the_shipped_settings() {
        let c = ModelConfig::new(10);
        assert_eq!(c.tuning, Tuning::default());
        assert_eq!(c.tuning.sampling_window, settings::SAMPLING_WINDOW);
        assert_eq!(
            c.tuning.interval,
            node::gossip::GossipConfig::new("x").interval
        );
    }

    #[test]
    fn one_pool_converges_spreads_and_detects() {
        let r = run(&small(12, 1)).unwrap();
        assert!(r.formed_100_ms.is_some(), "{r:?}");
        assert!(r.endpoint_100_ms.is_some(), "{r:?}");
        assert!(r.policy_100_ms.is_some(), "{r:?}");
        assert!(r.detect_100_ms.is_some(), "{r:?}");
        assert!(r.messages_per_node_s > 1.0, "{r:?}");
        assert_eq!(r.oversize_sends, 0);
        assert_eq!(r.false_dead, 0, "{r:?}");
        assert_eq!(r.representatives, 0, "one pool has no backbone");
    }

    #[test]
    fn twenty_nodes_in_two_zones_route_across_zones() {
        let r = run(&small(20, 2)).unwrap();
        assert_eq!(r.stopped, None);
        assert!(r.formed_100_ms.is_some(), "{r:?}");
        assert_eq!(r.representatives, 6, "three per zone: {r:?}");
        // The endpoint is in zone 0 and the policy in zone 1: both had to
        // cross the backbone to reach every node.
        assert!(r.endpoint_100_ms.is_some(), "{r:?}");
        assert!(r.policy_100_ms.is_some(), "{r:?}");
        assert!(r.detect_100_ms.is_some(), "{r:?}");
        assert_eq!(r.false_dead, 0, "{r:?}");
    }

    #[test]
    fn loss_drops_messages_but_the_model_still_converges() {
        let mut c = small(16, 2);
        c.loss = 0.1;
        c.seed = 3;
        let r = run(&c).unwrap();
        assert!(r.lost_messages > 0, "{r:?}");
        assert!(r.endpoint_100_ms.is_some(), "{r:?}");
        assert!(r.detect_100_ms.is_some(), "{r:?}");
        assert_eq!(r.false_dead, 0, "{r:?}");
    }

    #[test]
    fn a_cut_off_zone_is_dropped_by_the_others_and_keeps_its_pool() {
        let mut c = small(18, 3);
        c.partition_zone = Some(1);
        let r = run(&c).unwrap();
        let p = r.partition.clone().expect("partition phase ran");
        assert_eq!(p.zone, 1);
        assert!(
            p.withdrawn_99_ms.is_some(),
            "others drop its endpoint: {r:?}"
        );
        assert!(
            p.restored_99_ms.is_some(),
            "and route to it after the heal: {r:?}"
        );
        assert_eq!(
            p.false_dead_inside, 0,
            "its own pool keeps its members: {r:?}"
        );
    }

    #[test]
    fn churn_joins_and_leaves_nodes() {
        let mut c = small(16, 2);
        c.churn = 2.0;
        let r = run(&c).unwrap();
        assert!(r.joins >= 2 && r.leaves >= 2, "{r:?}");
        assert!(r.endpoint_100_ms.is_some(), "{r:?}");
        assert_eq!(r.false_dead, 0, "{r:?}");
    }
}
