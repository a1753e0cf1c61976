//! Zone pools and the gossip backbone.
//!
//! With zone pools on, each zone is its own chitchat cluster
//! (`shoal/zone/<zone>`, channel [`crate::GOSSIP_CHANNEL`]), so a digest lists
//! only the zone's members. A few members per zone, its *representatives*,
//! also join the backbone (`shoal/backbone`, channel
//! [`crate::BACKBONE_CHANNEL`], the same QUIC endpoint) and publish a summary
//! of their zone there:
//!
//! | backbone key (by a representative of zone `Z`) | value |
//! |---|---|
//! | `zsum.Z.svc.<service>` | JSON [`ServiceSummary`]: up to [`MAX_ENDPOINTS_PER_SERVICE`] healthy endpoints |
//! | `zsum.Z.load` | JSON [`ZoneLoad`]: serving members, requests in flight |
//! | `zsum.Z.reps` | JSON list of `[name, addr]`: the zone's representatives |
//! | `zsum.Z.policy` | JSON [`PolicyDigest`]: how many policy versions the zone runs and their digest |
//!
//! Each representative republishes the other zones' summaries into its own
//! zone's pool as `xz.<zone>.<rest>` (same values), so every member learns
//! remote endpoints without joining other pools. Readers take `xz.*` keys
//! only from a member that is a current representative by the rule below.
//!
//! The representative rule is deterministic: the `N` alive, serving members
//! of the zone with the lowest 64-bit FNV-1a hash of their node name (ties
//! by name). Every member computes it from its own view, so a rep that dies
//! is replaced as soon as the failure detector marks it dead.
//!
//! Bounds: [`MAX_SERVICES_PER_ZONE`], [`MAX_ENDPOINTS_PER_SERVICE`],
//! [`MAX_ZONES`], [`MAX_SUMMARY_KEYS`] per backbone member (the guard
//! refuses more), values within the guard's 16 KiB. The guard also refuses
//! a summary for a zone its publisher does not publish as its own
//! (`foreign_zone`) and a message of another cluster (`foreign_cluster`).
//!
//! This module must not touch HTTP, policy or the proxy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::Endpoint;

use crate::membership::{Gossip, GossipConfig, Member, MemberState, Pool, Trust};
use crate::schema::{Health, NodeRecord, ServiceRecord, ServingState, keys};
use crate::{BACKBONE_CHANNEL, ZONE_HINT_CHANNEL};

/// Representatives per zone unless configured (`--zone-representatives`).
pub const DEFAULT_REPRESENTATIVES: usize = 3;
/// Prefix of summary keys on the backbone: `zsum.<zone>.…`.
pub const SUMMARY_PREFIX: &str = "zsum.";
/// Prefix of other zones' summaries relayed into a zone's pool: `xz.<zone>.…`.
pub const RELAYED_PREFIX: &str = "xz.";
/// Endpoints per service in a summary.
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 16;
/// Services per zone summary.
pub const MAX_SERVICES_PER_ZONE: usize = 64;
/// Zones whose summaries a representative relays.
pub const MAX_ZONES: usize = 64;
/// Summary keys one backbone member may publish.
pub const MAX_SUMMARY_KEYS: usize = MAX_SERVICES_PER_ZONE + 8;
/// The most representatives a zone may have.
pub const MAX_REPRESENTATIVES: usize = 16;
/// Largest hint message (a request, or up to [`MAX_REPRESENTATIVES`] addresses).
pub const MAX_HINT_BYTES: usize = 1024;

/// The cluster id of `zone`'s pool.
pub fn zone_cluster(zone: &str) -> String {
    crate::settings::zones::zone_cluster(crate::settings::CLUSTER_ID, zone)
}

/// Whether `zone` may name a zone pool: 1-64 characters of `A-Z a-z 0-9 _ -`
/// (no `.`, which separates key parts).
pub fn valid_zone(zone: &str) -> bool {
    !zone.is_empty()
        && zone.len() <= 64
        && zone
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// 64-bit FNV-1a of `s`.
pub fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Orders names by the representative rule: lowest 64-bit FNV-1a hash of
/// the name first, ties by name.
pub fn rank_representatives(names: &mut [&str]) {
    names.sort_by(|a, b| (fnv1a(a), *a).cmp(&(fnv1a(b), *b)));
}

/// The representatives of `zone` among `members`: the `n` alive, serving
/// members of the zone with the lowest FNV-1a hash of their name.
pub fn representatives<'a>(members: &'a [Member], zone: &str, n: usize) -> Vec<&'a Member> {
    let mut eligible: Vec<&Member> = members
        .iter()
        .filter(|m| {
            m.zone == zone && m.state == MemberState::Alive && m.serving == ServingState::Serving
        })
        .collect();
    eligible
        .sort_by(|a, b| (fnv1a(&a.name), a.name.as_str()).cmp(&(fnv1a(&b.name), b.name.as_str())));
    eligible.truncate(n);
    eligible
}

