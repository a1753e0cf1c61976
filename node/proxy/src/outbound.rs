//! The outbound listener apps call (HTTP/1.1 and h2c with prior knowledge),
//! and the step that carries out a route plan: for each request, a policy
//! snapshot and a plan (`plan.rs`), FaultInjection, then attempts
//! (`attempt.rs`) at endpoints the balancer chooses, each outcome classified
//! by `retry.rs` into return / retry after a pause / fail. Every request
//! ends in [`finish`]: gRPC rewriting, response header changes, stats.
//!
//! Errors the node answers itself are [`MeshError`]s (`shoal-error`):
//! `no-host` (400), `unknown-service`, `no-healthy-endpoint`, `overloaded`
//! (503), `timeout` (504), `upstream-connect`, `upstream-reset` and
//! `peer-not-serving` (502), `fault-injected` (the policy's status). A gRPC
//! caller (`content-type: application/grpc*`) gets them as a trailers-only
//! gRPC response (see [`grpc_failure`]).
//!
//! Before the first byte of a request goes to a peer, the peer's certificate
//! must name the node gossip put at that address and the service;
//! otherwise the endpoint is refused, counted
//! (`shoal_peer_not_serving_total{service}`), logged, dropped from the
//! service's table, and the request goes to another endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::SmallRng;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::attempt::{Failed, Source, attempt};
use crate::balance::{NoEndpoint, Target};
use crate::body::{ReqBody, full};
use crate::connect;
use crate::egress;
use crate::error::{Marked, MeshError, grpc_failure};
use crate::filters;
use crate::frame::{self, ProxyBody, RequestHeadMap};
use crate::h1_server;
use crate::listen;
use crate::plan::{self, Action, Plan};
use crate::retry::{self, Decision, Failure, Outcome, Report, Tried};
use crate::state::Shared;
use crate::stats::{self, Direction, Edge};
use crate::tcp;
use crate::upgrade;

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
    listen::accept_loop(guard, listener, shutdown, move |mut io, peer, activity| {
        let shared = shared.clone();
        let builder = builder.clone();
        let fixed = fixed.clone();
        async move {
            // A per-upstream listener of a TCP service carries bytes.
            if let Some(service) = &fixed
                && tcp::wait_protocol(&shared, service, tcp::HANDSHAKE_TIMEOUT).await == Some(true)
            {
                let _tunnel = activity.begin(false);
                tcp::serve_connection(&shared, service, io, peer).await;
                return;
            }
            // The node's own HTTP/1.1 server takes the common request; the
            // first one it does not (h2c, an upgrade, a streamed body) hands
            // the connection, with the bytes read, to hyper.
            let handler = |req| {
                let (shared, fixed) = (shared.clone(), fixed.clone());
                async move { upgrade::unasked_switch(handle(shared, fixed, req).await) }
            };
            let read = match h1_server::serve(&mut io, &activity, handler).await {
                h1_server::Served::Closed => return,
                h1_server::Served::Handoff(read) => read,
            };
            let io = listen::Rewound::new(read, io);
            serve_hyper(shared, fixed, builder, io, activity).await;
        }
    })
    .await;
}

