//! The node's own HTTP/1.1 server on the outbound listener, for the common
//! request: HTTP/1.0 or 1.1, no upgrade, no `Expect`, and either no body or
//! a `content-length` body of at most [`MAX_BODY`] (most requests have
//! none). The head is parsed with `httparse` (header values share the bytes
//! read), the body is read whole, and the response leaves with its head and
//! the body's first bytes in one write. No connection task, no channels:
//! the connection's own task reads, calls the handler and writes.
//!
//! The first request it does not take — h2c with prior knowledge, an
//! upgrade or CONNECT, a chunked or larger body, `Expect: 100-continue`, a
//! head it cannot parse or one over [`MAX_HEAD`] bytes or [`MAX_FIELDS`]
//! fields — is handed to hyper with every byte read so far
//! ([`Served::Handoff`]), and hyper serves the rest of the connection, so
//! its answers (400, 431, upgrades, h2c) stay as they were.
//!
//! A caller that closes its connection while its request is in flight (or
//! while its response streams) cancels the request, as hyper does: the
//! handler's future is dropped, which resets the stream to the serving
//! node.

use std::future::{Future, poll_fn};
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::body::ReqBody;
use crate::frame::ProxyBody;
use crate::listen::Activity;

/// Largest request head (request line and fields) this server parses.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most request fields this server parses.
pub const MAX_FIELDS: usize = 64;
/// Largest request body this server reads whole.
pub const MAX_BODY: u64 = 64 * 1024;
/// Bytes a caller may send ahead (pipelined) while a request is in flight
/// before the server stops reading until it is answered.
const MAX_AHEAD: usize = MAX_HEAD + MAX_BODY as usize;
/// Room kept free in the read buffer before a read.
const READ_ROOM: usize = 4 * 1024;
/// Response bytes gathered before they are written, while more are ready.
const WRITE_BATCH: usize = 64 * 1024;

/// How a connection left this server.
#[derive(Debug)]
pub(crate) enum Served {
    /// Closed (by either side, or after an answer that ends it).
    Closed,
    /// A request this server does not take: the bytes read and not yet
    /// served, for hyper to serve from.
    Handoff(Bytes),
}

/// A request head, parsed and checked: where its parts sit in the bytes
/// read, so that they can share them once the head is taken off the buffer.
struct Head {
    method: Method,
    path: (usize, usize),
    version: Version,
    fields: Vec<(HeaderName, usize, usize)>,
    body_len: usize,
}

/// What the response must look like, from its request.
#[derive(Debug, Clone, Copy)]
struct Asked {
    head: bool,
    http10: bool,
    keep_alive: bool,
    trailers: bool,
}

/// Serves requests on `io` until it closes or a request must go to hyper.
/// `handler` answers each request; the request counts as in flight (in
/// `activity`) until its response is written.
pub(crate) async fn serve<IO, H, Fut>(
    io: &mut IO,
    activity: &Arc<Activity>,
    mut handler: H,
) -> Served
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: FnMut(Request<ReqBody>) -> Fut,
    Fut: Future<Output = Response<ProxyBody>>,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    loop {
        // A whole head, or a reason to stop.
        let (head_len, head) = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Parsed::Complete(len, head) => break (len, head),
                    Parsed::Partial if buf.len() < MAX_HEAD => {}
                    Parsed::Partial | Parsed::NotOurs => return Served::Handoff(buf.freeze()),
                }
            }
            match read(io, &mut buf).await {
                Ok(0) | Err(_) => {
                    return if buf.is_empty() {
                        Served::Closed
                    } else {
                        // A partial head, then EOF: hyper answers it as it
                        // would have.
                        Served::Handoff(buf.freeze())
                    };
                }
                Ok(_) => {}
            }
        };
        while buf.len() < head_len + head.body_len {
            match read(io, &mut buf).await {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
        }
        let guard = activity.begin(false);
        let head_bytes = buf.split_to(head_len).freeze();
        let body = buf.split_to(head.body_len).freeze();
        let Some(req) = request(head, &head_bytes, body) else {
            // Field values the parser let through but `http` refuses: let
            // hyper answer them.
            let mut rest = BytesMut::from(&head_bytes[..]);
            rest.extend_from_slice(&buf);
            drop(guard);
            return Served::Handoff(rest.freeze());
        };
        let asked = asked(&req);
        // The answer, unless the caller goes away first (then the
        // handler's future is dropped: the request is cancelled).
        let resp = {
            let answer = handler(req);
            tokio::pin!(answer);
            loop {
                tokio::select! {
                    resp = &mut answer => break resp,
                    r = read(io, &mut buf), if buf.len() < MAX_AHEAD => match r {
                        Ok(0) | Err(_) => return Served::Closed,
                        Ok(_) => {}
                    },
                }
            }
        };
        let keep = write_response(io, &mut buf, &mut out, resp, asked).await;
        drop(guard);
        if !keep {
            let _ = io.shutdown().await;
            return Served::Closed;
        }
    }
}

