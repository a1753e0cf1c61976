//! The `byzantine` step's rogue: a peer holding a valid certificate from the
//! scenario's CA (naming a node outside the cluster and services the cluster
//! does not use) that lies, as a modified binary would. For a window it
//! repeatedly
//!
//! - sends forged deltas saying the genuine instances of the target service
//!   are unhealthy, once signed with its own key and once unsigned, at
//!   versions far ahead of the real ones ([`Forgery::Health`]);
//! - advertises a ghost member serving the target at its own QUIC address
//!   ([`Forgery::Ghost`]), unsigned and signed with its own certificate;
//! - sends unsolicited policy records on the policy response channel for a
//!   policy that denies the target, one at version
//!   `18446744073709551615.4294967295@<first node>` and one stamped now
//!   ([`Forgery::Policy`]);
//! - floods a digest with ghost members ([`Forgery::Flood`], once a second).
//!
//! It counts every data-plane stream it receives until the run ends: any
//! count above zero means a caller's request reached a node that does not
//! serve the service. The bytes are written with the gossip crate's own
//! wire writer ([`node::gossip::wire`]); the policy record is a
//! `node::policy::store::Record` filled from kind, name, version, hash and
//! body (any optional field the node's type has beyond those stays empty:
//! the rogue has no operator key to fill it with), bincode-encoded as a
//! peer's answer to a pull is.
//!
//! This module only plays the attacker and counts; judging is in
//! [`crate::invariants`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use base64::Engine as _;
use node::gossip::guard::{CERT_KEY, sign_value};
use node::gossip::schema::keys;
use node::gossip::wire::{Body, DigestEntry, KeyValue, KvStatus, Message, NodeDelta, NodeId};
use node::gossip::{
    GOSSIP_CHANNEL, Gossip, GossipConfig, Health, NodeRecord, ServiceRecord, Trust,
};
use node::transport::signing::{CertChecker, Signer};
use node::transport::{Endpoint, EndpointConfig, TlsFiles};
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::scenario::{Byzantine, Forgery};

/// How often a ghost flood goes out, in rounds' stead.
const FLOOD_EVERY: Duration = Duration::from_secs(1);

/// What a rogue did, for the trace.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct RogueRecord {
    /// The node name its certificate carries.
    pub identity: String,
    /// Its QUIC address.
    pub addr: String,
    /// When it started forging (seconds into the timeline).
    pub started: f64,
    /// When its window ended (planned).
    pub window_end: f64,
    /// Forging rounds it played.
    pub rounds: u64,
    /// Data-plane streams callers opened to it, until the run ended.
    pub streams: u64,
    /// Messages it got onto the wire, by forgery (`join` counts its
    /// honest gossip start).
    pub sent: BTreeMap<String, u64>,
    /// Sends that failed (connection refused or closed).
    pub send_errors: u64,
    /// The forged policy versions it sent (`Kind/name` and version).
    pub forged_policies: Vec<(String, String)>,
    /// The ghost member it advertised, if any.
    pub ghost: Option<String>,
    /// The genuine instances whose health it forged.
    pub targets: Vec<String>,
    /// Whether it also joined gossip as itself.
    pub joined: bool,
}

/// Where the rogue aims: every running node, and the genuine instances of
/// the target as gossip identifies them.
pub struct Aim {
    /// QUIC addresses of the running nodes.
    pub nodes: Vec<SocketAddr>,
    /// Gossip ids of the nodes that front the target.
    pub targets: Vec<NodeId>,
    /// The node name the forged policy versions claim (the first node).
    pub claim: String,
    /// The cluster's gossip interval and phi threshold (for `join`).
    pub gossip_interval: Duration,
    /// See `gossip_interval`.
    pub phi_threshold: f64,
}

/// A running rogue.
pub struct Rogue {
    record: Arc<Mutex<RogueRecord>>,
    streams: Arc<AtomicU64>,
    endpoint: Endpoint,
    gossip: Arc<Mutex<Option<Gossip>>>,
    tasks: Vec<JoinHandle<()>>,
}

