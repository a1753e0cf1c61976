//! The outbound listener apps call (HTTP/1.1 and h2c with prior knowledge):
//! routes by Host / `:authority` or an absolute-form URI, picks an endpoint,
//! sends the exchange over one QUIC stream (or straight to the local instance
//! when it is behind this node), and applies timeouts and retries.
//!
//! Errors the node answers itself carry `shoal-error`: `unknown-service`,
//! `no-healthy-endpoint`, `overloaded` (503), `timeout` (504),
//! `upstream-reset` (502, the serving node went away mid-request) and
//! `peer-not-serving` (502: the only endpoints gossip offers are held by
//! peers whose certificates do not name the service).
//!
//! A gRPC caller (`content-type: application/grpc*`) gets these failures as
//! a trailers-only gRPC response instead (HTTP 200, `grpc-status` 14, 4, 7,
//! 8, ...; see [`grpc_code`]), with a `grpc-message` naming the cause and
//! the service.
//!
//! Before the first byte of a request goes to a peer, the peer's certificate
//! (from the QUIC handshake) must name the node gossip put at that address
//! and the service; otherwise the endpoint is refused, counted
//! (`shoal_peer_not_serving_total{service}`), logged, dropped from the
//! service's table, and the request goes to another endpoint.

use std::any::Any;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use crate::balance::{NoEndpoint, Target, backoff};
use crate::frame::{
    self, BoxError, FRAME_HEAD, FrameReader, FrameWriter, ProxyBody, RESET_CANCEL, RequestHead,
    ResponseHead, STREAM_KIND_HTTP,
};
use crate::inbound::{self, Decrement, empty, error};
use crate::listen;
use crate::stats::{self, Direction, Edge};
use crate::{ERROR_HEADER, Shared, TIMEOUT_HEADER, peer_serves};
use policy::doc::{HeaderMods, MeshConfig, RouteRule};
use policy::{PolicySet, RequestInfo};

/// Serves an outbound listener until `shutdown` flips. With `fixed`, it is a
/// per-upstream listener: every request goes to that service, whatever it
/// addresses, and the instance sees the service name as its Host. `guard`
/// holds the connection cap and the header-read and idle timeouts.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    fixed: Option<Arc<str>>,
    guard: Arc<listen::Guard>,
    shutdown: watch::Receiver<bool>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    listen::accept_loop(guard, listener, shutdown, move |io, _peer, activity| {
        let shared = shared.clone();
        let builder = builder.clone();
        let fixed = fixed.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let shared = shared.clone();
                let fixed = fixed.clone();
                // In flight until the response body is done.
                let request = activity.begin(req.version() == Version::HTTP_2);
                async move {
                    let resp = handle(shared, fixed, req).await;
                    Ok::<_, Infallible>(resp.map(|b| guarded(b, vec![Box::new(request)])))
                }
            });
            let _ = builder.serve_connection(TokioIo::new(io), svc).await;
        }
    })
    .await;
}

