//! Runs a [`Scenario`] against real nodes: in process by default (every
//! socket on one [`FaultNet`]), or as `shoal node` processes with
//! [`RunOptions::processes`]. Starts the cluster on 127.0.0.1 with fresh
//! certificates and one HTTP upstream per service instance, plays the
//! timeline, drives the workload, samples what every node sees, and returns
//! the [`Trace`] that invariants judge.
//!
//! Three tasks share the run: the timeline (this function: steps, some of
//! which take seconds, like a drain or a rolling restart), the sampler
//! (every 100 ms, what each running node sees: members, policy versions,
//! attempts per endpoint), and the workload driver (open loop). Every record
//! carries the time it really happened.
//!
//! This module owns node lifecycles and the name → address map; it must not
//! judge anything (see [`crate::invariants`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use node::certs::{Ca, Validity, write_node_dir};
use node::proxy::{Protocol, ServiceSpec};
use node::socket::{SharedSocket, SocketLayer};
use node::{MemberState, Node, NodeConfig, ServingState};
use serde::Serialize;
use tokio::time::Instant;

use crate::byzantine::{Aim, Rogue, RogueRecord};
use crate::faults::{FaultCounts, FaultNet, LinkFaults};
use crate::process::{NodeCommand, NodeProcess};
use crate::scenario::{Action, Byzantine, CLIENT_IDENTITY, DENIED_IDENTITY, Scenario, Step};
use crate::workload::{Outbounds, RequestRecord, Upstream};

/// How often every node is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// How long a rolling restart waits for a restarted node to be seen alive.
const ALIVE_WITHIN: Duration = Duration::from_secs(15);

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
    /// Run real `shoal node` processes from this binary instead of
    /// in-process nodes.
    pub processes: Option<PathBuf>,
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
    /// `in-process` or `processes`.
    pub mode: &'static str,
    /// Node names.
    pub nodes: Vec<String>,
    /// The workload's service, if any.
    pub service: Option<String>,
    /// Steps as applied.
    pub steps: Vec<StepRecord>,
    /// What every running node saw, over time.
    pub samples: Vec<Sample>,
    /// Every request of the workload.
    pub requests: Vec<RequestRecord>,
    /// Policy writes the nodes acknowledged.
    pub acks: Vec<Ack>,
    /// The documents pushed, by the version they were accepted as.
    pub policy_docs: BTreeMap<String, PolicyDoc>,
    /// Planned timeline length.
    pub duration: f64,
    /// When sampling stopped.
    pub ended: f64,
    /// What the fault layer did.
    pub faults: FaultCounts,
    /// How long the cluster took to form before the timeline started.
    pub formed_in: f64,
    /// What each `byzantine` step's rogue did.
    pub rogues: Vec<RogueRecord>,
    /// When a rogue ran: every `/metrics` series whose name says `refused`,
    /// summed over the nodes running at the end (what the nodes counted as
    /// refused; reported, never judged).
    pub refusals: BTreeMap<String, f64>,
    /// Moments the harness's runtime ran nothing for half a second or more
    /// (see [`crate::stall`]).
    pub stalls: Vec<crate::stall::Stall>,
}

/// A step as it happened.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Planned offset.
    pub planned: f64,
    /// When it began.
    pub at: f64,
    /// When its change took effect: when a restarted node was up, when a
    /// drained node left, else when the step finished. Invariants use this.
    pub effective: f64,
    /// The step's sentence.
    pub text: String,
    /// Per node, for a rolling restart: when it began to drain, when it
    /// stopped, when it was up again.
    pub phases: Vec<NodePhase>,
    /// The step.
    #[serde(skip)]
    pub step: Step,
}

/// One node's turn in a rolling restart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodePhase {
    /// The node.
    pub node: String,
    /// Draining announced.
    pub drain: f64,
    /// Stopped (left).
    pub down: f64,
    /// Running again.
    pub up: f64,
}

/// A policy write a node acknowledged (2xx with a version).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ack {
    /// When the answer came.
    pub t: f64,
    /// The node that accepted it.
    pub node: String,
    /// `Kind/name`.
    pub policy: String,
    /// The version it answered with.
    pub version: String,
}

/// A pushed document.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PolicyDoc {
    /// `Kind/name`.
    pub policy: String,
    /// The text as pushed.
    pub document: String,
}

/// One sampling round.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// When.
    pub t: f64,
    /// One view per running node that answered.
    pub views: Vec<View>,
}

/// What one node saw.
#[derive(Debug, Clone, Serialize, Default)]
pub struct View {
    /// The observer.
    pub observer: String,
    /// Members it sees alive.
    pub alive: BTreeSet<String>,
    /// Members it sees dead.
    pub dead: BTreeSet<String>,
    /// Members it sees as left.
    pub left: BTreeSet<String>,
    /// Members it sees draining.
    pub draining: BTreeSet<String>,
    /// The version of each policy it runs (`Kind/name` → version).
    pub policies: BTreeMap<String, String>,
    /// Attempts it has sent to each endpoint (node) of the workload's
    /// service, since it started.
    pub attempts: BTreeMap<String, u64>,
    /// Zone pools: for each other zone, the representatives it learns from
    /// its own representatives' relayed summaries (`xz.<zone>.reps`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub reps: BTreeMap<String, Vec<String>>,
}