/// The fields of `node::policy::store::Record` (the body a peer sends back
/// when asked for a policy), in its order.
#[derive(Serialize)]
struct WireRecord<'a> {
    kind: &'a str,
    name: &'a str,
    version: &'a str,
    hash: &'a str,
    body: Option<&'a str>,
}

/// The record as the node's own `Record` type would put it on the wire,
/// when that type can be filled from these five fields (any field it adds
/// that is an `Option` stays `None`: the rogue has nothing to sign it
/// with); else in today's five-field shape.
fn encode_record(r: &WireRecord<'_>) -> Result<Vec<u8>, bincode::error::EncodeError> {
    let config = bincode::config::standard();
    let as_json = serde_json::to_value(r).unwrap_or_default();
    match serde_json::from_value::<node::policy::store::Record>(as_json) {
        Ok(record) => bincode::serde::encode_to_vec(&record, config),
        Err(_) => bincode::serde::encode_to_vec(r, config),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn service_value(health: Health) -> String {
    serde_json::to_string(&ServiceRecord {
        health,
        ewma_ms: 0.1,
        ..ServiceRecord::default()
    })
    .expect("a service record serialises")
}

fn plain(key: &str, version: u64, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        version,
        status: KvStatus::Set,
    }
}

fn delta(id: &NodeId, key_values: Vec<KeyValue>) -> NodeDelta {
    NodeDelta {
        id: id.clone(),
        last_gc_version: 0,
        from_version_excluded: 0,
        key_values,
        set_max_version: None,
    }
}

/// The messages one round sends to every node, by forgery.
struct Round {
    gossip: Vec<(Forgery, Vec<u8>)>,
    policy: Vec<Vec<u8>>,
}

/// Everything the attack loop needs, built once.
struct Forger {
    spec: Byzantine,
    signer: Signer,
    cert_b64: String,
    targets: Vec<NodeId>,
    ghost: NodeId,
    records: Vec<Vec<u8>>,
}

impl Forger {
    fn signed(&self, id: &NodeId, key: &str, version: u64, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: sign_value(&self.signer, id, key, version, value),
            version,
            status: KvStatus::Set,
        }
    }

    fn round(&self, n: u64, flood: bool) -> Round {
        let mut gossip = Vec::new();
        let f = &self.spec.forge;
        let svc_key = keys::service(&self.spec.target);
        if f.contains(&Forgery::Health) {
            let sick = service_value(Health::Unhealthy);
            for id in &self.targets {
                let v = 1_000_000 + n;
                for kv in [
                    self.signed(id, &svc_key, v, &sick),
                    plain(&svc_key, v, &sick),
                ] {
                    let m = Message {
                        version: 1,
                        body: Body::Ack {
                            delta: vec![delta(id, vec![kv])],
                        },
                    };
                    gossip.push((Forgery::Health, m.encode()));
                }
            }
        }
        if f.contains(&Forgery::Ghost) {
            let mut kvs = NodeRecord::new("default", "", vec![self.spec.target.clone()]).to_kvs();
            kvs.push((svc_key.clone(), service_value(Health::Healthy)));
            let unsigned: Vec<KeyValue> = kvs
                .iter()
                .enumerate()
                .map(|(i, (k, v))| plain(k, i as u64 + 1, v))
                .collect();
            let mut signed = vec![self.signed(&self.ghost, CERT_KEY, 1, &self.cert_b64)];
            signed.extend(
                kvs.iter()
                    .enumerate()
                    .map(|(i, (k, v))| self.signed(&self.ghost, k, i as u64 + 2, v)),
            );
            for kvs in [unsigned, signed] {
                let max_version = kvs.last().map_or(0, |kv| kv.version);
                let m = Message {
                    version: 1,
                    body: Body::SynAck {
                        digest: vec![DigestEntry {
                            id: self.ghost.clone(),
                            heartbeat: n + 1,
                            last_gc_version: 0,
                            max_version,
                        }],
                        delta: vec![delta(&self.ghost, kvs)],
                    },
                };
                gossip.push((Forgery::Ghost, m.encode()));
            }
        }
        if f.contains(&Forgery::Flood) && flood {
            let digest = (0..self.spec.flood)
                .map(|i| DigestEntry {
                    id: NodeId {
                        name: format!("flood-{n}-{i:04}"),
                        generation: 1,
                        addr: SocketAddr::from((
                            [127, 0, 0, 2 + (i % 200) as u8],
                            20_000 + i as u16,
                        )),
                    },
                    heartbeat: 1,
                    last_gc_version: 0,
                    max_version: 1,
                })
                .collect();
            let m = Message {
                version: 1,
                body: Body::Syn {
                    cluster_id: "shoal".into(),
                    digest,
                },
            };
            gossip.push((Forgery::Flood, m.encode()));
        }
        let policy = if f.contains(&Forgery::Policy) {
            self.records.clone()
        } else {
            Vec::new()
        };
        Round { gossip, policy }
    }
}

