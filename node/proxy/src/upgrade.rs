//! HTTP/1.1 Upgrade (WebSocket and the like) through the mesh.
//!
//! The outbound listener keeps an upgrade request's `Upgrade` token (it is
//! otherwise a hop-by-hop field) and carries it in the wire head
//! ([`RequestHead::upgrade`](crate::frame::RequestHead)); the serving node
//! sends `Connection: upgrade` and `Upgrade` to the app over HTTP/1.1
//! (`upstream.rs`). An app's `101 Switching Protocols` comes back with the
//! protocol it chose, and then both nodes splice raw bytes over the same
//! QUIC stream, after the heads ([`crate::splice`]): client connection ↔
//! stream on the calling node, stream ↔ app connection on the serving node.
//! An answer other than 101 is passed on unchanged, and the connection goes
//! on as plain HTTP. An upgrade to an instance behind this same node (or an
//! egress or pass-through destination) joins the two local connections
//! directly.
//!
//! Not carried: `h2c` (RFC 9113 §3.1 deprecates the HTTP/1.1 upgrade to
//! HTTP/2; the listener ignores it and answers in HTTP/1.1, as RFC 9110
//! §7.8 lets a server do — clients speak h2c with prior knowledge instead),
//! upgrades over HTTP/2 (extended CONNECT), and upgrade requests with a
//! body (their `Upgrade` is dropped and they are served as plain requests).
//!
//! This module owns recognising an upgrade and the two ends of the tunnel;
//! the byte pump itself is `splice.rs`.

use std::any::Any;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use quinn::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::body::guarded;
use crate::frame::{self, ProxyBody};
use crate::splice::{Outcome, Side, Splice, Spliced};
use crate::state::Shared;
use crate::stats::Direction;

/// Longest `Upgrade` token list carried (longer ones are not upgrades).
pub(crate) const MAX_UPGRADE: usize = 256;

/// An upgrade request's token list (`websocket`), kept in the request's
/// extensions from the listener to the wire head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Requested(pub String);

/// The QUIC side of a tunnel: the stream a 101 came back on and the raw
/// bytes already read past its head. In the 101 response's extensions
/// (`attempt.rs` puts it there; the listener takes it).
#[derive(Clone)]
pub(crate) struct MeshTunnel {
    streams: Arc<Mutex<Option<(SendStream, RecvStream, Bytes)>>>,
    /// The service the tunnel reaches (its TCP metrics edge).
    service: String,
}

impl MeshTunnel {
    /// Wraps the stream halves and the bytes read ahead, to `service`.
    pub fn new(send: SendStream, recv: RecvStream, ahead: Bytes, service: String) -> Self {
        MeshTunnel {
            streams: Arc::new(Mutex::new(Some((send, recv, ahead)))),
            service,
        }
    }

    fn take(&self) -> Option<(SendStream, RecvStream, Bytes, String)> {
        let (s, r, a) = self.streams.lock().ok()?.take()?;
        Some((s, r, a, self.service.clone()))
    }
}

/// The token list of a request this mesh upgrades: HTTP/1.1, `Connection`
/// names `upgrade`, an `Upgrade` field that is not `h2c`, no body.
pub(crate) fn requested<B: Body>(req: &Request<B>) -> Option<String> {
    if req.version() != Version::HTTP_11 || !req.body().is_end_stream() {
        return None;
    }
    let h = req.headers();
    let asks = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    let token = h.get(http::header::UPGRADE)?.to_str().ok()?.trim();
    let h2c = token
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("h2c"));
    (!token.is_empty() && !h2c && token.len() <= MAX_UPGRADE).then(|| token.to_string())
}

/// Puts `Connection: upgrade` and `Upgrade: token` back on a request or a
/// 101 (after hop-by-hop fields were removed).
pub(crate) fn restore(headers: &mut HeaderMap, token: &str) {
    if let Ok(v) = HeaderValue::from_str(token) {
        headers.insert(http::header::UPGRADE, v);
        headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("upgrade"),
        );
    }
}

/// The protocol a response switches to: its `Upgrade` field, if a 101.
pub(crate) fn switched_to<B>(resp: &Response<B>) -> Option<String> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    resp.headers()
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Calling node: the answer to a request that asked for no upgrade. A 101
/// (a confused or lying app or peer) would leave the client's connection in
/// an unknown protocol: it becomes 502 `upstream-reset`.
pub(crate) fn plain_answer(
    resp: Response<ProxyBody>,
    guards: Vec<Box<dyn Any + Send>>,
) -> Response<ProxyBody> {
    unasked_switch(resp).map(|b| guarded(b, guards))
}