/// The service a request addresses: the absolute-form URI's host, else the
/// Host header / `:authority`, without port, trailing dot or `.shoal`.
pub(crate) fn service_name(req: &Request<Incoming>) -> Option<String> {
    let host = match req.uri().host() {
        Some(h) => h.to_string(),
        None => {
            let h = req.headers().get(http::header::HOST)?.to_str().ok()?;
            h.rsplit_once(':')
                .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
                .map(|(h, _)| h)
                .unwrap_or(h)
                .to_string()
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(".shoal").unwrap_or(&host);
    (!name.is_empty()).then(|| name.to_string())
}

/// A request body as the retry loop holds it.
enum Source {
    /// Buffered (at most the replay limit): can be sent again.
    Replay(Bytes, Option<HeaderMap>),
    /// Streaming: can be sent once.
    Once(Option<ProxyBody>),
}

impl Source {
    fn replayable(&self) -> bool {
        matches!(self, Source::Replay(..))
    }

    /// The body for the next attempt (`None` once a streaming body is spent).
    fn take(&mut self) -> Option<ProxyBody> {
        match self {
            Source::Replay(data, trailers) => Some(replay(data.clone(), trailers.clone())),
            Source::Once(b) => b.take(),
        }
    }
}

fn replay(data: Bytes, trailers: Option<HeaderMap>) -> ProxyBody {
    let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = Vec::new();
    if !data.is_empty() {
        frames.push(Ok(Frame::data(data)));
    }
    if let Some(t) = trailers {
        frames.push(Ok(Frame::trailers(t)));
    }
    if frames.is_empty() {
        return empty();
    }
    http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed_unsync()
}

/// Why an attempt failed without a response.
enum Failed {
    /// Nothing reached the peer (dial, stream open or head write failed).
    Connect(String),
    /// The exchange broke after the head was sent: outcome unknown.
    Reset(String),
    /// The QUIC peer's certificate does not name the service (or the node
    /// gossip put at that address): nothing was sent.
    NotServing(Arc<transport::Identity>),
}

async fn handle(
    shared: Arc<Shared>,
    fixed: Option<Arc<str>>,
    mut req: Request<Incoming>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let grpc_call = stats::is_grpc(req.headers());
    let name = match &fixed {
        Some(service) => {
            // The app addressed the listener, not the service: forward as
            // if it had named the service.
            if let Ok(host) = http::HeaderValue::from_str(service) {
                req.headers_mut().insert(http::header::HOST, host);
            }
            if req.uri().authority().is_some() {
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = None;
                parts.authority = None;
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
                }
                if let Ok(uri) = http::Uri::from_parts(parts) {
                    *req.uri_mut() = uri;
                }
            }
            Some(service.to_string())
        }
        None => service_name(&req),
    };
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    // One policy snapshot for the whole request: it sees the old set or the
    // new one, never half.
    let set = shared.policy.store.snapshot();
    let decision = name.as_deref().and_then(|svc| {
        let info = RequestInfo {
            method: req.method().as_str(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        };
        set.route(svc, &info)
    });
    let backend = name.as_deref().map(|svc| match &decision {
        Some(d) => d.backend(svc, rand::random::<f64>()),
        None => svc.to_string(),
    });
    let route_name = decision
        .as_ref()
        .map_or(String::new(), |d| d.route.to_string());
    let rule = decision.map(|d| d.rule);
    let targets = backend.as_deref().and_then(|n| shared.targets(n));
    let mut edge = Edge {
        direction: Direction::Outbound,
        source: match shared.source_service() {
            s if s.is_empty() => "unknown".into(),
            s => s,
        },
        destination: "unknown".into(),
        trace: Default::default(),
    };
    let _count = {
        shared.outbound_in_flight.fetch_add(1, Ordering::Relaxed);
        Decrement(&shared.outbound_in_flight)
    };
    let mut resp = match (backend, targets) {
        (None, _) => error(
            StatusCode::BAD_REQUEST,
            "no-host",
            "the request names no service (Host header or absolute URI)",
        ),
        (Some(_), None) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unknown-service",
            "no node in the mesh serves this service",
        ),
        (Some(service), Some(_)) => {
            edge.destination = service.clone();
            let _gauge = shared.stats.in_flight(&edge);
            if shared.outbound_in_flight.load(Ordering::Relaxed) > shared.config.max_in_flight {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overloaded",
                    "this node has too many requests in flight",
                )
            } else if let Some(aborted) = inject_fault(&shared, &set, &service).await {
                aborted
            } else {
                route(&shared, &edge, service, req, rule, set.mesh()).await
            }
        }
    };
    if grpc_call && resp.headers().contains_key(ERROR_HEADER) {
        let service = match edge.destination.as_str() {
            "unknown" => name.as_deref().unwrap_or("-"),
            d => d,
        };
        resp = grpc_failure(resp, service);
    }
    if let Some(rule) = rule {
        apply_header_mods(resp.headers_mut(), &rule.response_headers);
    }
    let exchange = stats::Exchange {
        edge,
        route: route_name,
        method,
        path,
        grpc_call,
        start,
        access_log: shared.config.access_log,
    };
    shared.stats.finish(exchange, resp)
}

/// The gRPC status for a failure the mesh answered with `status` and
/// `shoal-error: code`.
pub(crate) fn grpc_code(status: StatusCode, code: &str) -> u32 {
    match (status.as_u16(), code) {
        (_, "timeout" | "deadline-exceeded") | (504, _) => 4, // DEADLINE_EXCEEDED
        (_, "rate-limited") | (429, _) => 8,                  // RESOURCE_EXHAUSTED
        (403, _) => 7,                                        // PERMISSION_DENIED
        (401, _) => 16,                                       // UNAUTHENTICATED
        (400, _) => 13,                                       // INTERNAL
        (404, _) => 12,                                       // UNIMPLEMENTED
        (502 | 503, _) => 14,                                 // UNAVAILABLE
        _ => 2,                                               // UNKNOWN
    }
}