// === impl Rogue ===

impl Rogue {
    /// Starts a rogue with the certificate folder `certs` (issued by the
    /// scenario's CA), `started` seconds into the timeline, and spawns its
    /// attack for `spec.window`.
    pub async fn start(
        spec: &Byzantine,
        certs: &Path,
        aim: Aim,
        started: f64,
    ) -> anyhow::Result<Rogue> {
        node::transport::install_crypto_provider();
        let endpoint = Endpoint::bind(EndpointConfig::new(
            "127.0.0.1:0".parse().expect("address"),
            TlsFiles::new(certs),
        ))
        .context("the rogue's QUIC endpoint")?;
        let addr = endpoint.local_addr();
        let signer = Signer::from_files(&certs.join("node.pem"), &certs.join("node.key"))
            .context("the rogue's key")?;
        let streams = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        if let Some(mut rx) = endpoint.take_bi_streams() {
            let n = streams.clone();
            tasks.push(tokio::spawn(async move {
                // Count and drop: a request that gets here is already lost.
                while let Some(s) = rx.recv().await {
                    n.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            }));
        }

        let wall = now_ms();
        let doc = node::policy::Document::parse(&spec.policy)
            .map_err(|p| anyhow::anyhow!("the forged policy: {p}"))?;
        let hash = node::policy::store::content_hash(&doc.canonical);
        let versions = [
            format!("{}.{}@{}", u64::MAX, u32::MAX, aim.claim),
            format!("{wall}.0@{}", aim.claim),
        ];
        let policy_id = format!("{}/{}", spec.policy_kind, spec.policy_name);
        let mut records = Vec::new();
        for v in &versions {
            let r = WireRecord {
                kind: &spec.policy_kind,
                name: &spec.policy_name,
                version: v,
                hash: &hash,
                body: Some(&doc.canonical),
            };
            records.push(encode_record(&r).context("encoding the forged record")?);
        }
        let ghost = NodeId {
            name: format!("ghost-{}", spec.target),
            generation: wall,
            addr,
        };
        let record = Arc::new(Mutex::new(RogueRecord {
            identity: spec.identity.clone(),
            addr: addr.to_string(),
            started,
            window_end: started + spec.window.as_secs_f64(),
            forged_policies: if spec.forge.contains(&Forgery::Policy) {
                versions
                    .iter()
                    .map(|v| (policy_id.clone(), v.clone()))
                    .collect()
            } else {
                Vec::new()
            },
            ghost: spec
                .forge
                .contains(&Forgery::Ghost)
                .then(|| ghost.name.clone()),
            targets: aim.targets.iter().map(|t| t.name.clone()).collect(),
            joined: spec.join,
            ..RogueRecord::default()
        }));

        let gossip = Arc::new(Mutex::new(None));
        if spec.join {
            let mut config = GossipConfig::new(spec.identity.clone());
            config.seeds = aim.nodes.iter().map(|a| a.to_string()).collect();
            config.interval = aim.gossip_interval;
            config.phi_threshold = aim.phi_threshold;
            let trust = Trust {
                signer: Arc::new(
                    Signer::from_files(&certs.join("node.pem"), &certs.join("node.key"))
                        .context("the rogue's key")?,
                ),
                checker: CertChecker::from_dir(certs).context("the mesh CA")?,
                dir: None,
            };
            let g = Gossip::start(
                endpoint.clone(),
                config,
                NodeRecord::new("default", "", spec.cert_services.clone()),
                trust,
            )
            .await
            .context("the rogue's gossip")?;
            let healthy = service_value(Health::Healthy);
            for s in &spec.cert_services {
                g.set_key(&keys::service(s), &healthy).await;
            }
            *record
                .lock()
                .unwrap()
                .sent
                .entry("join".into())
                .or_default() += 1;
            *gossip.lock().unwrap() = Some(g);
        }

        let forger = Forger {
            spec: spec.clone(),
            cert_b64: base64::engine::general_purpose::STANDARD.encode(signer.cert_der().as_ref()),
            signer,
            targets: aim.targets,
            ghost,
            records,
        };
        tasks.push(tokio::spawn(attack(
            forger,
            endpoint.clone(),
            aim.nodes,
            record.clone(),
            gossip.clone(),
        )));
        Ok(Rogue {
            record,
            streams,
            endpoint,
            gossip,
            tasks,
        })
    }

    /// What it did so far.
    pub fn record(&self) -> RogueRecord {
        let mut r = self.record.lock().unwrap().clone();
        r.streams = self.streams.load(Ordering::Relaxed);
        r
    }

    /// Stops forging and closes its endpoint.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let g = self.gossip.lock().unwrap().take();
        if let Some(g) = g {
            g.shutdown().await;
        }
        self.endpoint.close();
    }
}

