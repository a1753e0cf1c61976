//! The local instance: a request admitted by the inbound side goes to the
//! instance over keep-alive connections (HTTP/1.1: the instance's own
//! `local::Http1Pool`; h2c: the pooled client), in the caller's HTTP version
//! if the instance speaks it (protocol `auto`), else the one it speaks,
//! with `shoal-forwarded` added and the caller's deadline applied. Failures
//! reaching it are `upstream-connect`, `upstream-reset` and
//! `deadline-exceeded`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Body;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use transport::Identity;

use crate::config::Protocol;
use crate::error::MeshError;
use crate::frame::{self, ProxyBody, RequestHeadMap};
use crate::h1;
use crate::health;
use crate::local::{Clients, LocalService, Returning};
use crate::upgrade;

/// Provenance header the serving node adds: `by=<node>;from=<caller node>;svc=<caller service>`.
pub const FORWARDED_HEADER: &str = "shoal-forwarded";
/// [`FORWARDED_HEADER`] as a name (not parsed per request).
pub(crate) const FORWARDED: http::HeaderName = http::HeaderName::from_static(FORWARDED_HEADER);

/// Forwards one admitted request to `svc` on behalf of `caller`; `node` is
/// this node's name (provenance).
pub(crate) async fn forward(
    svc: &Arc<LocalService>,
    clients: &Clients,
    node: &str,
    caller: &Identity,
    mut head: RequestHeadMap,
    body: ProxyBody,
) -> Response<ProxyBody> {
    // `auto`: the caller's version if the instance speaks it, else the one
    // it speaks (found out now if the health task has not yet); the
    // caller's version if it cannot be reached to ask.
    let caller_h2 = head.version == 2;
    if head.upgrade.is_some() && svc.spec.protocol == Protocol::H2c {
        return MeshError::BadRequest
            .response_with("the instance speaks h2c only: an HTTP/1.1 upgrade cannot reach it");
    }
    let h2 = match svc.h2_for(caller_h2) {
        // An upgrade is an HTTP/1.1 affair.
        _ if head.upgrade.is_some() => false,
        Some(h2) => h2,
        None => match Box::pin(health::detect(svc.spec.addr, Duration::from_secs(1))).await {
            Some(found) => {
                svc.set_detected(Some(found));
                svc.h2_for(caller_h2).unwrap_or(caller_h2)
            }
            None => caller_h2,
        },
    };
    // HTTP/1.1 goes on this node's own connections to the instance in
    // origin form; h2c through the pooled client (absolute form).
    let uri = if h2 {
        format!("http://{}{}", svc.spec.addr, head.uri)
    } else {
        std::mem::take(&mut head.uri)
    };
    let mut headers = std::mem::take(&mut head.headers);
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    if !h2 {
        // As the pooled client did: the instance's address when the caller's
        // authority is no valid field.
        let host = HeaderValue::from_str(&head.authority)
            .or_else(|_| HeaderValue::from_str(&svc.spec.addr.to_string()));
        if let Ok(v) = host {
            headers.insert(http::header::HOST, v);
        }
    }
    if let Some(token) = &head.upgrade {
        upgrade::restore(&mut headers, token);
    }
    let caller_svc = if head.source.is_empty() {
        "-"
    } else {
        head.source.as_str()
    };
    let provenance = format!("by={};from={};svc={}", node, caller.node, caller_svc);
    if let Ok(v) = HeaderValue::from_str(&provenance) {
        headers.append(FORWARDED, v);
    }
    // Plain HTTP/1.1 with a whole, small body goes through the node's own
    // client; h2c, upgrades and streamed bodies through hyper's.
    let own = !h2
        && head.upgrade.is_none()
        && h1::valid_target(&uri)
        && body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= h1::MAX_SENT_BODY);
    let outgoing = if own {
        match Method::from_bytes(head.method.as_bytes()) {
            Ok(method) => Outgoing::Own {
                method,
                target: uri,
                headers,
                body,
            },
            Err(e) => return MeshError::BadRequest.response_with(&format!("bad method: {e}")),
        }
    } else {
        match Request::builder()
            .method(head.method.as_str())
            .uri(uri)
            .version(if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            })
            .body(body)
        {
            Ok(mut req) => {
                *req.headers_mut() = headers;
                Outgoing::Hyper(req)
            }
            Err(e) => {
                return MeshError::BadRequest.response_with(&format!("bad request head: {e}"));
            }
        }
    };
    svc.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let call = async {
        match outgoing {
            Outgoing::Own {
                method,
                target,
                headers,
                body,
            } => send_own(svc, method, &target, &headers, body).await,
            Outgoing::Hyper(req) if h2 => match clients.h2.request(req).await {
                Ok(resp) => Ok(resp.map(|b| b.map_err(frame::BoxError::from).boxed_unsync())),
                Err(e) if e.is_connect() => Err(CallError::Connect),
                Err(e) => Err(CallError::Exchange(e.to_string())),
            },
            Outgoing::Hyper(req) => send_http1(svc, req).await,
        }
    };
    let result = if head.deadline_ms > 0 {
        match tokio::time::timeout(Duration::from_millis(head.deadline_ms), call).await {
            Ok(r) => r,
            Err(_) => {
                svc.in_flight.fetch_sub(1, Ordering::Relaxed);
                return MeshError::DeadlineExceeded.response_with("the caller's deadline passed");
            }
        }
    } else {
        call.await
    };
    svc.in_flight.fetch_sub(1, Ordering::Relaxed);
    match result {
        Ok(resp) => {
            svc.latency.observe(started.elapsed());
            resp
        }
        Err(CallError::Connect) => {
            // It may come back speaking something else: ask again then.
            if svc.spec.protocol == Protocol::Auto {
                svc.set_detected(None);
            }
            MeshError::UpstreamConnect.response_with("could not connect to the local instance")
        }
        Err(CallError::Request(e)) => {
            MeshError::BadRequest.response_with(&format!("the request body was cut short: {e}"))
        }
        Err(CallError::Exchange(e)) => {
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
            MeshError::UpstreamReset.response_with("the local instance failed mid-request")
        }
    }
}