/// One endpoint of a service in a zone summary: enough to route to it (the
/// caller still checks that the peer's certificate names `node` and the
/// service).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryEndpoint {
    /// Node name (the certificate must name it).
    pub node: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Relative weight.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Peak-EWMA latency its node measures, ms.
    #[serde(default)]
    pub ewma_ms: f64,
    /// Requests in flight to it.
    #[serde(default)]
    pub in_flight: u64,
}

fn default_weight() -> u32 {
    100
}

/// A service's healthy endpoints in one zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ServiceSummary {
    /// Up to [`MAX_ENDPOINTS_PER_SERVICE`], least loaded first.
    pub endpoints: Vec<SummaryEndpoint>,
}

/// A zone's load.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ZoneLoad {
    /// Alive, serving members.
    pub nodes: usize,
    /// Requests in flight to the zone's instances.
    pub in_flight: u64,
}

/// A zone's policy versions, summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PolicyDigest {
    /// Policy versions its representative advertises.
    pub count: usize,
    /// FNV-1a over the sorted `key=value` adverts, hex.
    pub digest: String,
}

/// An endpoint in another zone, learnt from that zone's summary.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteEndpoint {
    /// Service.
    pub service: String,
    /// The endpoint's zone.
    pub zone: String,
    /// Node name.
    pub node: String,
    /// QUIC address.
    pub addr: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Latency its node measured, ms.
    pub ewma_ms: f64,
}

/// The zone pool settings of `gossip`, if it runs a zone's pool.
fn zone_of(gossip: &Gossip) -> Option<(String, usize)> {
    match &gossip.config().pool {
        Pool::Zone {
            zone,
            representatives,
        } => Some((zone.clone(), *representatives)),
        _ => None,
    }
}

/// How long a dead representative's relayed summaries still stand in for
/// a zone no current representative relays yet (while its successor joins
/// the backbone).
pub const STALE_RELAY: Duration = Duration::from_secs(30);

/// Endpoints in other zones as this zone's current representatives relay
/// them (empty unless `zone_gossip` runs a zone's pool). For each remote
/// zone the first representative (by the rule) that relays it is used; a
/// zone none of them relays yet keeps what a member that died within
/// [`STALE_RELAY`] relayed (a representative just lost), so callers keep
/// routing across zones while the zone re-elects.
pub async fn remote_endpoints(zone_gossip: &Gossip) -> Vec<RemoteEndpoint> {
    let Some((zone, n)) = zone_of(zone_gossip) else {
        return Vec::new();
    };
    let members = zone_gossip.members().await;
    let mut reps: Vec<String> = representatives(&members, &zone, n)
        .into_iter()
        .map(|m| m.name.clone())
        .collect();
    let mut recently_dead: Vec<&Member> = members
        .iter()
        .filter(|m| m.state == MemberState::Dead && m.last_seen_ms < STALE_RELAY.as_millis() as u64)
        .collect();
    recently_dead.sort_by_key(|m| m.last_seen_ms);
    reps.extend(recently_dead.into_iter().map(|m| m.name.clone()));
    let published = zone_gossip.scan_all(RELAYED_PREFIX).await;
    let by_node: HashMap<&str, &crate::Published> =
        published.iter().map(|p| (p.node.as_str(), p)).collect();
    let mut taken: HashSet<String> = HashSet::new();
    let mut out = Vec::new();
    for rep in &reps {
        let Some(p) = by_node.get(rep.as_str()) else {
            continue;
        };
        let mut here: HashSet<String> = HashSet::new();
        for (k, v) in &p.keys {
            let Some((z, rest)) = k[RELAYED_PREFIX.len()..].split_once('.') else {
                continue;
            };
            if z == zone || taken.contains(z) {
                continue;
            }
            here.insert(z.to_string());
            let Some(service) = rest.strip_prefix(keys::SERVICE_PREFIX) else {
                continue;
            };
            let Ok(summary) = serde_json::from_str::<ServiceSummary>(v) else {
                continue;
            };
            for e in summary
                .endpoints
                .into_iter()
                .take(MAX_ENDPOINTS_PER_SERVICE)
            {
                out.push(RemoteEndpoint {
                    service: service.to_string(),
                    zone: z.to_string(),
                    node: e.node,
                    addr: e.addr,
                    weight: e.weight.max(1),
                    ewma_ms: e.ewma_ms,
                });
            }
        }
        taken.extend(here);
        if taken.len() >= MAX_ZONES {
            break;
        }
    }
    out
}

