//! Opaque TCP services: a `tcp://` service's connections carried as bytes
//! over one QUIC bidirectional stream each (stream kind 0x02, see
//! `docs/FRAMES.md`).
//!
//! Calling side ([`open`], then [`Opened::splice`]): an app connection on a
//! `--upstream` listener of a TCP service (or a CONNECT tunnel,
//! `connect.rs`) chooses an endpoint with the balancer (P2C, zone first,
//! down-marking), checks the peer's certificate names the node and the
//! service, writes the kind byte and a [`TcpHead`], and waits for the
//! serving node's status byte before it reads a byte from the app. A
//! refusal (`refused`, an unreachable or lying peer) goes to another
//! endpoint; `denied` ends the connection. Then `splice.rs` pumps bytes.
//!
//! Serving side ([`serve_stream`]): the caller's certificate must name the
//! source service, AuthorizationPolicy is applied by identity only (a rule
//! with methods or paths cannot admit a TCP connection), the local instance
//! is connected, and the status byte goes back before any byte is spliced.
//!
//! Metrics: `shoal_tcp_connections_opened_total`,
//! `shoal_tcp_connections_closed_total{outcome}`, `shoal_tcp_bytes_total{flow}`,
//! `shoal_tcp_connection_duration_seconds`, `shoal_tcp_connections_open`;
//! totals per edge at `/v1/stats/tcp` ([`TcpStats::edges`]).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use quinn::{RecvStream, SendStream};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use transport::Identity;

use crate::balance::Target;
use crate::frame::{
    self, FRAME_HEAD, FrameReader, STREAM_KIND_TCP, TCP_BAD_HEAD, TCP_DENIED, TCP_FORWARDING_LOOP,
    TCP_NOT_SERVED, TCP_NOT_TCP, TCP_OK, TCP_REFUSED, TCP_UNAUTHORIZED, TCP_UNKNOWN_SERVICE,
    TcpHead,
};
use crate::local::LocalService;
use crate::splice::{Outcome, Side, Splice, Spliced, abort_tcp};
use crate::state::{Shared, peer_serves};
use crate::stats::Direction;

/// Time the serving node has to answer the status byte, and the caller to
/// send its head.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Time to connect to the local instance.
pub const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Endpoints tried per connection before giving up.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Whether `service` is a TCP service as gossip publishes it: `Some(true)`
/// when an endpoint publishes protocol `tcp`, `Some(false)` when endpoints
/// publish another, `None` while no node publishes the service.
pub(crate) fn is_tcp(shared: &Shared, service: &str) -> Option<bool> {
    let info = shared
        .services()
        .into_iter()
        .find(|s| s.service == service)?;
    if info.endpoints.is_empty() {
        return None;
    }
    Some(info.endpoints.iter().any(|e| e.record.protocol == "tcp"))
}

