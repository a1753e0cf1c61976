//! Scenarios as data: a TOML file parsed into a [`Scenario`] — the cluster,
//! a timeline of [`Step`]s at time offsets, and the [`InvariantSpec`]s to
//! judge the run by.
//!
//! Parsing is the only validation: a [`Scenario`] always names existing
//! nodes, non-empty groups and sane numbers, and errors name the step or
//! field at fault. This module owns the format and the sentences steps print
//! as; it must not start nodes or touch sockets (see [`crate::runner`]).
//!
//! Traffic and policy: a `[workload]` table (open-loop requests through the
//! mesh), services in `[cluster.services]`, the `push-policy`, `skew` and
//! `rolling-restart` steps, and invariants over requests and policy versions.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A parsed, valid scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Short name (defaults to the file stem).
    pub name: String,
    /// One line saying what it shows.
    pub description: String,
    /// How long the timeline runs, from the moment the cluster has formed.
    pub duration: Duration,
    /// The nodes.
    pub cluster: ClusterSpec,
    /// The timeline, sorted by time.
    pub steps: Vec<Step>,
    /// What the run is judged by.
    pub invariants: Vec<InvariantSpec>,
    /// Requests through the mesh, if any.
    pub workload: Option<Workload>,
    /// Settings every node starts with.
    pub node: NodeSettings,
}

/// Settings applied to every node's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSettings {
    /// Tries per request, the first included (`None`: the node's default, 3).
    pub retry_max_attempts: Option<u32>,
    /// Default request timeout (`None`: the node's default).
    pub request_timeout: Option<Duration>,
    /// How long a drain waits for in-flight requests. Default 5 s.
    pub drain_timeout: Duration,
}

/// Open-loop requests through the mesh, seeded.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    /// Requests per second, summed over `clients`.
    pub rps: f64,
    /// Nodes whose outbound listeners send the requests (certificate
    /// identity `client`).
    pub clients: Vec<String>,
    /// Nodes whose certificate identity is `denied`; they send `denied_rps`
    /// requests per second to the same service, counted apart (the `authz`
    /// invariant judges them, `request-success` does not).
    pub denied: Vec<String>,
    /// Requests per second from the denied nodes, summed.
    pub denied_rps: f64,
    /// The service every request addresses.
    pub service: String,
    /// Method mix: (method, share), shares summing to 1.
    pub methods: Vec<(String, f64)>,
    /// When requests start, from the start of the timeline.
    pub start: Duration,
    /// When requests stop (default: the scenario's duration).
    pub stop: Duration,
    /// A request with no answer within this is a failure. Default 5 s.
    pub timeout: Duration,
    /// How long each upstream takes to answer. Default 0.
    pub service_time: Duration,
}

/// The cluster a scenario runs on.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Node names, n1..nN.
    pub nodes: Vec<String>,
    /// Zone of each node (same order as `nodes`).
    pub zones: Vec<String>,
    /// Gossip interval.
    pub gossip_interval: Duration,
    /// Failure-detector phi threshold.
    pub phi_threshold: f64,
    /// How long the cluster may take to form before the run is abandoned.
    pub form_within: Duration,
    /// Service → the nodes that front an instance of it.
    pub services: BTreeMap<String, Vec<String>>,
    /// Zone pools: each zone gossips in its own pool, representatives
    /// carry summaries over a backbone (`--zone-pools`).
    pub zone_pools: bool,
    /// Representatives per zone (`--zone-representatives`).
    pub representatives: usize,
}

/// Certificate identity of a workload client.
pub const CLIENT_IDENTITY: &str = "client";
/// Certificate identity of a denied workload client.
pub const DENIED_IDENTITY: &str = "denied";

// === impl ClusterSpec ===

impl ClusterSpec {
    /// Services `node` fronts, sorted.
    pub fn services_of(&self, node: &str) -> Vec<String> {
        self.services
            .iter()
            .filter(|(_, nodes)| nodes.iter().any(|n| n == node))
            .map(|(s, _)| s.clone())
            .collect()
    }
}

/// One timeline step.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Offset from the start of the timeline.
    pub at: Duration,
    /// What happens.
    pub action: Action,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Stop a node abruptly: no goodbye to its peers.
    Crash { node: String },
    /// Start a stopped node again with the same name, certificate, data
    /// folder and (when the OS lets it) the same port.
    Restart { node: String },
    /// Stop a node's socket passing packets either way (in-process stand-in
    /// for SIGSTOP: the node keeps running but hears and says nothing).
    Pause { node: String },
    /// Let a paused node's socket pass packets again.
    Resume { node: String },
    /// Graceful drain with `Node::drain()`: announce `draining`, keep
    /// serving while peers learn it, finish in-flight requests, leave.
    Drain { node: String },
    /// Drop every packet from `from` to `to` (and back, unless one-way).
    Partition { links: Links },
    /// Remove every network fault (partitions, loss, delay, duplication,
    /// reordering). Paused nodes stay paused.
    Heal,
    /// Drop a fraction of packets on the links.
    Loss { links: Links, percent: f64 },
    /// Delay packets on the links.
    Delay {
        links: Links,
        delay: Duration,
        jitter: Duration,
    },
    /// Send a fraction of packets twice.
    Duplicate { links: Links, percent: f64 },
    /// Hold a fraction of packets back so later ones overtake them.
    Reorder {
        links: Links,
        percent: f64,
        hold: Duration,
    },
    /// Require `check` to hold at some moment within `within` of this step.
    Assert { check: Check, within: Duration },
    /// PUT a policy document to `node`'s admin API; the version it answers
    /// with is recorded as acknowledged.
    PushPolicy {
        node: String,
        /// Policy kind, from the document.
        kind: String,
        /// Policy name, from the document.
        name: String,
        /// The document (YAML or JSON).
        document: String,
        /// Where it came from: a file name, or `inline`.
        source: String,
        /// What the scenario's author says this document allows: the
        /// `authz` invariant's oracle, judged on every node that runs the
        /// version this step pushed (never by asking the mesh's code).
        expect_authz: Vec<AuthzExpectation>,
    },
    /// Offset `node`'s hybrid-logical-clock wall time by `offset_ms`.
    Skew { node: String, offset_ms: i64 },
    /// Each node in turn: drain, restart with the same name and data
    /// folder, wait until every running node sees it alive.
    RollingRestart { nodes: Vec<String> },
    /// Start a rogue peer holding a valid certificate from the scenario's CA
    /// that, for a window, forges gossip and policy (see
    /// [`crate::byzantine`]).
    Byzantine(Box<Byzantine>),
}

/// One declared authorization outcome: whether a caller may reach a path of
/// a service while the document of its push step is in force.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthzExpectation {
    /// The caller: a node name (`n3`) or the service identity its
    /// certificate names (`client`, `denied`, or a service it fronts).
    pub from: String,
    /// The target service.
    pub service: String,
    /// Path prefix the expectation covers (`/` for every path).
    #[serde(default = "root_path")]
    pub path: String,
    /// Method the expectation covers (every method when absent).
    #[serde(default)]
    pub method: Option<String>,
    /// Whether the request should be answered (true) or refused 403 (false).
    pub allowed: bool,
}

fn root_path() -> String {
    "/".into()
}

impl AuthzExpectation {
    /// Whether this expectation speaks about a request from `node` (whose
    /// certificate names `identity`) to `service` with `method` and `path`.
    pub fn covers(
        &self,
        node: &str,
        identity: &str,
        service: &str,
        method: &str,
        path: &str,
    ) -> bool {
        (self.from == node || self.from == identity)
            && self.service == service
            && path.starts_with(&self.path)
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }
}

