//! One attempt at one endpoint: the request body as the retry loop holds it
//! ([`Source`]), and the exchange itself — straight to the local instance
//! when it is behind this node, else over one QUIC stream to the serving
//! node after checking that the peer's certificate names the node and the
//! service. The only I/O on the calling side besides the listener.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;
use tokio::sync::oneshot;

use crate::access::Trace;
use crate::balance::Target;
use crate::body::{ReqBody, empty, guarded, replay};
use crate::frame::{
    self, BoxError, FrameReader, FrameWriter, ProxyBody, RESET_CANCEL, RequestHeadMap,
    ResponseHead, ResponseHeadMap, STREAM_KIND_HTTP,
};
use crate::inbound;
use crate::state::{Shared, peer_serves};
use crate::upgrade::{self, MeshTunnel};

/// A request body as the retry loop holds it.
pub(crate) enum Source {
    /// Buffered (at most the replay limit): can be sent again.
    Replay(Bytes, Option<HeaderMap>),
    /// Streaming: can be sent once.
    Once(Option<ProxyBody>),
}

impl Source {
    /// Buffers `body` when it may be replayed: an idempotent request whose
    /// body is known to fit in `limit` bytes (a request without a body
    /// always can). Fails when such a body cannot be read.
    /// Request body bytes read are counted into `trace`.
    pub async fn read(
        body: ReqBody,
        idempotent: bool,
        limit: usize,
        trace: &Arc<Trace>,
    ) -> Result<Self, BoxError> {
        if body.is_end_stream() {
            return Ok(Source::Replay(Bytes::new(), None));
        }
        let fits = body
            .size_hint()
            .upper()
            .is_some_and(|n| n as usize <= limit);
        if !(idempotent && fits) {
            return Ok(Source::Once(Some(trace.count_request(body))));
        }
        let c = Limited::new(body, limit).collect().await?;
        let trailers = c.trailers().cloned();
        let data = c.to_bytes();
        trace.request_bytes(data.len());
        Ok(Source::Replay(data, trailers))
    }

    /// Whether the body is buffered.
    pub fn replayable(&self) -> bool {
        matches!(self, Source::Replay(..))
    }

    /// Whether a body can still be sent.
    pub fn resendable(&self) -> bool {
        matches!(self, Source::Replay(..) | Source::Once(Some(_)))
    }

    /// The body for the next attempt (`None` once a streaming body is spent).
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            Source::Replay(data, trailers) => Some(replay(data.clone(), trailers.clone())),
            Source::Once(b) => b.take(),
        }
    }
}

/// Why an attempt failed without a response.
pub(crate) enum Failed {
    /// Nothing reached the peer (dial, stream open or head write failed).
    Connect(String),
    /// The exchange broke after the head was sent: outcome unknown.
    Reset(String),
    /// The QUIC peer's certificate does not name the service (or the node
    /// gossip put at that address): nothing was sent.
    NotServing(Arc<transport::Identity>),
}

