//! The bridge that carries chitchat's bytes inside QUIC.
//!
//! chitchat 0.13 keeps envelope (de)serialisation private, so a custom
//! transport cannot produce bytes itself. Instead chitchat keeps its own UDP
//! socket, bound to a loopback-only port, and each remote peer gets a loopback
//! *relay* socket:
//!
//! ```text
//! chitchat ──udp(lo)──▶ relay[P] ──QUIC msg──▶ peer P ──▶ relay[us] on P ──udp(lo)──▶ chitchat on P
//! ```
//!
//! [`RelayTransport`] wraps chitchat's socket so that chitchat still speaks in
//! peers' real QUIC addresses: a send to P goes to relay[P]; a datagram
//! arriving from relay[P] is reported as coming from P. Relays accept bytes
//! only from our chitchat socket, and chitchat accepts bytes only from our
//! relays, so no other local process can inject gossip.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as ChitchatUdp};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use transport::Endpoint;

use crate::guard::{Guard, Screen};

/// Gossip traffic counters (bytes are chitchat payload bytes).
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Gossip messages sent to peers.
    pub messages_out: AtomicU64,
    /// Gossip messages received from peers.
    pub messages_in: AtomicU64,
    /// Gossip bytes sent.
    pub bytes_out: AtomicU64,
    /// Gossip bytes received.
    pub bytes_in: AtomicU64,
    /// Messages that could not be delivered to a peer (dial failed...).
    pub send_failures: AtomicU64,
}

struct Relay {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
    used: Instant,
}

/// A relay unused for this long is closed (a peer that went away for good;
/// it is made again on the next message either way).
const RELAY_IDLE: Duration = Duration::from_secs(300);

/// The relay sockets, one per remote peer.
pub(crate) struct Relays {
    endpoint: Endpoint,
    chitchat_addr: Mutex<Option<SocketAddr>>,
    by_peer: Mutex<HashMap<SocketAddr, Relay>>,
    by_relay: Mutex<HashMap<SocketAddr, SocketAddr>>,
    pub(crate) stats: RelayStats,
    self_addr: SocketAddr,
    guard: Arc<Guard>,
    inbound_done: std::sync::atomic::AtomicBool,
    /// The transport channel this pool travels on.
    channel: u8,
}

impl Relays {
    pub(crate) fn new(endpoint: Endpoint, guard: Arc<Guard>, channel: u8) -> Arc<Self> {
        let self_addr = endpoint.local_addr();
        Arc::new(Relays {
            endpoint,
            chitchat_addr: Mutex::new(None),
            by_peer: Mutex::new(HashMap::new()),
            by_relay: Mutex::new(HashMap::new()),
            stats: RelayStats::default(),
            self_addr,
            guard,
            inbound_done: std::sync::atomic::AtomicBool::new(false),
            channel,
        })
    }

    /// Starts moving gossip that arrives over QUIC into chitchat, through
    /// the [`Guard`]: only what verifies reaches chitchat, one message at a
    /// time. Verifying signatures, and reading anything large, runs on the
    /// blocking pool, so a flood of expensive messages never occupies the
    /// node's async workers; a small message without node deltas (most of
    /// a settled pool's rounds) is judged in place ([`Guard::screen`]).
    pub(crate) fn spawn_inbound(self: &Arc<Self>) -> JoinHandle<()> {
        let mut rx = self.endpoint.subscribe(self.channel, 1024);
        let weak = Arc::downgrade(self);
        let guard = self.guard.clone();
        tokio::spawn(async move {
            let mut in_place = InPlace::default();
            while let Some(msg) = rx.recv().await {
                let Some(relays) = weak.upgrade() else { return };
                let Some(chitchat) = *relays.chitchat_addr.lock().unwrap() else {
                    continue;
                };
                relays.stats.messages_in.fetch_add(1, Ordering::Relaxed);
                relays
                    .stats
                    .bytes_in
                    .fetch_add(msg.payload.len() as u64, Ordering::Relaxed);
                let payload = msg.payload;
                let sender = &msg.from.peer.node;
                // A small message without node deltas is judged here; the
                // rest (signatures to check, or much to decompress) on the
                // blocking pool, so that a hand-off to another thread and
                // back is paid only where it protects this one.
                let screened = if in_place.take(Instant::now()) {
                    guard.screen(sender, &payload)
                } else {
                    Screen::Full
                };
                let judged = match screened {
                    Screen::Done(out) => out,
                    Screen::Verify(read) => {
                        let (guard, sender) = (guard.clone(), sender.clone());
                        tokio::task::spawn_blocking(move || guard.admit(&sender, &payload, read))
                            .await
                            .ok()
                            .flatten()
                    }
                    Screen::Full => {
                        let (guard, sender) = (guard.clone(), sender.clone());
                        tokio::task::spawn_blocking(move || guard.filter(&sender, &payload))
                            .await
                            .ok()
                            .flatten()
                    }
                };
                let Some(bytes) = judged else {
                    continue;
                };
                let Ok(socket) = relays.relay_for(msg.from.addr()) else {
                    continue;
                };
                if let Err(e) = socket.send_to(&bytes, chitchat).await {
                    tracing::warn!(error = %e, bytes = bytes.len(), "gossip hand-off to chitchat failed");
                }
            }
            if let Some(relays) = weak.upgrade() {
                relays.inbound_done.store(true, Ordering::Relaxed);
            }
        })
    }

    /// Whether the inbound loop ended (the endpoint closed).
    pub(crate) fn inbound_stopped(&self) -> bool {
        self.inbound_done.load(Ordering::Relaxed)
    }

