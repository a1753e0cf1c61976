//! Endpoint choice and the state it rests on: power of two choices over
//! peak-EWMA latency × (in-flight + 1), zone preference, endpoints marked down
//! on connect/reset failures, outlier ejection, and the retry budget.
//!
//! This module holds no I/O: callers report outcomes, it answers choices.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::Serialize;

use crate::proxy::config::{ProxyConfig, RetryConfig};

/// Latency assumed for an endpoint nobody has measured (and its node has not
/// gossiped a figure for).
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Peak-EWMA decay time.
const DECAY: Duration = Duration::from_secs(10);
/// Longest time a connect or reset failure keeps an endpoint out.
pub const DOWN_MAX: Duration = Duration::from_secs(10);
/// While every endpoint of a service is down, one request per endpoint is let
/// through as a trial this often (so a recovered peer routes again within
/// this plus one round trip).
pub const TRIAL_EVERY: Duration = Duration::from_millis(500);

/// One instance of a service, as gossip describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Service name.
    pub service: String,
    /// The node fronting the instance.
    pub node: String,
    /// The node's QUIC address.
    pub addr: SocketAddr,
    /// The node's zone.
    pub zone: String,
    /// Relative weight.
    pub weight: u32,
    /// Whether the instance is behind this very node.
    pub is_self: bool,
    /// Latency the node gossiped, ms (seeds cold endpoints).
    pub gossip_ewma_ms: f64,
}

/// Why no endpoint could be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// Every candidate is down, ejected, excluded or unhealthy.
    NoHealthy,
    /// Candidates exist but all are at their in-flight cap.
    Saturated,
}

/// Failure bookkeeping of one endpoint.
#[derive(Debug, Default)]
struct Failures {
    consecutive: u32,
    down_until: Option<Instant>,
    downs: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    /// Earliest time the next trial request may go to it while it is down.
    next_trial: Option<Instant>,
}

/// Live state of one endpoint as this node sees it.
#[derive(Debug)]
pub struct EndpointState {
    in_flight: AtomicU64,
    attempts: AtomicU64,
    ewma: Mutex<Option<(f64, Instant)>>,
    failures: Mutex<Failures>,
}

impl EndpointState {
    /// A fresh state not held by a balancer (latency tracking of a local instance).
    pub fn detached() -> Self {
        Self::new()
    }

    fn new() -> Self {
        EndpointState {
            in_flight: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            ewma: Mutex::new(None),
            failures: Mutex::new(Failures::default()),
        }
    }

    /// Requests in flight to it.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Attempts sent to it since start.
    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency in nanoseconds, if measured.
    pub fn ewma_ns(&self) -> Option<f64> {
        self.ewma.lock().unwrap().map(|(v, _)| v)
    }

    /// Counts an attempt in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.attempts.fetch_add(1, Ordering::Relaxed);
        InFlight {
            state: self.clone(),
            started: Instant::now(),
        }
    }

    /// Adds a latency sample (peak EWMA: a slower sample counts at once, a
    /// faster one decays in).
    pub fn observe(&self, rtt: Duration) {
        let now = Instant::now();
        let sample = rtt.as_nanos() as f64;
        let mut e = self.ewma.lock().unwrap();
        *e = Some(match *e {
            None => (sample, now),
            Some((v, at)) if sample < v => {
                let w = (-(now - at).as_secs_f64() / DECAY.as_secs_f64()).exp();
                (v * w + sample * (1.0 - w), now)
            }
            Some(_) => (sample, now),
        });
    }

    fn usable(&self, now: Instant) -> (bool, bool) {
        let f = self.failures.lock().unwrap();
        let down = f.down_until.is_some_and(|t| t > now);
        let ejected = f.ejected_until.is_some_and(|t| t > now);
        (down, ejected)
    }

    /// Takes the trial slot of a down endpoint if it is free.
    fn take_trial(&self, now: Instant) -> bool {
        let mut f = self.failures.lock().unwrap();
        if f.next_trial.is_some_and(|t| t > now) {
            return false;
        }
        f.next_trial = Some(now + TRIAL_EVERY);
        true
    }

    /// Whether it is marked down or ejected now.
    pub fn status(&self) -> &'static str {
        match self.usable(Instant::now()) {
            (true, _) => "down",
            (_, true) => "ejected",
            _ => "up",
        }
    }
}

/// Keeps an endpoint's in-flight count while an attempt runs.
#[derive(Debug)]
pub struct InFlight {
    state: Arc<EndpointState>,
    started: Instant,
}

