//! Network fault injection under QUIC: a [`SocketLayer`] that wraps each
//! node's UDP socket and decides, per datagram and per link, whether it is
//! dropped, delayed, duplicated or held back so later ones overtake it.
//!
//! One [`FaultNet`] is shared by every node of a simulated cluster. Links are
//! keyed by (source address, destination address), so a rule is exact per
//! direction: a one-way partition cuts one key, a symmetric one cuts both.
//! Every random decision comes from one seeded [`StdRng`], so the stream of
//! decisions is fixed by the seed (which packet meets which decision still
//! depends on the order packets are sent, which the OS scheduler decides).
//!
//! Link rules act on the sending side. Isolation ([`FaultNet::isolate`],
//! used for `pause`) acts on both sides: the isolated socket neither sends
//! nor delivers what it receives, whoever sent it.
//!
//! This module owns only packet fates. It must not know about nodes,
//! scenarios or gossip: the runner translates names into addresses.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use node::socket::{SharedSocket, SocketLayer};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// What happens to datagrams on one directed link. The default passes
/// everything untouched.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkFaults {
    /// Drop every datagram (a partition).
    pub cut: bool,
    /// Fraction of datagrams dropped, 0.0..=1.0.
    pub loss: f64,
    /// Fixed delay added to every datagram.
    pub delay: Duration,
    /// Uniform extra delay in `0..=jitter` on top of `delay`.
    pub jitter: Duration,
    /// Fraction of datagrams sent twice, 0.0..=1.0.
    pub duplicate: f64,
    /// Fraction of datagrams held back by `reorder_hold` so that later ones
    /// overtake them, 0.0..=1.0.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_hold: Duration,
}

impl LinkFaults {
    /// True when the link passes everything untouched.
    pub fn is_clean(&self) -> bool {
        *self == LinkFaults::default()
    }
}

/// What the layer decided for one datagram.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Not sent.
    Dropped,
    /// Sent once per entry, each after the given delay (zero: at once).
    Sent(Vec<Duration>),
}

/// Counters of what the layer did, for reports.
#[derive(Debug, Default, Serialize, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    /// Datagrams handed to the layer for sending.
    pub datagrams: u64,
    /// Dropped by a cut link.
    pub cut: u64,
    /// Dropped by random loss.
    pub lost: u64,
    /// Delayed (by delay, jitter or reorder).
    pub delayed: u64,
    /// Extra copies sent.
    pub duplicated: u64,
    /// Held back for reordering.
    pub reordered: u64,
    /// Dropped because the sender or the receiver was isolated.
    pub isolated: u64,
}

#[derive(Default)]
struct Counters {
    datagrams: AtomicU64,
    cut: AtomicU64,
    lost: AtomicU64,
    delayed: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    isolated: AtomicU64,
}

struct NetState {
    links: HashMap<(SocketAddr, SocketAddr), LinkFaults>,
    isolated: HashSet<SocketAddr>,
    rng: StdRng,
}

/// The fault table shared by every socket of a simulated network.
pub struct FaultNet {
    state: Mutex<NetState>,
    counters: Counters,
}

// === impl FaultNet ===

