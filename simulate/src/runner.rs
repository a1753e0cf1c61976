//! Runs a [`Scenario`] against real in-process nodes: starts the cluster on
//! 127.0.0.1 with fresh certificates, every socket on one [`FaultNet`],
//! plays the timeline, samples what every node sees, and returns the
//! [`Trace`] that invariants judge.
//!
//! One task drives everything: it sleeps until the next step or sample,
//! whichever is first. A step that takes time (a restart waiting for its
//! port, a drain lingering) delays later samples, and each record carries the
//! time it really happened.
//!
//! This module owns node lifecycles and the name → address map; it must not
//! judge anything (see [`crate::invariants`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use node::certs::{Ca, Validity, write_node_dir};
use node::socket::{SharedSocket, SocketLayer};
use node::{MemberState, Node, NodeConfig, ServingState};
use serde::Serialize;
use tokio::time::Instant;

use crate::faults::{FaultCounts, FaultNet, LinkFaults};
use crate::scenario::{Action, Scenario, Step};

/// How often every node's member list is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// A callback receiving [`RunEvent`]s.
pub type EventSink = Arc<dyn Fn(&RunEvent) + Send + Sync>;

/// Options for one run.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Seed for every random choice the harness makes.
    pub seed: u64,
    /// A layer put under the fault layer on every node's socket (tests use it
    /// to break the gossip path on purpose).
    pub extra_layer: Option<Arc<dyn SocketLayer>>,
    /// Called with every [`RunEvent`] as it happens (the CLI prints them).
    pub on_event: Option<EventSink>,
}

/// Progress of a run.
#[derive(Debug, Clone)]
pub enum RunEvent {
    /// All nodes see each other; the timeline's clock starts now.
    Formed { nodes: usize, took: Duration },
    /// A step was applied `at` seconds into the timeline.
    Step { at: f64, text: String },
    /// The timeline and its checks are over.
    Finished { at: f64 },
}

/// Everything a run recorded. Times are seconds from the start of the
/// timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    /// Node names.
    pub nodes: Vec<String>,
    /// Steps as applied.
    pub steps: Vec<StepRecord>,
    /// What every running node saw, over time.
    pub samples: Vec<Sample>,
    /// Planned timeline length.
    pub duration: f64,
    /// When sampling stopped.
    pub ended: f64,
    /// What the fault layer did.
    pub faults: FaultCounts,
    /// How long the cluster took to form before the timeline started.
    pub formed_in: f64,
}

/// A step as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Planned offset.
    pub planned: f64,
    /// When it began.
    pub at: f64,
    /// When its change took effect: when a restarted node was up, when a
    /// draining node began to leave (after its linger), else when the step
    /// finished. Invariants use this time.
    pub effective: f64,
    /// The step's sentence.
    pub text: String,
    /// The step.
    #[serde(skip)]
    pub step: Step,
}

/// One sampling round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// When.
    pub t: f64,
    /// One view per running node.
    pub views: Vec<View>,
}

/// What one node saw.
#[derive(Debug, Clone, Serialize)]
pub struct View {
    /// The observer.
    pub observer: String,
    /// Members it sees alive.
    pub alive: BTreeSet<String>,
    /// Members it sees dead.
    pub dead: BTreeSet<String>,
    /// Members it sees as left.
    pub left: BTreeSet<String>,
}

/// Runs `scenario` and returns its trace.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Trace> {
    let emit = |e: RunEvent| {
        if let Some(f) = &options.on_event {
            f(&e);
        }
    };
    let mut cluster = SimCluster::start(scenario, options).await?;
    let formed_in = cluster.wait_formed(scenario.cluster.form_within).await?;
    emit(RunEvent::Formed {
        nodes: scenario.cluster.nodes.len(),
        took: formed_in,
    });

    let start = Instant::now();
    let mut trace = Trace {
        nodes: scenario.cluster.nodes.clone(),
        steps: Vec::new(),
        samples: Vec::new(),
        duration: scenario.duration.as_secs_f64(),
        ended: 0.0,
        faults: FaultCounts::default(),
        formed_in: formed_in.as_secs_f64(),
    };
    let horizon = crate::invariants::horizon(scenario);
    let mut pending = scenario.steps.iter().peekable();
    let mut next_sample = start;
    loop {
        let now = Instant::now();
        let elapsed = now - start;
        if let Some(step) = pending.peek()
            && start + step.at <= now
        {
            {
                let step = pending.next().expect("peeked");
                let at = start.elapsed().as_secs_f64();
                let applied = cluster.apply(&step.action).await?;
                let effective =
                    (applied.effective.unwrap_or_else(Instant::now) - start).as_secs_f64();
                let note = applied.note;
                let text = match note {
                    Some(note) => format!("{} ({note})", step.action),
                    None => step.action.to_string(),
                };
                emit(RunEvent::Step {
                    at,
                    text: text.clone(),
                });
                trace.steps.push(StepRecord {
                    planned: step.at.as_secs_f64(),
                    at,
                    effective,
                    text,
                    step: step.clone(),
                });
                continue;
            }
        }
        if next_sample <= now {
            let t = elapsed.as_secs_f64();
            trace.samples.push(cluster.sample(t).await);
            next_sample += SAMPLE_EVERY;
            if next_sample < Instant::now() {
                next_sample = Instant::now();
            }
            if pending.peek().is_none() && elapsed >= scenario.duration {
                let done = elapsed >= horizon
                    || crate::invariants::judge(scenario, &trace)
                        .iter()
                        .all(|v| v.passed);
                if done {
                    break;
                }
            }
            continue;
        }
        let mut wake = next_sample;
        if let Some(step) = pending.peek() {
            wake = wake.min(start + step.at);
        }
        tokio::time::sleep_until(wake).await;
    }
    trace.ended = start.elapsed().as_secs_f64();
    trace.faults = cluster.net.counts();
    emit(RunEvent::Finished { at: trace.ended });
    cluster.stop().await;
    Ok(trace)
}