impl InFlight {
    /// Time since the attempt started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Endpoint choice for every service this node calls.
pub struct Balancer {
    zone: String,
    max_in_flight: u64,
    down_base: Duration,
    eject_after: u32,
    eject_base: Duration,
    eject_max: Duration,
    states: Mutex<HashMap<(String, String), Arc<EndpointState>>>,
}

/// An endpoint's view for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    /// `up`, `down` (connect/reset failure) or `ejected` (outlier).
    pub status: &'static str,
    /// In flight from this node.
    pub in_flight: u64,
    /// Attempts from this node since start.
    pub attempts: u64,
    /// Peak-EWMA latency measured from this node, ms.
    pub ewma_ms: Option<f64>,
}

impl Balancer {
    /// A balancer for a node in `zone`. `down_base` is how long a connect or
    /// reset failure keeps an endpoint out (doubling on repeats, capped at
    /// [`DOWN_MAX`]); choose it longer than gossip takes to declare a node
    /// dead. While all of a service's endpoints are down, trial requests go
    /// through (see [`TRIAL_EVERY`]).
    pub fn new(zone: String, config: &ProxyConfig, down_base: Duration) -> Self {
        Balancer {
            zone,
            max_in_flight: config.max_in_flight_per_endpoint,
            down_base,
            eject_after: config.eject_after,
            eject_base: config.eject_base,
            eject_max: config.eject_max,
            states: Mutex::new(HashMap::new()),
        }
    }

    /// The state of `(service, node)`, made on first use.
    pub fn state(&self, service: &str, node: &str) -> Arc<EndpointState> {
        let mut states = self.states.lock().unwrap();
        states
            .entry((service.to_string(), node.to_string()))
            .or_insert_with(|| Arc::new(EndpointState::new()))
            .clone()
    }

    /// The admin view of `(service, node)`.
    pub fn view(&self, service: &str, node: &str) -> EndpointView {
        let s = self.state(service, node);
        EndpointView {
            status: s.status(),
            in_flight: s.in_flight(),
            attempts: s.attempts(),
            ewma_ms: s.ewma_ns().map(|n| n / 1e6),
        }
    }

    /// Chooses among `targets` (all of one service), never one of `exclude`
    /// (node names). Prefers this node's zone while it has a usable endpoint.
    pub fn pick(
        &self,
        targets: &[Target],
        exclude: &[String],
    ) -> Result<(Target, Arc<EndpointState>), NoEndpoint> {
        let now = Instant::now();
        let mut usable: Vec<(&Target, Arc<EndpointState>)> = Vec::with_capacity(targets.len());
        let mut ejected: Vec<(&Target, Arc<EndpointState>)> = Vec::new();
        let mut saturated = false;
        let mut down_ones: Vec<(&Target, Arc<EndpointState>)> = Vec::new();
        for t in targets {
            if exclude.contains(&t.node) {
                continue;
            }
            let s = self.state(&t.service, &t.node);
            let (down, is_ejected) = s.usable(now);
            if down {
                if s.in_flight() < self.max_in_flight {
                    down_ones.push((t, s));
                }
                continue;
            }
            if s.in_flight() >= self.max_in_flight {
                saturated = true;
                continue;
            }
            if is_ejected {
                ejected.push((t, s));
            } else {
                usable.push((t, s));
            }
        }
        // At most half the endpoints stay ejected: beyond that, ejected ones
        // come back into the choice.
        if ejected.len() * 2 > targets.len() || usable.is_empty() && !ejected.is_empty() {
            usable.extend(ejected);
        }
        if usable.is_empty() && !saturated {
            // Every endpoint gossip calls healthy is down here: let one
            // request through to one of them as a trial, at most every
            // TRIAL_EVERY per endpoint, so a recovered peer is found.
            if let Some((t, s)) = down_ones.into_iter().find(|(_, s)| s.take_trial(now)) {
                tracing::debug!(service = %t.service, node = %t.node, "every endpoint is down; sending a trial request");
                return Ok((t.clone(), s));
            }
        }
        if usable.is_empty() {
            return Err(if saturated {
                NoEndpoint::Saturated
            } else {
                NoEndpoint::NoHealthy
            });
        }
        if usable.iter().any(|(t, _)| t.zone == self.zone) {
            usable.retain(|(t, _)| t.zone == self.zone);
        }
        let chosen = if usable.len() == 1 {
            0
        } else {
            let mut rng = rand::thread_rng();
            let a = rng.gen_range(0..usable.len());
            let mut b = rng.gen_range(0..usable.len() - 1);
            if b >= a {
                b += 1;
            }
            if cost(usable[a].0, &usable[a].1) <= cost(usable[b].0, &usable[b].1) {
                a
            } else {
                b
            }
        };
        let (t, s) = usable.swap_remove(chosen);
        Ok((t.clone(), s))
    }