impl FaultNet {
    /// A clean network whose random decisions come from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(FaultNet {
            state: Mutex::new(NetState {
                links: HashMap::new(),
                isolated: HashSet::new(),
                rng: StdRng::seed_from_u64(seed),
            }),
            counters: Counters::default(),
        })
    }

    /// A [`SocketLayer`] that puts a node's socket on this network.
    pub fn layer(self: &Arc<Self>) -> Arc<dyn SocketLayer> {
        Arc::new(FaultLayer { net: self.clone() })
    }

    /// Replaces the rule for datagrams from `src` to `dst`.
    pub fn set_link(&self, src: SocketAddr, dst: SocketAddr, faults: LinkFaults) {
        let mut st = self.state.lock().unwrap();
        if faults.is_clean() {
            st.links.remove(&(src, dst));
        } else {
            st.links.insert((src, dst), faults);
        }
    }

    /// The rule for datagrams from `src` to `dst`.
    pub fn link(&self, src: SocketAddr, dst: SocketAddr) -> LinkFaults {
        let st = self.state.lock().unwrap();
        st.links.get(&(src, dst)).copied().unwrap_or_default()
    }

    /// Removes every link rule (isolation stays).
    pub fn clear_links(&self) {
        self.state.lock().unwrap().links.clear();
    }

    /// Stops the socket bound to `addr` from passing packets either way.
    pub fn isolate(&self, addr: SocketAddr) {
        self.state.lock().unwrap().isolated.insert(addr);
    }

    /// Undoes [`FaultNet::isolate`].
    pub fn restore(&self, addr: SocketAddr) {
        self.state.lock().unwrap().isolated.remove(&addr);
    }

    /// What the layer has done so far.
    pub fn counts(&self) -> FaultCounts {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            datagrams: get(&c.datagrams),
            cut: get(&c.cut),
            lost: get(&c.lost),
            delayed: get(&c.delayed),
            duplicated: get(&c.duplicated),
            reordered: get(&c.reordered),
            isolated: get(&c.isolated),
        }
    }

    /// Decides the fate of one datagram from `src` to `dst` (and counts it).
    pub fn decide(&self, src: SocketAddr, dst: SocketAddr) -> Fate {
        let c = &self.counters;
        c.datagrams.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock().unwrap();
        if st.isolated.contains(&src) || st.isolated.contains(&dst) {
            c.isolated.fetch_add(1, Ordering::Relaxed);
            return Fate::Dropped;
        }
        let Some(f) = st.links.get(&(src, dst)).copied() else {
            return Fate::Sent(vec![Duration::ZERO]);
        };
        if f.cut {
            c.cut.fetch_add(1, Ordering::Relaxed);
            return Fate::Dropped;
        }
        let rng = &mut st.rng;
        if f.loss > 0.0 && rng.gen_bool(f.loss.min(1.0)) {
            c.lost.fetch_add(1, Ordering::Relaxed);
            return Fate::Dropped;
        }
        let copies = if f.duplicate > 0.0 && rng.gen_bool(f.duplicate.min(1.0)) {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        let mut delays = Vec::with_capacity(copies);
        for _ in 0..copies {
            let mut d = f.delay;
            if !f.jitter.is_zero() {
                d += f.jitter.mul_f64(rng.r#gen::<f64>());
            }
            if f.reorder > 0.0 && rng.gen_bool(f.reorder.min(1.0)) {
                c.reordered.fetch_add(1, Ordering::Relaxed);
                d += f.reorder_hold;
            }
            if !d.is_zero() {
                c.delayed.fetch_add(1, Ordering::Relaxed);
            }
            delays.push(d);
        }
        Fate::Sent(delays)
    }

    fn receiver_isolated(&self, local: SocketAddr) -> bool {
        self.state.lock().unwrap().isolated.contains(&local)
    }
}

impl fmt::Debug for FaultNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultNet")
            .field("counts", &self.counts())
            .finish()
    }
}

/// Puts sockets on a [`FaultNet`].
struct FaultLayer {
    net: Arc<FaultNet>,
}

impl SocketLayer for FaultLayer {
    fn wrap(&self, inner: SharedSocket) -> SharedSocket {
        let local = inner
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        Arc::new(FaultSocket {
            inner,
            net: self.net.clone(),
            local,
        })
    }
}

/// A UDP socket whose datagrams meet the fates its [`FaultNet`] decides.
pub struct FaultSocket {
    inner: SharedSocket,
    net: Arc<FaultNet>,
    local: SocketAddr,
}

// === impl FaultSocket ===

impl FaultSocket {
    /// Sends one datagram (never a GSO batch) according to its fate.
    fn send_one(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let delays = match self.net.decide(self.local, transmit.destination) {
            Fate::Dropped => return Ok(()),
            Fate::Sent(delays) => delays,
        };
        let mut first_error = None;
        for delay in delays {
            if delay.is_zero() {
                if let Err(e) = self.inner.try_send(transmit) {
                    first_error.get_or_insert(e);
                }
            } else {
                self.send_later(transmit, delay);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends a copy of `transmit` after `delay` from a timer task. A socket
    /// that is not writable then drops it, as a full queue would.
    fn send_later(&self, transmit: &Transmit<'_>, delay: Duration) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            let _ = self.inner.try_send(transmit);
            return;
        };
        let inner = self.inner.clone();
        let destination = transmit.destination;
        let ecn = transmit.ecn;
        let src_ip = transmit.src_ip;
        let contents = transmit.contents.to_vec();
        handle.spawn(async move {
            tokio::time::sleep(delay).await;
            let transmit = Transmit {
                destination,
                ecn,
                contents: &contents,
                segment_size: None,
                src_ip,
            };
            let _ = send_when_writable(&inner, &transmit).await;
        });
    }
}

/// Sends `transmit` on `socket`, waiting for writability when the socket
/// says it would block.
pub async fn send_when_writable(socket: &SharedSocket, transmit: &Transmit<'_>) -> io::Result<()> {
    let mut poller = socket.clone().create_io_poller();
    loop {
        match socket.try_send(transmit) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                futures::future::poll_fn(|cx| poller.as_mut().poll_writable(cx)).await?;
            }
            other => return other,
        }
    }
}

