//! The failures the mesh answers itself, as one typed enum: each knows its
//! HTTP status, its `shoal-error` code (the wire contract callers and docs
//! name), its gRPC status, and whether a request refused with it may go to
//! another endpoint. Both sides build their error responses here, and the
//! calling side reads a peer's `shoal-error` back into a [`MeshError`]
//! ([`MeshError::parse`]) before deciding anything.
//!
//! This module owns no I/O and no state.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};

use crate::body::{empty, full};
use crate::frame::ProxyBody;

/// Response header naming why the mesh itself answered with an error.
pub const ERROR_HEADER: &str = "shoal-error";
/// [`ERROR_HEADER`] as a name: a lookup by `&str` parses the name first.
pub(crate) const ERROR_NAME: http::HeaderName = http::HeaderName::from_static(ERROR_HEADER);

/// A failure the mesh answers itself (never the app's own answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MeshError {
    /// 400 `no-host`: the request names no service.
    #[error("the request names no service")]
    NoHost,
    /// 400 `bad-request`: the request could not be forwarded (unreadable
    /// body, a head the instance's client refuses).
    #[error("the request could not be forwarded")]
    BadRequest,
    /// 503 `unknown-service` (calling side): no node in the mesh serves it.
    #[error("no node in the mesh serves the service")]
    UnknownService,
    /// 404 `unknown-service` (serving side): this node fronts no instance of it.
    #[error("no node in the mesh serves the service")]
    NoLocalInstance,
    /// 503 `no-healthy-endpoint`: no endpoint (or the local instance) is healthy.
    #[error("the service has no healthy endpoint")]
    NoHealthyEndpoint,
    /// 503 `overloaded`: at the node's or every endpoint's in-flight cap.
    #[error("the mesh is at its in-flight limit")]
    Overloaded,
    /// 503 `too-many-connections`: the listener's connection cap (answered by
    /// the accept loop in raw bytes, `listen.rs`).
    #[error("the listener is at its connection cap")]
    TooManyConnections,
    /// 502 `peer-not-serving`: the peers offered hold certificates that do
    /// not name the service (nothing was sent to them).
    #[error("the peers offered for the service hold certificates that do not name it")]
    PeerNotServing,
    /// 502 `upstream-connect`: could not reach the serving node or instance.
    #[error("could not reach the service's instance")]
    UpstreamConnect,
    /// 502 `upstream-reset`: the exchange broke mid-request.
    #[error("the service's instance failed mid-request")]
    UpstreamReset,
    /// 504 `timeout` (calling side): no response before the request or
    /// backend-request timeout.
    #[error("no response before the deadline")]
    Timeout,
    /// 504 `deadline-exceeded` (serving side): the caller's deadline passed.
    #[error("no response before the deadline")]
    DeadlineExceeded,
    /// 403 `not-served`: this node's certificate does not name the service.
    #[error("the serving node's certificate does not name the service")]
    NotServed,
    /// 403 `unauthorized`: the caller's certificate does not name its source service.
    #[error("the caller's certificate does not name its source service")]
    Unauthorized,
    /// 403 `forbidden`: no AuthorizationPolicy allows the caller.
    #[error("no AuthorizationPolicy allows this caller")]
    Forbidden,
    /// 429 `rate-limited`: a RateLimit on the service is exhausted.
    #[error("the service's rate limit is exhausted")]
    RateLimited,
    /// 508 `forwarding-loop`: the destination is this node's own listener,
    /// or the request already crossed `plan::MAX_MESH_HOPS` serving nodes:
    /// it would come back round the same nodes.
    #[error("the request would come back round the nodes it crossed (a forwarding loop)")]
    ForwardingLoop,
    /// `fault-injected` with the FaultInjection policy's abort status.
    #[error("aborted by a FaultInjection policy")]
    FaultInjected(StatusCode),
}

/// Whether a request a far node refused with an error may go to another
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetrySafety {
    /// The request never reached an instance: any method may go elsewhere
    /// (given a body that can be sent again).
    AnyMethod,
    /// The answer is final: hand it to the caller.
    Never,
}

impl MeshError {
    /// Every kind, with the fault status a test would pick (tests, docs).
    pub const ALL: [MeshError; 18] = [
        MeshError::NoHost,
        MeshError::BadRequest,
        MeshError::UnknownService,
        MeshError::NoLocalInstance,
        MeshError::NoHealthyEndpoint,
        MeshError::Overloaded,
        MeshError::TooManyConnections,
        MeshError::PeerNotServing,
        MeshError::UpstreamConnect,
        MeshError::UpstreamReset,
        MeshError::Timeout,
        MeshError::DeadlineExceeded,
        MeshError::NotServed,
        MeshError::Unauthorized,
        MeshError::Forbidden,
        MeshError::RateLimited,
        MeshError::ForwardingLoop,
        MeshError::FaultInjected(StatusCode::IM_A_TEAPOT),
    ];

