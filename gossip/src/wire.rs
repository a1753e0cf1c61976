//! Our own reader and writer for the bytes chitchat 0.13 puts on the wire.
//!
//! chitchat keeps its (de)serialisation private, but its wire format is plain:
//! a little-endian header (magic `45139`, protocol version, message type), a
//! digest (node id, heartbeat, last GC version, max version per node) and a
//! delta (a stream of operations: `Node`, `KeyValue`, `SetMaxVersion`). The
//! digest (protocol V1) and the delta travel as a block stream whose blocks
//! are zstd-compressed or stored.
//!
//! Shoal reads every gossip message before chitchat sees it (see
//! [`crate::guard`]), so a peer holding a valid certificate cannot write into
//! another node's key space, create ghost members, or send a message that
//! crashes or wedges chitchat. Reading is bounded before anything is trusted:
//! the message size, the decompressed size, string lengths and counts.
//!
//! [`Message::encode`] writes stored (uncompressed) blocks only; chitchat
//! reads both kinds. Tests and the adversarial suite also use it to craft
//! what a modified binary would send. [`Message::encode_compressed`] writes
//! blocks as chitchat does (zstd where that is shorter): the form the guard
//! forwards a message it had to cut in, since the stored form of what a peer's
//! chitchat compressed into one datagram may not fit one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// chitchat's magic number.
const MAGIC: u16 = 45_139;
/// The largest gossip message (chitchat's own UDP payload limit).
pub const MAX_MESSAGE_BYTES: usize = 65_507;
/// The most a message may decompress to.
pub const MAX_DECOMPRESSED_BYTES: usize = 1 << 20;
/// The most items (digest entries or delta operations) a message may hold.
pub const MAX_ITEMS: usize = 100_000;

/// A chitchat node id: name, generation, gossip address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    /// Node name.
    pub name: String,
    /// Generation (incarnation).
    pub generation: u64,
    /// Gossip (QUIC) address it advertises.
    pub addr: SocketAddr,
}

/// One digest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestEntry {
    /// Whose.
    pub id: NodeId,
    /// Its heartbeat.
    pub heartbeat: u64,
    /// Its last GC version.
    pub last_gc_version: u64,
    /// Its max version.
    pub max_version: u64,
}

/// A key-value's status on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvStatus {
    /// Set.
    Set,
    /// Deleted.
    Delete,
    /// Deleted after a TTL.
    DeleteAfterTtl,
}

/// One key-value mutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Key.
    pub key: String,
    /// Value.
    pub value: String,
    /// Version within its node's state.
    pub version: u64,
    /// Status.
    pub status: KvStatus,
}

/// What a delta says about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDelta {
    /// Whose state.
    pub id: NodeId,
    /// The GC version the delta was computed from.
    pub last_gc_version: u64,
    /// The delta holds versions above this one.
    pub from_version_excluded: u64,
    /// The key-values, by increasing version.
    pub key_values: Vec<KeyValue>,
    /// An explicit max version (only sent for emptied states).
    pub set_max_version: Option<u64>,
}

/// A decoded chitchat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Opens a round.
    Syn {
        /// Cluster id.
        cluster_id: String,
        /// Sender's digest.
        digest: Vec<DigestEntry>,
    },
    /// Answers a Syn.
    SynAck {
        /// Responder's digest.
        digest: Vec<DigestEntry>,
        /// What the initiator lacks.
        delta: Vec<NodeDelta>,
    },
    /// Closes a round.
    Ack {
        /// What the responder lacks.
        delta: Vec<NodeDelta>,
    },
    /// Wrong cluster.
    BadCluster,
}

/// A message with its protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// chitchat protocol version (0: plain digest, 1: block-stream digest).
    pub version: u8,
    /// The message.
    pub body: Body,
}

/// Why bytes are not a chitchat message we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {0} bytes exceeds {MAX_MESSAGE_BYTES}")]
    Oversize(usize),
    /// Decompresses past [`MAX_DECOMPRESSED_BYTES`] or holds too many items.
    #[error("message expands past its limits")]
    TooLarge,
    /// Not well formed.
    #[error("malformed gossip message: {0}")]
    Malformed(&'static str),
}

type Result<T> = std::result::Result<T, WireError>;

