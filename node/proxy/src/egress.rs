//! Egress: calls to hosts that are not mesh services, sent by this node
//! straight to the destination, when `--egress` allows them.
//!
//! The rule is [`Egress`]: `off` (the default: such a host gets 503
//! `unknown-service`), `allow` (any host name) or a list of host suffixes
//! matched on dot boundaries (`example.com` admits `example.com` and
//! `api.example.com`, not `badexample.com`). Only names are matched; IP
//! literals never reach this module (the plan passes them through, see
//! `plan.rs`). The destination is the absolute-form URI's authority, else
//! the Host header (port 80 when none is written); it is resolved and
//! dialled from this node, outside QUIC and mTLS.
//!
//! `CONNECT host:port` for such a host (`connect.rs` hands it here) is
//! dialled from this node and joined to the client's connection as bytes.
//!
//! This module owns the rule, the destination of a request and forwarding
//! it; it knows nothing of mesh routing or the QUIC side.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::body::ReqBody;
use http::request::Parts;
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::empty;
use crate::error::MeshError;
use crate::frame::{self, BoxError, ProxyBody};
use crate::local::Clients;
use crate::plan::DEFAULT_PORT;
use crate::state::Shared;
use crate::stats::{Direction, Edge, Exchange};
use crate::upgrade;

/// Which non-mesh hosts this node forwards to directly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// None: a host that is not a mesh service gets `unknown-service`.
    #[default]
    Off,
    /// Every host name.
    Allow,
    /// Host names equal to one of these suffixes or ending in `.<suffix>`
    /// (lower case, no leading dot).
    Suffixes(Vec<String>),
}

/// Where an egress request goes: a host name and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// The host name, lower case, without a trailing dot.
    pub host: String,
    /// The port (80 when none is written).
    pub port: u16,
}

impl Egress {
    /// Parses `off`, `allow` or comma-separated host suffixes
    /// (`example.com,.internal.corp`; a leading `.` or `*.` is dropped).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "off" | "" => return Ok(Egress::Off),
            "allow" => return Ok(Egress::Allow),
            _ => {}
        }
        let mut rules = Vec::new();
        for part in s.split(',') {
            let raw = part.trim();
            let rule = raw
                .strip_prefix("*.")
                .or_else(|| raw.strip_prefix('.'))
                .unwrap_or(raw)
                .trim_end_matches('.')
                .to_ascii_lowercase();
            if rule == "off" || rule == "allow" {
                return Err(format!(
                    "{raw:?}: `off` and `allow` stand alone, not in a suffix list"
                ));
            }
            if rule.parse::<std::net::IpAddr>().is_ok() {
                return Err(format!(
                    "{raw:?}: an IP address is not a host suffix (egress rules match names only)"
                ));
            }
            if !valid_host(&rule) {
                return Err(format!(
                    "{raw:?} is not a host suffix (DNS labels of letters, digits and '-', dot-separated)"
                ));
            }
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        Ok(Egress::Suffixes(rules))
    }

    /// Whether any host may go out.
    pub fn is_off(&self) -> bool {
        *self == Egress::Off
    }

    /// The metrics and access-log label (`egress:<host>` under `allow`,
    /// `egress:<suffix>` under a list) if `host` may go out, else `None`.
    pub fn admit(&self, host: &str) -> Option<String> {
        if !valid_host(host) {
            return None;
        }
        match self {
            Egress::Off => None,
            Egress::Allow => Some(format!("egress:{host}")),
            Egress::Suffixes(rules) => rules
                .iter()
                .find(|r| suffix_match(host, r))
                .map(|r| format!("egress:{r}")),
        }
    }
}

impl std::fmt::Display for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Egress::Off => f.write_str("off"),
            Egress::Allow => f.write_str("allow"),
            Egress::Suffixes(r) => f.write_str(&r.join(",")),
        }
    }
}

/// Whether `host` is `rule` or ends in `.rule` (both lower case).
fn suffix_match(host: &str, rule: &str) -> bool {
    host == rule
        || (host.len() > rule.len()
            && host.ends_with(rule)
            && host.as_bytes()[host.len() - rule.len() - 1] == b'.')
}

/// A DNS host name: 1-253 characters, dot-separated labels of 1-63 ASCII
/// letters, digits, '-' and '_' (no leading or trailing '-'), not all digits
/// in the last label (that would be an IPv4 literal).
fn valid_host(h: &str) -> bool {
    if h.is_empty() || h.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = h.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    };
    labels.iter().all(label_ok)
        && !labels
            .last()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// Where a request for a non-mesh host goes: the absolute-form URI's