/// [`is_tcp`], waiting up to `wait` while the routing table is not built
/// yet (a node just started has not heard who serves what).
pub(crate) async fn wait_protocol(shared: &Shared, service: &str, wait: Duration) -> Option<bool> {
    let end = Instant::now() + wait;
    loop {
        if let Some(p) = is_tcp(shared, service) {
            return Some(p);
        }
        if shared.routes_ready() || Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// === calling side ===

/// Why no tunnel could be opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// No node in the mesh publishes the service.
    UnknownService,
    /// Every endpoint tried refused, could not be reached, or none is healthy.
    Unavailable(String),
    /// The serving node's policy does not admit this caller.
    Denied(&'static str),
}

impl OpenError {
    /// The outcome label counted for it.
    pub fn label(&self) -> &'static str {
        match self {
            OpenError::UnknownService => "unknown_service",
            OpenError::Unavailable(_) => "refused",
            OpenError::Denied(_) => "denied",
        }
    }
}

/// A tunnel whose serving node said yes: ready to splice.
pub(crate) struct Opened {
    service: String,
    node: String,
    way: Way,
    /// Keeps the connection counted on the endpoint (P2C) while it lives.
    _in_flight: Box<dyn std::any::Any + Send>,
}

enum Way {
    Mesh(SendStream, RecvStream),
    /// The instance is behind this node: a direct TCP connection (counted
    /// among the node's own dials while it lives).
    Local(TcpStream, crate::own::Dialled),
}

/// Opens a tunnel to `service` for an app connection: chooses endpoints
/// until one serving node answers `ok` (at most [`MAX_CONNECT_ATTEMPTS`]).
/// Nothing is read from the app before this returns.
pub(crate) async fn open(
    shared: &Shared,
    service: &str,
    authority: &str,
    client: Option<std::net::SocketAddr>,
) -> Result<Opened, OpenError> {
    let Some(_) = shared.targets(service) else {
        return Err(OpenError::UnknownService);
    };
    let mut rng = shared.rng.request();
    let mut exclude: Vec<String> = Vec::new();
    let mut last = "the service has no healthy endpoint".to_string();
    let source = shared.source_service();
    for attempt in 1..=MAX_CONNECT_ATTEMPTS as u32 {
        let targets = shared.targets(service).unwrap_or_else(|| Arc::new([]));
        let now = Instant::now();
        let Ok(i) = shared.balancer.choose(&targets, &exclude, now, &mut rng) else {
            break;
        };
        let target = &targets[i];
        exclude.push(target.node.clone());
        let head = TcpHead {
            service: service.to_string(),
            source: source.clone(),
            attempt,
            authority: authority.to_string(),
            client: client.map(|c| c.to_string()).unwrap_or_default(),
        };
        let guard = target.state.start();
        let started = Instant::now();
        match try_endpoint(shared, target, &head).await {
            Ok(way) => {
                shared
                    .balancer
                    .success_at(&target.state, started.elapsed(), Instant::now());
                return Ok(Opened {
                    service: service.to_string(),
                    node: target.node.clone(),
                    way,
                    _in_flight: Box::new(guard),
                });
            }
            Err(Tried::Down(msg)) => {
                tracing::debug!(%service, node = %target.node, error = %msg, "tcp: endpoint unreachable; marking it down");
                shared.balancer.down_at(&target.state, Instant::now());
                last = msg;
            }
            Err(Tried::Refused(msg)) => {
                tracing::debug!(%service, node = %target.node, reason = %msg, "tcp: endpoint refused; trying another");
                shared
                    .balancer
                    .failure_at(service, &target.state, Instant::now());
                last = msg;
            }
            Err(Tried::NotServing(peer)) => {
                shared.refuse(target, &peer);
                last = "the peer's certificate does not name the service".into();
            }
            Err(Tried::Final(status)) => {
                return Err(OpenError::Denied(frame::tcp_status_name(status)));
            }
        }
    }
    Err(OpenError::Unavailable(last))
}

enum Tried {
    /// Could not reach the peer (dial, stream, handshake).
    Down(String),
    /// The peer answered a refusal another endpoint may not give.
    Refused(String),
    /// The peer's certificate does not name the service or the node.
    NotServing(Arc<Identity>),
    /// A refusal that holds everywhere (policy).
    Final(u8),
}

async fn try_endpoint(shared: &Shared, target: &Target, head: &TcpHead) -> Result<Way, Tried> {
    if target.is_self {
        let identity = shared.endpoint.identity();
        return match admit(shared, &identity, true, head).await {
            Ok((local, dialled)) => Ok(Way::Local(local, dialled)),
            Err(s @ (TCP_DENIED | TCP_UNAUTHORIZED)) => Err(Tried::Final(s)),
            Err(s) => Err(Tried::Refused(frame::tcp_status_name(s).into())),
        };
    }
    let down = |e: String| Tried::Down(e);
    let conn = shared
        .endpoint
        .connect(target.addr)
        .await
        .map_err(|e| down(e.to_string()))?;
    if !peer_serves(&conn.peer, target) {
        return Err(Tried::NotServing(conn.peer));
    }
    let (conn, mut send, mut recv) = shared
        .endpoint
        .open_bi(target.addr)
        .await
        .map_err(|e| down(e.to_string()))?;
    if !peer_serves(&conn.peer, target) {
        let _ = send.reset(frame::RESET_CANCEL.into());
        return Err(Tried::NotServing(conn.peer));
    }
    let payload = head.encode().map_err(|e| down(e.to_string()))?;
    let mut buf = BytesMut::with_capacity(6 + payload.len());
    buf.put_u8(STREAM_KIND_TCP);
    buf.put_u8(FRAME_HEAD);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(&payload);
    let handshake = async {
        send.write_all(&buf)
            .await
            .map_err(|e| down(e.to_string()))?;
        let mut status = [0u8; 1];
        recv.read_exact(&mut status)
            .await
            .map_err(|e| down(format!("no status: {e}")))?;
        Ok::<u8, Tried>(status[0])
    };
    let status = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(r) => r?,
        Err(_) => {
            let _ = send.reset(frame::RESET_CANCEL.into());
            return Err(down("no status before the handshake timeout".into()));
        }
    };
    match status {
        TCP_OK => Ok(Way::Mesh(send, recv)),
        TCP_DENIED | TCP_UNAUTHORIZED => Err(Tried::Final(status)),
        s => Err(Tried::Refused(frame::tcp_status_name(s).into())),
    }
}

