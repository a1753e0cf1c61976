//! Golden signals per edge (direction, source service, destination service)
//! and per HTTPRoute: Prometheus families registered in the node's registry,
//! and a one-minute window per edge and route for `GET /v1/stats` (rps,
//! success rate, p50/p95/p99). Every request is recorded once, when its
//! response body finishes ([`Stats::finish`]); the same moment feeds the
//! access log and the tap ([`crate::access`]), so the metrics, `/v1/stats`,
//! the log and the tap count the same requests the same way.
//!
//! Labels are bounded: services come from certificates and gossip, never from
//! request paths; a request for an unknown service counts as `unknown`; route
//! names come from operator-signed policy and are capped at
//! [`MAX_ROUTE_LABELS`] distinct values (the rest count as `overflow`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::access::{self, AccessLog, Event, Trace};
use crate::frame::{BoxError, ProxyBody};

/// Distinct `route` label values kept; further routes count as `overflow`.
pub const MAX_ROUTE_LABELS: usize = 100;
/// Longest `route` label value (longer names are cut).
const MAX_ROUTE_LEN: usize = 63;

/// Seconds kept per edge for `/v1/stats`.
const WINDOW_SECS: u64 = 60;
/// Latency buckets of the window histogram: bucket `i` holds latencies
/// below `1.1^i` microseconds (about ±5% precision up to ~100 s).
const LAT_BUCKETS: usize = 200;
const LAT_BASE: f64 = 1.1;

/// Which side of the node a request crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From a local app into the mesh.
    Outbound,
    /// From the mesh to a local instance.
    Inbound,
}

impl Direction {
    /// `outbound` or `inbound`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    direction: String,
    source: String,
    destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    direction: String,
    source: String,
    destination: String,
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    direction: String,
    source: String,
    destination: String,
    /// The HTTPRoute's name; empty when no HTTPRoute routed the request.
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    direction: String,
    source: String,
    destination: String,
    /// How the retried request ended: its classification.
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResponseLabels {
    direction: String,
    source: String,
    destination: String,
    route: String,
    status_code: String,
    /// Empty (no label) for responses to non-gRPC requests.
    grpc_status: String,
    classification: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    peer: String,
}

/// An edge: who called whom, seen from which side, and what the request
/// path learns about the one request crossing it ([`Trace`]: endpoint,
/// attempts, retries, request bytes).
#[derive(Debug, Clone)]
pub struct Edge {
    /// Side of the node.
    pub direction: Direction,
    /// Calling service.
    pub source: String,
    /// Called service.
    pub destination: String,
    /// The request's trace.
    pub trace: Arc<Trace>,
}

/// A request as [`Stats::finish`] records it once its response body is done.
#[derive(Debug)]
pub struct Exchange {
    /// Who called whom (and the request's trace).
    pub edge: Edge,
    /// The HTTPRoute that routed it, or "".
    pub route: String,
    /// Its method.
    pub method: String,
    /// Its path (any query is dropped).
    pub path: String,
    /// Whether the caller spoke gRPC (`content-type: application/grpc*`).
    pub grpc_call: bool,
    /// When its head arrived.
    pub start: Instant,
    /// Which outcomes get an access-log line.
    pub access_log: AccessLog,
}

/// An edge's in-flight gauge: direction, source, destination, gauge.
type EdgeGauge = (Direction, String, String, Gauge);

/// The metric handles of one kind of request (see [`Stats::handles`]).
struct Handles {
    /// The edge and route (also the window key).
    key: Key,
    status: u16,
    grpc: Option<u32>,
    requests: Counter,
    duration: Histogram,
    responses: Counter,
    request_bytes: Counter,
    response_bytes: Counter,
}

/// The window key: an edge and a route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Key {
    direction: Direction,
    source: String,
    destination: String,
    route: String,
}

impl Edge {
    /// An edge with a fresh trace.
    pub fn new(direction: Direction, source: String, destination: String) -> Self {
        Edge {
            direction,
            source,
            destination,
            trace: Arc::default(),
        }
    }

    fn labels(&self) -> EdgeLabels {
        EdgeLabels {
            direction: self.direction.as_str().into(),
            source: self.source.clone(),
            destination: self.destination.clone(),
        }
    }
}