    /// The relay socket standing for `peer`, made on first use.
    fn relay_for(self: &Arc<Self>, peer: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
        let mut by_peer = self.by_peer.lock().unwrap();
        if let Some(r) = by_peer.get_mut(&peer) {
            r.used = Instant::now();
            return Ok(r.socket.clone());
        }
        if by_peer.len() % 64 == 63 {
            self.close_idle(&mut by_peer);
        }
        let std = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        std.set_nonblocking(true)?;
        let socket = Arc::new(UdpSocket::from_std(std)?);
        let local = socket.local_addr()?;
        let task = tokio::spawn(relay_outbound(Arc::downgrade(self), socket.clone(), peer));
        by_peer.insert(
            peer,
            Relay {
                socket: socket.clone(),
                task,
                used: Instant::now(),
            },
        );
        self.by_relay.lock().unwrap().insert(local, peer);
        Ok(socket)
    }

    /// Closes relays idle for [`RELAY_IDLE`] (checked as relays are added,
    /// so the set stays bounded by the peers seen recently).
    fn close_idle(&self, by_peer: &mut HashMap<SocketAddr, Relay>) {
        let mut by_relay = self.by_relay.lock().unwrap();
        by_peer.retain(|_, r| {
            let keep = r.used.elapsed() < RELAY_IDLE;
            if !keep {
                r.task.abort();
                if let Ok(local) = r.socket.local_addr() {
                    by_relay.remove(&local);
                }
            }
            keep
        });
    }

    fn peer_of(&self, relay: SocketAddr) -> Option<SocketAddr> {
        self.by_relay.lock().unwrap().get(&relay).copied()
    }

    /// Stops every relay task.
    pub(crate) fn shutdown(&self) {
        for (_, r) in self.by_peer.lock().unwrap().drain() {
            r.task.abort();
        }
        self.by_relay.lock().unwrap().clear();
    }
}

/// How many messages a second may be judged on the node's own thread. A
/// settled pool brings a node a few dozen a second (about 20 with one peer at
/// the 300 ms interval, a few more per extra peer chitchat picks); past this,
/// in a flood or a burst of joins, the rest go to the blocking pool as they
/// all did before, so each pool's gossip (a zone representative has two
/// pools) can take at most this many small judgements a second from the
/// data plane's thread.
pub(crate) const IN_PLACE_PER_SECOND: u32 = 200;

/// The in-place allowance, counted per wall-clock second.
#[derive(Debug, Default)]
struct InPlace {
    window: Option<Instant>,
    used: u32,
}

impl InPlace {
    /// Whether one more message may be judged in place at `now`.
    fn take(&mut self, now: Instant) -> bool {
        match self.window {
            Some(start) if now.duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.window = Some(now);
                self.used = 0;
            }
        }
        if self.used < IN_PLACE_PER_SECOND {
            self.used += 1;
            true
        } else {
            false
        }
    }
}

/// Moves what chitchat sends to relay[peer] over QUIC to `peer`.
async fn relay_outbound(weak: std::sync::Weak<Relays>, socket: Arc<UdpSocket>, peer: SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            return;
        };
        let Some(relays) = weak.upgrade() else { return };
        if Some(from) != *relays.chitchat_addr.lock().unwrap() {
            continue;
        }
        if peer == relays.self_addr {
            continue;
        }
        match relays
            .endpoint
            .send_message(peer, relays.channel, &buf[..n])
            .await
        {
            Ok(()) => {
                relays.stats.messages_out.fetch_add(1, Ordering::Relaxed);
                relays
                    .stats
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => {
                relays.stats.send_failures.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(%peer, error = %e, "gossip send failed");
            }
        }
    }
}

/// A chitchat transport whose socket talks to peers through [`Relays`].
pub(crate) struct RelayTransport {
    pub(crate) relays: Arc<Relays>,
}

#[async_trait]
impl Transport for RelayTransport {
    async fn open(&self, _listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        // chitchat's own socket never leaves loopback, whatever it was told.
        let inner = ChitchatUdp::open((Ipv4Addr::LOCALHOST, 0).into()).await?;
        *self.relays.chitchat_addr.lock().unwrap() = Some(inner.local_addr()?);
        Ok(Box::new(RelaySocket {
            inner,
            relays: self.relays.clone(),
        }))
    }
}

struct RelaySocket {
    inner: ChitchatUdp,
    relays: Arc<Relays>,
}

#[async_trait]
impl Socket for RelaySocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.relays.self_addr)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        if to == self.relays.self_addr {
            return Ok(SendOutcome { num_bytes_sent: 0 });
        }
        let relay = self.relays.relay_for(to)?.local_addr()?;
        self.inner.send(relay, envelope).await
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let mut out = self.inner.recv().await?;
            if let Some(peer) = self.relays.peer_of(out.from_addr) {
                out.from_addr = peer;
                return Ok(out);
            }
            tracing::debug!(from = %out.from_addr, "dropped gossip from a non-relay local socket");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_the_allowance_is_judged_in_place_each_second() {
        let mut a = InPlace::default();
        let t0 = Instant::now();
        let granted = (0..1000).filter(|_| a.take(t0)).count();
        assert_eq!(granted, 200);
        assert!(!a.take(t0 + Duration::from_millis(999)));
        // A new second brings a new allowance.
        assert!(a.take(t0 + Duration::from_millis(1000)));
        let more = (0..1000)
            .filter(|_| a.take(t0 + Duration::from_millis(1500)))
            .count();
        assert_eq!(more, 199);
    }
}