/// What a `byzantine` rogue forges each round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forgery {
    /// Deltas saying the genuine instances of the target are unhealthy,
    /// signed with the rogue's own key and unsigned.
    Health,
    /// A ghost member serving the target at the rogue's own QUIC address.
    Ghost,
    /// Unsolicited policy records on the policy response channel, one with a
    /// wrapped-looking version (`u64::MAX.u32::MAX@n1`), one stamped now.
    Policy,
    /// A digest full of ghost members (`flood` entries, once a second).
    Flood,
}

impl Forgery {
    /// Every forgery, in order.
    pub const ALL: [Forgery; 4] = [
        Forgery::Health,
        Forgery::Ghost,
        Forgery::Policy,
        Forgery::Flood,
    ];

    /// Lower-case name, as written in scenario files.
    pub fn as_str(self) -> &'static str {
        match self {
            Forgery::Health => "health",
            Forgery::Ghost => "ghost",
            Forgery::Policy => "policy",
            Forgery::Flood => "flood",
        }
    }
}

/// A `byzantine` step: who the rogue is and what it forges.
#[derive(Debug, Clone, PartialEq)]
pub struct Byzantine {
    /// The node name its certificate carries (not a cluster node).
    pub identity: String,
    /// The services its certificate names.
    pub cert_services: Vec<String>,
    /// The service it attacks.
    pub target: String,
    /// What it forges.
    pub forge: BTreeSet<Forgery>,
    /// How long it keeps forging.
    pub window: Duration,
    /// Time between rounds.
    pub every: Duration,
    /// Digest entries per ghost-flood message.
    pub flood: usize,
    /// The forged policy document (valid, so only its signature and
    /// provenance can keep it out).
    pub policy: String,
    /// Kind of the forged policy.
    pub policy_kind: String,
    /// Name of the forged policy.
    pub policy_name: String,
    /// Also join gossip honestly as itself, publishing its certificate's
    /// services as healthy (a weakened setup: with a certificate naming the
    /// target, the rogue is then a genuine instance as far as the mesh can
    /// tell, and traffic reaches it).
    pub join: bool,
}

/// A set of directed links between two groups of nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct Links {
    /// Sending side (`None`: every node).
    pub from: Option<BTreeSet<String>>,
    /// Receiving side (`None`: every node).
    pub to: Option<BTreeSet<String>>,
    /// Only `from` → `to`, not back.
    pub one_way: bool,
}

impl Links {
    /// The directed (source, destination) pairs these links cover, given all
    /// node names.
    pub fn pairs(&self, all: &[String]) -> Vec<(String, String)> {
        let everyone: BTreeSet<String> = all.iter().cloned().collect();
        let from = self.from.clone().unwrap_or_else(|| everyone.clone());
        let to = self.to.clone().unwrap_or(everyone);
        let mut out = BTreeSet::new();
        for a in &from {
            for b in &to {
                if a != b {
                    out.insert((a.clone(), b.clone()));
                    if !self.one_way {
                        out.insert((b.clone(), a.clone()));
                    }
                }
            }
        }
        out.into_iter().collect()
    }
}

/// A condition on what the nodes see, checked by `assert` steps.
#[derive(Debug, Clone, PartialEq)]
pub enum Check {
    /// Every healthy node sees exactly the healthy nodes alive.
    Converged,
    /// Every other healthy node sees `node` as not alive.
    Dead { node: String },
    /// Every healthy node sees `node` alive.
    Alive { node: String },
    /// Every other healthy node sees `node` as left.
    Left { node: String },
}

/// A property the whole run is judged by.
///
/// Over membership, requests, policy versions and (with a `byzantine`
/// step) what a rogue certificate holder got through.
#[derive(Debug, Clone, PartialEq)]
pub enum InvariantSpec {
    /// Every healthy node sees exactly the healthy set alive within `within`
    /// of the last fault or repair step.
    Converges { within: Duration },
    /// No healthy node ever sees another healthy node dead, except around a
    /// crash, pause, restart, drain or partition that touches either of them
    /// (and `grace` after it ends).
    NoFalseDead { grace: Duration },
    /// After each crash or pause, every healthy node sees the victim not
    /// alive within `within`.
    DeadDetected { within: Duration },
    /// After each drain, every healthy node sees the node as left within
    /// `within`.
    LeftDetected { within: Duration },
    /// The workload's success ratio, in fault windows (`during`) and outside
    /// them (`after`), is at least the floor (percent).
    RequestSuccess {
        /// Only idempotent requests (GET, PUT) count.
        idempotent_only: bool,
        /// Floor for requests scheduled inside a fault window.
        during: Option<f64>,
        /// Floor for requests scheduled outside every fault window.
        after: Option<f64>,
        /// How long a fault window lasts after its repair.
        settle: Duration,
    },
    /// No request is sent to a node more than `within` after its client saw
    /// it dead, left or draining.
    NoTrafficToDead { within: Duration },
    /// Every healthy node runs the same, highest acknowledged version of
    /// every policy within `within` of the last change.
    PolicyConverges { within: Duration },
    /// No acknowledged policy write is lost: at the end every healthy node
    /// runs, per policy, a version at least as high as every acknowledged one.
    NoAckLost,
    /// No caller gets a 2xx where the scenario's `expect_authz` says it is
    /// refused, and no caller is refused 403 where it says it is allowed
    /// (judged on the serving node's policy versions before and after).
    Authz,
    /// No data-plane stream reaches a byzantine rogue, every 2xx comes from
    /// a node the scenario says serves the service, and no node lists a
    /// member outside the cluster.
    NoRogueTraffic,
    /// No node ever runs a policy version the scenario did not push and
    /// have acknowledged (a rogue's forged records included).
    NoForgedPolicy,
    /// Zone pools: every healthy node sees exactly the healthy nodes of its
    /// own zone alive within `within` of the last fault or repair.
    ZoneConverges {
        /// The bound.
        within: Duration,
        /// Each node's zone, as the scenario declares it.
        zones: BTreeMap<String, String>,
    },
    /// Zone pools: within `within` of each crash and of the last fault or
    /// repair, every healthy node knows, for every other zone, the
    /// representatives the rule gives over that zone's healthy nodes (the
    /// `representatives` lowest FNV-1a hashes of their names), computed
    /// from the scenario.
    ZoneRepresentatives {
        /// The bound.
        within: Duration,
        /// Each node's zone, as the scenario declares it.
        zones: BTreeMap<String, String>,
        /// Representatives per zone.
        representatives: usize,
    },
}

