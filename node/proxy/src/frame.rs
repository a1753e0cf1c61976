//! The framing of one proxied HTTP exchange on one QUIC bidirectional stream
//! (see `docs/FRAMES.md`), and the body types that stream it.
//!
//! This module owns bytes on the wire between nodes; it knows nothing about
//! routing, balancing or the local instance.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};

/// First byte of a bidirectional stream that carries one HTTP exchange.
pub const STREAM_KIND_HTTP: u8 = 0x01;
/// First byte of a bidirectional stream that carries one opaque TCP
/// connection: a HEAD frame ([`TcpHead`]), one status byte back
/// ([`TCP_OK`] and the refusals after it), then raw bytes both ways.
pub const STREAM_KIND_TCP: u8 = 0x02;
/// TCP status: connected to the local instance; raw bytes follow.
pub const TCP_OK: u8 = 0x00;
/// TCP status: the local instance refused the connection or is unhealthy
/// (nothing was sent to it: the caller may try another endpoint).
pub const TCP_REFUSED: u8 = 0x01;
/// TCP status: no AuthorizationPolicy admits the caller's identity.
pub const TCP_DENIED: u8 = 0x02;
/// TCP status: this node fronts no instance of the service.
pub const TCP_UNKNOWN_SERVICE: u8 = 0x03;
/// TCP status: the caller's certificate does not name its source service.
pub const TCP_UNAUTHORIZED: u8 = 0x04;
/// TCP status: this node's certificate does not name the service.
pub const TCP_NOT_SERVED: u8 = 0x05;
/// TCP status: the service is not a `tcp` service (it speaks HTTP).
pub const TCP_NOT_TCP: u8 = 0x06;
/// TCP status: the head is malformed.
pub const TCP_BAD_HEAD: u8 = 0x07;
/// TCP status: the app connection came from this node's own connection to
/// its local instance: the instance's address is another node's listener for
/// the service (a loop through two nodes).
pub const TCP_FORWARDING_LOOP: u8 = 0x08;

/// The name of a TCP status byte (for logs and metrics).
pub fn tcp_status_name(status: u8) -> &'static str {
    match status {
        TCP_OK => "ok",
        TCP_REFUSED => "refused",
        TCP_DENIED => "denied",
        TCP_UNKNOWN_SERVICE => "unknown-service",
        TCP_UNAUTHORIZED => "unauthorized",
        TCP_NOT_SERVED => "not-served",
        TCP_NOT_TCP => "not-tcp",
        TCP_BAD_HEAD => "bad-head",
        TCP_FORWARDING_LOOP => "forwarding-loop",
        _ => "unknown-status",
    }
}

/// The head of an opaque TCP connection (stream kind [`STREAM_KIND_TCP`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TcpHead {
    /// Target service name.
    pub service: String,
    /// Service identity the caller speaks for (must be named by its certificate).
    pub source: String,
    /// Attempt number, 1 for the first try.
    pub attempt: u32,
    /// `host:port` the app asked for (CONNECT), or empty.
    pub authority: String,
    /// The app connection's peer address as the calling node saw it
    /// (`ip:port`), or empty. Sent after the four fields above, only when
    /// set; see [`TcpHead::encode`].
    #[serde(skip)]
    pub client: String,
}

impl TcpHead {
    /// The head frame's payload: the four serde fields in bincode, then
    /// `client` as one more bincode string when it is set. A node that
    /// predates `client` decodes the four fields and ignores what follows,
    /// and a head from such a node decodes with `client` empty.
    pub fn encode(&self) -> Result<Bytes, FrameError> {
        let mut b = bincode::serde::encode_to_vec(self, bincode_config())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        if !self.client.is_empty() {
            let client = bincode::serde::encode_to_vec(&self.client, bincode_config())
                .map_err(|e| FrameError::Malformed(e.to_string()))?;
            b.extend_from_slice(&client);
        }
        Ok(Bytes::from(b))
    }

    /// Decodes [`TcpHead::encode`]'s payload (with or without `client`).
    pub fn decode(b: &[u8]) -> Result<TcpHead, FrameError> {
        let bad = |e: bincode::error::DecodeError| FrameError::Malformed(e.to_string());
        let (mut head, used): (TcpHead, usize) =
            bincode::serde::decode_from_slice(b, bincode_config()).map_err(bad)?;
        if used < b.len() {
            head.client = bincode::serde::decode_from_slice(&b[used..], bincode_config())
                .map_err(bad)?
                .0;
        }
        Ok(head)
    }
}

/// Frame type: the message head (bincode).
pub const FRAME_HEAD: u8 = 0x01;
/// Frame type: body bytes.
pub const FRAME_DATA: u8 = 0x02;
/// Frame type: trailers (bincode).
pub const FRAME_TRAILERS: u8 = 0x03;
/// Frame type: end of message (empty). A stream that finishes without it was cut short.
pub const FRAME_END: u8 = 0x04;
/// Largest DATA payload a writer emits (64 KiB).
pub const MAX_DATA_FRAME: usize = 64 * 1024;
/// Largest frame a reader accepts (1 MiB); heads and trailers must fit.
pub const MAX_FRAME: usize = 1 << 20;
/// Stream reset code: the sender gave up (deadline, caller went away).
pub const RESET_CANCEL: u32 = 1;
/// Stream reset code: the sender hit an error mid-message.
pub const RESET_ERROR: u32 = 2;

/// A boxed error on the proxy path.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy moves around.
pub type ProxyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Header fields as they travel: lower-case names, raw values.
pub type WireHeaders = Vec<(String, Vec<u8>)>;

