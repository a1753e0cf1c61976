//! The local service instances this node fronts: what each is configured
//! as, its health and the HTTP versions it was found to speak, its load
//! figures, and the pooled clients that reach the instances. No I/O here:
//! `health.rs` checks and detects, `upstream.rs` forwards.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use gossip::Health;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::balance::EndpointState;
use crate::config::{Protocol, ServiceSpec};
use crate::frame::ProxyBody;

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
