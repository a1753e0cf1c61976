//! The membership view: who is in the mesh, in which state, and what each
//! member publishes; plus a stream of change events.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use chitchat::{ChitchatHandle, ChitchatId};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use transport::Endpoint;
use transport::signing::{CertChecker, Signer};

use crate::guard::{CERT_KEY, Guard, GuardStats, sign_value, valid_name, value_of};
use crate::relay::{RelayStats, RelayTransport, Relays};
use crate::schema::{NodeRecord, ServingState, keys};
use crate::settings;
use crate::wire::NodeId;

/// What a node needs to sign what it publishes and to check what others do.
#[derive(Clone)]
pub struct Trust {
    /// This node's certificate key.
    pub signer: Arc<Signer>,
    /// The mesh CA.
    pub checker: CertChecker,
    /// The certificate folder, watched for renewed certificates.
    pub dir: Option<std::path::PathBuf>,
}

impl Trust {
    /// Reads `node.pem`, `node.key` and `ca.pem` from a certificate folder.
    pub fn from_dir(dir: &std::path::Path) -> Result<Self, GossipError> {
        let signer = Signer::from_files(&dir.join("node.pem"), &dir.join("node.key"))
            .map_err(|e| GossipError::Start(e.to_string()))?;
        let checker = CertChecker::from_dir(dir).map_err(|e| GossipError::Start(e.to_string()))?;
        Ok(Trust {
            signer: Arc::new(signer),
            checker,
            dir: Some(dir.to_path_buf()),
        })
    }
}

fn node_id(id: &ChitchatId) -> NodeId {
    NodeId {
        name: id.node_id.to_string(),
        generation: id.generation_id,
        addr: id.gossip_advertise_addr,
    }
}

/// Gossip settings. Defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// This node's name (unique in the mesh; must match its certificate).
    pub name: String,
    /// Cluster id; nodes with another id ignore each other. Default `shoal`.
    pub cluster_id: String,
    /// Seeds, `host:port` (a name resolving to several addresses gives several seeds).
    pub seeds: Vec<String>,
    /// Interval between gossip rounds. Default [`crate::settings::INTERVAL`] (300 ms).
    pub interval: Duration,
    /// Phi-accrual threshold: a member is dead once the silence since its last
    /// heartbeat exceeds `phi_threshold` × its mean heartbeat interval.
    /// Default 8 (about 2.4 s of silence at the default interval, plus the
    /// time heartbeat news takes to cross the pool).
    pub phi_threshold: f64,
    /// Heartbeat intervals the failure detector keeps per peer (memory per
    /// node grows as members × window). Default
    /// [`crate::settings::SAMPLING_WINDOW`].
    pub sampling_window: usize,
    /// How long dead and left members stay listed before they are forgotten.
    /// Default 1 h.
    pub dead_grace: Duration,
    /// How often seeds are resolved again (a DNS name's addresses change as
    /// nodes come and go); each resolved address that is not a live member
    /// gets a gossip exchange. Default 10 s.
    pub seed_refresh: Duration,
    /// The transport channel this pool's messages travel on. Default
    /// [`crate::GOSSIP_CHANNEL`]; the zone backbone uses
    /// [`crate::BACKBONE_CHANNEL`] over the same QUIC endpoint.
    pub channel: u8,
    /// Which pool this is (one mesh-wide pool, a zone's pool or the zone
    /// backbone); the guard enforces its membership rules. Default
    /// [`Pool::Mesh`].
    pub pool: Pool,
}

/// Which gossip pool a [`Gossip`] runs (see [`crate::zone`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pool {
    /// One pool for the whole mesh (zone pools off).
    Mesh,
    /// The pool of one zone: only members publishing this zone are admitted.
    Zone {
        /// The zone.
        zone: String,
        /// How many members of the zone represent it on the backbone.
        representatives: usize,
    },
    /// The backbone of zone representatives: a member may publish summaries
    /// (`zsum.<zone>.*`) only for the zone it publishes as its own.
    Backbone,
}