/// The head of a request, as sent from the calling node to the serving node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequestHead {
    /// Target service name.
    pub service: String,
    /// Service identity the caller speaks for (must be named by its certificate).
    pub source: String,
    /// Milliseconds left before the caller gives up (0 = no deadline).
    pub deadline_ms: u64,
    /// Attempt number, 1 for the first try.
    pub attempt: u32,
    /// HTTP version the app used: 1 = HTTP/1.x, 2 = HTTP/2.
    pub version: u8,
    /// Method.
    pub method: String,
    /// Path and query (origin form).
    pub uri: String,
    /// Authority the app addressed (`web`, `web:80`), for the Host header.
    pub authority: String,
    /// End-to-end header fields.
    pub headers: WireHeaders,
    /// Whether a body follows (false: the message ends after the head).
    pub has_body: bool,
    /// The app asked to switch protocols (HTTP/1.1 `Upgrade`, e.g.
    /// `websocket`): the token list as it wrote it. Such a request has no
    /// body, and the caller keeps its side of the stream open after END: on
    /// a 101 both sides carry raw bytes after the heads.
    pub upgrade: Option<String>,
}

/// A [`RequestHead`] as both nodes hold it: the same fields and the same
/// bytes on the wire, with the header fields in a map. The calling node
/// encodes the map straight into the frame and the serving node decodes the
/// frame straight into one (invalid fields are dropped, as by
/// [`from_wire`]): no intermediate copy of the fields on either side.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestHeadMap {
    /// Target service name.
    pub service: String,
    /// Service identity the caller speaks for (must be named by its certificate).
    pub source: String,
    /// Milliseconds left before the caller gives up (0 = no deadline).
    pub deadline_ms: u64,
    /// Attempt number, 1 for the first try.
    pub attempt: u32,
    /// HTTP version the app used: 1 = HTTP/1.x, 2 = HTTP/2.
    pub version: u8,
    /// Method.
    pub method: String,
    /// Path and query (origin form).
    pub uri: String,
    /// Authority the app addressed (`web`, `web:80`), for the Host header.
    pub authority: String,
    /// End-to-end header fields.
    #[serde(serialize_with = "wire_ser", deserialize_with = "wire_map")]
    pub headers: HeaderMap,
    /// Whether a body follows (false: the message ends after the head).
    pub has_body: bool,
    /// See [`RequestHead::upgrade`].
    pub upgrade: Option<String>,
}

/// The head of a response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// End-to-end header fields.
    pub headers: WireHeaders,
    /// Whether a body follows.
    pub has_body: bool,
    /// On a 101 answer to an upgrade: the protocol the app switched to (its
    /// `Upgrade` field). Raw bytes follow this message's END.
    pub upgrade: Option<String>,
}

/// Errors reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream read: {0}")]
    Read(String),
    #[error("stream write: {0}")]
    Write(String),
    #[error("stream ended without an end frame")]
    Truncated,
    #[error("bad frame: {0}")]
    Malformed(String),
}

fn bincode_config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes a head or trailer value with bincode 2.
pub fn encode<T: Serialize>(v: &T) -> Result<Bytes, FrameError> {
    bincode::serde::encode_to_vec(v, bincode_config())
        .map(Bytes::from)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Decodes a head or trailer value.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, FrameError> {
    bincode::serde::decode_from_slice(b, bincode_config())
        .map(|(v, _)| v)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Queued bytes above which [`FrameWriter::body`] writes even while the body
/// keeps producing frames at once (bounds what a writer holds).
const FLUSH_AT: usize = 64 * 1024;
/// Payloads up to this size are copied into the queue's buffer so that small
/// frames leave in one write; larger ones are queued by reference.
const COPY_AT: usize = 4 * 1024;

/// Room reserved for a head frame before encoding it (most heads fit).
const HEAD_RESERVE: usize = 512;

/// bincode's writer over the frame queue's buffer.
struct BufWriter<'a>(&'a mut BytesMut);

impl bincode::enc::write::Writer for BufWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        self.0.extend_from_slice(bytes);
        Ok(())
    }
}

/// Appends one frame to `buf`: type, length, and `v` encoded with bincode
/// (the bytes of [`encode`]) written in place. Answers the frame's size; on
/// an error `buf` is as it was.
fn encode_frame<T: Serialize>(buf: &mut BytesMut, ty: u8, v: &T) -> Result<usize, FrameError> {
    let start = buf.len();
    buf.reserve(HEAD_RESERVE);
    buf.extend_from_slice(&[ty, 0, 0, 0, 0]);
    if let Err(e) = bincode::serde::encode_into_writer(v, BufWriter(buf), bincode_config()) {
        buf.truncate(start);
        return Err(FrameError::Malformed(e.to_string()));
    }
    let len = buf.len() - start - 5;
    buf[start + 1..start + 5].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(5 + len)
}

/// Appends one frame to `buf`: type, length, and the payload `write`
/// appends. Answers the frame's size.
fn frame_with(buf: &mut BytesMut, ty: u8, write: impl FnOnce(&mut BytesMut)) -> usize {
    let start = buf.len();
    buf.reserve(HEAD_RESERVE);
    buf.extend_from_slice(&[ty, 0, 0, 0, 0]);
    write(buf);
    let len = buf.len() - start - 5;
    buf[start + 1..start + 5].copy_from_slice(&(len as u32).to_be_bytes());
    5 + len
}

/// Writes frames onto a QUIC send stream.
///
/// Frames are queued and leave together on [`FrameWriter::flush`] (or
/// [`FrameWriter::end`]), so a small message — kind, head, body, END and the
/// stream's FIN — goes out as one write and usually one packet: every write
/// wakes the connection driver, which may send a packet per write.
pub struct FrameWriter {
    send: SendStream,
    /// Small frames, copied together.
    buf: BytesMut,
    /// Queued chunks, in order (`buf` is split into them as needed).
    chunks: Vec<Bytes>,
    queued: usize,
}

impl FrameWriter {
    /// Wraps a send stream.
    pub fn new(send: SendStream) -> Self {
        FrameWriter {
            send,
            buf: BytesMut::new(),
            chunks: Vec::new(),
            queued: 0,
        }
    }

    /// Queues the stream kind byte.
    pub fn kind(&mut self, kind: u8) {
        self.buf.extend_from_slice(&[kind]);
        self.queued += 1;
    }

