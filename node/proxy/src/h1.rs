//! The node's own HTTP/1.1 client for its keep-alive connections to a local
//! instance, for the common request: no upgrade, and a body of known length
//! of at most [`MAX_SENT_BODY`] (most requests have none). The head and the
//! body leave in one write; the response head is parsed with `httparse`
//! (header values share the bytes read, nothing is copied); the response
//! body is read off the socket by whoever polls it (the inbound stream's
//! task). No connection task, no channel between tasks per request: hyper's
//! client (`upstream.rs`) keeps upgrades and streamed or larger bodies,
//! where reading and writing at once matters.
//!
//! A response body that ends cleanly hands its connection back to the pool
//! ([`Pool`]); one dropped early, cut short or malformed closes it. A pooled
//! connection the instance closed while idle is noticed before use (its
//! socket is readable) and dropped; one it closes as the request goes out
//! (no byte of an answer) is retried once on a new connection when the
//! method is idempotent.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Version};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::TcpStream;

/// Largest request body this client sends (whole, in the head's write):
/// a loopback socket's buffers hold it, so the write never waits on an
/// instance that answers before reading.
pub const MAX_SENT_BODY: u64 = 64 * 1024;
/// Largest response head (status line and fields) read.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most response fields (or trailer fields) read.
const MAX_FIELDS: usize = 128;
/// Longest chunk-size line (with extensions) of a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// Room kept free in a connection's buffer before a read.
const READ_ROOM: usize = 8 * 1024;
/// Idle connections kept per local instance.
pub const POOL_MAX_IDLE: usize = 256;
/// An idle connection is closed after this long unused.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum H1Error {
    #[error("the instance closed the connection before answering")]
    ClosedEarly,
    #[error("i/o with the instance: {0}")]
    Io(#[from] io::Error),
    #[error("bad response head: {0}")]
    Head(String),
    #[error("response head over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("bad chunked body: {0}")]
    Chunked(&'static str),
    #[error("the instance closed the connection mid-body")]
    Truncated,
}

/// One keep-alive connection to an instance and the bytes read ahead on it.
pub(crate) struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Dials `addr` (nodelay), within `timeout`.
    pub async fn dial(addr: std::net::SocketAddr, timeout: Duration) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        let _ = tcp.set_nodelay(true);
        Ok(Conn {
            tcp,
            buf: BytesMut::new(),
        })
    }

    /// Whether the instance closed the connection (or sent bytes nobody
    /// asked for) while it sat idle. Only costs a read when the socket says
    /// it is readable.
    fn is_stale(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.tcp.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Reads what the socket has into the buffer: `Ok(0)` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < READ_ROOM / 2 {
            self.buf.reserve(READ_ROOM);
        }
        let room = self.buf.capacity() - self.buf.len();
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            let (tcp, buf) = (&self.tcp, &mut self.buf);
            let mut drained = None;
            // The read runs inside `try_io`, so the readiness it forgets is
            // the one seen before the read: bytes that arrive after the
            // read (on a multi-threaded runtime the reactor may record them
            // at any moment) keep the socket readable. Forgetting readiness
            // after the read, with a second `try_io`, could forget theirs
            // too, and the edge-triggered socket never woke this reader
            // again (seen: a 4 MiB answer stopped with 95 KB unread).
            let read = tcp.try_io(Interest::READABLE, || {
                let n = tcp.try_read_buf(buf)?;
                if 0 < n && n < room {
                    // A read that left room drained the socket: forget its
                    // readiness now, so `is_stale` finds nothing to probe
                    // (an empty read a request fewer). tokio keeps a seen
                    // end of stream or error whatever is cleared.
                    drained = Some(n);
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match (read, drained) {
                (_, Some(n)) => return Poll::Ready(Ok(n)),
                (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => continue,
                (r, None) => return Poll::Ready(r),
            }
        }
    }

    /// Sends `wire` (a request from [`encode_request`]) and reads the
    /// answer's head (1xx interim answers are skipped). `head_request`: the
    /// request was a HEAD (its answer has no body whatever it says).
    pub async fn exchange(
        &mut self,
        wire: &[u8],
        head_request: bool,
    ) -> Result<(http::response::Parts, Framing), H1Error> {
        if let Err(e) = self.tcp.write_all(wire).await {
            return Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => H1Error::ClosedEarly,
                _ => H1Error::Io(e),
            });
        }
        let mut answered = false;
        loop {
            if !self.buf.is_empty() {
                answered = true;
                if let Some(parsed) = self.parse_head(head_request)? {
                    return Ok(parsed);
                }
                if self.buf.len() >= MAX_HEAD {
                    return Err(H1Error::HeadTooLarge);
                }
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) if answered => return Err(H1Error::Head("closed mid-head".into())),
                Ok(0) => return Err(H1Error::ClosedEarly),
                Ok(_) => {}
                Err(e) if !answered && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Err(H1Error::ClosedEarly);
                }
                Err(e) => return Err(H1Error::Io(e)),
            }
        }
    }

    /// A complete final response head at the front of the buffer, taken off
    /// it; `None` while more bytes are needed (an interim 1xx answer is
    /// dropped on the way).
    fn parse_head(
        &mut self,
        head_request: bool,
    ) -> Result<Option<(http::response::Parts, Framing)>, H1Error> {
        loop {
            // Uninitialised: zeroing 128 fields cost more than parsing.
            let mut fields =
                [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
            let mut r = httparse::Response::new(&mut []);
            let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut r,
                &self.buf,
                &mut fields,
            );
            let len = match parsed {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => return Ok(None),
                Err(e) => return Err(H1Error::Head(e.to_string())),
            };
            let code = r.code.unwrap_or(0);
            if (100..200).contains(&code) && code != 101 {
                self.buf.advance(len);
                if self.buf.is_empty() {
                    return Ok(None);
                }
                continue;
            }
            if code == 101 {
                return Err(H1Error::Head(
                    "101 to a request that asked no upgrade".into(),
                ));
            }
            let status = StatusCode::from_u16(code).map_err(|e| H1Error::Head(e.to_string()))?;
            let version = if r.version == Some(0) {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            };
            // Where each field sits in the head, so that the values can
            // share its bytes once it is taken off the buffer.
            let base = self.buf.as_ptr() as usize;
            let mut spans = Vec::with_capacity(r.headers.len());
            for f in r.headers.iter() {
                let name = HeaderName::from_bytes(f.name.as_bytes())
                    .map_err(|_| H1Error::Head(format!("bad field name {:?}", f.name)))?;
                let at = f.value.as_ptr() as usize - base;
                spans.push((name, at, at + f.value.len()));
            }
            let head = self.buf.split_to(len).freeze();
            let mut headers = HeaderMap::with_capacity(spans.len());
            for (name, from, to) in spans {
                let value = HeaderValue::from_maybe_shared(head.slice(from..to))
                    .map_err(|_| H1Error::Head(format!("bad value of {name}")))?;
                headers.append(name, value);
            }
            let framing = framing(&headers, status, version, head_request)?;
            let mut parts = http::Response::new(()).into_parts().0;
            parts.status = status;
            parts.version = version;
            parts.headers = headers;
            return Ok(Some((parts, framing)));
        }
    }
}