/// The zones this node knows of through its representatives' relayed
/// summaries, with their representatives (`xz.<zone>.reps`).
pub async fn remote_zones(zone_gossip: &Gossip) -> BTreeMap<String, Vec<(String, SocketAddr)>> {
    let mut out = BTreeMap::new();
    for p in zone_gossip.scan_all(RELAYED_PREFIX).await {
        for (k, v) in p.keys {
            let Some(z) = k
                .strip_prefix(RELAYED_PREFIX)
                .and_then(|r| r.strip_suffix(".reps"))
            else {
                continue;
            };
            if let Ok(reps) = serde_json::from_str::<Vec<(String, SocketAddr)>>(&v) {
                out.insert(z.to_string(), reps);
            }
        }
    }
    out
}

/// What makes a node a representative and keeps its backbone membership.
pub struct ZoneAgent {
    backbone: watch::Receiver<Option<Gossip>>,
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

struct Inner {
    zone_gossip: Gossip,
    endpoint: Endpoint,
    trust: Trust,
    record: NodeRecord,
    seeds: Vec<String>,
    zone: String,
    n: usize,
    backbone: watch::Sender<Option<Gossip>>,
    /// Where hint requests went recently (answers from elsewhere are ignored).
    asked: Mutex<HashMap<SocketAddr, Instant>>,
    last_answer: Mutex<Option<Instant>>,
}

/// How often the agent re-checks the representative rule and republishes.
const TICK: Duration = Duration::from_millis(250);

impl ZoneAgent {
    /// Starts the agent of a node whose `zone_gossip` runs its zone's pool
    /// ([`Pool::Zone`]); `record` is what the node publishes there (the
    /// backbone gets the same), `seeds` the configured seeds (asked for
    /// their zone's representatives when this node's backbone is alone).
    pub fn spawn(
        zone_gossip: Gossip,
        endpoint: Endpoint,
        trust: Trust,
        record: NodeRecord,
        seeds: Vec<String>,
    ) -> Option<ZoneAgent> {
        let (zone, n) = zone_of(&zone_gossip)?;
        endpoint.limit_channel(BACKBONE_CHANNEL, 64 << 10);
        endpoint.limit_channel(ZONE_HINT_CHANNEL, MAX_HINT_BYTES);
        let (tx, rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            zone_gossip,
            endpoint: endpoint.clone(),
            trust,
            record,
            seeds,
            zone,
            n,
            backbone: tx,
            asked: Mutex::new(HashMap::new()),
            last_answer: Mutex::new(None),
        });
        let hints = endpoint.subscribe(ZONE_HINT_CHANNEL, 64);
        let tasks = vec![
            tokio::spawn(inner.clone().run()),
            tokio::spawn(inner.clone().hints(hints)),
        ];
        Some(ZoneAgent {
            backbone: rx,
            inner,
            tasks: Mutex::new(tasks),
        })
    }

    /// The backbone pool while this node is a representative.
    pub fn backbone(&self) -> watch::Receiver<Option<Gossip>> {
        self.backbone.clone()
    }

    /// Whether this node currently represents its zone.
    pub fn is_representative(&self) -> bool {
        self.backbone.borrow().is_some()
    }

    /// Stops the agent; `graceful` announces `left` on the backbone first.
    pub async fn shutdown(&self, graceful: bool) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        let bb = self.inner.backbone.send_replace(None);
        if let Some(bb) = bb {
            if graceful {
                bb.leave().await;
            }
            bb.shutdown().await;
        }
    }
}

