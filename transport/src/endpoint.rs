//! The QUIC endpoint: one connection per peer, reused; concurrent dials
//! merged; refused handshakes counted; certificates hot-reloaded.
//!
//! Upper layers use two things: small tagged *messages* (a QUIC datagram when
//! the message fits, otherwise a unidirectional stream), and bidirectional
//! streams, whose framing belongs to the caller.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use quinn::{RecvStream, SendStream, TokioRuntime, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Identity;
use crate::socket::{SocketLayer, bind_udp};
use crate::tls::{Refusals, TlsError, TlsFiles};

/// Largest message accepted on a unidirectional stream (2 MiB: a 1 MiB policy plus framing).
const MAX_MESSAGE: usize = 2 << 20;
/// Server name sent in the TLS ClientHello; peers are identified by SAN, not name.
const SERVER_NAME: &str = "shoal.mesh";

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

/// A tagged message received from a peer.
#[derive(Debug)]
pub struct Message {
    /// Who sent it.
    pub from: Connected,
    /// The channel tag it was sent on.
    pub channel: u8,
    /// Its bytes.
    pub payload: Bytes,
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
    slots: Mutex<HashMap<SocketAddr, Slot>>,
    next_dial: AtomicU64,
    subscribers: Mutex<HashMap<u8, mpsc::Sender<Message>>>,
    bi_tx: mpsc::Sender<BiStream>,
    bi_rx: Mutex<Option<mpsc::Receiver<BiStream>>>,
    refusals: Arc<Refusals>,
    stats: EndpointStats,
    tasks: Mutex<Vec<JoinHandle<()>>>,
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
        let transport = Arc::new(transport_config(&config));
        let server = server_config(material.server, &transport)?;
        let client = client_config(material.client, &transport)?;

        let bind_err = |e: std::io::Error| EndpointError::Bind {
            addr: config.listen,
            msg: e.to_string(),
        };
        let mut socket = bind_udp(config.listen).map_err(bind_err)?;
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
            slots: Mutex::new(HashMap::new()),
            next_dial: AtomicU64::new(0),
            subscribers: Mutex::new(HashMap::new()),
            bi_tx,
            bi_rx: Mutex::new(Some(bi_rx)),
            refusals,
            stats: EndpointStats::default(),
            tasks: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(Arc::downgrade(&inner)));
        let reload = tokio::spawn(reload_loop(Arc::downgrade(&inner)));
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
    pub fn subscribe(&self, channel: u8, capacity: usize) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(capacity);
        self.inner.subscribers.lock().unwrap().insert(channel, tx);
        rx
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
        let c = self.connect(addr).await?;
        let peer_err = |msg: String| EndpointError::Peer { addr, msg };
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
    t.max_concurrent_bidi_streams(VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(VarInt::from_u32(1024));
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
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let reason = loop {
            tokio::select! {
                d = c.conn.read_datagram() => match d {
                    Ok(d) if !d.is_empty() => deliver(&weak, &c, d[0], d.slice(1..)),
                    Ok(_) => {}
                    Err(e) => break e,
                },
                s = c.conn.accept_uni() => match s {
                    Ok(recv) => {
                        let (weak, c) = (weak.clone(), c.clone());
                        tokio::spawn(async move { read_uni(weak, c, recv).await });
                    }
                    Err(e) => break e,
                },
                s = c.conn.accept_bi() => match s {
                    Ok((send, recv)) => {
                        let Some(inner) = weak.upgrade() else { break quinn::ConnectionError::LocallyClosed };
                        let _ = inner.bi_tx.try_send(BiStream { from: c.clone(), send, recv });
                    }
                    Err(e) => break e,
                },
            }
        };
        tracing::debug!(peer = %c.peer, reason = %reason, "connection closed");
        if let Some(inner) = weak.upgrade() {
            inner.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
            forget(&inner, c.addr(), &c);
        }
    });
}

async fn read_uni(weak: std::sync::Weak<Inner>, c: Connected, mut recv: RecvStream) {
    match recv.read_to_end(MAX_MESSAGE + 1).await {
        Ok(buf) if !buf.is_empty() => {
            let buf = Bytes::from(buf);
            deliver(&weak, &c, buf[0], buf.slice(1..));
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(peer = %c.peer, error = %e, "dropped message stream"),
    }
}

fn deliver(weak: &std::sync::Weak<Inner>, c: &Connected, channel: u8, payload: Bytes) {
    let Some(inner) = weak.upgrade() else { return };
    inner.stats.messages_in.fetch_add(1, Ordering::Relaxed);
    inner
        .stats
        .bytes_in
        .fetch_add(payload.len() as u64, Ordering::Relaxed);
    let tx = inner.subscribers.lock().unwrap().get(&channel).cloned();
    if let Some(tx) = tx {
        let _ = tx.try_send(Message {
            from: c.clone(),
            channel,
            payload,
        });
    }
}

async fn reload_loop(weak: std::sync::Weak<Inner>) {
    let Some(inner) = weak.upgrade() else { return };
    let interval = inner.config.reload_interval;
    let mut stamp = inner.config.tls.stamp();
    drop(inner);
    loop {
        tokio::time::sleep(interval).await;
        let Some(inner) = weak.upgrade() else { return };
        let now = inner.config.tls.stamp();
        if now != stamp {
            // Only remember the stamp once a reload succeeded, so a half
            // written pair of files is retried on the next tick.
            if reload(&inner).is_ok() {
                stamp = now;
            }
        }
    }
}

fn reload(inner: &Inner) -> Result<(), EndpointError> {
    let result = (|| {
        let material = inner.config.tls.load(&inner.refusals)?;
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
