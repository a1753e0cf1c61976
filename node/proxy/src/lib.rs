//! Service traffic through the mesh.
//!
//! The proxy owns local service registration and health ([`health`]), the
//! routing table read from gossip (this module), endpoint choice and
//! resilience ([`balance`]), the outbound listener apps call ([`outbound`]),
//! the inbound side that serves peers' QUIC streams ([`inbound`]), the wire
//! framing between nodes ([`frame`], documented in `docs/FRAMES.md`), and the
//! golden signals ([`stats`]). It publishes through gossip keys `svc.<name>`
//! and the node's serving state, and must not touch membership itself.

pub mod access;
pub mod balance;
pub mod config;
pub mod frame;
mod health;
mod inbound;
pub mod listen;
mod outbound;
pub mod stats;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use gossip::schema::keys;
use gossip::{Gossip, Health, MemberState, ServiceRecord, ServingState};
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::{Endpoint, Identity};

pub use balance::{Balancer, EndpointView, RetryBudget, Target};
pub use config::{
    Protocol, ProxyArgs, ProxyConfig, ProxyFile, RetryConfig, ServiceSpec, UpstreamListener,
};
pub use stats::{EdgeStats, Stats};

use policy::PolicyPlane;

/// Response header naming why the mesh itself answered with an error.
pub const ERROR_HEADER: &str = "shoal-error";
/// Provenance header the serving node adds: `by=<node>;from=<caller node>;svc=<caller service>`.
pub const FORWARDED_HEADER: &str = "shoal-forwarded";
/// Request header an app may set to override the default timeout (`250ms`, `2s`).
pub const TIMEOUT_HEADER: &str = "shoal-timeout";

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
}

/// A local instance and what the node measures of it.
pub(crate) struct LocalService {
    pub spec: ServiceSpec,
    health: AtomicU8,
    /// With protocol `auto`, what the instance was found to speak: 0 not
    /// known yet, else bit 1 HTTP/1.1 and bit 2 h2c (see [`health::detect`]).
    detected: AtomicU8,
    /// A background re-detection is running.
    reprobing: AtomicBool,
    pub in_flight: AtomicU64,
    pub latency: balance::EndpointState,
    published: Mutex<String>,
}

impl LocalService {
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
            Protocol::Http1 => Some(false),
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

    fn set_health(&self, h: Health) -> bool {
        let v = match h {
            Health::Unknown => 0,
            Health::Healthy => 1,
            Health::Unhealthy => 2,
        };
        self.health.swap(v, Ordering::Relaxed) != v
    }
}

/// One endpoint of a service as gossip and this node see it (admin view).
#[derive(Debug, Clone, Serialize)]
pub struct EndpointInfo {
    /// Node fronting the instance.
    pub node: String,
    /// The node's QUIC address.
    pub addr: SocketAddr,
    /// The node's membership state.
    pub state: MemberState,
    /// The node's serving state.
    pub serving: ServingState,
    /// Whether this node would route to it now (healthy, alive, serving).
    pub routable: bool,
    /// Why this node refuses the endpoint although gossip offers it:
    /// `peer-not-serving` (the peer's certificate does not name the service).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<&'static str>,
    /// What the node published.
    #[serde(flatten)]
    pub record: ServiceRecord,
    /// This node's own view (down, ejected, in flight, latency).
    pub from_here: Option<EndpointView>,
}

/// A service and its endpoints (admin view).
#[derive(Debug, Clone, Serialize)]
pub struct ServiceInfo {
    /// Service name.
    pub service: String,
    /// Its endpoints.
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Default, Clone)]
struct Table {
    /// Every published endpoint, routable or not.
    all: BTreeMap<String, Vec<EndpointInfo>>,
    /// Routable targets per service.
    targets: HashMap<String, Arc<[Target]>>,
}