    /// Queues one frame (sent on the next flush).
    pub fn queue(&mut self, ty: u8, payload: Bytes) {
        self.queued += 5 + payload.len();
        self.buf.reserve(5 + payload.len().min(COPY_AT));
        self.buf.extend_from_slice(&[ty]);
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_be_bytes());
        if payload.len() <= COPY_AT {
            self.buf.extend_from_slice(&payload);
        } else {
            self.chunks.push(self.buf.split().freeze());
            self.chunks.push(payload);
        }
    }

    /// Queues one frame whose payload is `v` encoded with bincode (as by
    /// [`encode`]), written straight into the queue's buffer.
    pub fn queue_encoded<T: Serialize>(&mut self, ty: u8, v: &T) -> Result<(), FrameError> {
        self.queued += encode_frame(&mut self.buf, ty, v)?;
        Ok(())
    }

    /// Queues a request head frame (see [`head`]).
    pub fn queue_request_head(&mut self, h: &RequestHeadMap) {
        self.queued += frame_with(&mut self.buf, FRAME_HEAD, |b| head::encode_request(b, h));
    }

    /// Queues a response head frame (see [`head`]).
    pub fn queue_response_head(
        &mut self,
        status: u16,
        headers: &HeaderMap,
        has_body: bool,
        upgrade: Option<&str>,
    ) {
        self.queued += frame_with(&mut self.buf, FRAME_HEAD, |b| {
            head::encode_response(b, status, headers, has_body, upgrade)
        });
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<(), FrameError> {
        if !self.buf.is_empty() {
            self.chunks.push(self.buf.split().freeze());
        }
        self.queued = 0;
        if self.chunks.is_empty() {
            return Ok(());
        }
        let r = self.send.write_all_chunks(&mut self.chunks).await;
        self.chunks.clear();
        r.map_err(|e| FrameError::Write(e.to_string()))
    }

    /// Writes one frame now (with anything queued before it).
    pub async fn frame(&mut self, ty: u8, payload: Bytes) -> Result<(), FrameError> {
        self.queue(ty, payload);
        self.flush().await
    }

    /// Queues body bytes, split into frames of at most [`MAX_DATA_FRAME`].
    pub fn data(&mut self, mut data: Bytes) {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_FRAME);
            let chunk = data.split_to(n);
            self.queue(FRAME_DATA, chunk);
        }
    }

    /// Writes the END frame (with anything queued) and keeps the stream
    /// open: raw bytes follow (an upgrade).
    pub async fn end_open(&mut self) -> Result<(), FrameError> {
        self.queue(FRAME_END, Bytes::new());
        self.flush().await
    }

    /// Gives back the send stream (after [`FrameWriter::end_open`]: for a
    /// splice).
    pub fn into_send(self) -> SendStream {
        self.send
    }

    /// Writes the END frame (with anything queued) and finishes the stream.
    pub async fn end(&mut self) -> Result<(), FrameError> {
        self.queue(FRAME_END, Bytes::new());
        self.flush().await?;
        self.send
            .finish()
            .map_err(|e| FrameError::Write(e.to_string()))
    }

    /// Resets the stream with `code` (the peer sees the message cut short).
    pub fn reset(&mut self, code: u32) {
        let _ = self.send.reset(VarInt::from_u32(code));
    }

    /// Resolves when the peer stops reading (it gave up or went away).
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let f = self.send.stopped();
        async move {
            let _ = f.await;
        }
    }

    /// Streams `body` as DATA frames, then its trailers, then END, after
    /// anything already queued (a head). Frames the body has ready at once
    /// leave together; before waiting on the body, what is queued is written,
    /// so a slow or interactive body (gRPC streams) is never held back. On a
    /// body error the stream is reset, so the peer never mistakes a cut body
    /// for a whole one.
    pub async fn body<B>(&mut self, body: B) -> Result<(), FrameError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut body = body;
        let mut yielded = false;
        loop {
            if body.is_end_stream() {
                break;
            }
            let mut next = body.frame().now_or_never();
            if next.is_none() && !yielded && self.queued > 0 {
                // A hyper body hands over its first bytes only once polled
                // (the connection task then delivers them): one yield lets
                // the head leave with them in one packet, so the peer has
                // one packet per message to acknowledge, not two.
                yielded = true;
                tokio::task::yield_now().await;
                next = body.frame().now_or_never();
            }
            let next = match next {
                Some(f) => f,
                None => {
                    self.flush().await?;
                    body.frame().await
                }
            };
            match next {
                None => break,
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.data(data),
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.queue_encoded(FRAME_TRAILERS, &WireRef(&trailers))?;
                        }
                    }
                },
                Some(Err(e)) => {
                    self.reset(RESET_ERROR);
                    return Err(FrameError::Read(format!("body: {e}")));
                }
            }
            if self.queued >= FLUSH_AT {
                self.flush().await?;
            }
        }
        self.end().await
    }
}

/// Reads frames from a QUIC receive stream.
pub struct FrameReader {
    recv: RecvStream,
    /// Bytes received and not yet parsed.
    buf: BytesMut,
    ended: bool,
}

/// One frame read from a stream.
#[derive(Debug)]
pub enum InFrame {
    /// A head.
    Head(Bytes),
    /// Body bytes.
    Data(Bytes),
    /// Trailers.
    Trailers(HeaderMap),
    /// The END frame.
    End,
}

impl FrameReader {
    /// Wraps a receive stream.
    pub fn new(recv: RecvStream) -> Self {
        FrameReader {
            recv,
            buf: BytesMut::new(),
            ended: false,
        }
    }