/// Plays rounds every `spec.every` for `spec.window`, then (if it joined)
/// leaves gossip.
async fn attack(
    forger: Forger,
    endpoint: Endpoint,
    nodes: Vec<SocketAddr>,
    record: Arc<Mutex<RogueRecord>>,
    gossip: Arc<Mutex<Option<Gossip>>>,
) {
    let start = Instant::now();
    let mut next = start;
    let mut last_flood: Option<Instant> = None;
    let mut n = 0u64;
    while start.elapsed() < forger.spec.window {
        n += 1;
        let flood = last_flood.is_none_or(|t| t.elapsed() >= FLOOD_EVERY);
        if flood {
            last_flood = Some(Instant::now());
        }
        let round = forger.round(n, flood);
        let sends = nodes.iter().map(|&to| {
            let (endpoint, round) = (&endpoint, &round);
            async move {
                let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
                let mut errors = 0u64;
                for (what, bytes) in &round.gossip {
                    match endpoint.send_message(to, GOSSIP_CHANNEL, bytes).await {
                        Ok(()) => *sent.entry(what.as_str()).or_default() += 1,
                        Err(_) => errors += 1,
                    }
                }
                for bytes in &round.policy {
                    match endpoint
                        .send_message(to, node::policy::sync::RESPONSE, bytes)
                        .await
                    {
                        Ok(()) => *sent.entry(Forgery::Policy.as_str()).or_default() += 1,
                        Err(_) => errors += 1,
                    }
                }
                (sent, errors)
            }
        });
        let results = futures::future::join_all(sends).await;
        {
            let mut r = record.lock().unwrap();
            r.rounds = n;
            for (sent, errors) in results {
                r.send_errors += errors;
                for (k, v) in sent {
                    *r.sent.entry(k.to_string()).or_default() += v;
                }
            }
        }
        next += forger.spec.every;
        if next < Instant::now() {
            next = Instant::now();
        }
        tokio::time::sleep_until(next).await;
    }
    let g = gossip.lock().unwrap().take();
    if let Some(g) = g {
        g.leave().await;
        g.shutdown().await;
    }
}