impl fmt::Debug for FaultSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultSocket")
            .field("local", &self.local)
            .finish()
    }
}

impl AsyncUdpSocket for FaultSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        // We report one segment per transmit, so quinn should never hand us
        // a GSO batch; if it does, every segment meets its own fate.
        match transmit.segment_size {
            Some(size) if size > 0 && transmit.contents.len() > size => {
                // Only the first segment may report WouldBlock (quinn then
                // retries the whole batch); once one segment has left, later
                // failures drop the rest, as a full socket buffer would.
                for (i, chunk) in transmit.contents.chunks(size).enumerate() {
                    let sent = self.send_one(&Transmit {
                        destination: transmit.destination,
                        ecn: transmit.ecn,
                        contents: chunk,
                        segment_size: None,
                        src_ip: transmit.src_ip,
                    });
                    if i == 0 {
                        sent?;
                    }
                }
                Ok(())
            }
            _ => self.send_one(transmit),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.inner.poll_recv(cx, bufs, meta) {
                Poll::Ready(Ok(n)) if self.net.receiver_isolated(self.local) => {
                    // Swallow what arrived and poll again, so the inner
                    // socket registers our waker before we return Pending.
                    self.net
                        .counters
                        .isolated
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                other => return other,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn fates(net: &FaultNet, n: usize) -> Vec<Fate> {
        (0..n).map(|_| net.decide(addr(1), addr(2))).collect()
    }

    #[test]
    fn clean_links_pass_everything_at_once() {
        let net = FaultNet::new(1);
        assert_eq!(
            net.decide(addr(1), addr(2)),
            Fate::Sent(vec![Duration::ZERO])
        );
        assert_eq!(net.counts().datagrams, 1);
        assert_eq!(net.counts().lost, 0);
    }

    #[test]
    fn cut_is_per_direction() {
        let net = FaultNet::new(1);
        net.set_link(
            addr(1),
            addr(2),
            LinkFaults {
                cut: true,
                ..Default::default()
            },
        );
        assert_eq!(net.decide(addr(1), addr(2)), Fate::Dropped);
        assert_eq!(
            net.decide(addr(2), addr(1)),
            Fate::Sent(vec![Duration::ZERO])
        );
        net.clear_links();
        assert_eq!(
            net.decide(addr(1), addr(2)),
            Fate::Sent(vec![Duration::ZERO])
        );
        assert_eq!(net.counts().cut, 1);
    }

    #[test]
    fn loss_rate_is_close_to_the_rule_and_fixed_by_the_seed() {
        let lossy = LinkFaults {
            loss: 0.2,
            ..Default::default()
        };
        let a = FaultNet::new(42);
        a.set_link(addr(1), addr(2), lossy);
        let b = FaultNet::new(42);
        b.set_link(addr(1), addr(2), lossy);
        let fa = fates(&a, 10_000);
        assert_eq!(fa, fates(&b, 10_000), "same seed, same decisions");
        let lost = a.counts().lost;
        assert!((1_800..=2_200).contains(&lost), "lost {lost} of 10000");
        let c = FaultNet::new(43);
        c.set_link(addr(1), addr(2), lossy);
        assert_ne!(fa, fates(&c, 10_000), "another seed, other decisions");
    }

    #[test]
    fn delay_jitter_duplicate_and_reorder() {
        let net = FaultNet::new(7);
        net.set_link(
            addr(1),
            addr(2),
            LinkFaults {
                delay: Duration::from_millis(50),
                jitter: Duration::from_millis(10),
                duplicate: 0.5,
                reorder: 0.25,
                reorder_hold: Duration::from_millis(100),
                ..Default::default()
            },
        );
        let mut copies = 0;
        let mut held = 0;
        for fate in fates(&net, 4_000) {
            let Fate::Sent(delays) = fate else {
                panic!("nothing should drop")
            };
            copies += delays.len();
            for d in delays {
                assert!(d >= Duration::from_millis(50), "{d:?}");
                assert!(d <= Duration::from_millis(160), "{d:?}");
                if d > Duration::from_millis(60) {
                    held += 1;
                }
            }
        }
        let dup = copies - 4_000;
        assert!((1_800..=2_200).contains(&dup), "duplicated {dup} of 4000");
        assert!(
            (held as f64 / copies as f64 - 0.25).abs() < 0.03,
            "held {held} of {copies}"
        );
        let counts = net.counts();
        assert_eq!(counts.duplicated as usize, dup);
        assert_eq!(counts.reordered as usize, held);
        assert_eq!(counts.delayed as usize, copies);
    }

    #[test]
    fn isolation_drops_both_directions() {
        let net = FaultNet::new(1);
        net.isolate(addr(2));
        assert_eq!(net.decide(addr(1), addr(2)), Fate::Dropped);
        assert_eq!(net.decide(addr(2), addr(3)), Fate::Dropped);
        assert_eq!(
            net.decide(addr(1), addr(3)),
            Fate::Sent(vec![Duration::ZERO])
        );
        net.restore(addr(2));
        assert_eq!(
            net.decide(addr(1), addr(2)),
            Fate::Sent(vec![Duration::ZERO])
        );
        assert_eq!(net.counts().isolated, 2);
    }

    /// Real sockets under the layer: what the receiver gets matches the rules.
    mod sockets {
        use std::io::IoSliceMut;

        use futures::future::poll_fn;
        use node::socket::bind_udp;

        use super::*;

        async fn recv(socket: &SharedSocket, wait: Duration) -> Option<Vec<u8>> {
            let mut buf = vec![0u8; 65_536];
            let mut meta = [RecvMeta::default()];
            let fut = poll_fn(|cx| {
                let mut bufs = [IoSliceMut::new(&mut buf)];
                socket.poll_recv(cx, &mut bufs, &mut meta)
            });
            match tokio::time::timeout(wait, fut).await {
                Ok(Ok(_)) => Some(buf[..meta[0].len].to_vec()),
                _ => None,
            }
        }

        fn pair(net: &Arc<FaultNet>) -> (SharedSocket, SharedSocket) {
            let layer = net.layer();
            let a = layer.wrap(bind_udp(addr(0)).unwrap());
            let b = layer.wrap(bind_udp(addr(0)).unwrap());
            (a, b)
        }

        async fn send(
            from: &SharedSocket,
            to: &SharedSocket,
            contents: &[u8],
            segment: Option<usize>,
        ) {
            let transmit = Transmit {
                destination: to.local_addr().unwrap(),
                ecn: None,
                contents,
                segment_size: segment,
                src_ip: None,
            };
            send_when_writable(from, &transmit).await.unwrap();
        }

        #[tokio::test]
        async fn reports_one_segment_and_splits_gso_batches() {
            let net = FaultNet::new(1);
            let (a, b) = pair(&net);
            assert_eq!(a.max_transmit_segments(), 1);
            send(&a, &b, b"aaaabbbbcc", Some(4)).await;
            let wait = Duration::from_secs(2);
            assert_eq!(recv(&b, wait).await.unwrap(), b"aaaa");
            assert_eq!(recv(&b, wait).await.unwrap(), b"bbbb");
            assert_eq!(recv(&b, wait).await.unwrap(), b"cc");
            assert!(net.counts().datagrams >= 3);
        }

        #[tokio::test]
        async fn partition_delay_and_pause_on_real_sockets() {
            let net = FaultNet::new(1);
            let (a, b) = pair(&net);
            let (aa, ba) = (a.local_addr().unwrap(), b.local_addr().unwrap());
            let short = Duration::from_millis(200);

            net.set_link(
                aa,
                ba,
                LinkFaults {
                    cut: true,
                    ..Default::default()
                },
            );
            send(&a, &b, b"cut", None).await;
            assert_eq!(recv(&b, short).await, None, "a→b is cut");
            send(&b, &a, b"back", None).await;
            assert_eq!(recv(&a, short).await.unwrap(), b"back", "b→a still flows");

            net.set_link(
                aa,
                ba,
                LinkFaults {
                    delay: Duration::from_millis(300),
                    ..Default::default()
                },
            );
            let sent = std::time::Instant::now();
            send(&a, &b, b"late", None).await;
            assert_eq!(recv(&b, Duration::from_secs(2)).await.unwrap(), b"late");
            assert!(sent.elapsed() >= Duration::from_millis(290));

            net.clear_links();
            net.isolate(ba);
            // Bypass the sender-side check with an unwrapped socket: the
            // isolated receiver still delivers nothing.
            let raw = bind_udp(addr(0)).unwrap();
            send(&raw, &b, b"in", None).await;
            assert_eq!(recv(&b, short).await, None, "isolated b hears nothing");
            net.restore(ba);
            send(&raw, &b, b"again", None).await;
            assert_eq!(recv(&b, Duration::from_secs(2)).await.unwrap(), b"again");
        }
    }
}
