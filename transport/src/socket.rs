//! The UDP socket seam under QUIC.
//!
//! The endpoint never binds its own socket: it asks for a [`SharedSocket`],
//! and an optional [`SocketLayer`] may wrap it first. `simulate` plugs in a
//! layer that drops, delays, duplicates or cuts packets per link; production
//! runs with no layer.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use quinn::udp::{BATCH_SIZE, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::endpoint::EndpointStats;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// A socket as quinn sees it.
pub type SharedSocket = Arc<dyn AsyncUdpSocket>;

/// Wraps the endpoint's real socket (fault injection, capture, accounting).
pub trait SocketLayer: Send + Sync + 'static {
    /// Returns the socket the endpoint will use in place of `inner`.
    fn wrap(&self, inner: SharedSocket) -> SharedSocket;
}

/// Binds a UDP socket on `addr` for use under quinn on the tokio runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<SharedSocket> {
    bind_udp_counted(addr, Arc::default())
}

/// [`bind_udp`], counting blocked sends in `stats`
/// ([`EndpointStats::udp_sends_blocked`]).
pub(crate) fn bind_udp_counted(
    addr: SocketAddr,
    stats: Arc<EndpointStats>,
) -> io::Result<SharedSocket> {
    Ok(Arc::new(UdpSocket::new(
        std::net::UdpSocket::bind(addr)?,
        stats,
    )?))
}

/// The endpoint's UDP socket, registered with the reactor for reading only.
///
/// quinn's own tokio socket registers for reading and writing, so every
/// datagram sent woke the reactor once more when the send buffer drained (an
/// `epoll_wait` a send, measured in `docs/PROXY.md`), and it read until the
/// socket said it was empty (a `recvmmsg` a wake-up that found nothing).
/// Here a send is tried straight away and only after a send that would
/// block does a sender wait for writability, on a registration of its own
/// made for that wait; and a read that returns fewer datagrams than it asked
/// for has drained the socket, so the readiness it was woken for is
/// forgotten without another read.
#[derive(Debug)]
struct UdpSocket {
    io: AsyncFd<std::net::UdpSocket>,
    state: UdpSocketState,
    /// A send found the send buffer full, and no wait has seen it writable
    /// since. quinn asks its poller before every send; until this is set the
    /// answer is "yes" with no system call.
    blocked: AtomicBool,
    stats: Arc<EndpointStats>,
}

impl UdpSocket {
    fn new(socket: std::net::UdpSocket, stats: Arc<EndpointStats>) -> io::Result<UdpSocket> {
        let state = UdpSocketState::new((&socket).into())?;
        socket.set_nonblocking(true)?;
        Ok(UdpSocket {
            io: register(socket, Interest::READABLE)?,
            state,
            blocked: AtomicBool::new(false),
            stats,
        })
    }
}

impl AsyncUdpSocket for UdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(WritablePoller {
            socket: self,
            waiting: None,
        })
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let sent = self.state.send(self.io.get_ref().into(), transmit);
        if let Err(e) = &sent
            && e.kind() == io::ErrorKind::WouldBlock
        {
            // quinn keeps the datagram and asks the poller again, which now
            // waits for writability.
            self.blocked.store(true, Ordering::Release);
            self.stats.udp_sends_blocked.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let asked = bufs.len().min(BATCH_SIZE);
        loop {
            let mut guard = ready!(self.io.poll_read_ready(cx))?;
            match guard.try_io(|io| self.state.recv(io.get_ref().into(), bufs, meta)) {
                Ok(Ok(n)) => {
                    if n < asked {
                        // Drained: clears only the readiness this read was
                        // woken for, so a datagram that came after it still
                        // wakes the endpoint.
                        guard.clear_ready();
                    }
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // `WouldBlock`: readiness cleared; wait for the next.
                Err(_) => continue,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.get_ref().local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }
}

/// Registers `socket` with the reactor for `interest` alone.
///
/// tokio deprecates the safe constructor because an `AsRawFd` type could
/// hand it a descriptor that is closed or replaced while registered. A
/// `std::net::UdpSocket` owned by the `AsyncFd` cannot be: its descriptor is
/// fixed and closes only when the `AsyncFd` drops it, after deregistering.
#[allow(deprecated)]
fn register(
    socket: std::net::UdpSocket,
    interest: Interest,
) -> io::Result<AsyncFd<std::net::UdpSocket>> {
    AsyncFd::with_interest(socket, interest)
}

/// Waits, for one task, until the socket can take a send again.
///
/// quinn polls this before every datagram it sends. While no send has found
/// the buffer full it answers at once, with no system call: registering for
/// writability each time (as this did at first) cost a `dup`, two
/// `epoll_ctl`, a `close` and one more reactor turn per datagram. After a
/// send would block, a second descriptor of the socket is registered for
/// writing, waited on, and dropped (deregistered) once the socket is
/// writable again.
#[derive(Debug)]
struct WritablePoller {
    socket: Arc<UdpSocket>,
    waiting: Option<AsyncFd<std::net::UdpSocket>>,
}

impl UdpPoller for WritablePoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.waiting.is_none() && !this.socket.blocked.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        if this.waiting.is_none() {
            let dup = this.socket.io.get_ref().try_clone()?;
            this.waiting = Some(register(dup, Interest::WRITABLE)?);
        }
        let ready = match this
            .waiting
            .as_ref()
            .expect("set above")
            .poll_write_ready(cx)
        {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(r) => r.map(drop),
        };
        this.waiting = None;
        this.socket.blocked.store(false, Ordering::Release);
        Poll::Ready(ready)
    }
}