impl Inner {
    async fn run(self: Arc<Self>) {
        let me = self.zone_gossip.name().to_string();
        let mut relayed: HashMap<String, String> = HashMap::new();
        let mut summary: HashMap<String, String> = HashMap::new();
        let mut last_seed = Instant::now() - Duration::from_secs(60);
        loop {
            tokio::time::sleep(TICK).await;
            let members = self.zone_gossip.members().await;
            let reps = representatives(&members, &self.zone, self.n);
            let am_rep = reps.iter().any(|m| m.name == me);
            let current = self.backbone.borrow().clone();
            match (am_rep, current) {
                (true, None) => match self.join_backbone().await {
                    Ok(bb) => {
                        tracing::info!(zone = %self.zone, "this node now represents its zone on the backbone");
                        self.backbone.send_replace(Some(bb));
                        last_seed = Instant::now() - Duration::from_secs(60);
                    }
                    Err(e) => tracing::warn!(error = %e, "joining the zone backbone failed"),
                },
                (false, Some(bb)) => {
                    tracing::info!(zone = %self.zone, "this node no longer represents its zone; leaving the backbone");
                    self.backbone.send_replace(None);
                    bb.leave().await;
                    bb.shutdown().await;
                    for k in relayed.drain().map(|(k, _)| k) {
                        self.zone_gossip.delete_key(&k).await;
                    }
                    summary.clear();
                }
                (true, Some(bb)) => {
                    let rep_list: Vec<(String, SocketAddr)> =
                        reps.iter().map(|m| (m.name.clone(), m.addr)).collect();
                    self.publish_summary(&bb, &members, &rep_list, &mut summary)
                        .await;
                    let foreign = self.relay_summaries(&bb, &mut relayed).await;
                    let lonely = foreign == 0;
                    let every = if lonely {
                        Duration::from_secs(2)
                    } else {
                        Duration::from_secs(10)
                    };
                    if last_seed.elapsed() >= every {
                        last_seed = Instant::now();
                        self.seed_backbone(&bb, &members).await;
                    }
                }
                (false, None) => {}
            }
        }
    }

    async fn join_backbone(&self) -> Result<Gossip, crate::GossipError> {
        let zc = self.zone_gossip.config();
        let mut config = GossipConfig::new(zc.name.clone());
        config.cluster_id = crate::settings::zones::backbone_cluster(crate::settings::CLUSTER_ID);
        config.channel = BACKBONE_CHANNEL;
        config.pool = Pool::Backbone;
        config.interval = zc.interval;
        config.phi_threshold = zc.phi_threshold;
        config.dead_grace = zc.dead_grace;
        let mut trust = self.trust.clone();
        // The zone pool already watches the certificate folder; the
        // backbone is short-lived and restarts with the new key.
        trust.dir = None;
        Gossip::start(self.endpoint.clone(), config, self.record.clone(), trust).await
    }

    /// Publishes this zone's summary on the backbone (only what changed;
    /// services gone are withdrawn).
    async fn publish_summary(
        &self,
        bb: &Gossip,
        members: &[Member],
        reps: &[(String, SocketAddr)],
        published: &mut HashMap<String, String>,
    ) {
        let serving: HashMap<&str, &Member> = members
            .iter()
            .filter(|m| m.state == MemberState::Alive && m.serving == ServingState::Serving)
            .map(|m| (m.name.as_str(), m))
            .collect();
        let mut by_service: BTreeMap<String, Vec<SummaryEndpoint>> = BTreeMap::new();
        for p in self.zone_gossip.scan(keys::SERVICE_PREFIX).await {
            let Some(m) = serving.get(p.node.as_str()) else {
                continue;
            };
            for (k, v) in &p.keys {
                let service = &k[keys::SERVICE_PREFIX.len()..];
                let Ok(rec) = serde_json::from_str::<ServiceRecord>(v) else {
                    continue;
                };
                if rec.health != Health::Healthy {
                    continue;
                }
                by_service
                    .entry(service.to_string())
                    .or_default()
                    .push(SummaryEndpoint {
                        node: m.name.clone(),
                        addr: m.addr,
                        weight: rec.weight,
                        ewma_ms: rec.ewma_ms,
                        in_flight: rec.in_flight,
                    });
            }
        }
        let mut want: HashMap<String, String> = HashMap::new();
        let mut in_flight = 0;
        for (service, mut eps) in by_service.into_iter().take(MAX_SERVICES_PER_ZONE) {
            in_flight += eps.iter().map(|e| e.in_flight).sum::<u64>();
            eps.sort_by(|a, b| (a.in_flight, &a.node).cmp(&(b.in_flight, &b.node)));
            eps.truncate(MAX_ENDPOINTS_PER_SERVICE);
            let key = crate::settings::zones::service_key(&self.zone, &service);
            if let Ok(v) = serde_json::to_string(&ServiceSummary { endpoints: eps }) {
                want.insert(key, v);
            }
        }
        let load = ZoneLoad {
            nodes: serving.len(),
            in_flight,
        };
        let policy = self.policy_digest().await;
        for (suffix, value) in [
            ("load", serde_json::to_string(&load)),
            ("reps", serde_json::to_string(reps)),
            ("policy", serde_json::to_string(&policy)),
        ] {
            if let Ok(v) = value {
                want.insert(format!("{SUMMARY_PREFIX}{}.{suffix}", self.zone), v);
            }
        }
        sync_keys(bb, published, want).await;
    }

