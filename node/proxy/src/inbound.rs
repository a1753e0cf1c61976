//! The inbound side: serves HTTP exchanges peers open as QUIC streams (and
//! requests this node's own outbound routes to itself), authorizes the
//! caller's certificate identity, and forwards to the local instance over
//! pooled keep-alive connections.
//!
//! Errors the node itself answers carry a `shoal-error` header:
//!
//! | status | `shoal-error`        | meaning                                          |
//! |--------|----------------------|--------------------------------------------------|
//! | 404    | `unknown-service`    | this node fronts no instance of the service      |
//! | 403    | `not-served`         | this node's certificate does not name the service |
//! | 403    | `unauthorized`       | the caller's certificate does not name its source service |
//! | 403    | `forbidden`          | no AuthorizationPolicy allows the caller (or the mesh default denies) |
//! | 429    | `rate-limited`       | a RateLimit on the service is exhausted (`retry-after` says when to retry) |
//! | 503    | `no-healthy-endpoint`| the local instance fails its health checks       |
//! | 502    | `upstream-connect`   | could not connect to the local instance          |
//! | 502    | `upstream-reset`     | the local instance failed mid-request            |
//! | 504    | `deadline-exceeded`  | the caller's deadline passed                     |

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Body;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc;
use transport::{BiStream, Identity};

use crate::frame::{
    self, FRAME_HEAD, FrameReader, FrameWriter, ProxyBody, RESET_CANCEL, RequestHead, ResponseHead,
    STREAM_KIND_HTTP,
};
use crate::stats::{self, Direction, Edge};
use crate::{ERROR_HEADER, FORWARDED_HEADER, Protocol, Shared, health};

/// Pooled clients to local instances.
pub(crate) struct Clients {
    pub http1: Client<HttpConnector, ProxyBody>,
    pub h2: Client<HttpConnector, ProxyBody>,
}

impl Clients {
    pub fn new() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(conn.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .http2_only(true)
            .build(conn);
        Clients { http1, h2 }
    }
}

/// Serves peer-opened streams until the receiver closes.
pub(crate) async fn serve(shared: Arc<Shared>, mut streams: mpsc::Receiver<BiStream>) {
    while let Some(bi) = streams.recv().await {
        tokio::spawn(serve_stream(shared.clone(), bi));
    }
}

async fn serve_stream(shared: Arc<Shared>, bi: BiStream) {
    shared.inbound_in_flight.fetch_add(1, Ordering::Relaxed);
    let _count = Decrement(&shared.inbound_in_flight);
    let caller = bi.from.peer.clone();
    let mut reader = FrameReader::new(bi.recv);
    let mut writer = FrameWriter::new(bi.send);
    match reader.kind().await {
        Ok(STREAM_KIND_HTTP) => {}
        Ok(kind) => {
            tracing::debug!(kind, peer = %caller, "unknown stream kind");
            writer.reset(frame::RESET_ERROR);
            return;
        }
        Err(_) => return,
    }
    let head: RequestHead = match reader.head().await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, peer = %caller, "bad request head");
            writer.reset(frame::RESET_ERROR);
            return;
        }
    };
    let body = if head.has_body {
        let len = frame::content_length(&frame::from_wire(&head.headers));
        reader.into_body(len)
    } else {
        // END (and FIN) share the head's packet: read them so the stream
        // closes cleanly instead of with a STOP_SENDING.
        if let Err(e) = reader.end().await {
            tracing::debug!(error = %e, peer = %caller, "bad request end");
            writer.reset(frame::RESET_ERROR);
            return;
        }
        empty()
    };
    // The caller giving up (its stream stopped) abandons the local request.
    let stopped = writer.stopped();
    let resp = tokio::select! {
        r = handle(&shared, &caller, head, body) => r,
        _ = stopped => return,
    };
    let (parts, body) = resp.into_parts();
    let mut headers = parts.headers;
    frame::strip_hop_by_hop(&mut headers);
    let rh = ResponseHead {
        status: parts.status.as_u16(),
        headers: frame::to_wire(&headers),
        has_body: !body.is_end_stream(),
    };
    let Ok(encoded) = frame::encode(&rh) else {
        writer.reset(frame::RESET_ERROR);
        return;
    };
    // The head leaves with the body's first frames (all of a small body).
    writer.queue(FRAME_HEAD, encoded);
    if let Err(e) = writer.body(body).await {
        tracing::debug!(error = %e, "response body cut short");
        writer.reset(RESET_CANCEL);
    }
}

/// Serves one request for a local service, from `caller`.
pub(crate) async fn handle(
    shared: &Shared,
    caller: &Identity,
    head: RequestHead,
    body: ProxyBody,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let edge = Edge {
        direction: Direction::Inbound,
        source: if head.source.is_empty() {
            "unknown".into()
        } else {
            head.source.clone()
        },
        destination: if shared.local.contains_key(&head.service) {
            head.service.clone()
        } else {
            "unknown".into()
        },
        trace: Default::default(),
    };
    let _gauge = shared.stats.in_flight(&edge);
    let grpc_call = head
        .headers
        .iter()
        .any(|(k, v)| k == "content-type" && stats::is_grpc_type(v));
    edge.trace.attempt(&shared.node, head.attempt);
    let body = edge.trace.count_request(body);
    let exchange = stats::Exchange {
        edge,
        route: String::new(),
        method: head.method.clone(),
        path: head.uri.clone(),
        grpc_call,
        start,
        access_log: shared.config.access_log,
    };
    let resp = forward(shared, caller, head, body).await;
    shared.stats.finish(exchange, resp)
}

