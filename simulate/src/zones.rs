//! Invariants of zone pools, judged from the scenario's own declarations
//! (each node's zone, representatives per zone) and what the nodes were
//! seen to know: never by calling the gossip crate's representative rule.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::invariants::{Truth, Verdict};
use crate::runner::{Sample, Trace};

/// 64-bit FNV-1a, from its published definition (offset basis
/// 14695981039346656037, prime 1099511628211).
pub fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(14_695_981_039_346_656_037u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(1_099_511_628_211)
    })
}

/// The representatives the rule gives for a zone whose healthy nodes are
/// `members`: the `n` lowest FNV-1a hashes of their names (ties by name).
pub fn expected_representatives(members: &[&String], n: usize) -> Vec<String> {
    let mut m: Vec<&String> = members.to_vec();
    m.sort_by(|a, b| (fnv1a(a), *a).cmp(&(fnv1a(b), *b)));
    m.into_iter().take(n).cloned().collect()
}

fn first_agreement(
    truth: &Truth,
    trace: &Trace,
    within: Duration,
    what: &str,
    check: impl Fn(&Sample, &BTreeSet<String>) -> Result<(), String>,
) -> Verdict {
    let t0 = truth.last_change();
    let healthy = truth.healthy_set(f64::MAX);
    let bound = format!("≤ {:.1}s", within.as_secs_f64());
    let mut last_err = String::from("no samples after the last change");
    for s in trace.samples.iter().filter(|s| s.t >= t0) {
        match check(s, &healthy) {
            Ok(()) => {
                let took = s.t - t0;
                return Verdict {
                    name: String::new(),
                    passed: took <= within.as_secs_f64(),
                    figure: format!("{took:.1}s"),
                    bound,
                    seconds: Some(took),
                    detail: format!(
                        "{what} at {:.1}s, {took:.1}s after the last change at {t0:.1}s",
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

/// Every healthy node sees exactly the healthy nodes of its own zone alive.
pub fn zone_converges(
    within: Duration,
    zones: &BTreeMap<String, String>,
    truth: &Truth,
    trace: &Trace,
) -> Verdict {
    first_agreement(truth, trace, within, "every zone agreed", |s, healthy| {
        for n in healthy {
            let zone = zones.get(n).map(String::as_str).unwrap_or("");
            let want: BTreeSet<String> = healthy
                .iter()
                .filter(|m| zones.get(*m).map(String::as_str) == Some(zone))
                .cloned()
                .collect();
            match s.views.iter().find(|v| v.observer == *n) {
                None => return Err(format!("{n} has no view")),
                Some(v) if v.alive != want => {
                    return Err(format!(
                        "{n} (zone {zone}) sees {:?} alive, expected {want:?}",
                        v.alive
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    })
}

/// Every healthy node knows, for every other zone with healthy nodes, the
/// representatives the rule gives: judged after each crash (until the next
/// change: the re-election time) and after the last change.
pub fn zone_representatives(
    within: Duration,
    zones: &BTreeMap<String, String>,
    n: usize,
    truth: &Truth,
    trace: &Trace,
) -> Verdict {
    let check = |s: &Sample, healthy: &BTreeSet<String>| -> Result<(), String> {
        let mut by_zone: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
        for h in healthy {
            if let Some(z) = zones.get(h) {
                by_zone.entry(z.as_str()).or_default().push(h);
            }
        }
        for o in healthy {
            let own = zones.get(o).map(String::as_str).unwrap_or("");
            let Some(v) = s.views.iter().find(|v| v.observer == *o) else {
                return Err(format!("{o} has no view"));
            };
            for (z, members) in &by_zone {
                if *z == own {
                    continue;
                }
                let mut want = expected_representatives(members, n);
                want.sort();
                let mut seen = v.reps.get(*z).cloned().unwrap_or_default();
                seen.sort();
                if seen != want {
                    return Err(format!(
                        "{o} knows {seen:?} as zone {z}'s representatives, expected {want:?}"
                    ));
                }
            }
        }
        Ok(())
    };
    let changes: Vec<f64> = trace
        .steps
        .iter()
        .filter(|r| r.step.action.changes_membership())
        .map(|r| r.effective)
        .collect();
    let crashes: Vec<(f64, String)> = trace
        .steps
        .iter()
        .filter_map(|r| match &r.step.action {
            crate::scenario::Action::Crash { node } => Some((r.effective, node.clone())),
            _ => None,
        })
        .collect();
    let mut details = Vec::new();
    let mut worst: Option<f64> = None;
    let mut passed = true;
    for (t0, node) in &crashes {
        let until = changes
            .iter()
            .copied()
            .filter(|t| t > t0)
            .fold(trace.ended, f64::min);
        let healthy = truth.healthy_set(*t0 + 1e-6);
        let hit = trace
            .samples
            .iter()
            .filter(|s| s.t >= *t0 && s.t < until)
            .find(|s| check(s, &healthy).is_ok());
        match hit {
            Some(s) => {
                let took = s.t - t0;
                worst = Some(worst.map_or(took, |w: f64| w.max(took)));
                passed &= took <= within.as_secs_f64();
                details.push(format!("after {node} crashed at {t0:.1}s: {took:.1}s"));
            }
            None => {
                passed = false;
                details.push(format!(
                    "after {node} crashed at {t0:.1}s: never before the next change at {until:.1}s"
                ));
            }
        }
    }
    let last = first_agreement(
        truth,
        trace,
        within,
        "every node knew every other zone's representatives",
        check,
    );
    passed &= last.passed;
    details.push(format!("after the last change: {}", last.detail));
    let figure = match (worst, last.seconds) {
        (Some(w), Some(l)) => format!("{w:.1}s / {l:.1}s"),
        _ => last.figure.clone(),
    };
    Verdict {
        name: String::new(),
        passed,
        figure,
        bound: last.bound,
        seconds: worst.or(last.seconds),
        detail: details.join("; "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_the_reference_vectors_and_orders_representatives() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        let names: Vec<String> = ["n3", "n6", "n9"].map(String::from).to_vec();
        let refs: Vec<&String> = names.iter().collect();
        // From a separate FNV-1a (Python) over the same names: n3 < n6 < n9.
        assert_eq!(expected_representatives(&refs, 1), ["n3"]);
        assert_eq!(expected_representatives(&refs[1..], 1), ["n6"]);
    }
}