    /// The HTTP status the mesh answers with.
    pub fn status(self) -> StatusCode {
        match self {
            MeshError::NoHost | MeshError::BadRequest => StatusCode::BAD_REQUEST,
            MeshError::NoLocalInstance => StatusCode::NOT_FOUND,
            MeshError::UnknownService
            | MeshError::NoHealthyEndpoint
            | MeshError::Overloaded
            | MeshError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::PeerNotServing | MeshError::UpstreamConnect | MeshError::UpstreamReset => {
                StatusCode::BAD_GATEWAY
            }
            MeshError::Timeout | MeshError::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            MeshError::NotServed | MeshError::Unauthorized | MeshError::Forbidden => {
                StatusCode::FORBIDDEN
            }
            MeshError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            MeshError::ForwardingLoop => StatusCode::LOOP_DETECTED,
            MeshError::FaultInjected(status) => status,
        }
    }

    /// The `shoal-error` code (a contract: docs/PROXY.md, docs/FRAMES.md).
    pub fn code(self) -> &'static str {
        match self {
            MeshError::NoHost => "no-host",
            MeshError::BadRequest => "bad-request",
            MeshError::UnknownService | MeshError::NoLocalInstance => "unknown-service",
            MeshError::NoHealthyEndpoint => "no-healthy-endpoint",
            MeshError::Overloaded => "overloaded",
            MeshError::TooManyConnections => "too-many-connections",
            MeshError::PeerNotServing => "peer-not-serving",
            MeshError::UpstreamConnect => "upstream-connect",
            MeshError::UpstreamReset => "upstream-reset",
            MeshError::Timeout => "timeout",
            MeshError::DeadlineExceeded => "deadline-exceeded",
            MeshError::NotServed => "not-served",
            MeshError::Unauthorized => "unauthorized",
            MeshError::Forbidden => "forbidden",
            MeshError::RateLimited => "rate-limited",
            MeshError::ForwardingLoop => "forwarding-loop",
            MeshError::FaultInjected(_) => "fault-injected",
        }
    }

    /// Reads a `shoal-error` code (with the status it came with) back into
    /// the error; `None` for a code the mesh does not define. The status
    /// tells the two `unknown-service` kinds apart (404: the serving node
    /// has no instance) and gives a fault its abort status.
    pub fn parse(status: StatusCode, code: &str) -> Option<Self> {
        Some(match code {
            "no-host" => MeshError::NoHost,
            "bad-request" => MeshError::BadRequest,
            "unknown-service" if status == StatusCode::NOT_FOUND => MeshError::NoLocalInstance,
            "unknown-service" => MeshError::UnknownService,
            "no-healthy-endpoint" => MeshError::NoHealthyEndpoint,
            "overloaded" => MeshError::Overloaded,
            "too-many-connections" => MeshError::TooManyConnections,
            "peer-not-serving" => MeshError::PeerNotServing,
            "upstream-connect" => MeshError::UpstreamConnect,
            "upstream-reset" => MeshError::UpstreamReset,
            "timeout" => MeshError::Timeout,
            "deadline-exceeded" => MeshError::DeadlineExceeded,
            "not-served" => MeshError::NotServed,
            "unauthorized" => MeshError::Unauthorized,
            "forbidden" => MeshError::Forbidden,
            "rate-limited" => MeshError::RateLimited,
            "forwarding-loop" => MeshError::ForwardingLoop,
            "fault-injected" => MeshError::FaultInjected(status),
            _ => return None,
        })
    }

    /// The gRPC status a gRPC caller gets for it (trailers-only).
    pub fn grpc_status(self) -> u32 {
        match self {
            MeshError::Timeout | MeshError::DeadlineExceeded => 4, // DEADLINE_EXCEEDED
            MeshError::RateLimited => 8,                           // RESOURCE_EXHAUSTED
            MeshError::NotServed | MeshError::Unauthorized | MeshError::Forbidden => 7, // PERMISSION_DENIED
            MeshError::NoHost | MeshError::BadRequest | MeshError::ForwardingLoop => 13, // INTERNAL
            MeshError::NoLocalInstance => 12, // UNIMPLEMENTED
            MeshError::UnknownService
            | MeshError::NoHealthyEndpoint
            | MeshError::Overloaded
            | MeshError::TooManyConnections
            | MeshError::PeerNotServing
            | MeshError::UpstreamConnect
            | MeshError::UpstreamReset => 14, // UNAVAILABLE
            MeshError::FaultInjected(status) => grpc_status_of(status),
        }
    }

    /// Whether a request a far node refused with this may go elsewhere.
    pub fn retry_safety(self) -> RetrySafety {
        match self {
            // Refused before any instance saw the request.
            MeshError::UnknownService
            | MeshError::NoLocalInstance
            | MeshError::NotServed
            | MeshError::NoHealthyEndpoint
            | MeshError::UpstreamConnect
            | MeshError::PeerNotServing
            | MeshError::Overloaded
            | MeshError::TooManyConnections => RetrySafety::AnyMethod,
            _ => RetrySafety::Never,
        }
    }

    /// Whether the far node answering this says the endpoint cannot serve
    /// now (its instance is unreachable or unhealthy): mark it down.
    pub fn endpoint_down(self) -> bool {
        matches!(
            self,
            MeshError::UpstreamConnect | MeshError::NoHealthyEndpoint
        )
    }

    /// The response the mesh answers with, its body naming the cause.
    pub fn response(self) -> Response<ProxyBody> {
        self.response_with(&self.to_string())
    }

    /// The response the mesh answers with, its body saying `msg`.
    pub fn response_with(self, msg: &str) -> Response<ProxyBody> {
        let code = self.code();
        let mut r = Response::new(full(Bytes::from(format!("shoal: {msg} ({code})\n"))));
        *r.status_mut() = self.status();
        r.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static(code));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    }
}

