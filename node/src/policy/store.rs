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
use super::hlc::{Hlc, Version};
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
}

impl Entry {
    /// Whether this entry is a delete.
    pub fn is_tombstone(&self) -> bool {
        self.doc.is_none()
    }

    /// The wire / disk form.
    pub fn to_record(&self) -> Record {
        Record {
            kind: self.kind.to_string(),
            name: self.name.clone(),
            version: self.version.to_string(),
            hash: self.hash.clone(),
            body: self.doc.as_ref().map(|d| d.canonical.clone()),
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
    /// Content hash.
    pub hash: String,
    /// Canonical JSON body, absent for a tombstone.
    pub body: Option<String>,
}

impl Record {
    /// Checks the record and turns it into an entry: the body must parse and
    /// hash to `hash`.
    pub fn into_entry(self) -> Result<Entry, StoreError> {
        let kind: Kind = self.kind.parse().map_err(StoreError::Corrupt)?;
        let version: Version = self.version.parse().map_err(StoreError::Corrupt)?;
        let doc = match self.body {
            None => {
                if self.hash != TOMBSTONE {
                    return Err(StoreError::HashMismatch);
                }
                None
            }
            Some(body) => {
                if content_hash(&body) != self.hash {
                    return Err(StoreError::HashMismatch);
                }
                let doc = Document::parse(&body).map_err(|p| StoreError::Corrupt(p.to_string()))?;
                if doc.kind != kind || doc.name != self.name {
                    return Err(StoreError::Corrupt("body names another policy".into()));
                }
                Some(Arc::new(doc))
            }
        };
        Ok(Entry {
            kind,
            name: self.name,
            version,
            hash: self.hash,
            doc,
        })
    }
}

/// Hash marker for tombstones.
pub const TOMBSTONE: &str = "-";

/// SHA-256 of `body`, lower-case hex.
pub fn content_hash(body: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, body.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
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
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// All policies this node knows, and the snapshot the data plane reads.
pub struct PolicyStore {
    dir: Option<PathBuf>,
    hlc: Hlc,
    entries: Mutex<BTreeMap<(Kind, String), Entry>>,
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
                    .and_then(Record::into_entry);
                match loaded {
                    Ok(e) => {
                        hlc.observe(&e.version);
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

    /// Accepts a write from an operator: stamps, persists, applies.
    pub fn put(&self, doc: Document, if_match: Option<&str>) -> Result<Entry, StoreError> {
        let hash = content_hash(&doc.canonical);
        let key = (doc.kind, doc.name.clone());
        self.write_local(key, if_match, |version| Entry {
            kind: doc.kind,
            name: doc.name.clone(),
            version,
            hash,
            doc: Some(Arc::new(doc)),
        })
    }

    /// Accepts a delete from an operator: writes a tombstone.
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
        self.write_local((kind, name.to_string()), if_match, |version| Entry {
            kind,
            name: name.to_string(),
            version,
            hash: TOMBSTONE.into(),
            doc: None,
        })
    }

    fn write_local(
        &self,
        key: (Kind, String),
        if_match: Option<&str>,
        make: impl FnOnce(Version) -> Entry,
    ) -> Result<Entry, StoreError> {
        let mut entries = self.entries.lock().unwrap();
        if let Some(expected) = if_match {
            let current = entries
                .get(&key)
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
        if let Some(e) = entries.get(&key) {
            self.hlc.observe(&e.version);
        }
        let entry = make(self.hlc.stamp());
        self.persist(&entry)?;
        entries.insert(key, entry.clone());
        self.apply(&entries);
        Ok(entry)
    }

    /// Offers an entry learned from a peer. Applies it if it is newer than
    /// ours; returns whether it was applied.
    pub fn offer(&self, entry: Entry) -> Result<bool, StoreError> {
        self.hlc.observe(&entry.version);
        let mut entries = self.entries.lock().unwrap();
        let key = (entry.kind, entry.name.clone());
        if entries
            .get(&key)
            .is_some_and(|e| e.version >= entry.version)
        {
            return Ok(false);
        }
        self.persist(&entry)?;
        entries.insert(key, entry);
        self.apply(&entries);
        Ok(true)
    }

    fn apply(&self, entries: &BTreeMap<(Kind, String), Entry>) {
        let set = Arc::new(PolicySet::build(entries.values()));
        *self.set.write().unwrap() = set;
        self.changed.send_modify(|n| *n += 1);
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
        assert!(other.offer(rec.clone().into_entry().unwrap()).unwrap());
        assert!(!other.offer(a.to_record().into_entry().unwrap()).unwrap());
        assert_eq!(
            other.entry(Kind::RateLimit, "a").unwrap().version,
            newest.version
        );

        let mut tampered = rec;
        tampered.body = Some(tampered.body.unwrap().replace("7", "9"));
        assert!(matches!(
            tampered.into_entry(),
            Err(StoreError::HashMismatch)
        ));
    }
}