/// How a response body is delimited, and whether its connection can carry
/// another request after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Framing {
    kind: Delimit,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    /// This many bytes remain.
    Length(u64),
    /// Chunked, in this state.
    Chunked(ChunkState),
    /// Until the instance closes the connection.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data: this many bytes remain.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer fields, then an empty line.
    Trailers,
}

/// The body's framing (RFC 9112 section 6.3).
fn framing(
    h: &HeaderMap,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<Framing, H1Error> {
    let close = version == Version::HTTP_10
        || h.get_all(http::header::CONNECTION).iter().any(|v| {
            v.as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
        });
    let mut keep_alive = !close;
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing {
            kind: Delimit::Length(0),
            keep_alive,
        });
    }
    let kind = if let Some(te) = h
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .next_back()
    {
        // A length beside a transfer coding is ignored, and such a
        // connection is not trusted with another request.
        keep_alive &= !h.contains_key(http::header::CONTENT_LENGTH);
        let last = te.as_bytes().rsplit(|b| *b == b',').next().unwrap_or(b"");
        if last.trim_ascii().eq_ignore_ascii_case(b"chunked") {
            Delimit::Chunked(ChunkState::Size)
        } else {
            keep_alive = false;
            Delimit::Close
        }
    } else {
        let mut length = None;
        for v in h.get_all(http::header::CONTENT_LENGTH) {
            for part in v.as_bytes().split(|b| *b == b',') {
                let n = std::str::from_utf8(part.trim_ascii())
                    .ok()
                    .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| H1Error::Head("bad content-length".into()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(H1Error::Head("conflicting content-length values".into()));
                }
                length = Some(n);
            }
        }
        match length {
            Some(n) => Delimit::Length(n),
            None => {
                keep_alive = false;
                Delimit::Close
            }
        }
    };
    Ok(Framing { kind, keep_alive })
}