/// What a response means for the caller, as the metrics and `/v1/stats`
/// count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classification {
    /// Answered: below 500 and not a denial, and `grpc-status` 0 (or none).
    Success,
    /// 5xx, or a `grpc-status` other than 0, 7 and 8.
    Failure,
    /// 403, or `grpc-status` 7 PERMISSION_DENIED.
    Denied,
    /// 429, or `grpc-status` 8 RESOURCE_EXHAUSTED.
    RateLimited,
}

impl Classification {
    /// Classifies an HTTP status and the gRPC status, if the exchange had one.
    pub fn of(status: u16, grpc: Option<u32>) -> Self {
        match (status, grpc) {
            (_, Some(7)) | (403, _) => Classification::Denied,
            (_, Some(8)) | (429, _) => Classification::RateLimited,
            (500.., _) => Classification::Failure,
            (_, Some(0) | None) => Classification::Success,
            (_, Some(_)) => Classification::Failure,
        }
    }

    /// The `classification` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Classification::Success => "success",
            Classification::Failure => "failure",
            Classification::Denied => "denied",
            Classification::RateLimited => "rate_limited",
        }
    }
}

#[derive(Clone)]
struct Second {
    at: u64,
    requests: u64,
    ok: u64,
    failed: u64,
    denied: u64,
    rate_limited: u64,
    latency: Box<[u32; LAT_BUCKETS]>,
}

impl Second {
    fn new(at: u64) -> Self {
        Second {
            at,
            requests: 0,
            ok: 0,
            failed: 0,
            denied: 0,
            rate_limited: 0,
            latency: Box::new([0; LAT_BUCKETS]),
        }
    }
}

/// The proxy's golden signals, access log and tap.
pub struct Stats {
    start: Instant,
    requests: Family<ClassLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    duration: Family<ClassLabels, Histogram>,
    request_bytes: Family<RouteLabels, Counter>,
    response_bytes: Family<RouteLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    in_flight: Family<EdgeLabels, Gauge>,
    peer_rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    peer_not_serving: Family<ServiceLabels, Counter>,
    windows: Mutex<foldhash::HashMap<Key, Vec<Second>>>,
    /// Metric handles per (edge, route, status, gRPC status), by a hash of
    /// those: a request after the first of its kind builds no label set.
    handles: Mutex<HashMap<u64, Vec<Arc<Handles>>, Prehashed>>,
    /// In-flight gauges per edge, likewise.
    gauges: Mutex<HashMap<u64, Vec<EdgeGauge>, Prehashed>>,
    /// Route label values seen (at most [`MAX_ROUTE_LABELS`]).
    routes: Mutex<foldhash::HashSet<String>>,
    /// Hashes the handle and gauge cache keys (seeded once per process).
    hasher: foldhash::fast::RandomState,
    tap: broadcast::Sender<Arc<Event>>,
    /// Live [`access::TapReceiver`]s.
    listeners: Arc<std::sync::atomic::AtomicUsize>,
}

/// A map keyed by a hash already computed (the metric handle caches): the
/// key is used as it is instead of being hashed again.
type Prehashed = std::hash::BuildHasherDefault<KeyIsHash>;

/// The [`Hasher`] of [`Prehashed`]: takes the `u64` key as the hash.
#[derive(Default)]
struct KeyIsHash(u64);