impl GossipConfig {
    /// Defaults for a node called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        GossipConfig {
            name: name.into(),
            cluster_id: settings::CLUSTER_ID.into(),
            seeds: Vec::new(),
            interval: settings::INTERVAL,
            phi_threshold: settings::PHI_THRESHOLD,
            sampling_window: settings::SAMPLING_WINDOW,
            dead_grace: settings::DEAD_GRACE,
            seed_refresh: Duration::from_secs(10),
            channel: crate::GOSSIP_CHANNEL,
            pool: Pool::Mesh,
        }
    }

    /// Roughly how long after its last heartbeat a silent member is declared dead.
    pub fn detection_window(&self) -> Duration {
        self.interval.mul_f64(self.phi_threshold)
    }

    /// The chitchat tuning these settings give (see [`settings`]).
    pub fn tuning(&self) -> settings::Tuning {
        settings::Tuning {
            interval: self.interval,
            phi_threshold: self.phi_threshold,
            sampling_window: self.sampling_window,
            dead_grace: self.dead_grace,
        }
    }
}

/// Errors starting gossip.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("starting chitchat: {0}")]
    Start(String),
}

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from recently.
    Alive,
    /// Silent past the failure detector's threshold.
    Dead,
    /// Announced it was leaving.
    Left,
}

impl MemberState {
    /// All states, for metrics.
    pub const ALL: [MemberState; 3] = [MemberState::Alive, MemberState::Dead, MemberState::Left];

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One member of the mesh.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// QUIC (gossip) address.
    pub addr: SocketAddr,
    /// Alive, dead or left.
    pub state: MemberState,
    /// Serving or draining (as the member published it).
    pub serving: ServingState,
    /// Zone.
    pub zone: String,
    /// Admin HTTP address.
    pub admin: String,
    /// Build version.
    pub build: String,
    /// Services it fronts.
    pub services: Vec<String>,
    /// Milliseconds since its heartbeat last advanced (0 for ourselves).
    pub last_seen_ms: u64,
    /// Incarnation (start time in ms); a restart gets a higher one.
    pub generation: u64,
    /// Whether this is the local node.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// Keys one alive member publishes (see [`Gossip::scan`]).
#[derive(Debug, Clone)]
pub struct Published {
    /// Node name.
    pub node: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Whether it is this node.
    pub is_self: bool,
    /// Matching keys and their values.
    pub keys: Vec<(String, String)>,
}

/// A change in some member's state.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberEvent {
    /// The member.
    pub name: String,
    /// Its previous state (`None` when first seen).
    pub previous: Option<MemberState>,
    /// Its new state (`None` once forgotten).
    pub current: Option<MemberState>,
}

pub(crate) struct Shared {
    pub(crate) handle: ChitchatHandle,
    guard: Arc<Guard>,
    signer: Mutex<Arc<Signer>>,
    failure: Mutex<Option<String>>,
    duplicate: Mutex<Option<SocketAddr>>,
    pub(crate) stopping: AtomicBool,
    relays: Arc<Relays>,
    pub(crate) config: GossipConfig,
    pub(crate) self_id: ChitchatId,
    events: broadcast::Sender<MemberEvent>,
    heartbeats: Mutex<HashMap<ChitchatId, (chitchat::Heartbeat, Instant)>>,
    pub(crate) joined: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// A running gossip participant. Cheap to clone.
#[derive(Clone)]
pub struct Gossip {
    shared: Arc<Shared>,
}

impl Gossip {
    /// Starts gossiping over `endpoint`, publishing `record`.
    pub async fn start(
        endpoint: Endpoint,
        config: GossipConfig,
        record: NodeRecord,
        trust: Trust,
    ) -> Result<Self, GossipError> {
        if !valid_name(&config.name) {
            return Err(GossipError::Start(format!(
                "node name {:?} must be 1-{} characters of A-Z a-z 0-9 . _ -",
                config.name,
                crate::guard::MAX_NAME_BYTES
            )));
        }
        let advertise = endpoint.local_addr();
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let self_id = settings::node_id(&config.name, generation, advertise);
        let seeds = settings::seeds_without_self(&config.seeds, advertise);
        let guard = Arc::new(
            Guard::new(node_id(&self_id), trust.checker.clone())
                .for_pool(&config.cluster_id, &config.pool),
        );
        let relays = Relays::new(endpoint, guard.clone(), config.channel);
        let inbound = relays.spawn_inbound();
        let chitchat_config = settings::chitchat_config(
            self_id.clone(),
            &config.cluster_id,
            seeds.clone(),
            &config.tuning(),
        );
        let transport = RelayTransport {
            relays: relays.clone(),
        };
        let handle = chitchat::spawn_chitchat(chitchat_config, Vec::new(), &transport)
            .await
            .map_err(|e| GossipError::Start(e.to_string()))?;
        let termination = handle.termination_watcher();
        let (events, _) = broadcast::channel(1024);
        let shared = Arc::new(Shared {
            handle,
            guard,
            signer: Mutex::new(trust.signer.clone()),
            failure: Mutex::new(None),
            duplicate: Mutex::new(None),
            stopping: AtomicBool::new(false),
            relays,
            joined: AtomicBool::new(seeds.is_empty()),
            config,
            self_id,
            events,
            heartbeats: Mutex::new(HashMap::new()),
            tasks: Mutex::new(vec![inbound]),
        });
        let gossip = Gossip { shared };
        let cert =
            base64::engine::general_purpose::STANDARD.encode(trust.signer.cert_der().as_ref());
        gossip.set_key(CERT_KEY, &cert).await;
        for (k, v) in record.to_kvs() {
            gossip.set_key(&k, &v).await;
        }
        let watcher = tokio::spawn(watch_members(Arc::downgrade(&gossip.shared)));
        // Literal seeds stay in chitchat's seed set for good; only names
        // can change their answer.
        if gossip
            .shared
            .config
            .seeds
            .iter()
            .any(|s| s.parse::<SocketAddr>().is_err())
        {
            let t = tokio::spawn(crate::seeds::refresh_loop(Arc::downgrade(&gossip.shared)));
            gossip.shared.tasks.lock().unwrap().push(t);
        }
        let weak = Arc::downgrade(&gossip.shared);
        let sentinel = tokio::spawn(async move {
            let result = termination.await;
            let Some(shared) = weak.upgrade() else { return };
            if shared.stopping.load(Ordering::Relaxed) {
                return;
            }
            let why = match result {
                Ok(()) => "the gossip loop stopped".to_string(),
                Err(e) => format!("the gossip loop failed: {e}"),
            };
            tracing::error!(error = %why, "gossip stopped; this node's view of the mesh is frozen");
            *shared.failure.lock().unwrap() = Some(why);
        });
        gossip
            .shared
            .tasks
            .lock()
            .unwrap()
            .extend([watcher, sentinel]);
        if let Some(dir) = trust.dir.clone() {
            let g = gossip.clone();
            let t = tokio::spawn(async move { g.watch_certificate(dir).await });
            gossip.shared.tasks.lock().unwrap().push(t);
        }
        Ok(gossip)
    }

