//! Policy propagation without a control plane.
//!
//! Gossip carries a compact summary: one key per policy,
//! `policy:<Kind>/<name>` = `<version> <sha256>` (`-` for a tombstone). A node
//! that sees a version newer than its own asks one advertiser for the body
//! over QUIC (message channel [`REQUEST`]); the answer (channel [`RESPONSE`])
//! must hash to what was advertised, and is applied only if still newer.
//! Having applied it, the node advertises it too, so any node can serve any
//! policy and losing the origin loses nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gossip::{Gossip, MemberState};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use transport::Endpoint;

use super::doc::{Kind, MAX_DOCUMENT};
use super::hlc::Version;
use super::store::{Entry, Offered, PolicyStore, Record, StoreError, has_seen};
use super::trust::{Refusal, Trust};

/// Message channel for body requests.
pub const REQUEST: u8 = 2;
/// Message channel for body responses.
pub const RESPONSE: u8 = 3;
/// Gossip key prefix of policy summaries.
pub const KEY_PREFIX: &str = "policy:";
/// Largest policy record accepted from a peer, checked before decoding: a
/// full-size document plus its signature and certificate.
pub const MAX_RECORD: usize = MAX_DOCUMENT + 64 * 1024;
/// Largest body request accepted from a peer.
const MAX_REQUEST: usize = 1024;
/// How long a request for a body stays open for its answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a refused (version, hash) is not asked for again.
const REFUSED_FOR: Duration = Duration::from_secs(30);
/// Documents parsed at once on this node (HTTP writes and peer records
/// together); each parse runs on the blocking pool, never an async worker.
pub const PARSE_CONCURRENCY: usize = 2;

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    kind: String,
    name: String,
    /// The version wanted: the one in force, or a conflict's losing write.
    version: String,
}

/// Policy propagation metrics.
#[derive(Clone)]
pub struct PolicyMetrics {
    applied: Family<Vec<(String, String)>, Counter>,
    pulls: Counter,
    hash_mismatches: Counter,
    propagation: Histogram,
    denied: Family<Vec<(String, String)>, Counter>,
    refused: Family<Vec<(String, String)>, Counter>,
    conflicts: Counter,
}

impl PolicyMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = PolicyMetrics {
            applied: Family::default(),
            pulls: Counter::default(),
            hash_mismatches: Counter::default(),
            denied: Family::default(),
            refused: Family::default(),
            conflicts: Counter::default(),
            propagation: Histogram::new([
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
        };
        registry.register(
            "policy_applied",
            "Policy versions applied on this node, by kind and source (local write or peer)",
            m.applied.clone(),
        );
        registry.register(
            "policy_pulls",
            "Policy bodies requested from peers",
            m.pulls.clone(),
        );
        registry.register(
            "policy_hash_mismatches",
            "Policy bodies from peers refused because their hash did not match",
            m.hash_mismatches.clone(),
        );
        registry.register(
            "policy_propagation_seconds",
            "Time from a policy write being accepted (its HLC stamp) to this node applying it",
            m.propagation.clone(),
        );
        registry.register(
            "policy_denied",
            "Requests refused by policy on this node, by target service and reason (authorization, rate_limit, fault)",
            m.denied.clone(),
        );
        registry.register(
            "policy_refused",
            "Policy writes and records refused before applying, by source (http or peer) and reason",
            m.refused.clone(),
        );
        registry.register(
            "policy_conflicts",
            "Concurrent policy writes detected on this node (the last-writer-wins loser was discarded)",
            m.conflicts.clone(),
        );
        m
    }

    /// Counts a refused write or record.
    pub fn refused(&self, source: &str, reason: &str) {
        self.refused
            .get_or_create(&vec![
                ("source".into(), source.to_string()),
                ("reason".into(), reason.to_string()),
            ])
            .inc();
    }

