//! What stands between a peer's gossip bytes and chitchat.
//!
//! Without a control plane, gossip is the control plane, so a node holding a
//! valid certificate must not be able to speak for anyone but itself. Each
//! node signs every key-value it publishes with its certificate key; the
//! signature covers the node's id (name, generation, address), the key, the
//! chitchat version and the value, so it can be neither moved to another
//! node, nor replayed at another version, nor altered. Each node also
//! publishes its certificate (key `cert`), itself signed the same way.
//!
//! The [`Guard`] reads every message a peer sends ([`crate::wire`]) before
//! chitchat sees it and keeps only:
//! - node deltas whose every key-value verifies against that node's
//!   certificate, which must chain to the mesh CA and name the node;
//! - digest entries of nodes whose certificate it has verified (so a relayed
//!   heartbeat cannot create a member, ghost or otherwise).
//!
//! It refuses deletes and GC resets (Shoal never deletes keys: a withdrawn
//! value is published as an empty signed value), deltas about ourselves, ids
//! that are not well-formed names, and more members than a digest can hold.
//! Everything refused is counted by reason. A message it had to cut is
//! re-encoded; one it could not read is dropped whole.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use transport::signing::{CertChecker, CheckedCert, Signer};

use crate::membership::Pool;
use crate::schema::keys;
use crate::wire::{
    Body, DigestEntry, KvStatus, MAX_MESSAGE_BYTES, Message, NodeDelta, NodeId, WireError,
};
use crate::zone::{MAX_SUMMARY_KEYS, SUMMARY_PREFIX};

/// The key under which each node publishes its certificate (base64 DER).
pub const CERT_KEY: &str = "cert";
/// The longest node name gossip accepts.
pub const MAX_NAME_BYTES: usize = 64;
/// The longest key.
pub const MAX_KEY_BYTES: usize = 256;
/// The longest value (after its signature).
pub const MAX_VALUE_BYTES: usize = 16 * 1024;
/// The most keys one node may publish.
pub const MAX_KEYS_PER_NODE: usize = 4096;
/// The most value bytes one node may publish.
pub const MAX_BYTES_PER_NODE: usize = 1 << 20;
/// Budget for the digest (uncompressed upper bound) that lists every member:
/// chitchat needs the digest plus at least 100 bytes of delta in one 65,507
/// byte message, so members stop being admitted well before that.
pub const MAX_DIGEST_BYTES: usize = 56_000;

/// Why gossip was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Larger than a chitchat message may be.
    Oversize,
    /// Not a readable chitchat message (or expands past its limits).
    Malformed,
    /// A node id that is not a well-formed name.
    BadId,
    /// A node whose certificate is missing, foreign, expired or names another node.
    Unverified,
    /// A key-value whose signature does not verify (forged, moved or replayed).
    BadSignature,
    /// A delete, TTL or GC reset (Shoal publishes none).
    Delete,
    /// A delta about this node itself.
    SelfState,
    /// A key or value over its size cap, or a node over its key or byte cap.
    KeyCap,
    /// More members than a digest can hold.
    MemberCap,
    /// A digest entry for a node whose certificate was not verified yet.
    UnknownMember,
    /// A relayed heartbeat further ahead than the node itself could be
    /// (lowered to what is plausible).
    HeartbeatAhead,
    /// A message from a pool with another cluster id (another zone's pool,
    /// or the backbone on the wrong channel).
    ForeignCluster,
    /// A member of another zone in a zone's pool, a zone summary for a zone
    /// its publisher is not in, or a member changing its zone.
    ForeignZone,
}

impl Refusal {
    /// Every reason, for metrics.
    pub const ALL: [Refusal; 13] = [
        Refusal::Oversize,
        Refusal::Malformed,
        Refusal::BadId,
        Refusal::Unverified,
        Refusal::BadSignature,
        Refusal::Delete,
        Refusal::SelfState,
        Refusal::KeyCap,
        Refusal::MemberCap,
        Refusal::UnknownMember,
        Refusal::HeartbeatAhead,
        Refusal::ForeignCluster,
        Refusal::ForeignZone,
    ];

