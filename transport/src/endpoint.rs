//! The QUIC endpoint: one connection per peer, reused; concurrent dials
//! merged; refused handshakes counted; certificates hot-reloaded.
//!
//! Upper layers use two things: small tagged *messages* (a QUIC datagram when
//! the message fits, otherwise a unidirectional stream), and bidirectional
//! streams, whose framing belongs to the caller.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use quinn::{RecvStream, SendStream, TokioRuntime, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::Identity;
use crate::socket::{SocketLayer, bind_udp_counted};
use crate::tls::{Refusals, TlsError, TlsFiles};

/// Largest message payload accepted on any channel, in bytes: a policy
/// record carrying a 1 MiB document plus 64 KiB for its kind, name, version,
/// hash, signature and encoding. A larger message is refused by the receiver
/// (its stream stopped, counted in [`EndpointStats::oversize_messages`]);
/// senders should refuse to build one. [`Endpoint::limit_channel`] sets a
/// smaller cap per channel.
pub const MAX_MESSAGE_BYTES: usize = (1 << 20) + (64 << 10);
/// Messages up to this size (channel tag included) are read by any of a
/// connection's uni streams at once; a stream whose message grows past it
/// must first take one of [`LARGE_MESSAGE_SLOTS`]. 64 KiB + 1 covers the
/// largest chitchat datagram, so gossip never waits for a slot.
pub const SMALL_MESSAGE_BYTES: usize = (64 << 10) + 1;
/// Per connection, how many uni streams may read past
/// [`SMALL_MESSAGE_BYTES`] at once.
pub const LARGE_MESSAGE_SLOTS: usize = 2;
/// Concurrent unidirectional (message) streams a peer may open on one
/// connection; further `open_uni` calls wait for QUIC stream credit.
pub const MAX_UNI_STREAMS: u32 = 32;
/// Concurrent bidirectional (data plane) streams a peer may open on one
/// connection.
pub const MAX_BIDI_STREAMS: u32 = 4096;
/// Bytes a peer may send on one stream beyond what we have read: room for one
/// whole message of [`MAX_MESSAGE_BYTES`] (also the data plane's per-stream
/// window, like quinn's default of 1.25 MB).
pub const STREAM_RECEIVE_WINDOW: u32 = 1_310_720;
/// Bytes a peer may send on one connection, all streams together, beyond
/// what we have read: what quinn buffers per connection, however many streams
/// (including data-plane streams that never send their head) sit unread.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 << 20;
/// Live connections kept per peer identity (both directions together). A
/// newer connection from the same certificate name closes the oldest, so one
/// certificate holds at most this many connections' worth of buffers; two
/// suffice for honest peers (one per direction when both dial at once), the
/// rest cover restarts before the old connection idles out.
pub const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// Payload bytes waiting in one channel's subscriber queue, all peers
/// together; a message arriving at a full queue is dropped and counted.
pub const CHANNEL_QUEUE_BYTES: usize = 16 << 20;
/// Server name sent in the TLS ClientHello; peers are identified by SAN, not name.
const SERVER_NAME: &str = "shoal.mesh";
/// Largest piece read from a uni stream at once.
const READ_CHUNK: usize = 64 << 10;
/// STOP_SENDING codes the receiver of a uni stream uses.
const STOP_STALLED: u32 = 1;
const STOP_OVERSIZE: u32 = 2;
const STOP_NO_SUBSCRIBER: u32 = 3;

/// Settings for an [`Endpoint`].
#[derive(Clone)]
pub struct EndpointConfig {
    /// UDP address to bind (port 0 picks one).
    pub listen: SocketAddr,
    /// Certificate folder.
    pub tls: TlsFiles,
    /// QUIC keep-alive interval. Default 2 s: keeps NAT bindings and lets a
    /// silent peer be noticed well inside the idle timeout.
    pub keep_alive: Duration,
    /// QUIC idle timeout. Default 10 s: a connection to a vanished peer is
    /// dropped from the cache after this long.
    pub idle_timeout: Duration,
    /// Handshake deadline for a dial. Default 3 s.
    pub connect_timeout: Duration,
    /// After a failed dial, further dials to that address fail at once for
    /// this long. Default 500 ms.
    pub dial_backoff: Duration,
    /// How often certificate files are checked for changes. Default 1 s.
    pub reload_interval: Duration,
    /// Optional wrapper around the UDP socket (see [`crate::socket`]).
    pub socket_layer: Option<Arc<dyn SocketLayer>>,
    /// A peer's uni stream (one message) must be finished this long after
    /// it was accepted, or it is stopped and counted in
    /// [`EndpointStats::stalled_streams`]. Default 5 s.
    pub message_deadline: Duration,
    /// The node name the certificate must carry. When set, `bind` refuses a
    /// certificate naming another node, and so does every reload. When unset,
    /// a reload must keep the node name of the certificate loaded at bind.
    /// Either way a reload must keep the trust domain. Default `None`.
    pub expected_node: Option<String>,
}