/// State the outbound, inbound and health tasks share.
pub(crate) struct Shared {
    pub node: String,
    pub zone: String,
    pub config: ProxyConfig,
    pub endpoint: Endpoint,
    pub gossip: Gossip,
    pub balancer: Balancer,
    pub stats: Arc<Stats>,
    pub local: HashMap<String, Arc<LocalService>>,
    pub clients: inbound::Clients,
    pub outbound_in_flight: AtomicU64,
    pub inbound_in_flight: AtomicU64,
    pub draining: AtomicBool,
    /// Set once the routing table was built after the node joined gossip.
    routes_ready: AtomicBool,
    pub policy: PolicyPlane,
    table: RwLock<Arc<Table>>,
    budgets: Mutex<HashMap<String, Arc<RetryBudget>>>,
    /// Endpoints refused because the peer's certificate does not name the
    /// service, by (service, node).
    refused: Mutex<HashMap<(String, String), Refusal>>,
}

/// An endpoint dropped from a service's table: gossip offered it, but the
/// QUIC peer at its address holds a certificate that does not name the
/// service (or names another node).
struct Refusal {
    addr: SocketAddr,
    peer: Arc<Identity>,
    at: Instant,
}

/// How long a refusal holds once no connection to the refused peer is
/// cached (while one is, it holds as long as that peer's identity is the one
/// refused).
const REFUSAL_HOLD: Duration = Duration::from_secs(60);

/// Whether the peer behind `target` may serve it: its certificate names
/// `target`'s node and service.
pub(crate) fn peer_serves(peer: &Identity, target: &Target) -> bool {
    peer.node == target.node && peer.may_serve(&target.service)
}

impl Shared {
    /// Routable targets of `service`: `None` if no node publishes it.
    pub fn targets(&self, service: &str) -> Option<Arc<[Target]>> {
        let t = self.table.read().unwrap().clone();
        if !t.all.contains_key(service) {
            return None;
        }
        Some(
            t.targets
                .get(service)
                .cloned()
                .unwrap_or_else(|| Arc::new([])),
        )
    }

    /// Refuses `target` because the QUIC peer at its address holds `peer`'s
    /// certificate, which does not name the service (or the node): counts it,
    /// logs it, and drops the endpoint from the service's table while that
    /// peer identity stays at that address.
    pub fn refuse(&self, target: &Target, peer: &Arc<Identity>) {
        self.stats.peer_not_serving(&target.service);
        let key = (target.service.clone(), target.node.clone());
        let new = self
            .refused
            .lock()
            .unwrap()
            .insert(
                key,
                Refusal {
                    addr: target.addr,
                    peer: peer.clone(),
                    at: Instant::now(),
                },
            )
            .is_none();
        if new {
            tracing::warn!(
                service = %target.service,
                node = %target.node,
                addr = %target.addr,
                peer = %peer,
                peer_services = ?peer.services,
                "gossip says this endpoint serves the service but the peer's certificate does not name it; refused and dropped from the routing table"
            );
        }
        let mut table = self.table.write().unwrap();
        let mut t = Table::clone(&table);
        if let Some(list) = t.targets.get_mut(&target.service) {
            let kept: Vec<Target> = list
                .iter()
                .filter(|x| x.node != target.node)
                .cloned()
                .collect();
            *list = kept.into();
        }
        for e in t.all.get_mut(&target.service).into_iter().flatten() {
            if e.node == target.node {
                e.routable = false;
                e.refused = Some("peer-not-serving");
            }
        }
        *table = Arc::new(t);
    }

    /// Whether some endpoint of `service` is refused as `peer-not-serving`.
    pub fn has_refused(&self, service: &str) -> bool {
        self.refused
            .lock()
            .unwrap()
            .keys()
            .any(|(s, _)| s == service)
    }

    /// Whether `(service, node)` at `addr` is still refused; forgets a
    /// refusal that no longer applies (another address, another identity at
    /// that address, or no connection for [`REFUSAL_HOLD`]).
    fn still_refused(
        &self,
        refused: &mut HashMap<(String, String), Refusal>,
        service: &str,
        node: &str,
        addr: SocketAddr,
    ) -> bool {
        let key = (service.to_string(), node.to_string());
        let Some(r) = refused.get(&key) else {
            return false;
        };
        let holds = r.addr == addr
            && match self.endpoint.cached(addr) {
                Some(c) => *c.peer == *r.peer,
                None => r.at.elapsed() < REFUSAL_HOLD,
            };
        if !holds {
            refused.remove(&key);
        }
        holds
    }