impl Hasher for KeyIsHash {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys come here; anything else is folded in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Figures over the last minute (an edge's, or one route's on it).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Figures {
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests classified `success` (below 500, not 403 or 429,
    /// and `grpc-status` 0 or none): exactly what
    /// `shoal_proxy_responses_total{classification="success"}` counts.
    pub success_rate: f64,
    /// Requests classified `failure` (5xx, or a `grpc-status` other than 0).
    pub failed: u64,
    /// Requests denied (403, or `grpc-status` 7).
    pub denied: u64,
    /// Requests rate limited (429, or `grpc-status` 8).
    pub rate_limited: u64,
    /// Latency percentiles (until the response head), ms.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
}

/// One route's figures on an edge.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RouteStats {
    /// The HTTPRoute's name; "" for requests no HTTPRoute routed.
    pub route: String,
    /// Its figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// One edge's figures over the last minute.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EdgeStats {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Calling service.
    pub source: String,
    /// Called service.
    pub destination: String,
    /// The edge's figures (all routes).
    #[serde(flatten)]
    pub figures: Figures,
    /// Per route, when an HTTPRoute routed some of the edge's requests
    /// (requests no HTTPRoute routed are the row with route "").
    pub routes: Vec<RouteStats>,
}

impl Stats {
    /// Makes the families and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let s = Stats {
            start: Instant::now(),
            requests: Family::default(),
            responses: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            request_bytes: Family::default(),
            response_bytes: Family::default(),
            retries: Family::default(),
            in_flight: Family::default(),
            peer_rtt: Family::default(),
            peer_not_serving: Family::default(),
            windows: Mutex::default(),
            handles: Mutex::new(HashMap::default()),
            gauges: Mutex::new(HashMap::default()),
            routes: Mutex::default(),
            hasher: foldhash::fast::RandomState::default(),
            tap: broadcast::channel(access::TAP_CAPACITY).0,
            listeners: Arc::default(),
        };
        registry.register(
            "proxy_requests",
            "Proxied requests by direction, source and destination service, and status class",
            s.requests.clone(),
        );
        registry.register(
            "proxy_responses",
            "Proxied responses by direction, source and destination service, HTTPRoute (empty: none), HTTP status code, gRPC status (gRPC calls only) and classification (success, failure, denied, rate_limited)",
            s.responses.clone(),
        );
        registry.register(
            "proxy_request_duration_seconds",
            "Proxied request latency until the response head, seconds",
            s.duration.clone(),
        );
        registry.register(
            "proxy_request_bytes",
            "Request body bytes read from callers, by direction, source and destination service and HTTPRoute",
            s.request_bytes.clone(),
        );
        registry.register(
            "proxy_response_bytes",
            "Response body bytes sent to callers, by direction, source and destination service and HTTPRoute",
            s.response_bytes.clone(),
        );
        registry.register(
            "proxy_retries",
            "Retries sent by the outbound proxy, by how the retried request ended (outcome: success, failure, denied, rate_limited)",
            s.retries.clone(),
        );
        registry.register(
            "proxy_in_flight",
            "Proxied requests in flight",
            s.in_flight.clone(),
        );
        registry.register(
            "peer_rtt_seconds",
            "QUIC round-trip time to each connected peer, seconds",
            s.peer_rtt.clone(),
        );
        registry.register(
            "peer_not_serving",
            "Attempts refused before sending because the peer's certificate does not name the service gossip says it serves",
            s.peer_not_serving.clone(),
        );
        Arc::new(s)
    }

    /// Counts an endpoint refused because its peer's certificate does not
    /// name `service`.
    pub fn peer_not_serving(&self, service: &str) {
        self.peer_not_serving
            .get_or_create(&ServiceLabels {
                service: service.into(),
            })
            .inc();
    }

    /// A new tap listener: every request's [`Event`] from now on. A listener
    /// more than [`access::TAP_CAPACITY`] events behind loses the oldest
    /// (`RecvError::Lagged` says how many).
    pub fn subscribe(&self) -> access::TapReceiver {
        access::TapReceiver::new(self.tap.subscribe(), self.listeners.clone())
    }

    /// Whether a tap listener exists (one atomic load).
    fn tapped(&self) -> bool {
        self.listeners.load(std::sync::atomic::Ordering::Relaxed) > 0
    }

    /// The `route` label value for `route`: cut to [`MAX_ROUTE_LEN`], and
    /// `overflow` once [`MAX_ROUTE_LABELS`] others were seen.
    fn route_label<'r>(&self, route: &'r str) -> Cow<'r, str> {
        if route.is_empty() {
            return Cow::Borrowed("");
        }
        let mut end = route.len().min(MAX_ROUTE_LEN);
        while !route.is_char_boundary(end) {
            end -= 1;
        }
        let route = &route[..end];
        let mut seen = self.routes.lock().unwrap();
        if seen.contains(route) {
            return Cow::Borrowed(route);
        }
        if seen.len() >= MAX_ROUTE_LABELS {
            return Cow::Borrowed("overflow");
        }
        seen.insert(route.to_string());
        Cow::Borrowed(route)
    }

    /// The metric handles (and window key) of `edge`, `route` (a label
    /// value), `status` and `grpc`: made on the first request of the kind,
    /// then found by a hash of the borrowed fields (no allocation).
    fn handles(&self, edge: &Edge, route: &str, status: u16, grpc: Option<u32>) -> Arc<Handles> {
        let hash = self.hasher.hash_one((
            edge.direction,
            &edge.source,
            &edge.destination,
            route,
            status,
            grpc,
        ));
        let mut all = self.handles.lock().unwrap();
        let bucket = all.entry(hash).or_default();
        if let Some(found) = bucket.iter().find(|x| {
            x.key.direction == edge.direction
                && x.key.source == edge.source
                && x.key.destination == edge.destination
                && x.key.route == route
                && x.status == status
                && x.grpc == grpc
        }) {
            return found.clone();
        }
        let l = ClassLabels {
            direction: edge.direction.as_str().into(),
            source: edge.source.clone(),
            destination: edge.destination.clone(),
            class: format!("{}xx", status / 100),
        };
        let r = RouteLabels {
            direction: l.direction.clone(),
            source: l.source.clone(),
            destination: l.destination.clone(),
            route: route.to_string(),
        };
        let made = Arc::new(Handles {
            key: Key {
                direction: edge.direction,
                source: edge.source.clone(),
                destination: edge.destination.clone(),
                route: route.to_string(),
            },
            status,
            grpc,
            requests: self.requests.get_or_create(&l).clone(),
            duration: self.duration.get_or_create(&l).clone(),
            responses: self
                .responses
                .get_or_create(&ResponseLabels {
                    direction: l.direction.clone(),
                    source: l.source.clone(),
                    destination: l.destination.clone(),
                    route: route.to_string(),
                    status_code: status.to_string(),
                    grpc_status: grpc.map(|g| g.to_string()).unwrap_or_default(),
                    classification: Classification::of(status, grpc).as_str(),
                })
                .clone(),
            request_bytes: self.request_bytes.get_or_create(&r).clone(),
            response_bytes: self.response_bytes.get_or_create(&r).clone(),
        });
        bucket.push(made.clone());
        made
    }

    /// Records a finished request in the metrics and the window: `status`
    /// is the HTTP status, `grpc` the `grpc-status` when the exchange was a
    /// gRPC call that carried one, `latency` the time until the head.
    pub fn record(
        &self,
        edge: &Edge,
        route: &str,
        status: u16,
        grpc: Option<u32>,
        latency: Duration,
    ) -> Classification {
        self.record_with(&self.handles(edge, route, status, grpc), latency)
    }

    /// [`Stats::record`] with the request's handles at hand.
    fn record_with(&self, h: &Handles, latency: Duration) -> Classification {
        let classification = Classification::of(h.status, h.grpc);
        h.requests.inc();
        h.duration.observe(latency.as_secs_f64());
        h.responses.inc();
        let mut w = self.windows.lock().unwrap();
        // Read the clock under the lock: a reading taken before it could be
        // older than the second another thread has just pushed.
        let now = self.start.elapsed().as_secs();
        let count = |secs: &mut Vec<Second>| {
            // Seconds are pushed in order: only when the oldest has left the
            // window is there anything to drop.
            if secs
                .first()
                .is_some_and(|s| now.saturating_sub(s.at) >= WINDOW_SECS)
            {
                secs.retain(|s| now.saturating_sub(s.at) < WINDOW_SECS);
            }
            if secs.last().is_none_or(|s| s.at != now) {
                secs.push(Second::new(now));
            }
            let s = secs.last_mut().expect("pushed above");
            s.requests += 1;
            match classification {
                Classification::Success => s.ok += 1,
                Classification::Failure => s.failed += 1,
                Classification::Denied => s.denied += 1,
                Classification::RateLimited => s.rate_limited += 1,
            }
            s.latency[bucket(latency)] += 1;
        };
        // One lookup when the key is there (every request but the first).
        match w.get_mut(&h.key) {
            Some(secs) => count(secs),
            None => {
                let mut secs = Vec::new();
                count(&mut secs);
                w.insert(h.key.clone(), secs);
            }
        }
        classification
    }

    /// Watches `resp`, the answer to `x`, until its body finishes (ends,
    /// fails or is dropped), then records the request once: metrics, window,
    /// access log, tap. A gRPC answer (the call was gRPC and the answer is
    /// `application/grpc`) whose head carries no `grpc-status` takes it from
    /// its trailers; one that ends without counts as UNKNOWN (2), one whose
    /// stream breaks as UNAVAILABLE (14).
    pub fn finish(self: &Arc<Self>, x: Exchange, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        let head_grpc = stats_grpc(x.grpc_call, resp.headers());
        let shoal_error = resp
            .headers()
            .get(crate::error::ERROR_NAME)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let pending = Pending {
            stats: self.clone(),
            latency: x.start.elapsed(),
            x,
            status,
            grpc: head_grpc,
            trailers_due: head_grpc.is_none() && is_grpc(resp.headers()),
            shoal_error,
            response_bytes: 0,
        };
        resp.map(|inner| {
            Watched {
                inner,
                pending: Some(pending),
            }
            .boxed_unsync()
        })
    }

    /// Counts a retry of the request crossing `edge`.
    pub fn retry(&self, edge: &Edge) {
        edge.trace.retried();
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>, edge: &Edge) -> InFlightGuard {
        let hash = self
            .hasher
            .hash_one((edge.direction, &edge.source, &edge.destination));
        let mut all = self.gauges.lock().unwrap();
        let bucket = all.entry(hash).or_default();
        let g = match bucket.iter().find(|(d, s, t, _)| {
            *d == edge.direction && *s == edge.source && *t == edge.destination
        }) {
            Some((.., g)) => g.clone(),
            None => {
                let g = self.in_flight.get_or_create(&edge.labels()).clone();
                bucket.push((
                    edge.direction,
                    edge.source.clone(),
                    edge.destination.clone(),
                    g.clone(),
                ));
                g
            }
        };
        drop(all);
        g.inc();
        InFlightGuard(g)
    }

    /// Sets the RTT to `peer`.
    pub fn peer_rtt(&self, peer: &str, rtt: Option<Duration>) {
        let l = PeerLabels { peer: peer.into() };
        match rtt {
            Some(rtt) => {
                self.peer_rtt.get_or_create(&l).set(rtt.as_secs_f64());
            }
            None => {
                self.peer_rtt.remove(&l);
            }
        }
    }

    /// Per-edge figures over the last minute, sorted by edge, each with its
    /// routes (when an HTTPRoute routed any of its requests).
    pub fn window(&self) -> Vec<EdgeStats> {
        let w = self.windows.lock().unwrap();
        let now = self.start.elapsed().as_secs();
        let span = (now + 1).min(WINDOW_SECS) as f64;
        // Edge → route → live seconds.
        let mut edges: BTreeMap<(Direction, &str, &str), BTreeMap<&str, Vec<&Second>>> =
            BTreeMap::new();
        for (key, secs) in w.iter() {
            let live: Vec<&Second> = secs
                .iter()
                .filter(|s| now.saturating_sub(s.at) < WINDOW_SECS)
                .collect();
            if live.iter().all(|s| s.requests == 0) {
                continue;
            }
            edges
                .entry((key.direction, &key.source, &key.destination))
                .or_default()
                .insert(&key.route, live);
        }
        edges
            .into_iter()
            .map(|((direction, source, destination), routes)| {
                let all: Vec<&Second> = routes.values().flatten().copied().collect();
                let routed = routes.keys().any(|r| !r.is_empty());
                EdgeStats {
                    direction: direction.as_str(),
                    source: source.to_string(),
                    destination: destination.to_string(),
                    figures: figures(&all, span),
                    routes: if routed {
                        routes
                            .iter()
                            .map(|(route, secs)| RouteStats {
                                route: route.to_string(),
                                figures: figures(secs, span),
                            })
                            .collect()
                    } else {
                        Vec::new()
                    },
                }
            })
            .collect()
    }
}