impl Opened {
    /// The node serving the tunnel.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Splices the app connection `io` with the tunnel until it ends;
    /// counts it on the outbound edge.
    pub async fn splice<T>(self, shared: &Shared, io: T) -> Spliced
    where
        T: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let source = match shared.source_service() {
            s if s.is_empty() => "unknown".to_string(),
            s => s,
        };
        let open = shared
            .tcp
            .opened(Direction::Outbound, &source, &self.service);
        let idle = shared.config.tcp_idle_timeout;
        let done = match self.way {
            Way::Mesh(send, recv) => Splice::new(idle).run_io(io, send, recv).await,
            Way::Local(local, _dialled) => splice_local(idle, io, local).await,
        };
        shared.tcp.closed(open, &done);
        done
    }
}

/// A tunnel to an instance behind this node: TCP to TCP, no QUIC, with the
/// same idle timeout.
async fn splice_local<T>(idle: Duration, io: T, local: TcpStream) -> Spliced
where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut app = Touching {
        inner: io,
        start,
        last: last.clone(),
    };
    let mut local = Touching {
        inner: local,
        start,
        last: last.clone(),
    };
    let copy = tokio::io::copy_bidirectional(&mut app, &mut local);
    let watch = async {
        loop {
            let since = Duration::from_nanos(last.load(Ordering::Relaxed));
            let due = since + idle;
            let now = start.elapsed();
            if now >= due {
                return;
            }
            tokio::time::sleep(due - now).await;
        }
    };
    let (outcome, (up, down), detail) = tokio::select! {
        r = copy => match r {
            Ok(n) => (Outcome::Clean, n, None),
            Err(e) => (Outcome::Reset(Side::Local), (0, 0), Some(e.to_string())),
        },
        _ = watch => (Outcome::Idle, (0, 0), None),
    };
    Spliced {
        local_to_mesh: up,
        mesh_to_local: down,
        outcome,
        detail,
        duration: start.elapsed(),
    }
}

/// A stream that notes when bytes last moved through it.
struct Touching<T> {
    inner: T,
    start: Instant,
    last: Arc<AtomicU64>,
}

