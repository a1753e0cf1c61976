//! Active health checks of local service instances (HTTP GET of a path, or a
//! TCP connect), and publication of each instance's record in gossip.
//!
//! A failed check marks the instance unhealthy at once and publishes it, so
//! peers stop routing to it within one check interval plus the check timeout
//! plus one gossip round. Between changes the record (load figures) is
//! refreshed at most once a second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gossip::Health;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Protocol;
use crate::frame::ProxyBody;
use crate::local::LocalService;
use crate::state::Shared;

/// How often load figures are republished when nothing else changed.
const LOAD_REFRESH: Duration = Duration::from_secs(1);

/// Checks `svc` forever, publishing its record.
pub(crate) async fn run(shared: Arc<Shared>, svc: Arc<LocalService>) {
    let interval = svc.spec.health_interval;
    let timeout = interval.mul_f64(0.8).min(Duration::from_secs(2));
    let mut last_publish = Instant::now() - LOAD_REFRESH;
    loop {
        let started = Instant::now();
        if svc.spec.protocol == Protocol::Auto
            && svc.detected().is_none()
            && let Some(found) = detect(svc.spec.addr, timeout).await
        {
            svc.set_detected(Some(found));
        }
        let healthy = check(&shared, &svc, timeout).await;
        svc.http1.sweep();
        svc.conns.sweep();
        if !healthy && svc.spec.protocol == Protocol::Auto {
            // Down, or checked in the wrong version: find out again once it
            // answers.
            svc.set_detected(None);
        }
        let h = if healthy {
            Health::Healthy
        } else {
            Health::Unhealthy
        };
        if svc.set_health(h) {
            tracing::info!(service = %svc.spec.name, addr = %svc.spec.addr, health = ?h, "local instance health changed");
            shared.publish(&svc).await;
            last_publish = Instant::now();
        } else if last_publish.elapsed() >= LOAD_REFRESH {
            shared.publish(&svc).await;
            last_publish = Instant::now();
        }
        tokio::time::sleep(interval.saturating_sub(started.elapsed())).await;
    }
}

async fn check(shared: &Shared, svc: &LocalService, timeout: Duration) -> bool {
    let addr = svc.spec.addr;
    match &svc.spec.health_path {
        None => matches!(
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await,
            Ok(Ok(_))
        ),
        Some(path) => {
            let Ok(uri) = format!("http://{addr}{path}").parse::<http::Uri>() else {
                return false;
            };
            let req = http::Request::get(uri)
                .header("user-agent", "shoal-health")
                .body(ProxyBody::new(Empty::new().map_err(|e| match e {})))
                .expect("static request parts");
            let client = if svc.h2_for(false) == Some(true) {
                &shared.clients.h2
            } else {
                &shared.clients.http1
            };
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(resp)) => {
                    let ok = resp.status().is_success() || resp.status().is_redirection();
                    let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
                    ok
                }
                _ => false,
            }
        }
    }
}

/// The HTTP/2 connection preface and an empty SETTINGS frame.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// An HTTP/1.1 request a server must refuse before any handler runs (an
/// invalid `Content-Length` is an unrecoverable framing error): its 400
/// says the server speaks HTTP/1.1.
const H1_PROBE: &[u8] = b"GET /.shoal-probe HTTP/1.1\r\nHost: shoal-probe\r\nContent-Length: x\r\nConnection: close\r\n\r\n";

/// Finds out which HTTP versions the instance at `addr` speaks: (HTTP/1.1,
/// h2c with prior knowledge). `None`: it cannot be reached now.
///
/// h2c first: the HTTP/2 preface and an empty SETTINGS frame get the
/// server's SETTINGS frame back (type 4, not an ACK, stream 0). A server
/// that does not answer so speaks HTTP/1.1 (it sees a request line with
/// method `PRI` and refuses it). Only a server that speaks h2c is asked
/// about HTTP/1.1 too, with [`H1_PROBE`]: an `HTTP/1.x` status line back
/// means yes. Such servers (gRPC servers, Go's and hyper's dual-stack ones)
/// reject its framing before any handler runs. An answer of another kind,
/// a close or silence until `timeout` mean no.
pub(crate) async fn detect(addr: std::net::SocketAddr, timeout: Duration) -> Option<(bool, bool)> {
    let h2 = probe(addr, timeout, H2_PREFACE, |b| {
        b[3] == 0x04 && b[4] & 0x01 == 0 && b[5..9] == [0, 0, 0, 0]
    })
    .await?;
    if !h2 {
        return Some((true, false));
    }
    let h1 = probe(addr, timeout, H1_PROBE, |b| b.starts_with(b"HTTP/1.")).await?;
    Some((h1, true))
}

/// Sends `hello` on a new connection and judges the first 9 bytes back.
async fn probe(
    addr: std::net::SocketAddr,
    timeout: Duration,
    hello: &[u8],
    judge: impl Fn(&[u8; 9]) -> bool,
) -> Option<bool> {
    let mut s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    if s.write_all(hello).await.is_err() {
        return Some(false);
    }
    let mut head = [0u8; 9];
    Some(matches!(
        tokio::time::timeout(timeout, s.read_exact(&mut head)).await,
        Ok(Ok(_)) if judge(&head)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    /// A hyper server speaking `1`, `2` or both (`0`); counts handler calls.
    async fn server(kind: u8) -> (std::net::SocketAddr, Arc<AtomicU64>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        c.fetch_add(1, Ordering::Relaxed);
                        async { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new()))) }
                    });
                    let io = TokioIo::new(s);
                    let _ = match kind {
                        1 => hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                            .map_err(|e| e.to_string()),
                        2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                            .map_err(|e| e.to_string()),
                        _ => hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await
                            .map_err(|e| e.to_string()),
                    };
                });
            }
        });
        (addr, calls)
    }

    #[tokio::test]
    async fn detection_tells_http1_h2c_and_both_apart_without_calling_the_app() {
        let t = Duration::from_secs(2);
        for (kind, want) in [(1, (true, false)), (2, (false, true)), (0, (true, true))] {
            let (addr, calls) = server(kind).await;
            assert_eq!(detect(addr, t).await, Some(want), "server kind {kind}");
            assert_eq!(
                calls.load(Ordering::Relaxed),
                0,
                "the probe reached a handler"
            );
        }
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        assert_eq!(detect(closed, t).await, None);
    }
}