/// One try at `target`; answers the response and the time to its head.
/// `guard` lives as long as the response body.
pub(crate) async fn attempt(
    shared: &Shared,
    target: &Target,
    head: &RequestHeadMap,
    source: &mut Source,
    guard: Box<dyn Any + Send>,
) -> Result<(Response<ProxyBody>, Duration), Failed> {
    let started = Instant::now();
    if target.is_self {
        let body = source.take().unwrap_or_else(empty);
        let identity = shared.endpoint.identity();
        // Boxed: the local path's state stays out of every remote attempt.
        let resp = Box::pin(inbound::handle(shared, &identity, head.clone(), body)).await;
        let rtt = started.elapsed();
        return Ok((resp.map(|b| guarded(b, vec![guard])), rtt));
    }
    let connect = |e: String| Failed::Connect(e);
    // Who answers at that address? Only a peer whose certificate names the
    // service (and the node) gets the request: no stream is opened otherwise.
    let conn = shared
        .endpoint
        .connect(target.addr)
        .await
        .map_err(|e| connect(e.to_string()))?;
    if !peer_serves(&conn.peer, target) {
        return Err(Failed::NotServing(conn.peer));
    }
    let (conn, mut send, recv) = shared
        .endpoint
        .open_bi(target.addr)
        .await
        .map_err(|e| connect(e.to_string()))?;
    // The cached connection may have been replaced since: check again
    // before the first byte.
    if !peer_serves(&conn.peer, target) {
        let _ = send.reset(RESET_CANCEL.into());
        return Err(Failed::NotServing(conn.peer));
    }
    let mut writer = FrameWriter::new(send);
    writer.kind(STREAM_KIND_HTTP);
    writer.queue_request_head(head);
    let mut guards: Vec<Box<dyn Any + Send>> = vec![guard];
    if head.upgrade.is_some() {
        // An upgrade has no body and keeps the stream open after END.
        writer
            .end_open()
            .await
            .map_err(|e| connect(e.to_string()))?;
        let reader = FrameReader::new(recv);
        return upgrade_answer(writer, reader, &head.service, started, guards).await;
    }
    match source.take() {
        Some(body) if !body.is_end_stream() => {
            writer.flush().await.map_err(|e| connect(e.to_string()))?;
            let (cancel_tx, cancel_rx) = oneshot::channel::<()>();
            guards.push(Box::new(cancel_tx));
            tokio::spawn(async move {
                tokio::select! {
                    r = writer.body(body) => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "request body cut short");
                        }
                    }
                    _ = cancel_rx => writer.reset(RESET_CANCEL),
                }
            });
        }
        // No body: kind, head, END and FIN leave in one write.
        _ => writer.end().await.map_err(|e| connect(e.to_string()))?,
    }
    let mut reader = FrameReader::new(recv);
    let rh: ResponseHeadMap = reader
        .response_head()
        .await
        .map_err(|e| Failed::Reset(e.to_string()))?;
    let rtt = started.elapsed();
    let headers = rh.headers;
    let body = if rh.has_body {
        reader.into_body(frame::content_length(&headers))
    } else {
        // Read END (and FIN) so the stream closes without a STOP_SENDING.
        reader
            .end()
            .await
            .map_err(|e| Failed::Reset(e.to_string()))?;
        empty()
    };
    let mut resp = Response::new(guarded(body, guards));
    *resp.status_mut() = StatusCode::from_u16(rh.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = headers;
    Ok((resp, rtt))
}

/// The answer to an upgrade request: a 101 (with its protocol) carries the
/// stream on in its extensions ([`MeshTunnel`]), raw bytes from here on;
/// anything else is an ordinary response, and our side of the stream is
/// finished when `writer` drops.
async fn upgrade_answer(
    writer: FrameWriter,
    mut reader: FrameReader,
    service: &str,
    started: Instant,
    guards: Vec<Box<dyn Any + Send>>,
) -> Result<(Response<ProxyBody>, Duration), Failed> {
    let rh: ResponseHead = reader
        .head()
        .await
        .map_err(|e| Failed::Reset(e.to_string()))?;
    let rtt = started.elapsed();
    let mut headers = frame::from_wire(&rh.headers);
    let status = StatusCode::from_u16(rh.status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let body = if rh.has_body {
            reader.into_body(frame::content_length(&headers))
        } else {
            reader
                .end()
                .await
                .map_err(|e| Failed::Reset(e.to_string()))?;
            empty()
        };
        let mut resp = Response::new(guarded(body, guards));
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        return Ok((resp, rtt));
    }
    let Some(token) = rh.upgrade.as_deref() else {
        return Err(Failed::Reset("a 101 that names no protocol".into()));
    };
    reader
        .end()
        .await
        .map_err(|e| Failed::Reset(e.to_string()))?;
    upgrade::restore(&mut headers, token);
    let (recv, ahead) = reader.into_parts();
    let mut resp = Response::new(guarded(empty(), guards));
    *resp.status_mut() = status;
    resp.extensions_mut().insert(MeshTunnel::new(
        writer.into_send(),
        recv,
        ahead,
        service.to_string(),
    ));
    *resp.headers_mut() = headers;
    Ok((resp, rtt))
}