/// Why a scenario file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{path}: {msg}")]
    Read { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

// === impl Scenario ===

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into());
        let base = path.parent().unwrap_or(Path::new("."));
        Scenario::parse_in(&text, &stem, base).map_err(|e| ScenarioError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Parses and validates scenario text; `default_name` is used when the
    /// file sets no `name`.
    pub fn parse(text: &str, default_name: &str) -> Result<Self, ScenarioError> {
        Scenario::parse_in(text, default_name, Path::new("."))
    }

    /// Like [`Scenario::parse`], reading `push-policy` files relative to `base`.
    pub fn parse_in(text: &str, default_name: &str, base: &Path) -> Result<Self, ScenarioError> {
        let raw: RawScenario =
            toml::from_str(text).map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        raw.validate(default_name, base)
    }

    /// Why this scenario cannot run with `--processes` (empty: it can).
    pub fn process_mode_problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.steps {
            let why = match &s.action {
                Action::Partition { .. }
                | Action::Heal
                | Action::Loss { .. }
                | Action::Delay { .. }
                | Action::Duplicate { .. }
                | Action::Reorder { .. } => {
                    "network faults are injected under each node's QUIC socket, which only \
                     the in-process mode can wrap"
                }
                Action::Skew { .. } => {
                    "a node process has no way to be told a clock offset; skew needs the \
                     in-process mode"
                }
                _ => continue,
            };
            out.push(format!("{s}: {why}"));
        }
        if self.node.retry_max_attempts.is_some() {
            out.push(
                "[node] retry_max_attempts: `shoal node` has no flag for it; it needs the \
                 in-process mode"
                    .into(),
            );
        }
        out
    }

    /// The time of the last step that changes the nodes or the network
    /// (asserts excluded), or zero.
    pub fn last_change(&self) -> Duration {
        self.steps
            .iter()
            .filter(|s| s.action.changes_membership())
            .map(|s| s.at)
            .max()
            .unwrap_or(Duration::ZERO)
    }
}

impl Action {
    /// Whether the step changes nodes or the network (not an assert, a
    /// policy push, a clock skew or a byzantine rogue, which must change
    /// nothing).
    pub fn changes_membership(&self) -> bool {
        !matches!(
            self,
            Action::Assert { .. }
                | Action::PushPolicy { .. }
                | Action::Skew { .. }
                | Action::Byzantine(_)
        )
    }
}

// === impl Display ===

fn fmt_set(f: &mut fmt::Formatter<'_>, set: &Option<BTreeSet<String>>) -> fmt::Result {
    match set {
        None => f.write_str("every node"),
        Some(s) => {
            let names: Vec<&str> = s.iter().map(String::as_str).collect();
            write!(f, "{{{}}}", names.join(", "))
        }
    }
}

impl fmt::Display for Links {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.from.is_none() && self.to.is_none() {
            return f.write_str("every link");
        }
        f.write_str("links from ")?;
        fmt_set(f, &self.from)?;
        f.write_str(" to ")?;
        fmt_set(f, &self.to)?;
        if !self.one_way {
            f.write_str(" and back")?;
        }
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Crash { node } => write!(f, "crash {node} without a goodbye"),
            Action::Restart { node } => {
                write!(f, "restart {node} with the same name and data folder")
            }
            Action::Pause { node } => write!(
                f,
                "pause {node}: its socket stops passing packets either way"
            ),
            Action::Resume { node } => write!(f, "resume {node}: its socket passes packets again"),
            Action::Drain { node } => write!(
                f,
                "drain {node}: announce draining, keep serving while peers learn it, \
                 finish in-flight requests, then leave"
            ),
            Action::Partition { links } => {
                let mut l = links.clone();
                write!(f, "partition: cut ")?;
                if links.one_way {
                    write!(f, "{l} (one way)")
                } else {
                    l.one_way = true;
                    write!(f, "{l}, both ways")
                }
            }
            Action::Heal => {
                f.write_str("heal the network: every link passes every packet again, on time, once")
            }
            Action::Loss { links, percent } => write!(f, "lose {percent}% of packets on {links}"),
            Action::Delay {
                links,
                delay,
                jitter,
            } => write!(
                f,
                "delay packets on {links} by {} ± {}",
                ms(*delay),
                ms(*jitter)
            ),
            Action::Duplicate { links, percent } => {
                write!(f, "send {percent}% of packets twice on {links}")
            }
            Action::Reorder {
                links,
                percent,
                hold,
            } => write!(
                f,
                "reorder {links}: hold {percent}% of packets back by {} so later ones overtake them",
                ms(*hold)
            ),
            Action::Assert { check, within } => {
                write!(f, "assert that {check} within {}", ms(*within))
            }
            Action::PushPolicy {
                node,
                kind,
                name,
                source,
                ..
            } => write!(
                f,
                "push {kind} {name} ({source}) to {node} through its admin API"
            ),
            Action::Skew { node, offset_ms } => {
                let dir = if *offset_ms < 0 { "behind" } else { "ahead" };
                write!(
                    f,
                    "skew {node}'s clock {} {dir}: its hybrid logical clock stamps from that wall time",
                    ms(Duration::from_millis(offset_ms.unsigned_abs()))
                )
            }
            Action::RollingRestart { nodes } => write!(
                f,
                "rolling restart of {{{}}}: each in turn drains, restarts with the same name and \
                 data folder, and is seen alive by all before the next",
                nodes.join(", ")
            ),
            Action::Byzantine(b) => {
                let forge: Vec<&str> = b.forge.iter().map(|f| f.as_str()).collect();
                write!(
                    f,
                    "byzantine: a rogue with a valid certificate ({} serving {{{}}}) forges {} \
                     against {} every {} for {}",
                    b.identity,
                    b.cert_services.join(", "),
                    forge.join(", "),
                    b.target,
                    ms(b.every),
                    ms(b.window)
                )?;
                if b.join {
                    f.write_str(", and joins gossip as itself")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Check::Converged => {
                f.write_str("every healthy node sees exactly the healthy nodes alive")
            }
            Check::Dead { node } => write!(f, "every other healthy node sees {node} not alive"),
            Check::Alive { node } => write!(f, "every healthy node sees {node} alive"),
            Check::Left { node } => write!(f, "every other healthy node sees {node} as left"),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {:>6.1}s: {}", self.at.as_secs_f64(), self.action)
    }
}

impl InvariantSpec {
    /// Short name, as written in scenario files.
    pub fn kind(&self) -> &'static str {
        match self {
            InvariantSpec::Converges { .. } => "converges",
            InvariantSpec::NoFalseDead { .. } => "no-false-dead",
            InvariantSpec::DeadDetected { .. } => "dead-detected",
            InvariantSpec::LeftDetected { .. } => "left-detected",
            InvariantSpec::RequestSuccess { .. } => "request-success",
            InvariantSpec::NoTrafficToDead { .. } => "no-traffic-to-dead",
            InvariantSpec::PolicyConverges { .. } => "policy-converges",
            InvariantSpec::NoAckLost => "no-ack-lost",
            InvariantSpec::Authz => "authz",
            InvariantSpec::NoRogueTraffic => "no-rogue-traffic",
            InvariantSpec::NoForgedPolicy => "no-forged-policy",
            InvariantSpec::ZoneConverges { .. } => "zone-converges",
            InvariantSpec::ZoneRepresentatives { .. } => "zone-representatives",
        }
    }
}