/// What a response says about the mesh: its `shoal-error`, read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// No `shoal-error`: the app's own answer.
    App,
    /// A mesh failure.
    Mesh(MeshError),
    /// A `shoal-error` the mesh does not define (a newer or lying peer).
    Unknown,
}

impl Marked {
    /// Reads `resp`'s `shoal-error`.
    pub fn of<B>(resp: &Response<B>) -> Self {
        match resp.headers().get(ERROR_NAME) {
            None => Marked::App,
            Some(v) => v
                .to_str()
                .ok()
                .and_then(|c| MeshError::parse(resp.status(), c))
                .map_or(Marked::Unknown, Marked::Mesh),
        }
    }
}

/// The gRPC status for an HTTP status alone (a fault's abort status, a code
/// the mesh does not define).
fn grpc_status_of(status: StatusCode) -> u32 {
    match status.as_u16() {
        504 => 4,        // DEADLINE_EXCEEDED
        429 => 8,        // RESOURCE_EXHAUSTED
        403 => 7,        // PERMISSION_DENIED
        401 => 16,       // UNAUTHENTICATED
        400 => 13,       // INTERNAL
        404 => 12,       // UNIMPLEMENTED
        502 | 503 => 14, // UNAVAILABLE
        _ => 2,          // UNKNOWN
    }
}

/// Rewrites a mesh failure for a gRPC caller as a trailers-only response:
/// HTTP 200, `content-type: application/grpc`, `grpc-status` and a
/// `grpc-message` naming the cause and the service. The `shoal-error`
/// header (and `retry-after`) stay. Any other response is returned as is.
pub fn grpc_failure(resp: Response<ProxyBody>, service: &str) -> Response<ProxyBody> {
    let (code, grpc, what) = match Marked::of(&resp) {
        Marked::App => return resp,
        Marked::Mesh(e) => (e.code().to_string(), e.grpc_status(), e.to_string()),
        Marked::Unknown => (
            resp.headers()[ERROR_HEADER]
                .to_str()
                .unwrap_or("")
                .to_string(),
            grpc_status_of(resp.status()),
            "the mesh could not complete the call".to_string(),
        ),
    };
    let status = resp.status();
    let message = format!(
        "shoal {code} (HTTP {}): {what} (service {service})",
        status.as_u16()
    );
    let mut headers = resp.headers().clone();
    headers.remove(http::header::CONTENT_LENGTH);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert("grpc-status", HeaderValue::from(grpc));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&message)) {
        headers.insert("grpc-message", v);
    }
    let mut r = Response::new(empty());
    *r.headers_mut() = headers;
    r
}

