//! The admin HTTP API (loopback by default).
//!
//! | method | path          | answer                                           |
//! |--------|---------------|--------------------------------------------------|
//! | GET    | `/v1/members` | JSON array of members                            |
//! | GET    | `/healthz`    | 200 while the process runs                       |
//! | GET    | `/readyz`     | 200 once routable (heard from a peer, or no seeds; routing table built); else 503 saying why |
//! | POST   | `/shutdown`   | drain and exit the node process (token, or loopback without one) |
//! | GET    | `/metrics`    | Prometheus text format                           |
//! | GET    | `/ui`         | the web dashboard (assets compiled in; see `ui.rs`) |
//! | GET    | `/v1/services`| JSON: every service, its endpoints, health, zone, load |
//! | GET    | `/v1/stats`   | JSON per edge (and per HTTPRoute on it) over the last minute: rps, success rate, p50/p95/p99 |
//! | GET    | `/v1/stats/tcp` | JSON per opaque TCP edge since start: opened, open, closed by outcome, bytes each way |
//! | GET    | `/v1/tap`     | live request events, `text/event-stream` (`?service=S&status=5xx`; token, or loopback without one; see `tap.rs`) |
//! | GET    | `/v1/policies` | every policy: kind, name, version, origin, applied-on count |
//! | GET    | `/v1/policies/status` | per live node, the version of each policy it runs |
//! | GET    | `/v1/policies/{kind}/{name}` | the document (JSON; YAML with `?format=yaml` or `Accept: application/yaml`) |
//! | PUT    | `/v1/policies/{kind}/{name}` | create or replace (token; `If-Match`; `?wait=all`) |
//! | DELETE | `/v1/policies/{kind}/{name}` | delete, leaving a tombstone (token; `If-Match`; `?wait=all`) |
//!
//! The listener shares the proxy's accept loop (`proxy::listen`): a
//! connection cap (`--admin-max-connections`, default 256), the header-read
//! and idle timeouts, and backoff on accept errors, so an fd-exhausting flood
//! neither spins the loop nor keeps the API unreachable once it ends.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::node::NodeState;
use proxy::listen::accept_loop;

/// Serves the admin API on `listener` until `shutdown` flips to true, under
/// the admin connection cap and the header-read and idle timeouts.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<NodeState>,
    shutdown: watch::Receiver<bool>,
) {
    let guard = state.proxy.admin_guard();
    accept_loop(guard, listener, shutdown, move |io, peer, activity| {
        let state = state.clone();
        async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let state = state.clone();
                let request = activity.begin(false);
                async move {
                    if req.uri().path() == "/v1/tap" {
                        return Ok(crate::tap::serve(&req, peer, &state, request));
                    }
                    let resp = route(req, peer, &state).await;
                    drop(request);
                    Ok::<_, Infallible>(resp.map(http_body_util::Either::Left))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .await;
        }
    })
    .await;
}

async fn route(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &NodeState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if crate::ui::owns(&path) {
        return crate::ui::serve(req.method(), &path);
    }
    if path.starts_with("/v1/policies") {
        return crate::admin_policy::handle(req, peer, state).await;
    }
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => match state.gossip.failure() {
            Some(why) => text_owned(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("gossip stopped: {why}\n"),
            ),
            None => text(StatusCode::OK, "ok\n"),
        },
        (&Method::GET, "/readyz") => readyz(state).await,
        (&Method::POST, "/shutdown") => shutdown(&req, peer, state),
        (&Method::GET, "/v1/members") => json(&state.gossip.members().await),
        (&Method::GET, "/v1/services") => json(&state.proxy.services()),
        (&Method::GET, "/v1/stats") => json(&state.proxy.stats()),
        (&Method::GET, "/v1/stats/tcp") => json(&state.proxy.tcp_stats()),
        (&Method::GET, "/metrics") => {
            let body = state.metrics.render(&state.gossip).await;
            Response::builder()
                .header(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        (_, "/healthz" | "/readyz" | "/v1/members" | "/metrics" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `/readyz`: 200 `ready` when routable, else 503 with the reason.
async fn readyz(state: &NodeState) -> Response<Full<Bytes>> {
    match state.readiness.check(state).await {
        Ok(()) => text(StatusCode::OK, "ready\n"),
        Err(why) => text_owned(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// `POST /shutdown`: the process drains and exits (as on SIGTERM). Needs
/// the admin token when the node has one, else a loopback caller.
fn shutdown(req: &Request<Incoming>, peer: SocketAddr, state: &NodeState) -> Response<Full<Bytes>> {
    if let Err(refused) = crate::admin_policy::authorize(req.headers(), peer, state) {
        return *refused;
    }
    tracing::info!(%peer, "shutdown requested");
    // `send_replace`, not `send`: `send` drops the value while nobody has
    // subscribed yet, and a request that came right after the ready line
    // (before the main loop first waits) was then lost and the node never
    // stopped.
    state.stop.send_replace(true);
    text(StatusCode::ACCEPTED, "draining, then exiting\n")
}

fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap_or_default()
}

pub(crate) fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "encoding failed\n"),
    }
}