/// Serves the rest of a connection with hyper (HTTP/1.1 with upgrades, or
/// h2c with prior knowledge).
async fn serve_hyper(
    shared: Arc<Shared>,
    fixed: Option<Arc<str>>,
    builder: hyper_util::server::conn::auto::Builder<TokioExecutor>,
    io: listen::Rewound,
    activity: Arc<listen::Activity>,
) {
    // Upgraded connections (tunnels) hold a sender: the connection counts
    // against the cap until the last one ends.
    let (tunnels, mut tunnels_done) = tokio::sync::mpsc::channel::<()>(1);
    let svc = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        let fixed = fixed.clone();
        let tunnels = tunnels.clone();
        // In flight until the response body is done (or the tunnel).
        let request = activity.begin(req.version() == Version::HTTP_2);
        let mut req = req.map(ReqBody::Hyper);
        let upgrade = upgrade::requested(&req).map(|token| {
            req.extensions_mut().insert(upgrade::Requested(token));
            hyper::upgrade::on(&mut req)
        });
        async move {
            let resp = handle(shared.clone(), fixed, req).await;
            let resp = match upgrade {
                Some(client) => {
                    let guards: Vec<Box<dyn std::any::Any + Send>> =
                        vec![Box::new(request), Box::new(tunnels)];
                    upgrade::answer(&shared, resp, client, guards)
                }
                None => upgrade::plain_answer(resp, vec![Box::new(request)]),
            };
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await;
    let _ = tunnels_done.recv().await;
}

/// How a request ended: what the caller gets, how many attempts it took,
/// and the endpoint (node) that answered last.
struct Finished {
    resp: Response<ProxyBody>,
    attempts: u32,
    endpoint: Option<String>,
}

impl Finished {
    /// A request the mesh answered before any attempt.
    fn early(resp: Response<ProxyBody>) -> Self {
        Finished {
            resp,
            attempts: 0,
            endpoint: None,
        }
    }
}

async fn handle(
    shared: Arc<Shared>,
    fixed: Option<Arc<str>>,
    req: Request<ReqBody>,
) -> Response<ProxyBody> {
    if req.method() == http::Method::CONNECT && fixed.is_none() {
        return connect::handle(shared, req).await;
    }
    let start = Instant::now();
    let grpc_call = stats::is_grpc(req.headers());
    let (mut head, body) = req.into_parts();
    if let Some(service) = &fixed {
        plan::address_to(&mut head, service);
    }
    let line = (head.method.as_str().to_owned(), head.uri.path().to_owned());
    // One policy snapshot for the whole request: it sees the old set or the
    // new one, never half.
    let set = shared.policy.store.snapshot();
    let mut rng = shared.rng.request();
    let mut edge = Edge {
        direction: Direction::Outbound,
        source: match shared.source_service() {
            s if s.is_empty() => "unknown".into(),
            s => s,
        },
        destination: "unknown".into(),
        trace: Default::default(),
    };
    let (_count, in_flight) = shared.outbound_request();
    match plan::plan(&head, fixed.as_deref(), &set, &shared.config, &mut rng) {
        Err(e) => {
            let resp = match e {
                MeshError::NoHost => {
                    e.response_with("the request names no service (Host header or absolute URI)")
                }
                MeshError::ForwardingLoop => e.response_with(&format!(
                    "the request already crossed {} serving nodes (shoal-forwarded): a forwarding loop",
                    plan::MAX_MESH_HOPS
                )),
                e => e.response(),
            };
            finish(
                &shared,
                edge,
                grpc_call,
                None,
                Finished::early(resp),
                start,
                line,
            )
        }
        Ok(plan) => {
            let may_egress = fixed.is_none();
            let done = dispatch(
                &shared,
                &mut edge,
                &plan,
                head,
                body,
                (in_flight, may_egress),
                &mut rng,
            )
            .await;
            finish(&shared, edge, grpc_call, Some(&plan), done, start, line)
        }
    }
}

/// Where every outbound request ends: a gRPC caller gets a mesh failure as
/// a gRPC status, the route's response header changes apply, and the
/// response is counted (its body is measured as it streams).
fn finish(
    shared: &Shared,
    edge: Edge,
    grpc_call: bool,
    plan: Option<&Plan<'_>>,
    done: Finished,
    start: Instant,
    (method, path): (String, String),
) -> Response<ProxyBody> {
    let Finished {
        mut resp,
        attempts,
        endpoint,
    } = done;
    let route = plan.and_then(|p| p.route);
    tracing::trace!(
        status = %resp.status(),
        attempts,
        endpoint = endpoint.as_deref().unwrap_or("-"),
        route = route.unwrap_or("-"),
        "outbound request done"
    );
    if grpc_call {
        let service = match (edge.destination.as_str(), plan) {
            ("unknown", Some(p)) => p.service.as_str(),
            ("unknown", None) => "-",
            (d, _) => d,
        };
        resp = grpc_failure(resp, service);
    }
    edge.trace
        .attempt(endpoint.as_deref().unwrap_or(""), attempts);
    let exchange = stats::Exchange {
        edge,
        route: route.unwrap_or("").to_string(),
        method,
        path,
        grpc_call,
        start,
        access_log: shared.config.access_log,
    };
    shared.stats.finish(exchange, resp)
}

/// Carries out `plan`: a redirect or the no-match 404 is answered here; a
/// pass-through goes straight to its address; otherwise the backend must be
/// known (or, unrouted and not on a per-upstream listener, `may_egress`, a
/// host `--egress` admits: sent there from this node), the node under its
/// in-flight cap, FaultInjection may delay or abort; then [`run`], and the
/// route's response header changes apply to the answer.
async fn dispatch(
    shared: &Arc<Shared>,
    edge: &mut Edge,
    plan: &Plan<'_>,
    head: Parts,
    body: ReqBody,
    (in_flight, may_egress): (u64, bool),
    rng: &mut SmallRng,
) -> Finished {
    match &plan.action {
        Action::NoMatch { route } => {
            return Finished::early(filters::no_match(route).map(full));
        }
        Action::Redirect {
            status,
            location,
            response_headers,
        } => {
            return Finished::early(
                filters::redirect(*status, location, response_headers).map(full),
            );
        }
        Action::Passthrough(addr) => {
            edge.destination = "passthrough".into();
            let _gauge = shared.stats.in_flight(edge);
            if in_flight > shared.config.max_in_flight {
                return Finished::early(
                    MeshError::Overloaded
                        .response_with("this node has too many requests in flight"),
                );
            }
            return passthrough(shared, plan, *addr, head, body).await;
        }
        Action::Forward(_) => {}
    }
    if shared.targets(&plan.backend).is_none() {
        if may_egress
            && plan.route.is_none()
            && let Some(to) = egress::destination(&head)
            && let Some(label) = shared.config.egress.admit(&to.host)
        {
            edge.destination = label;
            let _gauge = shared.stats.in_flight(edge);
            if in_flight > shared.config.max_in_flight {
                return Finished::early(
                    MeshError::Overloaded
                        .response_with("this node has too many requests in flight"),
                );
            }
            if shared.names_own_listener(&to.host, to.port).await {
                return Finished::early(MeshError::ForwardingLoop.response_with(&format!(
                    "{}:{} is this node's own listener; the request would come back to it",
                    to.host, to.port
                )));
            }
            let resp = egress::forward(&shared.clients, &to, head, body, plan.timeout).await;
            return Finished {
                resp,
                attempts: 1,
                endpoint: Some(format!("{}:{}", to.host, to.port)),
            };
        }
        return Finished::early(
            MeshError::UnknownService.response_with("no node in the mesh serves this service"),
        );
    }
    edge.destination = plan.backend.clone();
    let _gauge = shared.stats.in_flight(edge);
    if in_flight > shared.config.max_in_flight {
        return Finished::early(
            MeshError::Overloaded.response_with("this node has too many requests in flight"),
        );
    }
    if let Some(delay) = plan.fault.delay {
        tokio::time::sleep(delay).await;
    }
    if let Some(status) = plan.fault.abort {
        shared.policy.metrics.denied(&plan.backend, "fault");
        return Finished::early(MeshError::FaultInjected(status).response());
    }
    let mut done = run(shared, edge, plan, head, body, rng).await;
    if let Some(f) = plan.forward() {
        filters::forward_response(done.resp.headers_mut(), f);
    }
    done
}

/// Mirrored copies in flight on this node, at most [`MAX_MIRRORS`]: past
/// it, a mirror is skipped (the main request never waits for one).
static MIRRORS: AtomicUsize = AtomicUsize::new(0);

/// At most this many mirrored copies in flight per node.
pub const MAX_MIRRORS: usize = 256;

/// Sends a copy of a request to a mirror's service, fire-and-forget: one
/// attempt at an endpoint the balancer chooses, within the request's
/// timeout; the answer is read and dropped. Skipped when [`MAX_MIRRORS`]
/// copies are in flight or the service has no endpoint.
fn mirror(
    shared: &Arc<Shared>,
    wire: RequestHeadMap,
    body: Bytes,
    trailers: Option<HeaderMap>,
    timeout: Duration,
) {
    if MIRRORS.fetch_add(1, Ordering::Relaxed) >= MAX_MIRRORS {
        MIRRORS.fetch_sub(1, Ordering::Relaxed);
        tracing::debug!(service = %wire.service, "mirror skipped: too many mirrored requests in flight");
        return;
    }
    struct Slot;
    impl Drop for Slot {
        fn drop(&mut self) {
            MIRRORS.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let slot = Slot;
    let shared = shared.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let Some(targets) = shared.targets(&wire.service) else {
            tracing::debug!(service = %wire.service, "mirror skipped: unknown service");
            return;
        };
        let mut rng = shared.rng.request();
        let now = tokio::time::Instant::now();
        let Ok(target) = choose(&shared, &wire.service, &targets, &[], now, &mut rng) else {
            return;
        };
        let mut wire = wire;
        wire.deadline_ms = timeout.as_millis().max(1) as u64;
        let mut source = Source::Replay(body, trailers);
        let guard = target.state.start();
        let exchange = async {
            if let Ok((resp, _)) =
                attempt(&shared, target, &wire, &mut source, Box::new(guard)).await
            {
                let _ = resp.into_body().collect().await;
            }
        };
        let _ = tokio::time::timeout(timeout, exchange).await;
    });
}

/// A request to an IP address (not a service): forwarded there directly as
/// the caller sent it (hop-by-hop headers removed), within the request's
/// timeout. Nothing of the mesh applies. An address that is this node's own
/// listener is refused (`508 forwarding-loop`): the request would come back
/// in and be sent to itself again, a connection and a task per turn.
async fn passthrough(
    shared: &Shared,
    plan: &Plan<'_>,
    to: SocketAddr,
    head: Parts,
    body: ReqBody,
) -> Finished {
    if shared.is_own_listener(to) {
        tracing::debug!(%to, "pass-through to this node's own listener refused");
        return Finished::early(MeshError::ForwardingLoop.response_with(&format!(
            "{to} is this node's own listener; the request would come back to it"
        )));
    }
    let h2 = head.version == Version::HTTP_2;
    let pq = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut headers = head.headers;
    frame::strip_hop_by_hop(&mut headers);
    if let Some(u) = head.extensions.get::<upgrade::Requested>() {
        upgrade::restore(&mut headers, &u.0);
    }
    if h2 {
        headers.remove(http::header::HOST);
    }
    let req = Request::builder()
        .method(head.method)
        .uri(format!("http://{to}{pq}"))
        .version(if h2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .body(body.map_err(frame::BoxError::from).boxed_unsync());
    let mut req = match req {
        Ok(r) => r,
        Err(e) => {
            return Finished::early(
                MeshError::BadRequest.response_with(&format!("bad request head: {e}")),
            );
        }
    };
    *req.headers_mut() = headers;
    let endpoint = Some(to.to_string());
    let resp =
        match tokio::time::timeout(plan.timeout, shared.clients.speaking(h2).request(req)).await {
            Ok(Ok(resp)) => resp.map(|b| b.map_err(frame::BoxError::from).boxed_unsync()),
            Ok(Err(e)) if e.is_connect() => {
                MeshError::UpstreamConnect.response_with("could not connect to the address")
            }
            Ok(Err(_)) => {
                MeshError::UpstreamReset.response_with("the exchange with the address failed")
            }
            Err(_) => MeshError::DeadlineExceeded.response_with("the request timed out"),
        };
    Finished {
        resp,
        attempts: 1,
        endpoint,
    }
}

/// Attempts until one answer is final: chooses an endpoint, tries it,
/// reports the outcome to the balancer and follows [`retry::classify`].
async fn run(
    shared: &Arc<Shared>,
    edge: &Edge,
    plan: &Plan<'_>,
    head: Parts,
    body: ReqBody,
    rng: &mut SmallRng,
) -> Finished {
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let has_body = !body.is_end_stream();
    let mut source = match Source::read(
        body,
        plan.idempotent,
        shared.config.retry.max_replay_body,
        &edge.trace,
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            return Finished::early(
                MeshError::BadRequest.response_with(&format!("reading the request body: {e}")),
            );
        }
    };
    let mut head = head;
    if let Some(f) = plan.forward() {
        filters::forward_request(&mut head, f);
        if !f.mirrors.is_empty() && head.extensions.get::<upgrade::Requested>().is_none() {
            match &source {
                Source::Replay(data, trailers) => {
                    for m in &f.mirrors {
                        let (parts, ()) = filters::mirror_request(&head, &m.backend).into_parts();
                        let wire = request_head(shared, &m.backend.name, parts, has_body);
                        mirror(shared, wire, data.clone(), trailers.clone(), plan.timeout);
                    }
                }
                Source::Once(_) => {
                    tracing::debug!(service = %plan.backend, "mirror skipped: the request body streams (not buffered)");
                }
            }
        }
    }
    let mut wire = request_head(shared, &plan.backend, head, has_body);
    let budget = shared.budget(&plan.backend);
    budget.request_at(tokio::time::Instant::now().into_std());
    let mut exclude: Vec<String> = Vec::new();
    let mut last: Option<Response<ProxyBody>> = None;
    let mut attempts = 0;
    loop {
        let targets = shared
            .targets(&plan.backend)
            .unwrap_or_else(|| Arc::new([]));
        let now = tokio::time::Instant::now();
        let target = match choose(shared, &plan.backend, &targets, &exclude, now, rng) {
            Ok(t) => t,
            Err(none) => {
                return Finished {
                    resp: last.unwrap_or_else(|| none.error.response_with(none.message)),
                    attempts,
                    endpoint: exclude.last().cloned(),
                };
            }
        };
        let attempt_deadline = plan
            .attempt_timeout
            .map_or(deadline, |t| deadline.min(now + t));
        wire.deadline_ms = attempt_deadline
            .saturating_duration_since(now)
            .as_millis()
            .max(1) as u64;
        let (outcome, resp, rtt, refused_by) = try_endpoint(
            shared,
            target,
            &wire,
            &mut source,
            attempt_deadline,
            deadline,
        )
        .await;
        if outcome != Outcome::NotServing {
            attempts += 1;
        }
        exclude.push(target.node.clone());
        let tried = Tried {
            outcome,
            idempotent: plan.idempotent,
            replayable: source.replayable(),
            resendable: source.resendable(),
            attempt: wire.attempt,
            others: targets.iter().any(|t| !exclude.contains(&t.node)),
        };
        let now = tokio::time::Instant::now();
        let verdict = retry::classify(&tried, &plan.retry, &budget, now, deadline, rng);
        let at = now.into_std();
        match verdict.report {
            Report::Success => shared.balancer.success_at(&target.state, rtt, at),
            Report::Failure => shared.balancer.failure_at(&plan.backend, &target.state, at),
            Report::Down => shared.balancer.down_at(&target.state, at),
            Report::Refuse => {
                if let Some(peer) = &refused_by {
                    shared.refuse(target, peer);
                }
            }
            Report::Nothing => {}
        }
        let answer = || {
            resp.unwrap_or_else(|| {
                let f = outcome
                    .failure()
                    .expect("every outcome without a response is a failure");
                f.error.response_with(f.message)
            })
        };
        let endpoint = Some(target.node.clone());
        match verdict.decision {
            Decision::Return => {
                return Finished {
                    resp: answer(),
                    attempts,
                    endpoint,
                };
            }
            Decision::Fail(f) => {
                return Finished {
                    resp: f.error.response_with(f.message),
                    attempts,
                    endpoint,
                };
            }
            Decision::Elsewhere => {
                // Nothing was sent: no attempt or retry budget spent.
                last = last.or_else(|| Some(answer()));
            }
            Decision::RetryAfter(pause) => {
                last = Some(answer());
                shared.stats.retry(edge);
                tokio::time::sleep(pause).await;
                wire.attempt += 1;
            }
        }
    }
}

/// Chooses an endpoint of `service` among `targets`, none of `exclude`, or
/// says why there is none.
fn choose<'t>(
    shared: &Shared,
    service: &str,
    targets: &'t [Target],
    exclude: &[String],
    now: tokio::time::Instant,
    rng: &mut SmallRng,
) -> Result<&'t Target, Failure> {
    let (error, message) = match shared
        .balancer
        .choose(targets, exclude, now.into_std(), rng)
    {
        Ok(i) => return Ok(&targets[i]),
        // Gossip offers endpoints, but none this node would trust.
        Err(NoEndpoint::NoHealthy) if shared.has_refused(service) => (
            MeshError::PeerNotServing,
            "the peers gossip names for this service hold certificates that do not name it",
        ),
        Err(NoEndpoint::NoHealthy) => (
            MeshError::NoHealthyEndpoint,
            "the service has no healthy endpoint",
        ),
        Err(NoEndpoint::Saturated) => (
            MeshError::Overloaded,
            "every endpoint is at its in-flight cap",
        ),
    };
    Err(Failure { error, message })
}

