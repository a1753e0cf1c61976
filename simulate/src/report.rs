//! Reports: the verdict table printed on stdout, and with `--report DIR`
//! a `report.json` and a self-contained `timeline.svg` (faults shaded, node
//! lanes, members seen alive by each node over time).
//!
//! This module only formats what a run recorded; it must not run anything.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::invariants::Verdict;
use crate::runner::Trace;
use crate::scenario::{Action, Scenario};

/// What cannot be reproduced from a seed, stated in every report.
pub const NOT_REPRODUCIBLE: &str = "The seed fixes the fault schedule and the stream of \
    loss/duplicate/reorder/jitter decisions. It does not fix which packet meets which decision \
    (that follows OS scheduling of real sockets and tasks), nor chitchat's choice of gossip \
    peers (chitchat seeds its own generator from the OS), nor QUIC timers; so two runs with \
    one seed have the same faults but slightly different figures.";

/// A finished run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario name.
    pub scenario: String,
    /// Its description.
    pub description: String,
    /// The seed.
    pub seed: u64,
    /// Whether every verdict passed.
    pub passed: bool,
    /// One verdict per invariant and assert.
    pub verdicts: Vec<Verdict>,
    /// What was recorded.
    pub trace: Trace,
    /// What the seed does not fix.
    pub not_reproducible: &'static str,
    /// Requests per second of the timeline: count, success rate, latency.
    pub traffic: Vec<TrafficPoint>,
    /// Per sample: healthy nodes running the highest acknowledged version
    /// of every policy.
    pub policy_convergence: Vec<PolicyPoint>,
}

/// One second of workload.
#[derive(Debug, Clone, Serialize)]
pub struct TrafficPoint {
    /// Start of the second.
    pub t: f64,
    /// Requests scheduled in it (denied callers and unsent excluded).
    pub requests: usize,
    /// Of which 2xx.
    pub ok: usize,
    /// ok / requests, percent.
    pub success_pct: f64,
    /// Median latency of all answers, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
}

/// Policy agreement at one sample.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyPoint {
    /// When.
    pub t: f64,
    /// Healthy nodes on the highest acknowledged versions.
    pub agreeing: usize,
    /// Healthy nodes.
    pub healthy: usize,
}

/// Per-second traffic figures of a trace.
pub fn traffic_series(trace: &Trace) -> Vec<TrafficPoint> {
    let mut buckets: BTreeMap<u64, Vec<&crate::workload::RequestRecord>> = BTreeMap::new();
    for r in trace.requests.iter().filter(|r| !r.denied && r.sent()) {
        buckets.entry(r.t.floor() as u64).or_default().push(r);
    }
    buckets
        .into_iter()
        .map(|(sec, rs)| {
            let ok = rs.iter().filter(|r| r.ok()).count();
            let lat: Vec<f64> = rs.iter().map(|r| r.latency).collect();
            TrafficPoint {
                t: sec as f64,
                requests: rs.len(),
                ok,
                success_pct: ok as f64 * 100.0 / rs.len() as f64,
                p50_ms: crate::invariants::quantile(&lat, 0.5) * 1000.0,
                p99_ms: crate::invariants::quantile(&lat, 0.99) * 1000.0,
            }
        })
        .collect()
}

/// Policy agreement over time (empty when nothing was pushed).
pub fn policy_series(trace: &Trace) -> Vec<PolicyPoint> {
    if trace.acks.is_empty() {
        return Vec::new();
    }
    let truth = crate::invariants::Truth::new(trace);
    let first = trace.acks.iter().map(|a| a.t).fold(f64::INFINITY, f64::min);
    trace
        .samples
        .iter()
        .filter(|s| s.t >= first)
        .map(|s| {
            let (agreeing, healthy) = crate::invariants::policy_agreement(trace, &truth, s);
            PolicyPoint {
                t: s.t,
                agreeing,
                healthy,
            }
        })
        .collect()
}