/// authority, else the Host header; `None` when it names no valid host name
/// (an IP literal, a malformed or missing authority).
pub fn destination(head: &Parts) -> Option<Destination> {
    let authority = match head.uri.authority() {
        Some(a) => a.as_str().to_string(),
        None => head
            .headers
            .get(http::header::HOST)?
            .to_str()
            .ok()?
            .to_string(),
    };
    parse_authority(&authority)
}

/// `host[:port]` as a [`Destination`] (port 80 when none is written), if
/// the host is a valid name.
pub fn parse_authority(authority: &str) -> Option<Destination> {
    parse_authority_or(authority, DEFAULT_PORT)
}

/// `host[:port]` as a [`Destination`], `default_port` when none is written.
fn parse_authority_or(authority: &str, default_port: u16) -> Option<Destination> {
    if authority.contains('@') || authority.starts_with('[') {
        return None;
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0)?),
        None => (authority, default_port),
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    valid_host(&host).then_some(Destination { host, port })
}

/// The port a CONNECT target without one means.
const CONNECT_PORT: u16 = 443;
/// How long dialling an egress CONNECT destination may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A CONNECT target (`host:port`, 443 when none is written) that `egress`
/// admits: where it goes and its metrics label.
pub(crate) fn connect_target(egress: &Egress, authority: &str) -> Option<(Destination, String)> {
    let to = parse_authority_or(authority, CONNECT_PORT)?;
    let label = egress.admit(&to.host)?;
    Some((to, label))
}

/// Answers a CONNECT to a non-mesh host [`connect_target`] admitted: this
/// node dials the destination (a name that does not resolve or a refused
/// connection: 502 `upstream-connect`), answers 200 and joins the client's
/// connection to it as bytes, until both ends close, either fails or
/// nothing moves for `--tcp-idle-timeout`. The answer is counted on the
/// edge `egress:<host or rule>` (request metrics, access log, tap) and the
/// tunnel in the TCP metrics on the same label.
pub(crate) async fn connect(
    shared: &Arc<Shared>,
    req: Request<ReqBody>,
    to: Destination,
    label: String,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let source = match shared.source_service() {
        s if s.is_empty() => "unknown".to_string(),
        s => s,
    };
    let exchange = Exchange {
        edge: Edge::new(Direction::Outbound, source.clone(), label.clone()),
        route: String::new(),
        method: "CONNECT".into(),
        path: format!("{}:{}", to.host, to.port),
        grpc_call: false,
        start,
        access_log: shared.config.access_log,
    };
    exchange
        .edge
        .trace
        .attempt(&format!("{}:{}", to.host, to.port), 1);
    let dial = TcpStream::connect((to.host.as_str(), to.port));
    let stream = match tokio::time::timeout(DIAL_TIMEOUT, dial).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(host = %to.host, port = to.port, error = %e, "egress CONNECT: dial failed");
            shared
                .tcp
                .refused(Direction::Outbound, &source, &label, "refused");
            let resp = MeshError::UpstreamConnect
                .response_with("could not connect to the egress destination (or resolve its name)");
            return shared.stats.finish(exchange, resp);
        }
        Err(_) => {
            shared
                .tcp
                .refused(Direction::Outbound, &source, &label, "refused");
            let resp = MeshError::UpstreamConnect
                .response_with("connecting to the egress destination timed out");
            return shared.stats.finish(exchange, resp);
        }
    };
    if let Ok(peer) = stream.peer_addr()
        && shared.is_own_listener(peer)
    {
        shared
            .tcp
            .refused(Direction::Outbound, &source, &label, "loop");
        let resp = MeshError::ForwardingLoop.response_with(&format!(
            "{}:{} is this node's own listener; the tunnel would come back to it",
            to.host, to.port
        ));
        return shared.stats.finish(exchange, resp);
    }
    let _ = stream.set_nodelay(true);
    let mut req = req;
    let client = hyper::upgrade::on(&mut req);
    let shared2 = shared.clone();
    tokio::spawn(async move {
        let shared = shared2;
        let (_count, _) = shared.outbound_request();
        match client.await {
            Ok(io) => {
                let open = shared.tcp.opened(Direction::Outbound, &source, &label);
                let idle = shared.config.tcp_idle_timeout;
                let done = upgrade::join(TokioIo::new(io), stream, idle).await;
                tracing::debug!(destination = %label, outcome = done.outcome.label(), sent = done.local_to_mesh, received = done.mesh_to_local, "egress CONNECT tunnel ended");
                shared.tcp.closed(open, &done);
            }
            Err(e) => {
                tracing::debug!(error = %e, "egress CONNECT: the client went away before the tunnel");
            }
        }
    });
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::OK;
    shared.stats.finish(exchange, resp)
}