    /// Why gossip stopped working, if it did (the node should stop serving:
    /// its view of the mesh is frozen).
    pub fn failure(&self) -> Option<String> {
        if let Some(f) = self.shared.failure.lock().unwrap().clone() {
            return Some(f);
        }
        if self.shared.relays.inbound_stopped() && !self.shared.stopping.load(Ordering::Relaxed) {
            return Some("the gossip relay stopped".into());
        }
        None
    }

    /// Stops the gossip loop the way a crash inside it would (without
    /// leaving): for tests of what a node does when gossip dies.
    #[doc(hidden)]
    pub fn break_loop_for_test(&self) {
        let _ = self.shared.handle.initiate_shutdown();
    }

    /// Gossip refusals by reason, and verification cost.
    pub fn guard_stats(&self) -> &GuardStats {
        &self.shared.guard.stats
    }

    /// Another incarnation of this node's name, alive at another address
    /// (someone started a second node with the same name and certificate):
    /// its heartbeat was seen advancing, so it is not a crashed predecessor.
    pub fn duplicate_of_self(&self) -> Option<SocketAddr> {
        *self.shared.duplicate.lock().unwrap()
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.shared.config.name
    }

    /// The settings in force.
    pub fn config(&self) -> &GossipConfig {
        &self.shared.config
    }

    /// True once this node has heard from a peer (or it has no seeds). A
    /// latch: it stays true after the first peer is seen.
    pub async fn joined(&self) -> bool {
        if self.shared.joined.load(Ordering::Relaxed) {
            return true;
        }
        let list = members(&self.shared).await;
        latch_joined(&self.shared, &list)
    }

    /// Opens a gossip exchange with `addr` now (a peer learnt outside this
    /// pool's seeds, e.g. a representative of another zone).
    pub fn gossip_with(&self, addr: SocketAddr) {
        if addr != self.shared.self_id.gossip_advertise_addr {
            let _ = self.shared.handle.gossip(addr);
        }
    }

    /// Gossip traffic counters.
    pub fn stats(&self) -> &RelayStats {
        &self.shared.relays.stats
    }

    /// Subscribes to member state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<MemberEvent> {
        self.shared.events.subscribe()
    }