/// The figures of `secs` over `span` seconds.
fn figures(secs: &[&Second], span: f64) -> Figures {
    let requests: u64 = secs.iter().map(|s| s.requests).sum();
    let ok: u64 = secs.iter().map(|s| s.ok).sum();
    let mut hist = [0u64; LAT_BUCKETS];
    for s in secs {
        for (h, v) in hist.iter_mut().zip(s.latency.iter()) {
            *h += u64::from(*v);
        }
    }
    Figures {
        requests,
        rps: requests as f64 / span,
        success_rate: if requests == 0 {
            0.0
        } else {
            ok as f64 / requests as f64
        },
        failed: secs.iter().map(|s| s.failed).sum(),
        denied: secs.iter().map(|s| s.denied).sum(),
        rate_limited: secs.iter().map(|s| s.rate_limited).sum(),
        p50_ms: percentile(&hist, requests, 0.50),
        p95_ms: percentile(&hist, requests, 0.95),
        p99_ms: percentile(&hist, requests, 0.99),
    }
}

/// The `grpc-status` a response head carries for a gRPC call (`None` for
/// other calls).
fn stats_grpc(grpc_call: bool, headers: &HeaderMap) -> Option<u32> {
    if grpc_call {
        grpc_status(headers)
    } else {
        None
    }
}