    /// The retry budget of `service`.
    pub fn budget(&self, service: &str) -> Arc<RetryBudget> {
        let mut budgets = self.budgets.lock().unwrap();
        if let Some(b) = budgets.get(service) {
            return b.clone();
        }
        budgets
            .entry(service.to_string())
            .or_insert_with(|| Arc::new(RetryBudget::new(&self.config.retry)))
            .clone()
    }

    /// The service identity this node's apps call as: the first local service
    /// its certificate names, else the certificate's first service, else none.
    pub fn source_service(&self) -> String {
        let id = self.endpoint.identity();
        let mut local: Vec<&String> = self.local.keys().collect();
        local.sort();
        local
            .into_iter()
            .find(|s| id.may_serve(s))
            .or(id.services.first())
            .cloned()
            .unwrap_or_default()
    }

    /// Publishes `svc.<name>` for a local service if it changed.
    pub async fn publish(&self, svc: &LocalService) {
        if !self.endpoint.identity().may_serve(&svc.spec.name) {
            return;
        }
        let record = ServiceRecord {
            health: svc.health(),
            weight: svc.spec.weight,
            zone: self.zone.clone(),
            in_flight: svc.in_flight.load(Ordering::Relaxed),
            ewma_ms: svc
                .latency
                .ewma_ns()
                .map(|n| (n / 1e5).round() / 10.0)
                .unwrap_or(0.0),
            protocol: match svc.spec.protocol {
                Protocol::Auto => "auto",
                Protocol::Http1 => "http1",
                Protocol::H2c => "h2c",
            }
            .into(),
        };
        let Ok(json) = serde_json::to_string(&record) else {
            return;
        };
        {
            let mut last = svc.published.lock().unwrap();
            if *last == json {
                return;
            }
            *last = json.clone();
        }
        self.gossip
            .set_key(&keys::service(&svc.spec.name), &json)
            .await;
    }

