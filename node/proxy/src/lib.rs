//! Service traffic through the mesh.
//!
//! One request, in the order it travels: the outbound listener apps call
//! ([`outbound`]) asks the pure route plan ([`plan`]) where it goes, runs
//! attempts ([`attempt`]) choosing endpoints ([`balance`]) and deciding
//! retries with a pure classifier ([`retry`]); an attempt crosses to the
//! serving node as wire frames over one QUIC stream ([`frame`], documented
//! in `docs/FRAMES.md`), where the inbound side ([`inbound`]) authorizes it
//! and hands it to the local instance ([`upstream`]). Failures the mesh
//! answers itself are one typed enum ([`error::MeshError`]). An HTTP/1.1
//! upgrade (WebSocket) rides the same stream, spliced after the 101
//! ([`upgrade`]); a host that is not a mesh service may go out from this
//! node when `--egress` admits it ([`egress`]).
//!
//! Beside the path: shared state and the routing table read from gossip
//! ([`state`]), local instances ([`local`]) and their health checks and
//! protocol detection ([`health`]), the listeners' accept loop ([`listen`]),
//! golden signals ([`stats`]). Opaque TCP services ([`tcp`], stream kind
//! 0x02) and `CONNECT` tunnels (`connect.rs`) move bytes with the pump
//! between a local connection and a QUIC stream ([`splice`]).
//! The proxy publishes through gossip keys `svc.<name>` and the node's
//! serving state, and must not touch membership itself.

pub mod access;
mod attempt;
pub mod balance;
mod body;
pub mod config;
mod connect;
pub mod egress;
pub mod error;
pub mod filters;
pub mod frame;
mod h1;
mod h1_server;
mod health;
mod inbound;
pub mod listen;
mod local;
mod outbound;
mod own;
pub mod plan;
pub mod retry;
mod rng;
pub mod splice;
mod state;
pub mod stats;
pub mod tcp;
mod upgrade;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gossip::Gossip;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::Endpoint;

pub use balance::{Balancer, EndpointView, RetryBudget, Target};
pub use config::{
    Protocol, ProxyArgs, ProxyConfig, ProxyFile, RetryConfig, ServiceSpec, UpstreamListener,
};
pub use egress::Egress;
pub use error::{ERROR_HEADER, MeshError};
pub use plan::TIMEOUT_HEADER;
pub use state::{EndpointInfo, ServiceInfo};
pub use stats::{EdgeStats, Stats};
pub use upstream::FORWARDED_HEADER;

use policy::PolicyPlane;
use state::Shared;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("outbound listener {addr}: {source}")]
    Outbound {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("upstream listener {addr} for {service}: {source}")]
    Upstream {
        service: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "service {service}: its address {addr} is one of this node's own listeners, so every request to it would come back to the node (a forwarding loop)"
    )]
    ServiceIsOwnListener { service: String, addr: SocketAddr },
}

/// Who the proxy runs for: the node's name and zone, and its proxy settings.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    /// The node's name (its gossip id and certificate node name).
    pub name: String,
    /// Its zone, preferred when choosing endpoints.
    pub zone: String,
    /// Listeners, local services, timeouts, retries and limits.
    pub proxy: ProxyConfig,
}