impl fmt::Display for InvariantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvariantSpec::Converges { within } => write!(
                f,
                "membership converges within {} of the last fault or repair",
                ms(*within)
            ),
            InvariantSpec::NoFalseDead { grace } => write!(
                f,
                "no healthy node is ever seen dead (grace {} around disturbances)",
                ms(*grace)
            ),
            InvariantSpec::DeadDetected { within } => write!(
                f,
                "every crash or pause is seen by every healthy node within {}",
                ms(*within)
            ),
            InvariantSpec::LeftDetected { within } => {
                write!(f, "every drain is seen as left within {}", ms(*within))
            }
            InvariantSpec::RequestSuccess {
                idempotent_only,
                during,
                after,
                ..
            } => {
                let which = if *idempotent_only {
                    "idempotent requests"
                } else {
                    "requests"
                };
                let floors: Vec<String> = [("during faults", during), ("outside faults", after)]
                    .iter()
                    .filter_map(|(w, f)| f.map(|f| format!("≥ {f}% {w}")))
                    .collect();
                write!(f, "{which} succeed {}", floors.join(", "))
            }
            InvariantSpec::NoTrafficToDead { within } => write!(
                f,
                "no request reaches a node more than {} after it is seen dead or draining",
                ms(*within)
            ),
            InvariantSpec::PolicyConverges { within } => write!(
                f,
                "every healthy node runs the highest acknowledged version of every policy within {}",
                ms(*within)
            ),
            InvariantSpec::NoAckLost => f.write_str("no acknowledged policy write is lost"),
            InvariantSpec::Authz => f.write_str(
                "every answer matches the outcomes the scenario declares (expect_authz)",
            ),
            InvariantSpec::NoRogueTraffic => f.write_str(
                "no request reaches a rogue or is answered by a node not serving the service",
            ),
            InvariantSpec::NoForgedPolicy => {
                f.write_str("no node runs a policy version the scenario did not push")
            }
            InvariantSpec::ZoneConverges { within, .. } => write!(
                f,
                "every zone's membership converges within {} of the last fault or repair",
                ms(*within)
            ),
            InvariantSpec::ZoneRepresentatives {
                within,
                representatives,
                ..
            } => write!(
                f,
                "every node knows every other zone's {representatives} representative(s) by the rule within {} of each crash and of the last change",
                ms(*within)
            ),
        }
    }
}