impl EndpointConfig {
    /// Defaults for `listen` and `tls` (see each field for its default).
    pub fn new(listen: SocketAddr, tls: TlsFiles) -> Self {
        EndpointConfig {
            listen,
            tls,
            keep_alive: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            dial_backoff: Duration::from_millis(500),
            reload_interval: Duration::from_secs(1),
            socket_layer: None,
            message_deadline: Duration::from_secs(5),
            expected_node: None,
        }
    }
}

/// Errors from the endpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EndpointError {
    #[error("binding {addr}: {msg}")]
    Bind { addr: SocketAddr, msg: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("dialing {addr}: {msg}")]
    Dial { addr: SocketAddr, msg: String },
    #[error("peer {addr}: {msg}")]
    Peer { addr: SocketAddr, msg: String },
    #[error("certificate names {found} but this endpoint is {expected}")]
    WrongIdentity { expected: String, found: String },
}

impl From<TlsError> for EndpointError {
    fn from(e: TlsError) -> Self {
        EndpointError::Tls(e.to_string())
    }
}

/// An established, authenticated connection to a peer.
#[derive(Clone, Debug)]
pub struct Connected {
    /// The QUIC connection.
    pub conn: quinn::Connection,
    /// The peer's identity from its certificate.
    pub peer: Arc<Identity>,
}

impl Connected {
    /// The peer's UDP address.
    pub fn addr(&self) -> SocketAddr {
        self.conn.remote_address()
    }
}

/// A tagged message received from a peer. Its payload counts against its
/// channel's queue budget ([`CHANNEL_QUEUE_BYTES`]) until it is dropped.
#[derive(Debug)]
pub struct Message {
    /// Who sent it.
    pub from: Connected,
    /// The channel tag it was sent on.
    pub channel: u8,
    /// Its bytes.
    pub payload: Bytes,
    _queued: Held,
}

/// Bytes accounted in a gauge (and optionally a per-channel total) for as
/// long as this lives.
#[derive(Debug)]
struct Held {
    n: usize,
    gauge: Arc<EndpointStats>,
    which: Gauge,
    channel: Option<Arc<AtomicUsize>>,
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    Reading,
    Queued,
}

impl Held {
    fn new(stats: &Arc<EndpointStats>, which: Gauge) -> Self {
        Held {
            n: 0,
            gauge: stats.clone(),
            which,
            channel: None,
        }
    }

    fn gauge(&self) -> &AtomicI64 {
        match self.which {
            Gauge::Reading => &self.gauge.message_bytes_reading,
            Gauge::Queued => &self.gauge.message_bytes_queued,
        }
    }

    fn add(&mut self, n: usize) {
        self.n += n;
        self.gauge().fetch_add(n as i64, Ordering::Relaxed);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.gauge().fetch_sub(self.n as i64, Ordering::Relaxed);
        if let Some(c) = &self.channel {
            c.fetch_sub(self.n, Ordering::Relaxed);
        }
    }
}

/// A bidirectional stream opened by a peer.
#[derive(Debug)]
pub struct BiStream {
    /// Who opened it.
    pub from: Connected,
    /// Our sending half.
    pub send: SendStream,
    /// Our receiving half.
    pub recv: RecvStream,
}

