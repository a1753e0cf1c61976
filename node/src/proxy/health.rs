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
            let client = if svc.spec.protocol == crate::proxy::Protocol::H2c {
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
