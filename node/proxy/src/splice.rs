//! A bidirectional byte pump between a local byte stream (a TCP socket, an
//! upgraded HTTP connection; anything `AsyncRead` + `AsyncWrite`, given as
//! two halves) and one QUIC bidirectional stream.
//!
//! Bytes move in both directions as they arrive, so a server that speaks
//! first works. Half-close is carried both ways: end of file on the local
//! side finishes the QUIC send side; the QUIC stream finishing shuts down the
//! local write side, and the other direction carries on. Each direction holds
//! at most one buffer of `buffer` bytes: a reader that does not read makes
//! the writer wait (QUIC flow control on one side, TCP's window on the
//! other), never makes the node buffer more. No byte either way for the idle
//! timeout ends the splice. A reset on either side ends it promptly and is
//! passed on: the QUIC stream is reset and stopped; the local side is left
//! for the caller to abort (for a `TcpStream`, [`abort_tcp`] sends an RST).
//!
//! This module owns only the pump; it knows nothing of heads, routing or
//! authorization.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quinn::{ReadError, RecvStream, SendStream, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Stream reset / stop code: the local side of the splice was reset or failed.
pub const RESET_LOCAL: u32 = 0x10;
/// Stream reset / stop code: the splice went idle for its idle timeout.
pub const RESET_IDLE: u32 = 0x11;
/// Stream reset / stop code: the splice was abandoned (cancelled, shut down).
pub const RESET_ABANDONED: u32 = 0x12;
/// Default largest piece moved at once, per direction (64 KiB).
pub const DEFAULT_BUFFER: usize = 64 * 1024;

/// Which side of a splice something happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The local byte stream (the app's TCP connection).
    Local,
    /// The QUIC stream (the peer node, or the connection to it).
    Mesh,
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions reached end of file and everything was handed on.
    Clean,
    /// No byte moved either way for the idle timeout.
    Idle,
    /// One side was reset (TCP RST, QUIC stream reset or stopped, QUIC
    /// connection lost).
    Reset(Side),
    /// One side failed otherwise (an I/O error that is not a reset).
    Error(Side),
}

impl Outcome {
    /// A short label for metrics and logs: `clean`, `idle`, `reset`, `error`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::Idle => "idle",
            Outcome::Reset(_) => "reset",
            Outcome::Error(_) => "error",
        }
    }

    /// Whether both directions ended cleanly.
    pub fn is_clean(&self) -> bool {
        matches!(self, Outcome::Clean)
    }
}

/// What a finished splice did.
#[derive(Debug, Clone)]
pub struct Spliced {
    /// Bytes read from the local side and written to the QUIC stream.
    pub local_to_mesh: u64,
    /// Bytes read from the QUIC stream (including prefetched ones) and
    /// written to the local side.
    pub mesh_to_local: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The error behind a `Reset` or `Error` outcome, for logs.
    pub detail: Option<String>,
    /// How long the splice ran.
    pub duration: Duration,
}

/// Settings for one splice.
#[derive(Debug, Clone)]
pub struct Splice {
    idle_timeout: Duration,
    buffer: usize,
    prefetched: Bytes,
}

impl Splice {
    /// A splice that ends after `idle_timeout` without a byte either way.
    pub fn new(idle_timeout: Duration) -> Self {
        Splice {
            // A far-off deadline must not overflow `Instant`.
            idle_timeout: idle_timeout.min(Duration::from_secs(100 * 365 * 86_400)),
            buffer: DEFAULT_BUFFER,
            prefetched: Bytes::new(),
        }
    }

    /// The largest piece moved at once per direction (default
    /// [`DEFAULT_BUFFER`]; at least 1 KiB).
    pub fn buffer(mut self, bytes: usize) -> Self {
        self.buffer = bytes.max(1024);
        self
    }

    /// Bytes already read from the QUIC receive stream (after a head) that
    /// belong to the spliced data: they are written to the local side first.
    pub fn prefetched(mut self, bytes: Bytes) -> Self {
        self.prefetched = bytes;
        self
    }