/// Counters of the endpoint's activity.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Connections currently open.
    pub connections_open: AtomicI64,
    /// Connections established since start (both directions).
    pub connections_total: AtomicU64,
    /// Dials or accepts that failed (including refused certificates).
    pub handshake_failures: AtomicU64,
    /// Messages sent / received, and their payload bytes.
    pub messages_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
    /// Certificate reloads applied, and reloads that failed (old kept).
    pub cert_reloads: AtomicU64,
    pub cert_reload_errors: AtomicU64,
    /// Reloads refused because the new certificate names another node or
    /// trust domain (old kept; counted once per change of the files).
    pub cert_reload_wrong_identity: AtomicU64,
    /// Messages refused for exceeding their channel's size cap (the stream
    /// is stopped as soon as the cap is passed).
    pub oversize_messages: AtomicU64,
    /// Uni streams stopped for not finishing within the message deadline.
    pub stalled_streams: AtomicU64,
    /// Messages dropped on arrival: nobody subscribed to the channel, or its
    /// queue was full (by count or by [`CHANNEL_QUEUE_BYTES`]).
    pub messages_dropped: AtomicU64,
    /// Peer-opened bidi streams dropped because nobody took them in time.
    pub bi_streams_dropped: AtomicU64,
    /// Connections closed because their peer identity opened more than
    /// [`MAX_CONNECTIONS_PER_PEER`].
    pub connections_superseded: AtomicU64,
    /// UDP sends that found the socket's send buffer full (`EAGAIN`); the
    /// datagram waited for writability and went out after. Many of these
    /// mean the buffer is too small for the traffic (`net.core.wmem_*`).
    pub udp_sends_blocked: AtomicU64,
    /// Gauge: bytes of partly read uni-stream messages, all connections.
    pub message_bytes_reading: AtomicI64,
    /// Gauge: payload bytes of received messages waiting in subscriber queues.
    pub message_bytes_queued: AtomicI64,
}

type DialFuture = Shared<BoxFuture<'static, Result<Connected, EndpointError>>>;

enum Slot {
    Ready(Connected),
    Dialing(u64, DialFuture),
    Failed(Instant, EndpointError),
}

struct Inner {
    quinn: quinn::Endpoint,
    config: EndpointConfig,
    client: RwLock<quinn::ClientConfig>,
    identity: RwLock<Arc<Identity>>,
    /// Looked up on every request (a keyed fast hash: the addresses come
    /// from gossip).
    slots: Mutex<foldhash::HashMap<SocketAddr, Slot>>,
    next_dial: AtomicU64,
    subscribers: Mutex<HashMap<u8, Subscriber>>,
    limits: Mutex<HashMap<u8, usize>>,
    by_peer: Mutex<HashMap<String, Vec<quinn::Connection>>>,
    bi_tx: mpsc::Sender<BiStream>,
    bi_rx: Mutex<Option<mpsc::Receiver<BiStream>>>,
    refusals: Arc<Refusals>,
    stats: Arc<EndpointStats>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Subscriber {
    tx: mpsc::Sender<Message>,
    queued: Arc<AtomicUsize>,
}

impl Inner {
    /// The payload cap of `channel`.
    fn limit(&self, channel: u8) -> usize {
        self.limits
            .lock()
            .unwrap()
            .get(&channel)
            .copied()
            .unwrap_or(MAX_MESSAGE_BYTES)
    }
}

/// A mesh QUIC endpoint. Cheap to clone.
#[derive(Clone)]
pub struct Endpoint {
    inner: Arc<Inner>,
}

impl Endpoint {
    /// Binds the endpoint and starts accepting connections.
    pub fn bind(config: EndpointConfig) -> Result<Self, EndpointError> {
        let refusals = Arc::new(Refusals::default());
        let material = config.tls.load(&refusals)?;
        if let Some(want) = &config.expected_node
            && material.identity.node != *want
        {
            return Err(EndpointError::WrongIdentity {
                expected: format!("node {want:?}"),
                found: format!("node {:?}", material.identity.node),
            });
        }
        let transport = Arc::new(transport_config(&config));
        let server = server_config(material.server, &transport)?;
        let client = client_config(material.client, &transport)?;

        let bind_err = |e: std::io::Error| EndpointError::Bind {
            addr: config.listen,
            msg: e.to_string(),
        };
        let stats = Arc::new(EndpointStats::default());
        let mut socket = bind_udp_counted(config.listen, stats.clone()).map_err(bind_err)?;
        if let Some(layer) = &config.socket_layer {
            socket = layer.wrap(socket);
        }
        let quinn = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(TokioRuntime),
        )
        .map_err(bind_err)?;

