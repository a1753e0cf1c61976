//! The policy store: versioned entries per (kind, name), durable on disk,
//! applied atomically as one immutable [`PolicySet`] snapshot.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::doc::{Document, Kind};
use super::hlc::{ClockError, Hlc, Version};
use super::set::PolicySet;

/// One policy's current state on this node (a tombstone has no body).
#[derive(Debug, Clone)]
pub struct Entry {
    /// Kind.
    pub kind: Kind,
    /// Name.
    pub name: String,
    /// Version of the last write.
    pub version: Version,
    /// SHA-256 of the canonical body, hex (`-` for a tombstone).
    pub hash: String,
    /// The parsed document, or `None` for a delete.
    pub doc: Option<Arc<Document>>,
    /// Who signed the write and what it replaced; `None` for unsigned
    /// entries (unit tests, and files written before signing existed).
    pub provenance: Option<Arc<Provenance>>,
}

/// Where a write came from: the operator's signature over the text it sent,
/// and the version the accepting node held when it accepted it.
#[derive(Debug, Clone, PartialEq)]
pub struct Provenance {
    /// The document text exactly as the operator signed it (`None` for a
    /// tombstone).
    pub source: Option<String>,
    /// The operator's signature.
    pub signature: Option<Signature>,
    /// The verified operator (`spiffe://<td>/operator/<name>`).
    pub operator: Option<String>,
    /// The version the writer replaced (what it had seen), if any.
    pub prev: Option<Version>,
}

/// An operator's signature over one write (see `trust::message`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Signature {
    /// The operator's certificate, DER.
    pub cert: Vec<u8>,
    /// The operator's clock when it signed, ms since the Unix epoch.
    pub signed_at_ms: u64,
    /// ECDSA P-256 SHA-256 signature, ASN.1 DER.
    pub sig: Vec<u8>,
}

impl Entry {
    /// Whether this entry is a delete.
    pub fn is_tombstone(&self) -> bool {
        self.doc.is_none()
    }

    /// The operator timestamp of this write, if signed.
    pub fn signed_at_ms(&self) -> Option<u64> {
        self.provenance
            .as_ref()
            .and_then(|p| p.signature.as_ref())
            .map(|s| s.signed_at_ms)
    }

    /// The version this write replaced, as its writer saw it.
    pub fn prev(&self) -> Option<&Version> {
        self.provenance.as_ref().and_then(|p| p.prev.as_ref())
    }

    /// The wire / disk form.
    pub fn to_record(&self) -> Record {
        let p = self.provenance.as_deref();
        Record {
            kind: self.kind.to_string(),
            name: self.name.clone(),
            version: self.version.to_string(),
            hash: self.hash.clone(),
            body: match p.and_then(|p| p.source.clone()) {
                Some(src) => Some(src),
                None => self.doc.as_ref().map(|d| d.canonical.clone()),
            },
            prev: p.and_then(|p| p.prev.as_ref()).map(|v| v.to_string()),
            signature: p.and_then(|p| p.signature.clone()),
            operator: p.and_then(|p| p.operator.clone()),
        }
    }
}

/// An entry as stored on disk and sent between nodes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// Kind.
    pub kind: String,
    /// Name.
    pub name: String,
    /// Version, `ms.n@node`.
    pub version: String,
    /// Content hash (of the canonical JSON form).
    pub hash: String,
    /// The document text the operator signed (canonical JSON for unsigned
    /// entries), absent for a tombstone.
    pub body: Option<String>,
    /// The version the writer replaced.
    #[serde(default)]
    pub prev: Option<String>,
    /// The operator's signature.
    #[serde(default)]
    pub signature: Option<Signature>,
    /// The operator the signature was verified as (informational: a
    /// receiver verifies the signature itself and replaces this).
    #[serde(default)]
    pub operator: Option<String>,
}