// === impl Report ===

impl Report {
    /// Builds the report of a run.
    pub fn new(scenario: &Scenario, seed: u64, trace: Trace, verdicts: Vec<Verdict>) -> Self {
        Report {
            traffic: traffic_series(&trace),
            policy_convergence: policy_series(&trace),
            scenario: scenario.name.clone(),
            description: scenario.description.clone(),
            seed,
            passed: verdicts.iter().all(|v| v.passed),
            verdicts,
            trace,
            not_reproducible: NOT_REPRODUCIBLE,
        }
    }

    /// The summary table: invariant, verdict, figure, bound.
    pub fn table(&self) -> String {
        let w = self
            .verdicts
            .iter()
            .map(|v| v.name.chars().count())
            .max()
            .unwrap_or(9)
            .max(9);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "scenario {} — seed {} — {}",
            self.scenario,
            self.seed,
            if self.passed { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(
            out,
            "{:<w$}  {:<7}  {:>14}  {:>8}",
            "invariant", "verdict", "figure", "bound"
        );
        for v in &self.verdicts {
            let _ = writeln!(
                out,
                "{:<w$}  {:<7}  {:>14}  {:>8}",
                v.name,
                if v.passed { "pass" } else { "FAIL" },
                v.figure,
                v.bound
            );
            if !v.detail.is_empty() {
                let _ = writeln!(out, "{:<w$}    {}", "", v.detail);
            }
        }
        if !self.trace.requests.is_empty() {
            let sent: Vec<_> = self.trace.requests.iter().filter(|r| r.sent()).collect();
            let ok = sent.iter().filter(|r| r.ok()).count();
            let _ = writeln!(
                out,
                "workload: {} requests sent ({} from denied callers), {ok} answered 2xx; mode {}",
                sent.len(),
                sent.iter().filter(|r| r.denied).count(),
                self.trace.mode
            );
        }
        for r in &self.trace.rogues {
            let sent: Vec<String> = r.sent.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let _ = writeln!(
                out,
                "rogue {} ({}): {} rounds, messages sent: {}; {} data-plane streams received",
                r.identity,
                r.addr,
                r.rounds,
                if sent.is_empty() {
                    "none".into()
                } else {
                    sent.join(", ")
                },
                r.streams
            );
        }
        if !self.trace.refusals.is_empty() {
            let counted: Vec<String> = self
                .trace
                .refusals
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(out, "the nodes counted as refused: {}", counted.join(", "));
        }
        if !self.trace.stalls.is_empty() {
            let starved = self.trace.stalls.iter().filter(|s| s.starved()).count();
            let worst = self
                .trace
                .stalls
                .iter()
                .max_by(|a, b| a.late.total_cmp(&b.late))
                .expect("not empty");
            let _ = writeln!(
                out,
                "stalls: the harness's runtime fell ≥ 0.5s behind {} times (worst {:.1}s at {:.1}s), \
                 {starved} of them spent waiting for a CPU (the machine starved it; in process these \
                 count as every node paused)",
                self.trace.stalls.len(),
                worst.late,
                worst.t
            );
        }
        let f = &self.trace.faults;
        let _ = writeln!(
            out,
            "faults injected: {} datagrams seen, {} cut, {} lost, {} delayed, {} duplicated, {} reordered, {} isolated",
            f.datagrams, f.cut, f.lost, f.delayed, f.duplicated, f.reordered, f.isolated
        );
        out
    }

    /// Writes `report.json` and `timeline.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("timeline.svg"), self.svg())
    }

    /// The timeline as one self-contained SVG document.
    pub fn svg(&self) -> String {
        svg(self)
    }
}

