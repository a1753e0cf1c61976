//! Scenarios as data: a TOML file parsed into a [`Scenario`] — the cluster,
//! a timeline of [`Step`]s at time offsets, and the [`InvariantSpec`]s to
//! judge the run by.
//!
//! Parsing is the only validation: a [`Scenario`] always names existing
//! nodes, non-empty groups and sane numbers, and errors name the step or
//! field at fault. This module owns the format and the sentences steps print
//! as; it must not start nodes or touch sockets (see [`crate::runner`]).
//!
//! Extension points, for when the data plane and policy land: a `[workload]`
//! table, steps such as `push-policy`, `skew` and `rolling-restart`, and
//! invariants over requests and policy versions become new variants of
//! [`Action`] and [`InvariantSpec`]. Until then the parser refuses them by name.

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
    /// Announce `draining`, wait `linger`, then leave gracefully.
    Drain { node: String, linger: Duration },
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
/// Membership only for now; request-success, no-traffic-to-dead-nodes,
/// authorization and policy-convergence invariants join this list when the
/// data plane and policy store exist.
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
        Scenario::parse(&text, &stem).map_err(|e| ScenarioError::Read {
            path: path.display().to_string(),
            msg: e.to_string(),
        })
    }

    /// Parses and validates scenario text; `default_name` is used when the
    /// file sets no `name`.
    pub fn parse(text: &str, default_name: &str) -> Result<Self, ScenarioError> {
        let raw: RawScenario =
            toml::from_str(text).map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        raw.validate(default_name)
    }

    /// The time of the last step that changes the nodes or the network
    /// (asserts excluded), or zero.
    pub fn last_change(&self) -> Duration {
        self.steps
            .iter()
            .filter(|s| !matches!(s.action, Action::Assert { .. }))
            .map(|s| s.at)
            .max()
            .unwrap_or(Duration::ZERO)
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
            Action::Drain { node, linger } => write!(
                f,
                "drain {node}: announce draining, wait {}, then leave gracefully",
                ms(*linger)
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
    linger: Option<String>,
    check: Option<String>,
    within: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInvariant {
    kind: String,
    within: Option<String>,
    grace: Option<String>,
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
    fn validate(self, default_name: &str) -> Result<Scenario, ScenarioError> {
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

        let resolver = Resolver {
            nodes: &nodes,
            zones: &zones,
            groups: &self.groups,
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
            let action = raw.action(&resolver).map_err(|m| {
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
                "request-success" | "no-traffic-to-dead" | "policy-converges" | "authz" => {
                    return invalid(field(
                        "traffic and policy invariants need the data plane and policy store, \
                         which this build does not have yet",
                    ));
                }
                other => {
                    return invalid(field(&format!(
                        "unknown kind {other:?} (converges, no-false-dead, dead-detected, \
                         left-detected)"
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
            },
            steps,
            invariants,
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
            Action::Crash { node } | Action::Drain { node, .. } => {
                if !up[node.as_str()] {
                    return bad("the node is already stopped");
                }
                up.insert(node, false);
                paused.remove(node.as_str());
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

struct Resolver<'a> {
    nodes: &'a [String],
    zones: &'a [String],
    groups: &'a BTreeMap<String, Vec<String>>,
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
    fn action(&self, r: &Resolver<'_>) -> Result<Action, String> {
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
            "crash" | "restart" | "pause" | "resume" => {
                allow(&["node"])?;
                let node = r.node(&self.node)?;
                match self.action.as_str() {
                    "crash" => Action::Crash { node },
                    "restart" => Action::Restart { node },
                    "pause" => Action::Pause { node },
                    _ => Action::Resume { node },
                }
            }
            "drain" => {
                allow(&["node", "linger"])?;
                Action::Drain {
                    node: r.node(&self.node)?,
                    linger: opt_dur("linger", &self.linger, Duration::from_millis(500))?,
                }
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
            "push-policy" | "skew" | "rolling-restart" => {
                return Err(format!(
                    "`{}` needs the data plane / policy store, which this build does not have yet",
                    self.action
                ));
            }
            other => {
                return Err(format!(
                    "unknown step {other:?} (crash, restart, pause, resume, drain, partition, \
                     heal, loss, delay, duplicate, reorder, assert)"
                ));
            }
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
        add(self.linger.is_some(), "linger");
        add(self.check.is_some(), "check");
        add(self.within.is_some(), "within");
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
        assert!(e.contains("data plane"), "{e}");

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
}