    /// Pumps bytes between `local_read`/`local_write` and `send`/`recv`
    /// until both directions end, the splice goes idle, or a side fails.
    ///
    /// The halves are taken by value; pass `&mut` halves to keep the socket
    /// (to abort it after a non-clean outcome). On a non-clean outcome the
    /// QUIC stream is reset and stopped before this returns; the local side
    /// is not shut down (a FIN would look like a clean end), so the caller
    /// should abort or drop it. Dropping the returned future resets the
    /// QUIC stream too.
    pub async fn run<R, W>(
        self,
        local_read: R,
        local_write: W,
        send: SendStream,
        recv: RecvStream,
    ) -> Spliced
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let start = Instant::now();
        let mut send = ResetOnDrop(Some(send));
        let mut recv = StopOnDrop(Some(recv));
        let counters = Counters::default();
        let (outcome, detail, send_done, recv_done) = {
            let up = pump_up(local_read, send.stream(), self.buffer, &counters, start);
            let down = pump_down(
                local_write,
                recv.stream(),
                self.prefetched,
                self.buffer,
                &counters,
                start,
            );
            drive(up, down, &counters, start, self.idle_timeout).await
        };
        if !outcome.is_clean() {
            let code = match outcome {
                Outcome::Idle => RESET_IDLE,
                Outcome::Reset(Side::Mesh) | Outcome::Error(Side::Mesh) => RESET_ABANDONED,
                _ => RESET_LOCAL,
            };
            if !send_done || matches!(outcome, Outcome::Reset(_) | Outcome::Error(_)) {
                send.reset(code);
            }
            if !recv_done {
                recv.stop(code);
            }
        }
        send.release();
        recv.release();
        Spliced {
            local_to_mesh: counters.up.load(Ordering::Relaxed),
            mesh_to_local: counters.down.load(Ordering::Relaxed),
            outcome,
            detail,
            duration: start.elapsed(),
        }
    }

    /// [`Splice::run`] over one `AsyncRead + AsyncWrite` value, split here.
    pub async fn run_io<T>(self, io: T, send: SendStream, recv: RecvStream) -> Spliced
    where
        T: AsyncRead + AsyncWrite,
    {
        let (r, w) = tokio::io::split(io);
        self.run(r, w, send, recv).await
    }
}