/// How a step went.
#[derive(Default)]
struct Applied {
    /// Worth printing beside the step.
    note: Option<String>,
    /// When the change took effect, if not when the step finished.
    effective: Option<Instant>,
}

/// One node of the simulated cluster.
struct SimNode {
    name: String,
    config: NodeConfig,
    addr: SocketAddr,
    node: Option<Node>,
}

/// The in-process cluster: nodes, their certificates and the fault network.
struct SimCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<SimNode>,
    net: Arc<FaultNet>,
    /// Desired link rules by node name; re-applied when an address changes.
    links: BTreeMap<(String, String), LinkFaults>,
    paused: BTreeSet<String>,
}

/// Puts the fault layer over an extra layer.
struct Stacked {
    outer: Arc<dyn SocketLayer>,
    inner: Arc<dyn SocketLayer>,
}

impl SocketLayer for Stacked {
    fn wrap(&self, socket: SharedSocket) -> SharedSocket {
        self.outer.wrap(self.inner.wrap(socket))
    }
}

// === impl SimCluster ===

impl SimCluster {
    async fn start(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("shoal-sim-")
            .tempdir()
            .context("temporary folder")?;
        let ca = Ca::generate("sim.shoal", 1).context("mesh CA")?;
        let net = FaultNet::new(options.seed);
        let layer = match &options.extra_layer {
            Some(extra) => Arc::new(Stacked {
                outer: net.layer(),
                inner: extra.clone(),
            }) as Arc<dyn SocketLayer>,
            None => net.layer(),
        };
        let spec = &scenario.cluster;
        let mut nodes: Vec<SimNode> = Vec::new();
        for (name, zone) in spec.nodes.iter().zip(&spec.zones) {
            let certs: PathBuf = dir.path().join(name);
            let cert = ca
                .issue(name, &["sim".to_string()], Validity::days(1))
                .context("node certificate")?;
            write_node_dir(&certs, &ca.cert_pem(), &cert, false).context("writing certs")?;
            let mut config = NodeConfig::local(name, &certs);
            config.zone = zone.clone();
            config.data_dir = Some(dir.path().join(name).join("data"));
            config.gossip_interval = spec.gossip_interval;
            config.phi_threshold = spec.phi_threshold;
            config.socket_layer = Some(layer.clone());
            config.seeds = nodes.iter().take(3).map(|n| n.addr.to_string()).collect();
            let node = Node::start(config.clone())
                .await
                .with_context(|| format!("starting {name}"))?;
            let addr = node.quic_addr();
            config.listen = addr;
            nodes.push(SimNode {
                name: name.clone(),
                config,
                addr,
                node: Some(node),
            });
        }
        Ok(SimCluster {
            _dir: dir,
            nodes,
            net,
            links: BTreeMap::new(),
            paused: BTreeSet::new(),
        })
    }