/// Appends an HTTP/1.1 request for `target` (origin form, already checked by
/// [`valid_target`]) with `headers` (hop-by-hop fields already gone; any
/// length or transfer coding among them is replaced) and the whole `body`.
pub(crate) fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: &[u8],
) {
    out.reserve(64 + target.len() + headers.len() * 32 + body.len());
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let expects_body = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
    if !body.is_empty() || expects_body {
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Whether `target` can go on a request line as it is: visible ASCII only
/// (no space, CR or LF to split a line on), origin form or `*`.
pub(crate) fn valid_target(target: &str) -> bool {
    (target.starts_with('/') || target == "*") && target.bytes().all(|b| b.is_ascii_graphic())
}

/// Whether a request may be sent again after its connection closed under
/// it with no answer (RFC 9110 section 9.2.2).
pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The idle connections to one local instance, most recently used last.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<(Conn, Instant)>>,
}

impl Pool {
    /// The most recently used idle connection the instance has not closed
    /// (those idle past [`POOL_IDLE_TIMEOUT`] or closed are dropped on the
    /// way).
    pub fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap();
        let now = Instant::now();
        while let Some((conn, since)) = idle.pop() {
            if now.duration_since(since) < POOL_IDLE_TIMEOUT && !conn.is_stale() {
                return Some(conn);
            }
        }
        None
    }

    /// Keeps `conn` for the next request (dropped when the pool is full).
    pub fn put(&self, conn: Conn) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < POOL_MAX_IDLE {
            idle.push((conn, Instant::now()));
        }
    }

    /// Closes the connections idle past [`POOL_IDLE_TIMEOUT`] and those the
    /// instance closed.
    pub fn sweep(&self) {
        let now = Instant::now();
        self.idle.lock().unwrap().retain(|(conn, since)| {
            now.duration_since(*since) < POOL_IDLE_TIMEOUT && !conn.is_stale()
        });
    }

    /// Idle connections held now.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.idle.lock().unwrap().len()
    }
}

/// A response body read off its connection; at a clean end the connection
/// goes back to `pool` (when it may carry another request).
pub(crate) struct ResponseBody {
    conn: Option<Conn>,
    framing: Framing,
    pool: Arc<Pool>,
}

impl ResponseBody {
    pub fn new(conn: Conn, framing: Framing, pool: Arc<Pool>) -> Self {
        let mut b = ResponseBody {
            conn: Some(conn),
            framing,
            pool,
        };
        if b.framing.kind == Delimit::Length(0) {
            b.finish();
        }
        b
    }