/// Closes a TCP connection with an RST (`SO_LINGER` 0), so the app sees a
/// reset rather than a clean end of file. Used after a non-clean splice.
pub fn abort_tcp(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// How one direction ended.
enum End {
    /// End of file, passed on.
    Eof,
    /// A side failed.
    Failed(Outcome, String),
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    /// Nanoseconds from the start to the last byte moved either way.
    last: AtomicU64,
}

impl Counters {
    fn touch(&self, start: Instant) {
        let now = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    fn last(&self, start: Instant) -> Instant {
        start + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Runs both directions and the idle timer; returns the outcome, its
/// detail, and whether the send and receive sides ended (EOF passed on).
async fn drive<U, D>(
    up: U,
    down: D,
    counters: &Counters,
    start: Instant,
    idle_timeout: Duration,
) -> (Outcome, Option<String>, bool, bool)
where
    U: std::future::Future<Output = End>,
    D: std::future::Future<Output = End>,
{
    let mut up = std::pin::pin!(up);
    let mut down = std::pin::pin!(down);
    let idle = tokio::time::sleep(idle_timeout);
    let mut idle = std::pin::pin!(idle);
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            e = &mut up, if !up_done => match e {
                End::Eof => up_done = true,
                End::Failed(o, d) => return (o, Some(d), up_done, down_done),
            },
            e = &mut down, if !down_done => match e {
                End::Eof => down_done = true,
                End::Failed(o, d) => return (o, Some(d), up_done, down_done),
            },
            _ = &mut idle => {
                let deadline = counters.last(start) + idle_timeout;
                if tokio::time::Instant::from_std(deadline) <= tokio::time::Instant::now() {
                    return (Outcome::Idle, None, up_done, down_done);
                }
                idle.as_mut().reset(tokio::time::Instant::from_std(deadline));
            }
        }
        if up_done && down_done {
            return (Outcome::Clean, None, true, true);
        }
    }
}

/// Local side → QUIC send side. Also watches for the peer stopping the
/// stream while the local side is quiet.
async fn pump_up<R: AsyncRead + Unpin>(
    mut local: R,
    send: &mut SendStream,
    buffer: usize,
    counters: &Counters,
    start: Instant,
) -> End {
    let mut stopped = std::pin::pin!(send.stopped());
    let mut buf = vec![0u8; buffer];
    loop {
        let n = tokio::select! {
            r = local.read(&mut buf) => match r {
                Ok(n) => n,
                Err(e) => return End::Failed(local_failure(&e), format!("local read: {e}")),
            },
            r = &mut stopped => return End::Failed(
                Outcome::Reset(Side::Mesh),
                match r {
                    Ok(Some(code)) => format!("peer stopped the stream (code {code})"),
                    Ok(None) => "peer closed the stream".to_string(),
                    Err(e) => format!("stream: {e}"),
                },
            ),
        };
        if n == 0 {
            return match send.finish() {
                Ok(()) => End::Eof,
                Err(e) => End::Failed(Outcome::Reset(Side::Mesh), format!("finish: {e}")),
            };
        }
        if let Err(e) = send.write_all(&buf[..n]).await {
            return End::Failed(write_failure(&e), format!("mesh write: {e}"));
        }
        counters.up.fetch_add(n as u64, Ordering::Relaxed);
        counters.touch(start);
    }
}

/// QUIC receive side → local side.
async fn pump_down<W: AsyncWrite + Unpin>(
    mut local: W,
    recv: &mut RecvStream,
    prefetched: Bytes,
    buffer: usize,
    counters: &Counters,
    start: Instant,
) -> End {
    if !prefetched.is_empty() {
        if let Err(e) = write_local(&mut local, &prefetched).await {
            return End::Failed(local_failure(&e), format!("local write: {e}"));
        }
        counters
            .down
            .fetch_add(prefetched.len() as u64, Ordering::Relaxed);
        counters.touch(start);
    }
    loop {
        match recv.read_chunk(buffer, true).await {
            Ok(Some(chunk)) => {
                if let Err(e) = write_local(&mut local, &chunk.bytes).await {
                    return End::Failed(local_failure(&e), format!("local write: {e}"));
                }
                counters
                    .down
                    .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                counters.touch(start);
            }
            Ok(None) => {
                return match local.shutdown().await {
                    Ok(()) => End::Eof,
                    Err(e) => End::Failed(local_failure(&e), format!("local shutdown: {e}")),
                };
            }
            Err(e) => return End::Failed(read_failure(&e), format!("mesh read: {e}")),
        }
    }
}

async fn write_local<W: AsyncWrite + Unpin>(local: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    local.write_all(bytes).await?;
    local.flush().await
}

fn local_failure(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | UnexpectedEof => {
            Outcome::Reset(Side::Local)
        }
        _ => Outcome::Error(Side::Local),
    }
}

fn write_failure(e: &WriteError) -> Outcome {
    match e {
        WriteError::Stopped(_) | WriteError::ConnectionLost(_) | WriteError::ClosedStream => {
            Outcome::Reset(Side::Mesh)
        }
        _ => Outcome::Error(Side::Mesh),
    }
}

fn read_failure(e: &ReadError) -> Outcome {
    match e {
        ReadError::Reset(_) | ReadError::ConnectionLost(_) | ReadError::ClosedStream => {
            Outcome::Reset(Side::Mesh)
        }
        _ => Outcome::Error(Side::Mesh),
    }
}

/// A send stream that is reset (not implicitly finished, as quinn does on
/// drop) if the splice is dropped before it ends.
struct ResetOnDrop(Option<SendStream>);

impl ResetOnDrop {
    fn stream(&mut self) -> &mut SendStream {
        self.0.as_mut().expect("present until released")
    }

    fn reset(&mut self, code: u32) {
        if let Some(s) = self.0.as_mut() {
            let _ = s.reset(VarInt::from_u32(code));
        }
    }

    /// Drops the stream as it is (finished or reset already).
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        self.reset(RESET_ABANDONED);
    }
}