const WIDTH: f64 = 1000.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const PLOT_TOP: f64 = 60.0;
const PLOT_H: f64 = 220.0;
const LANE_H: f64 = 16.0;
const PALETTE: [&str; 8] = [
    "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Network fault intervals from the steps: (start, end, is_partition, label).
fn fault_spans(trace: &Trace) -> Vec<(f64, f64, bool, String)> {
    let mut spans = Vec::new();
    let mut open: Vec<(f64, bool, String)> = Vec::new();
    for rec in &trace.steps {
        match &rec.step.action {
            Action::Partition { .. } => open.push((rec.effective, true, rec.text.clone())),
            Action::Loss { .. }
            | Action::Delay { .. }
            | Action::Duplicate { .. }
            | Action::Reorder { .. } => open.push((rec.effective, false, rec.text.clone())),
            Action::Heal => {
                for (s, p, l) in open.drain(..) {
                    spans.push((s, rec.effective, p, l));
                }
            }
            Action::Byzantine(b) => spans.push((
                rec.effective,
                (rec.effective + b.window.as_secs_f64()).min(trace.ended),
                false,
                rec.text.clone(),
            )),
            _ => {}
        }
    }
    for (s, p, l) in open {
        spans.push((s, trace.ended, p, l));
    }
    spans
}

/// Node lanes: per node, (start, end, state) with state "down" or "paused".
fn node_spans(trace: &Trace) -> BTreeMap<String, Vec<(f64, f64, &'static str)>> {
    let mut out: BTreeMap<String, Vec<(f64, f64, &'static str)>> = BTreeMap::new();
    let mut open: BTreeMap<String, (f64, &'static str)> = BTreeMap::new();
    for rec in &trace.steps {
        match &rec.step.action {
            Action::RollingRestart { .. } => {
                for p in &rec.phases {
                    out.entry(p.node.clone())
                        .or_default()
                        .push((p.down, p.up, "down"));
                }
            }
            Action::Crash { node } | Action::Drain { node, .. } => {
                if let Some((s, k)) = open.remove(node) {
                    out.entry(node.clone())
                        .or_default()
                        .push((s, rec.effective, k));
                }
                open.insert(node.clone(), (rec.effective, "down"));
            }
            Action::Pause { node } => {
                open.insert(node.clone(), (rec.effective, "paused"));
            }
            Action::Restart { node } | Action::Resume { node } => {
                if let Some((s, k)) = open.remove(node) {
                    out.entry(node.clone())
                        .or_default()
                        .push((s, rec.effective, k));
                }
            }
            _ => {}
        }
    }
    for (n, (s, k)) in open {
        out.entry(n).or_default().push((s, trace.ended, k));
    }
    out
}

const PANEL_H: f64 = 100.0;

/// A framed panel with 0 / 100% marks and a label.
fn panel(s: &mut String, top: f64, label: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{top:.1}" width="{:.1}" height="{PANEL_H}" fill="none" stroke="#999"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">100%</text><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">0</text><text x="{LEFT}" y="{:.1}" fill="#333">{label}</text>"##,
        WIDTH - LEFT - RIGHT,
        LEFT - 6.0,
        top + 10.0,
        LEFT - 6.0,
        top + PANEL_H,
        top - 4.0
    );
}

fn svg(r: &Report) -> String {
    let t = &r.trace;
    let n = t.nodes.len();
    let end = t.ended.max(t.duration).max(1.0);
    let x = |secs: f64| LEFT + (secs / end) * (WIDTH - LEFT - RIGHT);
    let y = |count: f64| PLOT_TOP + PLOT_H - count / n.max(1) as f64 * PLOT_H;
    let traffic = &r.traffic;
    let policy = &r.policy_convergence;
    let panels_top = PLOT_TOP + PLOT_H + 30.0;
    let traffic_h = if traffic.is_empty() {
        0.0
    } else {
        PANEL_H + 30.0
    };
    let policy_h = if policy.is_empty() {
        0.0
    } else {
        PANEL_H + 30.0
    };
    let lanes_top = panels_top + traffic_h + policy_h;
    let steps_top = lanes_top + LANE_H * n as f64 + 30.0;
    let height = steps_top + 16.0 * (t.steps.len() + r.verdicts.len()) as f64 + 60.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{} — seed {} — {}</text>"#,
        esc(&r.scenario),
        r.seed,
        if r.passed { "PASS" } else { "FAIL" }
    );
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="40" fill="#555">{}</text>"##,
        esc(&r.description)
    );

    // Fault shading over the plot and lanes.
    let shade_bottom = lanes_top + LANE_H * n as f64;
    for (a, b, partition, label) in fault_spans(t) {
        let color = if partition { "#d62728" } else { "#ff7f0e" };
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{PLOT_TOP}" width="{:.1}" height="{:.1}" fill="{color}" fill-opacity="0.15"><title>{}</title></rect>"#,
            x(a),
            (x(b) - x(a)).max(1.0),
            shade_bottom - PLOT_TOP,
            esc(&label)
        );
    }

    // Axes and grid.
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{PLOT_TOP}" width="{:.1}" height="{PLOT_H}" fill="none" stroke="#999"/>"##,
        WIDTH - LEFT - RIGHT
    );
    for k in 0..=n {
        if n > 8 && k % 2 == 1 {
            continue;
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555">{k}</text><line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            LEFT - 6.0,
            y(k as f64) + 4.0,
            WIDTH - RIGHT,
            y(k as f64),
            y(k as f64)
        );
    }
    let tick = if end > 60.0 {
        10.0
    } else if end > 20.0 {
        5.0
    } else {
        1.0
    };
    let mut tt = 0.0;
    while tt <= end {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#555">{tt}s</text>"##,
            x(tt),
            PLOT_TOP + PLOT_H + 16.0
        );
        tt += tick;
    }
    let _ = writeln!(
        s,
        r##"<text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle" fill="#555">members seen alive</text>"##,
        PLOT_TOP + PLOT_H / 2.0,
        PLOT_TOP + PLOT_H / 2.0
    );

    // One line per observer; small offsets keep overlapping lines visible.
    for (i, node) in t.nodes.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let offset = (i as f64 - n as f64 / 2.0) * 0.8;
        let mut segments: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
        for sample in &t.samples {
            match sample.views.iter().find(|v| &v.observer == node) {
                Some(v) => segments
                    .last_mut()
                    .expect("one segment")
                    .push((x(sample.t), y(v.alive.len() as f64) + offset)),
                None => {
                    if !segments.last().expect("one segment").is_empty() {
                        segments.push(Vec::new());
                    }
                }
            }
        }
        for seg in segments.iter().filter(|p| !p.is_empty()) {
            let pts: Vec<String> = seg.iter().map(|(a, b)| format!("{a:.1},{b:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"><title>{node}: members seen alive</title></polyline>"#,
                pts.join(" ")
            );
        }
    }

    // Traffic: success rate (green, 0-100%) and p99 latency (purple,
    // scaled to its maximum) per second.
    if !traffic.is_empty() {
        let top = panels_top;
        let max_p99 = traffic.iter().map(|p| p.p99_ms).fold(1.0, f64::max);
        panel(&mut s, top, "requests: success % / p99 latency");
        let ok: Vec<String> = traffic
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x(p.t + 0.5),
                    top + PANEL_H - p.success_pct / 100.0 * PANEL_H
                )
            })
            .collect();
        let lat: Vec<String> = traffic
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x(p.t + 0.5),
                    top + PANEL_H - p.p99_ms / max_p99 * PANEL_H
                )
            })
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#2ca02c" stroke-width="2"><title>success rate per second</title></polyline><polyline points="{}" fill="none" stroke="#9467bd" stroke-width="1.5" stroke-dasharray="4,2"><title>p99 latency per second (top = {max_p99:.0} ms)</title></polyline>"##,
            ok.join(" "),
            lat.join(" ")
        );
        let worst = traffic.iter().map(|p| p.success_pct).fold(100.0, f64::min);
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555" font-size="10">green: success % (lowest {worst:.1}%); purple: p99 latency (top {max_p99:.0} ms)</text>"##,
            WIDTH - RIGHT,
            top - 4.0
        );
    }
    // Policy: share of healthy nodes on the highest acknowledged versions.
    if !policy.is_empty() {
        let top = panels_top + traffic_h;
        panel(&mut s, top, "policy versions converged");
        let pts: Vec<String> = policy
            .iter()
            .map(|p| {
                let share = p.agreeing as f64 / p.healthy.max(1) as f64;
                format!("{:.1},{:.1}", x(p.t), top + PANEL_H - share * PANEL_H)
            })
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline points="{}" fill="none" stroke="#1f77b4" stroke-width="2"><title>healthy nodes on the highest acknowledged version of every policy</title></polyline><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#555" font-size="10">share of healthy nodes running the highest acknowledged version of every policy</text>"##,
            pts.join(" "),
            WIDTH - RIGHT,
            top - 4.0
        );
    }

    // Node lanes.
    let spans = node_spans(t);
    for (i, node) in t.nodes.iter().enumerate() {
        let ly = lanes_top + LANE_H * i as f64;
        let color = PALETTE[i % PALETTE.len()];
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end" fill="{color}">{node}</text><rect x="{LEFT}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#2ca02c" fill-opacity="0.35"/>"##,
            LEFT - 6.0,
            ly + 12.0,
            ly + 2.0,
            x(t.ended) - LEFT,
            LANE_H - 4.0
        );
        for (a, b, kind) in spans.get(node).into_iter().flatten() {
            let fill = if *kind == "down" { "#555" } else { "#f2c200" };
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"><title>{node} {kind}</title></rect>"#,
                x(*a),
                ly + 2.0,
                (x(*b) - x(*a)).max(1.0),
                LANE_H - 4.0
            );
        }
    }

    // Step markers and their sentences.
    for (i, rec) in t.steps.iter().enumerate() {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{PLOT_TOP}" y2="{1:.1}" stroke="#333" stroke-dasharray="3,3"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle" font-size="10">{3}</text>"##,
            x(rec.at),
            shade_bottom,
            PLOT_TOP - 4.0,
            i + 1
        );
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}">{}. {:.1}s — {}</text>"#,
            steps_top + 16.0 * i as f64,
            i + 1,
            rec.at,
            esc(&rec.text)
        );
    }
    let vtop = steps_top + 16.0 * t.steps.len() as f64 + 10.0;
    for (i, v) in r.verdicts.iter().enumerate() {
        let color = if v.passed { "#2ca02c" } else { "#d62728" };
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{:.1}" fill="{color}">{} {} — {} (bound {})</text>"#,
            vtop + 16.0 * i as f64,
            if v.passed { "pass" } else { "FAIL" },
            esc(&v.name),
            esc(&v.figure),
            esc(&v.bound)
        );
    }
    let _ = writeln!(
        s,
        r##"<text x="{LEFT}" y="{:.1}" fill="#555" font-size="10">shading: red = partition, orange = loss/delay/duplicate/reorder; lanes: green = up, grey = stopped, yellow = paused</text>"##,
        height - 12.0
    );
    s.push_str("</svg>\n");
    s
}