/// Forwards an HTTP request to `to` from this node over HTTP/1.1 (hop-by-hop
/// fields and `shoal-timeout` removed, Host as the app wrote it), waiting at
/// most `timeout` for the response head. Failures are `upstream-connect`
/// (including a name that does not resolve), `upstream-reset` and
/// `deadline-exceeded`.
pub(crate) async fn forward(
    clients: &Clients,
    to: &Destination,
    head: Parts,
    body: ReqBody,
    timeout: Duration,
) -> Response<ProxyBody> {
    let pq = head.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let host_header = if to.port == DEFAULT_PORT {
        to.host.clone()
    } else {
        format!("{}:{}", to.host, to.port)
    };
    let mut headers = head.headers;
    frame::strip_hop_by_hop(&mut headers);
    headers.remove(crate::plan::TIMEOUT_NAME);
    headers.remove(http::header::HOST);
    let Ok(host_value) = http::HeaderValue::from_str(&host_header) else {
        return MeshError::BadRequest.response_with("bad host");
    };
    headers.insert(http::header::HOST, host_value);
    if let Some(u) = head.extensions.get::<upgrade::Requested>() {
        upgrade::restore(&mut headers, &u.0);
    }
    let req = Request::builder()
        .method(head.method)
        .uri(format!("http://{host_header}{pq}"))
        .version(Version::HTTP_11)
        .body(body.map_err(BoxError::from).boxed_unsync());
    let mut req = match req {
        Ok(r) => r,
        Err(e) => {
            return MeshError::BadRequest.response_with(&format!("bad request head: {e}"));
        }
    };
    *req.headers_mut() = headers;
    match tokio::time::timeout(timeout, clients.speaking(false).request(req)).await {
        Ok(Ok(resp)) => resp.map(|b| b.map_err(BoxError::from).boxed_unsync()),
        Ok(Err(e)) if e.is_connect() => MeshError::UpstreamConnect
            .response_with("could not connect to the egress destination (or resolve its name)"),
        Ok(Err(_)) => MeshError::UpstreamReset
            .response_with("the exchange with the egress destination failed"),
        Err(_) => MeshError::DeadlineExceeded.response_with("the request timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_off_allow_and_suffix_lists() {
        assert_eq!(Egress::parse("off").unwrap(), Egress::Off);
        assert_eq!(Egress::parse("ALLOW").unwrap(), Egress::Allow);
        assert_eq!(
            Egress::parse(" example.com, .Internal.corp ,*.svc.local.,example.com").unwrap(),
            Egress::Suffixes(vec![
                "example.com".into(),
                "internal.corp".into(),
                "svc.local".into()
            ])
        );
        for bad in [
            "10.0.0.1",
            "example.com,,x",
            "a b",
            "x.-y",
            "allow,example.com",
            "exa$mple.com",
            "1.2.3",
        ] {
            assert!(Egress::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Egress::parse("example.com,internal").unwrap().to_string(),
            "example.com,internal"
        );
    }

    #[test]
    fn suffixes_match_on_dot_boundaries_only() {
        let e = Egress::parse("example.com,localhost").unwrap();
        assert_eq!(
            e.admit("example.com").as_deref(),
            Some("egress:example.com")
        );
        assert_eq!(
            e.admit("api.eu.example.com").as_deref(),
            Some("egress:example.com")
        );
        assert_eq!(e.admit("badexample.com"), None);
        assert_eq!(e.admit("example.com.evil.org"), None);
        assert_eq!(e.admit("localhost").as_deref(), Some("egress:localhost"));
        assert_eq!(e.admit("127.0.0.1"), None);
        assert_eq!(Egress::Off.admit("example.com"), None);
        assert_eq!(
            Egress::Allow.admit("api.example.org").as_deref(),
            Some("egress:api.example.org")
        );
        assert_eq!(Egress::Allow.admit("10.1.2.3"), None);
        assert_eq!(Egress::Allow.admit("a..b"), None);
    }

    #[test]
    fn destinations_come_from_the_uri_else_the_host_header() {
        let head = |uri: &str, host: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = host {
                b = b.header("host", h);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert_eq!(
            destination(&head("http://API.Example.com:8080/x", Some("other"))),
            Some(Destination {
                host: "api.example.com".into(),
                port: 8080
            })
        );
        assert_eq!(
            destination(&head("/x", Some("localhost."))),
            Some(Destination {
                host: "localhost".into(),
                port: 80
            })
        );
        assert_eq!(destination(&head("/x", Some("localhost:0"))), None);
        assert_eq!(destination(&head("/x", Some("[::1]:80"))), None);
        assert_eq!(destination(&head("/x", Some("1.2.3.4"))), None);
        assert_eq!(destination(&head("/x", None)), None);
        assert_eq!(parse_authority("user@host.com"), None);
    }
}