impl View {
    /// An empty view of `observer`.
    pub fn empty(observer: &str) -> Self {
        View {
            observer: observer.to_string(),
            ..View::default()
        }
    }
}

/// Runs `scenario` and returns its trace.
pub async fn run(scenario: &Scenario, options: &RunOptions) -> anyhow::Result<Trace> {
    let emit = |e: RunEvent| {
        if let Some(f) = &options.on_event {
            f(&e);
        }
    };
    if options.processes.is_some() {
        let problems = scenario.process_mode_problems();
        if !problems.is_empty() {
            anyhow::bail!(
                "this scenario cannot run with --processes:\n  {}",
                problems.join("\n  ")
            );
        }
    }
    let mut cluster = SimCluster::start(scenario, options).await?;
    let formed = cluster.wait_formed(scenario.cluster.form_within).await;
    let formed_in = match formed {
        Ok(d) => d,
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    if let Some(w) = &scenario.workload
        && let Err(e) = cluster
            .wait_routable(&w.service, scenario.cluster.form_within)
            .await
    {
        cluster.stop().await;
        return Err(e);
    }
    emit(RunEvent::Formed {
        nodes: scenario.cluster.nodes.len(),
        took: formed_in,
    });

    let start = Instant::now();
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = tokio::spawn(sample_loop(
        cluster.live.clone(),
        cluster.workload_service.clone(),
        start,
        samples.clone(),
    ));
    let stalls: Arc<Mutex<Vec<crate::stall::Stall>>> = Arc::default();
    let stall_watch = tokio::spawn(crate::stall::watch(start, stalls.clone()));
    let requests: Arc<Mutex<Vec<RequestRecord>>> = Arc::default();
    let driver = scenario.workload.as_ref().map(|w| {
        tokio::spawn(crate::workload::drive(
            crate::workload::schedule(w, options.seed),
            w.service.clone(),
            w.timeout,
            start,
            cluster.outbounds.clone(),
            requests.clone(),
        ))
    });

    let mut trace = Trace {
        mode: if options.processes.is_some() {
            "processes"
        } else {
            "in-process"
        },
        nodes: scenario.cluster.nodes.clone(),
        service: scenario.workload.as_ref().map(|w| w.service.clone()),
        steps: Vec::new(),
        samples: Vec::new(),
        requests: Vec::new(),
        acks: Vec::new(),
        policy_docs: BTreeMap::new(),
        duration: scenario.duration.as_secs_f64(),
        ended: 0.0,
        faults: FaultCounts::default(),
        formed_in: formed_in.as_secs_f64(),
        rogues: Vec::new(),
        refusals: BTreeMap::new(),
        stalls: Vec::new(),
    };
    let horizon = crate::invariants::horizon(scenario);
    let mut pending = scenario.steps.iter().peekable();
    let result: anyhow::Result<()> = async {
        loop {
            let now = Instant::now();
            if let Some(step) = pending.peek()
                && start + step.at <= now
            {
                // Pushes planned for the same moment go out concurrently.
                let mut batch = vec![pending.next().expect("peeked")];
                if matches!(batch[0].action, Action::PushPolicy { .. }) {
                    while let Some(next) = pending.peek() {
                        if next.at == batch[0].at
                            && matches!(next.action, Action::PushPolicy { .. })
                        {
                            batch.push(pending.next().expect("peeked"));
                        } else {
                            break;
                        }
                    }
                }
                let at = start.elapsed().as_secs_f64();
                let applied = if batch.len() > 1 {
                    cluster.push_many(&batch, start, &mut trace).await
                } else {
                    vec![cluster.apply(&batch[0].action, start, &mut trace).await?]
                };
                for (step, applied) in batch.into_iter().zip(applied) {
                    let effective =
                        (applied.effective.unwrap_or_else(Instant::now) - start).as_secs_f64();
                    let text = match applied.note {
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
                        phases: applied.phases,
                        step: step.clone(),
                    });
                }
                continue;
            }
            let elapsed = now - start;
            if pending.peek().is_none() && elapsed >= scenario.duration {
                trace.samples = samples.lock().unwrap().clone();
                trace.requests = requests.lock().unwrap().clone();
                trace.stalls = stalls.lock().unwrap().clone();
                trace.rogues = cluster.rogues.iter().map(Rogue::record).collect();
                let done = elapsed >= horizon
                    || crate::invariants::judge(scenario, &trace)
                        .iter()
                        .all(|v| v.passed);
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            let mut wake = now + Duration::from_millis(200);
            if let Some(step) = pending.peek() {
                wake = wake.min(start + step.at);
            }
            tokio::time::sleep_until(wake).await;
        }
        Ok(())
    }
    .await;
    if let Some(d) = driver {
        let _ = d.await;
    }
    sampler.abort();
    stall_watch.abort();
    trace.stalls = stalls.lock().unwrap().clone();
    trace.ended = start.elapsed().as_secs_f64();
    trace.samples = samples.lock().unwrap().clone();
    let mut reqs = requests.lock().unwrap().clone();
    reqs.sort_by(|a, b| a.t.total_cmp(&b.t));
    trace.requests = reqs;
    trace.faults = cluster.net.counts();
    trace.rogues = cluster.rogues.iter().map(Rogue::record).collect();
    if !cluster.rogues.is_empty() {
        trace.refusals = cluster.refusals().await;
    }
    emit(RunEvent::Finished { at: trace.ended });
    cluster.stop().await;
    result.map(|()| trace)
}

/// Samples every running node every [`SAMPLE_EVERY`] until aborted.
async fn sample_loop(
    live: Live,
    service: Option<String>,
    start: Instant,
    out: Arc<Mutex<Vec<Sample>>>,
) {
    let mut next = start;
    loop {
        let t = start.elapsed().as_secs_f64();
        let sample = sample(&live, service.as_deref(), t).await;
        out.lock().unwrap().push(sample);
        next += SAMPLE_EVERY;
        if next < Instant::now() {
            next = Instant::now();
        }
        tokio::time::sleep_until(next).await;
    }
}

async fn sample(live: &Live, service: Option<&str>, t: f64) -> Sample {
    let nodes: Vec<(String, Arc<Instance>)> = live
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let views = futures::future::join_all(
        nodes
            .iter()
            .map(|(name, inst)| async move { inst.view(name, service).await }),
    )
    .await;
    Sample {
        t,
        views: views.into_iter().flatten().collect(),
    }
}

/// Running nodes by name, shared with the sampler.
type Live = Arc<Mutex<BTreeMap<String, Arc<Instance>>>>;

/// A running node: in this process, or a `shoal node` process.
pub(crate) enum Instance {
    Local(Box<Node>),
    Process(Box<NodeProcess>),
}

// === impl Instance ===

impl Instance {
    fn admin_addr(&self) -> SocketAddr {
        match self {
            Instance::Local(n) => n.admin_addr(),
            Instance::Process(p) => p.command.admin,
        }
    }

    fn outbound_addr(&self) -> Option<SocketAddr> {
        match self {
            Instance::Local(n) => n.outbound_addr(),
            Instance::Process(p) => p.command.outbound,
        }
    }

    fn quic_addr(&self) -> SocketAddr {
        match self {
            Instance::Local(n) => n.quic_addr(),
            Instance::Process(p) => p.command.quic,
        }
    }

    async fn view(&self, name: &str, service: Option<&str>) -> Option<View> {
        let node = match self {
            Instance::Process(p) => return p.view(name, service).await,
            Instance::Local(n) => n,
        };
        let mut view = View::empty(name);
        for m in node.members().await {
            if m.serving == ServingState::Draining {
                view.draining.insert(m.name.clone());
            }
            match m.state {
                MemberState::Alive => view.alive.insert(m.name),
                MemberState::Dead => view.dead.insert(m.name),
                MemberState::Left => view.left.insert(m.name),
            };
        }
        for e in node.policies().entries() {
            let v = if e.is_tombstone() {
                format!("{} (deleted)", e.version)
            } else {
                e.version.to_string()
            };
            view.policies.insert(format!("{}/{}", e.kind, e.name), v);
        }
        if node.zones().is_some() {
            for p in node.gossip().scan("xz.").await {
                for (k, v) in p.keys {
                    let Some(zone) = k.strip_prefix("xz.").and_then(|r| r.strip_suffix(".reps"))
                    else {
                        continue;
                    };
                    if view.reps.contains_key(zone) {
                        continue;
                    }
                    if let Ok(list) = serde_json::from_str::<Vec<(String, SocketAddr)>>(&v) {
                        view.reps
                            .insert(zone.to_string(), list.into_iter().map(|(n, _)| n).collect());
                    }
                }
            }
        }
        if let Some(svc) = service
            && node.outbound_addr().is_some()
        {
            for s in node.proxy().services().iter().filter(|s| s.service == svc) {
                for e in &s.endpoints {
                    view.attempts.insert(
                        e.node.clone(),
                        node.proxy().endpoint_view(svc, &e.node).attempts,
                    );
                }
            }
        }
        Some(view)
    }

    /// (name, generation, gossip address) of every member this node lists.
    async fn member_ids(&self) -> Vec<(String, u64, SocketAddr)> {
        match self {
            Instance::Local(n) => n
                .members()
                .await
                .into_iter()
                .map(|m| (m.name, m.generation, m.addr))
                .collect(),
            Instance::Process(p) => {
                let Ok(body) = node::cli::get(&p.command.admin.to_string(), "/v1/members").await
                else {
                    return Vec::new();
                };
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| {
                        Some((
                            m["name"].as_str()?.to_string(),
                            m["generation"].as_u64()?,
                            m["addr"].as_str()?.parse().ok()?,
                        ))
                    })
                    .collect()
            }
        }
    }

    async fn kill(self) {
        match self {
            Instance::Local(n) => (*n).kill().await,
            Instance::Process(p) => (*p).kill().await,
        }
    }

    async fn drain(self, within: Duration) {
        match self {
            Instance::Local(n) => {
                let cut = (*n).drain().await;
                if cut > 0 {
                    tracing::warn!(cut, "drain cut requests off");
                }
            }
            Instance::Process(p) => (*p).drain(within).await,
        }
    }
}