impl<T> Touching<T> {
    fn touch(&self) {
        let now = self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.store(now, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touching<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touching<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves one app connection on a `--upstream` listener of TCP `service`.
pub(crate) async fn serve_connection<T>(
    shared: &Shared,
    service: &str,
    io: T,
    client: std::net::SocketAddr,
) where
    T: AsyncRead + AsyncWrite + Send + Unpin,
{
    let (_count, _) = shared.outbound_request();
    let source = match shared.source_service() {
        s if s.is_empty() => "unknown".to_string(),
        s => s,
    };
    match open(shared, service, "", Some(client)).await {
        Ok(opened) => {
            let node = opened.node().to_string();
            let done = opened.splice(shared, io).await;
            tracing::debug!(%service, %node, outcome = done.outcome.label(), sent = done.local_to_mesh, received = done.mesh_to_local, detail = done.detail.as_deref().unwrap_or(""), "tcp connection ended");
        }
        Err(e) => {
            tracing::debug!(%service, error = ?e, "tcp: no tunnel; closing the app connection");
            shared
                .tcp
                .refused(Direction::Outbound, &source, service, e.label());
            // Dropping `io` closes the app's connection at once.
        }
    }
}

// === serving side ===

/// Serves a peer-opened stream of kind [`STREAM_KIND_TCP`] (the kind byte
/// already read by `reader`).
pub(crate) async fn serve_stream(
    shared: Arc<Shared>,
    caller: Arc<Identity>,
    peer_addr: std::net::SocketAddr,
    mut reader: FrameReader,
    mut send: SendStream,
) {
    let head: TcpHead = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.tcp_head()).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, peer = %caller, "tcp: bad head");
            let _ = send.write_all(&[TCP_BAD_HEAD]).await;
            let _ = send.finish();
            reader.stop(frame::RESET_ERROR);
            return;
        }
        Err(_) => {
            let _ = send.reset(frame::RESET_CANCEL.into());
            reader.stop(frame::RESET_CANCEL);
            return;
        }
    };
    let source = if head.source.is_empty() {
        "unknown".to_string()
    } else {
        head.source.clone()
    };
    let destination = if shared.local.contains_key(&head.service) {
        head.service.clone()
    } else {
        "unknown".to_string()
    };
    let caller_on_loopback = peer_addr.ip().is_loopback();
    let (local, _dialled) = match admit(&shared, &caller, caller_on_loopback, &head).await {
        Ok(l) => l,
        Err(status) => {
            tracing::debug!(service = %head.service, peer = %caller, status = frame::tcp_status_name(status), "tcp: connection refused");
            shared.tcp.refused(
                Direction::Inbound,
                &source,
                &destination,
                &frame::tcp_status_name(status).replace('-', "_"),
            );
            let _ = send.write_all(&[status]).await;
            let _ = send.finish();
            reader.stop(frame::RESET_CANCEL);
            return;
        }
    };
    if send.write_all(&[TCP_OK]).await.is_err() {
        return;
    }
    let (recv, prefetched) = reader.into_parts();
    let open = shared.tcp.opened(Direction::Inbound, &source, &destination);
    let mut local = local;
    let (r, w) = local.split();
    let done = Splice::new(shared.config.tcp_idle_timeout)
        .prefetched(prefetched)
        .run(r, w, send, recv)
        .await;
    shared.tcp.closed(open, &done);
    if !done.outcome.is_clean() {
        abort_tcp(local);
    }
}

