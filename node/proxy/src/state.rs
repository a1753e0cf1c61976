//! State the request path shares: the routing table read from gossip (with
//! the endpoints refused as `peer-not-serving`), retry budgets, the local
//! instances, the in-flight counts, and the seeded randomness. It must not
//! import the outbound or inbound sides: they read it, never the reverse.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use gossip::schema::keys;
use gossip::{Gossip, Health, MemberState, ServiceRecord, ServingState};
use policy::PolicyPlane;
use serde::Serialize;
use transport::{Endpoint, Identity};

use crate::balance::{Balancer, EndpointView, RetryBudget, Target};
use crate::config::ProxyConfig;
use crate::local::{Clients, LocalService};
use crate::rng::Seeder;
use crate::stats::Stats;

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
    targets: foldhash::HashMap<String, Arc<[Target]>>,
}

/// State the outbound, inbound and health tasks share. Public fields are
/// the ones the request path reads; the table, refusals, budgets and
/// counters are reached through methods.
pub(crate) struct Shared {
    /// This node's name (provenance header).
    pub node: String,
    /// The proxy's settings.
    pub config: ProxyConfig,
    /// The QUIC endpoint (dials, the node's own identity).
    pub endpoint: Endpoint,
    /// Endpoint choice and outcomes.
    pub balancer: Balancer,
    /// Golden signals.
    pub stats: Arc<Stats>,
    /// Opaque TCP connection metrics.
    pub tcp: Arc<crate::tcp::TcpStats>,
    /// Policy snapshots, rate limiter, refusal metrics.
    pub policy: PolicyPlane,
    /// Local instances by service.
    pub local: foldhash::HashMap<String, Arc<LocalService>>,
    /// Pooled clients to the local instances.
    pub clients: Clients,
    /// Per-request randomness.
    pub rng: Seeder,
    zone: String,
    gossip: Gossip,
    outbound_in_flight: AtomicU64,
    inbound_in_flight: AtomicU64,
    /// Set once the routing table was built after the node joined gossip.
    routes_ready: AtomicBool,
    table: RwLock<Arc<Table>>,
    budgets: Mutex<foldhash::HashMap<String, Arc<RetryBudget>>>,
    /// Endpoints refused because the peer's certificate does not name the
    /// service, by (service, node).
    refused: Mutex<HashMap<(String, String), Refusal>>,
    /// [`Shared::source_service`]'s answer for the certificate it was worked
    /// out from (a rotated certificate is a new `Arc`, so it is worked out
    /// again).
    source: Mutex<Option<(Arc<Identity>, String)>>,
    /// This node's own HTTP listeners (outbound and per-upstream): a
    /// destination among them is a forwarding loop (`own.rs`).
    own: Vec<SocketAddr>,
    /// The TCP connections this node has open to its local instances, by
    /// their own address (`own::Dials`): a peer's TCP stream for a
    /// connection from one of them is a loop through another node.
    pub(crate) dials: Arc<crate::own::Dials>,
    /// At most one WARN a second for refused TCP forwarding loops.
    pub(crate) loop_log: crate::listen::Throttle,
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
    /// State for a node named `node` in `zone`; `down_base` as
    /// [`Balancer::new`] takes it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node: String,
        zone: String,
        config: ProxyConfig,
        endpoint: Endpoint,
        gossip: Gossip,
        stats: Arc<Stats>,
        tcp: Arc<crate::tcp::TcpStats>,
        policy: PolicyPlane,
        down_base: Duration,
        own: Vec<SocketAddr>,
    ) -> Self {
        let local = config
            .services
            .iter()
            .map(|spec| (spec.name.clone(), Arc::new(LocalService::new(spec.clone()))))
            .collect();
        Shared {
            balancer: Balancer::new(zone.clone(), &config, down_base),
            rng: Seeder::new(config.rng_seed),
            node,
            zone,
            local,
            clients: Clients::new(),
            stats,
            tcp,
            outbound_in_flight: AtomicU64::new(0),
            inbound_in_flight: AtomicU64::new(0),
            routes_ready: AtomicBool::new(false),
            table: RwLock::new(Arc::new(Table::default())),
            budgets: Mutex::default(),
            refused: Mutex::new(HashMap::new()),
            source: Mutex::new(None),
            own,
            dials: Arc::default(),
            loop_log: crate::listen::Throttle::new(),
            config,
            endpoint,
            gossip,
            policy,
        }
    }

    /// Whether a connection to `to` would come back into this node's own
    /// listeners (a forwarding loop).
    pub fn is_own_listener(&self, to: SocketAddr) -> bool {
        crate::own::is_own(&self.own, to, crate::own::host_has_ip)
    }

    /// Whether `host:port` names this node's own listener: the port is one
    /// it listens on and the name resolves to an address among them (the
    /// name is looked up only then).
    pub async fn names_own_listener(&self, host: &str, port: u16) -> bool {
        if !self.own.iter().any(|l| l.port() == port) {
            return false;
        }
        match tokio::net::lookup_host((host, port)).await {
            Ok(mut addrs) => addrs.any(|a| self.is_own_listener(a)),
            Err(_) => false,
        }
    }

    /// Counts an outbound request in flight until the guard drops; answers
    /// the count with it included.
    pub fn outbound_request(&self) -> (Counted<'_>, u64) {
        let n = self.outbound_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        (Counted(&self.outbound_in_flight), n)
    }

    /// Counts an inbound request in flight until the guard drops.
    pub fn inbound_request(&self) -> Counted<'_> {
        self.inbound_in_flight.fetch_add(1, Ordering::Relaxed);
        Counted(&self.inbound_in_flight)
    }

    /// Requests in flight through this node (outbound + inbound).
    pub fn in_flight(&self) -> u64 {
        self.outbound_in_flight.load(Ordering::Relaxed)
            + self.inbound_in_flight.load(Ordering::Relaxed)
    }

    /// Whether the routing table has been built since the node joined.
    pub fn routes_ready(&self) -> bool {
        self.routes_ready.load(Ordering::Relaxed)
    }

    /// Tells the mesh this node is draining.
    pub async fn announce_draining(&self) {
        self.gossip.set_serving(ServingState::Draining).await;
    }

    /// Every service in the mesh with its endpoints, and this node's view
    /// of each.
    pub fn services(&self) -> Vec<ServiceInfo> {
        let t = self.table.read().unwrap().clone();
        t.all
            .iter()
            .map(|(svc, eps)| ServiceInfo {
                service: svc.clone(),
                endpoints: eps
                    .iter()
                    .map(|e| {
                        let mut e = e.clone();
                        e.from_here = Some(self.balancer.view(svc, &e.node));
                        e
                    })
                    .collect(),
            })
            .collect()
    }
}

