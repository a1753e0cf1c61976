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
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::Gossip;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use transport::Endpoint;

use super::doc::Kind;
use super::hlc::Version;
use super::store::{Entry, PolicyStore, Record, StoreError};

/// Message channel for body requests.
pub const REQUEST: u8 = 2;
/// Message channel for body responses.
pub const RESPONSE: u8 = 3;
/// Gossip key prefix of policy summaries.
pub const KEY_PREFIX: &str = "policy:";

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    kind: String,
    name: String,
}

/// Policy propagation metrics.
#[derive(Clone)]
pub struct PolicyMetrics {
    applied: Family<Vec<(String, String)>, Counter>,
    pulls: Counter,
    hash_mismatches: Counter,
    propagation: Histogram,
    denied: Family<Vec<(String, String)>, Counter>,
}

impl PolicyMetrics {
    /// Registers the metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = PolicyMetrics {
            applied: Family::default(),
            pulls: Counter::default(),
            hash_mismatches: Counter::default(),
            denied: Family::default(),
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
        m
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

/// The gossip value advertising `entry`.
fn advert(entry: &Entry) -> String {
    format!("{} {}", entry.version, entry.hash)
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
    let (ver, hash) = v.split_once(' ')?;
    Some((ver.parse().ok()?, hash.to_string()))
}

/// Which version of one policy each live node advertises.
#[derive(Debug, Clone, Serialize)]
pub struct NodeVersion {
    /// Node name.
    pub node: String,
    /// Advertised version, if any.
    pub version: Option<String>,
}

/// Runs policy propagation for one node.
#[derive(Clone)]
pub struct PolicySync {
    store: Arc<PolicyStore>,
    gossip: Gossip,
    endpoint: Endpoint,
    metrics: PolicyMetrics,
}

impl PolicySync {
    /// Wires the store to gossip and the endpoint.
    pub fn new(
        store: Arc<PolicyStore>,
        gossip: Gossip,
        endpoint: Endpoint,
        metrics: PolicyMetrics,
    ) -> Self {
        PolicySync {
            store,
            gossip,
            endpoint,
            metrics,
        }
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

    /// For each live node, the version of `kind/name` it advertises.
    pub async fn status_of(&self, kind: Kind, name: &str) -> Vec<NodeVersion> {
        let key = key_of(kind, name);
        self.gossip
            .scan(&key)
            .await
            .into_iter()
            .map(|p| NodeVersion {
                version: p
                    .keys
                    .iter()
                    .find(|(k, _)| *k == key)
                    .and_then(|(_, v)| parse_advert(v))
                    .map(|(v, _)| v.to_string()),
                node: p.node,
            })
            .collect()
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
                        let (ver, hash) = parse_advert(&v)?;
                        let shown = if hash == super::store::TOMBSTONE {
                            format!("{ver} (deleted)")
                        } else {
                            ver.to_string()
                        };
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

    /// Advertises every local entry whose version changed.
    async fn publish_loop(self) {
        let mut changes = self.store.subscribe();
        let mut published: HashMap<String, String> = HashMap::new();
        loop {
            for e in self.store.entries() {
                let key = key_of(e.kind, &e.name);
                let value = advert(&e);
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

    /// Answers body requests from peers.
    async fn serve_loop(self, mut rx: tokio::sync::mpsc::Receiver<transport::Message>) {
        let config = bincode::config::standard();
        while let Some(msg) = rx.recv().await {
            let Ok((req, _)) =
                bincode::serde::decode_from_slice::<Request, _>(&msg.payload, config)
            else {
                continue;
            };
            let Ok(kind) = req.kind.parse::<Kind>() else {
                continue;
            };
            let Some(entry) = self.store.entry(kind, &req.name) else {
                continue;
            };
            let Ok(bytes) = bincode::serde::encode_to_vec(entry.to_record(), config) else {
                continue;
            };
            let endpoint = self.endpoint.clone();
            let to = msg.from.addr();
            tokio::spawn(async move {
                let _ = endpoint.send_message(to, RESPONSE, &bytes).await;
            });
        }
    }

    /// Applies bodies that arrive from peers.
    async fn apply_loop(self, mut rx: tokio::sync::mpsc::Receiver<transport::Message>) {
        let config = bincode::config::standard();
        while let Some(msg) = rx.recv().await {
            let Ok((record, _)) =
                bincode::serde::decode_from_slice::<Record, _>(&msg.payload, config)
            else {
                continue;
            };
            let id = format!("{}/{}", record.kind, record.name);
            match record.into_entry() {
                Ok(entry) => {
                    let (kind, wall_ms) = (entry.kind, entry.version.wall_ms);
                    let version = entry.version.to_string();
                    match self.store.offer(entry) {
                        Ok(true) => {
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
                            tracing::info!(policy = %id, %version, from = %msg.from.peer.node, "applied policy from peer");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(policy = %id, error = %e, "could not store policy")
                        }
                    }
                }
                Err(StoreError::HashMismatch) => {
                    self.metrics.hash_mismatches.inc();
                    tracing::warn!(policy = %id, from = %msg.from.peer.node, "policy body hash mismatch; refused");
                }
                Err(e) => tracing::warn!(policy = %id, error = %e, "refused policy from peer"),
            }
        }
    }

    /// Looks for advertised versions newer than ours and pulls them.
    async fn pull_loop(self) {
        let interval = self
            .gossip
            .config()
            .interval
            .min(Duration::from_millis(200));
        let mut asked: HashMap<(Kind, String), (Version, Instant)> = HashMap::new();
        loop {
            tokio::time::sleep(interval).await;
            let mut wanted: HashMap<(Kind, String), (Version, Vec<SocketAddr>)> = HashMap::new();
            for p in self.gossip.scan(KEY_PREFIX).await {
                if p.is_self {
                    continue;
                }
                for (k, v) in &p.keys {
                    let (Some(key), Some((version, _))) = (parse_key(k), parse_advert(v)) else {
                        continue;
                    };
                    let local = self.store.entry(key.0, &key.1).map(|e| e.version);
                    if local.as_ref().is_some_and(|l| *l >= version) {
                        continue;
                    }
                    let slot = wanted.entry(key).or_insert((version.clone(), Vec::new()));
                    if version > slot.0 {
                        *slot = (version, vec![p.addr]);
                    } else if version == slot.0 {
                        slot.1.push(p.addr);
                    }
                }
            }
            for (key, (version, peers)) in wanted {
                let recent = asked
                    .get(&key)
                    .is_some_and(|(v, at)| *v == version && at.elapsed() < Duration::from_secs(1));
                if recent {
                    continue;
                }
                let Some(&peer) = peers.choose(&mut rand::thread_rng()) else {
                    continue;
                };
                let req = Request {
                    kind: key.0.to_string(),
                    name: key.1.clone(),
                };
                let Ok(bytes) = bincode::serde::encode_to_vec(&req, bincode::config::standard())
                else {
                    continue;
                };
                self.metrics.pulls.inc();
                asked.insert(key, (version, Instant::now()));
                let endpoint = self.endpoint.clone();
                tokio::spawn(async move {
                    let _ = endpoint.send_message(peer, REQUEST, &bytes).await;
                });
            }
        }
    }
}