// === parsing ===

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    #[serde(default)]
    description: String,
    duration: String,
    cluster: RawCluster,
    #[serde(default)]
    groups: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    step: Vec<RawStep>,
    #[serde(default)]
    invariant: Vec<RawInvariant>,
    workload: Option<RawWorkload>,
    node: Option<RawNodeSettings>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    rps: f64,
    clients: Vec<String>,
    #[serde(default)]
    denied: Vec<String>,
    denied_rps: Option<f64>,
    service: String,
    #[serde(default)]
    methods: BTreeMap<String, f64>,
    start: Option<String>,
    stop: Option<String>,
    timeout: Option<String>,
    service_time: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawNodeSettings {
    retry_max_attempts: Option<u32>,
    request_timeout: Option<String>,
    drain_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    nodes: usize,
    #[serde(default)]
    zones: Vec<String>,
    gossip_interval: Option<String>,
    phi_threshold: Option<f64>,
    form_within: Option<String>,
    #[serde(default)]
    services: BTreeMap<String, Vec<String>>,
    zone_pools: Option<bool>,
    representatives: Option<usize>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    at: String,
    #[serde(rename = "do")]
    action: String,
    node: Option<String>,
    from: Option<Vec<String>>,
    to: Option<Vec<String>>,
    one_way: Option<bool>,
    percent: Option<f64>,
    delay: Option<String>,
    jitter: Option<String>,
    hold: Option<String>,
    check: Option<String>,
    within: Option<String>,
    file: Option<String>,
    policy: Option<String>,
    offset: Option<String>,
    nodes: Option<Vec<String>>,
    identity: Option<String>,
    cert_services: Option<Vec<String>>,
    target: Option<String>,
    forge: Option<Vec<String>>,
    window: Option<String>,
    every: Option<String>,
    flood: Option<usize>,
    join: Option<bool>,
    expect_authz: Option<Vec<AuthzExpectation>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInvariant {
    kind: String,
    within: Option<String>,
    grace: Option<String>,
    requests: Option<String>,
    during: Option<f64>,
    after: Option<f64>,
    settle: Option<String>,
}

/// Largest in-process cluster: each node is a real QUIC endpoint and
/// gossip participant sharing two cores.
pub const MAX_NODES: usize = 32;

fn dur(field: &str, s: &str) -> Result<Duration, ScenarioError> {
    node::config::parse_duration(s).map_err(|m| ScenarioError::Invalid(format!("{field}: {m}")))
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ScenarioError> {
    Err(ScenarioError::Invalid(msg.into()))
}

impl RawScenario {
    fn validate(self, default_name: &str, base: &Path) -> Result<Scenario, ScenarioError> {
        let c = &self.cluster;
        if c.nodes == 0 || c.nodes > MAX_NODES {
            return invalid(format!("cluster.nodes: must be 1 to {MAX_NODES}"));
        }
        let nodes: Vec<String> = (1..=c.nodes).map(|i| format!("n{i}")).collect();
        let zone_names = if c.zones.is_empty() {
            vec!["default".to_string()]
        } else {
            c.zones.clone()
        };
        let zones: Vec<String> = (0..c.nodes)
            .map(|i| zone_names[i % zone_names.len()].clone())
            .collect();
        let zone_pools = c.zone_pools.unwrap_or(false);
        if zone_pools
            && let Some(z) = zone_names
                .iter()
                .find(|z| !node::gossip::zone::valid_zone(z))
        {
            return invalid(format!(
                "cluster.zones: {z:?} cannot name a zone pool (1-64 characters of A-Z a-z 0-9 _ -)"
            ));
        }
        let representatives = c.representatives.unwrap_or(3);
        if !(1..=node::gossip::zone::MAX_REPRESENTATIVES).contains(&representatives) {
            return invalid(format!(
                "cluster.representatives: must be 1 to {}",
                node::gossip::zone::MAX_REPRESENTATIVES
            ));
        }
        let zone_map: BTreeMap<String, String> =
            nodes.iter().cloned().zip(zones.iter().cloned()).collect();
        let gossip_interval = match &c.gossip_interval {
            Some(s) => dur("cluster.gossip_interval", s)?,
            None => Duration::from_millis(100),
        };
        if gossip_interval < Duration::from_millis(10) {
            return invalid("cluster.gossip_interval: must be at least 10ms");
        }
        let phi_threshold = c.phi_threshold.unwrap_or(8.0);
        if !(1.0..=100.0).contains(&phi_threshold) {
            return invalid("cluster.phi_threshold: must be between 1 and 100");
        }
        let form_within = match &c.form_within {
            Some(s) => dur("cluster.form_within", s)?,
            None => Duration::from_secs(30),
        };
        let duration = dur("duration", &self.duration)?;
        let mut services = BTreeMap::new();
        for (svc, on) in &c.services {
            if node::proxy::ServiceSpec::parse_flag(&format!("{svc}=127.0.0.1:1")).is_err() {
                return invalid(format!(
                    "cluster.services.{svc}: use lower-case letters, digits and '-'"
                ));
            }
            if on.is_empty() {
                return invalid(format!("cluster.services.{svc}: names no node"));
            }
            for n in on {
                if !nodes.contains(n) {
                    return invalid(format!(
                        "cluster.services.{svc}: no node {n:?} (nodes are n1..n{})",
                        nodes.len()
                    ));
                }
            }
            services.insert(svc.clone(), on.clone());
        }
        let node_settings = {
            let raw = self.node.unwrap_or_default();
            if raw.retry_max_attempts == Some(0) {
                return invalid("node.retry_max_attempts: must be at least 1");
            }
            NodeSettings {
                retry_max_attempts: raw.retry_max_attempts,
                request_timeout: raw
                    .request_timeout
                    .as_deref()
                    .map(|s| dur("node.request_timeout", s))
                    .transpose()?,
                drain_timeout: match &raw.drain_timeout {
                    Some(s) => dur("node.drain_timeout", s)?,
                    None => Duration::from_secs(5),
                },
            }
        };
        let workload = match self.workload {
            None => None,
            Some(w) => Some(w.validate(&nodes, &services, duration)?),
        };

        let resolver = Resolver {
            nodes: &nodes,
            zones: &zones,
            groups: &self.groups,
            services: &services,
        };
        for (g, members) in &self.groups {
            if nodes.contains(g) || g == "all" || g.starts_with("zone:") {
                return invalid(format!("groups.{g}: name clashes with a node or a keyword"));
            }
            for m in members {
                if !nodes.contains(m) {
                    return invalid(format!(
                        "groups.{g}: no node {m:?} (nodes are n1..n{})",
                        nodes.len()
                    ));
                }
            }
        }

        let mut steps = Vec::new();
        for (i, raw) in self.step.iter().enumerate() {
            let at = dur(&format!("step {} (at {}): at", i + 1, raw.at), &raw.at)?;
            let action = raw.action(&resolver, base).map_err(|m| {
                ScenarioError::Invalid(format!(
                    "step {} ({} at {}): {m}",
                    i + 1,
                    raw.action,
                    raw.at
                ))
            })?;
            steps.push(Step { at, action });
        }
        steps.sort_by_key(|s| s.at);
        if let Some(last) = steps.last()
            && last.at > duration
        {
            return invalid(format!(
                "duration {} ends before the last step at {}",
                self.duration,
                ms(last.at)
            ));
        }

        let mut invariants = Vec::new();
        for (i, raw) in self.invariant.iter().enumerate() {
            let field = |f: &str| format!("invariant {} ({}): {f}", i + 1, raw.kind);
            let need = |v: &Option<String>, f: &str| -> Result<Duration, ScenarioError> {
                match v {
                    Some(s) => dur(&field(f), s),
                    None => invalid(field(&format!("{f} is required"))),
                }
            };
            let spec = match raw.kind.as_str() {
                "converges" => InvariantSpec::Converges {
                    within: need(&raw.within, "within")?,
                },
                "no-false-dead" => InvariantSpec::NoFalseDead {
                    grace: match &raw.grace {
                        Some(s) => dur(&field("grace"), s)?,
                        None => Duration::from_secs(5),
                    },
                },
                "dead-detected" => {
                    if !steps
                        .iter()
                        .any(|s| matches!(s.action, Action::Crash { .. } | Action::Pause { .. }))
                    {
                        return invalid(field("needs a crash or pause step to measure"));
                    }
                    InvariantSpec::DeadDetected {
                        within: need(&raw.within, "within")?,
                    }
                }
                "left-detected" => {
                    if !steps
                        .iter()
                        .any(|s| matches!(s.action, Action::Drain { .. }))
                    {
                        return invalid(field("needs a drain step to measure"));
                    }
                    InvariantSpec::LeftDetected {
                        within: need(&raw.within, "within")?,
                    }
                }
                "request-success" | "no-traffic-to-dead" | "authz" if workload.is_none() => {
                    return invalid(field("needs a [workload] to measure"));
                }
                "request-success" => {
                    let pct = |f: &str, v: Option<f64>| -> Result<Option<f64>, ScenarioError> {
                        match v {
                            Some(p) if !(0.0..=100.0).contains(&p) => {
                                invalid(field(&format!("{f}: a percentage, 0 to 100")))
                            }
                            v => Ok(v),
                        }
                    };
                    let during = pct("during", raw.during)?;
                    let after = pct("after", raw.after)?;
                    if during.is_none() && after.is_none() {
                        return invalid(field("give `during`, `after` or both (percent)"));
                    }
                    InvariantSpec::RequestSuccess {
                        idempotent_only: match raw.requests.as_deref() {
                            None | Some("all") => false,
                            Some("idempotent") => true,
                            Some(o) => {
                                return invalid(field(&format!(
                                    "requests: {o:?} (all or idempotent)"
                                )));
                            }
                        },
                        during,
                        after,
                        settle: match &raw.settle {
                            Some(s) => dur(&field("settle"), s)?,
                            None => Duration::from_secs(2),
                        },
                    }
                }
                "no-traffic-to-dead" => InvariantSpec::NoTrafficToDead {
                    within: need(&raw.within, "within")?,
                },
                "policy-converges" | "no-ack-lost"
                    if !steps
                        .iter()
                        .any(|s| matches!(s.action, Action::PushPolicy { .. })) =>
                {
                    return invalid(field("needs a push-policy step to measure"));
                }
                "policy-converges" => InvariantSpec::PolicyConverges {
                    within: need(&raw.within, "within")?,
                },
                "no-ack-lost" => InvariantSpec::NoAckLost,
                "authz"
                    if !steps.iter().any(|s| {
                        matches!(&s.action, Action::PushPolicy { expect_authz, .. } if !expect_authz.is_empty())
                    }) =>
                {
                    return invalid(field(
                        "needs a push-policy step with `expect_authz` (the declared outcomes it judges by)",
                    ));
                }
                "authz" => InvariantSpec::Authz,
                "no-rogue-traffic" | "no-forged-policy"
                    if !steps
                        .iter()
                        .any(|s| matches!(s.action, Action::Byzantine(_))) =>
                {
                    return invalid(field("needs a byzantine step to measure"));
                }
                "zone-converges" | "zone-representatives" if !zone_pools => {
                    return invalid(field("needs cluster.zone_pools = true"));
                }
                "zone-converges" => InvariantSpec::ZoneConverges {
                    within: need(&raw.within, "within")?,
                    zones: zone_map.clone(),
                },
                "zone-representatives" => InvariantSpec::ZoneRepresentatives {
                    within: need(&raw.within, "within")?,
                    zones: zone_map.clone(),
                    representatives,
                },
                "no-rogue-traffic" => InvariantSpec::NoRogueTraffic,
                "no-forged-policy" => InvariantSpec::NoForgedPolicy,
                other => {
                    return invalid(field(&format!(
                        "unknown kind {other:?} (converges, no-false-dead, dead-detected, \
                         left-detected, request-success, no-traffic-to-dead, policy-converges, \
                         no-ack-lost, authz, no-rogue-traffic, no-forged-policy, zone-converges, \
                         zone-representatives)"
                    )));
                }
            };
            invariants.push(spec);
        }
        if invariants.is_empty()
            && !steps
                .iter()
                .any(|s| matches!(s.action, Action::Assert { .. }))
        {
            return invalid("judges nothing: add an [[invariant]] or an assert step");
        }
        check_lifecycle(&nodes, &steps)?;

        Ok(Scenario {
            name: self.name.unwrap_or_else(|| default_name.to_string()),
            description: self.description,
            duration,
            cluster: ClusterSpec {
                nodes,
                zones,
                gossip_interval,
                phi_threshold,
                form_within,
                services,
                zone_pools,
                representatives,
            },
            steps,
            invariants,
            workload,
            node: node_settings,
        })
    }
}

/// Rejects timelines that crash a stopped node, resume a running one, etc.
fn check_lifecycle(nodes: &[String], steps: &[Step]) -> Result<(), ScenarioError> {
    let mut up: BTreeMap<&str, bool> = nodes.iter().map(|n| (n.as_str(), true)).collect();
    let mut paused: BTreeSet<&str> = BTreeSet::new();
    for s in steps {
        let bad = |why: &str| invalid(format!("{s}: {why}"));
        match &s.action {
            Action::Crash { node } | Action::Drain { node } => {
                if !up[node.as_str()] {
                    return bad("the node is already stopped");
                }
                up.insert(node, false);
                paused.remove(node.as_str());
            }
            Action::RollingRestart { nodes } => {
                if let Some(n) = nodes
                    .iter()
                    .find(|n| !up[n.as_str()] || paused.contains(n.as_str()))
                {
                    return bad(&format!("{n} is stopped or paused"));
                }
            }
            Action::PushPolicy { node, .. } | Action::Skew { node, .. } if !up[node.as_str()] => {
                return bad("the node is stopped");
            }
            Action::Restart { node } => {
                if up[node.as_str()] {
                    return bad("the node is running; crash or drain it first");
                }
                up.insert(node, true);
            }
            Action::Pause { node } if !up[node.as_str()] || !paused.insert(node) => {
                return bad("the node is stopped or already paused");
            }
            Action::Resume { node } if !paused.remove(node.as_str()) => {
                return bad("the node is not paused");
            }
            _ => {}
        }
    }
    Ok(())
}

impl RawWorkload {
    fn validate(
        self,
        nodes: &[String],
        services: &BTreeMap<String, Vec<String>>,
        duration: Duration,
    ) -> Result<Workload, ScenarioError> {
        if !(self.rps > 0.0 && self.rps <= 2000.0) {
            return invalid("workload.rps: must be above 0 and at most 2000");
        }
        if !services.contains_key(&self.service) {
            return invalid(format!(
                "workload.service: {:?} is not in [cluster.services]",
                self.service
            ));
        }
        let check = |field: &str, list: &[String]| -> Result<(), ScenarioError> {
            for n in list {
                if !nodes.contains(n) {
                    return invalid(format!(
                        "workload.{field}: no node {n:?} (nodes are n1..n{})",
                        nodes.len()
                    ));
                }
            }
            Ok(())
        };
        if self.clients.is_empty() {
            return invalid("workload.clients: name at least one node");
        }
        check("clients", &self.clients)?;
        check("denied", &self.denied)?;
        if let Some(n) = self.denied.iter().find(|n| self.clients.contains(n)) {
            return invalid(format!("workload.denied: {n} is also a client"));
        }
        let mut methods = Vec::new();
        let raw = if self.methods.is_empty() {
            BTreeMap::from([("GET".to_string(), 1.0)])
        } else {
            self.methods
        };
        let total: f64 = raw.values().sum();
        for (m, share) in &raw {
            if !["GET", "PUT", "POST"].contains(&m.as_str()) {
                return invalid(format!("workload.methods: {m:?} (GET, PUT, POST)"));
            }
            if *share < 0.0 {
                return invalid(format!("workload.methods.{m}: must not be negative"));
            }
            methods.push((m.clone(), share / total));
        }
        if total <= 0.0 || total.is_nan() {
            return invalid("workload.methods: shares sum to zero");
        }
        let opt = |f: &str, v: &Option<String>, d: Duration| match v {
            Some(s) => dur(&format!("workload.{f}"), s),
            None => Ok(d),
        };
        let start = opt("start", &self.start, Duration::ZERO)?;
        let stop = opt("stop", &self.stop, duration)?;
        if stop <= start || stop > duration {
            return invalid("workload.stop: must be after start and within duration");
        }
        let denied_rps = self.denied_rps.unwrap_or(if self.denied.is_empty() {
            0.0
        } else {
            (self.rps / 5.0).max(1.0)
        });
        Ok(Workload {
            rps: self.rps,
            clients: self.clients,
            denied: self.denied,
            denied_rps,
            service: self.service,
            methods,
            start,
            stop,
            timeout: opt("timeout", &self.timeout, Duration::from_secs(5))?,
            service_time: opt("service_time", &self.service_time, Duration::ZERO)?,
        })
    }
}

/// The methods the proxy treats as idempotent (retried after a reset).
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
}

/// Parses a signed duration such as `-30s` or `250ms` into milliseconds.
fn signed_ms(s: &str) -> Result<i64, String> {
    let (neg, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = node::config::parse_duration(rest)?;
    let ms = d.as_millis() as i64;
    Ok(if neg { -ms } else { ms })
}

struct Resolver<'a> {
    nodes: &'a [String],
    zones: &'a [String],
    groups: &'a BTreeMap<String, Vec<String>>,
    services: &'a BTreeMap<String, Vec<String>>,
}

impl Resolver<'_> {
    fn node(&self, name: &Option<String>) -> Result<String, String> {
        let name = name.as_ref().ok_or("`node` is required")?;
        if self.nodes.contains(name) {
            Ok(name.clone())
        } else {
            Err(format!(
                "no node {name:?} (nodes are n1..n{})",
                self.nodes.len()
            ))
        }
    }

    fn set(
        &self,
        field: &str,
        sels: &Option<Vec<String>>,
    ) -> Result<Option<BTreeSet<String>>, String> {
        let Some(sels) = sels else { return Ok(None) };
        let mut out = BTreeSet::new();
        for sel in sels {
            if sel == "all" {
                out.extend(self.nodes.iter().cloned());
            } else if let Some(zone) = sel.strip_prefix("zone:") {
                let before = out.len();
                for (n, z) in self.nodes.iter().zip(self.zones) {
                    if z == zone {
                        out.insert(n.clone());
                    }
                }
                if out.len() == before {
                    return Err(format!("{field}: no node in zone {zone:?}"));
                }
            } else if let Some(g) = self.groups.get(sel) {
                out.extend(g.iter().cloned());
            } else if self.nodes.contains(sel) {
                out.insert(sel.clone());
            } else {
                return Err(format!(
                    "{field}: {sel:?} is not a node, a group, zone:<name> or all"
                ));
            }
        }
        if out.is_empty() {
            return Err(format!("{field}: selects no node"));
        }
        Ok(Some(out))
    }

    fn links(&self, raw: &RawStep, required: bool) -> Result<Links, String> {
        let from = self.set("from", &raw.from)?;
        let to = self.set("to", &raw.to)?;
        if required && (from.is_none() || to.is_none()) {
            return Err("`from` and `to` are required".into());
        }
        if let (Some(f), Some(t)) = (&from, &to)
            && !f.is_disjoint(t)
            && required
        {
            return Err("`from` and `to` overlap".into());
        }
        Ok(Links {
            from,
            to,
            one_way: raw.one_way.unwrap_or(false),
        })
    }
}