        let (bi_tx, bi_rx) = mpsc::channel(1024);
        let inner = Arc::new(Inner {
            quinn,
            client: RwLock::new(client),
            identity: RwLock::new(Arc::new(material.identity)),
            config,
            slots: Mutex::default(),
            next_dial: AtomicU64::new(0),
            subscribers: Mutex::new(HashMap::new()),
            limits: Mutex::new(HashMap::new()),
            by_peer: Mutex::new(HashMap::new()),
            bi_tx,
            bi_rx: Mutex::new(Some(bi_rx)),
            refusals,
            stats,
            tasks: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(Arc::downgrade(&inner)));
        // Fingerprint the files now, not when the task first runs: a change
        // made right after `bind` returns must be seen as a change.
        let first = inner.config.tls.stamp();
        let reload = tokio::spawn(reload_loop(Arc::downgrade(&inner), first));
        inner.tasks.lock().unwrap().extend([accept, reload]);
        Ok(Endpoint { inner })
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .quinn
            .local_addr()
            .unwrap_or(self.inner.config.listen)
    }

    /// Our identity, from the certificate currently in use.
    pub fn identity(&self) -> Arc<Identity> {
        self.inner.identity.read().unwrap().clone()
    }

    /// Handshake refusal counters.
    pub fn refusals(&self) -> &Refusals {
        &self.inner.refusals
    }

    /// Activity counters.
    pub fn stats(&self) -> &EndpointStats {
        &self.inner.stats
    }

    /// Receives messages sent on `channel`. A later call replaces the earlier
    /// subscriber. Messages on channels nobody subscribed to are dropped.
    ///
    /// A message waits in the queue until received; when `capacity` messages
    /// or [`CHANNEL_QUEUE_BYTES`] of payload are waiting, arrivals are dropped
    /// (counted in [`EndpointStats::messages_dropped`]).
    pub fn subscribe(&self, channel: u8, capacity: usize) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(capacity);
        let sub = Subscriber {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
        };
        self.inner.subscribers.lock().unwrap().insert(channel, sub);
        rx
    }

    /// Caps the payload of messages received on `channel` at `max_bytes`
    /// (at most [`MAX_MESSAGE_BYTES`], the default). A peer's stream is
    /// stopped as soon as it passes the cap; the message is dropped and
    /// counted in [`EndpointStats::oversize_messages`].
    pub fn limit_channel(&self, channel: u8, max_bytes: usize) {
        self.inner
            .limits
            .lock()
            .unwrap()
            .insert(channel, max_bytes.min(MAX_MESSAGE_BYTES));
    }

    /// Takes the stream of peer-opened bidirectional streams (once).
    pub fn take_bi_streams(&self) -> Option<mpsc::Receiver<BiStream>> {
        self.inner.bi_rx.lock().unwrap().take()
    }

