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

use crate::proxy::frame::ProxyBody;
use crate::proxy::{LocalService, Shared};

/// How often load figures are republished when nothing else changed.
const LOAD_REFRESH: Duration = Duration::from_secs(1);

/// Checks `svc` forever, publishing its record.
pub(crate) async fn run(shared: Arc<Shared>, svc: Arc<LocalService>) {
    let interval = svc.spec.health_interval;
    let timeout = interval.mul_f64(0.8).min(Duration::from_secs(2));
    let mut last_publish = Instant::now() - LOAD_REFRESH;
    loop {
        let started = Instant::now();
        if svc.h2().is_none()
            && let Some(h2) = detect(svc.spec.addr, timeout).await
        {
            svc.set_detected(Some(h2));
        }
        let healthy = check(&shared, &svc, timeout).await;
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
            let client = if svc.h2() == Some(true) {
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

/// Finds out whether the instance at `addr` speaks h2c with prior
/// knowledge: sends the HTTP/2 preface and an empty SETTINGS frame and reads
/// the first 9 bytes back. An h2c server answers with its SETTINGS frame
/// (type 4, flags 0, stream 0); an HTTP/1.1 server with a status line, by
/// closing, or not at all within `timeout`. `None`: no connection.
pub(crate) async fn detect(addr: std::net::SocketAddr, timeout: Duration) -> Option<bool> {
    let mut s = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    if s.write_all(H2_PREFACE).await.is_err() {
        return Some(false);
    }
    let mut head = [0u8; 9];
    let h2 = matches!(
        tokio::time::timeout(timeout, s.read_exact(&mut head)).await,
        Ok(Ok(_)) if head[3] == 0x04 && head[4] & 0x01 == 0 && head[5..9] == [0, 0, 0, 0]
    );
    Some(h2)
}
