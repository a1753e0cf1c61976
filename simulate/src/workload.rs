//! The workload: open-loop requests through the mesh on a seeded schedule,
//! and the HTTP upstreams (one per service instance) that answer with the
//! name of the node in front of them, so every response says who served it.
//!
//! This module owns request scheduling and recording; it must not judge
//! (see [`crate::invariants`]) nor start nodes (see [`crate::runner`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::scenario::{Workload, idempotent};

/// One request the workload sent (or meant to send).
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Scheduled time, seconds from the start of the timeline.
    pub t: f64,
    /// When it actually went out, seconds from the start of the timeline:
    /// the scheduled time plus however late the driver got to it on a busy
    /// machine. Its life is `sent_at` to `sent_at + latency`.
    pub sent_at: f64,
    /// Sending node.
    pub client: String,
    /// Whether the client is one of the workload's denied callers.
    pub denied: bool,
    /// HTTP method.
    pub method: String,
    /// Whether the proxy may retry it after a reset.
    pub idempotent: bool,
    /// Response status, if a response came.
    pub status: Option<u16>,
    /// `shoal-error` of the response, or why no response came
    /// (`client-down`, `connect`, `client-timeout`, `io`).
    pub error: Option<String>,
    /// Seconds from sending to the complete response (or the failure).
    pub latency: f64,
    /// The node whose upstream answered (2xx only).
    pub served_by: Option<String>,
}

impl RequestRecord {
    /// A 2xx response.
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }

    /// Sent at all: the client node was running.
    pub fn sent(&self) -> bool {
        self.error.as_deref() != Some("client-down")
    }

    /// When it was answered (or failed), seconds from the start of the
    /// timeline.
    pub fn ended(&self) -> f64 {
        self.sent_at + self.latency
    }
}

/// One planned request.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Offset from the start of the timeline.
    pub at: Duration,
    /// Sending node.
    pub client: String,
    /// Method.
    pub method: String,
    /// From a denied caller.
    pub denied: bool,
}

/// The whole schedule: Poisson arrivals at `rps` (and `denied_rps`), each
/// from a client chosen uniformly, with a method drawn from the mix. The same
/// seed gives the same schedule.
pub fn schedule(w: &Workload, seed: u64) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_10ad);
    let mut out = Vec::new();
    let mut stream = |rps: f64, clients: &[String], denied: bool, rng: &mut StdRng| {
        if rps <= 0.0 || clients.is_empty() {
            return;
        }
        let mut t = w.start.as_secs_f64();
        loop {
            let u: f64 = rng.r#gen::<f64>().max(1e-12);
            t += -u.ln() / rps;
            if t >= w.stop.as_secs_f64() {
                break;
            }
            let client = clients[rng.gen_range(0..clients.len())].clone();
            let roll: f64 = rng.r#gen();
            let mut acc = 0.0;
            let mut method = w
                .methods
                .last()
                .map(|m| m.0.clone())
                .unwrap_or("GET".into());
            for (m, share) in &w.methods {
                acc += share;
                if roll < acc {
                    method = m.clone();
                    break;
                }
            }
            out.push(Planned {
                at: Duration::from_secs_f64(t),
                client,
                method,
                denied,
            });
        }
    };
    stream(w.rps, &w.clients, false, &mut rng);
    stream(w.denied_rps, &w.denied, true, &mut rng);
    out.sort_by_key(|p| p.at);
    out
}

/// Where each running node's outbound listener is (updated as nodes stop
/// and start).
pub type Outbounds = Arc<Mutex<BTreeMap<String, SocketAddr>>>;

