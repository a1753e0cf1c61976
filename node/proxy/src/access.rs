//! One event per proxied request, built when its response body finishes
//! (ends, fails or is dropped): the access log (`--access-log
//! off|errors|all`, `tracing` target `shoal::access`) and the live tap
//! (`GET /v1/tap` on the admin API) both read it.
//!
//! The tap is a bounded `tokio::sync::broadcast` channel: while nobody
//! listens, no event is built for it (one atomic load per request); a
//! listener that falls behind loses the oldest events and is told how many,
//! and never slows a request.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::frame::{BoxError, ProxyBody};

/// Events a tap listener may fall behind by before it loses the oldest.
pub const TAP_CAPACITY: usize = 1024;
/// Longest path an event carries (longer ones are cut, marked with `…`).
const MAX_PATH: usize = 256;

/// A tap listener: every request's [`Event`] from its subscription on.
/// While none exists, finishing a request checks one atomic counter and
/// builds no event for the tap.
pub struct TapReceiver {
    rx: broadcast::Receiver<Arc<Event>>,
    listeners: Arc<AtomicUsize>,
}

impl TapReceiver {
    pub(crate) fn new(rx: broadcast::Receiver<Arc<Event>>, listeners: Arc<AtomicUsize>) -> Self {
        listeners.fetch_add(1, Ordering::Relaxed);
        TapReceiver { rx, listeners }
    }

    /// The next event; `Err(Lagged(n))` when this listener fell more than
    /// [`TAP_CAPACITY`] events behind and lost the `n` oldest.
    pub async fn recv(&mut self) -> Result<Arc<Event>, broadcast::error::RecvError> {
        self.rx.recv().await
    }

    /// [`TapReceiver::recv`] for a thread outside the runtime.
    pub fn blocking_recv(&mut self) -> Result<Arc<Event>, broadcast::error::RecvError> {
        self.rx.blocking_recv()
    }
}

impl Drop for TapReceiver {
    fn drop(&mut self) {
        self.listeners.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Which requests get an access-log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// None.
    Off,
    /// Requests not classified `success`: failures (5xx, a `grpc-status`
    /// other than 0), denials (403, `grpc-status` 7) and rate limits (429,
    /// `grpc-status` 8).
    #[default]
    Errors,
    /// Every request.
    All,
}

impl AccessLog {
    /// Whether a request classified `classification` is logged.
    pub fn logs(self, classification: &str) -> bool {
        match self {
            AccessLog::Off => false,
            AccessLog::Errors => classification != "success",
            AccessLog::All => true,
        }
    }
}

/// What happened to one request, as the access log and the tap show it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    /// When the response finished, RFC 3339 UTC with milliseconds.
    pub time: String,
    /// `outbound` (from a local app) or `inbound` (to a local instance).
    pub direction: String,
    /// The calling service (`unknown` when it names none).
    pub source: String,
    /// The called service (`unknown` when no node serves it).
    pub service: String,
    /// The HTTPRoute that routed the request, or "" (outbound only).
    pub route: String,
    /// The node whose instance served the last attempt, or "" when no
    /// endpoint was tried.
    pub endpoint: String,
    /// HTTP method.
    pub method: String,
    /// Request path, without the query.
    pub path: String,
    /// HTTP status the caller got.
    pub status: u16,
    /// The `grpc-status` of a gRPC call (trailers or trailers-only head).
    pub grpc_status: Option<u32>,
    /// `success`, `failure`, `denied` or `rate_limited` (what the metrics count).
    pub classification: String,
    /// Attempts sent (retries included; 0 when the mesh answered itself).
    pub attempts: u32,
    /// From the request head until the response body finished, ms.
    pub duration_ms: f64,
    /// Request body bytes read from the caller.
    pub request_bytes: u64,
    /// Response body bytes sent to the caller.
    pub response_bytes: u64,
    /// The `shoal-error` code when the mesh answered itself, else "".
    pub shoal_error: String,
}

impl Event {
    /// Writes the event as one `shoal::access` line: JSON fields under
    /// `--log-format json`, `key=value` otherwise.
    pub fn log(&self) {
        tracing::info!(
            target: "shoal::access",
            direction = %self.direction,
            source = %self.source,
            service = %self.service,
            route = %self.route,
            endpoint = %self.endpoint,
            method = %self.method,
            path = %self.path,
            status = self.status,
            grpc_status = self.grpc_status,
            classification = %self.classification,
            attempts = self.attempts,
            duration_ms = self.duration_ms,
            request_bytes = self.request_bytes,
            response_bytes = self.response_bytes,
            shoal_error = %self.shoal_error,
            "request"
        );
    }
}