/// Dialing the local instance.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A request as it goes to the instance.
enum Outgoing {
    /// Through the node's own HTTP/1.1 client (`h1.rs`).
    Own {
        method: Method,
        target: String,
        headers: http::HeaderMap,
        body: ProxyBody,
    },
    /// Through hyper's client (h2c, upgrades, streamed or large bodies).
    Hyper(Request<ProxyBody>),
}

/// Why a call to the local instance failed.
enum CallError {
    /// The caller's request body failed before it was whole: nothing was
    /// sent.
    Request(String),
    /// No connection could be made: nothing was sent.
    Connect,
    /// The exchange failed after the request was (maybe) sent.
    Exchange(String),
}

/// Sends a request with a whole body (read now: it is at most
/// [`h1::MAX_SENT_BODY`]) through the node's own client, over an idle
/// connection of `svc`'s pool, else a new one. A reused connection the
/// instance closed as the request went out (no byte of an answer) is
/// replaced by a new one, once, when the method is idempotent.
async fn send_own(
    svc: &Arc<LocalService>,
    method: Method,
    target: &str,
    headers: &http::HeaderMap,
    body: ProxyBody,
) -> Result<Response<ProxyBody>, CallError> {
    let data = if body.is_end_stream() {
        Bytes::new()
    } else {
        match body.collect().await {
            Ok(whole) => whole.to_bytes(),
            Err(e) => return Err(CallError::Request(e.to_string())),
        }
    };
    let mut wire = Vec::new();
    h1::encode_request(&mut wire, &method, target, headers, &data);
    let mut pooled = svc.conns.take();
    loop {
        let reused = pooled.is_some();
        let mut conn = match pooled.take() {
            Some(conn) => conn,
            None => Box::pin(h1::Conn::dial(svc.spec.addr, CONNECT_TIMEOUT))
                .await
                .map_err(|_| CallError::Connect)?,
        };
        match conn.exchange(&wire, method == Method::HEAD).await {
            Ok((parts, framing)) => {
                let body = h1::ResponseBody::new(conn, framing, svc.conns.clone());
                return Ok(Response::from_parts(
                    parts,
                    body.map_err(frame::BoxError::from).boxed_unsync(),
                ));
            }
            Err(h1::H1Error::ClosedEarly) if reused && h1::idempotent(&method) => {}
            Err(e) => return Err(CallError::Exchange(e.to_string())),
        }
    }
}

