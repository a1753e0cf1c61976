//! The inbound side: serves HTTP exchanges peers open as QUIC streams (TCP
//! streams, kind 0x02, go to `tcp.rs`) (and
//! requests this node's own outbound routes to itself), checks the caller's
//! certificate identity and this node's, applies AuthorizationPolicy and
//! RateLimit, and hands the request to the local instance (`upstream.rs`).
//!
//! Errors the node itself answers are [`MeshError`]s (`shoal-error`):
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
//! | 400    | `bad-request`        | the head cannot be made into a request           |

use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Response};
use hyper::body::Body;
use hyper::upgrade::OnUpgrade;
use tokio::sync::mpsc;
use transport::{BiStream, Identity};

use crate::body::empty;
use crate::error::MeshError;
use crate::frame::{
    self, FrameReader, FrameWriter, ProxyBody, RESET_CANCEL, RequestHeadMap, STREAM_KIND_HTTP,
    STREAM_KIND_TCP,
};
use crate::state::Shared;
use crate::stats::{self, Direction, Edge};
use crate::tcp;
use crate::upgrade::{self, MAX_UPGRADE};
use crate::upstream;

/// Serves peer-opened streams until the receiver closes.
pub(crate) async fn serve(shared: Arc<Shared>, mut streams: mpsc::Receiver<BiStream>) {
    while let Some(bi) = streams.recv().await {
        // Boxed: the request's state (several KiB) is moved once into the
        // box instead of through each of the task's moves and stage changes.
        tokio::spawn(Box::pin(serve_stream(shared.clone(), bi)));
    }
}

async fn serve_stream(shared: Arc<Shared>, bi: BiStream) {
    let _count = shared.inbound_request();
    let caller = bi.from.peer.clone();
    let mut reader = FrameReader::new(bi.recv);
    let mut send = bi.send;
    match reader.kind().await {
        Ok(STREAM_KIND_HTTP) => {}
        Ok(STREAM_KIND_TCP) => {
            // Boxed: the tunnel's state is not part of every request's task.
            let peer_addr = bi.from.addr();
            return Box::pin(tcp::serve_stream(
                shared.clone(),
                caller,
                peer_addr,
                reader,
                send,
            ))
            .await;
        }
        Ok(kind) => {
            tracing::debug!(kind, peer = %caller, "unknown stream kind");
            let _ = send.reset(frame::RESET_ERROR.into());
            return;
        }
        Err(_) => return,
    }
    let mut writer = FrameWriter::new(send);
    let mut head: RequestHeadMap = match reader.request_head().await {
        Ok(h) => h,
        Err(e) => {
            tracing::debug!(error = %e, peer = %caller, "bad request head");
            writer.reset(frame::RESET_ERROR);
            return;
        }
    };
    if head.has_body || head.upgrade.as_ref().is_some_and(|t| t.len() > MAX_UPGRADE) {
        // An upgrade never has a body (nor a token list longer than the
        // calling side sends): such a head is served as a plain request.
        head.upgrade = None;
    }
    let upgrading = head.upgrade.is_some();
    // The tunnel's TCP metrics edge, for an upgrade only.
    let names = upgrading.then(|| {
        let source = match head.source.as_str() {
            "" => "unknown".to_string(),
            s => s.to_string(),
        };
        (source, head.service.clone())
    });
    let (body, reader) = if head.has_body {
        let len = frame::content_length(&head.headers);
        (reader.into_body(len), None)
    } else {
        // END (and FIN) share the head's packet: read them so the stream
        // closes cleanly instead of with a STOP_SENDING.
        if let Err(e) = reader.end().await {
            tracing::debug!(error = %e, peer = %caller, "bad request end");
            writer.reset(frame::RESET_ERROR);
            return;
        }
        (empty(), Some(reader))
    };
    // The caller giving up (its stream stopped) abandons the local request.
    let stopped = writer.stopped();
    let resp = tokio::select! {
        r = handle(&shared, &caller, head, body) => r,
        _ = stopped => return,
    };
    let switched = upgrade::switched_to(&resp).filter(|_| upgrading);
    let (mut parts, body) = resp.into_parts();
    let mut headers = parts.headers;
    frame::strip_hop_by_hop(&mut headers);
    if let Some(token) = switched
        && let Some(app) = parts.extensions.remove::<OnUpgrade>()
        && let Some(reader) = reader
        && let Some((source, service)) = &names
    {
        writer.queue_response_head(parts.status.as_u16(), &headers, false, Some(&token));
        drop(body);
        if writer.end_open().await.is_err() {
            return;
        }
        let (recv, ahead) = reader.into_parts();
        let streams = (writer.into_send(), recv, ahead);
        Box::pin(upgrade::serve(
            &shared,
            app,
            streams,
            &token,
            (source, service),
        ))
        .await;
        return;
    }
    // The head leaves with the body's first frames (all of a small body).
    writer.queue_response_head(parts.status.as_u16(), &headers, !body.is_end_stream(), None);
    if let Err(e) = writer.body(body).await {
        tracing::debug!(error = %e, "response body cut short");
        writer.reset(RESET_CANCEL);
    }
}