async fn forward(
    shared: &Shared,
    caller: &Identity,
    head: RequestHead,
    body: ProxyBody,
) -> Response<ProxyBody> {
    let Some(svc) = shared.local.get(&head.service) else {
        return error(
            StatusCode::NOT_FOUND,
            "unknown-service",
            "no such local service",
        );
    };
    if !shared.endpoint.identity().may_serve(&head.service) {
        return error(
            StatusCode::FORBIDDEN,
            "not-served",
            "this node's certificate does not name the service",
        );
    }
    if !head.source.is_empty() && !caller.may_serve(&head.source) {
        return error(
            StatusCode::FORBIDDEN,
            "unauthorized",
            "the caller's certificate does not name its source service",
        );
    }
    if let Some(refused) = enforce(shared, caller, &head) {
        return refused;
    }
    if svc.health() == gossip::Health::Unhealthy {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-healthy-endpoint",
            "the local instance fails its health checks",
        );
    }
    // `auto`: the caller's version if the instance speaks it, else the one
    // it speaks (found out now if the health task has not yet); the
    // caller's version if it cannot be reached to ask.
    let caller_h2 = head.version == 2;
    let h2 = match svc.h2_for(caller_h2) {
        Some(h2) => h2,
        None => match health::detect(svc.spec.addr, Duration::from_secs(1)).await {
            Some(found) => {
                svc.set_detected(Some(found));
                svc.h2_for(caller_h2).unwrap_or(caller_h2)
            }
            None => caller_h2,
        },
    };
    let uri = format!("http://{}{}", svc.spec.addr, head.uri);
    let mut headers = frame::from_wire(&head.headers);
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    if !h2 && let Ok(v) = HeaderValue::from_str(&head.authority) {
        headers.insert(http::header::HOST, v);
    }
    let caller_svc = if head.source.is_empty() {
        "-"
    } else {
        head.source.as_str()
    };
    let provenance = format!("by={};from={};svc={}", shared.node, caller.node, caller_svc);
    if let Ok(v) = HeaderValue::from_str(&provenance) {
        headers.append(FORWARDED_HEADER, v);
    }
    let mut req = match Request::builder()
        .method(head.method.as_str())
        .uri(uri)
        .version(if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(body)
    {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad-request",
                &format!("bad request head: {e}"),
            );
        }
    };
    *req.headers_mut() = headers;
    let client = if h2 {
        &shared.clients.h2
    } else {
        &shared.clients.http1
    };
    svc.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let call = client.request(req);
    let result = if head.deadline_ms > 0 {
        match tokio::time::timeout(Duration::from_millis(head.deadline_ms), call).await {
            Ok(r) => r,
            Err(_) => {
                svc.in_flight.fetch_sub(1, Ordering::Relaxed);
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "deadline-exceeded",
                    "the caller's deadline passed",
                );
            }
        }
    } else {
        call.await
    };
    svc.in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(resp) => {
            svc.latency.observe(started.elapsed());
            resp.map(|b| b.map_err(frame::BoxError::from).boxed_unsync())
        }
        Err(e) if e.is_connect() => {
            // It may come back speaking something else: ask again then.
            if svc.spec.protocol == Protocol::Auto {
                svc.set_detected(None);
            }
            error(
                StatusCode::BAD_GATEWAY,
                "upstream-connect",
                "could not connect to the local instance",
            )
        }
        Err(e) => {
            tracing::info!(error = %e, service = %head.service, h2, "local instance failed mid-request");
            if svc.spec.protocol == Protocol::Auto && !svc.reprobing.swap(true, Ordering::Relaxed) {
                // A restarted instance may speak another version now: ask
                // again in the background, one probe at a time.
                let svc = svc.clone();
                tokio::spawn(async move {
                    if let Some(now) = health::detect(svc.spec.addr, Duration::from_secs(1)).await {
                        svc.set_detected(Some(now));
                    }
                    svc.reprobing.store(false, Ordering::Relaxed);
                });
            }
            error(
                StatusCode::BAD_GATEWAY,
                "upstream-reset",
                "the local instance failed mid-request",
            )
        }
    }
}

/// Applies AuthorizationPolicy and RateLimit to a request for a local
/// service. The caller is judged by its certificate: its node SPIFFE ID and,
/// when the request names a source service (already checked against the
/// certificate), that service; otherwise every service the certificate names.
fn enforce(shared: &Shared, caller: &Identity, head: &RequestHead) -> Option<Response<ProxyBody>> {
    let set = shared.policy.store.snapshot();
    let who = if head.source.is_empty() {
        caller.clone()
    } else {
        Identity {
            services: vec![head.source.clone()],
            ..caller.clone()
        }
    };
    let path = head.uri.split('?').next().unwrap_or("/");
    if !set.authorize(&head.service, &who, &head.method, path) {
        shared.policy.metrics.denied(&head.service, "authorization");
        return Some(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "no AuthorizationPolicy allows this caller",
        ));
    }
    let key = if head.source.is_empty() {
        caller.node_id()
    } else {
        format!("{}|{}", caller.node_id(), head.source)
    };
    if let Err(wait) = shared.policy.limiter.check(&set, &head.service, &key, path) {
        shared.policy.metrics.denied(&head.service, "rate_limit");
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "the service's rate limit is exhausted",
        );
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return Some(r);
    }
    None
}

/// Decrements a counter on drop.
pub(crate) struct Decrement<'a>(pub &'a std::sync::atomic::AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An empty body.
pub(crate) fn empty() -> ProxyBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync()
}

/// A response the mesh answers itself, with a `shoal-error` header.
pub(crate) fn error(status: StatusCode, code: &'static str, msg: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("shoal: {msg} ({code})\n")))
        .map_err(|e| match e {})
        .boxed_unsync();
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(code));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