/// What a `shoal-error` code means, for `grpc-message`.
fn describe(code: &str) -> &'static str {
    match code {
        "no-host" => "the request names no service",
        "unknown-service" => "no node in the mesh serves the service",
        "no-healthy-endpoint" => "the service has no healthy endpoint",
        "overloaded" => "the mesh is at its in-flight limit",
        "peer-not-serving" => {
            "the peers offered for the service hold certificates that do not name it"
        }
        "upstream-connect" => "could not reach the service's instance",
        "upstream-reset" => "the service's instance failed mid-request",
        "timeout" | "deadline-exceeded" => "no response before the deadline",
        "forbidden" => "no AuthorizationPolicy allows this caller",
        "unauthorized" => "the caller's certificate does not name its source service",
        "not-served" => "the serving node's certificate does not name the service",
        "rate-limited" => "the service's rate limit is exhausted",
        "fault-injected" => "aborted by a FaultInjection policy",
        "bad-request" => "the request could not be forwarded",
        _ => "the mesh could not complete the call",
    }
}

/// Rewrites a mesh failure for a gRPC caller as a trailers-only response:
/// HTTP 200, `content-type: application/grpc`, `grpc-status` from
/// [`grpc_code`] and a `grpc-message` naming the cause and the service. The
/// `shoal-error` header (and `retry-after`) stay.
fn grpc_failure(resp: Response<ProxyBody>, service: &str) -> Response<ProxyBody> {
    let status = resp.status();
    let mut headers = resp.headers().clone();
    let code = headers
        .get(ERROR_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let grpc = grpc_code(status, &code);
    let message = format!(
        "shoal {code} (HTTP {}): {} (service {service})",
        status.as_u16(),
        describe(&code)
    );
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", http::HeaderValue::from(grpc));
    if let Ok(v) = http::HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", v);
    }
    let mut r = Response::new(empty());
    *r.headers_mut() = headers;
    r
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`,
/// as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// FaultInjection on `service`: maybe wait, maybe answer with the abort
/// status (`shoal-error: fault-injected`, never retried).
async fn inject_fault(
    shared: &Shared,
    set: &PolicySet,
    service: &str,
) -> Option<Response<ProxyBody>> {
    let fault = set.fault(service)?;
    if let Some((percent, delay)) = fault.delay
        && rand::random::<f64>() * 100.0 < percent
    {
        tokio::time::sleep(delay).await;
    }
    let (percent, status) = fault.abort?;
    if rand::random::<f64>() * 100.0 >= percent {
        return None;
    }
    shared.policy.metrics.denied(service, "fault");
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    Some(error(
        status,
        "fault-injected",
        "aborted by a FaultInjection policy",
    ))
}

/// Applies an HTTPRoute header filter.
fn apply_header_mods(headers: &mut HeaderMap, mods: &HeaderMods) {
    for (name, value) in &mods.set {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &mods.add {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &mods.remove {
        headers.remove(name.as_str());
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

async fn route(
    shared: &Arc<Shared>,
    edge: &Edge,
    service: String,
    req: Request<Incoming>,
    rule: Option<&RouteRule>,
    mesh: Option<&MeshConfig>,
) -> Response<ProxyBody> {
    // Timeout: the app's header, else the route's, else MeshConfig's, else the node's.
    let timeout = req
        .headers()
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::config::parse_duration(v).ok())
        .or(rule.and_then(|r| r.timeout))
        .or(mesh.and_then(|m| m.request_timeout))
        .unwrap_or(shared.config.request_timeout);
    let attempt_timeout = rule.and_then(|r| r.backend_timeout);
    let route_retry = rule.and_then(|r| r.retry.as_ref());
    let max_attempts = route_retry.map_or(shared.config.retry.max_attempts, |r| r.attempts + 1);
    let deadline = tokio::time::Instant::now() + timeout;
    let (parts, body) = req.into_parts();
    let safe = idempotent(&parts.method);
    let limit = shared.config.retry.max_replay_body;
    let has_body = !body.is_end_stream();
    let mut source = if !has_body {
        Source::Replay(Bytes::new(), None)
    } else if safe
        && body
            .size_hint()
            .upper()
            .is_some_and(|n| n as usize <= limit)
    {
        match Limited::new(body, limit).collect().await {
            Ok(c) => {
                let trailers = c.trailers().cloned();
                let data = c.to_bytes();
                edge.trace.request_bytes(data.len());
                Source::Replay(data, trailers)
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad-request",
                    &format!("reading the request body: {e}"),
                );
            }
        }
    } else {
        Source::Once(Some(edge.trace.count_request(body)))
    };
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| service.clone());
    let mut headers = parts.headers;
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    headers.remove(TIMEOUT_HEADER);
    if let Some(rule) = rule {
        apply_header_mods(&mut headers, &rule.request_headers);
    }
    let mut head = RequestHead {
        service: service.clone(),
        source: shared.source_service(),
        deadline_ms: 0,
        attempt: 1,
        version: if parts.version == Version::HTTP_2 {
            2
        } else {
            1
        },
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "/".into()),
        authority,
        headers: frame::to_wire(&headers),
        has_body,
    };
    let budget = shared.budget(&service);
    budget.request();
    let mut exclude: Vec<String> = Vec::new();
    let mut last: Option<Response<ProxyBody>> = None;
    loop {
        let targets = shared.targets(&service).unwrap_or_else(|| Arc::new([]));
        let target = match shared.balancer.pick(&targets, &exclude) {
            Ok(i) => &targets[i],
            Err(why) => {
                return last.unwrap_or_else(|| match why {
                    // Gossip offers endpoints, but none this node would trust.
                    NoEndpoint::NoHealthy if shared.has_refused(&service) => error(
                        StatusCode::BAD_GATEWAY,
                        "peer-not-serving",
                        "the peers gossip names for this service hold certificates that do not name it",
                    ),
                    NoEndpoint::NoHealthy => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "no-healthy-endpoint",
                        "the service has no healthy endpoint",
                    ),
                    NoEndpoint::Saturated => error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "overloaded",
                        "every endpoint is at its in-flight cap",
                    ),
                });
            }
        };
        edge.trace.attempt(&target.node, head.attempt);
        let now = tokio::time::Instant::now();
        let attempt_deadline = attempt_timeout.map_or(deadline, |t| deadline.min(now + t));
        let left = attempt_deadline.saturating_duration_since(now);
        head.deadline_ms = left.as_millis().max(1) as u64;
        let state = target.state.clone();
        let guard = state.start();
        let result = tokio::time::timeout_at(
            attempt_deadline,
            attempt(shared, target, &head, &mut source, Box::new(guard)),
        )
        .await;
        // Decide: done, or retry elsewhere.
        let retry_safe;
        match result {
            Ok(Err(Failed::NotServing(peer))) => {
                // Nothing was sent: go on to another endpoint without
                // spending an attempt or the retry budget.
                shared.refuse(target, &peer);
                exclude.push(target.node.clone());
                last = last.or_else(|| {
                    Some(error(
                        StatusCode::BAD_GATEWAY,
                        "peer-not-serving",
                        "the peer gossip names for this service holds a certificate that does not name it",
                    ))
                });
                continue;
            }
            Err(_) if attempt_deadline < deadline => {
                // Only this attempt's backendRequest timeout: try elsewhere.
                shared.balancer.failure(&service, &state);
                retry_safe = safe && source.replayable();
                last = Some(error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "no response before the backend request timeout",
                ));
            }
            Err(_) => {
                shared.balancer.failure(&service, &state);
                return error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    "no response before the request timeout",
                );
            }
            Ok(Err(Failed::Connect(msg))) => {
                tracing::debug!(node = %target.node, error = %msg, "endpoint unreachable; marking it down");
                shared.balancer.down(&state);
                retry_safe = true;
                last = Some(error(
                    StatusCode::BAD_GATEWAY,
                    "upstream-connect",
                    "could not reach the serving node",
                ));
            }
            Ok(Err(Failed::Reset(msg))) => {
                tracing::debug!(node = %target.node, error = %msg, "exchange reset; marking the endpoint down");
                shared.balancer.down(&state);
                retry_safe = safe && source.replayable();
                last = Some(error(
                    StatusCode::BAD_GATEWAY,
                    "upstream-reset",
                    "the serving node failed mid-request",
                ));
            }
            Ok(Ok((resp, rtt))) => {
                let code = resp
                    .headers()
                    .get(ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let status = resp.status();
                match code.as_deref() {
                    // The far side refused before reaching the instance: the
                    // request was not processed, any method may go elsewhere.
                    Some("upstream-connect" | "no-healthy-endpoint") => {
                        shared.balancer.down(&state);
                        retry_safe = source.replayable();
                    }
                    Some("unknown-service" | "not-served") => retry_safe = source.replayable(),
                    // The far side's copy of our deadline fired first.
                    Some("deadline-exceeded") => {
                        return error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "timeout",
                            "no response before the request timeout",
                        );
                    }
                    Some(_) => return resp,
                    None if route_retry.map_or(matches!(status.as_u16(), 502..=504), |r| {
                        r.codes.contains(&status.as_u16())
                            || (r.codes.is_empty() && matches!(status.as_u16(), 502..=504))
                    }) =>
                    {
                        shared.balancer.failure(&service, &state);
                        retry_safe = safe && source.replayable();
                    }
                    None => {
                        if status.is_server_error() {
                            shared.balancer.failure(&service, &state);
                        } else {
                            shared.balancer.success(&state, rtt);
                        }
                        return resp;
                    }
                }
                last = Some(resp);
            }
        }
        let can_retry = retry_safe
            && head.attempt < max_attempts
            && matches!(&source, Source::Replay(..) | Source::Once(Some(_)));
        if !can_retry {
            return last.expect("set above");
        }
        exclude.push(target.node.clone());
        let others = targets.iter().any(|t| !exclude.contains(&t.node));
        if !others || !budget.try_retry() {
            return last.expect("set above");
        }
        shared.stats.retry(edge);
        let pause = route_retry
            .and_then(|r| r.backoff)
            .map_or_else(
                || backoff(&shared.config.retry, head.attempt),
                |base| {
                    let retry = crate::RetryConfig {
                        backoff_base: base,
                        backoff_max: base * 16,
                        ..shared.config.retry.clone()
                    };
                    backoff(&retry, head.attempt)
                },
            )
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        tokio::time::sleep(pause).await;
        head.attempt += 1;
    }
}

/// One try at one endpoint. `guard` lives as long as the response body.
async fn attempt(
    shared: &Arc<Shared>,
    target: &Target,
    head: &RequestHead,
    source: &mut Source,
    guard: Box<dyn Any + Send>,
) -> Result<(Response<ProxyBody>, Duration), Failed> {
    let started = Instant::now();
    if target.is_self {
        let body = source.take().unwrap_or_else(empty);
        let identity = shared.endpoint.identity();
        let resp = inbound::handle(shared, &identity, head.clone(), body).await;
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
    let encoded = frame::encode(head).map_err(|e| connect(e.to_string()))?;
    writer.queue(FRAME_HEAD, encoded);
    let mut guards: Vec<Box<dyn Any + Send>> = vec![guard];
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
    let rh: ResponseHead = reader
        .head()
        .await
        .map_err(|e| Failed::Reset(e.to_string()))?;
    let rtt = started.elapsed();
    let headers = frame::from_wire(&rh.headers);
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

/// A body that keeps `guards` alive until it is dropped.
struct Guarded {
    inner: ProxyBody,
    _guards: Vec<Box<dyn Any + Send>>,
}

fn guarded(inner: ProxyBody, guards: Vec<Box<dyn Any + Send>>) -> ProxyBody {
    Guarded {
        inner,
        _guards: guards,
    }
    .boxed_unsync()
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mesh_failures_map_to_grpc_statuses() {
        let s = |n| StatusCode::from_u16(n).unwrap();
        assert_eq!(grpc_code(s(503), "no-healthy-endpoint"), 14);
        assert_eq!(grpc_code(s(503), "unknown-service"), 14);
        assert_eq!(grpc_code(s(502), "upstream-connect"), 14);
        assert_eq!(grpc_code(s(502), "peer-not-serving"), 14);
        assert_eq!(grpc_code(s(504), "timeout"), 4);
        assert_eq!(grpc_code(s(504), "deadline-exceeded"), 4);
        assert_eq!(grpc_code(s(403), "forbidden"), 7);
        assert_eq!(grpc_code(s(403), "unauthorized"), 7);
        assert_eq!(grpc_code(s(429), "rate-limited"), 8);
        assert_eq!(grpc_code(s(400), "no-host"), 13);
        assert_eq!(grpc_code(s(418), "fault-injected"), 2);
    }

    #[test]
    fn grpc_failure_is_trailers_only_and_names_cause_and_service() {
        let mut e = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "the service's rate limit is exhausted",
        );
        e.headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(2));
        let r = grpc_failure(e, "api");
        assert_eq!(r.status(), 200);
        assert!(r.body().is_end_stream());
        let h = r.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["shoal-error"], "rate-limited");
        assert_eq!(h["retry-after"], "2");
        let msg = h["grpc-message"].to_str().unwrap();
        assert!(
            msg.contains("rate-limited") && msg.contains("(service api)"),
            "{msg}"
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%c"), "a b%25c");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
