//! The framing of one proxied HTTP exchange on one QUIC bidirectional stream
//! (see `docs/FRAMES.md`), and the body types that stream it.
//!
//! This module owns bytes on the wire between nodes; it knows nothing about
//! routing, balancing or the local instance.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures::Stream;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};

/// First byte of a bidirectional stream that carries one HTTP exchange.
pub const STREAM_KIND_HTTP: u8 = 0x01;
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

/// Writes frames onto a QUIC send stream.
pub struct FrameWriter {
    send: SendStream,
}

impl FrameWriter {
    /// Wraps a send stream.
    pub fn new(send: SendStream) -> Self {
        FrameWriter { send }
    }

    /// Writes the stream kind byte.
    pub async fn kind(&mut self, kind: u8) -> Result<(), FrameError> {
        self.send
            .write_all(&[kind])
            .await
            .map_err(|e| FrameError::Write(e.to_string()))
    }

    /// Writes one frame.
    pub async fn frame(&mut self, ty: u8, payload: Bytes) -> Result<(), FrameError> {
        let mut hdr = BytesMut::with_capacity(5);
        hdr.extend_from_slice(&[ty]);
        hdr.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        let mut chunks = [hdr.freeze(), payload];
        self.send
            .write_all_chunks(&mut chunks)
            .await
            .map_err(|e| FrameError::Write(e.to_string()))
    }

    /// Writes body bytes, split into frames of at most [`MAX_DATA_FRAME`].
    pub async fn data(&mut self, mut data: Bytes) -> Result<(), FrameError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA_FRAME);
            let chunk = data.split_to(n);
            self.frame(FRAME_DATA, chunk).await?;
        }
        Ok(())
    }

    /// Writes the END frame and finishes the stream.
    pub async fn end(&mut self) -> Result<(), FrameError> {
        self.frame(FRAME_END, Bytes::new()).await?;
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

    /// Streams `body` as DATA frames, then its trailers, then END. On a body
    /// error the stream is reset, so the peer never mistakes a cut body for a
    /// whole one.
    pub async fn body<B>(&mut self, body: B) -> Result<(), FrameError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let mut body = body;
        loop {
            match body.frame().await {
                None => break,
                Some(Ok(frame)) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            self.data(data).await?;
                            continue;
                        }
                        Err(f) => f,
                    };
                    if let Ok(trailers) = frame.into_trailers() {
                        self.frame(FRAME_TRAILERS, encode(&to_wire(&trailers))?)
                            .await?;
                    }
                }
                Some(Err(e)) => {
                    self.reset(RESET_ERROR);
                    return Err(FrameError::Read(format!("body: {e}")));
                }
            }
        }
        self.end().await
    }
}

/// Reads frames from a QUIC receive stream.
pub struct FrameReader {
    recv: RecvStream,
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
        FrameReader { recv, ended: false }
    }

    /// Reads the stream kind byte.
    pub async fn kind(&mut self) -> Result<u8, FrameError> {
        let mut b = [0u8; 1];
        self.recv
            .read_exact(&mut b)
            .await
            .map_err(|e| FrameError::Read(e.to_string()))?;
        Ok(b[0])
    }

    /// Reads the next frame.
    pub async fn next(&mut self) -> Result<InFrame, FrameError> {
        if self.ended {
            return Ok(InFrame::End);
        }
        let mut hdr = [0u8; 5];
        match self.recv.read_exact(&mut hdr).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
        let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
        if len > MAX_FRAME {
            return Err(FrameError::Malformed(format!("frame of {len} bytes")));
        }
        let mut buf = BytesMut::zeroed(len);
        match self.recv.read_exact(&mut buf).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Read(e.to_string())),
        }
        let payload = buf.freeze();
        match hdr[0] {
            FRAME_HEAD => Ok(InFrame::Head(payload)),
            FRAME_DATA => Ok(InFrame::Data(payload)),
            FRAME_TRAILERS => Ok(InFrame::Trailers(from_wire(&decode::<WireHeaders>(
                &payload,
            )?))),
            FRAME_END => {
                self.ended = true;
                Ok(InFrame::End)
            }
            t => Err(FrameError::Malformed(format!("unknown frame type {t:#x}"))),
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

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(VarInt::from_u32(code));
    }

    /// Turns the rest of the stream into an HTTP body. `length` is the
    /// declared Content-Length, if any (it makes the size hint exact).
    pub fn into_body(self, length: Option<u64>) -> ProxyBody {
        let stream = futures::stream::unfold(Some(self), |reader| async move {
            let mut reader = reader?;
            match reader.next().await {
                Ok(InFrame::Data(d)) => Some((Ok(Frame::data(d)), Some(reader))),
                Ok(InFrame::Trailers(t)) => Some((Ok(Frame::trailers(t)), Some(reader))),
                Ok(InFrame::End) => None,
                Ok(InFrame::Head(_)) => {
                    Some((Err(BoxError::from("unexpected head frame in body")), None))
                }
                Err(e) => Some((Err(BoxError::from(e)), None)),
            }
        });
        StreamedBody {
            inner: Box::pin(stream),
            length,
            done: false,
        }
        .boxed_unsync()
    }
}

/// A body fed by a stream of frames, with an optional exact length.
struct StreamedBody {
    inner: Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>,
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
        let r = self.inner.as_mut().poll_next(cx);
        match &r {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.done = true,
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(left)) = (f.data_ref(), self.length) {
                    self.length = Some(left.saturating_sub(d.len() as u64));
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.done
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
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "http2-settings",
    ] {
        headers.remove(n);
    }
    let te_trailers = headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("trailers")));
    headers.remove(http::header::TE);
    if te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
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