/// How one scenario fared with one seed in `run-suite`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SuiteOutcome {
    /// Every verdict held.
    Pass,
    /// These verdicts failed (their names).
    Fail(Vec<String>),
    /// The run could not complete (for example the cluster never formed).
    Error(String),
}

/// The scenario × seed grid `run-suite` prints at the end.
#[derive(Debug, Clone, Default)]
pub struct SuiteTable {
    /// The seeds, in the order they ran (the columns).
    pub seeds: Vec<u64>,
    /// Per scenario (the rows, in the order they ran): its outcome per seed.
    pub rows: Vec<(String, BTreeMap<u64, SuiteOutcome>)>,
}

impl SuiteTable {
    /// A table for these scenarios and seeds, nothing run yet.
    pub fn new(scenarios: &[String], seeds: &[u64]) -> Self {
        SuiteTable {
            seeds: seeds.to_vec(),
            rows: scenarios
                .iter()
                .map(|s| (s.clone(), BTreeMap::new()))
                .collect(),
        }
    }

    /// Records how `scenario` fared with `seed`.
    pub fn record(&mut self, scenario: &str, seed: u64, outcome: SuiteOutcome) {
        if let Some((_, cells)) = self.rows.iter_mut().find(|(n, _)| n == scenario) {
            cells.insert(seed, outcome);
        }
    }