    /// Reports a successful attempt.
    pub fn success(&self, state: &EndpointState, rtt: Duration) {
        state.observe(rtt);
        let mut f = state.failures.lock().unwrap();
        f.consecutive = 0;
        f.downs = 0;
        f.down_until = None;
        f.next_trial = None;
        f.ejections = f.ejections.saturating_sub(1);
    }

    /// Reports a connect or reset failure: the endpoint is out at once, for
    /// `down_base` doubling per repeat, never longer than [`DOWN_MAX`].
    /// Failures reported while it is already down (requests that were in
    /// flight together, failed trials) do not lengthen the penalty.
    pub fn down(&self, state: &EndpointState) {
        let now = Instant::now();
        let mut f = state.failures.lock().unwrap();
        f.consecutive += 1;
        if f.down_until.is_some_and(|t| t > now) {
            return;
        }
        let factor = 1u32 << f.downs.min(4);
        f.down_until = Some(now + self.down_base.saturating_mul(factor).min(DOWN_MAX));
        f.downs = f.downs.saturating_add(1);
        f.next_trial = Some(now + TRIAL_EVERY);
    }

    /// Reports a failed response (5xx from the instance, far-side error):
    /// enough in a row eject the endpoint for a growing, capped time.
    pub fn failure(&self, service: &str, state: &EndpointState) {
        let eject = {
            let mut f = state.failures.lock().unwrap();
            f.consecutive += 1;
            f.consecutive >= self.eject_after
        };
        if !eject {
            return;
        }
        let now = Instant::now();
        let (total, ejected) = {
            let states = self.states.lock().unwrap();
            let mine: Vec<&Arc<EndpointState>> = states
                .iter()
                .filter(|((s, _), _)| s == service)
                .map(|(_, v)| v)
                .collect();
            let ejected = mine.iter().filter(|s| s.usable(now).1).count();
            (mine.len(), ejected)
        };
        if (ejected + 1) * 2 > total {
            return;
        }
        let mut f = state.failures.lock().unwrap();
        let backoff = self
            .eject_base
            .saturating_mul(1u32 << f.ejections.min(16))
            .min(self.eject_max);
        f.ejected_until = Some(now + backoff);
        f.ejections += 1;
        f.consecutive = 0;
        tracing::info!(%service, ?backoff, "endpoint ejected after consecutive failures");
    }
}

fn cost(t: &Target, s: &EndpointState) -> f64 {
    let rtt = s.ewma_ns().unwrap_or_else(|| {
        if t.gossip_ewma_ms > 0.0 {
            t.gossip_ewma_ms * 1e6
        } else {
            DEFAULT_RTT.as_nanos() as f64
        }
    });
    rtt * (s.in_flight() as f64 + 1.0) / f64::from(t.weight.max(1))
}

/// Retries may add at most `ratio` of requests plus `min_per_sec` per second,
/// counted over a sliding window.
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    window: Duration,
    buckets: Mutex<VecDeque<(Instant, u64, u64)>>,
}

impl RetryBudget {
    /// A budget from the retry settings.
    pub fn new(c: &RetryConfig) -> Self {
        RetryBudget {
            ratio: c.budget_ratio,
            min_per_sec: c.budget_min_per_sec,
            window: c.budget_window,
            buckets: Mutex::new(VecDeque::new()),
        }
    }

    fn bucket<R>(&self, f: impl FnOnce(&mut (Instant, u64, u64), u64, u64) -> R) -> R {
        let now = Instant::now();
        let mut b = self.buckets.lock().unwrap();
        while b.front().is_some_and(|(t, _, _)| now - *t > self.window) {
            b.pop_front();
        }
        if b.back()
            .is_none_or(|(t, _, _)| now - *t >= Duration::from_secs(1))
        {
            b.push_back((now, 0, 0));
        }
        let (reqs, retries) = b.iter().fold((0, 0), |(a, r), x| (a + x.1, r + x.2));
        let last = b.back_mut().expect("pushed above");
        f(last, reqs, retries)
    }