fn percent(p: Option<f64>) -> Result<f64, String> {
    let p = p.ok_or("`percent` is required")?;
    if (0.0..=100.0).contains(&p) {
        Ok(p)
    } else {
        Err("`percent` must be between 0 and 100".into())
    }
}

fn opt_dur(field: &str, s: &Option<String>, default: Duration) -> Result<Duration, String> {
    match s {
        Some(s) => node::config::parse_duration(s).map_err(|m| format!("{field}: {m}")),
        None => Ok(default),
    }
}

impl RawStep {
    fn action(&self, r: &Resolver<'_>, base: &Path) -> Result<Action, String> {
        let used = self.used_fields();
        let allow = |ok: &[&str]| -> Result<(), String> {
            for f in &used {
                if !ok.contains(f) {
                    return Err(format!("`{f}` does not apply to {}", self.action));
                }
            }
            Ok(())
        };
        Ok(match self.action.as_str() {
            "crash" | "restart" | "pause" | "resume" | "drain" => {
                allow(&["node"])?;
                let node = r.node(&self.node)?;
                match self.action.as_str() {
                    "crash" => Action::Crash { node },
                    "restart" => Action::Restart { node },
                    "pause" => Action::Pause { node },
                    "drain" => Action::Drain { node },
                    _ => Action::Resume { node },
                }
            }
            "push-policy" => {
                allow(&["node", "file", "policy", "expect_authz"])?;
                let node = r.node(&self.node)?;
                let (document, source) = match (&self.file, &self.policy) {
                    (Some(f), None) => {
                        let path = base.join(f);
                        let text = std::fs::read_to_string(&path)
                            .map_err(|e| format!("file: {}: {e}", path.display()))?;
                        (text, f.clone())
                    }
                    (None, Some(p)) => (p.clone(), "inline".to_string()),
                    _ => return Err("give exactly one of `file` and `policy`".into()),
                };
                let doc = node::policy::Document::parse(&document)
                    .map_err(|p| format!("the policy is invalid: {p}"))?;
                let expect_authz = self.expect_authz.clone().unwrap_or_default();
                for (i, e) in expect_authz.iter().enumerate() {
                    let bad = |m: &str| Err(format!("expect_authz[{i}]: {m}"));
                    if e.from.trim().is_empty() || e.service.trim().is_empty() {
                        return bad("`from` and `service` must not be empty");
                    }
                    if !e.path.starts_with('/') {
                        return bad("`path` must start with /");
                    }
                    if e.method.as_deref().is_some_and(|m| {
                        m.is_empty() || !m.chars().all(|c| c.is_ascii_alphabetic())
                    }) {
                        return bad("`method` must be an HTTP method such as GET");
                    }
                }
                Action::PushPolicy {
                    node,
                    kind: doc.kind.to_string(),
                    name: doc.name.clone(),
                    document,
                    source,
                    expect_authz,
                }
            }
            "skew" => {
                allow(&["node", "offset"])?;
                let offset = self.offset.as_deref().ok_or("`offset` is required")?;
                Action::Skew {
                    node: r.node(&self.node)?,
                    offset_ms: signed_ms(offset).map_err(|m| format!("offset: {m}"))?,
                }
            }
            "rolling-restart" => {
                allow(&["nodes"])?;
                let nodes = match &self.nodes {
                    None => r.nodes.to_vec(),
                    Some(list) => {
                        let mut out = Vec::new();
                        for n in list {
                            let n = r.node(&Some(n.clone()))?;
                            if out.contains(&n) {
                                return Err(format!("nodes: {n} is listed twice"));
                            }
                            out.push(n);
                        }
                        out
                    }
                };
                Action::RollingRestart { nodes }
            }
            "partition" => {
                allow(&["from", "to", "one_way"])?;
                Action::Partition {
                    links: r.links(self, true)?,
                }
            }
            "heal" => {
                allow(&[])?;
                Action::Heal
            }
            "loss" => {
                allow(&["from", "to", "one_way", "percent"])?;
                Action::Loss {
                    links: r.links(self, false)?,
                    percent: percent(self.percent)?,
                }
            }
            "duplicate" => {
                allow(&["from", "to", "one_way", "percent"])?;
                Action::Duplicate {
                    links: r.links(self, false)?,
                    percent: percent(self.percent)?,
                }
            }
            "delay" => {
                allow(&["from", "to", "one_way", "delay", "jitter"])?;
                let delay = opt_dur("delay", &self.delay, Duration::ZERO)?;
                if self.delay.is_none() {
                    return Err("`delay` is required".into());
                }
                Action::Delay {
                    links: r.links(self, false)?,
                    delay,
                    jitter: opt_dur("jitter", &self.jitter, Duration::ZERO)?,
                }
            }
            "reorder" => {
                allow(&["from", "to", "one_way", "percent", "hold"])?;
                Action::Reorder {
                    links: r.links(self, false)?,
                    percent: percent(self.percent)?,
                    hold: opt_dur("hold", &self.hold, Duration::from_millis(20))?,
                }
            }
            "assert" => {
                allow(&["check", "node", "within"])?;
                let within = match &self.within {
                    Some(s) => opt_dur("within", &Some(s.clone()), Duration::ZERO)?,
                    None => return Err("`within` is required".into()),
                };
                let check = match self.check.as_deref() {
                    Some("converged") => Check::Converged,
                    Some("dead") => Check::Dead {
                        node: r.node(&self.node)?,
                    },
                    Some("alive") => Check::Alive {
                        node: r.node(&self.node)?,
                    },
                    Some("left") => Check::Left {
                        node: r.node(&self.node)?,
                    },
                    Some(other) => {
                        return Err(format!(
                            "unknown check {other:?} (converged, dead, alive, left)"
                        ));
                    }
                    None => return Err("`check` is required".into()),
                };
                Action::Assert { check, within }
            }
            "byzantine" => {
                allow(&[
                    "identity",
                    "cert_services",
                    "target",
                    "forge",
                    "window",
                    "every",
                    "flood",
                    "join",
                    "file",
                    "policy",
                ])?;
                Action::Byzantine(Box::new(self.byzantine(r, base)?))
            }
            other => {
                return Err(format!(
                    "unknown step {other:?} (crash, restart, pause, resume, drain, \
                     rolling-restart, partition, heal, loss, delay, duplicate, reorder, skew, \
                     push-policy, byzantine, assert)"
                ));
            }
        })
    }