    /// Whether every cell ran and passed.
    pub fn all_passed(&self) -> bool {
        self.rows.iter().all(|(_, cells)| {
            self.seeds
                .iter()
                .all(|s| cells.get(s) == Some(&SuiteOutcome::Pass))
        })
    }

    /// The grid: one row per scenario, one column per seed (`ok`, `FAIL`,
    /// `ERR`, `-` not run), the passes per row, then one line per failure
    /// naming the verdicts that failed.
    pub fn render(&self) -> String {
        let name_w = self
            .rows
            .iter()
            .map(|(n, _)| n.chars().count())
            .max()
            .unwrap_or(8)
            .max(8);
        let col_w = self
            .seeds
            .iter()
            .map(|s| s.to_string().len())
            .max()
            .unwrap_or(1)
            .max(4);
        let mut out = String::new();
        let _ = write!(out, "{:<name_w$}", "scenario");
        for s in &self.seeds {
            let _ = write!(out, " {s:>col_w$}");
        }
        let _ = writeln!(out, "  passed");
        let mut failures = Vec::new();
        for (name, cells) in &self.rows {
            let _ = write!(out, "{name:<name_w$}");
            let mut passed = 0;
            for s in &self.seeds {
                let cell = match cells.get(s) {
                    Some(SuiteOutcome::Pass) => {
                        passed += 1;
                        "ok"
                    }
                    Some(SuiteOutcome::Fail(names)) => {
                        failures.push(format!("{name} seed {s}: FAIL {}", names.join("; ")));
                        "FAIL"
                    }
                    Some(SuiteOutcome::Error(e)) => {
                        failures.push(format!("{name} seed {s}: ERR {e}"));
                        "ERR"
                    }
                    None => "-",
                };
                let _ = write!(out, " {cell:>col_w$}");
            }
            let _ = writeln!(out, "  {passed}/{}", self.seeds.len());
        }
        for f in failures {
            let _ = writeln!(out, "  {f}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suite_table_shows_every_cell_and_names_each_failure() {
        let mut t = SuiteTable::new(&["a".into(), "long-name".into()], &[1, 2, 10]);
        t.record("a", 1, SuiteOutcome::Pass);
        t.record("a", 2, SuiteOutcome::Pass);
        t.record("a", 10, SuiteOutcome::Pass);
        t.record("long-name", 1, SuiteOutcome::Pass);
        t.record("long-name", 2, SuiteOutcome::Fail(vec!["converges".into()]));
        assert!(!t.all_passed(), "a failure and a cell not run");
        let want = "\
scenario     1    2   10  passed
a           ok   ok   ok  3/3
long-name   ok FAIL    -  1/3
  long-name seed 2: FAIL converges
";
        assert_eq!(t.render(), want);
        t.record("long-name", 10, SuiteOutcome::Error("never formed".into()));
        assert!(t.render().contains("long-name seed 10: ERR never formed"));
        assert!(!t.all_passed());
        t.record("long-name", 2, SuiteOutcome::Pass);
        t.record("long-name", 10, SuiteOutcome::Pass);
        assert!(t.all_passed());
        // An unknown scenario changes nothing.
        t.record("other", 1, SuiteOutcome::Fail(vec![]));
        assert!(t.all_passed());
    }
}