/// Decrements an in-flight count on drop.
pub(crate) struct Counted<'a>(&'a AtomicU64);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
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
        let mut cached = self.source.lock().unwrap();
        if let Some((seen, name)) = cached.as_ref()
            && Arc::ptr_eq(seen, &id)
        {
            return name.clone();
        }
        let name = self.work_out_source(&id);
        *cached = Some((id, name.clone()));
        name
    }

    fn work_out_source(&self, id: &Identity) -> String {
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
            protocol: svc.spec.protocol.as_str().into(),
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

    /// Adds endpoints in other zones (zone pools on), as their zones'
    /// summaries list them: routable unless refused, and the balancer
    /// prefers this node's zone while it has a usable endpoint. An attempt
    /// still checks that the peer's certificate names the node and the
    /// service, as for any endpoint.
    fn add_remote(
        &self,
        table: &mut Table,
        refused_now: &mut HashMap<(String, String), Refusal>,
        remote: Vec<gossip::zone::RemoteEndpoint>,
    ) {
        for ep in remote {
            if ep.zone == self.zone
                || table
                    .all
                    .get(&ep.service)
                    .is_some_and(|v| v.iter().any(|e| e.node == ep.node))
            {
                continue;
            }
            let refused = (!refused_now.is_empty()
                && self.still_refused(refused_now, &ep.service, &ep.node, ep.addr))
            .then_some("peer-not-serving");
            let routable = refused.is_none();
            if routable {
                let t = self.balancer.target(
                    &ep.service,
                    &ep.node,
                    ep.addr,
                    &ep.zone,
                    ep.weight,
                    false,
                    ep.ewma_ms,
                );
                let list = table.targets.entry(ep.service.clone()).or_default();
                let mut v: Vec<Target> = list.to_vec();
                v.push(t);
                *list = v.into();
            }
            table.all.entry(ep.service).or_default().push(EndpointInfo {
                node: ep.node,
                addr: ep.addr,
                state: MemberState::Alive,
                serving: ServingState::Serving,
                routable,
                refused,
                record: ServiceRecord {
                    health: Health::Healthy,
                    weight: ep.weight,
                    zone: ep.zone,
                    ewma_ms: ep.ewma_ms,
                    ..ServiceRecord::default()
                },
                from_here: None,
            });
        }
    }

    /// Rebuilds the routing table from gossip.
    pub async fn refresh(&self) {
        let joined = self.gossip.joined().await;
        let members = self.gossip.members().await;
        let by_name: HashMap<&str, &gossip::Member> =
            members.iter().map(|m| (m.name.as_str(), m)).collect();
        let mut table = Table::default();
        let published = self.gossip.scan_all(keys::SERVICE_PREFIX).await;
        let remote = gossip::zone::remote_endpoints(&self.gossip).await;
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
        self.add_remote(&mut table, &mut refused_now, remote);
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