impl Record {
    /// Checks the record and turns it into an entry: the body must parse and
    /// hash to `hash`. Parsing is CPU work: call from a blocking context.
    /// The signature is not checked here (see `trust`).
    pub fn into_entry(self) -> Result<Entry, StoreError> {
        let kind: Kind = self.kind.parse().map_err(StoreError::Corrupt)?;
        let version: Version = self.version.parse().map_err(StoreError::Corrupt)?;
        let prev = match &self.prev {
            Some(p) => Some(p.parse::<Version>().map_err(StoreError::Corrupt)?),
            None => None,
        };
        let doc = match &self.body {
            None => {
                if self.hash != TOMBSTONE {
                    return Err(StoreError::HashMismatch);
                }
                None
            }
            Some(body) => {
                let doc = Document::parse(body).map_err(|p| StoreError::Corrupt(p.to_string()))?;
                if content_hash(&doc.canonical) != self.hash {
                    return Err(StoreError::HashMismatch);
                }
                if doc.kind != kind || doc.name != self.name {
                    return Err(StoreError::Corrupt("body names another policy".into()));
                }
                Some(Arc::new(doc))
            }
        };
        let provenance = (self.signature.is_some() || prev.is_some()).then(|| {
            Arc::new(Provenance {
                source: self.body.clone(),
                signature: self.signature.clone(),
                operator: self.operator.clone(),
                prev,
            })
        });
        Ok(Entry {
            kind,
            name: self.name,
            version,
            hash: self.hash,
            doc,
            provenance,
        })
    }
}

/// Hash marker for tombstones.
pub const TOMBSTONE: &str = "-";

/// SHA-256 of `body`, lower-case hex.
pub fn content_hash(body: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref())
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("version {current} does not match If-Match {expected}")]
    PreconditionFailed { expected: String, current: String },
    #[error("no such policy")]
    NotFound,
    #[error("content hash mismatch")]
    HashMismatch,
    #[error("corrupt policy record: {0}")]
    Corrupt(String),
    #[error(
        "the policy is at version {current}, signed at {current_signed_at} ms; this write was signed at {signed_at} ms, which is older (check the operator's clock)"
    )]
    Stale {
        current: String,
        current_signed_at: u64,
        signed_at: u64,
    },
    #[error("clock: {0}")]
    Clock(#[from] ClockError),
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A policy whose last two versions were written without either writer
/// having seen the other: last-writer-wins kept `winner`, `loser` is lost.
#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    /// The version in force.
    pub winner: String,
    /// The concurrent version that lost.
    pub loser: String,
    /// The losing write itself (served to peers that ask for it, so they
    /// can verify the conflict for themselves).
    #[serde(skip)]
    pub loser_entry: Option<Entry>,
}

impl Conflict {
    fn same(&self, other: &Conflict) -> bool {
        self.winner == other.winner && self.loser == other.loser
    }
}

/// What [`PolicyStore::offer`] did with an entry.
#[derive(Debug, Clone)]
pub enum Offered {
    /// Applied (newer than ours); `conflict` when it overwrote a version its
    /// writer had not seen.
    Applied { conflict: Option<Conflict> },
    /// Not newer than ours; `conflict` when ours was written without seeing it.
    Kept { conflict: Option<Conflict> },
    /// The write in force, signed at the same time with the same body, under
    /// another version label: not applied.
    Relabeled,
}

/// A write an operator signed, its signature already verified.
#[derive(Debug)]
pub struct SignedWrite {
    /// The document, or `None` for a delete.
    pub doc: Option<Document>,
    /// The text exactly as signed (`None` for a delete).
    pub source: Option<String>,
    /// The signature.
    pub signature: Signature,
    /// The verified operator's SPIFFE ID.
    pub operator: String,
}

/// What a signed local write did.
#[derive(Debug, Clone)]
pub struct Written {
    /// The entry now in force.
    pub entry: Entry,
    /// Whether a live (non-tombstone) entry existed before.
    pub existed: bool,
    /// Whether this was a replay of the write already in force (nothing changed).
    pub unchanged: bool,
}

/// All policies this node knows, and the snapshot the data plane reads.
pub struct PolicyStore {
    dir: Option<PathBuf>,
    hlc: Hlc,
    entries: Mutex<BTreeMap<(Kind, String), Entry>>,
    conflicts: Mutex<BTreeMap<(Kind, String), Conflict>>,
    set: RwLock<Arc<PolicySet>>,
    changed: watch::Sender<u64>,
}