/// One read into `buf`, keeping room for it.
async fn read<IO: AsyncRead + Unpin>(io: &mut IO, buf: &mut BytesMut) -> std::io::Result<usize> {
    buf.reserve(READ_ROOM);
    io.read_buf(buf).await
}

enum Parsed {
    Complete(usize, Head),
    Partial,
    /// Not a request this server takes (or not one it can parse).
    NotOurs,
}

/// Parses the head at the start of `buf`.
fn parse(buf: &[u8]) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut r = httparse::Request::new(&mut []);
    let len = match r.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotOurs,
    };
    let (Some(method), Some(path), Some(version)) = (r.method, r.path, r.version) else {
        return Parsed::NotOurs;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::NotOurs;
    };
    if method == Method::CONNECT {
        return Parsed::NotOurs;
    }
    let base = buf.as_ptr() as usize;
    let path_at = path.as_ptr() as usize - base;
    let mut fields = Vec::with_capacity(r.headers.len());
    let mut body_len: Option<u64> = None;
    for f in r.headers.iter() {
        let Ok(name) = HeaderName::from_bytes(f.name.as_bytes()) else {
            return Parsed::NotOurs;
        };
        if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::EXPECT
            || (name == header::CONNECTION && has_token(f.value, "upgrade"))
        {
            return Parsed::NotOurs;
        }
        if name == header::CONTENT_LENGTH {
            match (body_len, content_length(f.value)) {
                (None, Some(n)) if n <= MAX_BODY => body_len = Some(n),
                _ => return Parsed::NotOurs,
            }
        }
        let at = f.value.as_ptr() as usize - base;
        fields.push((name, at, at + f.value.len()));
    }
    Parsed::Complete(
        len,
        Head {
            method,
            path: (path_at, path_at + path.len()),
            version: if version == 0 {
                Version::HTTP_10
            } else {
                Version::HTTP_11
            },
            fields,
            body_len: body_len.unwrap_or(0) as usize,
        },
    )
}

/// The request, its target and field values sharing `bytes` (the head);
/// `None` if `http` refuses the target or a value.
fn request(head: Head, bytes: &Bytes, body: Bytes) -> Option<Request<ReqBody>> {
    let uri = Uri::from_maybe_shared(bytes.slice(head.path.0..head.path.1)).ok()?;
    let mut headers = HeaderMap::with_capacity(head.fields.len());
    for (name, from, to) in head.fields {
        headers.append(
            name,
            HeaderValue::from_maybe_shared(bytes.slice(from..to)).ok()?,
        );
    }
    let mut req = Request::new(ReqBody::Whole(Some(body)));
    *req.method_mut() = head.method;
    *req.uri_mut() = uri;
    *req.version_mut() = head.version;
    *req.headers_mut() = headers;
    Some(req)
}

/// What the response owes its request.
fn asked(req: &Request<ReqBody>) -> Asked {
    let http10 = req.version() == Version::HTTP_10;
    let conn = req.headers().get_all(header::CONNECTION);
    let keep_alive = if http10 {
        conn.iter().any(|v| has_token(v.as_bytes(), "keep-alive"))
    } else {
        !conn.iter().any(|v| has_token(v.as_bytes(), "close"))
    };
    Asked {
        head: req.method() == Method::HEAD,
        http10,
        keep_alive,
        trailers: req
            .headers()
            .get_all(header::TE)
            .iter()
            .any(|v| has_token(v.as_bytes(), "trailers")),
    }
}

/// Whether the comma-separated list `v` holds `token` (any case).
fn has_token(v: &[u8], token: &str) -> bool {
    v.split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// A `content-length` value: digits only.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delimit {
    None,
    Length(u64),
    Chunked,
    Close,
}