    /// Polls until at least `n` bytes are buffered.
    fn poll_fill(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<Result<(), FrameError>> {
        while self.buf.len() < n {
            // `read_chunk` is cancel-safe: a fresh future per poll loses nothing.
            let read = self.recv.read_chunk(usize::MAX, true);
            match std::task::ready!(std::pin::pin!(read).poll(cx)) {
                Ok(Some(chunk)) => {
                    if self.buf.is_empty() && chunk.bytes.len() >= n {
                        // Take the chunk's buffer as is when it holds all we need.
                        self.buf = BytesMut::from(chunk.bytes);
                    } else {
                        self.buf.extend_from_slice(&chunk.bytes);
                    }
                }
                Ok(None) => return Poll::Ready(Err(FrameError::Truncated)),
                Err(e) => return Poll::Ready(Err(FrameError::Read(e.to_string()))),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads the stream kind byte.
    pub async fn kind(&mut self) -> Result<u8, FrameError> {
        std::future::poll_fn(|cx| self.poll_fill(cx, 1)).await?;
        let b = self.buf.split_to(1);
        Ok(b[0])
    }

    /// Reads the next frame.
    pub async fn next(&mut self) -> Result<InFrame, FrameError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next frame.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Result<InFrame, FrameError>> {
        if self.ended {
            return Poll::Ready(Ok(InFrame::End));
        }
        std::task::ready!(self.poll_fill(cx, 5))?;
        let hdr = &self.buf[..5];
        let ty = hdr[0];
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        if len > MAX_FRAME {
            return Poll::Ready(Err(FrameError::Malformed(format!("frame of {len} bytes"))));
        }
        std::task::ready!(self.poll_fill(cx, 5 + len))?;
        let _ = self.buf.split_to(5);
        let payload = self.buf.split_to(len).freeze();
        Poll::Ready(match ty {
            FRAME_HEAD => Ok(InFrame::Head(payload)),
            FRAME_DATA => Ok(InFrame::Data(payload)),
            FRAME_TRAILERS => {
                decode::<WireHeaders>(&payload).map(|w| InFrame::Trailers(from_wire(&w)))
            }
            FRAME_END => {
                self.ended = true;
                self.take_fin();
                Ok(InFrame::End)
            }
            t => Err(FrameError::Malformed(format!("unknown frame type {t:#x}"))),
        })
    }

    /// Consumes an END frame that is already buffered (it usually shares
    /// the last DATA frame's packet), so a body knows it is complete without
    /// another poll; returns whether the message has ended.
    fn end_if_buffered(&mut self) -> bool {
        if !self.ended && self.buf.len() >= 5 && self.buf[..5] == [FRAME_END, 0, 0, 0, 0] {
            let _ = self.buf.split_to(5);
            self.ended = true;
            self.take_fin();
        }
        self.ended
    }

    /// After END: notes the stream's FIN if it has already arrived (it
    /// usually shares END's packet), so dropping the reader does not send
    /// the peer a needless STOP_SENDING. Never waits.
    fn take_fin(&mut self) {
        if self.buf.is_empty()
            && let Some(Ok(Some(chunk))) = self.recv.read_chunk(1, true).now_or_never()
        {
            // Not a FIN but bytes after END (an upgrade's raw bytes): keep them.
            self.buf.extend_from_slice(&chunk.bytes);
        }
    }

    /// Reads a head frame and decodes it.
    pub async fn head<T: serde::de::DeserializeOwned>(&mut self) -> Result<T, FrameError> {
        match self.next().await? {
            InFrame::Head(b) => decode(&b),
            other => Err(FrameError::Malformed(format!(
                "expected a head, got {other:?}"
            ))),
        }
    }

    /// Reads an opaque TCP connection's head frame ([`TcpHead::decode`]).
    pub async fn tcp_head(&mut self) -> Result<TcpHead, FrameError> {
        match self.next().await? {
            InFrame::Head(b) => TcpHead::decode(&b),
            other => Err(FrameError::Malformed(format!(
                "expected a head, got {other:?}"
            ))),
        }
    }

    /// Reads a request head frame (see [`head`]).
    pub async fn request_head(&mut self) -> Result<RequestHeadMap, FrameError> {
        match self.next().await? {
            InFrame::Head(b) => head::decode_request(&b),
            other => Err(FrameError::Malformed(format!(
                "expected a head, got {other:?}"
            ))),
        }
    }

    /// Reads a response head frame (see [`head`]).
    pub async fn response_head(&mut self) -> Result<ResponseHeadMap, FrameError> {
        match self.next().await? {
            InFrame::Head(b) => head::decode_response(&b),
            other => Err(FrameError::Malformed(format!(
                "expected a head, got {other:?}"
            ))),
        }
    }

    /// Reads the END frame of a message that has no body.
    pub async fn end(&mut self) -> Result<(), FrameError> {
        match self.next().await? {
            InFrame::End => Ok(()),
            other => Err(FrameError::Malformed(format!(
                "expected the end, got {other:?}"
            ))),
        }
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(VarInt::from_u32(code));
    }

    /// Gives back the receive stream and the bytes already read past the
    /// last frame (raw bytes that follow a head, for a splice).
    pub fn into_parts(self) -> (RecvStream, Bytes) {
        (self.recv, self.buf.freeze())
    }

    /// Turns the rest of the stream into an HTTP body. `length` is the
    /// declared Content-Length, if any (it makes the size hint exact).
    pub fn into_body(self, length: Option<u64>) -> ProxyBody {
        StreamedBody {
            reader: self,
            length,
            done: false,
        }
        .boxed_unsync()
    }
}

/// A body read frame by frame from a stream, with an optional exact length.
struct StreamedBody {
    reader: FrameReader,
    length: Option<u64>,
    done: bool,
}

impl Body for StreamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.reader.poll_next(cx));
        Poll::Ready(match next {
            Ok(InFrame::Data(d)) => {
                if let Some(left) = self.length {
                    self.length = Some(left.saturating_sub(d.len() as u64));
                }
                // Lets the caller see the end with the last bytes (hyper
                // then finishes the message without polling again).
                self.reader.end_if_buffered();
                Some(Ok(Frame::data(d)))
            }
            Ok(InFrame::Trailers(t)) => {
                self.reader.end_if_buffered();
                Some(Ok(Frame::trailers(t)))
            }
            Ok(InFrame::End) => {
                self.done = true;
                None
            }
            Ok(InFrame::Head(_)) => {
                self.done = true;
                Some(Err(BoxError::from("unexpected head frame in body")))
            }
            Err(e) => {
                self.done = true;
                Some(Err(BoxError::from(e)))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.reader.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

/// Header fields that belong to one connection only (RFC 9110 §7.6.1), plus
/// the fields named in `Connection`. `te: trailers` is kept (gRPC needs it).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most heads have none of them: one pass over the names, no lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Only the named fields that are there (`close`, `keep-alive`: usually
    // none) are parsed into names.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|n| headers.contains_key(*n))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let te_trailers = headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("trailers")));
    // Only the fields present are removed (usually just `connection`), by
    // the names the map already holds: no name is parsed or looked up twice.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in present {
        headers.remove(n);
    }
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Whether `n` is one of the fields [`strip_hop_by_hop`] handles (a
/// `Connection` field names the others it removes).
fn is_hop_by_hop(n: &HeaderName) -> bool {
    use http::header::{
        CONNECTION, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRANSFER_ENCODING, UPGRADE,
    };
    n == CONNECTION
        || n == TRANSFER_ENCODING
        || n == UPGRADE
        || n == TE
        || n == PROXY_AUTHENTICATE
        || n == PROXY_AUTHORIZATION
        || matches!(
            n.as_str(),
            "proxy-connection" | "keep-alive" | "http2-settings"
        )
}

/// A header map serialized in the wire form of [`WireHeaders`] (the same
/// bytes), without building one.
pub struct WireRef<'a>(pub &'a HeaderMap);

impl Serialize for WireRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (k, v) in self.0 {
            seq.serialize_element(&(k.as_str(), Raw(v.as_bytes())))?;
        }
        seq.end()
    }
}

/// Bytes serialized as one byte string: in bincode the same bytes as a
/// `Vec<u8>` (a length, then the bytes), written at once instead of one
/// element at a time.
struct Raw<'a>(&'a [u8]);

impl Serialize for Raw<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

/// Serializes a header map in the wire form of [`WireHeaders`].
fn wire_ser<S: serde::Serializer>(h: &HeaderMap, s: S) -> Result<S::Ok, S::Error> {
    WireRef(h).serialize(s)
}

/// A [`ResponseHead`] borrowing its fields, for encoding: the same bytes,
/// with no copy of the header fields.
#[derive(Serialize)]
pub struct ResponseHeadRef<'a> {
    /// Status code.
    pub status: u16,
    /// End-to-end header fields.
    pub headers: WireRef<'a>,
    /// Whether a body follows.
    pub has_body: bool,
    /// See [`ResponseHead::upgrade`].
    pub upgrade: Option<&'a str>,
}

/// A [`ResponseHead`] decoded with its header fields straight into a map
/// (invalid fields are dropped, as by [`from_wire`]): the calling side's
/// form, with no intermediate copy of the fields.
#[derive(Deserialize)]
pub struct ResponseHeadMap {
    /// Status code.
    pub status: u16,
    /// End-to-end header fields.
    #[serde(deserialize_with = "wire_map")]
    pub headers: HeaderMap,
    /// Whether a body follows.
    pub has_body: bool,
    /// See [`ResponseHead::upgrade`].
    pub upgrade: Option<String>,
}

/// Deserializes [`WireHeaders`] into a header map: names and values
/// borrowed from the frame (bincode decodes from a slice), each value copied
/// once into its `HeaderValue`.
fn wire_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
    struct Fields;
    impl<'de> serde::de::Visitor<'de> for Fields {
        type Value = HeaderMap;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("header fields")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<HeaderMap, A::Error> {
            let mut h = HeaderMap::with_capacity(seq.size_hint().unwrap_or(0).min(64));
            while let Some((k, v)) = seq.next_element::<(&'de str, &'de [u8])>()? {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_bytes(v),
                ) {
                    h.append(k, v);
                }
            }
            Ok(h)
        }
    }
    d.deserialize_seq(Fields)
}