impl PolicyStore {
    /// A store for `node`, durable under `dir/policies` when `dir` is given;
    /// loads what is there.
    pub fn open(node: &str, dir: Option<&Path>) -> Result<Self, StoreError> {
        let dir = dir.map(|d| d.join("policies"));
        let hlc = Hlc::new(node);
        let mut entries = BTreeMap::new();
        if let Some(dir) = &dir {
            fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
            let read = fs::read_dir(dir).map_err(|source| StoreError::Io {
                path: dir.clone(),
                source,
            })?;
            for f in read.flatten() {
                let path = f.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let loaded = fs::read_to_string(&path)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
                    .and_then(|t| {
                        serde_json::from_str::<Record>(&t)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))
                    })
                    .and_then(Record::into_entry)
                    .and_then(|e| {
                        hlc.observe(&e.version)?;
                        Ok(e)
                    });
                match loaded {
                    Ok(e) => {
                        entries.insert((e.kind, e.name.clone()), e);
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "skipping unreadable policy file")
                    }
                }
            }
        }
        let set = Arc::new(PolicySet::build(entries.values()));
        let (changed, _) = watch::channel(0);
        Ok(PolicyStore {
            dir,
            hlc,
            entries: Mutex::new(entries),
            conflicts: Mutex::new(BTreeMap::new()),
            set: RwLock::new(set),
            changed,
        })
    }

    /// The clock that stamps this node's writes.
    pub fn clock(&self) -> &Hlc {
        &self.hlc
    }

    /// The current applied policy set.
    pub fn snapshot(&self) -> Arc<PolicySet> {
        self.set.read().unwrap().clone()
    }

    /// Notified (with a counter) whenever the set changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// One policy's entry (tombstones included).
    pub fn entry(&self, kind: Kind, name: &str) -> Option<Entry> {
        self.entries
            .lock()
            .unwrap()
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// All entries (tombstones included), ordered by kind and name.
    pub fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().values().cloned().collect()
    }

    /// The unresolved conflict on one policy, if any.
    pub fn conflict(&self, kind: Kind, name: &str) -> Option<Conflict> {
        self.conflicts
            .lock()
            .unwrap()
            .get(&(kind, name.to_string()))
            .cloned()
    }

    /// Every unresolved conflict.
    pub fn conflicts(&self) -> Vec<((Kind, String), Conflict)> {
        self.conflicts
            .lock()
            .unwrap()
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect()
    }

    /// Accepts an unsigned write: stamps with this node's clock, persists,
    /// applies. The admin API never calls this (it takes only signed
    /// writes); it serves unit tests and embedders.
    pub fn put(&self, doc: Document, if_match: Option<&str>) -> Result<Entry, StoreError> {
        let hash = content_hash(&doc.canonical);
        let key = (doc.kind, doc.name.clone());
        self.write_local(key, if_match, |version, _| Entry {
            kind: doc.kind,
            name: doc.name.clone(),
            version,
            hash,
            doc: Some(Arc::new(doc)),
            provenance: None,
        })
    }

    /// Accepts an unsigned delete (see [`PolicyStore::put`]).
    pub fn delete(
        &self,
        kind: Kind,
        name: &str,
        if_match: Option<&str>,
    ) -> Result<Entry, StoreError> {
        match self.entry(kind, name) {
            Some(e) if !e.is_tombstone() => {}
            _ => return Err(StoreError::NotFound),
        }
        self.write_local((kind, name.to_string()), if_match, |version, _| Entry {
            kind,
            name: name.to_string(),
            version,
            hash: TOMBSTONE.into(),
            doc: None,
            provenance: None,
        })
    }

    fn write_local(
        &self,
        key: (Kind, String),
        if_match: Option<&str>,
        make: impl FnOnce(Version, Option<Version>) -> Entry,
    ) -> Result<Entry, StoreError> {
        let mut entries = self.entries.lock().unwrap();
        check_if_match(&entries, &key, if_match)?;
        if let Some(e) = entries.get(&key) {
            self.hlc.observe(&e.version)?;
        }
        let prev = entries.get(&key).map(|e| e.version.clone());
        let entry = make(self.hlc.stamp()?, prev);
        self.persist(&entry)?;
        entries.insert(key.clone(), entry.clone());
        self.conflicts.lock().unwrap().remove(&key);
        self.apply(&entries);
        Ok(entry)
    }

    /// Accepts a write an operator signed at `signature.signed_at_ms` (the
    /// signature already verified by the caller; `doc: None` is a delete).
    /// The version's wall part is the operator's timestamp, so a write
    /// signed before the one in force is refused as [`StoreError::Stale`];
    /// a replay of the write in force changes nothing.
    pub fn put_signed(
        &self,
        kind: Kind,
        name: &str,
        write: SignedWrite,
        if_match: Option<&str>,
    ) -> Result<Written, StoreError> {
        let SignedWrite {
            doc,
            source,
            signature,
            operator,
        } = write;
        let key = (kind, name.to_string());
        let mut entries = self.entries.lock().unwrap();
        check_if_match(&entries, &key, if_match)?;
        let current = entries.get(&key).cloned();
        let existed = current.as_ref().is_some_and(|e| !e.is_tombstone());
        if doc.is_none() && !existed {
            return Err(StoreError::NotFound);
        }
        let hash = doc
            .as_ref()
            .map(|d| content_hash(&d.canonical))
            .unwrap_or_else(|| TOMBSTONE.into());
        let t = signature.signed_at_ms;
        if let Some(c) = &current {
            let same_write = c.signed_at_ms() == Some(t) && c.hash == hash;
            if same_write {
                return Ok(Written {
                    entry: c.clone(),
                    existed,
                    unchanged: true,
                });
            }
            if t < c.version.wall_ms {
                return Err(StoreError::Stale {
                    current: c.version.to_string(),
                    current_signed_at: c.signed_at_ms().unwrap_or(c.version.wall_ms),
                    signed_at: t,
                });
            }
        }
        let version = self
            .hlc
            .stamp_signed(t, current.as_ref().map(|c| &c.version))?;
        let entry = Entry {
            kind,
            name: name.to_string(),
            version,
            hash,
            doc: doc.map(Arc::new),
            provenance: Some(Arc::new(Provenance {
                source,
                signature: Some(signature),
                operator: Some(operator),
                prev: current.map(|c| c.version),
            })),
        };
        self.persist(&entry)?;
        entries.insert(key.clone(), entry.clone());
        self.conflicts.lock().unwrap().remove(&key);
        self.apply(&entries);
        Ok(Written {
            entry,
            existed,
            unchanged: false,
        })
    }

    /// Offers an entry learned from a peer (already verified by the caller).
    /// Applies it if it is newer than ours, and tells whether the two were
    /// written concurrently (neither writer had seen the other); a `Kept`
    /// conflict is reported only the first time it is seen.
    pub fn offer(&self, entry: Entry) -> Result<Offered, StoreError> {
        self.hlc.observe(&entry.version)?;
        let mut entries = self.entries.lock().unwrap();
        let key = (entry.kind, entry.name.clone());
        let current = entries.get(&key).cloned();
        // The write in force under another version label (the tie-breaking
        // parts are not signed): the same write, nothing to apply or report.
        if let Some(c) = &current
            && c.version != entry.version
            && c.hash == entry.hash
            && c.signed_at_ms().is_some()
            && c.signed_at_ms() == entry.signed_at_ms()
        {
            return Ok(Offered::Relabeled);
        }
        if let Some(c) = &current
            && c.version >= entry.version
        {
            // Ours wins; a conflict if our writer never saw theirs.
            let concurrent = c.version != entry.version && !has_seen(c, &entry.version);
            let conflict = concurrent.then(|| Conflict {
                winner: c.version.to_string(),
                loser: entry.version.to_string(),
                loser_entry: Some(entry.clone()),
            });
            let mut new = None;
            if let Some(cf) = conflict {
                let mut conflicts = self.conflicts.lock().unwrap();
                if conflicts.get(&key).is_none_or(|old| !old.same(&cf)) {
                    conflicts.insert(key, cf.clone());
                    new = Some(cf);
                    drop(conflicts);
                    self.changed.send_modify(|n| *n += 1);
                }
            }
            return Ok(Offered::Kept { conflict: new });
        }
        self.persist(&entry)?;
        let conflict = current
            .as_ref()
            .filter(|c| !has_seen(&entry, &c.version))
            .map(|c| Conflict {
                winner: entry.version.to_string(),
                loser: c.version.to_string(),
                loser_entry: Some(c.clone()),
            });
        {
            let mut conflicts = self.conflicts.lock().unwrap();
            match &conflict {
                Some(cf) => conflicts.insert(key.clone(), cf.clone()),
                None => conflicts.remove(&key),
            };
        }
        entries.insert(key, entry);
        self.apply(&entries);
        Ok(Offered::Applied { conflict })
    }

    fn apply(&self, entries: &BTreeMap<(Kind, String), Entry>) {
        let set = Arc::new(PolicySet::build(entries.values()));
        *self.set.write().unwrap() = set;
        self.changed.send_modify(|n| *n += 1);
    }

    /// [`PolicyStore::put_signed`] on the blocking pool. A write fsyncs a
    /// file and its folder, which takes seconds on a busy disk; on an async
    /// worker that would stall the data plane and gossip sharing it (seen:
    /// a 3.3 s stall of every in-process node while one push was written).
    pub async fn put_signed_off_thread(
        self: &Arc<Self>,
        kind: Kind,
        name: &str,
        write: SignedWrite,
        if_match: Option<&str>,
    ) -> Result<Written, StoreError> {
        let (store, name) = (self.clone(), name.to_string());
        let if_match = if_match.map(str::to_string);
        off_thread(move || store.put_signed(kind, &name, write, if_match.as_deref())).await
    }

    /// [`PolicyStore::offer`] on the blocking pool (it fsyncs an applied
    /// entry; see [`PolicyStore::put_signed_off_thread`]).
    pub async fn offer_off_thread(self: &Arc<Self>, entry: Entry) -> Result<Offered, StoreError> {
        let store = self.clone();
        off_thread(move || store.offer(entry)).await
    }

    /// Writes the entry durably (temp file, fsync, rename, fsync folder).
    fn persist(&self, entry: &Entry) -> Result<(), StoreError> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let path = dir.join(format!("{}.{}.json", entry.kind, entry.name));
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let tmp = dir.join(format!(".{}.{}.tmp", entry.kind, entry.name));
        let body = serde_json::to_vec_pretty(&entry.to_record())
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut f = fs::File::create(&tmp).map_err(io)?;
        f.write_all(&body).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
        Ok(())
    }
}

