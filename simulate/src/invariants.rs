//! Judging a run: each [`InvariantSpec`] and each `assert` step becomes a
//! [`Verdict`] with the figure measured and the bound it was held to.
//!
//! Judging is a pure function of the scenario and the recorded [`Trace`], so
//! it can be tested without nodes and re-run on a saved trace. "Healthy" at
//! time t means running (not crashed, drained or not yet restarted) and not
//! paused, according to the steps as they were applied.
//!
//! To add an invariant (request success, no traffic to dead nodes, policy
//! convergence once the data plane and policy store exist): add a variant to
//! [`InvariantSpec`], record what it needs in the trace, and add its arm to
//! [`judge_one`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::runner::{Sample, Trace, View};
use crate::scenario::{Action, Check, InvariantSpec, Scenario};

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
            InvariantSpec::Converges { within } => end = end.max(last + *within),
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
            InvariantSpec::NoFalseDead { .. } => {}
        }
    }
    for s in &scenario.steps {
        if let Action::Assert { within, .. } = &s.action {
            end = end.max(s.at + *within);
        }
    }
    end + Duration::from_secs(1)
}

/// Judges every invariant and assert of `scenario` on `trace`.
pub fn judge(scenario: &Scenario, trace: &Trace) -> Vec<Verdict> {
    let truth = Truth::new(trace);
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
        };
        let mut open_down: BTreeMap<String, f64> = BTreeMap::new();
        let mut open_pause: BTreeMap<String, f64> = BTreeMap::new();
        let mut open_cut: BTreeMap<String, f64> = BTreeMap::new();
        for rec in &trace.steps {
            let at = rec.effective;
            if !matches!(rec.step.action, Action::Assert { .. }) {
                t.last_change = at;
            }
            match &rec.step.action {
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
        t
    }

    /// Running and not paused at `t`.
    pub fn healthy(&self, node: &str, t: f64) -> bool {
        !within(&self.down, node, t, 0.0) && !within(&self.paused, node, t, 0.0)
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
            for m in &v.dead {
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
                "{sightings} sightings, {} observer→member pairs; first: {f}",
                pairs.len()
            ),
        },
    }
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
                    left: BTreeSet::new(),
                })
                .collect(),
        }
    }

    fn step(at: f64, action: Action) -> StepRecord {
        StepRecord {
            planned: at,
            at,
            effective: at,
            text: action.to_string(),
            step: Step {
                at: Duration::from_secs_f64(at),
                action,
            },
        }
    }

    fn trace(steps: Vec<StepRecord>, samples: Vec<Sample>) -> Trace {
        Trace {
            nodes: ["n1", "n2", "n3"].map(String::from).to_vec(),
            steps,
            ended: samples.last().map_or(0.0, |s| s.t),
            samples,
            duration: 10.0,
            faults: FaultCounts::default(),
            formed_in: 0.0,
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
}