    /// Returns the cached connection to `addr`, or dials it. Concurrent calls
    /// for one address share one dial.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Connected, EndpointError> {
        enum Next {
            Done(Result<Connected, EndpointError>),
            Join(DialFuture),
            Dial(u64, DialFuture),
        }
        let next = {
            let mut slots = self.inner.slots.lock().unwrap();
            match slots.get(&addr) {
                Some(Slot::Ready(c)) if c.conn.close_reason().is_none() => {
                    Next::Done(Ok(c.clone()))
                }
                Some(Slot::Dialing(_, f)) => Next::Join(f.clone()),
                Some(Slot::Failed(at, e)) if at.elapsed() < self.inner.config.dial_backoff => {
                    Next::Done(Err(e.clone()))
                }
                _ => {
                    let id = self.inner.next_dial.fetch_add(1, Ordering::Relaxed);
                    let fut = dial(self.inner.clone(), addr).boxed().shared();
                    slots.insert(addr, Slot::Dialing(id, fut.clone()));
                    Next::Dial(id, fut)
                }
            }
        };
        let (id, fut) = match next {
            Next::Done(r) => return r,
            Next::Join(f) => return f.await,
            Next::Dial(id, f) => (id, f),
        };
        let result = fut.await;
        let mut slots = self.inner.slots.lock().unwrap();
        if matches!(slots.get(&addr), Some(Slot::Dialing(d, _)) if *d == id) {
            match &result {
                Ok(c) => slots.insert(addr, Slot::Ready(c.clone())),
                Err(e) => slots.insert(addr, Slot::Failed(Instant::now(), e.clone())),
            };
        }
        result
    }

    /// The cached live connection to `addr`, if any (never dials).
    pub fn cached(&self, addr: SocketAddr) -> Option<Connected> {
        match self.inner.slots.lock().unwrap().get(&addr) {
            Some(Slot::Ready(c)) if c.conn.close_reason().is_none() => Some(c.clone()),
            _ => None,
        }
    }

    /// Forgets the cached connection to `addr` and closes it (the next
    /// `connect` dials afresh).
    pub fn disconnect(&self, addr: SocketAddr) {
        if let Some(Slot::Ready(c)) = self.inner.slots.lock().unwrap().remove(&addr) {
            c.conn.close(VarInt::from_u32(0), b"disconnect");
        }
    }

    /// Number of live cached connections.
    pub fn connection_count(&self) -> usize {
        self.inner
            .slots
            .lock()
            .unwrap()
            .values()
            .filter(|s| matches!(s, Slot::Ready(c) if c.conn.close_reason().is_none()))
            .count()
    }

    /// Sends a tagged message to `addr`: a datagram if it fits, otherwise a
    /// unidirectional stream.
    pub async fn send_message(
        &self,
        addr: SocketAddr,
        channel: u8,
        payload: &[u8],
    ) -> Result<(), EndpointError> {
        let peer_err = |msg: String| EndpointError::Peer { addr, msg };
        if payload.len() > MAX_MESSAGE_BYTES {
            return Err(peer_err(format!(
                "message of {} bytes exceeds the {MAX_MESSAGE_BYTES}-byte cap",
                payload.len()
            )));
        }
        let c = self.connect(addr).await?;
        let fits = c
            .conn
            .max_datagram_size()
            .is_some_and(|max| payload.len() < max);
        if fits {
            let mut buf = Vec::with_capacity(payload.len() + 1);
            buf.push(channel);
            buf.extend_from_slice(payload);
            c.conn
                .send_datagram(buf.into())
                .map_err(|e| peer_err(e.to_string()))?;
        } else {
            let mut s = c
                .conn
                .open_uni()
                .await
                .map_err(|e| peer_err(e.to_string()))?;
            s.write_all(&[channel])
                .await
                .map_err(|e| peer_err(e.to_string()))?;
            s.write_all(payload)
                .await
                .map_err(|e| peer_err(e.to_string()))?;
            s.finish().map_err(|e| peer_err(e.to_string()))?;
        }
        let stats = &self.inner.stats;
        stats.messages_out.fetch_add(1, Ordering::Relaxed);
        stats
            .bytes_out
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Opens a bidirectional stream to `addr` (dialing if needed).
    pub async fn open_bi(
        &self,
        addr: SocketAddr,
    ) -> Result<(Connected, SendStream, RecvStream), EndpointError> {
        let c = self.connect(addr).await?;
        match c.conn.open_bi().await {
            Ok((s, r)) => Ok((c, s, r)),
            Err(e) => {
                self.forget(addr, &c);
                Err(EndpointError::Peer {
                    addr,
                    msg: e.to_string(),
                })
            }
        }
    }

    /// Re-reads the certificate folder now (the reload loop also does this
    /// whenever the files change).
    pub fn reload_certificates(&self) -> Result<(), EndpointError> {
        reload(&self.inner)
    }

    /// Closes every connection and stops the endpoint.
    pub fn close(&self) {
        for t in self.inner.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        self.inner.quinn.close(VarInt::from_u32(0), b"shutdown");
        self.inner.slots.lock().unwrap().clear();
    }

    /// Waits until every connection has been closed cleanly (after [`Endpoint::close`]).
    pub async fn wait_idle(&self) {
        self.inner.quinn.wait_idle().await;
    }

    fn forget(&self, addr: SocketAddr, c: &Connected) {
        forget(&self.inner, addr, c);
    }
}

fn forget(inner: &Inner, addr: SocketAddr, c: &Connected) {
    let mut slots = inner.slots.lock().unwrap();
    if matches!(slots.get(&addr), Some(Slot::Ready(x)) if x.conn.stable_id() == c.conn.stable_id())
    {
        slots.remove(&addr);
    }
}

fn transport_config(config: &EndpointConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(config.keep_alive));
    t.max_idle_timeout(config.idle_timeout.try_into().ok());
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_BIDI_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t
}

fn server_config(
    tls: rustls::ServerConfig,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ServerConfig, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport.clone());
    Ok(server)
}

fn client_config(
    tls: rustls::ClientConfig,
    transport: &Arc<quinn::TransportConfig>,
) -> Result<quinn::ClientConfig, EndpointError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| EndpointError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport.clone());
    Ok(client)
}