/// The running proxy of one node.
pub struct Proxy {
    shared: Arc<Shared>,
    outbound_addr: Option<SocketAddr>,
    upstream_addrs: Vec<(String, SocketAddr)>,
    admin_guard: Arc<listen::Guard>,
    shutdown: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Proxy {
    /// Starts the proxy: health checks and publication of local services,
    /// the routing table, the inbound stream server and the outbound listener.
    pub async fn start(
        node: &NodeInfo,
        endpoint: Endpoint,
        gossip: Gossip,
        registry: &mut Registry,
        policy: PolicyPlane,
    ) -> Result<Self, ProxyError> {
        let config = node.proxy.clone();
        let identity = endpoint.identity();
        for spec in &config.services {
            if !identity.may_serve(&spec.name) {
                tracing::warn!(
                    service = %spec.name,
                    "the node certificate does not name this service (svc SAN); it is not published and inbound requests for it are refused"
                );
            }
        }
        let detection = gossip.config().detection_window();
        let down_base = (detection * 3).clamp(Duration::from_secs(1), balance::DOWN_MAX);
        let listener = match config.outbound {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ProxyError::Outbound { addr, source })?,
            ),
            None => None,
        };
        let outbound_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut upstream_listeners = Vec::new();
        for u in &config.upstreams {
            let err = |source| ProxyError::Upstream {
                service: u.service.clone(),
                addr: u.listen,
                source,
            };
            let l = TcpListener::bind(u.listen).await.map_err(err)?;
            let addr = l.local_addr().map_err(err)?;
            upstream_listeners.push((u.service.clone(), addr, l));
        }
        let upstream_addrs: Vec<(String, SocketAddr)> = upstream_listeners
            .iter()
            .map(|(s, a, _)| (s.clone(), *a))
            .collect();
        let own: Vec<SocketAddr> = outbound_addr
            .into_iter()
            .chain(upstream_addrs.iter().map(|(_, a)| *a))
            .collect();
        if let Some(spec) = config
            .services
            .iter()
            .find(|spec| own::is_own(&own, spec.addr, own::host_has_ip))
        {
            return Err(ProxyError::ServiceIsOwnListener {
                service: spec.name.clone(),
                addr: spec.addr,
            });
        }
        let listener_metrics = listen::ListenerMetrics::new(registry);
        let limits = |max_connections| listen::Limits {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.http_idle_timeout,
            max_connections,
        };
        let outbound_guard = listen::Guard::new(
            "outbound",
            limits(config.max_connections),
            listener_metrics.clone(),
        );
        let upstream_guard = listen::Guard::sharing(
            "upstream",
            limits(config.max_connections),
            listener_metrics.clone(),
            outbound_guard.slots(),
        );
        let admin_guard = listen::Guard::new(
            "admin",
            limits(config.admin_max_connections),
            listener_metrics,
        );
        let shared = Arc::new(Shared::new(
            node.name.clone(),
            node.zone.clone(),
            config,
            endpoint.clone(),
            gossip.clone(),
            Stats::new(registry),
            tcp::TcpStats::new(registry),
            policy,
            down_base,
            own,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for svc in shared.local.values() {
            tasks.push(tokio::spawn(health::run(shared.clone(), svc.clone())));
        }
        let tick = gossip
            .config()
            .interval
            .clamp(Duration::from_millis(50), Duration::from_millis(250));
        let weak = Arc::downgrade(&shared);
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(s) = weak.upgrade() else { return };
                s.refresh().await;
                drop(s);
                tokio::time::sleep(tick).await;
            }
        }));
        if let Some(streams) = endpoint.take_bi_streams() {
            tasks.push(tokio::spawn(inbound::serve(shared.clone(), streams)));
        } else {
            tracing::warn!(
                "another part of the node took the QUIC stream receiver; inbound traffic is off"
            );
        }
        if let Some(l) = listener {
            tasks.push(tokio::spawn(outbound::serve(
                shared.clone(),
                l,
                None,
                outbound_guard,
                shutdown_rx.clone(),
            )));
        }
        for (service, _, l) in upstream_listeners {
            tasks.push(tokio::spawn(outbound::serve(
                shared.clone(),
                l,
                Some(service.into()),
                upstream_guard.clone(),
                shutdown_rx.clone(),
            )));
        }
        Ok(Proxy {
            shared,
            outbound_addr,
            upstream_addrs,
            admin_guard,
            shutdown,
            tasks: Mutex::new(tasks),
        })
    }

    /// Whether the routing table has been built from gossip since the node
    /// joined (what `/readyz` waits for besides joining).
    pub fn routes_ready(&self) -> bool {
        self.shared.routes_ready()
    }

    /// The admin listener's limits and accounting (`--admin-max-connections`,
    /// `--header-read-timeout`, `--http-idle-timeout`).
    pub fn admin_guard(&self) -> Arc<listen::Guard> {
        self.admin_guard.clone()
    }

    /// The bound outbound listener address, if any.
    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound_addr
    }

    /// The bound address of the per-upstream listener for `service`, if any.
    pub fn upstream_addr(&self, service: &str) -> Option<SocketAddr> {
        self.upstream_addrs
            .iter()
            .find(|(s, _)| s == service)
            .map(|(_, a)| *a)
    }

    /// Every service in the mesh with its endpoints.
    pub fn services(&self) -> Vec<ServiceInfo> {
        self.shared.services()
    }

    /// Per-edge figures over the last minute.
    pub fn stats(&self) -> Vec<EdgeStats> {
        self.shared.stats.window()
    }

    /// Opaque TCP totals per edge since the node started.
    pub fn tcp_stats(&self) -> Vec<tcp::TcpEdgeStats> {
        self.shared.tcp.edges()
    }

    /// A live tap: every request's event from now on (see [`access`]).
    pub fn tap(&self) -> access::TapReceiver {
        self.shared.stats.subscribe()
    }

    /// The balancer's view of `(service, node)` (attempts, status).
    pub fn endpoint_view(&self, service: &str, node: &str) -> EndpointView {
        self.shared.balancer.view(service, node)
    }

    /// Requests in flight through this node (outbound + inbound).
    pub fn in_flight(&self) -> u64 {
        self.shared.in_flight()
    }

    /// Announces `draining` by gossip, keeps serving while peers learn it
    /// (`linger`), then waits for in-flight requests to finish, up to `timeout`.
    /// Returns how many requests were still in flight at the end.
    pub async fn drain(&self, linger: Duration, timeout: Duration) -> u64 {
        self.shared.announce_draining().await;
        tracing::info!(?linger, ?timeout, "draining");
        let start = Instant::now();
        let end = start + timeout;
        tokio::time::sleep(linger.min(timeout)).await;
        while self.in_flight() > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let left = self.in_flight();
        tracing::info!(left, took = ?start.elapsed(), "drained");
        left
    }

    /// Stops every proxy task.
    pub fn stop(&self) {
        self.shutdown.send_replace(true);
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop();
    }
}