/// Writes `resp`; answers whether the connection can carry another request.
async fn write_response<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    resp: Response<ProxyBody>,
    asked: Asked,
) -> bool
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, mut body) = resp.into_parts();
    let status = parts.status;
    let no_body = asked.head
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| content_length(v.as_bytes()));
    let mut keep = asked.keep_alive
        && !parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), "close"));
    let delimit = if no_body {
        Delimit::None
    } else if let Some(n) = declared.or_else(|| body.size_hint().exact()) {
        Delimit::Length(n)
    } else if asked.http10 {
        keep = false;
        Delimit::Close
    } else {
        Delimit::Chunked
    };
    out.clear();
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or("")
    );
    let mut dated = false;
    for (name, value) in parts.headers.iter() {
        if name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || name == header::CONNECTION
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        dated |= name == header::DATE;
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        date::now(out);
        out.extend_from_slice(b"\r\n");
    }
    match delimit {
        Delimit::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        Delimit::None => {
            if let Some(n) = declared {
                let _ = write!(out, "content-length: {n}\r\n");
            }
        }
        Delimit::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Delimit::Close => {}
    }
    if !keep {
        out.extend_from_slice(b"connection: close\r\n");
    } else if asked.http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if delimit == Delimit::None {
        drop(body);
        return io.write_all(out).await.is_ok() && keep;
    }
    let mut sent: u64 = 0;
    loop {
        // A frame ready now joins the bytes gathered; otherwise they go out
        // before waiting for the next one.
        let ready = poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await;
        let frame = match ready {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    if io.write_all(out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                match next_frame(io, buf, &mut body).await {
                    Some(f) => f,
                    None => return false,
                }
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed; closing the caller's connection");
                // What came before the failure still goes out.
                let _ = io.write_all(out).await;
                return false;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    if let Delimit::Length(n) = delimit
                        && sent > n
                    {
                        tracing::debug!(
                            declared = n,
                            "response body longer than its length; closing"
                        );
                        let _ = io.write_all(out).await;
                        return false;
                    }
                    if delimit == Delimit::Chunked {
                        let _ = write!(out, "{:x}\r\n", data.len());
                        out.extend_from_slice(&data);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(&data);
                    }
                }
                Err(frame) => {
                    if delimit == Delimit::Chunked
                        && asked.trailers
                        && let Ok(trailers) = frame.into_trailers()
                    {
                        out.extend_from_slice(b"0\r\n");
                        for (name, value) in trailers.iter() {
                            out.extend_from_slice(name.as_str().as_bytes());
                            out.extend_from_slice(b": ");
                            out.extend_from_slice(value.as_bytes());
                            out.extend_from_slice(b"\r\n");
                        }
                        out.extend_from_slice(b"\r\n");
                        return io.write_all(out).await.is_ok() && keep;
                    }
                }
            },
        }
        if out.len() >= WRITE_BATCH {
            if io.write_all(out).await.is_err() {
                return false;
            }
            out.clear();
        }
    }
    match delimit {
        Delimit::Length(n) if sent != n => {
            tracing::debug!(
                declared = n,
                sent,
                "response body shorter than its length; closing"
            );
            let _ = io.write_all(out).await;
            return false;
        }
        Delimit::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
        _ => {}
    }
    io.write_all(out).await.is_ok() && keep && delimit != Delimit::Close
}

/// The next response frame, or `None` if the caller closed its connection
/// first.
async fn next_frame<IO>(
    io: &mut IO,
    buf: &mut BytesMut,
    body: &mut ProxyBody,
) -> Option<Option<Result<Frame<Bytes>, crate::frame::BoxError>>>
where
    IO: AsyncRead + Unpin,
{
    loop {
        tokio::select! {
            f = poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)) => return Some(f),
            r = read(io, buf), if buf.len() < MAX_AHEAD => match r {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            },
        }
    }
}