async fn dial(inner: Arc<Inner>, addr: SocketAddr) -> Result<Connected, EndpointError> {
    let err = |msg: String| EndpointError::Dial { addr, msg };
    let client = inner.client.read().unwrap().clone();
    let connecting = inner
        .quinn
        .connect_with(client, addr, SERVER_NAME)
        .map_err(|e| err(e.to_string()))?;
    let result = tokio::time::timeout(inner.config.connect_timeout, connecting).await;
    let conn = match result {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            inner
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(err(e.to_string()));
        }
        Err(_) => {
            inner
                .stats
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            return Err(err("handshake timed out".into()));
        }
    };
    let connected = authenticated(conn).map_err(err)?;
    spawn_driver(&inner, connected.clone());
    Ok(connected)
}

fn authenticated(conn: quinn::Connection) -> Result<Connected, String> {
    let certs = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "peer presented no certificate".to_string())?;
    let first = certs.first().ok_or("peer presented no certificate")?;
    let peer = Identity::from_der(first).map_err(|e| e.to_string())?;
    Ok(Connected {
        conn,
        peer: Arc::new(peer),
    })
}

async fn accept_loop(weak: std::sync::Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let quinn = inner.quinn.clone();
        drop(inner);
        let Some(incoming) = quinn.accept().await else {
            return;
        };
        let weak = weak.clone();
        tokio::spawn(async move {
            let Some(inner) = weak.upgrade() else { return };
            let timeout = inner.config.connect_timeout;
            let conn = match tokio::time::timeout(timeout, async { incoming.accept()?.await }).await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    inner
                        .stats
                        .handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "inbound handshake failed");
                    return;
                }
                Err(_) => {
                    inner
                        .stats
                        .handshake_failures
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };
            let Ok(connected) = authenticated(conn) else {
                return;
            };
            let addr = connected.addr();
            {
                let mut slots = inner.slots.lock().unwrap();
                let live = matches!(slots.get(&addr), Some(Slot::Ready(c)) if c.conn.close_reason().is_none())
                    || matches!(slots.get(&addr), Some(Slot::Dialing(..)));
                if !live {
                    slots.insert(addr, Slot::Ready(connected.clone()));
                }
            }
            spawn_driver(&inner, connected);
        });
    }
}

