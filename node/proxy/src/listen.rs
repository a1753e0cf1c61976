//! TCP listeners that hold under abuse: the outbound and `--upstream`
//! listeners and the admin API share this accept loop.
//!
//! - A connection cap: past it a new connection gets a one-shot
//!   `503 shoal-error: too-many-connections` and is closed at once; the
//!   connections already open stay.
//! - A header-read timeout: a connection must deliver a complete request head
//!   within it, from accept and again whenever an idle HTTP/1 connection
//!   starts sending the next request (slow or silent clients are closed).
//! - An idle timeout: a keep-alive connection with no request in flight and
//!   no bytes moving is closed.
//! - Accept errors (EMFILE, ENFILE, ...) back off 10 ms → 1 s instead of
//!   spinning.
//!
//! Refusals, timeouts and accept errors are counted and logged at most once a
//! second per listener (with how many were not logged).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// The one-shot answer a connection past the cap gets before it is closed.
pub(crate) const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nshoal-error: too-many-connections\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// First pause after a failed accept.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after repeated failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Time a connection has to deliver a complete request head.
    pub header_read_timeout: Duration,
    /// Time a connection may sit with no request in flight and no I/O.
    pub idle_timeout: Duration,
    /// Connections open at once; past it new ones are refused.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    listener: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    listener: String,
    reason: String,
}

/// Metric families of the node's TCP listeners.
#[derive(Clone, Default)]
pub struct ListenerMetrics {
    open: Family<ListenerLabels, Gauge>,
    refused: Family<ListenerLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    accept_errors: Family<ListenerLabels, Counter>,
}

impl ListenerMetrics {
    /// Makes the families and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = ListenerMetrics::default();
        registry.register(
            "listener_connections",
            "Open TCP connections per listener (outbound, upstream, admin)",
            m.open.clone(),
        );
        registry.register(
            "listener_refused",
            "Connections refused because the listener was at its connection cap",
            m.refused.clone(),
        );
        registry.register(
            "listener_closed",
            "Connections the node closed, by reason (header_read_timeout, idle_timeout)",
            m.closed.clone(),
        );
        registry.register(
            "listener_accept_errors",
            "Failed accepts (e.g. EMFILE at the fd limit); the listener backs off 10ms to 1s",
            m.accept_errors.clone(),
        );
        m
    }
}

/// A log line at most once a second; the lines held back are counted.
pub(crate) struct Throttle {
    start: Instant,
    /// Milliseconds since `start` of the last line, plus one (0: never).
    last: AtomicU64,
    held: AtomicU64,
}