/// What the request path learns about one request while it runs: the
/// endpoint and attempt number of the latest attempt, retries sent, and
/// request body bytes read.
#[derive(Debug, Default)]
pub struct Trace {
    endpoint: Mutex<String>,
    attempts: AtomicU32,
    retries: AtomicU32,
    request_bytes: AtomicU64,
}

impl Trace {
    /// Attempt number `n` (1-based) goes to `node`.
    pub fn attempt(&self, node: &str, n: u32) {
        let mut e = self.endpoint.lock().unwrap();
        if *e != node {
            node.clone_into(&mut e);
        }
        self.attempts.store(n, Ordering::Relaxed);
    }

    /// A retry was sent.
    pub fn retried(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` request body bytes were read.
    pub fn request_bytes(&self, n: usize) {
        self.request_bytes.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `body`, counting its data bytes into this trace as they are read.
    pub fn count_request<B>(self: &Arc<Self>, body: B) -> ProxyBody
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Counted {
            inner: body.map_err(Into::into).boxed_unsync(),
            trace: self.clone(),
        }
        .boxed_unsync()
    }

    /// (endpoint, attempts, retries, request bytes).
    pub(crate) fn read(&self) -> (String, u32, u32, u64) {
        (
            self.endpoint.lock().unwrap().clone(),
            self.attempts.load(Ordering::Relaxed),
            self.retries.load(Ordering::Relaxed),
            self.request_bytes.load(Ordering::Relaxed),
        )
    }
}

/// A request body that counts its bytes into a [`Trace`].
struct Counted {
    inner: ProxyBody,
    trace: Arc<Trace>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.trace.request_bytes(d.remaining());
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

/// A path for an event: no query, at most [`MAX_PATH`] bytes.
pub(crate) fn event_path(uri_path: &str) -> String {
    let p = uri_path.split('?').next().unwrap_or("/");
    if p.len() <= MAX_PATH {
        return p.to_string();
    }
    let mut end = MAX_PATH;
    while !p.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &p[..end])
}

/// Which events a tap listener wants.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TapFilter {
    /// Only requests whose source or destination service is this.
    pub service: Option<String>,
    /// Only these statuses.
    pub status: Option<StatusFilter>,
}

/// `--status`: a class (`5xx`) or one code (`503`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatusFilter {
    /// `Nxx`: statuses N00–N99.
    Class(u16),
    /// One status.
    Code(u16),
}

impl StatusFilter {
    /// Parses `5xx` or `503`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        let bad = || format!("status filter {s:?}: use a class like 5xx or a code like 503");
        if let Some(d) = s.strip_suffix("xx") {
            return match d.parse::<u16>() {
                Ok(n @ 1..=5) if d.len() == 1 => Ok(StatusFilter::Class(n)),
                _ => Err(bad()),
            };
        }
        match s.parse::<u16>() {
            Ok(n @ 100..=599) if s.len() == 3 => Ok(StatusFilter::Code(n)),
            _ => Err(bad()),
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Code(c) => status == c,
        }
    }
}

impl TapFilter {
    /// Whether `e` passes.
    pub fn matches(&self, e: &Event) -> bool {
        self.service
            .as_deref()
            .is_none_or(|s| e.service == s || e.source == s)
            && self.status.is_none_or(|f| f.matches(e.status))
    }
}

/// Now as RFC 3339 UTC with milliseconds (`2026-12-02T05:36:49.123Z`).
pub(crate) fn now_rfc3339() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_millis())
}

fn rfc3339(secs: u64, ms: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // date -u -d @1796189809 → Wed Dec  2 05:36:49 UTC 2026
        assert_eq!(rfc3339(1_796_189_809, 7), "2026-12-02T05:36:49.007Z");
        // A leap day.
        assert_eq!(rfc3339(951_782_400, 999), "2000-02-29T00:00:00.999Z");
    }

    #[test]
    fn status_filters_parse_and_match() {
        let f = StatusFilter::parse("5xx").unwrap();
        assert!(f.matches(503) && f.matches(500) && !f.matches(404));
        let f = StatusFilter::parse("404").unwrap();
        assert!(f.matches(404) && !f.matches(403));
        for bad in ["6xx", "55xx", "xx", "5", "abc", "1000", "099"] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn access_log_modes() {
        assert!(!AccessLog::Off.logs("failure"));
        assert!(AccessLog::Errors.logs("failure") && AccessLog::Errors.logs("denied"));
        assert!(AccessLog::Errors.logs("rate_limited") && !AccessLog::Errors.logs("success"));
        assert!(AccessLog::All.logs("success"));
    }

    #[test]
    fn event_paths_drop_the_query_and_are_capped() {
        assert_eq!(event_path("/a/b?token=secret"), "/a/b");
        let long = format!("/{}", "é".repeat(300));
        let p = event_path(&long);
        assert!(p.len() <= MAX_PATH + '…'.len_utf8() && p.ends_with('…'));
    }
}