struct Reader<'a> {
    buf: &'a [u8],
    /// The most one block stream may decompress to.
    limit: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.buf.len() < n {
            return Err(WireError::Malformed("truncated"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u64(&mut self) -> Result<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| WireError::Malformed("string is not UTF-8"))
    }
    fn addr(&mut self) -> Result<SocketAddr> {
        let ip = match self.u8()? {
            4 => {
                let b = self.take(4)?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let b = self.take(16)?;
                let mut a = [0u8; 16];
                a.copy_from_slice(b);
                IpAddr::V6(Ipv6Addr::from(a))
            }
            _ => return Err(WireError::Malformed("bad IP version")),
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn node_id(&mut self) -> Result<NodeId> {
        Ok(NodeId {
            name: self.string()?,
            generation: self.u64()?,
            addr: self.addr()?,
        })
    }
    fn digest_entry(&mut self) -> Result<DigestEntry> {
        Ok(DigestEntry {
            id: self.node_id()?,
            heartbeat: self.u64()?,
            last_gc_version: self.u64()?,
            max_version: self.u64()?,
        })
    }
    /// Reads a block stream and returns its concatenated contents.
    fn block_stream(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        loop {
            match self.u8()? {
                0 => return Ok(out),
                1 => {
                    let n = self.u16()? as usize;
                    let block = self.take(n)?;
                    let room = self.limit.saturating_sub(out.len());
                    let limit = room.min(u16::MAX as usize);
                    if limit == 0 {
                        return Err(WireError::TooLarge);
                    }
                    // Short of room, a block that does not decompress may
                    // only be too long for what is left.
                    let plain = zstd::bulk::decompress(block, limit).map_err(|_| {
                        if limit < u16::MAX as usize {
                            WireError::TooLarge
                        } else {
                            WireError::Malformed("bad compressed block")
                        }
                    })?;
                    out.extend_from_slice(&plain);
                }
                2 => {
                    let n = self.u16()? as usize;
                    let block = self.take(n)?;
                    if out.len() + n > self.limit {
                        return Err(WireError::TooLarge);
                    }
                    out.extend_from_slice(block);
                }
                _ => return Err(WireError::Malformed("bad block type")),
            }
        }
    }
}

fn digest_v0(r: &mut Reader<'_>) -> Result<Vec<DigestEntry>> {
    let n = r.u16()? as usize;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        out.push(r.digest_entry()?);
    }
    Ok(out)
}

fn digest_v1(r: &mut Reader<'_>) -> Result<Vec<DigestEntry>> {
    let plain = r.block_stream()?;
    let mut inner = Reader {
        buf: &plain,
        limit: r.limit,
    };
    let mut out = Vec::new();
    while !inner.buf.is_empty() {
        if out.len() >= MAX_ITEMS {
            return Err(WireError::TooLarge);
        }
        out.push(inner.digest_entry()?);
    }
    Ok(out)
}

fn delta(r: &mut Reader<'_>) -> Result<Vec<NodeDelta>> {
    let plain = r.block_stream()?;
    let mut inner = Reader {
        buf: &plain,
        limit: r.limit,
    };
    let mut out: Vec<NodeDelta> = Vec::new();
    let mut items = 0usize;
    while !inner.buf.is_empty() {
        items += 1;
        if items > MAX_ITEMS {
            return Err(WireError::TooLarge);
        }
        match inner.u8()? {
            0 => out.push(NodeDelta {
                id: inner.node_id()?,
                last_gc_version: inner.u64()?,
                from_version_excluded: inner.u64()?,
                key_values: Vec::new(),
                set_max_version: None,
            }),
            1 => {
                let kv = KeyValue {
                    key: inner.string()?,
                    value: inner.string()?,
                    version: inner.u64()?,
                    status: match inner.u8()? {
                        0 => KvStatus::Set,
                        1 => KvStatus::Delete,
                        2 => KvStatus::DeleteAfterTtl,
                        _ => return Err(WireError::Malformed("bad key-value status")),
                    },
                };
                let node = out
                    .last_mut()
                    .ok_or(WireError::Malformed("key-value before any node"))?;
                node.key_values.push(kv);
            }
            2 => {
                let v = inner.u64()?;
                let node = out
                    .last_mut()
                    .ok_or(WireError::Malformed("max version before any node"))?;
                node.set_max_version = Some(v);
            }
            _ => return Err(WireError::Malformed("bad delta operation")),
        }
    }
    Ok(out)
}

impl Message {
    /// Reads a message, bounded by the limits above.
    pub fn decode(bytes: &[u8]) -> Result<Message> {
        Message::decode_within(bytes, MAX_DECOMPRESSED_BYTES)
    }

    /// Reads a message whose digest and delta each decompress to at most
    /// `decompressed` bytes (capped at [`MAX_DECOMPRESSED_BYTES`]);
    /// [`WireError::TooLarge`] if either would take more.
    pub fn decode_within(bytes: &[u8], decompressed: usize) -> Result<Message> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(WireError::Oversize(bytes.len()));
        }
        let mut r = Reader {
            buf: bytes,
            limit: decompressed.min(MAX_DECOMPRESSED_BYTES),
        };
        if r.u16()? != MAGIC {
            return Err(WireError::Malformed("bad magic number"));
        }
        let version = r.u8()?;
        if version > 1 {
            return Err(WireError::Malformed("unknown protocol version"));
        }
        let digest = |r: &mut Reader<'_>| {
            if version == 0 {
                digest_v0(r)
            } else {
                digest_v1(r)
            }
        };
        let body = match r.u8()? {
            0 => {
                let d = digest(&mut r)?;
                Body::Syn {
                    digest: d,
                    cluster_id: r.string()?,
                }
            }
            1 => {
                let d = digest(&mut r)?;
                Body::SynAck {
                    digest: d,
                    delta: delta(&mut r)?,
                }
            }
            2 => Body::Ack {
                delta: delta(&mut r)?,
            },
            3 => Body::BadCluster,
            _ => return Err(WireError::Malformed("bad message type")),
        };
        if !r.buf.is_empty() {
            return Err(WireError::Malformed("trailing bytes"));
        }
        Ok(Message { version, body })
    }

    /// Writes the message in chitchat's format (stored blocks).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_with(false)
    }

    /// Writes the message in chitchat's format with each block of the digest
    /// and delta zstd-compressed where that is shorter, as chitchat writes
    /// them (a compressed block decompresses to at most `u16::MAX` bytes,
    /// what chitchat's reader allows).
    pub fn encode_compressed(&self) -> Vec<u8> {
        self.encode_with(true)
    }

    fn encode_with(&self, compress: bool) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(self.version);
        match &self.body {
            Body::Syn { cluster_id, digest } => {
                out.push(0);
                write_digest(&mut out, self.version, digest, compress);
                write_str(&mut out, cluster_id);
            }
            Body::SynAck { digest, delta } => {
                out.push(1);
                write_digest(&mut out, self.version, digest, compress);
                write_delta(&mut out, delta, compress);
            }
            Body::Ack { delta } => {
                out.push(2);
                write_delta(&mut out, delta, compress);
            }
            Body::BadCluster => out.push(3),
        }
        out
    }

    /// The digest, if the message has one.
    pub fn digest(&self) -> Option<&[DigestEntry]> {
        match &self.body {
            Body::Syn { digest, .. } | Body::SynAck { digest, .. } => Some(digest),
            _ => None,
        }
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    let n = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

fn write_id(out: &mut Vec<u8>, id: &NodeId) {
    write_str(out, &id.name);
    out.extend_from_slice(&id.generation.to_le_bytes());
    match id.addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&id.addr.port().to_le_bytes());
}