    /// Rebuilds the routing table from gossip.
    async fn refresh(&self) {
        let joined = self.gossip.joined().await;
        let members = self.gossip.members().await;
        let by_name: HashMap<&str, &gossip::Member> =
            members.iter().map(|m| (m.name.as_str(), m)).collect();
        let mut table = Table::default();
        let published = self.gossip.scan_all(keys::SERVICE_PREFIX).await;
        let mut refused_now = self.refused.lock().unwrap();
        for (node, key, value) in published
            .into_iter()
            .flat_map(|p| p.keys.into_iter().map(move |(k, v)| (p.node.clone(), k, v)))
        {
            let Some(m) = by_name.get(node.as_str()) else {
                continue;
            };
            let service = key[keys::SERVICE_PREFIX.len()..].to_string();
            let record: ServiceRecord = serde_json::from_str(&value).unwrap_or_default();
            let refused = (!m.is_self
                && !refused_now.is_empty()
                && self.still_refused(&mut refused_now, &service, &node, m.addr))
            .then_some("peer-not-serving");
            let routable = record.health == Health::Healthy
                && m.state == MemberState::Alive
                && m.serving == ServingState::Serving
                && refused.is_none();
            if routable {
                let t = self.balancer.target(
                    &service,
                    &node,
                    m.addr,
                    &m.zone,
                    record.weight.max(1),
                    m.is_self,
                    record.ewma_ms,
                );
                let list = table.targets.entry(service.clone()).or_default();
                let mut v: Vec<Target> = list.to_vec();
                v.push(t);
                *list = v.into();
            }
            table.all.entry(service).or_default().push(EndpointInfo {
                node,
                addr: m.addr,
                state: m.state,
                serving: m.serving,
                routable,
                refused,
                record,
                from_here: None,
            });
        }
        drop(refused_now);
        *self.table.write().unwrap() = Arc::new(table);
        if joined {
            self.routes_ready.store(true, Ordering::Relaxed);
        }
        for m in &members {
            if m.is_self {
                continue;
            }
            let rtt = (m.state == MemberState::Alive)
                .then(|| self.endpoint.cached(m.addr).map(|c| c.conn.rtt()))
                .flatten();
            self.stats.peer_rtt(&m.name, rtt);
        }
    }
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
        let mut local = HashMap::new();
        for spec in &config.services {
            if !identity.may_serve(&spec.name) {
                tracing::warn!(
                    service = %spec.name,
                    "the node certificate does not name this service (svc SAN); it is not published and inbound requests for it are refused"
                );
            }
            local.insert(
                spec.name.clone(),
                Arc::new(LocalService {
                    spec: spec.clone(),
                    health: AtomicU8::new(0),
                    detected: AtomicU8::new(0),
                    reprobing: AtomicBool::new(false),
                    in_flight: AtomicU64::new(0),
                    latency: balance::EndpointState::detached(),
                    published: Mutex::new(String::new()),
                }),
            );
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
        let shared = Arc::new(Shared {
            node: node.name.clone(),
            zone: node.zone.clone(),
            balancer: Balancer::new(node.zone.clone(), &config, down_base),
            stats: Stats::new(registry),
            local,
            clients: inbound::Clients::new(),
            outbound_in_flight: AtomicU64::new(0),
            inbound_in_flight: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            routes_ready: AtomicBool::new(false),
            table: RwLock::new(Arc::new(Table::default())),
            budgets: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            config,
            endpoint: endpoint.clone(),
            gossip: gossip.clone(),
            policy,
        });
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
        self.shared.routes_ready.load(Ordering::Relaxed)
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
        let t = self.shared.table.read().unwrap().clone();
        t.all
            .iter()
            .map(|(svc, eps)| ServiceInfo {
                service: svc.clone(),
                endpoints: eps
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        e.from_here = Some(self.shared.balancer.view(svc, &e.node));
                        e
                    })
                    .collect(),
            })
            .collect()
    }

    /// Per-edge figures over the last minute.
    pub fn stats(&self) -> Vec<EdgeStats> {
        self.shared.stats.window()
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
        self.shared.outbound_in_flight.load(Ordering::Relaxed)
            + self.shared.inbound_in_flight.load(Ordering::Relaxed)
    }

    /// Announces `draining` by gossip, keeps serving while peers learn it
    /// (`linger`), then waits for in-flight requests to finish, up to `timeout`.
    /// Returns how many requests were still in flight at the end.
    pub async fn drain(&self, linger: Duration, timeout: Duration) -> u64 {
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.gossip.set_serving(ServingState::Draining).await;
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
        let _ = self.shutdown.send(true);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(uris: &[&str]) -> Identity {
        let uris: Vec<String> = uris.iter().map(|s| s.to_string()).collect();
        Identity::from_uris(&uris).unwrap()
    }

    fn target(node: &str, service: &str) -> Target {
        Target {
            service: service.into(),
            node: node.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            zone: "default".into(),
            weight: 100,
            is_self: false,
            gossip_ewma_ms: 0.0,
            state: Arc::default(),
        }
    }

    #[test]
    fn a_peer_serves_only_what_its_certificate_names_as_the_node_gossip_named() {
        let n2 = identity(&["spiffe://t/node/n2", "spiffe://t/svc/web"]);
        assert!(peer_serves(&n2, &target("n2", "web")));
        assert!(!peer_serves(&n2, &target("n2", "api")), "service not named");
        assert!(
            !peer_serves(&n2, &target("ghost", "web")),
            "a member claiming an address whose certificate names another node"
        );
        let rogue = identity(&["spiffe://t/node/rogue", "spiffe://t/svc/other"]);
        assert!(!peer_serves(&rogue, &target("rogue", "web")));
        assert!(!peer_serves(&rogue, &target("rogue", "webx")));
    }
}