/// Admits a TCP connection for a local service — the instance exists and is
/// a TCP service, this node may serve it, the caller is who it says, policy
/// admits its identity, the instance is not failing its health checks — and
/// connects to it. Otherwise the status byte to answer. A connection that
/// came from one of this node's own connections to its instances is a loop
/// through another node (`own::Dials`) and is refused. A loopback `client`
/// counts only when the caller is on this host's loopback too
/// (`caller_on_loopback`, true for this node itself): sidecars in separate
/// network namespaces each have their own 127.0.0.1, where an app's port
/// may equal one of this node's dials without being it.
async fn admit(
    shared: &Shared,
    caller: &Identity,
    caller_on_loopback: bool,
    head: &TcpHead,
) -> Result<(TcpStream, crate::own::Dialled), u8> {
    let Some(svc) = shared.local.get(&head.service) else {
        return Err(TCP_UNKNOWN_SERVICE);
    };
    if svc.spec.protocol != crate::config::Protocol::Tcp {
        return Err(TCP_NOT_TCP);
    }
    if !shared.endpoint.identity().may_serve(&head.service) {
        return Err(TCP_NOT_SERVED);
    }
    if !head.source.is_empty() && !caller.may_serve(&head.source) {
        return Err(TCP_UNAUTHORIZED);
    }
    if !authorized(shared, caller, head) {
        shared.policy.metrics.denied(&head.service, "authorization");
        return Err(TCP_DENIED);
    }
    // After the policy checks: a caller policy refuses learns nothing
    // about this node's own connections.
    if shared.dials.loops(&head.client, caller_on_loopback) {
        if let Some(held) = shared.loop_log.allow() {
            tracing::warn!(
                service = %head.service,
                addr = %svc.spec.addr,
                peer = %caller,
                not_logged = held,
                "tcp: the service's address leads back into the mesh (another node's listener for it): forwarding loop refused; point the service at the app's own address"
            );
        }
        return Err(TCP_FORWARDING_LOOP);
    }
    if svc.health() == gossip::Health::Unhealthy {
        return Err(TCP_REFUSED);
    }
    let local = connect_local(svc).await.ok_or(TCP_REFUSED)?;
    let at = local.local_addr().map_err(|_| TCP_REFUSED)?;
    Ok((local, shared.dials.hold(at)))
}

/// AuthorizationPolicy for a connection: judged like an HTTP request (by
/// the certificate's node SPIFFE ID and the source service it names, else
/// every service it names) but with no method and no path, so only rules
/// that name neither can admit it.
fn authorized(shared: &Shared, caller: &Identity, head: &TcpHead) -> bool {
    let set = shared.policy.store.snapshot();
    let who = if head.source.is_empty() {
        caller.clone()
    } else {
        Identity {
            services: vec![head.source.clone()],
            ..caller.clone()
        }
    };
    // An empty method matches no `methods` entry and an empty path starts
    // with no `paths` prefix (they begin with '/').
    set.authorize(&head.service, &who, "", "")
}

async fn connect_local(svc: &LocalService) -> Option<TcpStream> {
    match tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, TcpStream::connect(svc.spec.addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(service = %svc.spec.name, addr = %svc.spec.addr, error = %e, "tcp: local instance refused");
            None
        }
        Err(_) => None,
    }
}

// === stats ===

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EdgeLabels {
    direction: String,
    source: String,
    destination: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    direction: String,
    source: String,
    destination: String,
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: String,
    source: String,
    destination: String,
    flow: String,
}

/// Totals of one TCP edge since the node started (`/v1/stats/tcp`).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TcpEdgeStats {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// Calling service.
    pub source: String,
    /// Called service.
    pub destination: String,
    /// Connections spliced (admitted by the serving node).
    pub opened: u64,
    /// Connections open now.
    pub open: u64,
    /// Ended connections by outcome (`clean`, `idle`, `reset`, `error`,
    /// and refusals: `refused`, `denied`, `unknown_service`, ...).
    pub closed: BTreeMap<String, u64>,
    /// Bytes from the caller toward the service.
    pub bytes_to_service: u64,
    /// Bytes from the service back to the caller.
    pub bytes_from_service: u64,
}

/// TCP connection metrics and per-edge totals.
pub struct TcpStats {
    opened: Family<EdgeLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    duration: Family<EdgeLabels, Histogram>,
    open: Family<EdgeLabels, Gauge>,
    totals: Mutex<BTreeMap<(Direction, String, String), TcpEdgeStats>>,
}

/// A connection counted open until [`TcpStats::closed`].
pub(crate) struct OpenConn {
    labels: EdgeLabels,
    key: (Direction, String, String),
}