    fn byzantine(&self, r: &Resolver<'_>, base: &Path) -> Result<Byzantine, String> {
        let identity = self.identity.clone().unwrap_or_else(|| "evil".into());
        if !node::gossip::guard::valid_name(&identity) {
            return Err(format!(
                "identity: {identity:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
            ));
        }
        if r.nodes.contains(&identity) {
            return Err(format!(
                "identity: {identity} is a cluster node; the rogue is an outsider"
            ));
        }
        let cert_services = self
            .cert_services
            .clone()
            .unwrap_or_else(|| vec!["other".into()]);
        for svc in &cert_services {
            if node::proxy::ServiceSpec::parse_flag(&format!("{svc}=127.0.0.1:1")).is_err() {
                return Err(format!(
                    "cert_services: {svc:?}: use lower-case letters, digits and '-'"
                ));
            }
        }
        let target = match &self.target {
            Some(t) => t.clone(),
            None => r
                .services
                .keys()
                .next()
                .cloned()
                .ok_or("`target` is required when [cluster.services] is empty")?,
        };
        if !r.services.contains_key(&target) {
            return Err(format!("target: {target:?} is not in [cluster.services]"));
        }
        let forge = match &self.forge {
            None => Forgery::ALL.into_iter().collect(),
            Some(list) => {
                let mut out = BTreeSet::new();
                for f in list {
                    let Some(x) = Forgery::ALL.into_iter().find(|x| x.as_str() == f) else {
                        return Err(format!(
                            "forge: unknown forgery {f:?} (health, ghost, policy, flood)"
                        ));
                    };
                    out.insert(x);
                }
                if out.is_empty() && !self.join.unwrap_or(false) {
                    return Err("forge: the rogue forges nothing and does not join".into());
                }
                out
            }
        };
        let window = opt_dur("window", &self.window, Duration::from_secs(5))?;
        if window.is_zero() {
            return Err("window: must be above 0".into());
        }
        let every = opt_dur("every", &self.every, Duration::from_millis(100))?;
        if every < Duration::from_millis(10) || every > window {
            return Err("every: must be at least 10ms and at most the window".into());
        }
        let flood = self.flood.unwrap_or(500);
        if !(1..=600).contains(&flood) {
            return Err("flood: 1 to 600 digest entries (one message must fit)".into());
        }
        let policy = match (&self.file, &self.policy) {
            (Some(f), None) => {
                let path = base.join(f);
                std::fs::read_to_string(&path)
                    .map_err(|e| format!("file: {}: {e}", path.display()))?
            }
            (None, Some(p)) => p.clone(),
            (None, None) => format!(
                "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: forged-deny-{target}}}\n\
                 spec:\n  target: {target}\n  rules:\n  - from: [{identity}]\n"
            ),
            _ => return Err("give at most one of `file` and `policy`".into()),
        };
        let doc = node::policy::Document::parse(&policy)
            .map_err(|p| format!("the forged policy is invalid: {p}"))?;
        Ok(Byzantine {
            identity,
            cert_services,
            target,
            forge,
            window,
            every,
            flood,
            policy_kind: doc.kind.to_string(),
            policy_name: doc.name.clone(),
            policy,
            join: self.join.unwrap_or(false),
        })
    }