/// The two heads every proxied request carries ([`RequestHeadMap`] and the
/// response head), coded by hand in exactly bincode's bytes (standard
/// configuration: integers above `u8` as varints, strings and byte strings
/// as a varint length and the bytes, `bool` and `Option` tags as one byte,
/// fields in order). Decoding borrows from the frame: each header value is
/// a slice of it, not a copy. bincode's serde path stays the reference (the
/// tests compare the two) and codes everything else.
pub mod head {
    use bytes::{BufMut, Bytes, BytesMut};
    use http::{HeaderMap, HeaderName, HeaderValue};

    use super::{FrameError, RequestHeadMap, ResponseHeadMap};

    fn varint(buf: &mut BytesMut, v: u64) {
        if v < 251 {
            buf.put_u8(v as u8);
        } else if v <= u64::from(u16::MAX) {
            buf.put_u8(251);
            buf.put_u16_le(v as u16);
        } else if v <= u64::from(u32::MAX) {
            buf.put_u8(252);
            buf.put_u32_le(v as u32);
        } else {
            buf.put_u8(253);
            buf.put_u64_le(v);
        }
    }

    fn bytes(buf: &mut BytesMut, b: &[u8]) {
        varint(buf, b.len() as u64);
        buf.extend_from_slice(b);
    }

    fn fields(buf: &mut BytesMut, h: &HeaderMap) {
        varint(buf, h.len() as u64);
        for (k, v) in h {
            bytes(buf, k.as_str().as_bytes());
            bytes(buf, v.as_bytes());
        }
    }

    fn option_str(buf: &mut BytesMut, s: Option<&str>) {
        match s {
            None => buf.put_u8(0),
            Some(s) => {
                buf.put_u8(1);
                bytes(buf, s.as_bytes());
            }
        }
    }