    /// The current member list, one entry per node name (its newest
    /// incarnation), sorted by name.
    pub async fn members(&self) -> Vec<Member> {
        members(&self.shared).await
    }

    /// Publishes `key = value` in this node's state.
    ///
    /// The value is signed with this node's certificate key over (node id,
    /// key, chitchat version, value), so no other node can write or replay it.
    pub async fn set_key(&self, key: &str, value: &str) {
        let chitchat = self.shared.handle.chitchat();
        let mut c = chitchat.lock().await;
        let st = c.self_node_state();
        if st.get(key).map(value_of) == Some(value) {
            return;
        }
        let version = st.max_version() + 1;
        let signer = self.shared.signer.lock().unwrap().clone();
        let signed = sign_value(&signer, &node_id(&self.shared.self_id), key, version, value);
        st.set(key, signed);
    }

    /// Re-reads the certificate folder every 2 s; when the node's certificate
    /// was renewed (same node name), publishes the new certificate and signs
    /// every key again with the new key, so readers that meet this node for
    /// the first time can verify all of it.
    async fn watch_certificate(&self, dir: std::path::PathBuf) {
        // Contents, not only modification times: a coarse file-system clock
        // can give a rewrite within the same tick the same time.
        let stamp = |d: &std::path::Path| {
            ["node.pem", "node.key"]
                .iter()
                .map(|f| std::fs::read(d.join(f)).ok())
                .collect::<Vec<_>>()
        };
        let mut seen = stamp(&dir);
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let now = stamp(&dir);
            if now == seen {
                continue;
            }
            seen = now;
            let signer = match Signer::from_files(&dir.join("node.pem"), &dir.join("node.key")) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "renewed certificate not readable; gossip keeps signing with the old key");
                    continue;
                }
            };
            let name = transport::Identity::from_der(signer.cert_der()).map(|i| i.node);
            if name.as_deref().ok() != Some(self.name()) {
                tracing::error!(found = ?name, expected = self.name(), "renewed certificate names another node; gossip keeps the old one");
                continue;
            }
            self.rotate_signer(Arc::new(signer)).await;
            tracing::info!("gossip now signs with the renewed certificate");
        }
    }

    /// Switches to a new signing key and republishes everything under it.
    pub async fn rotate_signer(&self, signer: Arc<Signer>) {
        *self.shared.signer.lock().unwrap() = signer.clone();
        let cert = base64::engine::general_purpose::STANDARD.encode(signer.cert_der().as_ref());
        let chitchat = self.shared.handle.chitchat();
        let mut c = chitchat.lock().await;
        let st = c.self_node_state();
        let mut kvs: Vec<(String, String)> = st
            .key_values()
            .filter(|(k, _)| *k != CERT_KEY)
            .map(|(k, v)| (k.to_string(), value_of(v).to_string()))
            .collect();
        kvs.insert(0, (CERT_KEY.to_string(), cert));
        let me = node_id(&self.shared.self_id);
        for (k, v) in kvs {
            let version = st.max_version() + 1;
            st.set(&k, sign_value(&signer, &me, &k, version, &v));
        }
    }

    /// Withdraws `key` from this node's state (publishes it empty: Shoal
    /// never sends chitchat deletes, which a relaying peer could forge).
    pub async fn delete_key(&self, key: &str) {
        self.set_key(key, "").await;
    }

    /// Reads `key` as published by `node` (newest verified incarnation).
    pub async fn key_of(&self, node: &str, key: &str) -> Option<String> {
        let chitchat = self.shared.handle.chitchat();
        let c = chitchat.lock().await;
        c.node_states()
            .iter()
            .filter(|(id, _)| &*id.node_id == node && self.shared.guard.is_verified(&node_id(id)))
            .max_by_key(|(id, _)| id.generation_id)
            .and_then(|(_, st)| st.get(key).map(value_of))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    }

    /// Keys starting with `prefix` as published by every member that is
    /// alive (newest incarnation of each name, `left` excluded), ourselves
    /// included.
    pub async fn scan(&self, prefix: &str) -> Vec<Published> {
        self.published(prefix, true).await
    }

    /// Like [`Gossip::scan`] but for every known member, dead or left too.
    pub async fn scan_all(&self, prefix: &str) -> Vec<Published> {
        self.published(prefix, false).await
    }

    async fn published(&self, prefix: &str, alive_only: bool) -> Vec<Published> {
        let chitchat = self.shared.handle.chitchat();
        let c = chitchat.lock().await;
        let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
        let mut newest: BTreeMap<&str, (&ChitchatId, &chitchat::NodeState)> = BTreeMap::new();
        for (id, st) in c.node_states() {
            if !self.shared.guard.is_verified(&node_id(id)) {
                continue;
            }
            let alive = (*id == self.shared.self_id || live.contains(id))
                && st.get(keys::STATE).map(value_of) != Some("left");
            if alive_only && !alive {
                continue;
            }
            match newest.get(&*id.node_id) {
                Some((old, _)) if old.generation_id >= id.generation_id => {}
                _ => {
                    newest.insert(&id.node_id, (id, st));
                }
            }
        }
        newest
            .into_values()
            .map(|(id, st)| Published {
                node: id.node_id.to_string(),
                addr: id.gossip_advertise_addr,
                is_self: *id == self.shared.self_id,
                keys: st
                    .iter_prefix(prefix)
                    .map(|(k, v)| (k, value_of(&v.value)))
                    .filter(|(_, v)| !v.is_empty())
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            })
            .collect()
    }

    /// Announces `draining` (or back to `serving`).
    pub async fn set_serving(&self, state: ServingState) {
        self.set_key(keys::STATE, &state.to_string()).await;
    }

    /// Announces that this node is leaving, pushes that to every live peer at
    /// once, and waits briefly for the pushes to go out. Call before
    /// [`Gossip::shutdown`] for a graceful exit.
    pub async fn leave(&self) {
        self.set_serving(ServingState::Left).await;
        let peers: Vec<SocketAddr> = self
            .members()
            .await
            .into_iter()
            .filter(|m| !m.is_self && m.state == MemberState::Alive)
            .map(|m| m.addr)
            .collect();
        for addr in &peers {
            let _ = self.shared.handle.gossip(*addr);
        }
        if !peers.is_empty() {
            // A syn / syn-ack / ack exchange carries our `left` key; give it
            // a few loopback or LAN round trips.
            let linger = self
                .shared
                .config
                .interval
                .clamp(Duration::from_millis(100), Duration::from_millis(500));
            tokio::time::sleep(linger).await;
        }
    }

    /// Stops gossiping (without announcing anything: see [`Gossip::leave`]).
    pub async fn shutdown(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        for t in self.shared.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        let _ = self.shared.handle.initiate_shutdown();
        self.shared.relays.shutdown();
    }

    /// Waits until `pred` holds for the member list, polling each gossip
    /// interval, or until `deadline` passes. Returns whether it held.
    pub async fn wait_for(&self, deadline: Duration, pred: impl Fn(&[Member]) -> bool) -> bool {
        let end = Instant::now() + deadline;
        loop {
            if pred(&self.members().await) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(self.shared.config.interval.min(Duration::from_millis(100))).await;
        }
    }
}