/// Sends the planned requests at their times through the clients'
/// outbound listeners, without waiting for earlier answers (open loop), and
/// returns every record once the last answer is in or timed out.
pub async fn drive(
    plan: Vec<Planned>,
    service: String,
    timeout: Duration,
    start: Instant,
    outbounds: Outbounds,
    sink: Arc<Mutex<Vec<RequestRecord>>>,
) {
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(HttpConnector::new());
    let mut tasks = JoinSet::new();
    for (i, p) in plan.into_iter().enumerate() {
        tokio::time::sleep_until(start + p.at).await;
        let addr = outbounds.lock().unwrap().get(&p.client).copied();
        let mut rec = RequestRecord {
            t: p.at.as_secs_f64(),
            sent_at: p.at.as_secs_f64(),
            idempotent: idempotent(&p.method),
            client: p.client,
            denied: p.denied,
            method: p.method,
            status: None,
            error: None,
            latency: 0.0,
            served_by: None,
        };
        let Some(addr) = addr else {
            rec.error = Some("client-down".into());
            sink.lock().unwrap().push(rec);
            continue;
        };
        let (client, service, sink) = (client.clone(), service.clone(), sink.clone());
        tasks.spawn(async move {
            let body = if rec.method == "GET" {
                Bytes::new()
            } else {
                Bytes::from(format!("request {i}"))
            };
            let req = hyper::Request::builder()
                .method(rec.method.as_str())
                .uri(format!("http://{addr}/work/{i}"))
                .header(hyper::header::HOST, service.as_str())
                .body(Full::new(body))
                .expect("valid request");
            let sent = Instant::now();
            rec.sent_at = (sent - start).as_secs_f64();
            let outcome = tokio::time::timeout(timeout, async {
                let resp = client.request(req).await?;
                let status = resp.status().as_u16();
                let err = resp
                    .headers()
                    .get(node::proxy::ERROR_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = resp.into_body().collect().await.map(|b| b.to_bytes());
                Ok::<_, hyper_util::client::legacy::Error>((status, err, body.ok()))
            })
            .await;
            rec.latency = sent.elapsed().as_secs_f64();
            match outcome {
                Err(_) => rec.error = Some("client-timeout".into()),
                Ok(Err(e)) => {
                    rec.error = Some(if e.is_connect() { "connect" } else { "io" }.into())
                }
                Ok(Ok((status, err, body))) => {
                    rec.status = Some(status);
                    rec.error = err;
                    if (200..300).contains(&status) {
                        rec.served_by =
                            body.map(|b| String::from_utf8_lossy(&b).trim().to_string());
                    }
                }
            }
            sink.lock().unwrap().push(rec);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
}

/// A service instance: answers every request with 200 and the name of the
/// node that fronts it, after `service_time`.
pub struct Upstream {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream for `node` on 127.0.0.1, port 0.
    pub async fn start(node: &str, service_time: Duration) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let name = Bytes::from(node.to_string());
        let task = tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            while let Ok((stream, _)) = listener.accept().await {
                let (name, builder) = (name.clone(), builder.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let name = name.clone();
                        async move {
                            let _ = req.into_body().collect().await;
                            if !service_time.is_zero() {
                                tokio::time::sleep(service_time).await;
                            }
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(name)))
                        }
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Upstream { addr, task })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload() -> Workload {
        Workload {
            rps: 50.0,
            clients: vec!["n1".into(), "n2".into()],
            denied: vec!["n5".into()],
            denied_rps: 10.0,
            service: "web".into(),
            methods: vec![("GET".into(), 0.7), ("POST".into(), 0.3)],
            start: Duration::ZERO,
            stop: Duration::from_secs(20),
            timeout: Duration::from_secs(5),
            service_time: Duration::ZERO,
        }
    }

    #[test]
    fn schedule_is_seeded_and_close_to_the_rates() {
        let a = schedule(&workload(), 42);
        let b = schedule(&workload(), 42);
        assert_eq!(a.len(), b.len());
        assert!(
            a.iter()
                .zip(&b)
                .all(|(x, y)| x.at == y.at && x.method == y.method)
        );
        let regular = a.iter().filter(|p| !p.denied).count();
        // Poisson(1000): sd ~32.
        assert!((850..1150).contains(&regular), "{regular}");
        let posts = a.iter().filter(|p| p.method == "POST").count() as f64;
        assert!((posts / a.len() as f64 - 0.3).abs() < 0.06);
        assert!(a.iter().filter(|p| p.denied).all(|p| p.client == "n5"));
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at));
        assert_ne!(schedule(&workload(), 7).len(), 0);
    }
}