    /// Waits until every node sees every node alive.
    async fn wait_formed(&self, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let all: BTreeSet<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        loop {
            let sample = self.sample(0.0).await;
            if sample.views.iter().all(|v| v.alive == all) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                let lagging: Vec<String> = sample
                    .views
                    .iter()
                    .filter(|v| v.alive != all)
                    .map(|v| format!("{} sees {} alive", v.observer, v.alive.len()))
                    .collect();
                anyhow::bail!(
                    "the cluster did not form within {within:?}: {}",
                    lagging.join(", ")
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    async fn sample(&self, t: f64) -> Sample {
        let mut views = Vec::new();
        for n in &self.nodes {
            let Some(node) = &n.node else { continue };
            let mut view = View {
                observer: n.name.clone(),
                alive: BTreeSet::new(),
                dead: BTreeSet::new(),
                left: BTreeSet::new(),
            };
            for m in node.members().await {
                match m.state {
                    MemberState::Alive => view.alive.insert(m.name),
                    MemberState::Dead => view.dead.insert(m.name),
                    MemberState::Left => view.left.insert(m.name),
                };
            }
            views.push(view);
        }
        Sample { t, views }
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Applies one step; returns a note on how it went, if worth printing.
    async fn apply(&mut self, action: &Action) -> anyhow::Result<Applied> {
        let mut applied = Applied::default();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        match action {
            Action::Crash { node } => {
                let i = self.index(node)?;
                if let Some(n) = self.nodes[i].node.take() {
                    n.kill().await;
                }
                self.unpause(node);
            }
            Action::Drain { node, linger } => {
                let i = self.index(node)?;
                if let Some(n) = self.nodes[i].node.take() {
                    n.gossip().set_serving(ServingState::Draining).await;
                    tokio::time::sleep(*linger).await;
                    applied.effective = Some(Instant::now());
                    n.shutdown().await;
                }
                self.unpause(node);
            }
            Action::Restart { node } => applied.note = Some(self.restart(node).await?),
            Action::Pause { node } => {
                let i = self.index(node)?;
                self.net.isolate(self.nodes[i].addr);
                self.paused.insert(node.clone());
            }
            Action::Resume { node } => self.unpause(node),
            Action::Partition { links } => {
                for pair in links.pairs(&names) {
                    self.links.entry(pair).or_default().cut = true;
                }
                self.push_links();
            }
            Action::Heal => {
                self.links.clear();
                self.push_links();
            }
            Action::Loss { links, percent } => {
                for pair in links.pairs(&names) {
                    self.links.entry(pair).or_default().loss = percent / 100.0;
                }
                self.push_links();
            }
            Action::Delay {
                links,
                delay,
                jitter,
            } => {
                for pair in links.pairs(&names) {
                    let f = self.links.entry(pair).or_default();
                    f.delay = *delay;
                    f.jitter = *jitter;
                }
                self.push_links();
            }
            Action::Duplicate { links, percent } => {
                for pair in links.pairs(&names) {
                    self.links.entry(pair).or_default().duplicate = percent / 100.0;
                }
                self.push_links();
            }
            Action::Reorder {
                links,
                percent,
                hold,
            } => {
                for pair in links.pairs(&names) {
                    let f = self.links.entry(pair).or_default();
                    f.reorder = percent / 100.0;
                    f.reorder_hold = *hold;
                }
                self.push_links();
            }
            Action::Assert { .. } => {}
        }
        Ok(applied)
    }

    fn unpause(&mut self, node: &str) {
        if self.paused.remove(node)
            && let Ok(i) = self.index(node)
        {
            self.net.restore(self.nodes[i].addr);
        }
    }

    /// Restarts `name` on its old port when the OS gives it back within a
    /// few seconds, else on a new one (link rules follow the address).
    async fn restart(&mut self, name: &str) -> anyhow::Result<String> {
        let i = self.index(name)?;
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.name != name && n.node.is_some())
            .map(|n| n.addr.to_string())
            .collect();
        let mut config = self.nodes[i].config.clone();
        config.seeds = seeds;
        let deadline = Instant::now() + Duration::from_secs(3);
        let node = loop {
            match Node::start(config.clone()).await {
                Ok(node) => break node,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(node = name, error = %e, "restart: port busy, retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(_) => {
                    config.listen.set_port(0);
                    break Node::start(config.clone())
                        .await
                        .with_context(|| format!("restarting {name}"))?;
                }
            }
        };
        let addr = node.quic_addr();
        config.listen = addr;
        let n = &mut self.nodes[i];
        let note = if n.addr == addr {
            format!("back on its old address {addr}")
        } else {
            format!("old port busy: now on {addr}")
        };
        n.config = config;
        n.addr = addr;
        n.node = Some(node);
        self.push_links();
        Ok(note)
    }

    /// Rewrites the fault table from the name-level rules.
    fn push_links(&self) {
        self.net.clear_links();
        let addr: BTreeMap<&str, SocketAddr> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.addr))
            .collect();
        for ((a, b), f) in &self.links {
            if let (Some(x), Some(y)) = (addr.get(a.as_str()), addr.get(b.as_str())) {
                self.net.set_link(*x, *y, *f);
            }
        }
    }

    async fn stop(self) {
        for n in self.nodes {
            if let Some(node) = n.node {
                node.kill().await;
            }
        }
    }
}