/// `resp`, unless it switches protocols for a request that asked no
/// upgrade: then a 502.
pub(crate) fn unasked_switch(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        tracing::debug!("a 101 answer to a request that asked for no upgrade; answering 502");
        crate::error::MeshError::UpstreamReset
            .response_with("the service switched protocols without being asked")
    } else {
        resp
    }
}

/// Calling node: the answer to an upgrade request the app made. A 101
/// goes back with `Connection`/`Upgrade` and the client's connection is
/// then joined to the QUIC stream it came on (or to the local app's
/// connection); `guards` live as long as the tunnel, which ends after
/// `--tcp-idle-timeout` without a byte and is counted in the TCP metrics
/// (edge: this node's source service → the service). Any other answer is
/// returned as it is, `guards` living as long as its body.
pub(crate) fn answer(
    shared: &Shared,
    mut resp: Response<ProxyBody>,
    client: OnUpgrade,
    guards: Vec<Box<dyn Any + Send>>,
) -> Response<ProxyBody> {
    let idle = shared.config.tcp_idle_timeout;
    let Some(token) = switched_to(&resp) else {
        return resp.map(|b| guarded(b, guards));
    };
    let mesh = resp
        .extensions_mut()
        .remove::<MeshTunnel>()
        .and_then(|t| t.take());
    let local = match mesh {
        Some(_) => None,
        None => resp.extensions_mut().remove::<OnUpgrade>(),
    };
    if mesh.is_none() && local.is_none() {
        tracing::debug!("a 101 without a connection to join; answering 502");
        return crate::error::MeshError::UpstreamReset
            .response_with("the upgraded connection was lost")
            .map(|b| guarded(b, guards));
    }
    frame::strip_hop_by_hop(resp.headers_mut());
    restore(resp.headers_mut(), &token);
    let tcp = shared.tcp.clone();
    let source = match shared.source_service() {
        s if s.is_empty() => "unknown".to_string(),
        s => s,
    };
    tokio::spawn(async move {
        let _guards = guards;
        let client = match client.await {
            Ok(io) => TokioIo::new(io),
            Err(e) => {
                tracing::debug!(error = %e, "the client's connection did not upgrade");
                return;
            }
        };
        match (mesh, local) {
            (Some((send, recv, ahead, service)), _) => {
                let open = tcp.opened(Direction::Outbound, &source, &service);
                let done = Splice::new(idle)
                    .prefetched(ahead)
                    .run_io(client, send, recv)
                    .await;
                log_end("outbound", &token, &done);
                tcp.closed(open, &done);
            }
            (None, Some(app)) => match app.await {
                Ok(app) => {
                    let done = join(client, TokioIo::new(app), idle).await;
                    log_end("local", &token, &done);
                }
                Err(e) => tracing::debug!(error = %e, "the app's connection did not upgrade"),
            },
            (None, None) => {}
        }
    });
    resp
}

/// Serving node: the app's upgraded connection (from its 101 answer)
/// spliced to the stream the request came on; `ahead` are raw bytes the
/// caller sent after its head. Counted in the TCP metrics on the edge
/// `(source, service)`, ended after `--tcp-idle-timeout` without a byte.
pub(crate) async fn serve(
    shared: &Shared,
    app: OnUpgrade,
    (send, recv, ahead): (SendStream, RecvStream, Bytes),
    token: &str,
    (source, service): (&str, &str),
) {
    match app.await {
        Ok(io) => {
            let open = shared.tcp.opened(Direction::Inbound, source, service);
            let done = Splice::new(shared.config.tcp_idle_timeout)
                .prefetched(ahead)
                .run_io(TokioIo::new(io), send, recv)
                .await;
            log_end("inbound", token, &done);
            shared.tcp.closed(open, &done);
        }
        Err(e) => {
            tracing::debug!(error = %e, "the app's connection did not upgrade");
            let (mut send, mut recv) = (send, recv);
            let _ = send.reset(frame::RESET_ERROR.into());
            let _ = recv.stop(frame::RESET_ERROR.into());
        }
    }
}