/// The `date` field's value, formatted once a second.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    /// Appends the current IMF-fixdate to `out`.
    pub fn now(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(c.1.as_bytes());
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use http_body_util::BodyExt;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    use super::*;
    use crate::body::full;

    /// What the handler saw of one request.
    #[derive(Debug)]
    struct Seen {
        method: Method,
        uri: String,
        version: Version,
        headers: HeaderMap,
        body: Bytes,
    }

    /// Answers by path: `/len` a whole body, `/stream` two chunks and a
    /// trailer with no length, `/broken` a chunk then an error, `/close` a
    /// body with `connection: close`, `/slow` never (flagging its drop).
    async fn answer(
        req: Request<ReqBody>,
        seen: mpsc::UnboundedSender<Seen>,
        dropped: Arc<AtomicBool>,
    ) -> Response<ProxyBody> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        let path = parts.uri.path().to_string();
        let _ = seen.send(Seen {
            method: parts.method,
            uri: parts.uri.to_string(),
            version: parts.version,
            headers: parts.headers,
            body,
        });
        match path.as_str() {
            "/stream" | "/broken" => {
                let last: Result<Frame<Bytes>, crate::frame::BoxError> = if path == "/stream" {
                    let mut t = HeaderMap::new();
                    t.insert("x-sum", HeaderValue::from_static("7"));
                    Ok(Frame::trailers(t))
                } else {
                    Err("the serving node went away".into())
                };
                let frames = vec![
                    Ok(Frame::data(Bytes::from_static(b"abc"))),
                    Ok(Frame::data(Bytes::from_static(b"defg"))),
                    last,
                ];
                let body = http_body_util::StreamBody::new(futures::stream::iter(frames));
                Response::new(http_body_util::BodyExt::boxed_unsync(body))
            }
            "/close" => {
                let mut r = Response::new(full(Bytes::from_static(b"bye")));
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                r
            }
            "/slow" => {
                struct Flag(Arc<AtomicBool>);
                impl Drop for Flag {
                    fn drop(&mut self) {
                        self.0.store(true, Ordering::SeqCst);
                    }
                }
                let _flag = Flag(dropped);
                std::future::pending::<()>().await;
                unreachable!()
            }
            _ => {
                let mut r = Response::new(full(Bytes::from_static(b"hello")));
                r.headers_mut()
                    .insert("x-app", HeaderValue::from_static("1"));
                if path == "/declared" {
                    r.headers_mut()
                        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
                }
                r
            }
        }
    }

    struct Server {
        client: TcpStream,
        seen: mpsc::UnboundedReceiver<Seen>,
        served: tokio::task::JoinHandle<Served>,
        dropped: Arc<AtomicBool>,
        activity: Arc<Activity>,
    }

    /// This server on a real loopback connection, and its client end.
    async fn server() -> Server {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut conn, _) = l.accept().await.unwrap();
        let (tx, seen) = mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicBool::new(false));
        let activity = Activity::new();
        let (d, a) = (dropped.clone(), activity.clone());
        let served = tokio::spawn(async move {
            serve(&mut conn, &a, |req| answer(req, tx.clone(), d.clone())).await
        });
        Server {
            client,
            seen,
            served,
            dropped,
            activity,
        }
    }

    /// Reads one response off `c` (a test's own reading: head to the empty
    /// line, then `content-length` bytes or chunks to the last one, or to
    /// EOF); `None` at EOF before a head.
    async fn response(
        c: &mut TcpStream,
        rest: &mut Vec<u8>,
        head_request: bool,
    ) -> Option<(String, Vec<u8>)> {
        async fn more(c: &mut TcpStream, rest: &mut Vec<u8>) -> bool {
            let mut b = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut b))
                .await
                .expect("no answer in 10 s")
                .unwrap_or(0);
            rest.extend_from_slice(&b[..n]);
            n > 0
        }
        let end = loop {
            if let Some(i) = rest.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !more(c, rest).await {
                return None;
            }
        };
        let head = String::from_utf8(rest.drain(..end).collect()).unwrap();
        let lower = head.to_ascii_lowercase();
        let field = |name: &str| {
            lower
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
        };
        let mut body = Vec::new();
        if head_request {
        } else if let Some(n) = field("content-length") {
            let n: usize = n.parse().unwrap();
            while rest.len() < n {
                assert!(more(c, rest).await, "EOF inside a body");
            }
            body = rest.drain(..n).collect();
        } else if field("transfer-encoding").as_deref() == Some("chunked") {
            // Keeps the chunk framing and trailers as they came.
            loop {
                if let Some(n) = chunked_end(rest) {
                    body = rest.drain(..n).collect();
                    break;
                }
                if !more(c, rest).await {
                    body = std::mem::take(rest);
                    break;
                }
            }
        } else {
            while more(c, rest).await {}
            body = std::mem::take(rest);
        }
        Some((head, body))
    }

    /// Where a whole chunked body (last chunk and trailers included) ends
    /// in `b`, if it is all there.
    fn chunked_end(b: &[u8]) -> Option<usize> {
        let line = |from: usize| {
            b[from..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map(|i| from + i)
        };
        let mut at = 0;
        loop {
            let end = line(at)?;
            let size =
                usize::from_str_radix(std::str::from_utf8(&b[at..end]).unwrap(), 16).unwrap();
            at = end + 2;
            if size == 0 {
                // Trailer lines up to an empty one.
                loop {
                    let end = line(at)?;
                    let empty = end == at;
                    at = end + 2;
                    if empty {
                        return Some(at);
                    }
                }
            }
            if b.len() < at + size + 2 {
                return None;
            }
            at += size + 2;
        }
    }

    #[tokio::test]
    async fn pipelined_requests_are_answered_in_order_on_one_connection() {
        let mut s = server().await;
        s.client
            .write_all(b"GET /len?a=1 HTTP/1.1\r\nHost: web\r\nX-Caller: Two Words\r\n\r\nPOST /len HTTP/1.1\r\nhost: web\r\ncontent-length: 11\r\n\r\nhello")
            .await
            .unwrap();
        s.client.write_all(b" world").await.unwrap();
        let mut rest = Vec::new();
        for _ in 0..2 {
            let (head, body) = response(&mut s.client, &mut rest, false).await.unwrap();
            assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
            assert!(head.contains("\r\nx-app: 1\r\n"), "{head}");
            assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
            assert!(
                head.contains("\r\ndate: ") && head.contains(" GMT\r\n"),
                "{head}"
            );
            assert!(!head.contains("connection"), "{head}");
            assert_eq!(body, b"hello");
        }
        let get = s.seen.recv().await.unwrap();
        assert_eq!(
            (get.method, get.uri.as_str(), get.version),
            (Method::GET, "/len?a=1", Version::HTTP_11)
        );
        assert_eq!(get.headers["host"], "web");
        assert_eq!(get.headers["x-caller"], "Two Words");
        assert!(get.body.is_empty());
        let post = s.seen.recv().await.unwrap();
        assert_eq!(post.method, Method::POST);
        assert_eq!(&post.body[..], b"hello world");
        assert_eq!(s.activity_in_flight(), 0);
        drop(s.client);
        assert!(matches!(s.served.await.unwrap(), Served::Closed));
    }

    impl Server {
        fn activity_in_flight(&self) -> u32 {
            self.activity.in_flight()
        }
    }

    #[tokio::test]
    async fn a_body_of_unknown_length_is_chunked_and_trailers_go_only_to_who_asked() {
        let mut s = server().await;
        let mut rest = Vec::new();
        s.client
            .write_all(b"GET /stream HTTP/1.1\r\nhost: web\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert!(
            head.contains("\r\ntransfer-encoding: chunked\r\n"),
            "{head}"
        );
        assert_eq!(body, b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n");
        s.client
            .write_all(b"GET /stream HTTP/1.1\r\nhost: web\r\nte: trailers\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert_eq!(body, b"3\r\nabc\r\n4\r\ndefg\r\n0\r\nx-sum: 7\r\n\r\n");
    }

    #[tokio::test]
    async fn head_keeps_the_length_and_sends_no_body() {
        let mut s = server().await;
        let mut rest = Vec::new();
        s.client
            .write_all(
                b"HEAD /declared HTTP/1.1\r\nhost: web\r\n\r\nGET /len HTTP/1.1\r\nhost: web\r\n\r\n",
            )
            .await
            .unwrap();
        let (head, _) = response(&mut s.client, &mut rest, true).await.unwrap();
        assert!(head.contains("\r\ncontent-length: 5\r\n"), "{head}");
        // The next bytes are the GET's answer, not a HEAD body.
        let (head, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn http10_closes_unless_asked_to_keep_alive() {
        let mut s = server().await;
        let mut rest = Vec::new();
        s.client
            .write_all(b"GET /len HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert!(head.contains("\r\nconnection: keep-alive\r\n"), "{head}");
        assert_eq!(body, b"hello");
        // A length-less body for HTTP/1.0 is delimited by the close.
        s.client
            .write_all(b"GET /stream HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert!(
            head.contains("\r\nconnection: close\r\n") && !head.contains("chunked"),
            "{head}"
        );
        assert_eq!(body, b"abcdefg");
        assert!(matches!(s.served.await.unwrap(), Served::Closed));
        assert_eq!(s.seen.recv().await.unwrap().version, Version::HTTP_10);
    }

    #[tokio::test]
    async fn connection_close_from_either_side_ends_the_connection() {
        for (req, path) in [
            ("GET /len HTTP/1.1\r\nconnection: close\r\n\r\n", "asked"),
            ("GET /close HTTP/1.1\r\n\r\n", "answered"),
        ] {
            let mut s = server().await;
            let mut rest = Vec::new();
            s.client.write_all(req.as_bytes()).await.unwrap();
            let (head, _) = response(&mut s.client, &mut rest, false).await.unwrap();
            assert!(head.contains("\r\nconnection: close\r\n"), "{path}: {head}");
            assert!(matches!(s.served.await.unwrap(), Served::Closed), "{path}");
            assert!(
                response(&mut s.client, &mut rest, false).await.is_none(),
                "{path}: closed"
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_fails_closes_the_connection_without_a_last_chunk() {
        let mut s = server().await;
        let mut rest = Vec::new();
        s.client
            .write_all(b"GET /broken HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert_eq!(body, b"3\r\nabc\r\n4\r\ndefg\r\n", "cut short, no 0-chunk");
        assert!(matches!(s.served.await.unwrap(), Served::Closed));
    }

    #[tokio::test]
    async fn a_caller_that_goes_away_cancels_its_request() {
        let mut s = server().await;
        s.client
            .write_all(b"GET /slow HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        s.seen.recv().await.unwrap();
        assert_eq!(s.activity_in_flight(), 1);
        drop(s.client);
        assert!(matches!(s.served.await.unwrap(), Served::Closed));
        assert!(
            s.dropped.load(Ordering::SeqCst),
            "the handler's future was dropped"
        );
        assert_eq!(s.activity.in_flight(), 0);
    }

    #[tokio::test]
    async fn requests_it_does_not_take_go_to_hyper_with_every_byte_read() {
        let big = format!(
            "POST /len HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let many: String = (0..MAX_FIELDS + 1)
            .map(|i| format!("x-f{i}: v\r\n"))
            .collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let cases: Vec<(&str, String)> = vec![
            ("h2c", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into()),
            (
                "upgrade",
                "GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n".into(),
            ),
            (
                "connect",
                "CONNECT db:5432 HTTP/1.1\r\nhost: db:5432\r\n\r\n".into(),
            ),
            (
                "chunked",
                "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".into(),
            ),
            (
                "expect",
                "POST / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\n".into(),
            ),
            (
                "two lengths",
                "POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc".into(),
            ),
            (
                "bad length",
                "POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\nabc".into(),
            ),
            ("over the body limit", big),
            ("too many fields", many),
            (
                "garbage",
                "\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03".into(),
            ),
        ];
        for (what, bytes) in cases {
            let mut s = server().await;
            s.client.write_all(bytes.as_bytes()).await.unwrap();
            match tokio::time::timeout(Duration::from_secs(10), s.served)
                .await
                .unwrap()
                .unwrap()
            {
                Served::Handoff(read) => assert_eq!(&read[..], bytes.as_bytes(), "{what}"),
                other => panic!("{what}: {other:?}"),
            }
            assert!(
                s.seen.try_recv().is_err(),
                "{what}: the handler saw nothing"
            );
        }
    }

    #[tokio::test]
    async fn a_request_after_served_ones_is_handed_off_from_its_first_byte() {
        let mut s = server().await;
        let mut rest = Vec::new();
        let upgrade = "GET /ws HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
        s.client
            .write_all(format!("GET /len HTTP/1.1\r\n\r\n{upgrade}").as_bytes())
            .await
            .unwrap();
        let (_, body) = response(&mut s.client, &mut rest, false).await.unwrap();
        assert_eq!(body, b"hello");
        match s.served.await.unwrap() {
            Served::Handoff(read) => assert_eq!(&read[..], upgrade.as_bytes()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_head_cut_short_by_eof_goes_to_hyper_and_silence_just_closes() {
        let mut s = server().await;
        s.client.write_all(b"GET /len HTT").await.unwrap();
        s.client.shutdown().await.unwrap();
        match s.served.await.unwrap() {
            Served::Handoff(read) => assert_eq!(&read[..], b"GET /len HTT"),
            other => panic!("{other:?}"),
        }
        let s = server().await;
        drop(s.client);
        assert!(matches!(s.served.await.unwrap(), Served::Closed));
    }
}
