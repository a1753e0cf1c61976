//! Judging a run: each [`InvariantSpec`] and each `assert` step becomes a
//! [`Verdict`] with the figure measured and the bound it was held to.
//!
//! Judging is a pure function of the scenario and the recorded [`Trace`], so
//! it can be tested without nodes and re-run on a saved trace. "Healthy" at
//! time t means running (not crashed, drained or not yet restarted) and not
//! paused, according to the steps as they were applied.
//!
//! To add an invariant: add a variant to [`InvariantSpec`], record what it
//! needs in the trace, and add its arm to [`judge_one`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::runner::{Sample, Trace, View};
use crate::scenario::{
    Action, AuthzExpectation, CLIENT_IDENTITY, Check, DENIED_IDENTITY, InvariantSpec, Scenario,
};
use crate::workload::RequestRecord;

/// The outcome of one invariant or assert.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// What was judged.
    pub name: String,
    /// Whether it held.
    pub passed: bool,
    /// The measured figure, in words.
    pub figure: String,
    /// The bound it was held to.
    pub bound: String,
    /// The measured figure in seconds, where it is a time.
    pub seconds: Option<f64>,
    /// More detail (per event, or the first violation).
    pub detail: String,
}

/// How long after the timeline's start a run must keep sampling so every
/// bound can be judged.
pub fn horizon(scenario: &Scenario) -> Duration {
    let mut end = scenario.duration;
    let last = scenario.last_change();
    for inv in &scenario.invariants {
        match inv {
            InvariantSpec::Converges { within }
            | InvariantSpec::ZoneConverges { within, .. }
            | InvariantSpec::ZoneRepresentatives { within, .. } => end = end.max(last + *within),
            InvariantSpec::DeadDetected { within } | InvariantSpec::LeftDetected { within } => {
                for s in &scenario.steps {
                    if matches!(
                        s.action,
                        Action::Crash { .. } | Action::Pause { .. } | Action::Drain { .. }
                    ) {
                        end = end.max(s.at + *within);
                    }
                }
            }
            InvariantSpec::PolicyConverges { within } => {
                for s in &scenario.steps {
                    if matches!(s.action, Action::PushPolicy { .. }) {
                        end = end.max(s.at + *within);
                    }
                }
                end = end.max(last + *within);
            }
            InvariantSpec::NoFalseDead { .. }
            | InvariantSpec::RequestSuccess { .. }
            | InvariantSpec::NoTrafficToDead { .. }
            | InvariantSpec::NoAckLost
            | InvariantSpec::Authz
            | InvariantSpec::NoRogueTraffic
            | InvariantSpec::NoForgedPolicy => {}
        }
    }
    for s in &scenario.steps {
        match &s.action {
            Action::Assert { within, .. } => end = end.max(s.at + *within),
            Action::Byzantine(b) => end = end.max(s.at + b.window),
            _ => {}
        }
    }
    end + Duration::from_secs(1)
}

/// Judges every invariant and assert of `scenario` on `trace`.
pub fn judge(scenario: &Scenario, trace: &Trace) -> Vec<Verdict> {
    let mut truth = Truth::new(trace);
    truth.callers = callers(scenario);
    truth.servers = scenario
        .workload
        .as_ref()
        .and_then(|w| scenario.cluster.services.get(&w.service))
        .map(|n| n.iter().cloned().collect())
        .unwrap_or_default();
    let mut out: Vec<Verdict> = scenario
        .invariants
        .iter()
        .map(|inv| judge_one(inv, &truth, trace))
        .collect();
    for rec in &trace.steps {
        if let Action::Assert { check, within } = &rec.step.action {
            out.push(judge_assert(check, *within, rec.at, &truth, trace));
        }
    }
    out
}

/// Judges one invariant.
pub fn judge_one(inv: &InvariantSpec, truth: &Truth, trace: &Trace) -> Verdict {
    match inv {
        InvariantSpec::Converges { within } => converges(*within, truth, trace),
        InvariantSpec::NoFalseDead { grace } => no_false_dead(*grace, truth, trace),
        InvariantSpec::DeadDetected { within } => detected(*within, truth, trace, false),
        InvariantSpec::LeftDetected { within } => detected(*within, truth, trace, true),
        InvariantSpec::RequestSuccess {
            idempotent_only,
            during,
            after,
            settle,
        } => request_success(*idempotent_only, *during, *after, *settle, truth, trace),
        InvariantSpec::NoTrafficToDead { within } => no_traffic_to_dead(*within, truth, trace),
        InvariantSpec::PolicyConverges { within } => policy_converges(*within, truth, trace),
        InvariantSpec::NoAckLost => no_ack_lost(truth, trace),
        InvariantSpec::Authz => authz(truth, trace),
        InvariantSpec::NoRogueTraffic => no_rogue_traffic(truth, trace),
        InvariantSpec::NoForgedPolicy => no_forged_policy(trace),
        InvariantSpec::ZoneConverges { within, zones } => {
            crate::zones::zone_converges(*within, zones, truth, trace)
        }
        InvariantSpec::ZoneRepresentatives {
            within,
            zones,
            representatives,
        } => crate::zones::zone_representatives(*within, zones, *representatives, truth, trace),
    }
    .named(inv.to_string())
}

impl Verdict {
    fn named(mut self, name: String) -> Self {
        self.name = name;
        self
    }
}

/// What was true of each node over time, from the applied steps.
pub struct Truth {
    nodes: Vec<String>,
    /// Per node: intervals [start, end) when it was stopped.
    down: BTreeMap<String, Vec<(f64, f64)>>,
    /// Per node: intervals when it was paused.
    paused: BTreeMap<String, Vec<(f64, f64)>>,
    /// Per node: intervals when a crash, pause, drain or partition touched it.
    disturbed: BTreeMap<String, Vec<(f64, f64)>>,
    /// Time of the last step that changed nodes or network.
    last_change: f64,
    /// Crash, pause and drain events: (time, node, is_drain, end of the event).
    departures: Vec<(f64, String, bool, f64)>,
    /// Moments a node began to go away (crash, pause, draining announced)
    /// until it was back: (node, start, end).
    pub leaving: Vec<(String, f64, f64)>,
    /// Fault windows: (start, repair or end, what).
    pub faults: Vec<(f64, f64, String)>,
    /// Per node, the certificate identity its requests are judged as (the
    /// source service the proxy sends).
    pub callers: BTreeMap<String, String>,
    /// The nodes the scenario puts the workload's service on.
    pub servers: BTreeSet<String>,
}

/// The source service each node's requests carry: the first service it
/// fronts, else its client identity.
fn callers(scenario: &Scenario) -> BTreeMap<String, String> {
    scenario
        .cluster
        .nodes
        .iter()
        .map(|n| {
            let denied = scenario
                .workload
                .as_ref()
                .is_some_and(|w| w.denied.contains(n));
            let id = scenario
                .cluster
                .services_of(n)
                .into_iter()
                .next()
                .unwrap_or_else(|| {
                    if denied {
                        DENIED_IDENTITY
                    } else {
                        CLIENT_IDENTITY
                    }
                    .to_string()
                });
            (n.clone(), id)
        })
        .collect()
}

// === impl Truth ===