/// Sends `req` over an idle keep-alive connection of `svc`'s pool, else a
/// new one. A request that an idle connection could not take (the instance
/// had closed it) goes on the next one, as the pooled client retried such
/// requests.
async fn send_http1(
    svc: &Arc<LocalService>,
    mut req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, CallError> {
    while let Some(mut tx) = svc.http1.take() {
        if tx.ready().await.is_err() {
            continue;
        }
        match tx.try_send_request(req).await {
            Ok(resp) => return Ok(returning(resp, tx, svc)),
            Err(mut e) => match e.take_message() {
                Some(unsent) => req = unsent,
                None => return Err(CallError::Exchange(e.into_error().to_string())),
            },
        }
    }
    // Boxed: the dial's state would otherwise sit in every request's future.
    let mut tx = Box::pin(dial(svc.spec.addr)).await?;
    match tx.send_request(req).await {
        Ok(resp) => Ok(returning(resp, tx, svc)),
        Err(e) => Err(CallError::Exchange(e.to_string())),
    }
}

/// A new HTTP/1.1 connection to the instance at `addr`, driven by its own
/// task.
async fn dial(addr: std::net::SocketAddr) -> Result<SendRequest<ProxyBody>, CallError> {
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        _ => return Err(CallError::Connect),
    };
    let _ = tcp.set_nodelay(true);
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|_| CallError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "connection to the local instance ended");
        }
    });
    Ok(tx)
}

/// The response, its body handing `tx` back to the pool at its end (not
/// after a protocol switch: the connection is the app's then).
fn returning(
    resp: Response<Incoming>,
    tx: SendRequest<ProxyBody>,
    svc: &Arc<LocalService>,
) -> Response<ProxyBody> {
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        // Held until hyper hands the connection over to the upgrade.
        let mut tx = tx;
        tokio::spawn(async move {
            let _ = tx.ready().await;
        });
        return resp.map(|b| b.map_err(frame::BoxError::from).boxed_unsync());
    }
    resp.map(|b| {
        Returning::new(b, tx, svc.clone())
            .map_err(frame::BoxError::from)
            .boxed_unsync()
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::AtomicU64;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use hyper::service::service_fn;

    use super::*;
    use crate::config::ServiceSpec;

    /// An HTTP/1.1 app on 127.0.0.1 answering "ok" (with `connection:
    /// close` when `close`); counts the connections it accepted.
    async fn app(close: bool) -> (SocketAddr, Arc<AtomicU64>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| async move {
                        let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                        if close {
                            resp.headers_mut()
                                .insert("connection", HeaderValue::from_static("close"));
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    fn get() -> Request<ProxyBody> {
        let mut req = Request::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
        *req.uri_mut() = "/x".parse().unwrap();
        req.headers_mut()
            .insert(http::header::HOST, HeaderValue::from_static("web"));
        req
    }

    async fn body_of(resp: Response<ProxyBody>) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_kept_alive_connection() {
        let (addr, accepted) = app(false).await;
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        for _ in 0..5 {
            let resp = send_http1(&svc, get()).await.ok().expect("answered");
            assert_eq!(resp.status(), 200);
            assert_eq!(body_of(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(svc.http1.idle(), 1);
    }

    #[tokio::test]
    async fn a_closed_connection_is_not_used_again() {
        let (addr, accepted) = app(true).await;
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        for _ in 0..3 {
            let resp = send_http1(&svc, get()).await.ok().expect("answered");
            assert_eq!(body_of(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_takes_its_connection_with_it() {
        let (addr, accepted) = app(false).await;
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        let resp = send_http1(&svc, get()).await.ok().expect("answered");
        drop(resp);
        let resp = send_http1(&svc, get()).await.ok().expect("answered");
        assert_eq!(body_of(resp).await, "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn the_own_client_keeps_one_connection_for_sequential_requests_with_bodies() {
        let (addr, accepted) = app(false).await;
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        let mut headers = http::HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_static("web"));
        for i in 0..5 {
            let body = crate::body::full(Bytes::from(vec![b'x'; i * 1000]));
            let resp = send_own(&svc, Method::POST, "/x", &headers, body)
                .await
                .ok()
                .expect("answered");
            assert_eq!(resp.status(), 200);
            assert_eq!(body_of(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
        assert_eq!(svc.conns.idle(), 1);
    }

    #[tokio::test]
    async fn the_own_client_does_not_reuse_a_connection_the_instance_closes() {
        let (addr, accepted) = app(true).await;
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        for _ in 0..3 {
            let resp = send_own(
                &svc,
                Method::GET,
                "/x",
                &http::HeaderMap::new(),
                crate::body::empty(),
            )
            .await
            .ok()
            .expect("answered");
            assert_eq!(body_of(resp).await, "ok");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 3);
        assert_eq!(svc.conns.idle(), 0);
    }

    #[tokio::test]
    async fn an_instance_that_is_not_listening_is_a_connect_failure() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let svc = Arc::new(LocalService::new(ServiceSpec::new(
            "web",
            addr,
            crate::config::Protocol::Http1,
        )));
        assert!(matches!(
            send_http1(&svc, get()).await,
            Err(CallError::Connect)
        ));
    }
}