    /// Appends the encoding of a request head to `buf`.
    pub fn encode_request(buf: &mut BytesMut, h: &RequestHeadMap) {
        bytes(buf, h.service.as_bytes());
        bytes(buf, h.source.as_bytes());
        varint(buf, h.deadline_ms);
        varint(buf, u64::from(h.attempt));
        buf.put_u8(h.version);
        bytes(buf, h.method.as_bytes());
        bytes(buf, h.uri.as_bytes());
        bytes(buf, h.authority.as_bytes());
        fields(buf, &h.headers);
        buf.put_u8(u8::from(h.has_body));
        option_str(buf, h.upgrade.as_deref());
    }

    /// Appends the encoding of a response head to `buf`.
    pub fn encode_response(
        buf: &mut BytesMut,
        status: u16,
        headers: &HeaderMap,
        has_body: bool,
        upgrade: Option<&str>,
    ) {
        varint(buf, u64::from(status));
        fields(buf, headers);
        buf.put_u8(u8::from(has_body));
        option_str(buf, upgrade);
    }

    /// Reads a head out of a frame payload.
    struct Reader<'a> {
        frame: &'a Bytes,
        at: usize,
    }

    fn bad(what: &str) -> FrameError {
        FrameError::Malformed(format!("head: {what}"))
    }

    impl<'a> Reader<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
            let frame: &'a [u8] = self.frame;
            let end = self
                .at
                .checked_add(n)
                .filter(|e| *e <= frame.len())
                .ok_or_else(|| bad("cut short"))?;
            let b = &frame[self.at..end];
            self.at = end;
            Ok(b)
        }

        fn u8(&mut self) -> Result<u8, FrameError> {
            Ok(self.take(1)?[0])
        }

        fn varint(&mut self, max: u64) -> Result<u64, FrameError> {
            let v = match self.u8()? {
                b @ 0..=250 => u64::from(b),
                251 => u64::from(u16::from_le_bytes(
                    self.take(2)?.try_into().expect("2 bytes"),
                )),
                252 => u64::from(u32::from_le_bytes(
                    self.take(4)?.try_into().expect("4 bytes"),
                )),
                253 => u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")),
                _ => return Err(bad("integer")),
            };
            if v > max {
                return Err(bad("integer out of range"));
            }
            Ok(v)
        }

        fn bytes(&mut self) -> Result<&'a [u8], FrameError> {
            let n = self.varint(u64::MAX)?;
            self.take(usize::try_from(n).map_err(|_| bad("length"))?)
        }

        fn str(&mut self) -> Result<&'a str, FrameError> {
            std::str::from_utf8(self.bytes()?).map_err(|_| bad("string not UTF-8"))
        }

        fn bool(&mut self) -> Result<bool, FrameError> {
            match self.u8()? {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(bad("bool")),
            }
        }

        fn option_string(&mut self) -> Result<Option<String>, FrameError> {
            match self.u8()? {
                0 => Ok(None),
                1 => Ok(Some(self.str()?.to_string())),
                _ => Err(bad("option")),
            }
        }

        /// The header fields, each value a slice of the frame; invalid
        /// fields are dropped (as by [`super::from_wire`]). The map has room
        /// for two more (the serving node adds Host and `shoal-forwarded`)
        /// so that adding them does not grow it.
        fn fields(&mut self) -> Result<HeaderMap, FrameError> {
            let n = self.varint(u64::MAX)?;
            let mut h = HeaderMap::with_capacity(n.min(64) as usize + 2);
            for _ in 0..n {
                let k = self.bytes()?;
                let v = self.bytes()?;
                // A valid name is ASCII, so only a refused one needs the
                // UTF-8 check (a name that is not UTF-8 is a bad frame, as
                // in the serde form; a valid string that is no header name
                // is dropped).
                let name = match HeaderName::from_bytes(k) {
                    Ok(name) => name,
                    Err(_) if std::str::from_utf8(k).is_err() => {
                        return Err(bad("string not UTF-8"));
                    }
                    Err(_) => continue,
                };
                if let Ok(v) = HeaderValue::from_maybe_shared(self.frame.slice_ref(v)) {
                    h.append(name, v);
                }
            }
            Ok(h)
        }
    }

    /// Decodes a request head frame.
    pub fn decode_request(frame: &Bytes) -> Result<RequestHeadMap, FrameError> {
        let mut r = Reader { frame, at: 0 };
        Ok(RequestHeadMap {
            service: r.str()?.to_string(),
            source: r.str()?.to_string(),
            deadline_ms: r.varint(u64::MAX)?,
            attempt: r.varint(u64::from(u32::MAX))? as u32,
            version: r.u8()?,
            method: r.str()?.to_string(),
            uri: r.str()?.to_string(),
            authority: r.str()?.to_string(),
            headers: r.fields()?,
            has_body: r.bool()?,
            upgrade: r.option_string()?,
        })
    }

    /// Decodes a response head frame.
    pub fn decode_response(frame: &Bytes) -> Result<ResponseHeadMap, FrameError> {
        let mut r = Reader { frame, at: 0 };
        Ok(ResponseHeadMap {
            status: r.varint(u64::from(u16::MAX))? as u16,
            headers: r.fields()?,
            has_body: r.bool()?,
            upgrade: r.option_string()?,
        })
    }
}

/// Header map to wire form.
pub fn to_wire(h: &HeaderMap) -> WireHeaders {
    h.iter()
        .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// Wire form to a header map (invalid fields are dropped).
pub fn from_wire(w: &WireHeaders) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(w.len());
    for (k, v) in w {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_bytes(v),
        ) {
            h.append(k, v);
        }
    }
    h
}