/// Whether `headers` say `application/grpc` (any `+format` suffix).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_type(v.as_bytes()))
}

/// Whether a `content-type` value is `application/grpc` (any `+format`
/// suffix or parameters).
pub fn is_grpc_type(v: &[u8]) -> bool {
    v.get(..16)
        .is_some_and(|p| p.eq_ignore_ascii_case(b"application/grpc"))
        && matches!(v.get(16), None | Some(b'+' | b';'))
}

/// `grpc-status` as a name: a lookup by `&str` parses the name first.
const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `grpc-status` in `headers`, if any and numeric.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A request's outcome, recorded once its response body finishes.
struct Pending {
    stats: Arc<Stats>,
    x: Exchange,
    status: u16,
    latency: Duration,
    grpc: Option<u32>,
    /// A gRPC answer without `grpc-status` in its head: the trailers say.
    trailers_due: bool,
    shoal_error: String,
    response_bytes: u64,
}

impl Pending {
    fn finish(self) {
        let s = &self.stats;
        let x = &self.x;
        let route = s.route_label(&x.route);
        let grpc = if x.grpc_call { self.grpc } else { None };
        let h = s.handles(&x.edge, &route, self.status, grpc);
        let classification = s.record_with(&h, self.latency);
        let (endpoint, attempts, retries, request_bytes) = x.edge.trace.read();
        h.request_bytes.inc_by(request_bytes);
        h.response_bytes.inc_by(self.response_bytes);
        if retries > 0 {
            s.retries
                .get_or_create(&RetryLabels {
                    direction: x.edge.direction.as_str().into(),
                    source: x.edge.source.clone(),
                    destination: x.edge.destination.clone(),
                    outcome: classification.as_str(),
                })
                .inc_by(u64::from(retries));
        }
        let log = x.access_log.logs(classification.as_str());
        // Nobody listening and nothing to log: no event is built.
        let tapped = s.tapped();
        if !log && !tapped {
            return;
        }
        let event = Event {
            time: access::now_rfc3339(),
            direction: x.edge.direction.as_str().into(),
            source: x.edge.source.clone(),
            service: x.edge.destination.clone(),
            route: x.route.clone(),
            endpoint,
            method: x.method.clone(),
            path: access::event_path(&x.path),
            status: self.status,
            grpc_status: grpc,
            classification: classification.as_str().into(),
            attempts,
            duration_ms: (x.start.elapsed().as_secs_f64() * 1e6).round() / 1e3,
            request_bytes,
            response_bytes: self.response_bytes,
            shoal_error: self.shoal_error.clone(),
        };
        if log {
            event.log();
        }
        if tapped {
            let _ = s.tap.send(Arc::new(event));
        }
    }
}