pub(crate) async fn members(shared: &Shared) -> Vec<Member> {
    let chitchat = shared.handle.chitchat();
    let c = chitchat.lock().await;
    let live: std::collections::HashSet<&ChitchatId> = c.live_nodes().collect();
    let now = Instant::now();
    let mut heartbeats = shared.heartbeats.lock().unwrap();
    let mut newest: BTreeMap<String, Member> = BTreeMap::new();
    for (id, st) in c.node_states() {
        let is_self = *id == shared.self_id;
        if !is_self && !shared.guard.is_verified(&node_id(id)) {
            continue;
        }
        let hb = st.heartbeat();
        let entry = heartbeats.entry(id.clone()).or_insert((hb, now));
        if entry.0 != hb {
            *entry = (hb, now);
        }
        let record = NodeRecord::from_lookup(|k| st.get(k).map(value_of));
        let state = if record.state == ServingState::Left {
            MemberState::Left
        } else if is_self || live.contains(id) {
            MemberState::Alive
        } else {
            MemberState::Dead
        };
        let member = Member {
            name: id.node_id.to_string(),
            addr: id.gossip_advertise_addr,
            state,
            serving: record.state,
            zone: record.zone,
            admin: record.admin,
            build: record.build,
            services: record.services,
            last_seen_ms: if is_self {
                0
            } else {
                now.duration_since(entry.1).as_millis() as u64
            },
            generation: id.generation_id,
            is_self,
        };
        match newest.get(&member.name) {
            Some(m) if m.generation >= member.generation => {}
            _ => {
                newest.insert(member.name.clone(), member);
            }
        }
    }
    heartbeats.retain(|id, _| c.node_states().contains_key(id));
    shared.guard.retain(|id| {
        c.node_states().keys().any(|cid| {
            *cid.node_id == *id.name
                && cid.generation_id == id.generation
                && cid.gossip_advertise_addr == id.addr
        })
    });
    newest.into_values().collect()
}