/// A receive stream that is stopped if the splice is dropped before it ends.
struct StopOnDrop(Option<RecvStream>);

impl StopOnDrop {
    fn stream(&mut self) -> &mut RecvStream {
        self.0.as_mut().expect("present until released")
    }

    fn stop(&mut self, code: u32) {
        if let Some(r) = self.0.as_mut() {
            let _ = r.stop(VarInt::from_u32(code));
        }
    }

    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.stop(RESET_ABANDONED);
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use tokio::net::{TcpListener, TcpSocket};
    use tokio::sync::mpsc;
    use transport::certs::{Ca, Validity, write_node_dir};
    use transport::{BiStream, Endpoint, EndpointConfig, TlsFiles};

    use super::*;

    const WAIT: Duration = Duration::from_secs(20);

    /// Two real QUIC endpoints on 127.0.0.1 with certificates from one CA.
    struct Pair {
        _dir: tempfile::TempDir,
        caller: Endpoint,
        server: Endpoint,
        streams: mpsc::Receiver<BiStream>,
    }

    impl Pair {
        fn new() -> Pair {
            transport::install_crypto_provider();
            let dir = tempfile::tempdir().unwrap();
            let ca = Ca::generate("t.shoal", 1).unwrap();
            let bind = |name: &str| {
                let cert = ca
                    .issue(name, &["db".to_string()], Validity::days(1))
                    .unwrap();
                let d = dir.path().join(name);
                write_node_dir(&d, &ca.cert_pem(), &cert, false).unwrap();
                let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
                Endpoint::bind(EndpointConfig::new(addr, TlsFiles::new(d))).unwrap()
            };
            let caller = bind("a");
            let server = bind("b");
            let streams = server.take_bi_streams().unwrap();
            Pair {
                _dir: dir,
                caller,
                server,
                streams,
            }
        }

        /// Opens a stream from the caller and accepts it on the server (a
        /// marker byte makes it visible, as a kind byte does in the proxy).
        async fn open(&mut self) -> (SendStream, RecvStream, SendStream, RecvStream) {
            let (_, mut s, r) = self.caller.open_bi(self.server.local_addr()).await.unwrap();
            s.write_all(&[0x02]).await.unwrap();
            let mut bi = tokio::time::timeout(WAIT, self.streams.recv())
                .await
                .unwrap()
                .unwrap();
            let mut b = [0u8; 1];
            bi.recv.read_exact(&mut b).await.unwrap();
            assert_eq!(b, [0x02]);
            (s, r, bi.send, bi.recv)
        }
    }