impl TcpStats {
    /// Makes the families and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let s = TcpStats {
            opened: Family::default(),
            closed: Family::default(),
            bytes: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 4.0, 12))
            }),
            open: Family::default(),
            totals: Mutex::new(BTreeMap::new()),
        };
        registry.register(
            "tcp_connections_opened",
            "Opaque TCP connections spliced, by direction, source and destination service",
            s.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "Opaque TCP connections ended, by outcome (clean, idle, reset, error; refusals before splicing: refused, denied, unknown_service, not_tcp, not_served, unauthorized, bad_head)",
            s.closed.clone(),
        );
        registry.register(
            "tcp_bytes",
            "Opaque TCP bytes spliced, by flow (to_service: from the caller; from_service: back to it)",
            s.bytes.clone(),
        );
        registry.register(
            "tcp_connection_duration_seconds",
            "Opaque TCP connection lifetimes, seconds",
            s.duration.clone(),
        );
        registry.register(
            "tcp_connections_open",
            "Opaque TCP connections open now",
            s.open.clone(),
        );
        Arc::new(s)
    }

    fn labels(direction: Direction, source: &str, destination: &str) -> EdgeLabels {
        EdgeLabels {
            direction: direction.as_str().into(),
            source: source.into(),
            destination: destination.into(),
        }
    }

    fn with_totals(&self, key: &(Direction, String, String), f: impl FnOnce(&mut TcpEdgeStats)) {
        let mut t = self.totals.lock().unwrap();
        let e = t.entry(key.clone()).or_insert_with(|| TcpEdgeStats {
            direction: key.0.as_str(),
            source: key.1.clone(),
            destination: key.2.clone(),
            ..Default::default()
        });
        f(e);
    }

    /// Counts a connection spliced on an edge.
    pub(crate) fn opened(&self, direction: Direction, source: &str, destination: &str) -> OpenConn {
        let labels = Self::labels(direction, source, destination);
        self.opened.get_or_create(&labels).inc();
        self.open.get_or_create(&labels).inc();
        let key = (direction, source.to_string(), destination.to_string());
        self.with_totals(&key, |e| {
            e.opened += 1;
            e.open += 1;
        });
        OpenConn { labels, key }
    }

    /// Counts how a spliced connection ended, its bytes and duration.
    pub(crate) fn closed(&self, c: OpenConn, done: &Spliced) {
        let outcome = done.outcome.label();
        self.open.get_or_create(&c.labels).dec();
        self.closed
            .get_or_create(&ClosedLabels {
                direction: c.labels.direction.clone(),
                source: c.labels.source.clone(),
                destination: c.labels.destination.clone(),
                outcome: outcome.into(),
            })
            .inc();
        // Outbound: the local side is the caller; inbound: the instance.
        let (to_service, from_service) = match c.key.0 {
            Direction::Outbound => (done.local_to_mesh, done.mesh_to_local),
            Direction::Inbound => (done.mesh_to_local, done.local_to_mesh),
        };
        for (flow, n) in [("to_service", to_service), ("from_service", from_service)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: c.labels.direction.clone(),
                    source: c.labels.source.clone(),
                    destination: c.labels.destination.clone(),
                    flow: flow.into(),
                })
                .inc_by(n);
        }
        self.duration
            .get_or_create(&c.labels)
            .observe(done.duration.as_secs_f64());
        self.with_totals(&c.key, |e| {
            e.open = e.open.saturating_sub(1);
            *e.closed.entry(outcome.into()).or_default() += 1;
            e.bytes_to_service += to_service;
            e.bytes_from_service += from_service;
        });
    }

    /// Counts a connection refused before any byte was spliced.
    pub(crate) fn refused(
        &self,
        direction: Direction,
        source: &str,
        destination: &str,
        outcome: &str,
    ) {
        let labels = Self::labels(direction, source, destination);
        self.closed
            .get_or_create(&ClosedLabels {
                direction: labels.direction,
                source: labels.source,
                destination: labels.destination,
                outcome: outcome.into(),
            })
            .inc();
        let key = (direction, source.to_string(), destination.to_string());
        self.with_totals(&key, |e| {
            *e.closed.entry(outcome.into()).or_default() += 1;
        });
    }

    /// Totals per edge since the node started, sorted by edge.
    pub fn edges(&self) -> Vec<TcpEdgeStats> {
        self.totals.lock().unwrap().values().cloned().collect()
    }
}