impl Truth {
    /// Derives node states from the trace's steps.
    pub fn new(trace: &Trace) -> Self {
        let inf = f64::INFINITY;
        let mut t = Truth {
            nodes: trace.nodes.clone(),
            down: BTreeMap::new(),
            paused: BTreeMap::new(),
            disturbed: BTreeMap::new(),
            last_change: 0.0,
            departures: Vec::new(),
            leaving: Vec::new(),
            faults: Vec::new(),
            callers: BTreeMap::new(),
            servers: BTreeSet::new(),
        };
        let mut open_fault: Vec<(f64, String)> = Vec::new();
        let mut open_node_fault: BTreeMap<String, (f64, String)> = BTreeMap::new();
        let mut open_leave: BTreeMap<String, f64> = BTreeMap::new();
        let mut open_down: BTreeMap<String, f64> = BTreeMap::new();
        let mut open_pause: BTreeMap<String, f64> = BTreeMap::new();
        let mut open_cut: BTreeMap<String, f64> = BTreeMap::new();
        for rec in &trace.steps {
            let at = rec.effective;
            if rec.step.action.changes_membership() {
                t.last_change = at;
            }
            match &rec.step.action {
                // A fault window opens when the step begins (a crash
                // takes a moment; requests sent meanwhile are in it).
                Action::Crash { node } | Action::Pause { node } => {
                    open_leave.insert(node.clone(), rec.at);
                    open_node_fault.insert(node.clone(), (rec.at, rec.text.clone()));
                }
                Action::Drain { node } => {
                    open_leave.insert(node.clone(), rec.at);
                    open_node_fault.insert(node.clone(), (rec.at, rec.text.clone()));
                }
                Action::Restart { node } | Action::Resume { node } => {
                    if let Some(s) = open_leave.remove(node) {
                        t.leaving.push((node.clone(), s, at));
                    }
                    if let Some((s, what)) = open_node_fault.remove(node) {
                        t.faults.push((s, at, what));
                    }
                }
                Action::Partition { .. }
                | Action::Loss { .. }
                | Action::Delay { .. }
                | Action::Duplicate { .. }
                | Action::Reorder { .. } => open_fault.push((rec.at, rec.text.clone())),
                Action::Heal => {
                    for (s, what) in open_fault.drain(..) {
                        t.faults.push((s, at, what));
                    }
                }
                // A rogue's window is a fault window: requests sent while it
                // forges are judged by the `during` floor.
                Action::Byzantine(b) => {
                    t.faults
                        .push((rec.at, at + b.window.as_secs_f64(), rec.text.clone()));
                }
                Action::RollingRestart { .. } => {
                    t.faults.push((rec.at, at, rec.text.clone()));
                    for p in &rec.phases {
                        t.leaving.push((p.node.clone(), p.drain, p.up));
                    }
                }
                _ => {}
            }
            match &rec.step.action {
                Action::RollingRestart { .. } => {
                    for p in &rec.phases {
                        push(&mut t.down, &p.node, p.down, p.up);
                        push(&mut t.disturbed, &p.node, p.drain, p.up);
                        t.departures.push((p.down, p.node.clone(), true, p.up));
                    }
                }
                Action::Crash { node } | Action::Drain { node, .. } => {
                    open_down.insert(node.clone(), at);
                    if let Some(s) = open_pause.remove(node) {
                        push(&mut t.paused, node, s, at);
                        push(&mut t.disturbed, node, s, at);
                    }
                    let drain = matches!(rec.step.action, Action::Drain { .. });
                    t.departures.push((at, node.clone(), drain, inf));
                }
                Action::Restart { node } => {
                    if let Some(s) = open_down.remove(node) {
                        push(&mut t.down, node, s, at);
                        push(&mut t.disturbed, node, s, at);
                        for d in t.departures.iter_mut() {
                            if d.1 == *node && d.3 == inf {
                                d.3 = at;
                            }
                        }
                    }
                }
                Action::Pause { node } => {
                    open_pause.insert(node.clone(), at);
                    t.departures.push((at, node.clone(), false, inf));
                }
                Action::Resume { node } => {
                    if let Some(s) = open_pause.remove(node) {
                        push(&mut t.paused, node, s, at);
                        push(&mut t.disturbed, node, s, at);
                        for d in t.departures.iter_mut() {
                            if d.1 == *node && d.3 == inf {
                                d.3 = at;
                            }
                        }
                    }
                }
                Action::Partition { links } => {
                    for (a, b) in links.pairs(&trace.nodes) {
                        open_cut.entry(a).or_insert(at);
                        open_cut.entry(b).or_insert(at);
                    }
                }
                Action::Heal => {
                    for (n, s) in std::mem::take(&mut open_cut) {
                        push(&mut t.disturbed, &n, s, at);
                    }
                }
                _ => {}
            }
        }
        // In process every node runs on the harness's runtime: while the
        // machine kept it from running, every node was in effect paused (no
        // heartbeats, no answers), as a `pause` step would do to one. Only
        // stalls spent waiting for a CPU count (`Stall::starved`), never a
        // process that was busy or blocked, and not with `--processes`,
        // whose nodes do not run on the harness's runtime.
        if trace.mode == "in-process" {
            for stall in trace.stalls.iter().filter(|s| s.starved()) {
                let (s, e) = stall.span();
                for n in &trace.nodes {
                    push(&mut t.disturbed, n, s, e);
                }
                t.faults.push((
                    s,
                    e,
                    format!("the machine starved the harness for {:.1}s", e - s),
                ));
            }
        }
        for (n, s) in open_down {
            push(&mut t.down, &n, s, inf);
            push(&mut t.disturbed, &n, s, inf);
        }
        for (n, s) in open_pause {
            push(&mut t.paused, &n, s, inf);
            push(&mut t.disturbed, &n, s, inf);
        }
        for (n, s) in open_cut {
            push(&mut t.disturbed, &n, s, inf);
        }
        for (n, s) in open_leave {
            t.leaving.push((n, s, inf));
        }
        for (_, (s, what)) in open_node_fault {
            t.faults.push((s, inf, what));
        }
        for (s, what) in open_fault {
            t.faults.push((s, inf, what));
        }
        t.faults.sort_by(|a, b| a.0.total_cmp(&b.0));
        t
    }

    /// Running and not paused at `t`.
    pub fn healthy(&self, node: &str, t: f64) -> bool {
        !within(&self.down, node, t, 0.0) && !within(&self.paused, node, t, 0.0)
    }

    /// When the last step that changed nodes or the network took effect.
    pub fn last_change(&self) -> f64 {
        self.last_change
    }

    /// Healthy nodes at `t`.
    pub fn healthy_set(&self, t: f64) -> BTreeSet<String> {
        self.nodes
            .iter()
            .filter(|n| self.healthy(n, t))
            .cloned()
            .collect()
    }

    /// Touched by a disturbance at `t` or less than `grace` before.
    pub fn excused(&self, node: &str, t: f64, grace: f64) -> bool {
        within(&self.disturbed, node, t, grace)
    }
}

fn push(map: &mut BTreeMap<String, Vec<(f64, f64)>>, node: &str, s: f64, e: f64) {
    map.entry(node.to_string()).or_default().push((s, e));
}

fn within(map: &BTreeMap<String, Vec<(f64, f64)>>, node: &str, t: f64, grace: f64) -> bool {
    map.get(node)
        .is_some_and(|v| v.iter().any(|(s, e)| t >= *s && t < *e + grace))
}

fn view<'a>(sample: &'a Sample, node: &str) -> Option<&'a View> {
    sample.views.iter().find(|v| v.observer == node)
}