/// Serves one connection until it closes: datagrams and uni streams go to
/// message subscribers, bi streams to the bi-stream receiver.
fn spawn_driver(inner: &Arc<Inner>, c: Connected) {
    inner.stats.connections_open.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    tracing::debug!(peer = %c.peer, addr = %c.addr(), "connection up");
    let peer_key = c.peer.node_id();
    let superseded = {
        let mut by_peer = inner.by_peer.lock().unwrap();
        let list = by_peer.entry(peer_key.clone()).or_default();
        list.push(c.conn.clone());
        if list.len() > MAX_CONNECTIONS_PER_PEER {
            Some(list.remove(0))
        } else {
            None
        }
    };
    if let Some(old) = superseded {
        inner
            .stats
            .connections_superseded
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(peer = %c.peer, addr = %old.remote_address(), "closing a peer's oldest connection");
        old.close(VarInt::from_u32(0), b"superseded");
    }
    let weak = Arc::downgrade(inner);
    let large = Arc::new(Semaphore::new(LARGE_MESSAGE_SLOTS));
    tokio::spawn(async move {
        let reason = loop {
            tokio::select! {
                d = c.conn.read_datagram() => match d {
                    Ok(d) if !d.is_empty() => {
                        let Some(inner) = weak.upgrade() else { break quinn::ConnectionError::LocallyClosed };
                        let payload = d.slice(1..);
                        if payload.len() > inner.limit(d[0]) {
                            inner.stats.oversize_messages.fetch_add(1, Ordering::Relaxed);
                        } else {
                            deliver(&inner, &c, d[0], payload);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                },
                s = c.conn.accept_uni() => match s {
                    Ok(recv) => {
                        let (weak, c, large) = (weak.clone(), c.clone(), large.clone());
                        tokio::spawn(async move { read_uni(weak, c, recv, large).await });
                    }
                    Err(e) => break e,
                },
                s = c.conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let Some(inner) = weak.upgrade() else { break quinn::ConnectionError::LocallyClosed };
                        if inner.bi_tx.try_send(BiStream { from: c.clone(), send, recv }).is_err() {
                            inner.stats.bi_streams_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => break e,
                },
            }
        };
        tracing::debug!(peer = %c.peer, reason = %reason, "connection closed");
        if let Some(inner) = weak.upgrade() {
            inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
            forget(&inner, c.addr(), &c);
            let mut by_peer = inner.by_peer.lock().unwrap();
            if let Some(list) = by_peer.get_mut(&peer_key) {
                list.retain(|x| x.stable_id() != c.conn.stable_id());
                if list.is_empty() {
                    by_peer.remove(&peer_key);
                }
            }
        }
    });
}

/// How reading one uni stream ended.
enum Read {
    /// A whole message: channel tag first.
    Done(BytesMut, Held),
    /// The peer finished an empty stream.
    Empty,
    /// Past the channel's cap.
    Oversize(u8),
    /// Nobody listens on this channel.
    NoSubscriber(u8),
    /// The peer reset the stream or the connection went away.
    Failed(quinn::ReadError),
}

/// Reads one message from a peer's uni stream, within the message deadline,
/// holding at most [`SMALL_MESSAGE_BYTES`] unless it holds one of the
/// connection's large-message slots. Refusals stop the stream and are
/// counted.
async fn read_uni(
    weak: std::sync::Weak<Inner>,
    c: Connected,
    mut recv: RecvStream,
    large: Arc<Semaphore>,
) {
    let Some(inner) = weak.upgrade() else { return };
    let deadline = inner.config.message_deadline;
    let stats = inner.stats.clone();
    drop(inner);
    let read = tokio::time::timeout(deadline, read_message(&weak, &mut recv, &stats, &large)).await;
    let mut stop = |code: u32| {
        let _ = recv.stop(VarInt::from_u32(code));
    };
    match read {
        Ok(Read::Done(buf, held)) => {
            let Some(inner) = weak.upgrade() else { return };
            let buf = buf.freeze();
            deliver(&inner, &c, buf[0], buf.slice(1..));
            drop(held);
        }
        Ok(Read::Empty) => {}
        Ok(Read::Oversize(channel)) => {
            stop(STOP_OVERSIZE);
            stats.oversize_messages.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %c.peer, channel, "refused an oversize message");
        }
        Ok(Read::NoSubscriber(channel)) => {
            stop(STOP_NO_SUBSCRIBER);
            stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(peer = %c.peer, channel, "message on a channel nobody reads");
        }
        Ok(Read::Failed(e)) => {
            tracing::debug!(peer = %c.peer, error = %e, "dropped message stream")
        }
        Err(_) => {
            stop(STOP_STALLED);
            stats.stalled_streams.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(peer = %c.peer, "stopped a message stream that did not finish in time");
        }
    }
}

async fn read_message(
    weak: &std::sync::Weak<Inner>,
    recv: &mut RecvStream,
    stats: &Arc<EndpointStats>,
    large: &Arc<Semaphore>,
) -> Read {
    let mut buf = BytesMut::new();
    let mut held = Held::new(stats, Gauge::Reading);
    let mut slot: Option<OwnedSemaphorePermit> = None;
    // Channel tag plus payload cap, once the tag is known.
    let mut cap: Option<usize> = None;
    loop {
        let want = match cap {
            None if buf.is_empty() => 1,
            None => {
                let Some(inner) = weak.upgrade() else {
                    return Read::Empty;
                };
                let channel = buf[0];
                if !inner.subscribers.lock().unwrap().contains_key(&channel) {
                    return Read::NoSubscriber(channel);
                }
                cap = Some(1 + inner.limit(channel));
                continue;
            }
            Some(cap) => {
                // Hold at most one byte past the cap (to see it passed), and
                // past the small size only with a slot.
                let most = if slot.is_some() {
                    cap + 1
                } else {
                    (cap + 1).min(SMALL_MESSAGE_BYTES + 1)
                };
                if buf.len() >= most {
                    match large.clone().acquire_owned().await {
                        Ok(p) => slot = Some(p),
                        Err(_) => return Read::Empty,
                    }
                    continue;
                }
                (most - buf.len()).min(READ_CHUNK)
            }
        };
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                held.add(chunk.bytes.len());
                buf.extend_from_slice(&chunk.bytes);
                if cap.is_some_and(|cap| buf.len() > cap) {
                    return Read::Oversize(buf[0]);
                }
            }
            Ok(None) if buf.is_empty() => return Read::Empty,
            Ok(None) => return Read::Done(buf, held),
            Err(e) => return Read::Failed(e),
        }
    }
}

