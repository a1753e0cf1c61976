//! Traffic fixtures: local HTTP/1.1 + h2c upstreams with handlers, a mesh
//! builder with client nodes that have outbound listeners, and HTTP helpers.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use node::proxy::{Protocol, ServiceSpec};
use node::{Node, NodeConfig};

use crate::{Pki, TEST_GOSSIP, eventually};

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

pub const WAIT: Duration = Duration::from_secs(10);

// === upstream servers ===

/// A local HTTP/1.1 + h2c server with a handler, counting requests.
pub struct Upstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// Which HTTP versions an [`Upstream`] speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaks {
    /// HTTP/1.1 and h2c with prior knowledge (hyper-util's auto builder).
    Both,
    /// HTTP/1.1 only: an h2c preface gets an error.
    Http1Only,
    /// h2c with prior knowledge only: an HTTP/1.1 request gets an error.
    H2cOnly,
}

impl Upstream {
    pub async fn start(handler: Handler) -> Self {
        Self::speaking(Speaks::Both, handler).await
    }

    /// A server speaking only `speaks`.
    pub async fn speaking(speaks: Speaks, handler: Handler) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            while let Ok((stream, _)) = listener.accept().await {
                let (handler, hits, builder) = (handler.clone(), h.clone(), builder.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        if req.uri().path() != "/healthz" {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let io = TokioIo::new(stream);
                    let _ = match speaks {
                        Speaks::Both => builder.serve_connection(io, svc).await,
                        Speaks::Http1Only => hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await
                            .map_err(Into::into),
                        Speaks::H2cOnly => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, svc)
                                .await
                                .map_err(Into::into)
                        }
                    };
                });
            }
        });
        Upstream { addr, hits, task }
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed()
}

/// Echoes method, path, provenance and traceparent in headers, and streams
/// the request body back.
pub fn echo() -> Handler {
    Arc::new(|req: Request<Incoming>| {
        Box::pin(async move {
            let mut r = Response::builder()
                .header("x-method", req.method().as_str())
                .header("x-path", req.uri().path());
            for h in ["shoal-forwarded", "traceparent", "host"] {
                if let Some(v) = req.headers().get(h) {
                    r = r.header(format!("x-seen-{h}"), v);
                }
            }
            r.body(req.into_body().map_err(|e| e.into()).boxed())
                .unwrap()
        })
    })
}

/// Answers 200 with a fixed body.
pub fn ok(text: &'static str) -> Handler {
    Arc::new(move |_req| Box::pin(async move { Response::new(full(text)) }))
}

/// Always answers 503.
pub fn failing() -> Handler {
    Arc::new(|_req| {
        Box::pin(async move {
            let mut r = Response::new(full("down"));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r
        })
    })
}

// === mesh ===

#[derive(Default)]
pub struct Mesh {
    pub pki: Pki,
    pub seed: Option<String>,
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new("test.shoal")
    }
}

impl Mesh {
    pub fn new() -> Self {
        Self::default()
    }

    /// A node config: certificate naming `cert_services`, fronting `services`.
    pub fn config(
        &self,
        name: &str,
        cert_services: &[&str],
        services: &[(&str, SocketAddr)],
    ) -> NodeConfig {
        let mut c = NodeConfig::local(name, self.pki.issue(name, cert_services));
        c.gossip_interval = TEST_GOSSIP;
        c.seeds = self.seed.iter().cloned().collect();
        for (svc, addr) in services {
            let mut spec = ServiceSpec::new(*svc, *addr, Protocol::Auto);
            spec.health_interval = Duration::from_millis(100);
            c.proxy.services.push(spec);
        }
        c
    }

    pub async fn start(&mut self, config: NodeConfig) -> Node {
        let node = Node::start(config).await.expect("start node");
        if self.seed.is_none() {
            self.seed = Some(node.quic_addr().to_string());
        }
        node
    }

    /// A client node with an outbound listener.
    pub async fn client(&mut self, name: &str, tweak: impl FnOnce(&mut NodeConfig)) -> Node {
        let mut c = self.config(name, &["client"], &[]);
        c.proxy.outbound = Some("127.0.0.1:0".parse().unwrap());
        tweak(&mut c);
        self.start(c).await
    }
}

/// Waits until `node` routes `service` to `n` endpoints.
pub async fn routable(node: &Node, service: &str, n: usize) {
    eventually(
        &format!("{} routes {service} to {n} endpoints", node.name()),
        WAIT,
        || async {
            let count = node
                .proxy()
                .services()
                .iter()
                .filter(|s| s.service == service)
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.routable)
                .count();
            (count == n).then_some(())
        },
    )
    .await;
}

pub fn http1() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn get(outbound: SocketAddr, host: &str, path: &str) -> Request<Body> {
    Request::get(format!("http://{outbound}{path}"))
        .header("host", host)
        .body(empty())
        .unwrap()
}

pub async fn body_of(r: Response<Incoming>) -> Bytes {
    r.into_body().collect().await.unwrap().to_bytes()
}