/// Whether every healthy node sees exactly the healthy set alive; else who
/// disagrees.
fn agreement(sample: &Sample, healthy: &BTreeSet<String>) -> Result<(), String> {
    for n in healthy {
        match view(sample, n) {
            None => return Err(format!("{n} has no view")),
            Some(v) if v.alive != *healthy => {
                return Err(format!(
                    "{n} sees {{{}}} alive, expected {{{}}}",
                    join(&v.alive),
                    join(healthy)
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn join(s: &BTreeSet<String>) -> String {
    s.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn converges(within: Duration, truth: &Truth, trace: &Trace) -> Verdict {
    let t0 = truth.last_change;
    let healthy_end = truth.healthy_set(f64::MAX);
    let bound = format!("≤ {}", secs(within));
    let mut last_err = String::from("no samples after the last change");
    for s in trace.samples.iter().filter(|s| s.t >= t0) {
        match agreement(s, &healthy_end) {
            Ok(()) => {
                let took = s.t - t0;
                return Verdict {
                    name: String::new(),
                    passed: took <= within.as_secs_f64(),
                    figure: format!("{took:.1}s"),
                    bound,
                    seconds: Some(took),
                    detail: format!(
                        "all {} healthy nodes agreed at {:.1}s, {took:.1}s after the last change at {t0:.1}s",
                        healthy_end.len(),
                        s.t
                    ),
                };
            }
            Err(e) => last_err = e,
        }
    }
    Verdict {
        name: String::new(),
        passed: false,
        figure: "never".into(),
        bound,
        seconds: None,
        detail: format!(
            "watched {:.1}s after the last change at {t0:.1}s; at the end {last_err}",
            trace.ended - t0
        ),
    }
}

fn no_false_dead(grace: Duration, truth: &Truth, trace: &Trace) -> Verdict {
    let g = grace.as_secs_f64();
    let mut sightings = 0usize;
    let mut pairs: BTreeSet<(String, String)> = BTreeSet::new();
    let mut first = None;
    let mut checked = 0usize;
    for s in &trace.samples {
        for v in &s.views {
            if !truth.healthy(&v.observer, s.t) || truth.excused(&v.observer, s.t, g) {
                continue;
            }
            checked += 1;
            // Only cluster nodes can be falsely dead; a member outside the
            // cluster (a rogue that joined) is another invariant's business.
            for m in v.dead.iter().filter(|m| truth.nodes.contains(m)) {
                if truth.healthy(m, s.t) && !truth.excused(m, s.t, g) {
                    sightings += 1;
                    pairs.insert((v.observer.clone(), m.clone()));
                    first.get_or_insert_with(|| {
                        format!("{} saw {m} dead at {:.1}s", v.observer, s.t)
                    });
                }
            }
        }
    }
    let span = trace.samples.last().map(|s| s.t).unwrap_or(0.0);
    Verdict {
        name: String::new(),
        passed: sightings == 0,
        figure: format!("{sightings} false dead"),
        bound: "0".into(),
        seconds: None,
        detail: match first {
            None => format!("{checked} views checked over {span:.1}s"),
            Some(f) => format!(
                "{sightings} sightings, {} observer→member pairs; first: {f}; \
                 the widest gap between samples (taken every 100 ms) was {:.2}s",
                pairs.len(),
                widest_gap(&trace.samples)
            ),
        },
    }
}

/// The longest time between two consecutive samples: how far the harness's
/// own runtime fell behind on a busy machine (reported, never judged).
fn widest_gap(samples: &[Sample]) -> f64 {
    samples
        .windows(2)
        .map(|w| w[1].t - w[0].t)
        .fold(0.0, f64::max)
}

/// Crash/pause detection (`left` false) or drain detection (`left` true).
fn detected(within: Duration, truth: &Truth, trace: &Trace, left: bool) -> Verdict {
    let bound = format!("≤ {}", secs(within));
    let mut worst: Option<f64> = None;
    let mut passed = true;
    let mut details = Vec::new();
    for (at, victim, is_drain, end) in &truth.departures {
        if *is_drain != left {
            continue;
        }
        let observers: Vec<String> = truth
            .healthy_set(*at)
            .into_iter()
            .filter(|o| o != victim)
            .collect();
        let mut slowest: Option<(f64, String)> = None;
        let mut missing = Vec::new();
        for o in &observers {
            let seen = trace
                .samples
                .iter()
                .filter(|s| s.t >= *at && s.t < *end)
                .find(|s| {
                    view(s, o).is_some_and(|v| {
                        if left {
                            v.left.contains(victim)
                                || !v.alive.contains(victim) && !v.dead.contains(victim)
                        } else {
                            !v.alive.contains(victim)
                        }
                    })
                })
                .map(|s| s.t - at);
            match seen {
                Some(d) => {
                    if slowest.as_ref().is_none_or(|(w, _)| d > *w) {
                        slowest = Some((d, o.clone()));
                    }
                }
                None => missing.push(o.clone()),
            }
        }
        let what = if left { "left" } else { "went silent" };
        if !missing.is_empty() {
            passed = false;
            details.push(format!(
                "{victim} {what} at {at:.1}s: never seen by {}",
                missing.join(", ")
            ));
            worst = Some(f64::INFINITY);
            continue;
        }
        if let Some((d, o)) = slowest {
            if d > within.as_secs_f64() {
                passed = false;
            }
            worst = Some(worst.map_or(d, |w: f64| w.max(d)));
            details.push(format!(
                "{victim} {what} at {at:.1}s: seen by all {} in {d:.1}s (slowest {o})",
                observers.len()
            ));
        }
    }
    Verdict {
        name: String::new(),
        passed,
        figure: match worst {
            Some(w) if w.is_finite() => format!("{w:.1}s"),
            Some(_) => "never".into(),
            None => "no event".into(),
        },
        bound,
        seconds: worst.filter(|w| w.is_finite()),
        detail: details.join("; "),
    }
}

fn pct(ok: usize, n: usize) -> String {
    if n == 0 {
        "no requests".into()
    } else {
        format!("{:.1}% ({ok}/{n})", ok as f64 * 100.0 / n as f64)
    }
}

fn describe(r: &RequestRecord) -> String {
    let outcome = match (r.status, &r.error) {
        (Some(s), Some(e)) => format!("{s} {e}"),
        (Some(s), None) => s.to_string(),
        (None, Some(e)) => e.clone(),
        (None, None) => "no answer".into(),
    };
    let late = if r.sent_at - r.t >= 0.005 {
        format!(" (sent {:.2}s)", r.sent_at)
    } else {
        String::new()
    };
    format!(
        "{} from {} at {:.2}s{late}: {outcome} after {:.2}s",
        r.method, r.client, r.t, r.latency
    )
}

/// Whether a request's life, from the moment it actually went out (not its
/// scheduled time: on a busy machine the driver sends late) to its answer,
/// overlaps a fault window `[start, end + settle)`. A request that started
/// before a fault and ended after the fault began belongs to that window.
fn in_fault_window(r: &RequestRecord, faults: &[(f64, f64, String)], settle: f64) -> bool {
    faults
        .iter()
        .any(|(s, e, _)| r.ended() >= *s && r.sent_at < e + settle)
}

/// Success ratios inside fault windows (plus `settle`) and outside them.
fn request_success(
    idempotent_only: bool,
    during: Option<f64>,
    after: Option<f64>,
    settle: Duration,
    truth: &Truth,
    trace: &Trace,
) -> Verdict {
    let settle = settle.as_secs_f64();
    let counted = trace
        .requests
        .iter()
        .filter(|r| !r.denied && r.sent() && (!idempotent_only || r.idempotent));
    let in_fault = |r: &RequestRecord| in_fault_window(r, &truth.faults, settle);
    let (mut d_ok, mut d_n, mut a_ok, mut a_n) = (0, 0, 0, 0);
    let mut first_d = None;
    let mut first_a = None;
    for r in counted {
        if in_fault(r) {
            d_n += 1;
            if r.ok() {
                d_ok += 1;
            } else {
                first_d.get_or_insert_with(|| describe(r));
            }
        } else {
            a_n += 1;
            if r.ok() {
                a_ok += 1;
            } else {
                first_a.get_or_insert_with(|| describe(r));
            }
        }
    }
    let ratio = |ok: usize, n: usize| {
        if n == 0 {
            100.0
        } else {
            ok as f64 * 100.0 / n as f64
        }
    };
    let passed = during.is_none_or(|f| ratio(d_ok, d_n) >= f - 1e-9)
        && after.is_none_or(|f| ratio(a_ok, a_n) >= f - 1e-9);
    let mut figure = Vec::new();
    let mut bound = Vec::new();
    if let Some(f) = during {
        figure.push(format!("{:.1}%", ratio(d_ok, d_n)));
        bound.push(format!("≥ {f}%"));
    }
    if let Some(f) = after {
        figure.push(format!("{:.1}%", ratio(a_ok, a_n)));
        bound.push(format!("≥ {f}%"));
    }
    let mut detail = format!(
        "during faults {}, outside {}",
        pct(d_ok, d_n),
        pct(a_ok, a_n)
    );
    let windows: Vec<String> = truth
        .faults
        .iter()
        .map(|(s, e, _)| {
            if e.is_finite() {
                format!("{s:.1}-{:.1}s", e + settle)
            } else {
                format!("{s:.1}s-end")
            }
        })
        .collect();
    if !windows.is_empty() {
        detail.push_str(&format!(" (fault windows {})", windows.join(", ")));
    }
    if let Some(f) = first_d {
        detail.push_str(&format!("; first failure during: {f}"));
    }
    if let Some(f) = first_a {
        detail.push_str(&format!("; first failure outside: {f}"));
    }
    // How far behind its schedule the driver fell (a busy machine); said,
    // never judged.
    let lag = trace
        .requests
        .iter()
        .filter(|r| r.sent())
        .map(|r| r.sent_at - r.t)
        .fold(0.0, f64::max);
    if lag >= 0.05 {
        detail.push_str(&format!(
            "; the driver sent up to {:.0}ms behind schedule",
            lag * 1000.0
        ));
    }
    let latencies: Vec<f64> = trace
        .requests
        .iter()
        .filter(|r| r.ok())
        .map(|r| r.latency)
        .collect();
    if !latencies.is_empty() {
        detail.push_str(&format!(
            "; latency p50 {:.1}ms p99 {:.1}ms",
            quantile(&latencies, 0.5) * 1000.0,
            quantile(&latencies, 0.99) * 1000.0
        ));
    }
    Verdict {
        name: String::new(),
        passed,
        figure: figure.join(" / "),
        bound: bound.join(" / "),
        seconds: None,
        detail,
    }
}

/// The `q` quantile of `values` (nearest rank).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// After a node was seen dead, left or draining by a client, how late did
/// that client still send it requests?
fn no_traffic_to_dead(within: Duration, truth: &Truth, trace: &Trace) -> Verdict {
    let limit = within.as_secs_f64();
    let clients: BTreeSet<&str> = trace.requests.iter().map(|r| r.client.as_str()).collect();
    let mut worst: Option<(f64, String)> = None;
    let mut violations = 0usize;
    let mut events = 0usize;
    let mut unseen = Vec::new();
    for (victim, start, end) in &truth.leaving {
        for c in clients.iter().filter(|c| *c != victim) {
            if !truth.healthy(c, *start) {
                continue;
            }
            let known = trace
                .samples
                .iter()
                .filter(|s| s.t >= *start && s.t < *end)
                .find(|s| {
                    view(s, c)
                        .is_some_and(|v| !v.alive.contains(victim) || v.draining.contains(victim))
                })
                .map(|s| s.t);
            let Some(known) = known else {
                if end.is_finite() && end - start < limit {
                    continue;
                }
                unseen.push(format!("{c} never saw {victim} go ({start:.1}s)"));
                continue;
            };
            events += 1;
            let mut note = |late: f64, what: String| {
                if late > limit {
                    violations += 1;
                }
                if worst.as_ref().is_none_or(|(w, _)| late > *w) {
                    worst = Some((late, what));
                }
            };
            for r in trace.requests.iter().filter(|r| {
                r.client == **c
                    && r.served_by.as_deref() == Some(victim.as_str())
                    && r.t > known
                    && r.t < *end
            }) {
                note(
                    r.t - known,
                    format!("{c}'s request at {:.2}s was served by {victim}", r.t),
                );
            }
            let mine: Vec<(f64, u64)> = trace
                .samples
                .iter()
                .filter(|s| s.t < *end)
                .filter_map(|s| {
                    view(s, c).and_then(|v| v.attempts.get(victim.as_str()).map(|a| (s.t, *a)))
                })
                .collect();
            for w in mine.windows(2) {
                if w[0].0 >= known && w[1].1 > w[0].1 {
                    note(
                        w[0].0 - known,
                        format!(
                            "{c} sent {victim} {} attempts between {:.1}s and {:.1}s",
                            w[1].1 - w[0].1,
                            w[0].0,
                            w[1].0
                        ),
                    );
                }
            }
        }
    }
    let passed = violations == 0 && unseen.is_empty();
    let (figure, seconds, mut detail) = match &worst {
        Some((w, what)) => (
            format!("{w:.1}s"),
            Some(*w),
            format!("latest traffic after a client knew: {w:.1}s ({what})"),
        ),
        None => (
            "none".into(),
            Some(0.0),
            "no traffic reached a node after its client knew it was going".into(),
        ),
    };
    detail.push_str(&format!(
        "; {events} (client, departure) pairs, {violations} late"
    ));
    if !unseen.is_empty() {
        detail.push_str(&format!("; {}", unseen.join(", ")));
    }
    Verdict {
        name: String::new(),
        passed,
        figure,
        bound: format!("≤ {}", secs(within)),
        seconds,
        detail,
    }
}

/// A policy version as the harness reads it, `<wall_ms>.<logical>@<node>`,
/// ordered by (wall, logical, node): the documented order of hybrid logical
/// clock stamps, parsed and compared here rather than by the mesh's own
/// `Version`, so a bug in the mesh's ordering cannot pass its own check.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    wall_ms: u64,
    logical: u32,
    node: String,
}

impl std::str::FromStr for Version {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let (ts, node) = s.split_once('@').ok_or(())?;
        let (ms, logical) = ts.split_once('.').ok_or(())?;
        if node.is_empty() {
            return Err(());
        }
        Ok(Version {
            wall_ms: ms.parse().map_err(|_| ())?,
            logical: logical.parse().map_err(|_| ())?,
            node: node.to_string(),
        })
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.node)
    }
}

/// Per policy, the highest version acknowledged at or before `t`.
pub fn highest_acked(trace: &Trace, t: f64) -> BTreeMap<String, Version> {
    let mut out: BTreeMap<String, Version> = BTreeMap::new();
    for a in trace.acks.iter().filter(|a| a.t <= t) {
        let Ok(v) = a.version.parse::<Version>() else {
            continue;
        };
        let e = out.entry(a.policy.clone()).or_insert_with(|| v.clone());
        if v > *e {
            *e = v;
        }
    }
    out
}

fn version_of(v: &View, policy: &str) -> Option<Version> {
    v.policies
        .get(policy)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
}

/// Whether `v` runs exactly `target`'s versions.
fn runs(v: &View, target: &BTreeMap<String, Version>) -> bool {
    target
        .iter()
        .all(|(p, want)| version_of(v, p).as_ref() == Some(want))
}

/// How many healthy nodes run the highest acknowledged version of every
/// policy at `s`, of how many healthy nodes.
pub fn policy_agreement(trace: &Trace, truth: &Truth, s: &Sample) -> (usize, usize) {
    let target = highest_acked(trace, s.t);
    let healthy = truth.healthy_set(s.t);
    let ok = healthy
        .iter()
        .filter(|n| view(s, n).is_some_and(|v| runs(v, &target)))
        .count();
    (ok, healthy.len())
}

fn policy_converges(within: Duration, truth: &Truth, trace: &Trace) -> Verdict {
    let last_ack = trace.acks.iter().map(|a| a.t).fold(0.0, f64::max);
    let t0 = last_ack.max(truth.last_change);
    let target = highest_acked(trace, f64::INFINITY);
    let bound = format!("≤ {}", secs(within));
    let mut last_err = "no samples after the last change".to_string();
    for s in trace.samples.iter().filter(|s| s.t >= t0) {
        let healthy = truth.healthy_set(s.t);
        let lagging: Vec<String> = healthy
            .iter()
            .filter(|n| !view(s, n).is_some_and(|v| runs(v, &target)))
            .cloned()
            .collect();
        if lagging.is_empty() {
            let took = s.t - t0;
            return Verdict {
                name: String::new(),
                passed: took <= within.as_secs_f64(),
                figure: format!("{took:.1}s"),
                bound,
                seconds: Some(took),
                detail: format!(
                    "all {} healthy nodes ran {} at {:.1}s, {took:.1}s after the last push or change at {t0:.1}s",
                    healthy.len(),
                    target
                        .iter()
                        .map(|(p, v)| format!("{p} {v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    s.t
                ),
            };
        }
        last_err = format!("{} lag behind", lagging.join(", "));
    }
    Verdict {
        name: String::new(),
        passed: false,
        figure: "never".into(),
        bound,
        seconds: None,
        detail: format!("watched from {t0:.1}s; at the end {last_err}"),
    }
}

fn no_ack_lost(truth: &Truth, trace: &Trace) -> Verdict {
    let target = highest_acked(trace, f64::INFINITY);
    let mut problems = Vec::new();
    // Never backwards: once a node ran a version, it never runs a lower one.
    let mut seen: BTreeMap<(String, String), Version> = BTreeMap::new();
    let mut regressions = 0usize;
    for s in &trace.samples {
        for v in &s.views {
            for p in target.keys() {
                let key = (v.observer.clone(), p.clone());
                let now = version_of(v, p);
                if let Some(before) = seen.get(&key)
                    && now.as_ref().is_none_or(|n| n < before)
                {
                    {
                        regressions += 1;
                        if problems.len() < 3 {
                            problems.push(format!(
                                "{} went back from {before} to {} on {p} at {:.1}s",
                                v.observer,
                                now.map_or("nothing".into(), |n| n.to_string()),
                                s.t
                            ));
                        }
                        continue;
                    }
                }
                if let Some(n) = now {
                    seen.insert(key, n);
                }
            }
        }
    }
    // At the end, every healthy node runs the highest acknowledged version.
    let last = trace.samples.iter().rev().find(|s| !s.views.is_empty());
    let mut short = 0usize;
    if let Some(s) = last {
        for n in truth.healthy_set(s.t) {
            for (p, want) in &target {
                let have = view(s, &n).and_then(|v| version_of(v, p));
                if have.as_ref().is_none_or(|h| h < want) {
                    short += 1;
                    problems.push(format!(
                        "{n} ends on {} of {p}, below acknowledged {want}",
                        have.map_or("nothing".into(), |h| h.to_string())
                    ));
                }
            }
        }
    }
    let lost = regressions + short;
    Verdict {
        name: String::new(),
        passed: lost == 0,
        figure: format!("{lost} lost"),
        bound: "0".into(),
        seconds: None,
        detail: if problems.is_empty() {
            format!(
                "{} acknowledged writes of {} policies; every healthy node ends on the highest; no node ever went back",
                trace.acks.len(),
                target.len()
            )
        } else {
            problems.join("; ")
        },
    }
}

/// The declared outcomes in force on a node: the `expect_authz` lists of
/// the push steps whose documents the node runs (a version maps to the
/// document pushed under it, and the document to its step).
fn expectations_in_force<'a>(
    v: &View,
    trace: &Trace,
    declared: &'a [(String, String, Vec<AuthzExpectation>)],
) -> Vec<&'a AuthzExpectation> {
    let mut out = Vec::new();
    for ver in v.policies.values() {
        let Some(ver) = ver.split(' ').next() else {
            continue;
        };
        let Some(doc) = trace.policy_docs.get(ver) else {
            continue;
        };
        for (policy, document, list) in declared {
            if *policy == doc.policy && *document == doc.document {
                out.extend(list.iter());
            }
        }
    }
    out
}

/// What the scenario declares for one request under some expectations:
/// `Some(false)` if any covering expectation refuses it, else `Some(true)`
/// if one allows it, else `None` (nothing declared: not judged).
fn declared_outcome(
    list: &[&AuthzExpectation],
    r: &RequestRecord,
    identity: &str,
    service: &str,
) -> Option<bool> {
    // The workload asks for `/work/<n>` (workload.rs).
    let path = "/work/";
    let covering: Vec<bool> = list
        .iter()
        .filter(|e| e.covers(&r.client, identity, service, &r.method, path))
        .map(|e| e.allowed)
        .collect();
    if covering.contains(&false) {
        Some(false)
    } else if covering.is_empty() {
        None
    } else {
        Some(true)
    }
}

/// Judges every answer against the outcomes the scenario declares
/// (`expect_authz` on its push steps), never against the mesh's own
/// authorization code. A 2xx is a violation when the serving node's policy
/// versions just before the request and just after its answer both carry a
/// declared refusal; a 403 `forbidden` is a violation when every node
/// serving the service was declared to allow it before and after.
fn authz(truth: &Truth, trace: &Trace) -> Verdict {
    let declared: Vec<(String, String, Vec<AuthzExpectation>)> = trace
        .steps
        .iter()
        .filter_map(|rec| match &rec.step.action {
            Action::PushPolicy {
                kind,
                name,
                document,
                expect_authz,
                ..
            } if !expect_authz.is_empty() => Some((
                format!("{kind}/{name}"),
                document.clone(),
                expect_authz.clone(),
            )),
            _ => None,
        })
        .collect();
    let service = trace.service.clone().unwrap_or_default();
    let identity = |r: &RequestRecord| -> String {
        truth.callers.get(&r.client).cloned().unwrap_or_else(|| {
            if r.denied {
                DENIED_IDENTITY
            } else {
                CLIENT_IDENTITY
            }
            .into()
        })
    };
    // The outcome declared on `node` around the request: both ends agree, or
    // nothing is asserted (a policy changed while the request was out).
    let around = |node: &str, r: &RequestRecord| -> Option<bool> {
        let before = trace
            .samples
            .iter()
            .rev()
            .find(|s| s.t <= r.sent_at && view(s, node).is_some())?;
        let after = trace
            .samples
            .iter()
            .find(|s| s.t >= r.ended() && view(s, node).is_some())?;
        let id = identity(r);
        let b = declared_outcome(
            &expectations_in_force(view(before, node)?, trace, &declared),
            r,
            &id,
            &service,
        )?;
        let a = declared_outcome(
            &expectations_in_force(view(after, node)?, trace, &declared),
            r,
            &id,
            &service,
        )?;
        (a == b).then_some(a)
    };
    let mut judged = 0usize;
    let mut served_against = Vec::new();
    let mut refused_against = Vec::new();
    for r in &trace.requests {
        if r.ok() {
            let Some(by) = &r.served_by else { continue };
            match around(by, r) {
                Some(false) => served_against.push(describe(r) + &format!(" (served by {by})")),
                Some(true) => judged += 1,
                None => {}
            }
        } else if r.error.as_deref() == Some("forbidden") {
            // A refusal names no node: it is wrong only if every server
            // was declared to allow it.
            let verdicts: Vec<Option<bool>> = truth.servers.iter().map(|n| around(n, r)).collect();
            if !verdicts.is_empty() && verdicts.iter().all(|v| *v == Some(true)) {
                refused_against.push(describe(r));
            } else if verdicts.iter().any(|v| v.is_some()) {
                judged += 1;
            }
        }
    }
    judged += served_against.len() + refused_against.len();
    let denied: Vec<&RequestRecord> = trace.requests.iter().filter(|r| r.denied).collect();
    let refused = denied
        .iter()
        .filter(|r| r.error.as_deref() == Some("forbidden"))
        .count();
    let violations = served_against.len() + refused_against.len();
    let mut detail = format!(
        "{judged} answers judged against the declared expect_authz outcomes; {} 2xx declared refused, {} 403 declared allowed; denied callers sent {}, {refused} refused 403 forbidden",
        served_against.len(),
        refused_against.len(),
        denied.len()
    );
    if let Some(v) = served_against.first().or(refused_against.first()) {
        detail.push_str(&format!("; first violation: {v}"));
    }
    Verdict {
        name: String::new(),
        passed: violations == 0 && judged > 0,
        figure: format!("{violations} violations"),
        bound: "0".into(),
        seconds: None,
        detail: if judged == 0 {
            format!(
                "{detail}; nothing was judged (no answer fell where an expectation was in force)"
            )
        } else {
            detail
        },
    }
}

fn holds(check: &Check, s: &Sample, truth: &Truth) -> Result<(), String> {
    let healthy = truth.healthy_set(s.t);
    let others = |x: &String| -> Vec<&String> { healthy.iter().filter(|o| *o != x).collect() };
    match check {
        Check::Converged => agreement(s, &healthy),
        Check::Dead { node } => others(node).into_iter().try_for_each(|o| match view(s, o) {
            Some(v) if !v.alive.contains(node) => Ok(()),
            _ => Err(format!("{o} still sees {node} alive")),
        }),
        Check::Alive { node } => healthy.iter().try_for_each(|o| match view(s, o) {
            Some(v) if v.alive.contains(node) => Ok(()),
            _ => Err(format!("{o} does not see {node} alive")),
        }),
        Check::Left { node } => others(node).into_iter().try_for_each(|o| match view(s, o) {
            Some(v) if v.left.contains(node) => Ok(()),
            _ => Err(format!("{o} does not see {node} as left")),
        }),
    }
}

fn judge_assert(check: &Check, within: Duration, at: f64, truth: &Truth, trace: &Trace) -> Verdict {
    let name = format!("assert at {at:.1}s: {check}");
    let bound = format!("≤ {}", secs(within));
    let mut last = String::from("no samples in the window");
    for s in trace
        .samples
        .iter()
        .filter(|s| s.t >= at && s.t <= at + within.as_secs_f64())
    {
        match holds(check, s, truth) {
            Ok(()) => {
                let d = s.t - at;
                return Verdict {
                    name,
                    passed: true,
                    figure: format!("{d:.1}s"),
                    bound,
                    seconds: Some(d),
                    detail: format!("held at {:.1}s", s.t),
                };
            }
            Err(e) => last = e,
        }
    }
    Verdict {
        name,
        passed: false,
        figure: "never".into(),
        bound,
        seconds: None,
        detail: format!("not within the window; last: {last}"),
    }
}

/// Nothing reached a rogue: it counted no data-plane stream, every 2xx was
/// served by a node the scenario puts the service on, and no node listed a
/// member outside the cluster (a ghost, or a rogue that joined) at any
/// sample.
fn no_rogue_traffic(truth: &Truth, trace: &Trace) -> Verdict {
    let streams: u64 = trace.rogues.iter().map(|r| r.streams).sum();
    let foreign: Vec<&RequestRecord> = trace
        .requests
        .iter()
        .filter(|r| r.ok())
        .filter(|r| {
            r.served_by
                .as_ref()
                .is_some_and(|s| !truth.servers.contains(s))
        })
        .collect();
    let cluster: BTreeSet<&str> = trace.nodes.iter().map(String::as_str).collect();
    let mut outsiders = 0usize;
    let mut first_outsider = None;
    for s in &trace.samples {
        for v in &s.views {
            for m in v.alive.iter().chain(&v.dead).chain(&v.left) {
                if !cluster.contains(m.as_str()) {
                    outsiders += 1;
                    first_outsider
                        .get_or_insert_with(|| format!("{} listed {m} at {:.1}s", v.observer, s.t));
                }
            }
        }
    }
    let served = trace.requests.iter().filter(|r| r.ok()).count();
    let mut detail = vec![format!(
        "{streams} data-plane streams reached {} rogue(s); {} of {served} answers from a node          not serving the service; {outsiders} times a node listed a member outside the cluster",
        trace.rogues.len(),
        foreign.len()
    )];
    for r in &trace.rogues {
        let sent: Vec<String> = r.sent.iter().map(|(k, v)| format!("{k} {v}")).collect();
        detail.push(format!(
            "rogue {} ({}) played {} rounds {:.1}-{:.1}s, sent {}, {} send errors",
            r.identity,
            r.addr,
            r.rounds,
            r.started,
            r.window_end,
            if sent.is_empty() {
                "nothing".into()
            } else {
                sent.join(", ")
            },
            r.send_errors
        ));
    }
    if let Some(r) = foreign.first() {
        detail.push(format!(
            "first foreign answer: {} served by {}",
            describe(r),
            r.served_by.as_deref().unwrap_or("?")
        ));
    }
    if let Some(g) = first_outsider {
        detail.push(format!("first outsider: {g}"));
    }
    Verdict {
        name: String::new(),
        passed: streams == 0 && foreign.is_empty() && outsiders == 0,
        figure: format!(
            "{streams} streams, {} foreign answers, {outsiders} outsiders listed",
            foreign.len()
        ),
        bound: "0".into(),
        seconds: None,
        detail: detail.join("; "),
    }
}

/// No node ran a policy version the scenario did not push and have
/// acknowledged: every (policy, version) in every view must be one of the
/// trace's acknowledgements.
fn no_forged_policy(trace: &Trace) -> Verdict {
    let acked: BTreeSet<(&str, &str)> = trace
        .acks
        .iter()
        .map(|a| (a.policy.as_str(), a.version.as_str()))
        .collect();
    let forged: BTreeSet<(&str, &str)> = trace
        .rogues
        .iter()
        .flat_map(|r| r.forged_policies.iter())
        .map(|(p, v)| (p.as_str(), v.as_str()))
        .collect();
    let mut views = 0usize;
    let mut bad_views = 0usize;
    let mut nodes: BTreeSet<&str> = BTreeSet::new();
    let mut first = None;
    for s in &trace.samples {
        for v in &s.views {
            views += 1;
            let mut bad = false;
            for (p, ver) in &v.policies {
                let version = ver.split(' ').next().unwrap_or(ver);
                if acked.contains(&(p.as_str(), version)) {
                    continue;
                }
                bad = true;
                nodes.insert(v.observer.as_str());
                first.get_or_insert_with(|| {
                    let whose = if forged.contains(&(p.as_str(), version)) {
                        "a rogue's forgery"
                    } else {
                        "never acknowledged"
                    };
                    format!("{} ran {p} {ver} at {:.1}s ({whose})", v.observer, s.t)
                });
            }
            if bad {
                bad_views += 1;
            }
        }
    }
    let n_nodes = nodes.len();
    let mut detail = format!(
        "{bad_views} of {views} views ran an unacknowledged policy version; {} forged versions          sent, {} acknowledged writes",
        forged.len(),
        acked.len()
    );
    if let Some(f) = first {
        detail.push_str(&format!(
            "; on {{{}}}; first: {f}",
            nodes.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Verdict {
        name: String::new(),
        passed: bad_views == 0,
        figure: format!("{n_nodes} nodes ran one"),
        bound: "0".into(),
        seconds: None,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultCounts;
    use crate::runner::StepRecord;
    use crate::scenario::Step;

    fn names(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn sample(t: f64, views: &[(&str, &[&str], &[&str])]) -> Sample {
        Sample {
            t,
            views: views
                .iter()
                .map(|(o, alive, dead)| View {
                    observer: o.to_string(),
                    alive: names(alive),
                    dead: names(dead),
                    ..View::default()
                })
                .collect(),
        }
    }

    fn step(at: f64, action: Action) -> StepRecord {
        StepRecord {
            planned: at,
            at,
            effective: at,
            phases: Vec::new(),
            text: action.to_string(),
            step: Step {
                at: Duration::from_secs_f64(at),
                action,
            },
        }
    }

    fn trace(steps: Vec<StepRecord>, samples: Vec<Sample>) -> Trace {
        Trace {
            mode: "in-process",
            service: None,
            requests: Vec::new(),
            acks: Vec::new(),
            policy_docs: BTreeMap::new(),
            nodes: ["n1", "n2", "n3"].map(String::from).to_vec(),
            steps,
            ended: samples.last().map_or(0.0, |s| s.t),
            samples,
            duration: 10.0,
            faults: FaultCounts::default(),
            formed_in: 0.0,
            rogues: Vec::new(),
            refusals: BTreeMap::new(),
            stalls: Vec::new(),
        }
    }

    const ALL: &[&str] = &["n1", "n2", "n3"];

    #[test]
    fn crash_detection_and_convergence_figures() {
        let crash = step(1.0, Action::Crash { node: "n3".into() });
        let t = trace(
            vec![crash],
            vec![
                sample(0.5, &[("n1", ALL, &[]), ("n2", ALL, &[]), ("n3", ALL, &[])]),
                sample(1.5, &[("n1", ALL, &[]), ("n2", &["n1", "n2"], &["n3"])]),
                sample(
                    2.5,
                    &[
                        ("n1", &["n1", "n2"], &["n3"]),
                        ("n2", &["n1", "n2"], &["n3"]),
                    ],
                ),
            ],
        );
        let truth = Truth::new(&t);
        let v = detected(Duration::from_secs(2), &truth, &t, false);
        assert!(v.passed, "{v:?}");
        assert_eq!(v.seconds, Some(1.5));
        let v = detected(Duration::from_secs(1), &truth, &t, false);
        assert!(!v.passed, "1.5s is over a 1s bound: {v:?}");
        let v = converges(Duration::from_secs(2), &truth, &t);
        assert!(v.passed && v.seconds == Some(1.5), "{v:?}");
        // The crash excuses n3 being seen dead.
        assert!(no_false_dead(Duration::from_secs(1), &truth, &t).passed);
    }

    #[test]
    fn a_healthy_node_seen_dead_is_a_violation() {
        let loss = step(
            0.0,
            Action::Loss {
                links: crate::scenario::Links {
                    from: None,
                    to: None,
                    one_way: false,
                },
                percent: 20.0,
            },
        );
        let t = trace(
            vec![loss],
            vec![
                sample(1.0, &[("n1", ALL, &[]), ("n2", ALL, &[]), ("n3", ALL, &[])]),
                sample(
                    2.0,
                    &[
                        ("n1", &["n1", "n2"], &["n3"]),
                        ("n2", ALL, &[]),
                        ("n3", ALL, &[]),
                    ],
                ),
            ],
        );
        let truth = Truth::new(&t);
        let v = no_false_dead(Duration::from_secs(5), &truth, &t);
        assert!(!v.passed);
        assert!(v.detail.contains("n1 saw n3 dead at 2.0s"), "{v:?}");
        let v = converges(Duration::from_secs(5), &truth, &t);
        assert!(v.passed, "agreed at 1.0s: {v:?}");
    }

    #[test]
    fn never_converging_fails_with_who_disagrees() {
        let t = trace(
            vec![],
            vec![sample(
                1.0,
                &[
                    ("n1", &["n1"], &["n2", "n3"]),
                    ("n2", ALL, &[]),
                    ("n3", ALL, &[]),
                ],
            )],
        );
        let v = converges(Duration::from_secs(5), &Truth::new(&t), &t);
        assert!(!v.passed);
        assert!(v.detail.contains("n1 sees {n1} alive"), "{v:?}");
    }

    #[test]
    fn asserts_hold_within_their_window() {
        let t = trace(
            vec![step(1.0, Action::Crash { node: "n3".into() })],
            vec![
                sample(1.2, &[("n1", ALL, &[]), ("n2", ALL, &[])]),
                sample(
                    2.0,
                    &[
                        ("n1", &["n1", "n2"], &["n3"]),
                        ("n2", &["n1", "n2"], &["n3"]),
                    ],
                ),
            ],
        );
        let truth = Truth::new(&t);
        let dead = Check::Dead { node: "n3".into() };
        assert!(judge_assert(&dead, Duration::from_secs(2), 1.0, &truth, &t).passed);
        assert!(!judge_assert(&dead, Duration::from_millis(500), 1.0, &truth, &t).passed);
    }

    fn policy_view(observer: &str, policies: &[(&str, &str)]) -> View {
        View {
            observer: observer.into(),
            alive: names(ALL),
            policies: policies
                .iter()
                .map(|(p, v)| (p.to_string(), v.to_string()))
                .collect(),
            ..View::default()
        }
    }

    const HUGE: &str = "18446744073709551615.4294967295@n1";

    #[test]
    fn only_acknowledged_policy_versions_may_run() {
        let mut t = trace(
            vec![],
            vec![Sample {
                t: 1.0,
                views: vec![
                    policy_view("n1", &[("AuthorizationPolicy/web-allow", "5.0@n1")]),
                    policy_view(
                        "n2",
                        &[("AuthorizationPolicy/web-allow", "5.0@n1 (deleted)")],
                    ),
                ],
            }],
        );
        t.acks.push(crate::runner::Ack {
            t: 0.5,
            node: "n1".into(),
            policy: "AuthorizationPolicy/web-allow".into(),
            version: "5.0@n1".into(),
        });
        let v = no_forged_policy(&t);
        assert!(v.passed, "{v:?}");
        assert_eq!(v.figure, "0 nodes ran one");

        t.rogues.push(crate::byzantine::RogueRecord {
            forged_policies: vec![("AuthorizationPolicy/forged-deny-web".into(), HUGE.into())],
            ..Default::default()
        });
        t.samples.push(Sample {
            t: 2.0,
            views: vec![
                policy_view("n1", &[("AuthorizationPolicy/forged-deny-web", HUGE)]),
                policy_view("n3", &[("RateLimit/other", "7.0@n2")]),
            ],
        });
        let v = no_forged_policy(&t);
        assert!(!v.passed);
        assert_eq!(v.figure, "2 nodes ran one", "{v:?}");
        assert!(
            v.detail.contains(&format!(
                "n1 ran AuthorizationPolicy/forged-deny-web {HUGE} at 2.0s (a rogue's forgery)"
            )),
            "{v:?}"
        );
    }

    fn served(by: &str) -> RequestRecord {
        RequestRecord {
            t: 1.0,
            sent_at: 1.0,
            client: "n1".into(),
            denied: false,
            method: "GET".into(),
            idempotent: true,
            status: Some(200),
            error: None,
            latency: 0.01,
            served_by: Some(by.into()),
        }
    }

    #[test]
    fn a_stream_to_a_rogue_a_foreign_answer_or_an_outsider_fails_no_rogue_traffic() {
        let base = || {
            let mut t = trace(vec![], vec![sample(1.0, &[("n1", ALL, &[])])]);
            t.requests.push(served("n2"));
            t.rogues.push(crate::byzantine::RogueRecord {
                identity: "evil".into(),
                ..Default::default()
            });
            t
        };
        let mut truth = Truth::new(&base());
        truth.servers = names(&["n2", "n3"]);
        let v = no_rogue_traffic(&truth, &base());
        assert!(v.passed, "{v:?}");
        assert_eq!(v.figure, "0 streams, 0 foreign answers, 0 outsiders listed");

        let mut t = base();
        t.rogues[0].streams = 1;
        let v = no_rogue_traffic(&truth, &t);
        assert!(!v.passed && v.figure.starts_with("1 streams"), "{v:?}");

        let mut t = base();
        t.requests.push(served("n1"));
        let v = no_rogue_traffic(&truth, &t);
        assert!(!v.passed && v.detail.contains("served by n1"), "{v:?}");

        let mut t = base();
        t.samples.push(sample(
            2.0,
            &[("n1", &["n1", "n2", "n3", "ghost-web"], &[])],
        ));
        let v = no_rogue_traffic(&truth, &t);
        assert!(!v.passed, "{v:?}");
        assert!(v.detail.contains("n1 listed ghost-web at 2.0s"), "{v:?}");
    }

    fn request(t: f64, sent_at: f64, latency: f64, method: &str, status: u16) -> RequestRecord {
        RequestRecord {
            t,
            sent_at,
            client: "n1".into(),
            denied: false,
            method: method.into(),
            idempotent: method != "POST",
            status: Some(status),
            error: (status >= 500).then(|| "upstream-reset".into()),
            latency,
            served_by: (status < 300).then(|| "n2".into()),
        }
    }

    #[test]
    fn a_request_in_flight_when_the_fault_begins_counts_in_its_window() {
        // n3 crashes at 4.0 s and restarts at 6.0 s; settle 2 s, so the
        // window is [4.0, 8.0). The oracle is the hand count below.
        let t = |requests: Vec<RequestRecord>| {
            let mut t = trace(
                vec![
                    step(4.0, Action::Crash { node: "n3".into() }),
                    step(6.0, Action::Restart { node: "n3".into() }),
                ],
                vec![],
            );
            t.requests = requests;
            t
        };
        let requests = vec![
            // Scheduled 3.70 s, sent 60 ms late on a busy machine, failed
            // at 4.01 s: in flight at the crash, so in the window, although
            // its scheduled time plus its latency (3.95 s) is before it.
            request(3.70, 3.76, 0.25, "POST", 502),
            // Over before the crash: outside.
            request(3.00, 3.00, 0.20, "GET", 200),
            // Ends the instant the crash begins: in.
            request(3.80, 3.80, 0.20, "GET", 200),
            // Sent during the settle time after the restart: in.
            request(7.90, 7.90, 0.10, "GET", 200),
            // Scheduled inside the settle time but sent after it: outside.
            request(7.95, 8.05, 0.10, "GET", 200),
            // Long after: outside.
            request(9.00, 9.00, 0.20, "PUT", 200),
        ];
        let trace = t(requests);
        let truth = Truth::new(&trace);
        let settle = Duration::from_secs(2);
        let v = request_success(false, Some(100.0), Some(100.0), settle, &truth, &trace);
        assert!(!v.passed, "{v:?}");
        assert!(
            v.detail
                .starts_with("during faults 66.7% (2/3), outside 100.0% (3/3)"),
            "{v:?}"
        );
        assert!(
            v.detail.contains(
                "first failure during: POST from n1 at 3.70s (sent 3.76s): 502 upstream-reset"
            ),
            "{v:?}"
        );
        // A floor the failed POST meets passes; idempotent requests all
        // succeeded, in and out of the window (2 of them in it).
        let v = request_success(false, Some(60.0), Some(100.0), settle, &truth, &trace);
        assert!(v.passed, "{v:?}");
        let v = request_success(true, Some(100.0), Some(100.0), settle, &truth, &trace);
        assert!(v.passed, "{v:?}");
        assert!(
            v.detail
                .starts_with("during faults 100.0% (2/2), outside 100.0% (3/3)"),
            "{v:?}"
        );
        // The same failure over before the crash is counted outside and
        // fails the outside floor: the window does not swallow it.
        let trace = t(vec![request(3.70, 3.70, 0.25, "POST", 502)]);
        let v = request_success(false, Some(0.0), Some(100.0), settle, &truth, &trace);
        assert!(!v.passed, "{v:?}");
        assert!(
            v.detail
                .starts_with("during faults no requests, outside 0.0% (0/1)"),
            "{v:?}"
        );
    }

    #[test]
    fn a_stall_of_the_machine_excuses_what_a_pause_of_every_node_would_and_nothing_else() {
        use crate::stall::Stall;
        // n1 sees n2 dead at 3.0 s; nothing was injected.
        let samples = vec![
            sample(1.0, &[("n1", ALL, &[])]),
            sample(3.0, &[("n1", &["n1", "n3"], &["n2"])]),
            sample(20.0, &[("n1", &["n1", "n3"], &["n2"])]),
        ];
        let stalled = |wait: Option<f64>, mode: &'static str| {
            let mut t = trace(vec![], samples.clone());
            t.mode = mode;
            // Ticks stopped from 1.9 s to 2.9 s.
            t.stalls.push(Stall {
                t: 2.9,
                late: 0.9,
                run_queue_wait: wait,
            });
            t
        };
        let grace = Duration::from_secs(5);
        // Hand count: the 3.0 s sighting is within the stall's 5 s grace
        // (stall 1.9-2.9 s); the 20.0 s one is not.
        for (wait, mode, want) in [
            (Some(1.5), "in-process", 1),
            // Busy or blocked, not starved: excuses nothing.
            (Some(0.1), "in-process", 2),
            (None, "in-process", 2),
            // Real processes do not run on the harness's runtime.
            (Some(1.5), "processes", 2),
        ] {
            let t = stalled(wait, mode);
            let truth = Truth::new(&t);
            let v = no_false_dead(grace, &truth, &t);
            assert_eq!(
                v.figure,
                format!("{want} false dead"),
                "{wait:?} {mode}: {v:?}"
            );
        }
        // The starved span is a fault window for request-success.
        let mut t = stalled(Some(1.5), "in-process");
        t.requests = vec![
            request(2.5, 2.5, 0.1, "GET", 502),
            request(9.0, 9.0, 0.1, "GET", 200),
        ];
        let truth = Truth::new(&t);
        assert_eq!(truth.faults.len(), 1);
        assert!((truth.faults[0].0 - 1.9).abs() < 1e-9 && (truth.faults[0].1 - 2.9).abs() < 1e-9);
        let v = request_success(false, Some(0.0), Some(100.0), grace, &truth, &t);
        assert!(v.passed, "{v:?}");
        assert!(
            v.detail
                .starts_with("during faults 0.0% (0/1), outside 100.0% (1/1)"),
            "{v:?}"
        );
    }

    /// A trace of the policy-race shape: n1 pushes web-allow (clients only)
    /// at 1 s; n2 serves web and runs the pushed version from 1.5 s; n3 is
    /// a denied caller. `answers` are n3's requests (sent_at, status).
    fn authz_trace(answers: &[(f64, u16)]) -> (Truth, Trace) {
        let doc = "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-allow}\nspec:\n  target: web\n  rules:\n  - from: [client]\n";
        let push = Action::PushPolicy {
            node: "n1".into(),
            kind: "AuthorizationPolicy".into(),
            name: "web-allow".into(),
            document: doc.into(),
            source: "inline".into(),
            expect_authz: vec![
                AuthzExpectation {
                    from: "client".into(),
                    service: "web".into(),
                    path: "/".into(),
                    method: None,
                    allowed: true,
                },
                AuthzExpectation {
                    from: "denied".into(),
                    service: "web".into(),
                    path: "/".into(),
                    method: None,
                    allowed: false,
                },
            ],
        };
        let version = "1764072000123.0@n1";
        let view_at = |t: f64| {
            let mut v = View::empty("n2");
            v.alive = names(ALL);
            if t >= 1.5 {
                v.policies.insert(
                    "AuthorizationPolicy/web-allow".into(),
                    format!("{version} abc123"),
                );
            }
            Sample { t, views: vec![v] }
        };
        let mut t = trace(
            vec![step(1.0, push)],
            (0..10).map(|i| view_at(i as f64 * 0.5)).collect(),
        );
        t.service = Some("web".into());
        t.policy_docs.insert(
            version.into(),
            crate::runner::PolicyDoc {
                policy: "AuthorizationPolicy/web-allow".into(),
                document: doc.into(),
            },
        );
        t.requests = answers
            .iter()
            .map(|&(at, status)| RequestRecord {
                t: at,
                sent_at: at,
                client: "n3".into(),
                denied: true,
                method: "GET".into(),
                idempotent: true,
                status: Some(status),
                error: (status == 403).then(|| "forbidden".into()),
                latency: 0.01,
                served_by: (status < 300).then(|| "n2".into()),
            })
            .collect();
        let mut truth = Truth::new(&t);
        truth.callers = BTreeMap::from([
            ("n1".to_string(), CLIENT_IDENTITY.to_string()),
            ("n2".to_string(), "web".to_string()),
            ("n3".to_string(), DENIED_IDENTITY.to_string()),
        ]);
        truth.servers = names(&["n2"]);
        (truth, t)
    }

    #[test]
    fn authz_passes_when_answers_match_the_declared_outcomes() {
        // Before the policy is in force nothing is declared (a 200 then is
        // not judged); after it, the denied caller is refused.
        let (truth, t) = authz_trace(&[(0.2, 200), (2.2, 403), (3.1, 403)]);
        let v = authz(&truth, &t);
        assert!(v.passed, "{v:?}");
        assert!(v.detail.starts_with("2 answers judged"), "{v:?}");
    }

    #[test]
    fn a_broken_authorize_that_admits_everyone_fails_authz() {
        // What a mesh whose authorize allowed every caller would record:
        // the denied caller served 200 while its refusal was in force. The
        // oracle is the scenario's declaration, not the mesh's code, so the
        // same broken code cannot vouch for itself.
        let (truth, t) = authz_trace(&[(2.2, 200), (3.1, 403)]);
        let v = authz(&truth, &t);
        assert!(!v.passed, "{v:?}");
        assert_eq!(v.figure, "1 violations");
        assert!(v.detail.contains("first violation"), "{v:?}");
        assert!(v.detail.contains("served by n2"), "{v:?}");
    }

    #[test]
    fn a_refusal_of_a_declared_allowed_caller_fails_authz() {
        let (truth, mut t) = authz_trace(&[]);
        t.requests = vec![RequestRecord {
            t: 2.2,
            sent_at: 2.2,
            client: "n1".into(),
            denied: false,
            method: "PUT".into(),
            idempotent: true,
            status: Some(403),
            error: Some("forbidden".into()),
            latency: 0.01,
            served_by: None,
        }];
        let v = authz(&truth, &t);
        assert!(!v.passed, "{v:?}");
        assert!(v.detail.contains("1 403 declared allowed"), "{v:?}");
    }

    #[test]
    fn authz_that_judged_nothing_does_not_pass() {
        // Every answer came before the policy was in force.
        let (truth, t) = authz_trace(&[(0.2, 200), (0.6, 200)]);
        let v = authz(&truth, &t);
        assert!(!v.passed, "{v:?}");
        assert!(v.detail.contains("nothing was judged"), "{v:?}");
    }

    #[test]
    fn versions_order_by_wall_then_logical_then_node() {
        let v = |s: &str| s.parse::<Version>().unwrap();
        assert!(v("10.0@a") < v("10.1@a"));
        assert!(v("10.9@z") < v("11.0@a"));
        assert!(v("10.1@a") < v("10.1@b"));
        assert_eq!(v("1764072000123.4@n1").to_string(), "1764072000123.4@n1");
        for bad in ["", "10@a", "10.0@", "x.0@a", "10.0"] {
            assert!(bad.parse::<Version>().is_err(), "{bad:?}");
        }
    }
}