/// A response body that records its request once it finishes, with the
/// `grpc-status` trailer of a gRPC answer and the bytes it carried.
struct Watched {
    inner: ProxyBody,
    pending: Option<Pending>,
}

impl Body for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(p) = self.pending.as_mut() {
                    if let Some(d) = frame.data_ref() {
                        p.response_bytes += d.len() as u64;
                    } else if let Some(t) = frame.trailers_ref()
                        && p.trailers_due
                    {
                        p.grpc = Some(grpc_status(t).unwrap_or(2));
                    }
                }
                if self.inner.is_end_stream()
                    && let Some(p) = self.pending.take()
                {
                    p.ended();
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = self.pending.take() {
                    p.ended();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut p) = self.pending.take() {
                    if p.trailers_due {
                        // The stream broke: the caller sees UNAVAILABLE.
                        p.grpc = p.grpc.or(Some(14));
                    }
                    p.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Pending {
    /// The body ended: a gRPC answer that owed trailers and sent none
    /// counts as UNKNOWN (2).
    fn ended(mut self) {
        if self.trailers_due {
            self.grpc = self.grpc.or(Some(2));
        }
        self.finish();
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            if self.inner.is_end_stream() {
                p.ended();
            } else {
                // Dropped before the end (the caller went away): what was seen.
                p.finish();
            }
        }
    }
}

/// Decrements an in-flight gauge on drop.
pub struct InFlightGuard(Gauge);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn bucket(latency: Duration) -> usize {
    let us = latency.as_secs_f64() * 1e6;
    if us < 1.0 {
        return 0;
    }
    ((us.ln() / LAT_BASE.ln()).floor() as usize + 1).min(LAT_BUCKETS - 1)
}

/// The upper edge of the bucket holding quantile `q`, in ms.
fn percentile(hist: &[u64; LAT_BUCKETS], total: u64, q: f64) -> f64 {
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in hist.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let upper_us = LAT_BASE.powi(i as i32);
            return (upper_us / 1000.0 * 1000.0).round() / 1000.0;
        }
    }
    0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_counts_grpc_statuses_and_denials() {
        use Classification::*;
        assert_eq!(Classification::of(200, None), Success);
        assert_eq!(Classification::of(404, None), Success);
        assert_eq!(Classification::of(200, Some(0)), Success);
        assert_eq!(Classification::of(200, Some(5)), Failure);
        assert_eq!(Classification::of(200, Some(14)), Failure);
        assert_eq!(Classification::of(503, None), Failure);
        assert_eq!(Classification::of(403, None), Denied);
        assert_eq!(Classification::of(200, Some(7)), Denied);
        assert_eq!(Classification::of(429, None), RateLimited);
        assert_eq!(Classification::of(200, Some(8)), RateLimited);
        assert!(is_grpc_type(b"application/grpc"));
        assert!(is_grpc_type(b"application/grpc+proto"));
        assert!(is_grpc_type(b"Application/GRPC; charset=x"));
        assert!(!is_grpc_type(b"application/grpc-web"));
        assert!(!is_grpc_type(b"application/json"));
    }

    fn edge() -> Edge {
        Edge {
            direction: Direction::Outbound,
            source: "a".into(),
            destination: "b".into(),
            trace: Arc::default(),
        }
    }

    #[test]
    fn window_percentiles_and_success_rate() {
        let mut reg = Registry::default();
        let s = Stats::new(&mut reg);
        let e = edge();
        for i in 0..100u64 {
            let status = if i < 10 { 503 } else { 200 };
            s.record(&e, "", status, None, Duration::from_millis(i + 1));
        }
        for _ in 0..5 {
            s.record(&e, "", 200, Some(5), Duration::from_millis(50));
            s.record(&e, "", 403, None, Duration::from_millis(50));
        }
        let w = s.window();
        assert_eq!(w.len(), 1);
        let f = &w[0].figures;
        assert_eq!(f.requests, 110);
        assert!((f.success_rate - 90.0 / 110.0).abs() < 1e-9);
        assert_eq!((f.failed, f.denied, f.rate_limited), (15, 5, 0));
        assert!((45.0..=56.0).contains(&f.p50_ms), "{:?}", w[0]);
        assert!((94.0..=110.0).contains(&f.p99_ms), "{:?}", w[0]);
        assert!(w[0].routes.is_empty(), "no HTTPRoute, no route rows");
    }

    #[test]
    fn routes_split_an_edge_and_their_labels_are_capped() {
        let mut reg = Registry::default();
        let s = Stats::new(&mut reg);
        let e = edge();
        for _ in 0..3 {
            s.record(&e, "canary", 503, None, Duration::from_millis(1));
        }
        s.record(&e, "", 200, None, Duration::from_millis(1));
        let w = s.window();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].figures.requests, 4);
        let routes: Vec<(&str, u64, u64)> = w[0]
            .routes
            .iter()
            .map(|r| (r.route.as_str(), r.figures.requests, r.figures.failed))
            .collect();
        assert_eq!(routes, [("", 1, 0), ("canary", 3, 3)]);
        for i in 0..MAX_ROUTE_LABELS {
            assert_eq!(s.route_label(&format!("r{i}")), format!("r{i}"));
        }
        assert_eq!(s.route_label("one-too-many"), "overflow");
        assert_eq!(s.route_label("r7"), "r7", "a known route keeps its label");
        assert_eq!(s.route_label(""), "");
    }
}