/// gRPC's `grpc-message` encoding: bytes outside printable ASCII, and `%`,
/// as `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Body;

    /// The contract as docs/PROXY.md states it, typed out independently.
    const TABLE: &[(MeshError, u16, &str, u32, bool)] = &[
        (MeshError::NoHost, 400, "no-host", 13, false),
        (MeshError::BadRequest, 400, "bad-request", 13, false),
        (MeshError::UnknownService, 503, "unknown-service", 14, true),
        (MeshError::NoLocalInstance, 404, "unknown-service", 12, true),
        (
            MeshError::NoHealthyEndpoint,
            503,
            "no-healthy-endpoint",
            14,
            true,
        ),
        (MeshError::Overloaded, 503, "overloaded", 14, true),
        (
            MeshError::TooManyConnections,
            503,
            "too-many-connections",
            14,
            true,
        ),
        (MeshError::PeerNotServing, 502, "peer-not-serving", 14, true),
        (
            MeshError::UpstreamConnect,
            502,
            "upstream-connect",
            14,
            true,
        ),
        (MeshError::UpstreamReset, 502, "upstream-reset", 14, false),
        (MeshError::Timeout, 504, "timeout", 4, false),
        (
            MeshError::DeadlineExceeded,
            504,
            "deadline-exceeded",
            4,
            false,
        ),
        (MeshError::NotServed, 403, "not-served", 7, true),
        (MeshError::Unauthorized, 403, "unauthorized", 7, false),
        (MeshError::Forbidden, 403, "forbidden", 7, false),
        (MeshError::RateLimited, 429, "rate-limited", 8, false),
        (MeshError::ForwardingLoop, 508, "forwarding-loop", 13, false),
    ];

    #[test]
    fn each_failure_has_its_status_code_grpc_status_and_retry_safety() {
        for &(e, status, code, grpc, safe) in TABLE {
            assert_eq!(e.status().as_u16(), status, "{e:?}");
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(e.grpc_status(), grpc, "{e:?}");
            assert_eq!(e.retry_safety() == RetrySafety::AnyMethod, safe, "{e:?}");
        }
        assert_eq!(TABLE.len() + 1, MeshError::ALL.len());
    }

    #[test]
    fn fault_aborts_keep_their_status_and_map_by_it() {
        for (status, grpc) in [(418, 2), (503, 14), (504, 4), (429, 8), (401, 16), (500, 2)] {
            let e = MeshError::FaultInjected(StatusCode::from_u16(status).unwrap());
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), "fault-injected");
            assert_eq!(e.grpc_status(), grpc, "{status}");
            assert_eq!(e.retry_safety(), RetrySafety::Never);
        }
    }

    #[test]
    fn a_code_reads_back_into_the_same_error() {
        for e in MeshError::ALL {
            assert_eq!(MeshError::parse(e.status(), e.code()), Some(e), "{e:?}");
            assert_eq!(Marked::of(&e.response()), Marked::Mesh(e));
        }
        assert_eq!(MeshError::parse(StatusCode::BAD_GATEWAY, "Timeout"), None);
        assert_eq!(MeshError::parse(StatusCode::BAD_GATEWAY, ""), None);
        let mut lie = MeshError::Forbidden.response();
        lie.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static("please-retry"));
        assert_eq!(Marked::of(&lie), Marked::Unknown);
        assert_eq!(Marked::of(&Response::new(())), Marked::App);
    }

    #[test]
    fn a_mesh_response_carries_its_code_and_names_the_cause() {
        let r = MeshError::UpstreamReset.response_with("the serving node failed mid-request");
        assert_eq!(r.status(), 502);
        assert_eq!(r.headers()[ERROR_HEADER], "upstream-reset");
        assert!(!r.body().is_end_stream());
    }

    #[test]
    fn listener_refusal_bytes_name_the_same_code() {
        let refusal = std::str::from_utf8(crate::listen::REFUSAL).unwrap();
        let e = MeshError::TooManyConnections;
        assert!(refusal.starts_with(&format!("HTTP/1.1 {}", e.status().as_u16())));
        assert!(refusal.contains(&format!("{ERROR_HEADER}: {}\r\n", e.code())));
    }

    #[test]
    fn grpc_failure_is_trailers_only_and_names_cause_and_service() {
        let mut e = MeshError::RateLimited.response();
        e.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(2));
        let r = grpc_failure(e, "api");
        assert_eq!(r.status(), 200);
        assert!(r.body().is_end_stream());
        let h = r.headers();
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["shoal-error"], "rate-limited");
        assert_eq!(h["retry-after"], "2");
        let msg = h["grpc-message"].to_str().unwrap();
        assert!(
            msg.contains("rate-limited") && msg.contains("(service api)"),
            "{msg}"
        );
        let mut odd = MeshError::UpstreamReset.response();
        odd.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static("something-new"));
        let r = grpc_failure(odd, "api");
        assert_eq!(r.headers()["grpc-status"], "14", "by the HTTP status (502)");
        assert_eq!(r.headers()["shoal-error"], "something-new");
        let app = Response::new(empty());
        assert!(
            !grpc_failure(app, "api")
                .headers()
                .contains_key("grpc-status")
        );
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(percent_encode("a b%c"), "a b%25c");
        assert_eq!(percent_encode("é\n"), "%C3%A9%0A");
    }
}
