//! An echo backend for conformance tests: every request is answered 200
//! with a JSON report of what arrived (which backend it is, method, path,
//! query, Host, and every header in order), as the upstream suite's echo
//! server reports it. gRPC calls (`content-type: application/grpc*`) get
//! the same report as the body, `content-type: application/grpc` and
//! `grpc-status: 0` in the trailers.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};

use crate::traffic::{Body, Handler, Upstream};

/// What an echo backend saw.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EchoReport {
    /// Which backend answered (e.g. `echo-v1`).
    pub backend: String,
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// The Host header (or `:authority`).
    pub host: String,
    /// Every header as received, in order, names lower case.
    pub headers: Vec<(String, String)>,
}

impl EchoReport {
    /// Every value of header `name`, joined with `,` (as the suite compares
    /// them); `None` when absent.
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<&str> = self
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect();
        (!values.is_empty()).then(|| values.join(","))
    }
}

/// The handler of an echo backend named `backend`.
pub fn handler(backend: &str) -> Handler {
    let backend: Arc<str> = backend.into();
    Arc::new(move |req: Request<Incoming>| {
        let backend = backend.clone();
        Box::pin(async move {
            let grpc = req
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            let report = EchoReport {
                backend: backend.to_string(),
                method: req.method().to_string(),
                path: req.uri().path().to_string(),
                query: req.uri().query().map(str::to_string),
                host: req
                    .headers()
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| req.uri().authority().map(|a| a.to_string()))
                    .unwrap_or_default(),
                headers: req
                    .headers()
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.as_str().to_string(),
                            String::from_utf8_lossy(v.as_bytes()).into_owned(),
                        )
                    })
                    .collect(),
            };
            // Drain the request body so streams end cleanly.
            let _ = req.into_body().collect().await;
            let json = Bytes::from(serde_json::to_vec(&report).unwrap_or_default());
            if grpc {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
                    vec![Ok(Frame::data(json)), Ok(Frame::trailers(trailers))];
                let body: Body = StreamBody::new(futures::stream::iter(frames)).boxed();
                return Response::builder()
                    .header("content-type", "application/grpc")
                    .body(body)
                    .unwrap();
            }
            let body: Body = Full::new(json).map_err(|e| match e {}).boxed();
            Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap()
        })
    })
}

/// Starts an echo backend named `backend` on 127.0.0.1 port 0.
pub async fn start(backend: &str) -> Upstream {
    Upstream::start(handler(backend)).await
}