/// The Content-Length a header map declares, if any.
pub fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_head_decodes_straight_into_a_header_map() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("1024"));
        h.append("x-custom", HeaderValue::from_static("a"));
        h.append("x-custom", HeaderValue::from_static("b"));
        let mut wire = to_wire(&h);
        wire.push(("bad name".into(), b"dropped".to_vec()));
        let owned = ResponseHead {
            status: 200,
            headers: wire,
            has_body: false,
            upgrade: Some("websocket".into()),
        };
        let m: ResponseHeadMap = decode(&encode(&owned).unwrap()).unwrap();
        assert_eq!(m.status, 200);
        assert_eq!(m.headers, h);
        assert_eq!(m.headers, from_wire(&owned.headers));
        assert!(!m.has_body);
        assert_eq!(m.upgrade.as_deref(), Some("websocket"));
    }

    #[test]
    fn a_borrowed_response_head_encodes_to_the_same_bytes() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert(
            "x-bin",
            HeaderValue::from_bytes(&[0x80, 0xff, b'z']).unwrap(),
        );
        for upgrade in [None, Some("websocket")] {
            let owned = ResponseHead {
                status: 201,
                headers: to_wire(&h),
                has_body: true,
                upgrade: upgrade.map(str::to_string),
            };
            let borrowed = ResponseHeadRef {
                status: 201,
                headers: WireRef(&h),
                has_body: true,
                upgrade,
            };
            let bytes = encode(&borrowed).unwrap();
            assert_eq!(bytes, encode(&owned).unwrap());
            assert_eq!(decode::<ResponseHead>(&bytes).unwrap(), owned);
        }
    }

    #[test]
    fn a_request_head_map_has_the_bytes_of_the_owned_head() {
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.append("x-multi", HeaderValue::from_static("1"));
        h.append("x-multi", HeaderValue::from_static("2"));
        h.insert(
            "x-bin",
            HeaderValue::from_bytes(&[0x80, 0xff, b'z']).unwrap(),
        );
        for upgrade in [None, Some("websocket".to_string())] {
            let owned = RequestHead {
                service: "web".into(),
                source: "client".into(),
                deadline_ms: 1500,
                attempt: 2,
                version: 1,
                method: "GET".into(),
                uri: "/a?b=c".into(),
                authority: "web:80".into(),
                headers: to_wire(&h),
                has_body: false,
                upgrade: upgrade.clone(),
            };
            let map = RequestHeadMap {
                service: "web".into(),
                source: "client".into(),
                deadline_ms: 1500,
                attempt: 2,
                version: 1,
                method: "GET".into(),
                uri: "/a?b=c".into(),
                authority: "web:80".into(),
                headers: h.clone(),
                has_body: false,
                upgrade,
            };
            let bytes = encode(&map).unwrap();
            assert_eq!(bytes, encode(&owned).unwrap());
            assert_eq!(decode::<RequestHead>(&bytes).unwrap(), owned);
            let back: RequestHeadMap = decode(&bytes).unwrap();
            assert_eq!(back.headers, h);
            assert_eq!(
                (
                    back.service.as_str(),
                    back.uri.as_str(),
                    back.authority.as_str()
                ),
                ("web", "/a?b=c", "web:80")
            );
            assert_eq!(back.upgrade, owned.upgrade);
        }
        // A field that is no valid header is dropped on the way in.
        let mut bad = RequestHead {
            service: "web".into(),
            source: String::new(),
            deadline_ms: 0,
            attempt: 1,
            version: 2,
            method: "POST".into(),
            uri: "/".into(),
            authority: "web".into(),
            headers: to_wire(&h),
            has_body: true,
            upgrade: None,
        };
        bad.headers.push(("bad name".into(), b"dropped".to_vec()));
        let back: RequestHeadMap = decode(&encode(&bad).unwrap()).unwrap();
        assert_eq!(back.headers, h);
        assert!(back.has_body);
    }

    fn sample_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.append("set-cookie", HeaderValue::from_static("a=1"));
        h.append("set-cookie", HeaderValue::from_static("b=2"));
        h.insert(
            "x-bin",
            HeaderValue::from_bytes(&[0x80, 0xff, b'z']).unwrap(),
        );
        // Lengths past one varint byte (250).
        h.insert("x-long", HeaderValue::from_str(&"v".repeat(300)).unwrap());
        h.insert(
            "x-longer",
            HeaderValue::from_str(&"w".repeat(70_000)).unwrap(),
        );
        h
    }

    #[test]
    fn the_hand_coded_request_head_is_bincodes() {
        let h = sample_headers();
        for (deadline_ms, attempt, upgrade) in [
            (0, 1, None),
            (250, 2, Some("websocket")),
            (251, 300, None),
            (70_000, 70_000, Some("h2c, websocket")),
            (u64::from(u32::MAX) + 1, u32::MAX, None),
        ] {
            let map = RequestHeadMap {
                service: "web".into(),
                source: "client".into(),
                deadline_ms,
                attempt,
                version: 2,
                method: "PATCH".into(),
                uri: format!("/{}", "p".repeat(260)),
                authority: "web:8080".into(),
                headers: h.clone(),
                has_body: upgrade.is_none(),
                upgrade: upgrade.map(str::to_string),
            };
            let mut buf = BytesMut::new();
            head::encode_request(&mut buf, &map);
            let reference = encode(&map).unwrap();
            assert_eq!(&buf[..], &reference[..]);
            let owned: RequestHead = decode(&reference).unwrap();
            let back = head::decode_request(&reference).unwrap();
            assert_eq!(back.headers, from_wire(&owned.headers));
            assert_eq!(
                (
                    back.service.as_str(),
                    back.source.as_str(),
                    back.deadline_ms,
                    back.attempt,
                    back.version,
                    back.method.as_str(),
                    back.uri.as_str(),
                    back.authority.as_str(),
                    back.has_body,
                    back.upgrade.as_deref(),
                ),
                (
                    owned.service.as_str(),
                    owned.source.as_str(),
                    owned.deadline_ms,
                    owned.attempt,
                    owned.version,
                    owned.method.as_str(),
                    owned.uri.as_str(),
                    owned.authority.as_str(),
                    owned.has_body,
                    owned.upgrade.as_deref(),
                )
            );
        }
    }

    #[test]
    fn the_hand_coded_response_head_is_bincodes() {
        let h = sample_headers();
        for (status, has_body, upgrade) in [
            (200, true, None),
            (101, false, Some("websocket")),
            (404, false, None),
            (599, true, None),
        ] {
            let mut buf = BytesMut::new();
            head::encode_response(&mut buf, status, &h, has_body, upgrade);
            let owned = ResponseHead {
                status,
                headers: to_wire(&h),
                has_body,
                upgrade: upgrade.map(str::to_string),
            };
            let reference = encode(&owned).unwrap();
            assert_eq!(&buf[..], &reference[..]);
            let back = head::decode_response(&reference).unwrap();
            assert_eq!(back.status, status);
            assert_eq!(back.headers, h);
            assert_eq!(back.has_body, has_body);
            assert_eq!(back.upgrade.as_deref(), upgrade);
        }
    }

    #[test]
    fn a_tcp_head_carries_its_client_after_the_four_fields_both_ways_compatible() {
        let head = TcpHead {
            service: "bulk".into(),
            source: "client".into(),
            attempt: 2,
            authority: String::new(),
            client: "127.0.0.1:50123".into(),
        };
        let bytes = head.encode().unwrap();
        assert_eq!(TcpHead::decode(&bytes).unwrap(), head);
        // The four fields are bincode's encoding of the struct as before.
        let four = encode(&head).unwrap();
        assert!(bytes.starts_with(&four) && bytes.len() > four.len());
        // A node that predates `client` reads the four fields and ignores
        // the rest; a head from it decodes with no client.
        let old: TcpHead = decode(&bytes).unwrap();
        assert_eq!((old.service.as_str(), old.attempt), ("bulk", 2));
        assert_eq!(old.client, "");
        let from_old = TcpHead::decode(&four).unwrap();
        assert_eq!(from_old.client, "");
        assert_eq!(from_old.source, "client");
        // No client: the bytes are exactly the old ones.
        let none = TcpHead {
            client: String::new(),
            ..head.clone()
        };
        assert_eq!(none.encode().unwrap(), four);
        // A cut client string is a bad head, not a missing client.
        assert!(TcpHead::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn the_hand_decoder_drops_bad_fields_and_refuses_bad_heads() {
        let mut wire = to_wire(&sample_headers());
        wire.push(("bad name".into(), b"dropped".to_vec()));
        wire.push(("x-bad-value".into(), b"a\nb".to_vec()));
        let owned = ResponseHead {
            status: 200,
            headers: wire,
            has_body: true,
            upgrade: None,
        };
        let bytes = encode(&owned).unwrap();
        let back = head::decode_response(&bytes).unwrap();
        assert_eq!(back.headers, sample_headers());
        // Cut anywhere, the head is refused (as bincode refuses it).
        for cut in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
            let short = bytes.slice(..cut);
            assert!(head::decode_response(&short).is_err(), "cut at {cut}");
            assert!(decode::<ResponseHead>(&short).is_err(), "cut at {cut}");
        }
        // A bool that is neither 0 nor 1, and a name that is not UTF-8.
        let mut b = BytesMut::new();
        head::encode_response(&mut b, 200, &HeaderMap::new(), true, None);
        b[2] = 7;
        assert!(head::decode_response(&b.freeze()).is_err());
        let mut b = BytesMut::new();
        b.extend_from_slice(&[200, 1, 2, 0xff, 0xfe, 1, b'v', 0, 0]);
        let b = b.freeze();
        assert!(head::decode_response(&b).is_err());
        assert!(decode::<ResponseHead>(&b).is_err());
    }

    #[test]
    fn a_queued_encoded_frame_is_the_encoded_bytes_framed() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("5"));
        let rh = ResponseHeadRef {
            status: 200,
            headers: WireRef(&h),
            has_body: true,
            upgrade: None,
        };
        let payload = encode(&rh).unwrap();
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&[STREAM_KIND_HTTP]);
        let n = encode_frame(&mut buf, FRAME_HEAD, &rh).unwrap();
        assert_eq!(n, 5 + payload.len());
        let mut want = vec![STREAM_KIND_HTTP, FRAME_HEAD];
        want.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        want.extend_from_slice(&payload);
        assert_eq!(&buf[..], &want[..]);
    }

    #[test]
    fn a_keep_alive_connection_field_is_removed_and_nothing_else() {
        // nginx answers with `connection: keep-alive`.
        let mut h = HeaderMap::new();
        h.insert("server", HeaderValue::from_static("nginx"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert("content-length", HeaderValue::from_static("1024"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["server", "content-length"]);
        // A field named by `Connection` goes, whatever the case of the token.
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Close, X-Hop"));
        h.insert("close", HeaderValue::from_static("a field so named"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-end", HeaderValue::from_static("2"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("te", HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-end"]);
    }

    #[test]
    fn heads_without_hop_by_hop_fields_are_left_as_they_are() {
        let mut h = HeaderMap::new();
        h.insert("accept", HeaderValue::from_static("*/*"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("connection", HeaderValue::from_static("x-keep"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        strip_hop_by_hop(&mut h);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["accept", "te"]);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn heads_round_trip() {
        let head = RequestHead {
            service: "web".into(),
            source: "client".into(),
            deadline_ms: 1500,
            attempt: 2,
            version: 2,
            method: "POST".into(),
            uri: "/a?b=c".into(),
            authority: "web".into(),
            headers: vec![("traceparent".into(), b"00-ab-cd-01".to_vec())],
            has_body: true,
            upgrade: Some("websocket".into()),
        };
        let back: RequestHead = decode(&encode(&head).unwrap()).unwrap();
        assert_eq!(back, head);
    }

    #[test]
    fn strips_hop_by_hop_but_keeps_te_trailers() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("te", HeaderValue::from_static("trailers, deflate"));
        h.insert("traceparent", HeaderValue::from_static("00-1-2-01"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["traceparent"], "00-1-2-01");
    }
}