fn latch_joined(shared: &Shared, list: &[Member]) -> bool {
    let joined = list
        .iter()
        .any(|m| !m.is_self && m.state == MemberState::Alive);
    if joined {
        shared.joined.store(true, Ordering::Relaxed);
    }
    joined || shared.joined.load(Ordering::Relaxed)
}

/// Looks for another live incarnation of our own name at another address
/// whose heartbeat advances (a crashed predecessor's does not).
async fn check_twins(shared: &Shared, twins: &mut HashMap<ChitchatId, (chitchat::Heartbeat, u32)>) {
    let chitchat = shared.handle.chitchat();
    let c = chitchat.lock().await;
    let me = &shared.self_id;
    let live: Vec<ChitchatId> = c
        .live_nodes()
        .filter(|id| {
            *id != me
                && id.node_id == me.node_id
                && id.gossip_advertise_addr != me.gossip_advertise_addr
                && shared.guard.is_verified(&node_id(id))
        })
        .cloned()
        .collect();
    twins.retain(|id, _| live.contains(id));
    for id in live {
        let Some(hb) = c.node_state(&id).map(|st| st.heartbeat()) else {
            continue;
        };
        let entry = twins.entry(id.clone()).or_insert((hb, 0));
        if entry.0 != hb {
            *entry = (hb, entry.1 + 1);
        }
        if entry.1 >= 2 {
            let mut dup = shared.duplicate.lock().unwrap();
            if dup.is_none() {
                tracing::error!(
                    name = %me.node_id,
                    other = %id.gossip_advertise_addr,
                    "another node with this node's name and certificate is alive at another address; this node is no longer ready"
                );
            }
            *dup = Some(id.gossip_advertise_addr);
        }
    }
}

/// Logs a member state change. A member first seen before the failure
/// detector has heard from it shows as dead for a moment; that is not news,
/// so it is logged (at debug) as discovered, and its first `alive` as
/// joined, instead of `None -> dead -> alive`.
fn log_change(
    unconfirmed: &mut std::collections::HashSet<String>,
    name: &str,
    previous: Option<MemberState>,
    state: MemberState,
) {
    match (previous, state) {
        (None, MemberState::Alive) => tracing::info!(member = %name, "member joined"),
        (None, other) => {
            unconfirmed.insert(name.to_string());
            tracing::debug!(member = %name, state = %other, "member discovered; waiting for its heartbeat");
        }
        (Some(_), MemberState::Alive) if unconfirmed.remove(name) => {
            tracing::info!(member = %name, "member joined")
        }
        (Some(from), to) => {
            if unconfirmed.contains(name) && to == MemberState::Dead {
                return;
            }
            unconfirmed.remove(name);
            tracing::info!(member = %name, %from, %to, "member state changed")
        }
    }
}

/// Emits [`MemberEvent`]s and latches `joined`.
async fn watch_members(weak: std::sync::Weak<Shared>) {
    let mut known: HashMap<String, MemberState> = HashMap::new();
    let mut twins: HashMap<ChitchatId, (chitchat::Heartbeat, u32)> = HashMap::new();
    // Members first seen as not alive: the failure detector has not yet
    // heard their heartbeat, which says nothing about them.
    let mut unconfirmed: std::collections::HashSet<String> = Default::default();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let tick = shared.config.interval.min(Duration::from_millis(250));
        check_twins(&shared, &mut twins).await;
        let list = members(&shared).await;
        latch_joined(&shared, &list);
        let mut seen = HashMap::new();
        for m in &list {
            let previous = known.get(&m.name).copied();
            if previous != Some(m.state) {
                log_change(&mut unconfirmed, &m.name, previous, m.state);
                let _ = shared.events.send(MemberEvent {
                    name: m.name.clone(),
                    previous,
                    current: Some(m.state),
                });
            }
            seen.insert(m.name.clone(), m.state);
        }
        for (name, state) in &known {
            if !seen.contains_key(name) {
                unconfirmed.remove(name);
                let _ = shared.events.send(MemberEvent {
                    name: name.clone(),
                    previous: Some(*state),
                    current: None,
                });
            }
        }
        known = seen;
        drop(shared);
        tokio::time::sleep(tick).await;
    }
}