    /// A TCP connection pair on 127.0.0.1 (the "app" end, the "node" end),
    /// with small kernel buffers when `small` is set.
    async fn tcp_pair(small: bool) -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sock = TcpSocket::new_v4().unwrap();
        if small {
            sock.set_send_buffer_size(64 << 10).unwrap();
            sock.set_recv_buffer_size(64 << 10).unwrap();
        }
        let (a, b) = tokio::join!(sock.connect(l.local_addr().unwrap()), l.accept());
        let (a, b) = (a.unwrap(), b.unwrap().0);
        (a, b)
    }

    /// client app <-tcp-> [splice A] <-quic-> [splice B] <-tcp-> server app.
    /// Returns the client app's socket, the server app's socket and both
    /// splices' results.
    struct Chain {
        client: TcpStream,
        server: TcpStream,
        a: tokio::task::JoinHandle<Spliced>,
        b: tokio::task::JoinHandle<Spliced>,
    }

    async fn chain(pair: &mut Pair, splice: Splice, small: bool) -> Chain {
        let (cs, cr, ss, sr) = pair.open().await;
        let (client, node_a) = tcp_pair(small).await;
        let (server, node_b) = tcp_pair(small).await;
        let sa = splice.clone();
        let a = tokio::spawn(async move {
            let mut node_a = node_a;
            let (r, w) = node_a.split();
            sa.run(r, w, cs, cr).await
        });
        let b = tokio::spawn(async move { splice.run_io(node_b, ss, sr).await });
        Chain {
            client,
            server,
            a,
            b,
        }
    }

    async fn done(h: tokio::task::JoinHandle<Spliced>) -> Spliced {
        tokio::time::timeout(WAIT, h)
            .await
            .expect("splice ends in time")
            .unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn half_close_echo_carries_bytes_and_ends_clean() {
        let mut pair = Pair::new();
        let mut c = chain(&mut pair, Splice::new(Duration::from_secs(60)), false).await;
        let data = pattern(3 << 20);
        let server = tokio::spawn(async move {
            // Reads until the client's end of file, then answers everything.
            let mut got = Vec::new();
            c.server.read_to_end(&mut got).await.unwrap();
            c.server.write_all(&got).await.unwrap();
            c.server.shutdown().await.unwrap();
            got.len()
        });
        let (mut rd, mut wr) = c.client.split();
        let sent = data.clone();
        let write = async move {
            wr.write_all(&sent).await.unwrap();
            wr.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let read = rd.read_to_end(&mut back);
        let (_, r) = tokio::time::timeout(WAIT, async { tokio::join!(write, read) })
            .await
            .unwrap();
        r.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "echoed bytes differ");
        assert_eq!(server.await.unwrap(), data.len());
        let (a, b) = (done(c.a).await, done(c.b).await);
        assert_eq!(a.outcome, Outcome::Clean, "{a:?}");
        assert_eq!(b.outcome, Outcome::Clean, "{b:?}");
        assert_eq!(a.local_to_mesh, data.len() as u64);
        assert_eq!(a.mesh_to_local, data.len() as u64);
        assert_eq!(b.mesh_to_local, data.len() as u64);
        assert_eq!(b.local_to_mesh, data.len() as u64);
    }

    #[tokio::test]
    async fn server_speaks_first() {
        let mut pair = Pair::new();
        let mut c = chain(&mut pair, Splice::new(Duration::from_secs(60)), false).await;
        c.server.write_all(b"220 banner ready\r\n").await.unwrap();
        let mut buf = [0u8; 18];
        tokio::time::timeout(WAIT, c.client.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"220 banner ready\r\n");
        // Then a reply the other way, and the server closes: the client sees EOF.
        c.client.write_all(b"HELO\r\n").await.unwrap();
        let mut buf = [0u8; 6];
        c.server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HELO\r\n");
        drop(c.server);
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, c.client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert!(rest.is_empty());
        drop(c.client);
        let (a, b) = (done(c.a).await, done(c.b).await);
        assert_eq!(a.outcome, Outcome::Clean, "{a:?}");
        assert_eq!(b.outcome, Outcome::Clean, "{b:?}");
        assert_eq!((a.mesh_to_local, a.local_to_mesh), (18, 6));
    }

    #[tokio::test]
    async fn prefetched_bytes_come_first() {
        let mut pair = Pair::new();
        let (_cs, _cr, ss, sr) = pair.open().await;
        let (mut app, node) = tcp_pair(false).await;
        let splice = Splice::new(Duration::from_secs(60)).prefetched(Bytes::from_static(b"early"));
        let h = tokio::spawn(splice.run_io(node, ss, sr));
        let mut buf = [0u8; 5];
        tokio::time::timeout(WAIT, app.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"early");
        h.abort();
    }

    #[tokio::test]
    async fn a_slow_reader_holds_the_writer_back() {
        let mut pair = Pair::new();
        let mut c = chain(
            &mut pair,
            Splice::new(Duration::from_secs(60)).buffer(16 << 10),
            true,
        )
        .await;
        const TOTAL: usize = 24 << 20;
        let written = Arc::new(AtomicU64::new(0));
        let finished = Arc::new(AtomicBool::new(false));
        let (w, f) = (written.clone(), finished.clone());
        let writer = tokio::spawn(async move {
            let chunk = vec![7u8; 64 << 10];
            while (w.load(Ordering::Relaxed) as usize) < TOTAL {
                c.server.write_all(&chunk).await.unwrap();
                w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
            f.store(true, Ordering::Relaxed);
            c.server.shutdown().await.unwrap();
            c.server
        });
        // The client reads nothing: the writer stalls once the windows are full.
        let deadline = Instant::now() + WAIT;
        let mut last = 0;
        let mut still_since = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = written.load(Ordering::Relaxed);
            if now != last {
                last = now;
                still_since = Instant::now();
            } else if still_since.elapsed() >= Duration::from_millis(1500) {
                break;
            }
            assert!(Instant::now() < deadline, "the writer never stalled");
        }
        assert!(
            !finished.load(Ordering::Relaxed),
            "all {TOTAL} bytes were taken"
        );
        // Kernel buffers (64 KiB a socket, doubled) + the QUIC stream window
        // (1.25 MiB) + one buffer per direction: well under 8 MiB.
        assert!(last < 8 << 20, "the writer got {last} bytes ahead");
        // Then the client reads it all.
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        tokio::time::timeout(WAIT * 3, async {
            loop {
                let n = c.client.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                assert!(buf[..n].iter().all(|&b| b == 7));
                got += n;
            }
        })
        .await
        .expect("the rest arrives");
        assert!(got >= TOTAL, "got {got}");
        drop(writer.await.unwrap());
        drop(c.client);
        assert_eq!(done(c.b).await.local_to_mesh, got as u64);
        assert_eq!(done(c.a).await.mesh_to_local, got as u64);
    }

    #[tokio::test]
    async fn idle_splice_ends_and_the_far_side_sees_a_reset() {
        let mut pair = Pair::new();
        let (cs, cr, ss, sr) = pair.open().await;
        let (mut client, node_a) = tcp_pair(false).await;
        let (server, node_b) = tcp_pair(false).await;
        let t0 = Instant::now();
        let a = tokio::spawn(Splice::new(Duration::from_millis(300)).run_io(node_a, cs, cr));
        let b = tokio::spawn(Splice::new(Duration::from_secs(60)).run_io(node_b, ss, sr));
        // One exchange, then silence.
        client.write_all(b"x").await.unwrap();
        let a = done(a).await;
        assert_eq!(a.outcome, Outcome::Idle, "{a:?}");
        assert!(a.duration >= Duration::from_millis(300), "{a:?}");
        let b = done(b).await;
        assert_eq!(b.outcome, Outcome::Reset(Side::Mesh), "{b:?}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        drop(server);
    }

    #[tokio::test]
    async fn a_tcp_reset_resets_the_stream_promptly() {
        let mut pair = Pair::new();
        let c = chain(&mut pair, Splice::new(Duration::from_secs(3600)), false).await;
        let mut server = c.server;
        let mut client = c.client;
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        server.read_exact(&mut buf).await.unwrap();
        abort_tcp(client);
        let a = done(c.a).await;
        assert_eq!(a.outcome, Outcome::Reset(Side::Local), "{a:?}");
        let b = done(c.b).await;
        assert_eq!(b.outcome, Outcome::Reset(Side::Mesh), "{b:?}");
        assert!(b.detail.is_some());
        drop(server);
    }

    #[tokio::test]
    async fn losing_the_connection_ends_the_splice_promptly() {
        let mut pair = Pair::new();
        let c = chain(&mut pair, Splice::new(Duration::from_secs(3600)), false).await;
        let t0 = Instant::now();
        pair.server.close();
        let a = done(c.a).await;
        assert_eq!(a.outcome, Outcome::Reset(Side::Mesh), "{a:?}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(pair.caller);
        drop((c.client, c.server));
    }

    #[tokio::test]
    async fn dropping_a_splice_resets_the_stream() {
        let mut pair = Pair::new();
        let c = chain(&mut pair, Splice::new(Duration::from_secs(3600)), false).await;
        c.a.abort();
        let b = done(c.b).await;
        assert_eq!(b.outcome, Outcome::Reset(Side::Mesh), "{b:?}");
        drop((c.client, c.server));
    }
}
