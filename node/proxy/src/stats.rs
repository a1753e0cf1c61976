//! Golden signals per edge (direction, source service, destination service):
//! Prometheus families registered in the node's registry, and a one-minute
//! window per edge for `GET /v1/stats` (rps, success rate, p50/p95/p99).
//!
//! Labels are bounded: services come from certificates and gossip, never from
//! request paths; a request for an unknown service counts as `unknown`.

use std::collections::HashMap;
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

use crate::frame::{BoxError, ProxyBody};

/// Seconds kept per edge for `/v1/stats`.
const WINDOW_SECS: u64 = 60;
/// Latency buckets of the window histogram: bucket `i` holds latencies
/// below `1.1^i` microseconds (about ±5% precision up to ~100 s).
const LAT_BUCKETS: usize = 200;
const LAT_BASE: f64 = 1.1;

/// Which side of the node a request crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From a local app into the mesh.
    Outbound,
    /// From the mesh to a local instance.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
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
struct ResponseLabels {
    direction: String,
    source: String,
    destination: String,
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

/// An edge: who called whom, seen from which side.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Edge {
    /// Side of the node.
    pub direction: Direction,
    /// Calling service.
    pub source: String,
    /// Called service.
    pub destination: String,
}

impl Edge {
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

/// The proxy's golden signals.
pub struct Stats {
    start: Instant,
    requests: Family<ClassLabels, Counter>,
    responses: Family<ResponseLabels, Counter>,
    duration: Family<ClassLabels, Histogram>,
    retries: Family<EdgeLabels, Counter>,
    in_flight: Family<EdgeLabels, Gauge>,
    peer_rtt: Family<PeerLabels, Gauge<f64, AtomicU64>>,
    peer_not_serving: Family<ServiceLabels, Counter>,
    windows: Mutex<HashMap<Edge, Vec<Second>>>,
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
    /// Requests in the window.
    pub requests: u64,
    /// Requests per second over the window.
    pub rps: f64,
    /// Share of requests classified `success` (below 500, not 403 or 429,
    /// and `grpc-status` 0 or none).
    pub success_rate: f64,
    /// Requests classified `failure` (5xx, or a `grpc-status` other than 0).
    pub failed: u64,
    /// Requests denied (403, or `grpc-status` 7).
    pub denied: u64,
    /// Requests rate limited (429, or `grpc-status` 8).
    pub rate_limited: u64,
    /// Latency percentiles, ms.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
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
            retries: Family::default(),
            in_flight: Family::default(),
            peer_rtt: Family::default(),
            peer_not_serving: Family::default(),
            windows: Mutex::new(HashMap::new()),
        };
        registry.register(
            "proxy_requests",
            "Proxied requests by direction, source and destination service, and status class",
            s.requests.clone(),
        );
        registry.register(
            "proxy_responses",
            "Proxied responses by direction, source and destination service, HTTP status code, gRPC status (gRPC calls only) and classification (success, failure, denied, rate_limited)",
            s.responses.clone(),
        );
        registry.register(
            "proxy_request_duration_seconds",
            "Proxied request latency until the response head, seconds",
            s.duration.clone(),
        );
        registry.register(
            "proxy_retries",
            "Retries sent by the outbound proxy",
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

    /// Records a finished request: `status` is the HTTP status, `grpc` the
    /// `grpc-status` when the exchange was a gRPC call that carried one.
    pub fn record(&self, edge: &Edge, status: u16, grpc: Option<u32>, latency: Duration) {
        let class = format!("{}xx", status / 100);
        let classification = Classification::of(status, grpc);
        let l = ClassLabels {
            direction: edge.direction.as_str().into(),
            source: edge.source.clone(),
            destination: edge.destination.clone(),
            class,
        };
        self.requests.get_or_create(&l).inc();
        self.duration
            .get_or_create(&l)
            .observe(latency.as_secs_f64());
        self.responses
            .get_or_create(&ResponseLabels {
                direction: l.direction,
                source: l.source,
                destination: l.destination,
                status_code: status.to_string(),
                grpc_status: grpc.map(|g| g.to_string()).unwrap_or_default(),
                classification: classification.as_str(),
            })
            .inc();
        let mut w = self.windows.lock().unwrap();
        // Read the clock under the lock: a reading taken before it could be
        // older than the second another thread has just pushed.
        let now = self.start.elapsed().as_secs();
        let secs = w.entry(edge.clone()).or_default();
        secs.retain(|s| now.saturating_sub(s.at) < WINDOW_SECS);
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
    }

    /// Records `resp`, the answer to a request on `edge` that took `latency`
    /// until its head. A gRPC response (the call was gRPC and the answer is
    /// `application/grpc`) whose head carries no `grpc-status` is recorded
    /// when its trailers arrive (or the body ends or is dropped), with the
    /// trailers' `grpc-status`; a body that ends without one counts as
    /// UNKNOWN (2).
    pub fn record_response(
        self: &Arc<Self>,
        edge: &Edge,
        grpc_call: bool,
        resp: Response<ProxyBody>,
        latency: Duration,
    ) -> Response<ProxyBody> {
        let status = resp.status().as_u16();
        let head_grpc = grpc_status(resp.headers());
        let grpc_answer = grpc_call && is_grpc(resp.headers());
        if !grpc_answer || head_grpc.is_some() {
            self.record(edge, status, head_grpc.filter(|_| grpc_call), latency);
            return resp;
        }
        let pending = Pending {
            stats: self.clone(),
            edge: edge.clone(),
            status,
            latency,
            grpc: None,
        };
        resp.map(|inner| {
            Watched {
                inner,
                pending: Some(pending),
            }
            .boxed_unsync()
        })
    }

    /// Counts a retry.
    pub fn retry(&self, edge: &Edge) {
        self.retries.get_or_create(&edge.labels()).inc();
    }

    /// Counts a request in flight until the guard drops.
    pub fn in_flight(self: &Arc<Self>, edge: &Edge) -> InFlightGuard {
        let g = self.in_flight.get_or_create(&edge.labels()).clone();
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

    /// Per-edge figures over the last minute, sorted by edge.
    pub fn window(&self) -> Vec<EdgeStats> {
        let w = self.windows.lock().unwrap();
        let now = self.start.elapsed().as_secs();
        let span = (now + 1).min(WINDOW_SECS) as f64;
        let mut out: Vec<EdgeStats> = w
            .iter()
            .filter_map(|(edge, secs)| {
                let secs: Vec<&Second> = secs
                    .iter()
                    .filter(|s| now.saturating_sub(s.at) < WINDOW_SECS)
                    .collect();
                let requests: u64 = secs.iter().map(|s| s.requests).sum();
                if requests == 0 {
                    return None;
                }
                let ok: u64 = secs.iter().map(|s| s.ok).sum();
                let failed: u64 = secs.iter().map(|s| s.failed).sum();
                let denied: u64 = secs.iter().map(|s| s.denied).sum();
                let rate_limited: u64 = secs.iter().map(|s| s.rate_limited).sum();
                let mut hist = [0u64; LAT_BUCKETS];
                for s in &secs {
                    for (h, v) in hist.iter_mut().zip(s.latency.iter()) {
                        *h += u64::from(*v);
                    }
                }
                Some(EdgeStats {
                    direction: edge.direction.as_str(),
                    source: edge.source.clone(),
                    destination: edge.destination.clone(),
                    requests,
                    rps: requests as f64 / span,
                    success_rate: ok as f64 / requests as f64,
                    failed,
                    denied,
                    rate_limited,
                    p50_ms: percentile(&hist, requests, 0.50),
                    p95_ms: percentile(&hist, requests, 0.95),
                    p99_ms: percentile(&hist, requests, 0.99),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (a.direction, &a.source, &a.destination).cmp(&(b.direction, &b.source, &b.destination))
        });
        out
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

/// The `grpc-status` in `headers`, if any and numeric.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A gRPC response's outcome, recorded once its trailers are seen.
struct Pending {
    stats: Arc<Stats>,
    edge: Edge,
    status: u16,
    latency: Duration,
    grpc: Option<u32>,
}

impl Pending {
    fn finish(self) {
        self.stats
            .record(&self.edge, self.status, self.grpc, self.latency);
    }
}

/// A gRPC response body that records its `grpc-status` trailer.
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
                if let Some(t) = frame.trailers_ref()
                    && let Some(p) = self.pending.as_mut()
                {
                    p.grpc = Some(grpc_status(t).unwrap_or(2));
                }
            }
            Poll::Ready(None) => {
                if let Some(mut p) = self.pending.take() {
                    p.grpc = p.grpc.or(Some(2));
                    p.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut p) = self.pending.take() {
                    // The stream broke: the caller sees UNAVAILABLE.
                    p.grpc = p.grpc.or(Some(14));
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

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // Dropped before the end (the caller went away): what was seen.
            p.finish();
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

    #[test]
    fn window_percentiles_and_success_rate() {
        let mut reg = Registry::default();
        let s = Stats::new(&mut reg);
        let e = Edge {
            direction: Direction::Outbound,
            source: "a".into(),
            destination: "b".into(),
        };
        for i in 0..100u64 {
            let status = if i < 10 { 503 } else { 200 };
            s.record(&e, status, None, Duration::from_millis(i + 1));
        }
        for _ in 0..5 {
            s.record(&e, 200, Some(5), Duration::from_millis(50));
            s.record(&e, 403, None, Duration::from_millis(50));
        }
        let w = s.window();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].requests, 110);
        assert!((w[0].success_rate - 90.0 / 110.0).abs() < 1e-9);
        assert_eq!((w[0].failed, w[0].denied, w[0].rate_limited), (15, 5, 0));
        assert!((45.0..=56.0).contains(&w[0].p50_ms), "{:?}", w[0]);
        assert!((94.0..=110.0).contains(&w[0].p99_ms), "{:?}", w[0]);
    }
}