/// Serves one request for a local service, from `caller`.
pub(crate) async fn handle(
    shared: &Shared,
    caller: &Identity,
    head: RequestHeadMap,
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
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .any(|v| stats::is_grpc_type(v.as_bytes()));
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
    let resp = admit(shared, caller, head, body).await;
    finish(shared, exchange, resp)
}

/// Where every inbound request ends: the response is counted (its body is
/// measured as it streams).
fn finish(
    shared: &Shared,
    exchange: stats::Exchange,
    resp: Response<ProxyBody>,
) -> Response<ProxyBody> {
    shared.stats.finish(exchange, resp)
}

/// Admits a request for a local service — the instance exists, this node
/// may serve it, the caller is who it says, policy allows it, the instance
/// is healthy — and forwards it.
async fn admit(
    shared: &Shared,
    caller: &Identity,
    head: RequestHeadMap,
    body: ProxyBody,
) -> Response<ProxyBody> {
    let Some(svc) = shared.local.get(&head.service) else {
        return MeshError::NoLocalInstance.response_with("no such local service");
    };
    if !shared.endpoint.identity().may_serve(&head.service) {
        return MeshError::NotServed
            .response_with("this node's certificate does not name the service");
    }
    if !head.source.is_empty() && !caller.may_serve(&head.source) {
        return MeshError::Unauthorized
            .response_with("the caller's certificate does not name its source service");
    }
    if let Some(refused) = enforce(shared, caller, &head) {
        return refused;
    }
    if svc.health() == gossip::Health::Unhealthy {
        return MeshError::NoHealthyEndpoint
            .response_with("the local instance fails its health checks");
    }
    upstream::forward(svc, &shared.clients, &shared.node, caller, head, body).await
}

/// Applies AuthorizationPolicy and RateLimit to a request for a local
/// service. The caller is judged by its certificate: its node SPIFFE ID and,
/// when the request names a source service (already checked against the
/// certificate), that service; otherwise every service the certificate names.
fn enforce(
    shared: &Shared,
    caller: &Identity,
    head: &RequestHeadMap,
) -> Option<Response<ProxyBody>> {
    let set = shared.policy.store.snapshot();
    let who = if head.source.is_empty() {
        caller.clone()
    } else {
        // Not `..caller.clone()`: that would copy the services only to drop them.
        Identity {
            trust_domain: caller.trust_domain.clone(),
            node: caller.node.clone(),
            services: vec![head.source.clone()],
        }
    };
    let path = head.uri.split('?').next().unwrap_or("/");
    if !set.authorize(&head.service, &who, &head.method, path) {
        shared.policy.metrics.denied(&head.service, "authorization");
        return Some(MeshError::Forbidden.response());
    }
    // The caller's key is only built when the service has a RateLimit.
    if set.rate_limits(&head.service).is_empty() {
        return None;
    }
    let key = if head.source.is_empty() {
        caller.node_id()
    } else {
        format!("{}|{}", caller.node_id(), head.source)
    };
    if let Err(wait) = shared.policy.limiter.check(&set, &head.service, &key, path) {
        shared.policy.metrics.denied(&head.service, "rate_limit");
        let mut r = MeshError::RateLimited.response();
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        r.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        return Some(r);
    }
    None
}