    /// The body ended cleanly: its connection is free.
    fn finish(&mut self) {
        self.framing.kind = Delimit::Length(0);
        if let Some(conn) = self.conn.take()
            && self.framing.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.put(conn);
        }
    }

    /// The body failed: its connection closes.
    fn fail(&mut self, e: H1Error) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        self.conn = None;
        self.framing.kind = Delimit::Length(0);
        Poll::Ready(Some(Err(e)))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.framing.kind {
                Delimit::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Delimit::Length(rest) | Delimit::Chunked(ChunkState::Data(rest))
                    if !conn.buf.is_empty() =>
                {
                    let n = (conn.buf.len() as u64).min(*rest) as usize;
                    *rest -= n as u64;
                    let data = conn.buf.split_to(n).freeze();
                    match this.framing.kind {
                        Delimit::Length(0) => this.finish(),
                        Delimit::Chunked(ChunkState::Data(0)) => {
                            this.framing.kind = Delimit::Chunked(ChunkState::DataEnd)
                        }
                        _ => {}
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Delimit::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Delimit::Chunked(state) if !conn.buf.is_empty() => match chunk_step(conn, state) {
                    Ok(Progress::Next) => continue,
                    Ok(Progress::More) => {}
                    Ok(Progress::End(trailers)) => {
                        this.finish();
                        return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                    }
                    Err(e) => return this.fail(e),
                },
                // Nothing buffered: read.
                _ => {}
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if this.framing.kind == Delimit::Close => {
                    // The end of a close-delimited body: the connection
                    // is spent.
                    this.conn = None;
                    this.framing.kind = Delimit::Length(0);
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail(H1Error::Truncated),
                Ok(_) => {}
                Err(e) => return this.fail(H1Error::Io(e)),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.framing.kind == Delimit::Length(0)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing.kind {
            Delimit::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

/// What one chunked step did.
enum Progress {
    /// Took a line off the buffer: go on.
    Next,
    /// More bytes are needed.
    More,
    /// The body ended, with these trailer fields (if any).
    End(Option<HeaderMap>),
}

/// Takes one chunk-size line, chunk end or the trailer section off `conn`'s
/// buffer, advancing `state`.
fn chunk_step(conn: &mut Conn, state: &mut ChunkState) -> Result<Progress, H1Error> {
    let buf = &mut conn.buf;
    match *state {
        ChunkState::Size => {
            let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                return if buf.len() > MAX_CHUNK_LINE {
                    Err(H1Error::Chunked("chunk-size line too long"))
                } else {
                    Ok(Progress::More)
                };
            };
            let line = buf[..eol].strip_suffix(b"\r").unwrap_or(&buf[..eol]);
            let digits = line
                .split(|b| *b == b';')
                .next()
                .unwrap_or(b"")
                .trim_ascii();
            if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
                return Err(H1Error::Chunked("bad chunk size"));
            }
            let size = digits.iter().fold(0u64, |n, d| {
                n << 4 | u64::from((*d as char).to_digit(16).unwrap_or(0))
            });
            buf.advance(eol + 1);
            *state = if size == 0 {
                ChunkState::Trailers
            } else {
                ChunkState::Data(size)
            };
            Ok(Progress::Next)
        }
        ChunkState::DataEnd => {
            if buf.starts_with(b"\n") {
                buf.advance(1);
            } else if buf.len() < 2 {
                return Ok(Progress::More);
            } else if buf.starts_with(b"\r\n") {
                buf.advance(2);
            } else {
                return Err(H1Error::Chunked("no CRLF after chunk data"));
            }
            *state = ChunkState::Size;
            Ok(Progress::Next)
        }
        ChunkState::Trailers => {
            if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
                buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
                return Ok(Progress::End(None));
            }
            let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
            match httparse::parse_headers(buf, &mut fields) {
                Ok(httparse::Status::Complete((n, fields))) => {
                    let mut trailers = HeaderMap::with_capacity(fields.len());
                    for f in fields.iter() {
                        let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(f.name.as_bytes()),
                            HeaderValue::from_bytes(f.value),
                        ) else {
                            return Err(H1Error::Chunked("bad trailer field"));
                        };
                        trailers.append(name, value);
                    }
                    buf.advance(n);
                    Ok(Progress::End(Some(trailers)))
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => Ok(Progress::More),
                Ok(httparse::Status::Partial) => Err(H1Error::Chunked("trailer section too large")),
                Err(_) => Err(H1Error::Chunked("bad trailer section")),
            }
        }
        ChunkState::Data(_) => Ok(Progress::Next),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A raw instance on 127.0.0.1: for each request head it reads (up to
    /// the empty line, then `content-length` bytes), it writes the next of
    /// `answers`, byte by byte when `trickle`; after its answers it closes.
    /// Counts its connections; sends what it read on `seen`.
    async fn instance(
        answers: Vec<&'static [u8]>,
        per_conn: usize,
        trickle: bool,
    ) -> (
        SocketAddr,
        Arc<AtomicUsize>,
        tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>,
    ) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let count = conns.clone();
        let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            loop {
                let (mut tcp, _) = l.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                for _ in 0..per_conn {
                    let Some(answer) = answers.next() else { return };
                    let mut got = Vec::new();
                    let mut b = [0u8; 1];
                    while !got.ends_with(b"\r\n\r\n") {
                        if tcp.read(&mut b).await.unwrap_or(0) == 0 {
                            return;
                        }
                        got.push(b[0]);
                    }
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    let mut body = vec![0u8; len];
                    tcp.read_exact(&mut body).await.unwrap();
                    got.extend_from_slice(&body);
                    seen_tx.send(got).unwrap();
                    if trickle {
                        for byte in answer {
                            tcp.write_all(&[*byte]).await.unwrap();
                            tcp.flush().await.unwrap();
                        }
                    } else {
                        tcp.write_all(answer).await.unwrap();
                    }
                }
            }
        });
        (addr, conns, seen)
    }

    /// One GET through `pool` (or a new connection), as `upstream.rs` sends
    /// it: the status, the fields, the body and the trailers.
    async fn get(
        addr: SocketAddr,
        pool: &Arc<Pool>,
        method: Method,
    ) -> Result<(http::response::Parts, Bytes, Option<HeaderMap>), H1Error> {
        let mut wire = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, HeaderValue::from_static("web"));
        encode_request(&mut wire, &method, "/x?y=1", &h, b"");
        let mut conn = match pool.take() {
            Some(c) => c,
            None => Conn::dial(addr, Duration::from_secs(2)).await?,
        };
        let (parts, framing) = conn.exchange(&wire, method == Method::HEAD).await?;
        let body = ResponseBody::new(conn, framing, pool.clone());
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((parts, collected.to_bytes(), trailers))
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhello";

    #[tokio::test]
    async fn a_kept_alive_connection_carries_sequential_requests() {
        let (addr, conns, mut seen) = instance(vec![OK; 4], 4, false).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..4 {
            let (parts, body, _) = get(addr, &pool, Method::GET).await.unwrap();
            assert_eq!(parts.status, 200);
            assert_eq!(parts.headers["x-a"], "1");
            assert_eq!(body, "hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
        let first = seen.recv().await.unwrap();
        assert_eq!(first, b"GET /x?y=1 HTTP/1.1\r\nhost: web\r\n\r\n");
    }

    #[tokio::test]
    async fn a_chunked_body_arriving_a_byte_at_a_time_decodes_with_its_trailers() {
        let answer: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-sum: 7\r\n\r\n";
        let (addr, conns, _seen) = instance(vec![answer, OK], 2, true).await;
        let pool = Arc::new(Pool::default());
        let (_, body, trailers) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(body, "helloabcdefghijklmnopqrstuvwxyz");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        // The connection went back and carries the next request.
        let (_, body, _) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(body, "hello");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn interim_answers_are_skipped_and_bodiless_answers_end_at_their_head() {
        let (addr, conns, _seen) = instance(
            vec![
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
                b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
                OK,
            ],
            3,
            false,
        )
        .await;
        let pool = Arc::new(Pool::default());
        let (parts, body, _) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!((parts.status.as_u16(), body.len()), (204, 0));
        let (parts, body, _) = get(addr, &pool, Method::HEAD).await.unwrap();
        assert_eq!((parts.status.as_u16(), body.len()), (200, 0));
        let (_, body, _) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(body, "hello");
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn close_delimited_and_connection_close_answers_are_not_reused() {
        let (addr, conns, _seen) = instance(
            vec![
                b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
                b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
                b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello",
                OK,
            ],
            1,
            false,
        )
        .await;
        let pool = Arc::new(Pool::default());
        let (_, body, _) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(body, "until the end");
        for _ in 0..3 {
            let (_, body, _) = get(addr, &pool, Method::GET).await.unwrap();
            assert_eq!(body, "hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_idle_connection_the_instance_closed_is_not_taken() {
        // One answer per connection, then the instance closes it.
        let (addr, conns, _seen) = instance(vec![OK, OK], 1, false).await;
        let pool = Arc::new(Pool::default());
        get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(pool.idle(), 1);
        // Wait for the close to reach the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stale = pool.idle.lock().unwrap()[0].0.is_stale();
            if stale {
                break;
            }
            assert!(Instant::now() < deadline, "the close never showed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(pool.take().is_none());
        let (_, body, _) = get(addr, &pool, Method::GET).await.unwrap();
        assert_eq!(body, "hello");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_answer_read_while_it_arrives_on_two_threads_is_read_to_its_end() {
        // Many short reads while the instance writes on another thread: the
        // reactor records new bytes while a read runs. Forgetting readiness
        // after a short read must not forget theirs (the reader would wait
        // for ever on an edge-triggered socket holding bytes).
        const LEN: usize = 8 << 20;
        let mut answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {LEN}\r\n\r\n").into_bytes();
        answer.extend((0..LEN).map(|i| (i % 251) as u8));
        let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
        let (addr, _conns, _seen) = instance(vec![answer; 16], 16, false).await;
        let pool = Arc::new(Pool::default());
        for round in 0..16 {
            let (parts, body, _) =
                tokio::time::timeout(Duration::from_secs(30), get(addr, &pool, Method::GET))
                    .await
                    .unwrap_or_else(|_| panic!("round {round}: the answer stopped arriving"))
                    .unwrap();
            assert_eq!(parts.status, 200);
            assert_eq!(body.len(), LEN, "round {round}");
            assert!(
                body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8),
                "round {round}: bytes differ"
            );
        }
    }

    #[tokio::test]
    async fn a_drained_connection_goes_back_without_a_probe_read() {
        // A fourth answer keeps the instance's side open while it waits.
        let (addr, conns, _seen) = instance(vec![OK; 4], 4, false).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..3 {
            get(addr, &pool, Method::GET).await.unwrap();
            // The answer was shorter than the read buffer, so the read that
            // took it drained the socket and its readiness is gone: taking
            // the connection again costs no read.
            let idle = pool.idle.lock().unwrap();
            let mut cx = Context::from_waker(std::task::Waker::noop());
            assert!(
                idle[0].0.tcp.poll_read_ready(&mut cx).is_pending(),
                "a drained connection still looks readable"
            );
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_answer_and_its_close_read_together_leave_the_connection_stale() {
        // The instance answers and closes before the node reads a byte, so
        // the answer and the end of the stream are in the socket together:
        // clearing readiness after the short read must not hide the end.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::Write;
            let (mut tcp, _) = l.accept().unwrap();
            tcp.write_all(OK).unwrap();
            tcp.shutdown(std::net::Shutdown::Write).unwrap();
            tcp
        });
        let std_tcp = std::net::TcpStream::connect(addr).unwrap();
        let _server_side = server.join().unwrap();
        let mut first = [0u8; 1];
        std_tcp.peek(&mut first).unwrap();
        std_tcp.set_nonblocking(true).unwrap();
        let mut conn = Conn {
            tcp: TcpStream::from_std(std_tcp).unwrap(),
            buf: BytesMut::new(),
        };
        let mut wire = Vec::new();
        encode_request(&mut wire, &Method::GET, "/", &HeaderMap::new(), b"");
        let (parts, framing) = conn.exchange(&wire, false).await.unwrap();
        assert_eq!(parts.status, 200);
        let pool = Arc::new(Pool::default());
        let body = ResponseBody::new(conn, framing, pool.clone());
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
        // The body ended cleanly, so the connection went back; the close
        // read with it makes it stale at once, with no wait.
        assert_eq!(pool.idle(), 1);
        assert!(pool.idle.lock().unwrap()[0].0.is_stale());
        assert!(pool.take().is_none());
    }

    #[tokio::test]
    async fn malformed_answers_are_errors_and_close_their_connection() {
        let bad: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
        ];
        let n = bad.len();
        let (addr, conns, _seen) = instance(bad, 1, false).await;
        let pool = Arc::new(Pool::default());
        for i in 0..n {
            assert!(get(addr, &pool, Method::GET).await.is_err(), "answer {i}");
            assert_eq!(pool.idle(), 0, "answer {i}");
        }
        assert_eq!(conns.load(Ordering::SeqCst), n);
    }

    #[tokio::test]
    async fn an_oversized_head_is_refused() {
        let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
        while big.len() <= MAX_HEAD {
            big.extend_from_slice(b"x-pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
        }
        let (addr, _conns, _seen) = instance(vec![big.leak()], 1, false).await;
        let pool = Arc::new(Pool::default());
        assert!(matches!(
            get(addr, &pool, Method::GET).await,
            Err(H1Error::HeadTooLarge | H1Error::Head(_))
        ));
    }

    #[test]
    fn a_request_carries_its_own_length_and_no_transfer_coding() {
        let mut h = HeaderMap::new();
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.insert(
            http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-b", HeaderValue::from_static("2"));
        let mut wire = Vec::new();
        encode_request(&mut wire, &Method::POST, "/p", &h, b"abc");
        assert_eq!(
            wire,
            b"POST /p HTTP/1.1\r\nx-b: 2\r\ncontent-length: 3\r\n\r\nabc".to_vec()
        );
        let mut wire = Vec::new();
        encode_request(&mut wire, &Method::POST, "/p", &HeaderMap::new(), b"");
        assert_eq!(
            wire,
            b"POST /p HTTP/1.1\r\ncontent-length: 0\r\n\r\n".to_vec()
        );
        assert!(valid_target("/a?b=c"));
        assert!(valid_target("*"));
        for bad in ["/a b", "/a\r\nx: y", "a", "", "/é"] {
            assert!(!valid_target(bad), "{bad:?}");
        }
    }
}
