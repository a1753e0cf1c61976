//! The local service instances this node fronts: what each is configured
//! as, its health and the HTTP versions it was found to speak, its load
//! figures, and the pooled clients that reach the instances. No I/O here:
//! `health.rs` checks and detects, `upstream.rs` forwards.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use gossip::Health;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::balance::EndpointState;
use crate::config::{Protocol, ServiceSpec};
use crate::frame::ProxyBody;
use crate::h1;

/// A local instance and what the node measures of it.
pub(crate) struct LocalService {
    pub spec: ServiceSpec,
    health: AtomicU8,
    /// With protocol `auto`, what the instance was found to speak: 0 not
    /// known yet, else bit 1 HTTP/1.1 and bit 2 h2c (see `health::detect`).
    detected: AtomicU8,
    /// A background re-detection is running.
    pub reprobing: AtomicBool,
    pub in_flight: AtomicU64,
    pub latency: EndpointState,
    /// The record last published in gossip (JSON).
    pub published: Mutex<String>,
    /// Idle HTTP/1.1 connections to the instance for hyper's client
    /// (upgrades, streamed bodies; see [`Http1Pool`]).
    pub http1: Http1Pool,
    /// Idle HTTP/1.1 connections for the node's own client (every other
    /// request; see `h1.rs`).
    pub conns: Arc<h1::Pool>,
}

impl LocalService {
    /// A not yet checked instance of `spec`.
    pub fn new(spec: ServiceSpec) -> Self {
        LocalService {
            spec,
            health: AtomicU8::new(0),
            detected: AtomicU8::new(0),
            reprobing: AtomicBool::new(false),
            in_flight: AtomicU64::new(0),
            latency: EndpointState::detached(),
            published: Mutex::new(String::new()),
            http1: Http1Pool::default(),
            conns: Arc::default(),
        }
    }

    pub fn health(&self) -> Health {
        match self.health.load(Ordering::Relaxed) {
            1 => Health::Healthy,
            2 => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }

    /// Whether to speak h2c to the instance for a caller that spoke h2c
    /// (`caller_h2`) or HTTP/1.1: pinned by its protocol; with `auto`, the
    /// caller's version if the instance was found to speak it, else the one
    /// it speaks; `None` while that is not known.
    pub fn h2_for(&self, caller_h2: bool) -> Option<bool> {
        match self.spec.protocol {
            Protocol::H2c => Some(true),
            Protocol::Http1 | Protocol::Tcp => Some(false),
            Protocol::Auto => {
                let (h1, h2) = self.detected()?;
                Some(match (h1, h2) {
                    (true, true) | (false, false) => caller_h2,
                    (h1, _) => !h1,
                })
            }
        }
    }

    /// What detection found: (speaks HTTP/1.1, speaks h2c).
    pub fn detected(&self) -> Option<(bool, bool)> {
        let v = self.detected.load(Ordering::Relaxed);
        (v != 0).then_some((v & 2 != 0, v & 4 != 0))
    }

    /// Remembers what detection found (`None`: forget, detect again).
    pub fn set_detected(&self, found: Option<(bool, bool)>) {
        let v = found.map_or(0, |(h1, h2)| 1 | u8::from(h1) << 1 | u8::from(h2) << 2);
        if self.detected.swap(v, Ordering::Relaxed) != v
            && let Some((http1, h2c)) = found
        {
            tracing::info!(service = %self.spec.name, addr = %self.spec.addr, http1, h2c, "detected the HTTP versions the local instance speaks");
        }
    }

    /// Sets the health; true when it changed.
    pub fn set_health(&self, h: Health) -> bool {
        let v = match h {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        };
        self.health.swap(v, Ordering::Relaxed) != v
    }
}

/// Pooled clients to local instances.
pub(crate) struct Clients {
    pub http1: Client<HttpConnector, ProxyBody>,
    pub h2: Client<HttpConnector, ProxyBody>,
}

impl Clients {
    pub fn new() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(true)
            .build(conn);
        Clients { http1, h2 }
    }

    /// The client for h2c (`true`) or HTTP/1.1.
    pub fn speaking(&self, h2: bool) -> &Client<HttpConnector, ProxyBody> {
        if h2 { &self.h2 } else { &self.http1 }
    }
}

/// Idle HTTP/1.1 connections kept per local instance (as the pooled
/// client's `pool_max_idle_per_host`).
pub const POOL_MAX_IDLE: usize = 256;
/// An idle HTTP/1.1 connection to a local instance is closed after this
/// long unused (as the pooled client's `pool_idle_timeout`).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The idle keep-alive HTTP/1.1 connections to one local instance, most
/// recently used last. Forwarding a request takes one (or dials), and the
/// response body hands it back when it ends ([`Returning`]): no lookup by
/// host, no task per request. hyper's own connection task drives each.
#[derive(Default)]
pub(crate) struct Http1Pool {
    idle: Mutex<Vec<(SendRequest<ProxyBody>, Instant)>>,
}

impl Http1Pool {
    /// The most recently used idle connection that is ready for a request
    /// now (those idle past [`POOL_IDLE_TIMEOUT`] or closed are dropped on
    /// the way). One still finishing its last response stays for later: a
    /// request never waits for it (as with the pooled client, it dials).
    pub fn take(&self) -> Option<SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().unwrap();
        let now = Instant::now();
        idle.retain(|(tx, since)| {
            !tx.is_closed() && now.duration_since(*since) < POOL_IDLE_TIMEOUT
        });
        let i = idle.iter().rposition(|(tx, _)| tx.is_ready())?;
        Some(idle.remove(i).0)
    }

    /// Keeps `tx` for the next request (dropped when the pool is full or
    /// the connection closed).
    pub fn put(&self, tx: SendRequest<ProxyBody>) {
        if tx.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < POOL_MAX_IDLE {
            idle.push((tx, Instant::now()));
        }
    }

    /// Closes the connections idle past [`POOL_IDLE_TIMEOUT`] (and those
    /// the instance closed).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.lock().unwrap().retain(|(tx, since)| {
            !tx.is_closed() && now.duration_since(*since) < POOL_IDLE_TIMEOUT
        });
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A response body from a pooled HTTP/1.1 connection: when it ends, the
/// connection goes back to its pool; dropped before its end, the connection
/// goes with it (hyper closes a connection whose response was not read).
pub(crate) struct Returning {
    body: Incoming,
    slot: Option<(SendRequest<ProxyBody>, Arc<LocalService>)>,
}

impl Returning {
    /// `body`, handing `tx` back to `svc`'s pool at its end.
    pub fn new(body: Incoming, tx: SendRequest<ProxyBody>, svc: Arc<LocalService>) -> Self {
        let mut r = Returning {
            body,
            slot: Some((tx, svc)),
        };
        r.give_back_at_end();
        r
    }

    fn give_back_at_end(&mut self) {
        if self.body.is_end_stream()
            && let Some((tx, svc)) = self.slot.take()
        {
            svc.http1.put(tx);
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &r {
            Some(Ok(_)) => self.give_back_at_end(),
            None => {
                if let Some((tx, svc)) = self.slot.take() {
                    svc.http1.put(tx);
                }
            }
            Some(Err(_)) => self.slot = None,
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
