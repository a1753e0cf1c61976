//! The model's network: chitchat's own in-memory [`ChannelTransport`]
//! (which serialises every message with chitchat's wire codec and refuses
//! one larger than a UDP datagram), wrapped to lose a seeded fraction of
//! messages, to cut a zone off from the others, and to count traffic per
//! node.
//!
//! A model node's address encodes its index: `10.a.b.c` with
//! `a.b.c` = the index, port 7000 for its zone pool and 7001 for the
//! backbone, so the wrapper knows every message's sender and zone without a
//! lookup table shared with chitchat.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Largest UDP payload: chitchat's messages must fit in one datagram.
pub const MAX_DATAGRAM: usize = 65_507;

/// Port of a node's zone-pool chitchat.
pub const ZONE_PORT: u16 = 7000;
/// Port of a representative's backbone chitchat.
pub const BACKBONE_PORT: u16 = 7001;

/// The zone-pool address of model node `i`.
pub fn zone_addr(i: usize) -> SocketAddr {
    SocketAddr::new(ip_of(i), ZONE_PORT)
}

/// The backbone address of model node `i`.
pub fn backbone_addr(i: usize) -> SocketAddr {
    SocketAddr::new(ip_of(i), BACKBONE_PORT)
}

fn ip_of(i: usize) -> IpAddr {
    Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8).into()
}

/// The node index an address encodes.
pub fn index_of(addr: SocketAddr) -> usize {
    match addr.ip() {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            ((o[1] as usize) << 16) | ((o[2] as usize) << 8) | o[3] as usize
        }
        IpAddr::V6(_) => usize::MAX,
    }
}

/// Traffic and fault counters, shared by every socket.
pub struct Net {
    /// Bytes sent, per node index (both of a representative's instances).
    sent: RwLock<Vec<AtomicU64>>,
    /// Messages sent.
    pub messages: AtomicU64,
    /// Largest message sent, bytes.
    pub max_message: AtomicU64,
    /// Sends refused: over one datagram.
    pub oversize: AtomicU64,
    /// Messages dropped by the loss setting.
    pub lost: AtomicU64,
    /// Messages dropped by the zone partition.
    pub cut: AtomicU64,
    /// Zone of each node index.
    zones: RwLock<Vec<u16>>,
    /// The zone cut off from the others, or -1.
    partitioned: AtomicI64,
    loss: f64,
    rng: Mutex<StdRng>,
}

impl Net {
    /// A network losing `loss` of messages, seeded.
    pub fn new(loss: f64, seed: u64) -> Arc<Self> {
        Arc::new(Net {
            sent: RwLock::new(Vec::new()),
            messages: AtomicU64::new(0),
            max_message: AtomicU64::new(0),
            oversize: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            cut: AtomicU64::new(0),
            zones: RwLock::new(Vec::new()),
            partitioned: AtomicI64::new(-1),
            loss: loss.clamp(0.0, 1.0),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        })
    }

    /// Records that node `i` lives in `zone` (before it opens a socket).
    pub fn place(&self, i: usize, zone: u16) {
        let mut z = self.zones.write().unwrap();
        if z.len() <= i {
            z.resize(i + 1, 0);
        }
        z[i] = zone;
        drop(z);
        let mut s = self.sent.write().unwrap();
        while s.len() <= i {
            s.push(AtomicU64::new(0));
        }
    }

    /// Cuts `zone` off from every other zone (`None` heals).
    pub fn partition(&self, zone: Option<u16>) {
        self.partitioned
            .store(zone.map_or(-1, i64::from), Ordering::Relaxed);
    }

    /// Bytes sent so far by each node index.
    pub fn sent_by_node(&self) -> Vec<u64> {
        self.sent
            .read()
            .unwrap()
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    fn zone_of(&self, addr: SocketAddr) -> Option<u16> {
        self.zones.read().unwrap().get(index_of(addr)).copied()
    }

    /// Whether the partition drops a message between these addresses.
    fn is_cut(&self, from: SocketAddr, to: SocketAddr) -> bool {
        let p = self.partitioned.load(Ordering::Relaxed);
        if p < 0 {
            return false;
        }
        let (Some(a), Some(b)) = (self.zone_of(from), self.zone_of(to)) else {
            return false;
        };
        a != b && (i64::from(a) == p || i64::from(b) == p)
    }

    fn count_send(&self, from: SocketAddr, bytes: usize) {
        if let Some(c) = self.sent.read().unwrap().get(index_of(from)) {
            c.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.max_message.fetch_max(bytes as u64, Ordering::Relaxed);
    }
}

/// A chitchat [`Transport`] over one shared [`ChannelTransport`].
pub struct ModelTransport {
    inner: ChannelTransport,
    net: Arc<Net>,
}

impl ModelTransport {
    /// A transport whose sockets share `net`.
    pub fn new(net: Arc<Net>) -> Self {
        ModelTransport {
            inner: ChannelTransport::with_mtu(MAX_DATAGRAM),
            net,
        }
    }
}

#[async_trait]
impl Transport for ModelTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        Ok(Box::new(ModelSocket {
            addr: listen_addr,
            inner,
            net: self.net.clone(),
        }))
    }
}

struct ModelSocket {
    addr: SocketAddr,
    inner: Box<dyn Socket>,
    net: Arc<Net>,
}

#[async_trait]
impl Socket for ModelSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.inner.local_addr()
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        match self.inner.send(to, envelope).await {
            Ok(out) => {
                self.net.count_send(self.addr, out.num_bytes_sent);
                Ok(out)
            }
            Err(e) => {
                // Over one datagram: the wire would refuse it too.
                self.net.oversize.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let out = self.inner.recv().await?;
            if self.net.is_cut(out.from_addr, self.addr) {
                self.net.cut.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if self.net.loss > 0.0 && self.net.rng.lock().unwrap().gen_bool(self.net.loss) {
                self.net.lost.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_encode_the_index() {
        for i in [0, 1, 255, 256, 9_999, 70_000] {
            assert_eq!(index_of(zone_addr(i)), i);
            assert_eq!(index_of(backbone_addr(i)), i);
        }
        assert_ne!(zone_addr(3), backbone_addr(3));
    }

    #[test]
    fn a_partition_cuts_only_across_the_zone_boundary() {
        let net = Net::new(0.0, 1);
        net.place(0, 0);
        net.place(1, 0);
        net.place(2, 1);
        net.place(3, 2);
        assert!(!net.is_cut(zone_addr(0), zone_addr(2)));
        net.partition(Some(0));
        assert!(!net.is_cut(zone_addr(0), zone_addr(1)), "inside the zone");
        assert!(net.is_cut(backbone_addr(0), backbone_addr(2)));
        assert!(net.is_cut(backbone_addr(3), backbone_addr(1)));
        assert!(
            !net.is_cut(backbone_addr(2), backbone_addr(3)),
            "other zones"
        );
        net.partition(None);
        assert!(!net.is_cut(backbone_addr(0), backbone_addr(2)));
    }
}