fn write_entry(out: &mut Vec<u8>, e: &DigestEntry) {
    write_id(out, &e.id);
    out.extend_from_slice(&e.heartbeat.to_le_bytes());
    out.extend_from_slice(&e.last_gc_version.to_le_bytes());
    out.extend_from_slice(&e.max_version.to_le_bytes());
}

fn write_digest(out: &mut Vec<u8>, version: u8, digest: &[DigestEntry], compress: bool) {
    if version == 0 {
        out.extend_from_slice(&(digest.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for e in digest.iter().take(u16::MAX as usize) {
            write_entry(out, e);
        }
    } else {
        let mut plain = Vec::new();
        for e in digest {
            write_entry(&mut plain, e);
        }
        write_stream(out, &plain, compress);
    }
}

fn write_delta(out: &mut Vec<u8>, delta: &[NodeDelta], compress: bool) {
    let mut plain = Vec::new();
    for nd in delta {
        plain.push(0);
        write_id(&mut plain, &nd.id);
        plain.extend_from_slice(&nd.last_gc_version.to_le_bytes());
        plain.extend_from_slice(&nd.from_version_excluded.to_le_bytes());
        for kv in &nd.key_values {
            plain.push(1);
            write_str(&mut plain, &kv.key);
            write_str(&mut plain, &kv.value);
            plain.extend_from_slice(&kv.version.to_le_bytes());
            plain.push(match kv.status {
                KvStatus::Set => 0,
                KvStatus::Delete => 1,
                KvStatus::DeleteAfterTtl => 2,
            });
        }
        if let Some(v) = nd.set_max_version {
            plain.push(2);
            plain.extend_from_slice(&v.to_le_bytes());
        }
    }
    write_stream(out, &plain, compress);
}

/// A block stream of `plain`: blocks of at most `u16::MAX` bytes, each
/// zstd-compressed (type 1) when `compress` and that is shorter, else
/// stored (type 2), then the end tag.
fn write_stream(out: &mut Vec<u8>, plain: &[u8], compress: bool) {
    for block in plain.chunks(u16::MAX as usize) {
        let packed = compress
            .then(|| zstd::bulk::compress(block, 0).ok())
            .flatten()
            .filter(|c| c.len() < block.len());
        match packed {
            Some(c) => {
                out.push(1);
                out.extend_from_slice(&(c.len() as u16).to_le_bytes());
                out.extend_from_slice(&c);
            }
            None => {
                out.push(2);
                out.extend_from_slice(&(block.len() as u16).to_le_bytes());
                out.extend_from_slice(block);
            }
        }
    }
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> NodeId {
        NodeId {
            name: name.into(),
            generation: 7,
            addr: "127.0.0.1:7001".parse().unwrap(),
        }
    }

    #[test]
    fn messages_round_trip() {
        let m = Message {
            version: 1,
            body: Body::SynAck {
                digest: vec![DigestEntry {
                    id: id("n1"),
                    heartbeat: 3,
                    last_gc_version: 0,
                    max_version: 9,
                }],
                delta: vec![NodeDelta {
                    id: id("n2"),
                    last_gc_version: 0,
                    from_version_excluded: 2,
                    key_values: vec![KeyValue {
                        key: "zone".into(),
                        value: "eu".into(),
                        version: 3,
                        status: KvStatus::Set,
                    }],
                    set_max_version: None,
                }],
            },
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        let syn = Message {
            version: 0,
            body: Body::Syn {
                cluster_id: "shoal".into(),
                digest: vec![],
            },
        };
        assert_eq!(Message::decode(&syn.encode()).unwrap(), syn);
    }

    #[test]
    fn compressed_blocks_are_read() {
        let mut plain = Vec::new();
        for i in 0..50 {
            write_entry(
                &mut plain,
                &DigestEntry {
                    id: id(&format!("node-{i}")),
                    heartbeat: i,
                    last_gc_version: 0,
                    max_version: i,
                },
            );
        }
        let packed = zstd::bulk::compress(&plain, 0).unwrap();
        let mut bytes = MAGIC.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 0, 1]);
        bytes.extend_from_slice(&(packed.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&packed);
        bytes.push(0);
        write_str(&mut bytes, "shoal");
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m.digest().unwrap().len(), 50);
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(matches!(
            Message::decode(&vec![0u8; MAX_MESSAGE_BYTES + 1]),
            Err(WireError::Oversize(_))
        ));
        assert!(Message::decode(b"").is_err());
        assert!(Message::decode(&[0x53, 0xb0, 1, 9]).is_err());
        // A compression bomb: a tiny block that claims megabytes.
        let bomb = zstd::bulk::compress(&vec![0u8; 4 << 20], 19).unwrap();
        let mut bytes = MAGIC.to_le_bytes().to_vec();
        bytes.extend_from_slice(&[1, 2]);
        bytes.push(1);
        bytes.extend_from_slice(&(bomb.len() as u16).to_le_bytes());
        bytes.extend_from_slice(&bomb);
        bytes.push(0);
        assert!(Message::decode(&bytes).is_err());
    }

    #[test]
    fn a_decode_within_a_smaller_limit_says_too_large_not_malformed() {
        let digest: Vec<DigestEntry> = (0..1200u16)
            .map(|i| DigestEntry {
                id: NodeId {
                    name: "n".into(),
                    generation: 1,
                    addr: format!("127.0.0.1:{i}").parse().unwrap(),
                },
                heartbeat: 7,
                last_gc_version: 0,
                max_version: 2,
            })
            .collect();
        let msg = Message {
            version: 1,
            body: Body::Syn {
                cluster_id: "c".into(),
                digest,
            },
        };
        for bytes in [msg.encode(), msg.encode_compressed()] {
            assert!(Message::decode(&bytes).as_ref() == Ok(&msg));
            assert_eq!(
                Message::decode_within(&bytes, 4096),
                Err(WireError::TooLarge)
            );
        }
        // A broken compressed block with room to spare is still malformed.
        let mut broken = MAGIC.to_le_bytes().to_vec();
        broken.extend_from_slice(&[1, 0, 1, 4, 0, 0xde, 0xad, 0xbe, 0xef, 0]);
        for limit in [MAX_DECOMPRESSED_BYTES, u16::MAX as usize] {
            assert!(matches!(
                Message::decode_within(&broken, limit),
                Err(WireError::Malformed(_))
            ));
        }
    }
}