    /// Counts a request refused by policy.
    pub fn denied(&self, service: &str, reason: &str) {
        self.denied
            .get_or_create(&vec![
                ("service".into(), service.to_string()),
                ("reason".into(), reason.to_string()),
            ])
            .inc();
    }

    /// Counts a local write.
    pub fn local_write(&self, kind: Kind) {
        self.applied
            .get_or_create(&vec![
                ("kind".into(), kind.to_string()),
                ("source".into(), "local".into()),
            ])
            .inc();
    }
}

/// The gossip value advertising `entry`: `<version> <hash>`, plus
/// ` !<version> <hash>` naming a conflict's losing write.
fn advert(entry: &Entry, conflict: Option<&super::store::Conflict>) -> String {
    match conflict.and_then(|c| c.loser_entry.as_ref().map(|l| (c, l))) {
        Some((c, l)) if c.winner == entry.version.to_string() => {
            format!("{} {} !{} {}", entry.version, entry.hash, l.version, l.hash)
        }
        _ => format!("{} {}", entry.version, entry.hash),
    }
}

fn key_of(kind: Kind, name: &str) -> String {
    format!("{KEY_PREFIX}{kind}/{name}")
}

fn parse_key(key: &str) -> Option<(Kind, String)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (k, n) = rest.split_once('/')?;
    Some((k.parse().ok()?, n.to_string()))
}

fn parse_advert(v: &str) -> Option<(Version, String)> {
    parse_advert_full(v).map(|a| (a.version, a.hash))
}

struct Advert {
    version: Version,
    hash: String,
    loser: Option<(Version, String)>,
}

fn parse_advert_full(v: &str) -> Option<Advert> {
    let mut parts = v.split(' ');
    let version = parts.next()?.parse().ok()?;
    let hash = parts.next()?.to_string();
    let loser = match (parts.next(), parts.next()) {
        (Some(l), Some(h)) => Some((l.strip_prefix('!')?.parse().ok()?, h.to_string())),
        _ => None,
    };
    Some(Advert {
        version,
        hash,
        loser,
    })
}

/// A body this node asked a peer for.
#[derive(Debug, Clone)]
struct Asked {
    hash: String,
    node: String,
    at: Instant,
}

type AskKey = (Kind, String, String);

/// The newest advertised version of one policy, its hash, and who has it.
type Wanted = (Version, String, Vec<(std::net::SocketAddr, String)>);

/// Which version of one policy each member advertises.
#[derive(Debug, Clone, Serialize)]
pub struct NodeVersion {
    /// Node name.
    pub node: String,
    /// Advertised version, if any.
    pub version: Option<String>,
    /// `alive`, or `suspected` when its heartbeat has been still for three
    /// gossip intervals but it is not yet declared dead.
    pub state: String,
}

/// Runs policy propagation for one node.
#[derive(Clone)]
pub struct PolicySync {
    store: Arc<PolicyStore>,
    gossip: Gossip,
    endpoint: Endpoint,
    metrics: PolicyMetrics,
    trust: Arc<Trust>,
    parse: Arc<Semaphore>,
    asked: Arc<Mutex<HashMap<AskKey, Asked>>>,
    /// (what, from whom) refused recently: not asked of that peer again.
    refused: Arc<Mutex<HashMap<(AskKey, String), Instant>>>,
}