    fn used_fields(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, name: &'static str| {
            if set {
                v.push(name);
            }
        };
        add(self.node.is_some(), "node");
        add(self.from.is_some(), "from");
        add(self.to.is_some(), "to");
        add(self.one_way.is_some(), "one_way");
        add(self.percent.is_some(), "percent");
        add(self.delay.is_some(), "delay");
        add(self.jitter.is_some(), "jitter");
        add(self.hold.is_some(), "hold");
        add(self.check.is_some(), "check");
        add(self.within.is_some(), "within");
        add(self.file.is_some(), "file");
        add(self.policy.is_some(), "policy");
        add(self.offset.is_some(), "offset");
        add(self.nodes.is_some(), "nodes");
        add(self.identity.is_some(), "identity");
        add(self.cert_services.is_some(), "cert_services");
        add(self.target.is_some(), "target");
        add(self.forge.is_some(), "forge");
        add(self.window.is_some(), "window");
        add(self.every.is_some(), "every");
        add(self.flood.is_some(), "flood");
        add(self.join.is_some(), "join");
        add(self.expect_authz.is_some(), "expect_authz");
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        name = "t"
        description = "a test"
        duration = "20s"
        [cluster]
        nodes = 5
        zones = ["a", "b"]
        [groups]
        left = ["n1", "n3"]
        [[step]]
        at = "2s"
        do = "partition"
        from = ["left"]
        to = ["zone:b", "n5"]
        [[step]]
        at = "1s"
        do = "loss"
        percent = 20
        [[step]]
        at = "8s"
        do = "heal"
        [[step]]
        at = "9s"
        do = "assert"
        check = "converged"
        within = "5s"
        [[invariant]]
        kind = "converges"
        within = "10s"
    "#;

    #[test]
    fn parses_sorts_and_resolves_selectors() {
        let s = Scenario::parse(GOOD, "x").unwrap();
        assert_eq!(s.name, "t");
        assert_eq!(s.cluster.zones, ["a", "b", "a", "b", "a"]);
        assert_eq!(s.steps[0].at, Duration::from_secs(1));
        let Action::Partition { links } = &s.steps[1].action else {
            panic!("{:?}", s.steps[1])
        };
        let to: Vec<&str> = links
            .to
            .as_ref()
            .unwrap()
            .iter()
            .map(|s| s.as_str())
            .collect();
        assert_eq!(to, ["n2", "n4", "n5"]);
        assert_eq!(s.last_change(), Duration::from_secs(8));
    }

    #[test]
    fn steps_read_like_sentences() {
        let s = Scenario::parse(GOOD, "x").unwrap();
        let lines: Vec<String> = s.steps.iter().map(|s| s.action.to_string()).collect();
        assert_eq!(lines[0], "lose 20% of packets on every link");
        assert_eq!(
            lines[1],
            "partition: cut links from {n1, n3} to {n2, n4, n5}, both ways"
        );
        assert!(lines[2].starts_with("heal the network"));
        assert_eq!(
            lines[3],
            "assert that every healthy node sees exactly the healthy nodes alive within 5s"
        );
    }

    #[test]
    fn errors_name_the_step_and_field() {
        let bad = GOOD.replace("to = [\"zone:b\", \"n5\"]", "to = [\"zone:c\"]");
        let e = Scenario::parse(&bad, "x").unwrap_err().to_string();
        assert!(
            e.contains("step 1 (partition at 2s)") && e.contains("zone \"c\""),
            "{e}"
        );

        let bad = GOOD.replace("percent = 20", "percent = 20\nnode = \"n1\"");
        let e = Scenario::parse(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("`node` does not apply to loss"), "{e}");

        let bad = GOOD.replace("kind = \"converges\"", "kind = \"request-success\"");
        let e = Scenario::parse(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("needs a [workload]"), "{e}");

        let bad = GOOD.replace("[cluster]", "[workload]\nrps = 5\n[cluster]");
        assert!(Scenario::parse(&bad, "x").is_err());

        let bad = GOOD.replace("do = \"heal\"", "do = \"resume\"\nnode = \"n1\"");
        let e = Scenario::parse(&bad, "x").unwrap_err().to_string();
        assert!(e.contains("not paused"), "{e}");
    }

    #[test]
    fn link_pairs_cover_directions() {
        let all: Vec<String> = ["n1", "n2", "n3"].map(String::from).to_vec();
        let one = |s: &str| Some(BTreeSet::from([s.to_string()]));
        let both = Links {
            from: one("n1"),
            to: one("n2"),
            one_way: false,
        };
        assert_eq!(both.pairs(&all).len(), 2);
        let oneway = Links {
            one_way: true,
            ..both
        };
        assert_eq!(
            oneway.pairs(&all),
            vec![("n1".to_string(), "n2".to_string())]
        );
        let every = Links {
            from: None,
            to: None,
            one_way: false,
        };
        assert_eq!(every.pairs(&all).len(), 6);
    }

    const BYZ: &str = r#"
        duration = "10s"
        [cluster]
        nodes = 4
        [cluster.services]
        web = ["n2", "n3"]
        [workload]
        rps = 10
        clients = ["n1"]
        service = "web"
        [[step]]
        at = "1s"
        do = "byzantine"
        [[invariant]]
        kind = "no-rogue-traffic"
        [[invariant]]
        kind = "no-forged-policy"
    "#;

    #[test]
    fn byzantine_steps_default_to_an_outsider_forging_everything() {
        let s = Scenario::parse(BYZ, "b").unwrap();
        let Action::Byzantine(b) = &s.steps[0].action else {
            panic!("{:?}", s.steps[0])
        };
        assert_eq!(b.identity, "evil");
        assert_eq!(b.cert_services, ["other"]);
        assert_eq!(b.target, "web");
        assert_eq!(b.forge.len(), 4);
        assert_eq!(b.policy_kind, "AuthorizationPolicy");
        assert_eq!(b.policy_name, "forged-deny-web");
        assert!(!b.join);
        assert!(!s.steps[0].action.changes_membership());
        assert!(s.steps[0].action.to_string().starts_with(
            "byzantine: a rogue with a valid certificate (evil serving {other}) forges health, \
             ghost, policy, flood against web"
        ));
    }

    #[test]
    fn byzantine_steps_refuse_bad_options() {
        let with = |extra: &str| {
            Scenario::parse(
                &BYZ.replace(
                    "do = \"byzantine\"",
                    &format!("do = \"byzantine\"\n{extra}"),
                ),
                "b",
            )
            .unwrap_err()
            .to_string()
        };
        assert!(with("identity = \"n2\"").contains("is a cluster node"));
        assert!(with("forge = [\"lies\"]").contains("unknown forgery \"lies\""));
        assert!(with("target = \"db\"").contains("not in [cluster.services]"));
        assert!(with("flood = 5000").contains("flood: 1 to 600"));
        assert!(with("node = \"n1\"").contains("`node` does not apply to byzantine"));
        assert!(with("policy = \"kind: Nope\"").contains("the forged policy is invalid"));
        let e = Scenario::parse(&BYZ.replace("do = \"byzantine\"", "do = \"heal\""), "b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a byzantine step"), "{e}");
    }
}