/// Runs a store write on tokio's blocking pool; a panic in it panics the
/// caller as it would have in place.
async fn off_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => Err(StoreError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(format!("store write cancelled: {e}")),
        }),
    }
}

/// Whether `entry`'s writer had seen `version` (it replaced that version or
/// a later one). Unsigned entries without a recorded predecessor are taken
/// to have seen everything before them, as before signing existed.
pub fn has_seen(entry: &Entry, version: &Version) -> bool {
    match entry.prev() {
        Some(p) => p >= version,
        None => entry.provenance.is_none(),
    }
}

fn check_if_match(
    entries: &BTreeMap<(Kind, String), Entry>,
    key: &(Kind, String),
    if_match: Option<&str>,
) -> Result<(), StoreError> {
    if let Some(expected) = if_match {
        let current = entries
            .get(key)
            .filter(|e| !e.is_tombstone())
            .map(|e| e.version.to_string());
        let expected = expected.trim().trim_matches('"');
        if current.as_deref() != Some(expected) {
            return Err(StoreError::PreconditionFailed {
                expected: expected.to_string(),
                current: current.unwrap_or_else(|| "none".into()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(name: &str, rps: u32) -> Document {
        Document::parse(&format!(
            "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {{name: {name}}}\nspec: {{target: web, requestsPerSecond: {rps}}}\n"
        ))
        .unwrap()
    }

    #[test]
    fn writes_survive_a_restart_and_deletes_stay_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = PolicyStore::open("n1", Some(dir.path())).unwrap();
        let a = store.put(doc("a", 5), None).unwrap();
        let b = store.put(doc("b", 5), None).unwrap();
        store.delete(Kind::RateLimit, "b", None).unwrap();
        assert!(b.version > a.version);
        drop(store);

        let again = PolicyStore::open("n1", Some(dir.path())).unwrap();
        assert!(!again.entry(Kind::RateLimit, "a").unwrap().is_tombstone());
        assert!(again.entry(Kind::RateLimit, "b").unwrap().is_tombstone());
        assert_eq!(again.snapshot().rate_limits("web").len(), 1);
        // A new write after restart still orders after the old ones.
        let c = again.put(doc("c", 1), None).unwrap();
        assert!(c.version > b.version);
    }

    #[test]
    fn if_match_and_offers_keep_the_highest_version() {
        let store = PolicyStore::open("n1", None).unwrap();
        let a = store.put(doc("a", 5), None).unwrap();
        let err = store.put(doc("a", 6), Some("1.0@nobody")).unwrap_err();
        assert!(matches!(err, StoreError::PreconditionFailed { .. }));
        store
            .put(doc("a", 7), Some(&a.version.to_string()))
            .unwrap();

        let other = PolicyStore::open("n2", None).unwrap();
        let newest = store.entry(Kind::RateLimit, "a").unwrap();
        let rec = newest.to_record();
        assert!(matches!(
            other.offer(rec.clone().into_entry().unwrap()).unwrap(),
            Offered::Applied { conflict: None }
        ));
        assert!(matches!(
            other.offer(a.to_record().into_entry().unwrap()).unwrap(),
            Offered::Kept { conflict: None }
        ));
        assert_eq!(
            other.entry(Kind::RateLimit, "a").unwrap().version,
            newest.version
        );

        let mut tampered = rec;
        tampered.body = Some(tampered.body.unwrap().replace('7', "9"));
        assert!(matches!(
            tampered.into_entry(),
            Err(StoreError::HashMismatch)
        ));
    }

    fn sig(t: u64) -> Signature {
        Signature {
            cert: vec![],
            signed_at_ms: t,
            sig: vec![],
        }
    }

    fn signed_put(store: &PolicyStore, rps: u32, t: u64) -> Result<Written, StoreError> {
        let d = doc("s", rps);
        let src = d.canonical.clone();
        let write = SignedWrite {
            doc: Some(d),
            source: Some(src),
            signature: sig(t),
            operator: "op".into(),
        };
        store.put_signed(Kind::RateLimit, "s", write, None)
    }

    #[test]
    fn signed_writes_take_the_operator_time_and_refuse_older_ones() {
        let store = PolicyStore::open("n1", None).unwrap();
        let now = store.clock().physical_ms();
        let a = signed_put(&store, 1, now).unwrap();
        assert_eq!(a.entry.version.wall_ms, now);
        assert!(!a.existed && !a.unchanged);
        // The same signed write again changes nothing.
        let again = signed_put(&store, 1, now).unwrap();
        assert!(again.unchanged);
        assert_eq!(again.entry.version, a.entry.version);
        // Another body in the same millisecond orders after it.
        let b = signed_put(&store, 2, now).unwrap();
        assert_eq!((b.entry.version.wall_ms, b.entry.version.logical), (now, 1));
        // Older: refused, nothing changes.
        assert!(matches!(
            signed_put(&store, 3, now - 1),
            Err(StoreError::Stale { .. })
        ));
        assert_eq!(
            store.entry(Kind::RateLimit, "s").unwrap().version,
            b.entry.version
        );
        // Far future: refused.
        assert!(matches!(
            signed_put(&store, 3, now + 11 * 60_000),
            Err(StoreError::Clock(_))
        ));
        // A delete is a signed tombstone.
        let del = store
            .put_signed(
                Kind::RateLimit,
                "s",
                SignedWrite {
                    doc: None,
                    source: None,
                    signature: sig(now + 5),
                    operator: "op".into(),
                },
                None,
            )
            .unwrap();
        assert!(del.entry.is_tombstone());
        assert_eq!(del.entry.prev(), Some(&b.entry.version));
    }

    #[test]
    fn concurrent_writes_are_reported_as_conflicts() {
        let left = PolicyStore::open("n1", None).unwrap();
        let right = PolicyStore::open("n4", None).unwrap();
        let now = left.clock().physical_ms();
        let base = signed_put(&left, 1, now).unwrap().entry;
        right.offer(base.to_record().into_entry().unwrap()).unwrap();
        // Both sides write, each having seen only `base`.
        let l = signed_put(&left, 2, now + 10).unwrap().entry;
        let r = signed_put(&right, 3, now + 20).unwrap().entry;
        match left.offer(r.to_record().into_entry().unwrap()).unwrap() {
            Offered::Applied { conflict: Some(c) } => {
                assert_eq!(
                    (c.winner, c.loser),
                    (r.version.to_string(), l.version.to_string())
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(left.conflict(Kind::RateLimit, "s").is_some());
        match right.offer(l.to_record().into_entry().unwrap()).unwrap() {
            Offered::Kept { conflict: Some(_) } => {}
            other => panic!("{other:?}"),
        }
        // A write that saw the winner resolves it.
        let fix = signed_put(&right, 4, now + 30).unwrap().entry;
        assert!(right.conflict(Kind::RateLimit, "s").is_none());
        assert!(matches!(
            left.offer(fix.to_record().into_entry().unwrap()).unwrap(),
            Offered::Applied { conflict: None }
        ));
        assert!(left.conflict(Kind::RateLimit, "s").is_none());
        // An old version the writer had seen is no conflict.
        assert!(matches!(
            left.offer(base.to_record().into_entry().unwrap()).unwrap(),
            Offered::Kept { conflict: None }
        ));
    }
}