    /// Metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Oversize => "oversize",
            Refusal::Malformed => "malformed",
            Refusal::BadId => "bad_id",
            Refusal::Unverified => "unverified",
            Refusal::BadSignature => "bad_signature",
            Refusal::Delete => "delete",
            Refusal::SelfState => "self_state",
            Refusal::KeyCap => "key_cap",
            Refusal::MemberCap => "member_cap",
            Refusal::UnknownMember => "unknown_member",
            Refusal::HeartbeatAhead => "heartbeat_ahead",
            Refusal::ForeignCluster => "foreign_cluster",
            Refusal::ForeignZone => "foreign_zone",
        }
    }

    fn index(self) -> usize {
        Refusal::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Refusal counters, by reason.
#[derive(Debug, Default)]
pub struct GuardStats {
    counts: [AtomicU64; 13],
    /// Signatures checked.
    pub verified: AtomicU64,
    /// Nanoseconds spent checking signatures and certificates.
    pub verify_nanos: AtomicU64,
}

impl GuardStats {
    /// How many were refused for `reason`.
    pub fn count(&self, reason: Refusal) -> u64 {
        self.counts[reason.index()].load(Ordering::Relaxed)
    }

    fn add(&self, reason: Refusal) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// Whether `name` may be a node name in gossip.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The bytes a node signs for one key-value.
pub fn signing_payload(id: &NodeId, key: &str, version: u64, value: &str) -> Vec<u8> {
    let addr = id.addr.to_string();
    let mut out = Vec::with_capacity(64 + key.len() + value.len());
    out.extend_from_slice(b"shoal-gossip-kv-v1\0");
    for part in [id.name.as_bytes(), addr.as_bytes(), key.as_bytes()] {
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.extend_from_slice(&id.generation.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(value.as_bytes());
    out
}

/// Signs `value` for `key` at `version` as `id`: `<base64 signature>.<value>`.
pub fn sign_value(signer: &Signer, id: &NodeId, key: &str, version: u64, value: &str) -> String {
    let sig = signer.sign(&signing_payload(id, key, version, value));
    format!("{}.{value}", B64.encode(sig))
}

/// Splits a signed value into its signature and value.
pub fn split_signed(signed: &str) -> Option<(Vec<u8>, &str)> {
    let (sig, value) = signed.split_once('.')?;
    Some((B64.decode(sig).ok()?, value))
}

/// The value part of a signed value (what readers see).
pub fn value_of(signed: &str) -> &str {
    signed.split_once('.').map(|(_, v)| v).unwrap_or("")
}

fn entry_bytes(id: &NodeId) -> usize {
    let addr = if id.addr.is_ipv4() { 7 } else { 19 };
    2 + id.name.len() + 8 + addr + 24
}

/// What we know of a member's heartbeat, to bound what relays may claim.
///
/// Heartbeats are not signed (chitchat builds digests itself), and chitchat
/// keeps the highest heartbeat it has seen: one relayed entry far ahead of
/// the truth would make every genuine heartbeat after it look old, and the
/// member dead. So a heartbeat is taken as told only from the member itself
/// (the sender's certificate names it); a relayed one is lowered to the last
/// heartbeat the member told us plus what it could have gained since at its
/// measured rate. Before the member has told us anything, relayed entries
/// carry a small synthetic heartbeat that advances at most every 100 ms: the
/// member is known and alive, and its first own heartbeat replaces it.
#[derive(Debug, Clone)]
struct Beat {
    /// The member's own last heartbeat and when we got it.
    anchor: Option<(u64, Instant)>,
    /// Its heartbeat rate, per second (exponentially weighted).
    rate: f64,
    /// Synthetic heartbeat before any anchor.
    synthetic: (u64, Instant),
}

/// Room a relayed heartbeat gets above the member's own last one plus its
/// predicted gain: small, because a relayed heartbeat ahead of the truth
/// hides the member's genuine heartbeats until they catch up.
const BEAT_SLACK: u64 = 2;

impl Beat {
    fn new() -> Self {
        Beat {
            anchor: None,
            rate: 20.0,
            synthetic: (0, Instant::now()),
        }
    }

    /// The heartbeat to pass on for an entry claiming `hb`.
    fn admit(&mut self, hb: u64, direct: bool, now: Instant) -> u64 {
        if direct {
            if let Some((last, at)) = self.anchor {
                let dt = now.duration_since(at).as_secs_f64();
                if hb > last && dt > 0.05 {
                    let r = ((hb - last) as f64 / dt).min(10_000.0);
                    self.rate = 0.7 * self.rate + 0.3 * r;
                }
                if hb < last || dt > 0.05 {
                    self.anchor = Some((hb, now));
                }
            } else {
                self.anchor = Some((hb, now));
            }
            return hb;
        }
        match self.anchor {
            Some((last, at)) => {
                let dt = now.duration_since(at).as_secs_f64();
                let room = BEAT_SLACK + (self.rate * dt) as u64;
                hb.min(last.saturating_add(room))
            }
            None => {
                if now.duration_since(self.synthetic.1).as_millis() >= 100 {
                    self.synthetic = (self.synthetic.0 + 1, now);
                }
                hb.min(self.synthetic.0.max(1))
            }
        }
    }
}

struct Verified {
    beat: Beat,
    cert: CheckedCert,
    /// The zone the node published (fixed for an incarnation).
    zone: Option<String>,
    /// Newest verified version of each key, with its value length.
    keys: HashMap<String, (u64, usize)>,
    bytes: usize,
    since: Instant,
}

struct State {
    verified: HashMap<NodeId, Verified>,
    digest_bytes: usize,
    /// Certificates already checked, by a hash of their DER: the result
    /// (the checked certificate, or refused), so a peer repeating one bad or
    /// good certificate costs one chain check, not one per message.
    certs: HashMap<u64, Option<CheckedCert>>,
}

/// The most certificate check results kept (then the cache starts over).
const CERT_CACHE: usize = 1024;

fn der_key(der: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    der.hash(&mut h);
    h.finish()
}

/// The gossip guard of one node.
pub struct Guard {
    self_id: NodeId,
    checker: CertChecker,
    /// This pool's cluster id; a `Syn` naming another is refused.
    cluster: Option<String>,
    /// The pool's rules (zone membership, summary ownership).
    pool: Pool,
    state: Mutex<State>,
    /// Counters.
    pub stats: GuardStats,
}

/// Where [`Guard::screen`] left a message.
#[derive(Debug)]
pub enum Screen {
    /// Read and judged: the bytes chitchat may see, or `None` to drop it.
    Done(Option<Vec<u8>>),
    /// Read, with node deltas to verify: finish with [`Guard::admit`] off
    /// the node's thread.
    Verify(Message),
    /// Too large to read on the node's thread: [`Guard::filter`] it there.
    Full,
}

/// The largest message [`Guard::screen`] reads on the node's thread.
pub const INLINE_MESSAGE_BYTES: usize = 8 * 1024;
/// The most a screened message's digest or delta may decompress to.
pub const INLINE_DECOMPRESSED_BYTES: usize = 16 * 1024;

impl Guard {
    /// A guard for the node `self_id`.
    pub fn new(self_id: NodeId, checker: CertChecker) -> Self {
        let digest_bytes = entry_bytes(&self_id);
        Guard {
            self_id,
            checker,
            cluster: None,
            pool: Pool::Mesh,
            state: Mutex::new(State {
                verified: HashMap::new(),
                digest_bytes,
                certs: HashMap::new(),
            }),
            stats: GuardStats::default(),
        }
    }

    /// The same guard enforcing a pool's rules: a `Syn` must name
    /// `cluster_id`; in a zone's pool every member must publish that zone;
    /// on the backbone a member may publish `zsum.<zone>.*` only for its own
    /// zone, at most [`MAX_SUMMARY_KEYS`] of them.
    pub fn for_pool(mut self, cluster_id: &str, pool: &Pool) -> Self {
        self.cluster = Some(cluster_id.to_string());
        self.pool = pool.clone();
        self
    }

    /// Reads a message from the peer whose certificate names node `sender`
    /// and returns the bytes chitchat may see, or `None` to drop it.
    pub fn filter(&self, sender: &str, bytes: &[u8]) -> Option<Vec<u8>> {
        match Message::decode(bytes) {
            Ok(msg) => self.admit(sender, bytes, msg),
            Err(e) => self.refuse_undecodable(&e),
        }
    }

    /// The part of [`Guard::filter`] cheap enough for the node's own thread.
    /// A message of at most [`INLINE_MESSAGE_BYTES`] whose digest and delta
    /// each decompress to at most [`INLINE_DECOMPRESSED_BYTES`] is read
    /// here; if it carries no node deltas (most rounds of a settled pool:
    /// heartbeats travel in digests) it is admitted here too, since a digest
    /// costs a lookup an entry and no signature. Anything else is left for
    /// the blocking pool, decoded ([`Screen::Verify`]) or not
    /// ([`Screen::Full`]), so that no message can hold the node's thread for
    /// long: a small message that decompresses to a lot, or one full of
    /// signed values, is still read there.
    pub fn screen(&self, sender: &str, bytes: &[u8]) -> Screen {
        if bytes.len() > INLINE_MESSAGE_BYTES {
            return Screen::Full;
        }
        match Message::decode_within(bytes, INLINE_DECOMPRESSED_BYTES) {
            Err(WireError::TooLarge) => Screen::Full,
            Err(e) => Screen::Done(self.refuse_undecodable(&e)),
            Ok(msg) => {
                let deltas = match &msg.body {
                    Body::SynAck { delta, .. } | Body::Ack { delta } => !delta.is_empty(),
                    Body::Syn { .. } | Body::BadCluster => false,
                };
                if deltas {
                    Screen::Verify(msg)
                } else {
                    Screen::Done(self.admit(sender, bytes, msg))
                }
            }
        }
    }

    fn refuse_undecodable(&self, e: &WireError) -> Option<Vec<u8>> {
        self.stats.add(match e {
            WireError::Oversize(_) => Refusal::Oversize,
            _ => Refusal::Malformed,
        });
        None
    }

    /// [`Guard::filter`] after decoding: `msg` is `bytes` read.
    pub fn admit(&self, sender: &str, bytes: &[u8], mut msg: Message) -> Option<Vec<u8>> {
        if let (Body::Syn { cluster_id, .. }, Some(ours)) = (&msg.body, &self.cluster)
            && cluster_id != ours
        {
            self.stats.add(Refusal::ForeignCluster);
            return None;
        }
        let mut cut = false;
        let now = SystemTime::now();
        if let Body::SynAck { delta, .. } | Body::Ack { delta } = &mut msg.body {
            let before = delta.len();
            delta.retain(|nd| self.admit_delta(nd, now));
            cut |= delta.len() != before;
        }
        if let Body::Syn { digest, .. } | Body::SynAck { digest, .. } = &mut msg.body {
            let before = digest.len();
            let mut lowered = false;
            digest.retain_mut(|e| match self.admit_entry(e, sender, now) {
                Some(hb) => {
                    lowered |= hb != e.heartbeat;
                    e.heartbeat = hb;
                    true
                }
                None => false,
            });
            cut |= lowered || digest.len() != before;
        }
        if cut {
            self.reencode(msg)
        } else {
            Some(bytes.to_vec())
        }
    }

    /// A message the guard cut, written again for chitchat's socket, which
    /// takes one datagram of at most [`MAX_MESSAGE_BYTES`]. Compressed as
    /// the peer's chitchat wrote it; should that still not fit (compression
    /// of what is left need not be as good), node deltas are left off from
    /// the end until it does: a partial delta is what chitchat itself sends
    /// when the state outgrows a message, and the rest follows in later
    /// rounds. Only a digest alone too large to fit is dropped (counted
    /// `Oversize`).
    fn reencode(&self, mut msg: Message) -> Option<Vec<u8>> {
        loop {
            let bytes = msg.encode_compressed();
            if bytes.len() <= MAX_MESSAGE_BYTES {
                return Some(bytes);
            }
            match &mut msg.body {
                Body::SynAck { delta, .. } | Body::Ack { delta } if !delta.is_empty() => {
                    let keep = delta.len() - delta.len().div_ceil(8);
                    delta.truncate(keep);
                }
                _ => {
                    self.stats.add(Refusal::Oversize);
                    return None;
                }
            }
        }
    }

    /// Whether `id`'s certificate was verified (and is still valid).
    pub fn is_verified(&self, id: &NodeId) -> bool {
        if *id == self.self_id {
            return true;
        }
        let st = self.state.lock().unwrap();
        st.verified
            .get(id)
            .is_some_and(|v| v.cert.valid_at(SystemTime::now()))
    }

    /// The services `id`'s certificate names, if verified.
    pub fn services_of(&self, id: &NodeId) -> Option<Vec<String>> {
        let st = self.state.lock().unwrap();
        st.verified
            .get(id)
            .map(|v| v.cert.identity.services.clone())
    }

    /// Forgets verified nodes for which `keep` is false (nodes chitchat
    /// forgot), except those verified in the last minute.
    pub fn retain(&self, keep: impl Fn(&NodeId) -> bool) {
        let mut st = self.state.lock().unwrap();
        let mut freed = 0;
        st.verified.retain(|id, v| {
            let k = keep(id) || v.since.elapsed().as_secs() < 60;
            if !k {
                freed += entry_bytes(id);
            }
            k
        });
        st.digest_bytes = st.digest_bytes.saturating_sub(freed);
    }

    /// Number of verified members (ourselves excluded).
    pub fn verified_count(&self) -> usize {
        self.state.lock().unwrap().verified.len()
    }

    fn admit_entry(&self, e: &DigestEntry, sender: &str, now: SystemTime) -> Option<u64> {
        if e.id == self.self_id {
            return Some(e.heartbeat);
        }
        let mut st = self.state.lock().unwrap();
        match st.verified.get_mut(&e.id) {
            Some(v) if v.cert.valid_at(now) => {
                let hb = v
                    .beat
                    .admit(e.heartbeat, sender == e.id.name, Instant::now());
                if hb != e.heartbeat {
                    self.stats.add(Refusal::HeartbeatAhead);
                }
                Some(hb)
            }
            _ => {
                self.stats.add(Refusal::UnknownMember);
                None
            }
        }
    }

    fn admit_delta(&self, nd: &NodeDelta, now: SystemTime) -> bool {
        match self.check_delta(nd, now) {
            Ok(()) => true,
            Err(reason) => {
                self.stats.add(reason);
                if matches!(
                    reason,
                    Refusal::BadSignature | Refusal::Unverified | Refusal::ForeignZone
                ) {
                    tracing::debug!(node = %nd.id.name, reason = reason.as_str(), "refused gossip about a node");
                }
                false
            }
        }
    }

    fn check_delta(&self, nd: &NodeDelta, now: SystemTime) -> Result<(), Refusal> {
        if nd.id == self.self_id {
            return Err(Refusal::SelfState);
        }
        if !valid_name(&nd.id.name) {
            return Err(Refusal::BadId);
        }
        if nd.last_gc_version != 0 || nd.set_max_version.is_some() {
            return Err(Refusal::Delete);
        }
        let mut last = 0u64;
        for kv in &nd.key_values {
            if kv.status != KvStatus::Set {
                return Err(Refusal::Delete);
            }
            if kv.key.len() > MAX_KEY_BYTES || kv.value.len() > MAX_VALUE_BYTES {
                return Err(Refusal::KeyCap);
            }
            if kv.version <= last {
                return Err(Refusal::Malformed);
            }
            last = kv.version;
        }
        let started = Instant::now();
        let result = self.verify_delta(nd, now);
        self.stats
            .verify_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    /// Zone rules for one verified key-value: a member's zone never changes
    /// and, in a zone's pool, is that zone; a backbone summary key names the
    /// publisher's own zone.
    fn check_zone(&self, key: &str, value: &str, zone: &mut Option<String>) -> Result<(), Refusal> {
        if key == keys::ZONE {
            if zone.as_deref().is_some_and(|z| z != value) {
                return Err(Refusal::ForeignZone);
            }
            if let Pool::Zone { zone: ours, .. } = &self.pool
                && value != ours
            {
                return Err(Refusal::ForeignZone);
            }
            *zone = Some(value.to_string());
        }
        if self.pool == Pool::Backbone
            && let Some(rest) = key.strip_prefix(SUMMARY_PREFIX)
        {
            let claimed = rest.split('.').next().unwrap_or("");
            if zone.as_deref() != Some(claimed) {
                return Err(Refusal::ForeignZone);
            }
        }
        Ok(())
    }

    fn check_cert(&self, der: &[u8], now: SystemTime) -> Option<CheckedCert> {
        let key = der_key(der);
        if let Some(cached) = self.state.lock().unwrap().certs.get(&key) {
            return cached.clone().filter(|c| c.valid_at(now));
        }
        let checked = self.checker.check_node(der, now).ok();
        let mut st = self.state.lock().unwrap();
        if st.certs.len() >= CERT_CACHE {
            st.certs.clear();
        }
        st.certs.insert(key, checked.clone());
        checked
    }

    fn verify_delta(&self, nd: &NodeDelta, now: SystemTime) -> Result<(), Refusal> {
        let (mut cert, mut keys, mut bytes, known, mut zone) = {
            let st = self.state.lock().unwrap();
            match st.verified.get(&nd.id) {
                Some(v) => (
                    Some(v.cert.clone()),
                    v.keys.clone(),
                    v.bytes,
                    true,
                    v.zone.clone(),
                ),
                None => (None, HashMap::new(), 0, false, None),
            }
        };
        for kv in &nd.key_values {
            if keys.get(&kv.key).map(|(v, _)| *v) == Some(kv.version) {
                continue;
            }
            let (sig, value) = split_signed(&kv.value).ok_or(Refusal::BadSignature)?;
            if kv.key == CERT_KEY {
                let der = B64.decode(value).map_err(|_| Refusal::Unverified)?;
                let checked = self.check_cert(&der, now).ok_or(Refusal::Unverified)?;
                if checked.identity.node != nd.id.name {
                    return Err(Refusal::Unverified);
                }
                cert = Some(checked);
            }
            let c = cert.as_ref().ok_or(Refusal::Unverified)?;
            if !c.valid_at(now) {
                return Err(Refusal::Unverified);
            }
            let payload = signing_payload(&nd.id, &kv.key, kv.version, value);
            self.stats.verified.fetch_add(1, Ordering::Relaxed);
            c.verify(&payload, &sig)
                .map_err(|_| Refusal::BadSignature)?;
            self.check_zone(&kv.key, value, &mut zone)?;
            let old = keys.get(&kv.key).copied();
            if old.is_none_or(|(v, _)| v < kv.version) {
                keys.insert(kv.key.clone(), (kv.version, kv.value.len()));
                bytes = bytes + kv.value.len() - old.map(|(_, l)| l).unwrap_or(0);
            }
            if keys.len() > MAX_KEYS_PER_NODE || bytes > MAX_BYTES_PER_NODE {
                return Err(Refusal::KeyCap);
            }
        }
        let Some(cert) = cert else {
            // Nothing but already-verified values, or nothing at all, about a
            // node we have no certificate for.
            return if nd.key_values.is_empty() && !known {
                Err(Refusal::Unverified)
            } else {
                Ok(())
            };
        };
        if let Pool::Zone { zone: ours, .. } = &self.pool
            && zone.as_deref() != Some(ours.as_str())
        {
            // Its first delta (certificate, then its record) must name
            // this zone.
            return Err(Refusal::ForeignZone);
        }
        if self.pool == Pool::Backbone
            && keys
                .keys()
                .filter(|k| k.starts_with(SUMMARY_PREFIX))
                .count()
                > MAX_SUMMARY_KEYS
        {
            return Err(Refusal::KeyCap);
        }
        let mut st = self.state.lock().unwrap();
        if !st.verified.contains_key(&nd.id) {
            let need = entry_bytes(&nd.id);
            if st.digest_bytes + need > MAX_DIGEST_BYTES {
                return Err(Refusal::MemberCap);
            }
            st.digest_bytes += need;
        }
        let (since, beat) = st
            .verified
            .get(&nd.id)
            .map(|v| (v.since, v.beat.clone()))
            .unwrap_or_else(|| (Instant::now(), Beat::new()));
        st.verified.insert(
            nd.id.clone(),
            Verified {
                beat,
                cert,
                zone,
                keys,
                bytes,
                since,
            },
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::KeyValue;
    use transport::certs::{Ca, Validity};

    fn signer(ca: &Ca, name: &str) -> Signer {
        let c = ca.issue(name, &["web".into()], Validity::days(1)).unwrap();
        Signer::from_pem(c.cert_pem.as_bytes(), c.key_pem.as_bytes()).unwrap()
    }

    fn id(name: &str, port: u16) -> NodeId {
        NodeId {
            name: name.into(),
            generation: 1,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
        }
    }

    fn kv(s: &Signer, id: &NodeId, key: &str, version: u64, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: sign_value(s, id, key, version, value),
            version,
            status: KvStatus::Set,
        }
    }

    fn cert_kv(s: &Signer, id: &NodeId) -> KeyValue {
        kv(s, id, CERT_KEY, 1, &B64.encode(s.cert_der().as_ref()))
    }

    fn ack(nd: NodeDelta) -> Vec<u8> {
        Message {
            version: 1,
            body: Body::Ack { delta: vec![nd] },
        }
        .encode()
    }

    fn delta(id: &NodeId, kvs: Vec<KeyValue>) -> NodeDelta {
        NodeDelta {
            id: id.clone(),
            last_gc_version: 0,
            from_version_excluded: 0,
            key_values: kvs,
            set_max_version: None,
        }
    }

    fn kept(guard: &Guard, bytes: &[u8]) -> usize {
        let out = guard.filter("peer", bytes).expect("readable");
        match Message::decode(&out).unwrap().body {
            Body::Ack { delta } => delta.len(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn only_the_owner_can_write_its_state() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let guard = Guard::new(id("me", 1), checker);
        let (n2, evil) = (signer(&ca, "n2"), signer(&ca, "evil"));
        let n2_id = id("n2", 2);

        // The genuine state is admitted.
        let good = delta(
            &n2_id,
            vec![cert_kv(&n2, &n2_id), kv(&n2, &n2_id, "svc.web", 2, "ok")],
        );
        assert_eq!(kept(&guard, &ack(good)), 1);
        assert!(guard.is_verified(&n2_id));

        // A value for n2 signed by another certificate holder is not.
        let forged = delta(&n2_id, vec![kv(&evil, &n2_id, "svc.web", 9, "unhealthy")]);
        assert_eq!(kept(&guard, &ack(forged)), 0);
        assert_eq!(guard.stats.count(Refusal::BadSignature), 1);

        // n2's own signature replayed at a higher version does not verify.
        let mut replay = kv(&n2, &n2_id, "svc.web", 2, "ok");
        replay.version = 50;
        assert_eq!(kept(&guard, &ack(delta(&n2_id, vec![replay]))), 0);

        // Nor moved to another address (a ghost of n2 at the attacker's port).
        let ghost = id("n2", 666);
        let moved = delta(&ghost, vec![cert_kv(&n2, &n2_id)]);
        assert_eq!(kept(&guard, &ack(moved)), 0);

        // A certificate naming someone else cannot front a ghost.
        let ghost = id("ghost", 7);
        let g = delta(&ghost, vec![cert_kv(&evil, &ghost)]);
        assert_eq!(kept(&guard, &ack(g)), 0);
        assert_eq!(guard.stats.count(Refusal::Unverified), 1);
        assert_eq!(guard.stats.count(Refusal::BadSignature), 3);
    }

    /// Node `i`'s digest entry, at heartbeat 5.
    fn entry(id: &NodeId) -> DigestEntry {
        DigestEntry {
            id: id.clone(),
            heartbeat: 5,
            last_gc_version: 0,
            max_version: 3,
        }
    }

    /// What a joiner gets from its seed in a pool of a few dozen nodes: a
    /// SynAck whose digest lists every member but whose delta, cut by the
    /// seed's chitchat to one datagram, holds only some of them. The guard
    /// drops the digest entries of members it has not verified yet, so it
    /// must write the message again, and the stored form of what chitchat
    /// compressed does not fit a datagram: before this was compressed, the
    /// hand-off to chitchat failed (EMSGSIZE) every round, and nodes past
    /// about the 42nd never joined.
    #[test]
    fn a_cut_message_that_fit_compressed_still_fits_whole() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let guard = Guard::new(id("joiner", 1), checker);
        let record = format!(
            "{{\"health\":\"healthy\",\"weight\":100,\"zone\":\"{}\"}}",
            "z".repeat(3000)
        );
        let mut digest = Vec::new();
        let mut delta_nodes = Vec::new();
        for i in 0..41u16 {
            let nid = id(&format!("n{i}"), 100 + i);
            digest.push(entry(&nid));
            if i < 20 {
                let s = signer(&ca, &nid.name);
                delta_nodes.push(delta(
                    &nid,
                    vec![
                        cert_kv(&s, &nid),
                        kv(&s, &nid, "svc.web", 2, &record),
                        kv(&s, &nid, "svc.api", 3, &record),
                    ],
                ));
            }
        }
        let msg = Message {
            version: 1,
            body: Body::SynAck {
                digest,
                delta: delta_nodes.clone(),
            },
        };
        let sent = msg.encode_compressed();
        assert!(
            sent.len() <= MAX_MESSAGE_BYTES,
            "the input fits: {}",
            sent.len()
        );
        assert!(
            msg.encode().len() > MAX_MESSAGE_BYTES,
            "stored, it would not"
        );

        let out = guard.filter("n0", &sent).expect("forwarded");
        assert!(
            out.len() <= MAX_MESSAGE_BYTES,
            "forwarded {} bytes",
            out.len()
        );
        let Body::SynAck { digest, delta } = Message::decode(&out).unwrap().body else {
            panic!("not a SynAck");
        };
        assert_eq!(delta, delta_nodes, "every verified node's delta is kept");
        let listed: Vec<&str> = digest.iter().map(|e| e.id.name.as_str()).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("n{i}")).collect();
        assert_eq!(listed, expected, "only the verified members stay listed");
        assert_eq!(guard.stats.count(Refusal::UnknownMember), 21);
        assert_eq!(guard.stats.count(Refusal::Oversize), 0);
    }

    /// Bytes that zstd cannot shrink much (an LCG's high bits as letters).
    fn noise(seed: u64, len: usize) -> String {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (b'A' + ((x >> 33) % 58) as u8) as char
            })
            .collect()
    }

    #[test]
    fn a_message_too_large_even_compressed_keeps_a_prefix_of_its_delta() {
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let guard = Guard::new(id("me", 1), checker);
        let nodes: Vec<NodeDelta> = (0..30u16)
            .map(|i| {
                let nid = id(&format!("n{i}"), 100 + i);
                let kvs = (0..4)
                    .map(|k| KeyValue {
                        key: format!("svc.s{k}"),
                        value: noise(u64::from(i) * 10 + k, 1000),
                        version: k + 1,
                        status: KvStatus::Set,
                    })
                    .collect();
                delta(&nid, kvs)
            })
            .collect();
        let msg = Message {
            version: 1,
            body: Body::Ack {
                delta: nodes.clone(),
            },
        };
        assert!(msg.encode_compressed().len() > MAX_MESSAGE_BYTES);
        let out = guard.reencode(msg).expect("a prefix fits");
        assert!(out.len() <= MAX_MESSAGE_BYTES);
        let Body::Ack { delta } = Message::decode(&out).unwrap().body else {
            panic!("not an Ack");
        };
        assert!(!delta.is_empty() && delta.len() < nodes.len());
        assert_eq!(
            delta[..],
            nodes[..delta.len()],
            "whole node deltas, from the start"
        );

        // A digest alone too large to fit is dropped and counted.
        let digest = (0..2500u16)
            .map(|i| entry(&id(&noise(u64::from(i), 60), i)))
            .collect();
        let syn = Message {
            version: 1,
            body: Body::Syn {
                cluster_id: "shoal".into(),
                digest,
            },
        };
        assert!(guard.reencode(syn).is_none());
        assert_eq!(guard.stats.count(Refusal::Oversize), 1);
    }

    #[test]
    fn digests_list_only_verified_members() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let me = id("me", 1);
        let guard = Guard::new(me.clone(), checker);
        let entries: Vec<DigestEntry> = (0..600)
            .map(|i| DigestEntry {
                id: id(&format!("ghost-{i:0>50}"), 10 + i as u16),
                heartbeat: 1,
                last_gc_version: 0,
                max_version: 1,
            })
            .chain(std::iter::once(DigestEntry {
                id: me.clone(),
                heartbeat: 1,
                last_gc_version: 0,
                max_version: 1,
            }))
            .collect();
        let syn = Message {
            version: 1,
            body: Body::Syn {
                cluster_id: "shoal".into(),
                digest: entries,
            },
        };
        let out = guard.filter("peer", &syn.encode()).unwrap();
        let back = Message::decode(&out).unwrap();
        assert_eq!(back.digest().unwrap().len(), 1);
        assert_eq!(guard.stats.count(Refusal::UnknownMember), 600);
    }

    #[test]
    fn deletes_resets_and_garbage_are_refused() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let guard = Guard::new(id("me", 1), checker);
        let n2 = signer(&ca, "n2");
        let n2_id = id("n2", 2);
        let mut reset = delta(&n2_id, vec![cert_kv(&n2, &n2_id)]);
        reset.last_gc_version = 1 << 40;
        assert_eq!(kept(&guard, &ack(reset)), 0);
        let mut del = delta(&n2_id, vec![cert_kv(&n2, &n2_id)]);
        del.key_values[0].status = KvStatus::Delete;
        assert_eq!(kept(&guard, &ack(del)), 0);
        assert_eq!(guard.stats.count(Refusal::Delete), 2);
        assert!(guard.filter("peer", &[1, 2, 3]).is_none());
        assert!(guard.filter("peer", &vec![0u8; 70_000]).is_none());
        assert_eq!(guard.stats.count(Refusal::Oversize), 1);
    }

    /// Which messages are judged on the node's own thread: small ones
    /// without node deltas, and nothing that decompresses to much.
    #[test]
    fn small_digest_only_messages_are_judged_in_place_and_the_rest_on_the_pool() {
        transport::install_crypto_provider();
        let ca = Ca::generate("t.shoal", 1).unwrap();
        let checker = CertChecker::new(ca.cert_pem().as_bytes(), "t.shoal").unwrap();
        let me = id("me", 1);
        let guard = Guard::new(me.clone(), checker);
        let n2 = signer(&ca, "n2");
        let n2_id = id("n2", 2);

        // A node delta has signatures to check: read here, verified there.
        let good = ack(delta(&n2_id, vec![cert_kv(&n2, &n2_id)]));
        let Screen::Verify(read) = guard.screen("n2", &good) else {
            panic!("a delta is verified off the node's thread");
        };
        assert_eq!(guard.admit("n2", &good, read), Some(good.clone()));
        assert!(guard.is_verified(&n2_id));

        // A digest of verified members passes here, bytes unchanged.
        let syn = |digest: Vec<DigestEntry>| {
            Message {
                version: 1,
                body: Body::Syn {
                    cluster_id: "shoal".into(),
                    digest,
                },
            }
            .encode_compressed()
        };
        let settled = syn(vec![entry(&me), entry(&n2_id)]);
        match guard.screen("n2", &settled) {
            Screen::Done(Some(out)) => assert_eq!(out, settled),
            other => panic!("judged in place and kept: {other:?}"),
        }
        // One naming an unverified member is cut here too.
        let with_ghost = syn(vec![entry(&n2_id), entry(&id("ghost", 9))]);
        let Screen::Done(Some(out)) = guard.screen("n2", &with_ghost) else {
            panic!("judged in place");
        };
        let listed: Vec<String> = Message::decode(&out)
            .unwrap()
            .digest()
            .unwrap()
            .iter()
            .map(|e| e.id.name.clone())
            .collect();
        assert_eq!(listed, ["n2"]);
        assert_eq!(guard.stats.count(Refusal::UnknownMember), 1);

        // Garbage is refused here, counted once.
        assert!(matches!(guard.screen("n2", &[1, 2, 3]), Screen::Done(None)));
        assert_eq!(guard.stats.count(Refusal::Malformed), 1);

        // A small message that decompresses to more than the in-place
        // limit goes to the pool whole, where it is judged as before.
        let many: Vec<DigestEntry> = (0..2000u16).map(|i| entry(&id("ghost", i))).collect();
        let bomb = syn(many);
        assert!(
            bomb.len() <= INLINE_MESSAGE_BYTES,
            "small on the wire: {}",
            bomb.len()
        );
        assert!(matches!(guard.screen("n2", &bomb), Screen::Full));
        let out = guard.filter("n2", &bomb).expect("forwarded, cut");
        assert!(Message::decode(&out).unwrap().digest().unwrap().is_empty());
        assert_eq!(guard.stats.count(Refusal::UnknownMember), 2001);

        // And so does any message larger than the in-place limit.
        let wide: Vec<DigestEntry> = (0..400u16)
            .map(|i| entry(&id(&noise(u64::from(i), 40), i)))
            .collect();
        let wide = syn(wide);
        assert!(wide.len() > INLINE_MESSAGE_BYTES);
        assert!(matches!(guard.screen("n2", &wide), Screen::Full));
    }
}