impl Throttle {
    pub(crate) fn new() -> Self {
        Throttle {
            start: Instant::now(),
            last: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` if a line may go out now.
    pub(crate) fn allow(&self) -> Option<u64> {
        let now = self.start.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + 1000 {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.held.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.held.swap(0, Ordering::Relaxed))
    }
}

/// One listener's shared accounting: cap, metrics, throttled logs.
pub struct Guard {
    name: &'static str,
    limits: Limits,
    slots: Arc<Semaphore>,
    metrics: ListenerMetrics,
    refused_log: Throttle,
    error_log: Throttle,
}

impl Guard {
    /// A guard named `name` (the `listener` label) with its own cap.
    pub fn new(name: &'static str, limits: Limits, metrics: ListenerMetrics) -> Arc<Self> {
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        Self::sharing(name, limits, metrics, slots)
    }

    /// A guard drawing from `slots`, shared with other listeners.
    pub fn sharing(
        name: &'static str,
        limits: Limits,
        metrics: ListenerMetrics,
        slots: Arc<Semaphore>,
    ) -> Arc<Self> {
        Arc::new(Guard {
            name,
            limits,
            slots,
            metrics,
            refused_log: Throttle::new(),
            error_log: Throttle::new(),
        })
    }

    /// The connection slots (to share the cap with another listener).
    pub fn slots(&self) -> Arc<Semaphore> {
        self.slots.clone()
    }

    fn labels(&self) -> ListenerLabels {
        ListenerLabels {
            listener: self.name.into(),
        }
    }
}

/// What one connection has been doing, for its watchdog.
pub struct Activity {
    /// tokio's clock, so that tests with paused time drive the deadlines.
    start: tokio::time::Instant,
    /// Milliseconds since `start` of the last byte read or written.
    last_io: AtomicU64,
    /// Milliseconds since `start` a request head began arriving; `u64::MAX`
    /// when none is pending.
    head_since: AtomicU64,
    in_flight: AtomicU32,
    h2: AtomicBool,
}

const NONE: u64 = u64::MAX;

impl Activity {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Activity {
            start: tokio::time::Instant::now(),
            last_io: AtomicU64::new(0),
            // The first request head is due from accept on.
            head_since: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            h2: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn read(&self, n: usize) {
        if n == 0 {
            return;
        }
        let now = self.now_ms();
        self.last_io.store(now, Ordering::Relaxed);
        // Bytes on an idle HTTP/1 connection start the next request head.
        if self.in_flight.load(Ordering::Relaxed) == 0 && !self.h2.load(Ordering::Relaxed) {
            let _ =
                self.head_since
                    .compare_exchange(NONE, now, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    fn wrote(&self, n: usize) {
        if n > 0 {
            self.last_io.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A request head is complete and the request is being served: keep the
    /// returned guard as long as the request (and its response body) lives.
    pub fn begin(self: &Arc<Self>, h2: bool) -> RequestGuard {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(NONE, Ordering::Relaxed);
        RequestGuard(self.clone())
    }

    /// Requests in flight now.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// When the connection must be closed if nothing changes, and why.
    fn deadline(&self, limits: &Limits) -> Option<(Duration, &'static str)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        match self.head_since.load(Ordering::Relaxed) {
            NONE => Some((
                ms(self.last_io.load(Ordering::Relaxed)) + limits.idle_timeout,
                "idle_timeout",
            )),
            since => Some((
                ms(since) + limits.header_read_timeout,
                "header_read_timeout",
            )),
        }
    }

    /// Resolves with the reason once a deadline passes.
    ///
    /// Nothing wakes this on a change of state: it looks again when the
    /// deadline it saw is due, and at least every [`Activity::check_every`]
    /// (the shorter of the two timeouts). A deadline only appears or moves
    /// when a request ends or a head starts arriving, and either becomes
    /// visible at the next look, which is no later than the deadline it
    /// sets, so connections still close on time. Waking on every change
    /// made each request wake its connection task three more times and set
    /// two timers.
    async fn expired(&self, limits: &Limits) -> &'static str {
        let every = Self::check_every(limits);
        loop {
            let elapsed = self.start.elapsed();
            let pause = match self.deadline(limits) {
                Some((at, why)) if elapsed >= at => return why,
                Some((at, _)) => (at - elapsed).min(every),
                None => every,
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// How often [`Activity::expired`] looks at least: a deadline is never
    /// nearer than this when it appears.
    fn check_every(limits: &Limits) -> Duration {
        limits
            .header_read_timeout
            .min(limits.idle_timeout)
            .max(Duration::from_millis(1))
    }
}

/// Keeps a request counted as in flight on its connection.
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_io.store(a.now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A TCP stream that reports its reads and writes to its [`Activity`].
pub struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            self.activity.read(buf.filled().len() - before);
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            self.activity.wrote(*n);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.activity.wrote(*n);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A [`Watched`] stream with bytes already read off it put back in front:
/// how the node's own HTTP/1.1 server hands a connection to hyper.
pub struct Rewound {
    read: bytes::Bytes,
    inner: Watched,
}

impl Rewound {
    /// `inner`, whose next reads give `read` first.
    pub fn new(read: bytes::Bytes, inner: Watched) -> Self {
        Rewound { read, inner }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            let head = self.read.split_to(n);
            buf.put_slice(&head);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts on `listener` until `shutdown` flips, serving each connection
/// with `serve(stream, peer, activity)` under `guard`'s limits. `serve` must
/// hold an [`Activity::begin`] guard for every request it handles.
pub async fn accept_loop<F, Fut>(
    guard: Arc<Guard>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    serve: F,
) where
    F: Fn(Watched, SocketAddr, Arc<Activity>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let serve = Arc::new(serve);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(x) => {
                backoff = ACCEPT_BACKOFF_MIN;
                x
            }
            Err(e) => {
                guard
                    .metrics
                    .accept_errors
                    .get_or_create(&guard.labels())
                    .inc();
                if let Some(held) = guard.error_log.allow() {
                    tracing::warn!(
                        listener = guard.name,
                        error = %e,
                        not_logged = held,
                        pause = ?backoff,
                        "accept failed; backing off"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        let Ok(slot) = guard.slots.clone().try_acquire_owned() else {
            guard.metrics.refused.get_or_create(&guard.labels()).inc();
            if let Some(held) = guard.refused_log.allow() {
                tracing::warn!(
                    listener = guard.name,
                    %peer,
                    cap = guard.limits.max_connections,
                    not_logged = held,
                    "connection refused: at the connection cap"
                );
            }
            // Best effort, never waits: the refusal fits one segment.
            let _ = stream.try_write(REFUSAL);
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let activity = Activity::new();
        let io = Watched {
            inner: stream,
            activity: activity.clone(),
        };
        let guard = guard.clone();
        let serve = serve.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let open = guard.metrics.open.get_or_create(&guard.labels()).clone();
            open.inc();
            tokio::select! {
                _ = serve(io, peer, activity.clone()) => {}
                why = activity.expired(&guard.limits) => {
                    guard
                        .metrics
                        .closed
                        .get_or_create(&ClosedLabels {
                            listener: guard.name.into(),
                            reason: why.into(),
                        })
                        .inc();
                    tracing::debug!(listener = guard.name, %peer, reason = why, "connection closed");
                }
            }
            open.dec();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_allows_one_line_a_second_and_counts_the_rest() {
        let t = Throttle::new();
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        assert_eq!(t.held.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn deadlines_follow_the_connection_state() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let a = Activity::new();
        assert_eq!(
            a.deadline(&limits),
            Some((Duration::from_secs(10), "header_read_timeout"))
        );
        let g = a.begin(false);
        assert_eq!(a.deadline(&limits), None);
        drop(g);
        assert_eq!(a.deadline(&limits).unwrap().1, "idle_timeout");
        a.read(5);
        assert_eq!(a.deadline(&limits).unwrap().1, "header_read_timeout");
        let g = a.begin(true);
        drop(g);
        a.read(5);
        assert_eq!(
            a.deadline(&limits).unwrap().1,
            "idle_timeout",
            "an HTTP/2 connection's frames between requests are not a head"
        );
    }

    /// Runs `expired` on its own task; the answer is the reason and the
    /// time since the start at which it resolved.
    fn watch(
        a: &Arc<Activity>,
        limits: &Limits,
    ) -> tokio::task::JoinHandle<(&'static str, Duration)> {
        let (a, limits) = (a.clone(), limits.clone());
        let t0 = tokio::time::Instant::now();
        tokio::spawn(async move {
            let why = a.expired(&limits).await;
            (why, t0.elapsed())
        })
    }

    fn around(at: Duration, secs: f64) -> bool {
        let want = Duration::from_secs_f64(secs);
        at >= want && at <= want + Duration::from_millis(5)
    }

    const LIMITS: Limits = Limits {
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
    };

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_closes_idle_timeout_after_its_last_request_ends() {
        let a = Activity::new();
        let closed = watch(&a, &LIMITS);
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        a.read(100);
        let request = a.begin(false);
        // In flight for 25 s: longer than the header timeout, never closed.
        tokio::time::sleep(Duration::from_secs(25)).await;
        assert!(!closed.is_finished(), "closed with a request in flight");
        drop(request);
        let (why, at) = closed.await.unwrap();
        assert_eq!(why, "idle_timeout");
        assert!(
            around(at, 87.3),
            "closed after {at:?}, not 60 s after the request ended"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_starts_on_an_idle_connection_has_its_own_deadline() {
        let a = Activity::new();
        let closed = watch(&a, &LIMITS);
        tokio::time::sleep(Duration::from_millis(1_700)).await;
        a.read(100);
        drop(a.begin(false));
        // Idle until the first bytes of the next head, which never completes.
        tokio::time::sleep(Duration::from_millis(31_400)).await;
        a.read(10);
        let (why, at) = closed.await.unwrap();
        assert_eq!(why, "header_read_timeout");
        assert!(
            around(at, 43.1),
            "closed after {at:?}, not 10 s after the head began"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_sends_a_head_closes_at_the_header_timeout() {
        let a = Activity::new();
        let (why, at) = watch(&a, &LIMITS).await.unwrap();
        assert_eq!(why, "header_read_timeout");
        assert!(around(at, 10.0), "closed after {at:?}");
    }
}