impl PolicySync {
    /// Wires the store to gossip and the endpoint; `trust` checks operator
    /// signatures on every record pulled from a peer.
    pub fn new(
        store: Arc<PolicyStore>,
        gossip: Gossip,
        endpoint: Endpoint,
        metrics: PolicyMetrics,
        trust: Arc<Trust>,
    ) -> Self {
        PolicySync {
            store,
            gossip,
            endpoint,
            metrics,
            trust,
            parse: Arc::new(Semaphore::new(PARSE_CONCURRENCY)),
            asked: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// The operator trust this node verifies writes with.
    pub fn trust(&self) -> &Arc<Trust> {
        &self.trust
    }

    /// The metrics.
    pub fn metrics(&self) -> &PolicyMetrics {
        &self.metrics
    }

    /// Runs CPU-heavy document work (`f`) on the blocking pool, at most
    /// [`PARSE_CONCURRENCY`] at a time, so parsing never stalls the async
    /// workers that carry traffic.
    pub async fn parse_off_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _permit = self.parse.acquire().await.ok()?;
        tokio::task::spawn_blocking(f).await.ok()
    }

    /// Starts the background tasks.
    pub fn spawn(&self) -> Vec<JoinHandle<()>> {
        let requests = self.endpoint.subscribe(REQUEST, 256);
        let responses = self.endpoint.subscribe(RESPONSE, 256);
        vec![
            tokio::spawn(self.clone().publish_loop()),
            tokio::spawn(self.clone().serve_loop(requests)),
            tokio::spawn(self.clone().apply_loop(responses)),
            tokio::spawn(self.clone().pull_loop()),
        ]
    }

    /// The same store, pending asks and refusals, advertising and pulling
    /// through another gossip pool: a zone representative's backbone, so
    /// policy written in one zone reaches the others (see
    /// [`PolicySync::spawn_relay`]).
    pub fn over(&self, gossip: Gossip) -> Self {
        let mut s = self.clone();
        s.gossip = gossip;
        s
    }

    /// Starts advertising and pulling only (bodies are answered and applied
    /// by the tasks of [`PolicySync::spawn`], once per node, which share this
    /// one's pending asks).
    pub fn spawn_relay(&self) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().publish_loop()),
            tokio::spawn(self.clone().pull_loop()),
        ]
    }

    /// For each member not declared dead or left, the version of
    /// `kind/name` it advertises (a suspected member is included).
    pub async fn status_of(&self, kind: Kind, name: &str) -> Vec<NodeVersion> {
        let key = key_of(kind, name);
        let adverts: HashMap<String, Option<Version>> = self
            .gossip
            .scan_all(&key)
            .await
            .into_iter()
            .map(|p| {
                let v = p
                    .keys
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| parse_advert(v))
                    .map(|(v, _)| v);
                (p.node, v)
            })
            .collect();
        let quiet = self.gossip.config().interval * 3;
        let mut out: Vec<NodeVersion> = self
            .gossip
            .members()
            .await
            .into_iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| NodeVersion {
                version: adverts
                    .get(&m.name)
                    .cloned()
                    .flatten()
                    .map(|v| v.to_string()),
                state: if m.is_self || m.last_seen_ms < quiet.as_millis() as u64 {
                    "alive".into()
                } else {
                    "suspected".into()
                },
                node: m.name,
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }

    /// Every policy's advertised version per live node.
    pub async fn status(&self) -> Vec<(String, HashMap<String, String>)> {
        self.gossip
            .scan(KEY_PREFIX)
            .await
            .into_iter()
            .map(|p| {
                let versions = p
                    .keys
                    .into_iter()
                    .filter_map(|(k, v)| {
                        let (kind, name) = parse_key(&k)?;
                        let a = parse_advert_full(&v)?;
                        let mut shown = if a.hash == super::store::TOMBSTONE {
                            format!("{} (deleted)", a.version)
                        } else {
                            a.version.to_string()
                        };
                        if let Some((loser, _)) = a.loser {
                            shown.push_str(&format!(" (conflict: {loser} lost)"));
                        }
                        Some((format!("{kind}/{name}"), shown))
                    })
                    .collect();
                (p.node, versions)
            })
            .collect()
    }

    /// Waits until every live node advertises `version` (or newer) of
    /// `kind/name`, or `timeout` passes. Returns whether all did.
    pub async fn wait_applied(
        &self,
        kind: Kind,
        name: &str,
        version: &Version,
        timeout: Duration,
    ) -> bool {
        let end = Instant::now() + timeout;
        loop {
            let all = self.status_of(kind, name).await.iter().all(|n| {
                n.version
                    .as_deref()
                    .and_then(|v| v.parse::<Version>().ok())
                    .is_some_and(|v| v >= *version)
            });
            if all {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Advertises every local entry whose version (or conflict) changed.
    async fn publish_loop(self) {
        let mut changes = self.store.subscribe();
        let mut published: HashMap<String, String> = HashMap::new();
        loop {
            let conflicts: HashMap<(Kind, String), super::store::Conflict> =
                self.store.conflicts().into_iter().collect();
            for e in self.store.entries() {
                let key = key_of(e.kind, &e.name);
                let value = advert(&e, conflicts.get(&(e.kind, e.name.clone())));
                if published.get(&key) != Some(&value) {
                    self.gossip.set_key(&key, &value).await;
                    published.insert(key, value);
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Answers body requests from peers: the version in force, or the
    /// losing write of a conflict this node recorded.
    async fn serve_loop(self, mut rx: tokio::sync::mpsc::Receiver<transport::Message>) {
        let config = bincode::config::standard().with_limit::<MAX_REQUEST>();
        while let Some(msg) = rx.recv().await {
            if msg.payload.len() > MAX_REQUEST {
                continue;
            }
            let Ok((req, _)) =
                bincode::serde::decode_from_slice::<Request, _>(&msg.payload, config)
            else {
                continue;
            };
            let Ok(kind) = req.kind.parse::<Kind>() else {
                continue;
            };
            let entry = match self.store.entry(kind, &req.name) {
                Some(e) if e.version.to_string() == req.version => e,
                _ => match self.store.conflict(kind, &req.name) {
                    Some(c) if c.loser == req.version => match c.loser_entry {
                        Some(l) => l,
                        None => continue,
                    },
                    _ => continue,
                },
            };
            let Ok(bytes) =
                bincode::serde::encode_to_vec(entry.to_record(), bincode::config::standard())
            else {
                continue;
            };
            let endpoint = self.endpoint.clone();
            let to = msg.from.addr();
            tokio::spawn(async move {
                let _ = endpoint.send_message(to, RESPONSE, &bytes).await;
            });
        }
    }

    fn refuse(&self, key: Option<AskKey>, reason: &str, detail: &str, from: &str) {
        self.metrics.refused("peer", reason);
        tracing::warn!(%from, reason, detail, "refused policy record from peer");
        if let Some(k) = key {
            self.refused
                .lock()
                .unwrap()
                .insert((k, from.to_string()), Instant::now());
        }
    }

    /// Applies bodies that arrive from peers: only answers to a request this
    /// node made, at the version and hash it asked for, signed by an operator.
    async fn apply_loop(self, mut rx: tokio::sync::mpsc::Receiver<transport::Message>) {
        let config = bincode::config::standard().with_limit::<MAX_RECORD>();
        while let Some(msg) = rx.recv().await {
            let from = msg.from.peer.node.clone();
            if msg.payload.len() > MAX_RECORD {
                self.refuse(
                    None,
                    "too_large",
                    &format!("{} bytes", msg.payload.len()),
                    &from,
                );
                continue;
            }
            let Ok((record, _)) =
                bincode::serde::decode_from_slice::<Record, _>(&msg.payload, config)
            else {
                self.refuse(None, "malformed", "not a policy record", &from);
                continue;
            };
            let id = format!("{}/{}", record.kind, record.name);
            let Ok(kind) = record.kind.parse::<Kind>() else {
                self.refuse(None, "malformed", &format!("{id}: unknown kind"), &from);
                continue;
            };
            let key: AskKey = (kind, record.name.clone(), record.version.clone());
            let asked = {
                let mut asked = self.asked.lock().unwrap();
                match asked.get(&key) {
                    Some(a)
                        if a.node == from
                            && a.hash == record.hash
                            && a.at.elapsed() < ASK_TIMEOUT =>
                    {
                        asked.remove(&key)
                    }
                    _ => None,
                }
            };
            if asked.is_none() {
                self.refuse(
                    None,
                    "unsolicited",
                    &format!("{id} at {} was not asked of {from}", record.version),
                    &from,
                );
                continue;
            }
            let trust = self.trust.clone();
            let now_ms = self.store.clock().physical_ms();
            let mut record = record;
            record.operator = None;
            let checked = self
                .parse_off_thread(move || {
                    // Signature first: only an operator's bytes get parsed.
                    let version: Version = record
                        .version
                        .parse()
                        .map_err(|e: String| ("malformed", e))?;
                    let operator = trust
                        .verify_record(
                            kind,
                            &record.name,
                            record.body.as_deref(),
                            &version,
                            record.signature.as_ref(),
                            now_ms,
                        )
                        .map_err(|r: Refusal| (r.reason(), r.to_string()))?;
                    let entry = record.into_entry().map_err(|e| match e {
                        StoreError::HashMismatch => ("hash_mismatch", e.to_string()),
                        other => ("invalid_document", other.to_string()),
                    })?;
                    Ok::<_, (&'static str, String)>((entry, operator))
                })
                .await;
            let (mut entry, operator) = match checked {
                Some(Ok(v)) => v,
                Some(Err((reason, detail))) => {
                    if reason == "hash_mismatch" {
                        self.metrics.hash_mismatches.inc();
                    }
                    self.refuse(Some(key), reason, &format!("{id}: {detail}"), &from);
                    continue;
                }
                None => continue,
            };
            if let Some(p) = entry.provenance.as_mut() {
                Arc::make_mut(p).operator = Some(operator);
            }
            let (kind, wall_ms) = (entry.kind, entry.version.wall_ms);
            let version = entry.version.to_string();
            // (A probe for a conflict's losing write lands here too: offering
            // it records the conflict, verified, and applies nothing.)
            match self.store.offer_off_thread(entry).await {
                Ok(Offered::Applied { conflict }) => {
                    let now = self.store.clock().physical_ms();
                    self.metrics
                        .propagation
                        .observe(now.saturating_sub(wall_ms) as f64 / 1000.0);
                    self.metrics
                        .applied
                        .get_or_create(&vec![
                            ("kind".into(), kind.to_string()),
                            ("source".into(), "peer".into()),
                        ])
                        .inc();
                    tracing::info!(policy = %id, %version, %from, "applied policy from peer");
                    if let Some(c) = conflict {
                        self.conflict_seen(&id, &c.winner, &c.loser);
                    }
                }
                Ok(Offered::Kept { conflict }) => {
                    if let Some(c) = conflict {
                        self.conflict_seen(&id, &c.winner, &c.loser);
                    }
                }
                Ok(Offered::Relabeled) => self.refuse(
                    Some(key),
                    "relabeled",
                    &format!("{id}: the write in force under another version ({version})"),
                    &from,
                ),
                Err(StoreError::Clock(e)) => {
                    self.refuse(Some(key), "clock", &format!("{id}: {e}"), &from)
                }
                Err(e) => {
                    tracing::error!(policy = %id, error = %e, "could not store policy")
                }
            }
        }
    }

    fn conflict_seen(&self, id: &str, winner: &str, loser: &str) {
        self.metrics.conflicts.inc();
        tracing::warn!(
            policy = %id,
            %winner,
            %loser,
            "concurrent policy writes: neither writer had seen the other; last-writer-wins kept the winner and discarded the loser (write again to resolve)"
        );
    }

    /// Looks for advertised versions newer than ours and pulls them; asks
    /// for the losing write of a concurrent pair this node has not verified.
    async fn pull_loop(self) {
        let interval = self
            .gossip
            .config()
            .interval
            .min(Duration::from_millis(200));
        loop {
            tokio::time::sleep(interval).await;
            let now_ms = self.store.clock().physical_ms();
            let mut wanted: HashMap<(Kind, String), Wanted> = HashMap::new();
            let mut probes: Vec<(AskKey, String, std::net::SocketAddr, String)> = Vec::new();
            {
                let mut refused = self.refused.lock().unwrap();
                refused.retain(|_, at| at.elapsed() < REFUSED_FOR);
            }
            let refused = self.refused.lock().unwrap().clone();
            for p in self.gossip.scan(KEY_PREFIX).await {
                if p.is_self {
                    continue;
                }
                for (k, v) in &p.keys {
                    let (Some(key), Some(a)) = (parse_key(k), parse_advert_full(v)) else {
                        continue;
                    };
                    // A stamp too far ahead can never be applied: never ask.
                    if a.version.wall_ms > now_ms.saturating_add(super::hlc::MAX_AHEAD_MS) {
                        continue;
                    }
                    let local = self.store.entry(key.0, &key.1);
                    if let Some(l) = &local {
                        // Concurrent writes: a version ours did not see, or a
                        // conflict the peer recorded on the version we run.
                        let unseen = (a.version < l.version && !has_seen(l, &a.version))
                            .then(|| (a.version.clone(), a.hash.clone()));
                        let marked = a
                            .loser
                            .clone()
                            .filter(|(lv, _)| a.version == l.version && !has_seen(l, lv));
                        let known = self.store.conflict(key.0, &key.1);
                        for (lv, lh) in [unseen, marked].into_iter().flatten() {
                            if known.as_ref().is_some_and(|c| c.loser == lv.to_string()) {
                                continue;
                            }
                            let ak = (key.0, key.1.clone(), lv.to_string());
                            if !refused.contains_key(&(ak.clone(), p.node.clone())) {
                                probes.push((ak, lh, p.addr, p.node.clone()));
                            }
                        }
                        if l.version >= a.version {
                            continue;
                        }
                    }
                    let ak = (key.0, key.1.clone(), a.version.to_string());
                    if refused.contains_key(&(ak, p.node.clone())) {
                        continue;
                    }
                    let slot = wanted.entry(key).or_insert((
                        a.version.clone(),
                        a.hash.clone(),
                        Vec::new(),
                    ));
                    if a.version > slot.0 {
                        *slot = (a.version, a.hash, vec![(p.addr, p.node.clone())]);
                    } else if a.version == slot.0 && a.hash == slot.1 {
                        slot.2.push((p.addr, p.node.clone()));
                    }
                }
            }
            let mut sends = Vec::new();
            {
                let mut asked = self.asked.lock().unwrap();
                asked.retain(|_, a| a.at.elapsed() < ASK_TIMEOUT);
                for (key, (version, hash, peers)) in wanted {
                    let ak = (key.0, key.1, version.to_string());
                    let recent = asked
                        .get(&ak)
                        .is_some_and(|a| a.at.elapsed() < Duration::from_secs(1));
                    if recent {
                        continue;
                    }
                    let Some((addr, node)) = peers.choose(&mut rand::thread_rng()).cloned() else {
                        continue;
                    };
                    asked.insert(
                        ak.clone(),
                        Asked {
                            hash,
                            node,
                            at: Instant::now(),
                        },
                    );
                    sends.push((ak, addr));
                    self.metrics.pulls.inc();
                }
                for (ak, hash, addr, node) in probes {
                    if asked.contains_key(&ak) {
                        continue;
                    }
                    asked.insert(
                        ak.clone(),
                        Asked {
                            hash,
                            node,
                            at: Instant::now(),
                        },
                    );
                    sends.push((ak, addr));
                }
            }
            for ((kind, name, version), peer) in sends {
                let req = Request {
                    kind: kind.to_string(),
                    name,
                    version,
                };
                let Ok(bytes) = bincode::serde::encode_to_vec(&req, bincode::config::standard())
                else {
                    continue;
                };
                let endpoint = self.endpoint.clone();
                tokio::spawn(async move {
                    let _ = endpoint.send_message(peer, REQUEST, &bytes).await;
                });
            }
        }
    }
}