    /// This node's own policy adverts, counted and hashed.
    async fn policy_digest(&self) -> PolicyDigest {
        let mut adverts: Vec<String> = self
            .zone_gossip
            .scan("policy:")
            .await
            .into_iter()
            .filter(|p| p.is_self)
            .flat_map(|p| p.keys.into_iter().map(|(k, v)| format!("{k}={v}")))
            .collect();
        adverts.sort();
        PolicyDigest {
            count: adverts.len(),
            digest: format!("{:016x}", fnv1a(&adverts.join("\n"))),
        }
    }

    /// Copies the other zones' summaries from the backbone into this zone's
    /// pool as `xz.<zone>.…`; answers how many other zones were relayed.
    async fn relay_summaries(&self, bb: &Gossip, published: &mut HashMap<String, String>) -> usize {
        let zones: HashMap<String, String> = bb
            .members()
            .await
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| (m.name, m.zone))
            .collect();
        // One source per zone: its first publisher by name.
        let mut per_zone: BTreeMap<String, (String, Vec<(String, String)>)> = BTreeMap::new();
        for p in bb.scan(SUMMARY_PREFIX).await {
            if p.is_self {
                continue;
            }
            let Some(zone) = zones.get(&p.node) else {
                continue;
            };
            if *zone == self.zone || !valid_zone(zone) {
                continue;
            }
            let own = format!("{SUMMARY_PREFIX}{zone}.");
            let kvs: Vec<(String, String)> = p
                .keys
                .into_iter()
                .filter_map(|(k, v)| {
                    k.strip_prefix(&own)
                        .map(|rest| (format!("{RELAYED_PREFIX}{zone}.{rest}"), v))
                })
                .take(MAX_SUMMARY_KEYS)
                .collect();
            if kvs.is_empty() {
                continue;
            }
            match per_zone.get(zone) {
                Some((name, _)) if *name <= p.node => {}
                _ => {
                    if per_zone.len() < MAX_ZONES || per_zone.contains_key(zone) {
                        per_zone.insert(zone.clone(), (p.node.clone(), kvs));
                    }
                }
            }
        }
        let count = per_zone.len();
        let want: HashMap<String, String> =
            per_zone.into_values().flat_map(|(_, kvs)| kvs).collect();
        sync_keys(&self.zone_gossip, published, want).await;
        count
    }

    /// Opens backbone exchanges with other zones' representatives this node
    /// knows of (relayed `xz.*.reps`, from any member, dead ones too) and
    /// asks the configured seeds for theirs.
    async fn seed_backbone(&self, bb: &Gossip, members: &[Member]) {
        let alive: HashSet<SocketAddr> = bb
            .members()
            .await
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.addr)
            .collect();
        for reps in remote_zones(&self.zone_gossip).await.into_values() {
            for (_, addr) in reps.into_iter().take(MAX_REPRESENTATIVES) {
                if !alive.contains(&addr) {
                    bb.gossip_with(addr);
                }
            }
        }
        let own: HashSet<SocketAddr> = members.iter().map(|m| m.addr).collect();
        let mut asked = Vec::new();
        for seed in self.seeds.iter().take(64) {
            let Ok(addrs) = tokio::net::lookup_host(seed.as_str()).await else {
                continue;
            };
            for addr in addrs.take(16) {
                if !own.contains(&addr) && !alive.contains(&addr) {
                    asked.push(addr);
                }
            }
        }
        {
            let mut a = self.asked.lock().unwrap();
            a.retain(|_, at| at.elapsed() < Duration::from_secs(10));
            for addr in &asked {
                a.insert(*addr, Instant::now());
            }
        }
        for addr in asked {
            let endpoint = self.endpoint.clone();
            tokio::spawn(async move {
                let _ = endpoint.send_message(addr, ZONE_HINT_CHANNEL, b"?").await;
            });
        }
    }

    /// Answers hint requests with this zone's representatives; takes hint
    /// answers (only from peers asked recently) as backbone contacts.
    async fn hints(self: Arc<Self>, mut rx: tokio::sync::mpsc::Receiver<transport::Message>) {
        while let Some(msg) = rx.recv().await {
            let from = msg.from.addr();
            if msg.payload.len() > MAX_HINT_BYTES {
                continue;
            }
            if msg.payload.as_ref() == b"?" {
                {
                    // One answer per 20 ms at most: a flood costs little.
                    let mut last = self.last_answer.lock().unwrap();
                    if last.is_some_and(|t| t.elapsed() < Duration::from_millis(20)) {
                        continue;
                    }
                    *last = Some(Instant::now());
                }
                let members = self.zone_gossip.members().await;
                let reps: Vec<SocketAddr> = representatives(&members, &self.zone, self.n)
                    .into_iter()
                    .map(|m| m.addr)
                    .collect();
                let Ok(bytes) = serde_json::to_vec(&reps) else {
                    continue;
                };
                let endpoint = self.endpoint.clone();
                tokio::spawn(async move {
                    let _ = endpoint.send_message(from, ZONE_HINT_CHANNEL, &bytes).await;
                });
                continue;
            }
            let wanted = self
                .asked
                .lock()
                .unwrap()
                .get(&from)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(10));
            if !wanted {
                continue;
            }
            let Ok(addrs) = serde_json::from_slice::<Vec<SocketAddr>>(&msg.payload) else {
                continue;
            };
            let bb = self.backbone.borrow().clone();
            if let Some(bb) = bb {
                for addr in addrs.into_iter().take(MAX_REPRESENTATIVES) {
                    bb.gossip_with(addr);
                }
            }
        }
    }
}