/// Hands a message to its channel's subscriber, or drops and counts it.
fn deliver(inner: &Inner, c: &Connected, channel: u8, payload: Bytes) {
    inner.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .bytes_in
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    let subscribers = inner.subscribers.lock().unwrap();
    let Some(sub) = subscribers.get(&channel) else {
        inner.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let n = payload.len();
    let before = sub.queued.fetch_add(n, Ordering::Relaxed);
    // `held` owns the channel's share from here; dropping it gives it back.
    let mut held = Held::new(&inner.stats, Gauge::Queued);
    held.channel = Some(sub.queued.clone());
    held.add(n);
    if before + n > CHANNEL_QUEUE_BYTES {
        inner.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let msg = Message {
        from: c.clone(),
        channel,
        payload,
        _queued: held,
    };
    if sub.tx.try_send(msg).is_err() {
        inner.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

async fn reload_loop(weak: std::sync::Weak<Inner>, first: Option<u64>) {
    let Some(inner) = weak.upgrade() else { return };
    let interval = inner.config.reload_interval;
    let mut stamp = first;
    drop(inner);
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else { return };
        let now = inner.config.tls.stamp();
        if now != stamp {
            // Let a set of files being rewritten one by one settle: reload
            // only once the fingerprint holds still for a moment.
            drop(inner);
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let Some(inner) = weak.upgrade() else { return };
            if inner.config.tls.stamp() != now {
                continue;
            }
            // Remember the stamp once a reload succeeded, so a half written
            // set of files is retried on the next tick; and once a complete
            // set was refused for naming someone else, so that refusal is
            // counted and logged once per change of the files.
            match reload(&inner) {
                Ok(()) | Err(EndpointError::WrongIdentity { .. }) => stamp = now,
                Err(_) => {}
            }
        }
    }
}

/// Checks that `new` may replace `current`: same trust domain, and the
/// configured node name (or, without one, the current name).
fn check_identity(
    expected_node: Option<&str>,
    current: &Identity,
    new: &Identity,
) -> Result<(), EndpointError> {
    let want = expected_node.unwrap_or(&current.node);
    if new.node != want || new.trust_domain != current.trust_domain {
        let expected = format!("spiffe://{}/node/{want}", current.trust_domain);
        return Err(EndpointError::WrongIdentity {
            expected,
            found: new.node_id(),
        });
    }
    Ok(())
}

fn reload(inner: &Inner) -> Result<(), EndpointError> {
    let result = (|| {
        let material = inner.config.tls.load(&inner.refusals)?;
        let current = inner.identity.read().unwrap().clone();
        check_identity(
            inner.config.expected_node.as_deref(),
            &current,
            &material.identity,
        )?;
        let transport = Arc::new(transport_config(&inner.config));
        let server = server_config(material.server, &transport)?;
        let client = client_config(material.client, &transport)?;
        inner.quinn.set_server_config(Some(server));
        *inner.client.write().unwrap() = client;
        *inner.identity.write().unwrap() = Arc::new(material.identity);
        Ok::<_, EndpointError>(())
    })();
    match &result {
        Ok(()) => {
            inner.stats.cert_reloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(dir = %inner.config.tls.dir.display(), "reloaded certificates");
        }
        Err(EndpointError::WrongIdentity { expected, found }) => {
            inner
                .stats
                .cert_reload_wrong_identity
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                dir = %inner.config.tls.dir.display(),
                expected = %expected,
                found = %found,
                "refused certificate reload: the new certificate names {found}, but this node is {expected}; keeping the current certificate"
            );
        }
        Err(e) => {
            inner
                .stats
                .cert_reload_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "certificate reload failed; keeping the current ones");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(td: &str, node: &str) -> Identity {
        Identity {
            trust_domain: td.into(),
            node: node.into(),
            services: vec![],
        }
    }

    #[test]
    fn reload_keeps_node_and_trust_domain() {
        let cur = id("a.shoal", "n1");
        assert!(check_identity(Some("n1"), &cur, &id("a.shoal", "n1")).is_ok());
        assert!(check_identity(None, &cur, &id("a.shoal", "n1")).is_ok());
        let Err(EndpointError::WrongIdentity { expected, found }) =
            check_identity(Some("n1"), &cur, &id("a.shoal", "n2"))
        else {
            panic!("another node's certificate accepted");
        };
        assert_eq!(expected, "spiffe://a.shoal/node/n1");
        assert_eq!(found, "spiffe://a.shoal/node/n2");
        assert!(check_identity(None, &cur, &id("a.shoal", "n2")).is_err());
        assert!(check_identity(Some("n1"), &cur, &id("b.shoal", "n1")).is_err());
    }
}