    /// Counts a request (first attempts only).
    pub fn request(&self) {
        self.bucket(|last, _, _| last.1 += 1);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_retry(&self) -> bool {
        let floor = self.min_per_sec * self.window.as_secs_f64();
        self.bucket(|last, reqs, retries| {
            let allowed = (reqs as f64 * self.ratio + floor).floor() as u64;
            if retries < allowed {
                last.2 += 1;
                true
            } else {
                false
            }
        })
    }
}

/// Exponential backoff with full jitter for retry `n` (1-based).
pub fn backoff(c: &RetryConfig, n: u32) -> Duration {
    let cap = c
        .backoff_base
        .saturating_mul(1u32 << n.saturating_sub(1).min(16))
        .min(c.backoff_max);
    cap.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(node: &str, zone: &str) -> Target {
        Target {
            service: "web".into(),
            node: node.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            zone: zone.into(),
            weight: 100,
            is_self: false,
            gossip_ewma_ms: 0.0,
        }
    }

    #[test]
    fn prefers_fast_and_idle_endpoints() {
        let b = Balancer::new("z".into(), &ProxyConfig::default(), Duration::from_secs(1));
        let ts = [target("a", "z"), target("b", "z")];
        b.state("web", "a").observe(Duration::from_millis(50));
        b.state("web", "b").observe(Duration::from_millis(1));
        for _ in 0..20 {
            assert_eq!(b.pick(&ts, &[]).unwrap().0.node, "b");
        }
    }

    #[test]
    fn down_and_excluded_endpoints_are_skipped_and_zone_preferred() {
        let b = Balancer::new("z1".into(), &ProxyConfig::default(), Duration::from_secs(5));
        let ts = [target("a", "z1"), target("b", "z2"), target("c", "z2")];
        assert_eq!(b.pick(&ts, &[]).unwrap().0.node, "a");
        b.down(&b.state("web", "a"));
        for _ in 0..20 {
            let n = b.pick(&ts, &["b".into()]).unwrap().0.node;
            assert_eq!(n, "c");
        }
        b.down(&b.state("web", "c"));
        assert_eq!(
            b.pick(&ts, &["b".into()]).unwrap_err(),
            NoEndpoint::NoHealthy
        );
    }

    #[test]
    fn down_penalty_is_capped_and_all_down_services_get_trials() {
        let b = Balancer::new("z".into(), &ProxyConfig::default(), Duration::from_secs(8));
        let ts = [target("a", "z")];
        let a = b.state("web", "a");
        // A burst of failures while it is down counts once.
        for _ in 0..20 {
            b.down(&a);
        }
        let until = a.failures.lock().unwrap().down_until.unwrap();
        assert!(until <= Instant::now() + DOWN_MAX);
        assert_eq!(a.failures.lock().unwrap().downs, 1);
        // Repeated downs never exceed the cap.
        for _ in 0..10 {
            a.failures.lock().unwrap().down_until = None;
            b.down(&a);
        }
        let until = a.failures.lock().unwrap().down_until.unwrap();
        assert!(until <= Instant::now() + DOWN_MAX);
        // No trial before TRIAL_EVERY has passed since it went down ...
        assert_eq!(b.pick(&ts, &[]).unwrap_err(), NoEndpoint::NoHealthy);
        // ... then one trial per TRIAL_EVERY.
        a.failures.lock().unwrap().next_trial = Some(Instant::now());
        assert_eq!(b.pick(&ts, &[]).unwrap().0.node, "a");
        assert_eq!(b.pick(&ts, &[]).unwrap_err(), NoEndpoint::NoHealthy);
        // A successful trial brings it back for every request.
        b.success(&a, Duration::from_millis(1));
        for _ in 0..5 {
            assert_eq!(b.pick(&ts, &[]).unwrap().0.node, "a");
        }
    }

    #[test]
    fn ejects_at_most_half() {
        let cfg = ProxyConfig {
            eject_after: 2,
            ..Default::default()
        };
        let b = Balancer::new("z".into(), &cfg, Duration::from_secs(5));
        for n in ["a", "b"] {
            b.state("web", n);
        }
        let a = b.state("web", "a");
        b.failure("web", &a);
        b.failure("web", &a);
        assert_eq!(a.status(), "ejected");
        let bb = b.state("web", "b");
        b.failure("web", &bb);
        b.failure("web", &bb);
        assert_eq!(bb.status(), "up", "a second ejection would exceed half");
    }

    #[test]
    fn budget_caps_retries() {
        let c = RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_sec: 0.0,
            ..Default::default()
        };
        let budget = RetryBudget::new(&c);
        let mut granted = 0;
        for _ in 0..100 {
            budget.request();
            if budget.try_retry() {
                granted += 1;
            }
        }
        assert_eq!(granted, 20);
    }
}