impl std::fmt::Debug for dyn SocketLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketLayer")
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(5);

    fn socket() -> Arc<UdpSocket> {
        Arc::new(
            UdpSocket::new(
                std::net::UdpSocket::bind("127.0.0.1:0").unwrap(),
                Arc::default(),
            )
            .unwrap(),
        )
    }

    /// Receives one batch from `socket` (waiting at most [`DEADLINE`]): the
    /// datagrams' contents, in order.
    async fn recv_batch(socket: &UdpSocket) -> Vec<Vec<u8>> {
        let mut storage = vec![[0u8; 1500]; BATCH_SIZE];
        let mut bufs: Vec<IoSliceMut<'_>> =
            storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
        let mut meta = vec![RecvMeta::default(); BATCH_SIZE];
        let n = tokio::time::timeout(
            DEADLINE,
            poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
        )
        .await
        .expect("no datagram within the deadline")
        .unwrap();
        (0..n).map(|i| bufs[i][..meta[i].len].to_vec()).collect()
    }

    fn readable_now(socket: &UdpSocket) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        socket.io.poll_read_ready(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn each_datagram_after_a_drained_read_still_wakes_the_reader() {
        let rx = socket();
        let to = rx.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..200u32 {
            tx.send_to(&i.to_be_bytes(), to).unwrap();
            let got = recv_batch(&rx).await;
            assert_eq!(got, vec![i.to_be_bytes().to_vec()]);
            // One datagram of a batch of many: the socket is empty, and its
            // readiness went with the read that emptied it.
            assert!(!readable_now(&rx), "datagram {i}: still marked readable");
        }
    }

    #[tokio::test]
    async fn a_burst_over_one_batch_is_read_whole_and_in_order() {
        let rx = socket();
        let to = rx.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let count = 3 * BATCH_SIZE as u32 + 5;
        for i in 0..count {
            tx.send_to(&i.to_be_bytes(), to).unwrap();
        }
        let mut got = Vec::new();
        while got.len() < count as usize {
            got.extend(recv_batch(&rx).await);
        }
        let want: Vec<Vec<u8>> = (0..count).map(|i| i.to_be_bytes().to_vec()).collect();
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn sends_go_out_and_a_sender_that_never_blocked_is_answered_at_once() {
        let tx = socket();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(DEADLINE)).unwrap();
        let transmit = Transmit {
            destination: rx.local_addr().unwrap(),
            ecn: None,
            contents: b"over",
            segment_size: None,
            src_ip: None,
        };
        tx.try_send(&transmit).unwrap();
        let mut buf = [0u8; 16];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"over"[..], tx.local_addr().unwrap()));
        // No send has blocked: the poller answers at once, without
        // registering anything with the reactor.
        let mut poller = WritablePoller {
            socket: tx.clone(),
            waiting: None,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..3 {
            tx.try_send(&transmit).unwrap();
            assert!(matches!(
                Pin::new(&mut poller).poll_writable(&mut cx),
                Poll::Ready(Ok(()))
            ));
            assert!(
                poller.waiting.is_none(),
                "registered for a send that never blocked"
            );
        }
    }

    #[tokio::test]
    async fn after_a_blocked_send_the_poller_waits_until_writable_then_answers_at_once() {
        let tx = socket();
        let mut poller = tx.clone().create_io_poller();
        for round in 0..3 {
            // What `try_send` records when the send buffer is full (a
            // loopback UDP send never fills it, so the test sets it).
            tx.blocked.store(true, Ordering::Release);
            tokio::time::timeout(DEADLINE, poll_fn(|cx| poller.as_mut().poll_writable(cx)))
                .await
                .unwrap_or_else(|_| panic!("round {round}: an idle socket never became writable"))
                .unwrap();
            assert!(
                !tx.blocked.load(Ordering::Acquire),
                "round {round}: still marked blocked after the wait"
            );
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(poller.as_mut().poll_writable(&mut cx).is_ready());
        }
    }
}
