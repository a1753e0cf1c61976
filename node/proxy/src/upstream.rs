//! The local instance: a request admitted by the inbound side goes to the
//! instance over a pooled keep-alive client, in the caller's HTTP version
//! if the instance speaks it (protocol `auto`), else the one it speaks,
//! with `shoal-forwarded` added and the caller's deadline applied. Failures
//! reaching it are `upstream-connect`, `upstream-reset` and
//! `deadline-exceeded`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, Version};
use http_body_util::BodyExt;
use transport::Identity;

use crate::config::Protocol;
use crate::error::MeshError;
use crate::frame::{self, ProxyBody, RequestHeadMap};
use crate::health;
use crate::local::{Clients, LocalService};
use crate::upgrade;

/// Provenance header the serving node adds: `by=<node>;from=<caller node>;svc=<caller service>`.
pub const FORWARDED_HEADER: &str = "shoal-forwarded";

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
        None => match health::detect(svc.spec.addr, Duration::from_secs(1)).await {
            Some(found) => {
                svc.set_detected(Some(found));
                svc.h2_for(caller_h2).unwrap_or(caller_h2)
            }
            None => caller_h2,
        },
    };
    let uri = format!("http://{}{}", svc.spec.addr, head.uri);
    let mut headers = std::mem::take(&mut head.headers);
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::HOST);
    if !h2 && let Ok(v) = HeaderValue::from_str(&head.authority) {
        headers.insert(http::header::HOST, v);
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
            return MeshError::BadRequest.response_with(&format!("bad request head: {e}"));
        }
    };
    *req.headers_mut() = headers;
    let client = clients.speaking(h2);
    svc.in_flight.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let call = client.request(req);
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
            resp.map(|b| b.map_err(frame::BoxError::from).boxed_unsync())
        }
        Err(e) if e.is_connect() => {
            // It may come back speaking something else: ask again then.
            if svc.spec.protocol == Protocol::Auto {
                svc.set_detected(None);
            }
            MeshError::UpstreamConnect.response_with("could not connect to the local instance")
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
            MeshError::UpstreamReset.response_with("the local instance failed mid-request")
        }
    }
}