/// One attempt at `target` under `attempt_deadline`, as a typed outcome
/// (with the answer, the time to its head, and the peer that was refused).
async fn try_endpoint(
    shared: &Shared,
    target: &Target,
    wire: &RequestHeadMap,
    source: &mut Source,
    attempt_deadline: tokio::time::Instant,
    deadline: tokio::time::Instant,
) -> (
    Outcome,
    Option<Response<ProxyBody>>,
    Duration,
    Option<Arc<transport::Identity>>,
) {
    let guard = target.state.start();
    let result = tokio::time::timeout_at(
        attempt_deadline,
        attempt(shared, target, wire, source, Box::new(guard)),
    )
    .await;
    match result {
        Ok(Ok((resp, rtt))) => {
            let outcome = Outcome::Answered {
                status: resp.status(),
                marked: Marked::of(&resp),
            };
            (outcome, Some(resp), rtt, None)
        }
        Ok(Err(Failed::Connect(msg))) => {
            tracing::debug!(node = %target.node, error = %msg, "endpoint unreachable; marking it down");
            (Outcome::Connect, None, Duration::ZERO, None)
        }
        Ok(Err(Failed::Reset(msg))) => {
            tracing::debug!(node = %target.node, error = %msg, "exchange reset; marking the endpoint down");
            (Outcome::Reset, None, Duration::ZERO, None)
        }
        Ok(Err(Failed::NotServing(peer))) => {
            (Outcome::NotServing, None, Duration::ZERO, Some(peer))
        }
        // Only this attempt's backendRequest timeout: maybe elsewhere.
        Err(_) if attempt_deadline < deadline => {
            (Outcome::AttemptTimeout, None, Duration::ZERO, None)
        }
        Err(_) => (Outcome::Deadline, None, Duration::ZERO, None),
    }
}

/// The head that goes on the wire to `backend`: the app's headers (the
/// route's changes already applied) without hop-by-hop ones, Host (sent as
/// the authority) and `shoal-timeout`.
fn request_head(shared: &Shared, backend: &str, parts: Parts, has_body: bool) -> RequestHeadMap {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| backend.to_string());
    let upgrade = parts
        .extensions
        .get::<upgrade::Requested>()
        .map(|u| u.0.clone());
    let mut headers = parts.headers;
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    headers.remove(plan::TIMEOUT_NAME);
    RequestHeadMap {
        upgrade,
        service: backend.to_string(),
        source: shared.source_service(),
        deadline_ms: 0,
        attempt: 1,
        version: if parts.version == Version::HTTP_2 {
            2
        } else {
            1
        },
        method: parts.method.as_str().to_owned(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        authority,
        headers,
        has_body,
    }
}