/// Joins two local connections (`a`, the client; `b`, the app or
/// destination) until both directions end, one fails, or nothing moves for
/// `idle`; what it did, in [`Spliced`] terms (`local_to_mesh` = `a` → `b`).
pub(crate) async fn join<A, B>(mut a: A, mut b: B, idle: Duration) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = std::time::Instant::now();
    let meter = Arc::new(Meter::new());
    let mut ma = Metered {
        io: &mut a,
        meter: meter.clone(),
        from_a: true,
    };
    let mut mb = Metered {
        io: &mut b,
        meter: meter.clone(),
        from_a: false,
    };
    let copy = tokio::io::copy_bidirectional(&mut ma, &mut mb);
    let mut copy = std::pin::pin!(copy);
    let (outcome, detail) = loop {
        let quiet = meter.quiet();
        if quiet >= idle {
            break (Outcome::Idle, None);
        }
        tokio::select! {
            r = &mut copy => break match r {
                Ok(_) => (Outcome::Clean, None),
                Err(e) => {
                    use std::io::ErrorKind::*;
                    let o = match e.kind() {
                        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected
                        | UnexpectedEof => Outcome::Reset(Side::Local),
                        _ => Outcome::Error(Side::Local),
                    };
                    (o, Some(e.to_string()))
                }
            },
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    };
    Spliced {
        local_to_mesh: meter.a_to_b.load(Ordering::Relaxed),
        mesh_to_local: meter.b_to_a.load(Ordering::Relaxed),
        outcome,
        detail,
        duration: start.elapsed(),
    }
}

/// Bytes each way and when one last moved.
struct Meter {
    start: std::time::Instant,
    /// Milliseconds from `start` to the last byte moved.
    last_ms: AtomicU64,
    a_to_b: AtomicU64,
    b_to_a: AtomicU64,
}

impl Meter {
    fn new() -> Self {
        Meter {
            start: std::time::Instant::now(),
            last_ms: AtomicU64::new(0),
            a_to_b: AtomicU64::new(0),
            b_to_a: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    fn quiet(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

/// One side of a join, counting what is read from it.
struct Metered<'a, T> {
    io: &'a mut T,
    meter: Arc<Meter>,
    from_a: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<'_, T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            let c = if self.from_a {
                &self.meter.a_to_b
            } else {
                &self.meter.b_to_a
            };
            c.fetch_add(n, Ordering::Relaxed);
            self.meter.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<'_, T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.io).poll_write(cx, data);
        if matches!(r, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.meter.touch();
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

fn log_end(side: &str, token: &str, done: &Spliced) {
    tracing::debug!(
        side,
        upgrade = token,
        outcome = done.outcome.label(),
        detail = done.detail.as_deref().unwrap_or("-"),
        sent = done.local_to_mesh,
        received = done.mesh_to_local,
        took = ?done.duration,
        "upgraded connection ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(version: Version, headers: &[(&str, &str)]) -> Request<http_body_util::Full<Bytes>> {
        with_body(version, headers, "")
    }

    fn with_body(
        version: Version,
        headers: &[(&str, &str)],
        body: &'static str,
    ) -> Request<http_body_util::Full<Bytes>> {
        let mut b = Request::get("/chat").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(http_body_util::Full::new(Bytes::from_static(
            body.as_bytes(),
        )))
        .unwrap()
    }

    #[test]
    fn recognises_the_upgrades_it_carries() {
        let ws = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        assert_eq!(
            requested(&req(Version::HTTP_11, &ws)).as_deref(),
            Some("websocket")
        );
        // No Connection token, h2c, HTTP/1.0, HTTP/2, a body: not carried.
        assert_eq!(
            requested(&req(Version::HTTP_11, &[("upgrade", "websocket")])),
            None
        );
        let h2c = [
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ];
        assert_eq!(requested(&req(Version::HTTP_11, &h2c)), None);
        assert_eq!(requested(&req(Version::HTTP_10, &ws)), None);
        assert_eq!(requested(&req(Version::HTTP_2, &ws)), None);
        assert_eq!(requested(&with_body(Version::HTTP_11, &ws, "abc")), None);
        let long = "x".repeat(MAX_UPGRADE + 1);
        let too_long = [("connection", "upgrade"), ("upgrade", long.as_str())];
        assert_eq!(requested(&req(Version::HTTP_11, &too_long)), None);
    }

    #[test]
    fn restores_the_fields_on_a_101() {
        let mut h = HeaderMap::new();
        restore(&mut h, "websocket");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        let mut r = Response::new(());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *r.headers_mut() = h;
        assert_eq!(switched_to(&r).as_deref(), Some("websocket"));
        *r.status_mut() = StatusCode::OK;
        assert_eq!(switched_to(&r), None);
    }
}