/// How a step went.
#[derive(Default)]
struct Applied {
    /// Worth printing beside the step.
    note: Option<String>,
    /// When the change took effect, if not when the step finished.
    effective: Option<Instant>,
    /// Rolling-restart turns.
    phases: Vec<NodePhase>,
}

/// One node of the simulated cluster.
struct SimNode {
    name: String,
    /// In-process configuration (also the source of the process command).
    config: NodeConfig,
    /// The process command, in `--processes` mode.
    command: Option<NodeCommand>,
    addr: SocketAddr,
    /// Clock offset set by a `skew` step, re-applied on restart.
    skew_ms: i64,
}

/// The cluster: nodes, their certificates, upstreams and the fault network.
struct SimCluster {
    _dir: tempfile::TempDir,
    nodes: Vec<SimNode>,
    live: Live,
    outbounds: Outbounds,
    workload_service: Option<String>,
    _upstreams: Vec<Upstream>,
    net: Arc<FaultNet>,
    /// Desired link rules by node name; re-applied when an address changes.
    links: BTreeMap<(String, String), LinkFaults>,
    paused: BTreeSet<String>,
    drain_within: Duration,
    /// The mesh CA, once the nodes have their certificates (byzantine
    /// rogues get theirs from it).
    ca: Option<Ca>,
    /// Service → the nodes that front it.
    services: BTreeMap<String, Vec<String>>,
    gossip_interval: Duration,
    phi_threshold: f64,
    /// Rogues started by `byzantine` steps.
    rogues: Vec<Rogue>,
    /// Signs pushed policies, as an operator's `shoal policy apply` would.
    operator: Arc<node::policy::OperatorKey>,
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
        if let Some(bin) = &options.processes {
            crate::process::check_binary(bin)?;
        }
        let dir = tempfile::Builder::new()
            .prefix("shoal-sim-")
            .tempdir()
            .context("temporary folder")?;
        let ca = Ca::generate("sim.shoal", 1).context("mesh CA")?;
        let operator_dir = dir.path().join("operator");
        node::certs::write_operator_dir(
            &operator_dir,
            &ca.cert_pem(),
            &ca.issue_operator("sim", Validity::days(1))?,
            false,
        )?;
        let operator =
            Arc::new(node::policy::OperatorKey::load(&operator_dir).map_err(anyhow::Error::msg)?);
        let net = FaultNet::new(options.seed);
        let layer = match &options.extra_layer {
            Some(extra) => Arc::new(Stacked {
                outer: net.layer(),
                inner: extra.clone(),
            }) as Arc<dyn SocketLayer>,
            None => net.layer(),
        };
        let spec = &scenario.cluster;
        let workload = scenario.workload.as_ref();
        let mut upstreams = Vec::new();
        let mut cluster = SimCluster {
            _dir: tempfile::tempdir().context("temporary folder")?,
            nodes: Vec::new(),
            live: Arc::default(),
            outbounds: Arc::default(),
            workload_service: workload.map(|w| w.service.clone()),
            _upstreams: Vec::new(),
            net,
            links: BTreeMap::new(),
            paused: BTreeSet::new(),
            drain_within: scenario.node.drain_timeout + Duration::from_secs(5),
            ca: None,
            services: spec.services.clone(),
            gossip_interval: spec.gossip_interval,
            phi_threshold: spec.phi_threshold,
            rogues: Vec::new(),
            operator,
        };
        // Process mode fixes every port up front so seeds and restarts know them.
        let ports: Vec<(SocketAddr, SocketAddr, SocketAddr)> = if options.processes.is_some() {
            spec.nodes
                .iter()
                .map(|_| {
                    Ok((
                        crate::process::free_udp()?,
                        crate::process::free_tcp()?,
                        crate::process::free_tcp()?,
                    ))
                })
                .collect::<std::io::Result<_>>()
                .context("free ports")?
        } else {
            Vec::new()
        };
        for (i, (name, zone)) in spec.nodes.iter().zip(&spec.zones).enumerate() {
            let fronts = spec.services_of(name);
            let identity = if workload.is_some_and(|w| w.denied.contains(name)) {
                DENIED_IDENTITY
            } else {
                CLIENT_IDENTITY
            };
            let mut cert_services = fronts.clone();
            cert_services.push(identity.to_string());
            let certs: PathBuf = dir.path().join(name);
            let cert = ca
                .issue(name, &cert_services, Validity::days(1))
                .context("node certificate")?;
            write_node_dir(&certs, &ca.cert_pem(), &cert, false).context("writing certs")?;
            let mut config = NodeConfig::local(name, &certs);
            config.zone = zone.clone();
            config.zone_pools = spec.zone_pools;
            config.zone_representatives = spec.representatives;
            config.data_dir = Some(dir.path().join(name).join("data"));
            config.gossip_interval = spec.gossip_interval;
            config.phi_threshold = spec.phi_threshold;
            config.socket_layer = Some(layer.clone());
            config.seeds = cluster
                .nodes
                .iter()
                .take(3)
                .map(|n| n.addr.to_string())
                .collect();
            for svc in &fronts {
                let up = Upstream::start(name, workload.map_or(Duration::ZERO, |w| w.service_time))
                    .await
                    .context("upstream")?;
                let mut s = ServiceSpec::new(svc, up.addr, Protocol::Http1);
                s.health_interval = Duration::from_millis(200);
                config.proxy.services.push(s);
                upstreams.push(up);
            }
            if workload.is_some_and(|w| w.clients.contains(name) || w.denied.contains(name)) {
                config.proxy.outbound = Some("127.0.0.1:0".parse().expect("address"));
            }
            if let Some(n) = scenario.node.retry_max_attempts {
                config.proxy.retry.max_attempts = n;
            }
            if let Some(t) = scenario.node.request_timeout {
                config.proxy.request_timeout = t;
            }
            config.proxy.drain_timeout = scenario.node.drain_timeout;
            config.proxy.rng_seed = Some(node_seed(options.seed, i));
            let (command, instance) = match &options.processes {
                None => {
                    let node = Node::start(config.clone())
                        .await
                        .with_context(|| format!("starting {name}"))?;
                    config.listen = node.quic_addr();
                    (None, Instance::Local(Box::new(node)))
                }
                Some(bin) => {
                    let (quic, admin, outbound) = ports[i];
                    let outbound = config.proxy.outbound.map(|_| outbound);
                    let command = process_command(bin, &config, quic, admin, outbound, &ports, i);
                    let p = NodeProcess::spawn(command.clone())
                        .await
                        .with_context(|| format!("starting {name}"))?;
                    config.listen = quic;
                    (Some(command), Instance::Process(Box::new(p)))
                }
            };
            cluster.nodes.push(SimNode {
                name: name.clone(),
                addr: instance.quic_addr(),
                config,
                command,
                skew_ms: 0,
            });
            cluster.install(name, instance);
        }
        cluster._dir = dir;
        cluster._upstreams = upstreams;
        cluster.ca = Some(ca);
        Ok(cluster)
    }

    /// Makes `instance` the running incarnation of `name`, its outbound
    /// listener open to the workload's clients.
    fn install(&self, name: &str, instance: Instance) {
        let mut outbounds = self.outbounds.lock().unwrap();
        match instance.outbound_addr() {
            Some(a) => outbounds.insert(name.to_string(), a),
            None => outbounds.remove(name),
        };
        drop(outbounds);
        self.set_live(name, instance);
    }

    /// Makes `instance` the running incarnation of `name` without letting
    /// the workload's clients at it yet: [`Self::gate_traffic`] opens it.
    fn install_gated(&self, name: &str, instance: Instance) {
        self.outbounds.lock().unwrap().remove(name);
        self.set_live(name, instance);
    }

    fn set_live(&self, name: &str, instance: Instance) {
        self.live
            .lock()
            .unwrap()
            .insert(name.to_string(), Arc::new(instance));
    }

    /// Takes `name`'s running incarnation out (waits for the sampler to let
    /// go of it).
    async fn take(&self, name: &str) -> Option<Instance> {
        self.outbounds.lock().unwrap().remove(name);
        let mut arc = self.live.lock().unwrap().remove(name)?;
        loop {
            match Arc::try_unwrap(arc) {
                Ok(i) => return Some(i),
                Err(a) => {
                    arc = a;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    fn running(&self, name: &str) -> Option<Arc<Instance>> {
        self.live.lock().unwrap().get(name).cloned()
    }

    /// Waits until every node sees every node alive (with zone pools:
    /// every node of its own zone, and a representative for every other
    /// zone).
    async fn wait_formed(&self, within: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let all: BTreeSet<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        let zone_of: BTreeMap<&str, &str> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.config.zone.as_str()))
            .collect();
        let pools = self.nodes.iter().any(|n| n.config.zone_pools);
        // A `shoal node` process's view comes from its admin API, which
        // does not list relayed representatives: only membership is waited for.
        let reps_known = !self.nodes.iter().any(|n| n.command.is_some());
        let zones: BTreeSet<&str> = zone_of.values().copied().collect();
        let formed = |v: &View| {
            if !pools {
                return v.alive == all;
            }
            let own = zone_of.get(v.observer.as_str()).copied().unwrap_or("");
            let want: BTreeSet<String> = all
                .iter()
                .filter(|n| zone_of.get(n.as_str()).copied() == Some(own))
                .cloned()
                .collect();
            v.alive == want
                && (!reps_known
                    || zones
                        .iter()
                        .all(|z| *z == own || v.reps.get(*z).is_some_and(|r| !r.is_empty())))
        };
        loop {
            let sample = sample(&self.live, None, 0.0).await;
            if sample.views.len() == all.len() && sample.views.iter().all(formed) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                let lagging: Vec<String> = sample
                    .views
                    .iter()
                    .filter(|v| !formed(v))
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

    /// Waits until every workload client routes `service` to every node
    /// that fronts it (health checks passed and gossiped).
    async fn wait_routable(&self, service: &str, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let clients: Vec<String> = self.outbounds.lock().unwrap().keys().cloned().collect();
        loop {
            let mut lagging = Vec::new();
            for c in &clients {
                let Some(inst) = self.running(c) else {
                    continue;
                };
                let routable = match &*inst {
                    Instance::Local(n) => n
                        .proxy()
                        .services()
                        .iter()
                        .filter(|s| s.service == service)
                        .flat_map(|s| s.endpoints.iter())
                        .filter(|e| e.routable)
                        .count(),
                    Instance::Process(p) => routable_via_admin(p.command.admin, service).await,
                };
                let want = self
                    .nodes
                    .iter()
                    .filter(|n| n.config.proxy.services.iter().any(|s| s.name == service))
                    .count();
                if routable < want {
                    lagging.push(format!("{c} routes {service} to {routable} of {want}"));
                }
            }
            if lagging.is_empty() {
                return Ok(());
            }
            if start.elapsed() > within {
                anyhow::bail!(
                    "the services were not routable in time: {}",
                    lagging.join(", ")
                );
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    fn index(&self, name: &str) -> anyhow::Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    /// Applies one step.
    async fn apply(
        &mut self,
        action: &Action,
        start: Instant,
        trace: &mut Trace,
    ) -> anyhow::Result<Applied> {
        let mut applied = Applied::default();
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        match action {
            Action::Crash { node } => {
                if let Some(n) = self.take(node).await {
                    n.kill().await;
                }
                self.unpause(node).await;
            }
            Action::Drain { node } => {
                self.unpause(node).await;
                if let Some(n) = self.take(node).await {
                    n.drain(self.drain_within).await;
                }
                applied.effective = Some(Instant::now());
            }
            Action::Restart { node } => {
                let mut note = self.restart(node).await?;
                if let Some(gate) = self.gate_traffic(node).await {
                    note.push_str(&format!("; {gate}"));
                }
                applied.note = Some(note);
            }
            Action::RollingRestart { nodes } => {
                let mut notes = Vec::new();
                for node in nodes {
                    let drain = (Instant::now() - start).as_secs_f64();
                    if let Some(n) = self.take(node).await {
                        n.drain(self.drain_within).await;
                    }
                    let down = (Instant::now() - start).as_secs_f64();
                    self.restart(node).await?;
                    self.gate_traffic(node).await;
                    let up = (Instant::now() - start).as_secs_f64();
                    let seen = self.wait_alive(node, ALIVE_WITHIN).await;
                    notes.push(match seen {
                        Some(d) => format!("{node} seen alive by all {:.1}s after its restart", d),
                        None => format!("{node} not seen alive by all within {ALIVE_WITHIN:?}"),
                    });
                    applied.phases.push(NodePhase {
                        node: node.clone(),
                        drain,
                        down,
                        up,
                    });
                }
                applied.note = Some(notes.join("; "));
            }
            Action::Pause { node } => {
                let i = self.index(node)?;
                match self.running(node).as_deref() {
                    Some(Instance::Process(p)) => p.pause().await,
                    _ => self.net.isolate(self.nodes[i].addr),
                }
                self.paused.insert(node.clone());
            }
            Action::Resume { node } => self.unpause(node).await,
            Action::Skew { node, offset_ms } => {
                let i = self.index(node)?;
                self.nodes[i].skew_ms = *offset_ms;
                if let Some(Instance::Local(n)) = self.running(node).as_deref() {
                    n.policies().clock().set_skew_ms(*offset_ms);
                }
            }
            Action::PushPolicy { .. } => {
                let step = Step {
                    at: Duration::ZERO,
                    action: action.clone(),
                };
                return Ok(self
                    .push_many(&[&step], start, trace)
                    .await
                    .pop()
                    .unwrap_or_default());
            }
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
            Action::Byzantine(b) => {
                let at = (Instant::now() - start).as_secs_f64();
                applied.note = Some(self.start_rogue(b, at).await?);
            }
            Action::Assert { .. } => {}
        }
        Ok(applied)
    }

    /// Sums every `*refused*` series of the running nodes' `/metrics`.
    async fn refusals(&self) -> BTreeMap<String, f64> {
        let admins: Vec<SocketAddr> = self
            .live
            .lock()
            .unwrap()
            .values()
            .map(|i| i.admin_addr())
            .collect();
        let mut out = BTreeMap::new();
        for a in admins {
            let Ok(body) = node::cli::get(&a.to_string(), "/metrics").await else {
                continue;
            };
            for line in String::from_utf8_lossy(&body).lines() {
                if line.starts_with('#') {
                    continue;
                }
                let Some((series, value)) = line.rsplit_once(' ') else {
                    continue;
                };
                let name = series.split('{').next().unwrap_or(series);
                if let (true, Ok(v)) = (name.contains("refused"), value.parse::<f64>())
                    && v > 0.0
                {
                    *out.entry(series.to_string()).or_insert(0.0) += v;
                }
            }
        }
        out
    }

    /// Issues the rogue's certificate from the mesh CA, aims it at every
    /// running node and the genuine instances of its target, and starts it.
    async fn start_rogue(&mut self, b: &Byzantine, at: f64) -> anyhow::Result<String> {
        let dir = self
            ._dir
            .path()
            .join(format!("rogue-{}-{}", b.identity, self.rogues.len()));
        let ca = self.ca.as_ref().context("the mesh CA")?;
        let cert = ca
            .issue(&b.identity, &b.cert_services, Validity::days(1))
            .context("the rogue's certificate")?;
        write_node_dir(&dir, &ca.cert_pem(), &cert, false).context("writing certs")?;
        let running: Vec<(String, Arc<Instance>)> = self
            .live
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let fronts = self.services.get(&b.target).cloned().unwrap_or_default();
        let mut targets = Vec::new();
        for (_, inst) in running.iter().take(1) {
            for (name, generation, addr) in inst.member_ids().await {
                if fronts.contains(&name) {
                    targets.push(node::gossip::wire::NodeId {
                        name,
                        generation,
                        addr,
                    });
                }
            }
        }
        let aim = Aim {
            nodes: running.iter().map(|(_, i)| i.quic_addr()).collect(),
            targets,
            claim: self
                .nodes
                .first()
                .map(|n| n.name.clone())
                .unwrap_or_default(),
            gossip_interval: self.gossip_interval,
            phi_threshold: self.phi_threshold,
        };
        let rogue = Rogue::start(b, &dir, aim, at).await?;
        let r = rogue.record();
        self.rogues.push(rogue);
        Ok(format!(
            "rogue {} at {}; forging the health of {{{}}}",
            r.identity,
            r.addr,
            r.targets.join(", ")
        ))
    }

    /// PUTs each step's policy to its node's admin API, all at once; records
    /// each acknowledged version.
    async fn push_many(&self, steps: &[&Step], start: Instant, trace: &mut Trace) -> Vec<Applied> {
        let pushes = steps.iter().map(|s| {
            let Action::PushPolicy {
                node,
                kind,
                name,
                document,
                ..
            } = &s.action
            else {
                unreachable!("push_many takes push-policy steps");
            };
            let admin = self.running(node).map(|i| i.admin_addr());
            let signed = kind
                .parse::<node::policy::Kind>()
                .map(|k| self.operator.sign(k, name, Some(document)));
            async move {
                let Some(admin) = admin else {
                    return (
                        node,
                        kind,
                        name,
                        document,
                        Err("the node is not running".into()),
                    );
                };
                let mut headers = vec![("content-type", "application/yaml".to_string())];
                if let Ok(sig) = &signed {
                    headers.extend(node::policy::trust::to_headers(sig));
                }
                let r = node::cli::request(
                    &admin.to_string(),
                    http::Method::PUT,
                    &format!("/v1/policies/{kind}/{name}"),
                    &headers,
                    bytes::Bytes::from(document.clone()),
                )
                .await;
                let r = r.and_then(|(status, body)| {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    match v.get("version").and_then(|v| v.as_str()) {
                        Some(ver) if status.is_success() => Ok(ver.to_string()),
                        _ => Err(format!(
                            "{status}: {}",
                            String::from_utf8_lossy(&body).trim()
                        )),
                    }
                });
                (node, kind, name, document, r)
            }
        });
        let results = futures::future::join_all(pushes).await;
        let t = (Instant::now() - start).as_secs_f64();
        results
            .into_iter()
            .map(|(node, kind, name, document, r)| {
                let policy = format!("{kind}/{name}");
                let note = match r {
                    Ok(version) => {
                        trace.acks.push(Ack {
                            t,
                            node: node.clone(),
                            policy: policy.clone(),
                            version: version.clone(),
                        });
                        trace.policy_docs.insert(
                            version.clone(),
                            PolicyDoc {
                                policy,
                                document: document.clone(),
                            },
                        );
                        format!("acknowledged as version {version}")
                    }
                    Err(e) => format!("refused: {e}"),
                };
                Applied {
                    note: Some(note),
                    ..Applied::default()
                }
            })
            .collect()
    }

    /// Holds a restarted workload client's traffic until it routes the
    /// workload's service, as an orchestrator waits for a sidecar to be
    /// ready: `/readyz` only says the node joined gossip, and until the
    /// services arrive by gossip its outbound answers `unknown-service`.
    ///
    /// A restarted node is installed gated (its clients see no outbound
    /// address until this opens it), so no request reaches it before it
    /// routes the service.
    async fn gate_traffic(&self, name: &str) -> Option<String> {
        let addr = self.running(name)?.outbound_addr()?;
        let Some(service) = self.workload_service.as_deref() else {
            self.outbounds
                .lock()
                .unwrap()
                .insert(name.to_string(), addr);
            return None;
        };
        let start = Instant::now();
        let within = Duration::from_secs(10);
        let mut routed = false;
        while start.elapsed() < within {
            let n = match self.running(name).as_deref() {
                Some(Instance::Local(n)) => n
                    .proxy()
                    .services()
                    .iter()
                    .filter(|s| s.service == service)
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.routable)
                    .count(),
                Some(Instance::Process(p)) => routable_via_admin(p.command.admin, service).await,
                None => 0,
            };
            if n > 0 {
                routed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.outbounds
            .lock()
            .unwrap()
            .insert(name.to_string(), addr);
        Some(if routed {
            format!(
                "its traffic resumed once it routed {service}, {:.1}s after start",
                start.elapsed().as_secs_f64()
            )
        } else {
            format!("it did not route {service} within {within:?}; traffic resumed anyway")
        })
    }

    /// Waits until every other running node sees `name` alive; returns how
    /// long that took.
    async fn wait_alive(&self, name: &str, within: Duration) -> Option<f64> {
        let start = Instant::now();
        while start.elapsed() < within {
            let s = sample(&self.live, None, 0.0).await;
            let healthy: Vec<&View> = s
                .views
                .iter()
                .filter(|v| !self.paused.contains(&v.observer))
                .collect();
            if !healthy.is_empty() && healthy.iter().all(|v| v.alive.contains(name)) {
                return Some(start.elapsed().as_secs_f64());
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        None
    }

    async fn unpause(&mut self, node: &str) {
        if self.paused.remove(node)
            && let Ok(i) = self.index(node)
        {
            match self.running(node).as_deref() {
                Some(Instance::Process(p)) => p.resume().await,
                _ => self.net.restore(self.nodes[i].addr),
            }
        }
    }

    /// Restarts `name`. In process: on its old port when the OS gives it
    /// back within a few seconds, else on a new one (link rules follow the
    /// address). As a process: the same command again.
    async fn restart(&mut self, name: &str) -> anyhow::Result<String> {
        let i = self.index(name)?;
        if let Some(command) = self.nodes[i].command.clone() {
            let p = NodeProcess::spawn(command)
                .await
                .with_context(|| format!("restarting {name}"))?;
            self.install_gated(name, Instance::Process(Box::new(p)));
            return Ok("the same command again".into());
        }
        let running: BTreeSet<String> = self.live.lock().unwrap().keys().cloned().collect();
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.name != name && running.contains(&n.name))
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
        if self.nodes[i].skew_ms != 0 {
            node.policies().clock().set_skew_ms(self.nodes[i].skew_ms);
        }
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
        self.install_gated(name, Instance::Local(Box::new(node)));
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

    async fn stop(mut self) {
        for r in std::mem::take(&mut self.rogues) {
            r.stop().await;
        }
        let names: Vec<String> = self.live.lock().unwrap().keys().cloned().collect();
        for name in names {
            if let Some(i) = self.take(&name).await {
                if let Instance::Process(p) = &i {
                    p.resume().await;
                }
                i.kill().await;
            }
        }
    }
}

/// The seed of node `index`'s request-path randomness, derived from the
/// scenario seed (a splitmix64 step, so neighbouring seeds and indices give
/// unrelated streams).
fn node_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The `shoal node` arguments for one node.
fn process_command(
    bin: &std::path::Path,
    config: &NodeConfig,
    quic: SocketAddr,
    admin: SocketAddr,
    outbound: Option<SocketAddr>,
    ports: &[(SocketAddr, SocketAddr, SocketAddr)],
    index: usize,
) -> NodeCommand {
    let mut args = vec![
        format!("--name={}", config.name),
        format!("--listen={quic}"),
        format!("--admin={admin}"),
        format!("--certs={}", config.certs.display()),
        format!("--zone={}", config.zone),
        format!("--gossip-interval={}ms", config.gossip_interval.as_millis()),
        format!("--phi-threshold={}", config.phi_threshold),
        format!(
            "--request-timeout={}ms",
            config.proxy.request_timeout.as_millis()
        ),
        format!(
            "--drain-timeout={}ms",
            config.proxy.drain_timeout.as_millis()
        ),
        "--log-format=text".into(),
    ];
    if let Some(seed) = config.proxy.rng_seed {
        args.push(format!("--rng-seed={seed}"));
    }
    if config.zone_pools {
        args.push("--zone-pools".into());
        args.push(format!(
            "--zone-representatives={}",
            config.zone_representatives
        ));
    }
    if let Some(d) = &config.data_dir {
        args.push(format!("--data-dir={}", d.display()));
    }
    for (j, (q, _, _)) in ports.iter().enumerate() {
        if j != index && args.iter().filter(|a| a.starts_with("--seed")).count() < 3 {
            args.push(format!("--seed={q}"));
        }
    }
    for s in &config.proxy.services {
        args.push(format!("--service={}=http://{}", s.name, s.addr));
    }
    if let Some(o) = outbound {
        args.push(format!("--outbound={o}"));
    }
    let log = config
        .certs
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(format!("{}.log", config.name));
    NodeCommand {
        binary: bin.to_path_buf(),
        args,
        admin,
        quic,
        outbound,
        log,
    }
}

async fn routable_via_admin(admin: SocketAddr, service: &str) -> usize {
    let Ok(body) = node::cli::get(&admin.to_string(), "/v1/services").await else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["routable"] == true)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_gets_its_own_seed_from_the_scenario_seed_and_passes_it_on() {
        let seeds: BTreeSet<u64> = (0..5).map(|i| node_seed(42, i)).collect();
        assert_eq!(seeds.len(), 5);
        assert_eq!(node_seed(42, 3), node_seed(42, 3));
        assert_ne!(node_seed(42, 0), node_seed(43, 0));
        let mut config = NodeConfig::local("n1", "/nonexistent");
        config.proxy.rng_seed = Some(node_seed(7, 0));
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let c = process_command(
            std::path::Path::new("shoal"),
            &config,
            addr,
            addr,
            None,
            &[],
            0,
        );
        assert!(
            c.args.contains(&format!("--rng-seed={}", node_seed(7, 0))),
            "{:?}",
            c.args
        );
    }
}