/// Makes `gossip`'s keys in `published` match `want`: sets what changed,
/// withdraws (publishes empty) what is gone.
async fn sync_keys(
    gossip: &Gossip,
    published: &mut HashMap<String, String>,
    want: HashMap<String, String>,
) {
    for (k, v) in &want {
        if published.get(k) != Some(v) {
            gossip.set_key(k, v).await;
        }
    }
    for k in published.keys() {
        if !want.contains_key(k) {
            gossip.delete_key(k).await;
        }
    }
    *published = want;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, zone: &str, state: MemberState) -> Member {
        Member {
            name: name.into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            state,
            serving: ServingState::Serving,
            zone: zone.into(),
            admin: String::new(),
            build: String::new(),
            services: Vec::new(),
            last_seen_ms: 0,
            generation: 1,
            is_self: false,
        }
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        // From the FNV reference (draft-eastlake-fnv): "" and "a".
        assert_eq!(fnv1a(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a("foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn representatives_are_the_lowest_hashes_among_alive_serving_members() {
        let names = ["n1", "n2", "n3", "n4", "n5"];
        let mut members: Vec<Member> = names
            .iter()
            .map(|n| member(n, "a", MemberState::Alive))
            .collect();
        members.push(member("other", "b", MemberState::Alive));
        let mut by_hash: Vec<&str> = names.to_vec();
        by_hash.sort_by_key(|n| fnv1a(n));
        let reps: Vec<&str> = representatives(&members, "a", 2)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(reps, by_hash[..2]);
        // The first dies: the third lowest takes its place.
        members
            .iter_mut()
            .find(|m| m.name == by_hash[0])
            .unwrap()
            .state = MemberState::Dead;
        members
            .iter_mut()
            .find(|m| m.name == by_hash[1])
            .unwrap()
            .serving = ServingState::Draining;
        let reps: Vec<&str> = representatives(&members, "a", 2)
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(reps, by_hash[2..4]);
    }

    #[test]
    fn zone_names_for_pools_exclude_the_key_separator() {
        assert!(valid_zone("eu-1_a"));
        assert!(!valid_zone("eu.1"));
        assert!(!valid_zone(""));
        assert!(!valid_zone(&"z".repeat(65)));
    }
}
