//! The live request tap: `GET /v1/tap` on the admin API streams one JSON
//! event per finished request as server-sent events (`text/event-stream`),
//! and `shoal tap` prints them one line each.
//!
//! Query: `service=S` (requests whose source or destination service is S),
//! `status=5xx` or `status=503`. The stream sends `: tapping` at once, a
//! `: keep-alive` comment every 15 s, `data: {event}` per request, and
//! `event: lagged` / `data: {"missed":N}` when this listener fell more than
//! the channel's capacity behind (the oldest events are dropped for it; the
//! requests themselves never wait).
//!
//! Access: with an admin token (`--admin-token-file`), `Authorization:
//! Bearer <token>`; without one, loopback callers only (events carry paths).

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use http::{HeaderMap, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use proxy::access::{Event, StatusFilter, TapFilter};
use proxy::listen::RequestGuard;
use tokio::sync::broadcast::error::RecvError;

use crate::node::NodeState;

/// The admin API's response body: a whole answer or the tap's stream.
pub(crate) type AdminBody = Either<Full<Bytes>, TapBody>;
/// The tap's event stream.
pub(crate) type TapBody =
    StreamBody<Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>>;

const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Parses the tap query (`service=S&status=5xx`).
pub fn parse_query(query: &str) -> Result<TapFilter, String> {
    let mut f = TapFilter::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "service" => {
                let ok = !v.is_empty()
                    && v.len() <= 63
                    && v.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
                if !ok {
                    return Err(format!(
                        "service {v:?}: use lower-case letters, digits and '-' (1-63 chars)"
                    ));
                }
                f.service = Some(v.to_string());
            }
            "status" => f.status = Some(StatusFilter::parse(v)?),
            _ => return Err(format!("unknown parameter {k:?} (service, status)")),
        }
    }
    Ok(f)
}

fn plain(status: StatusCode, msg: String) -> Response<AdminBody> {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(msg + "\n"))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn authorized(headers: &HeaderMap, peer: SocketAddr, state: &NodeState) -> Result<(), String> {
    let Some(token) = &state.admin_token else {
        return if peer.ip().is_loopback() {
            Ok(())
        } else {
            Err("this node has no admin token; the tap is served to loopback callers only".into())
        };
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let (a, b) = (given.as_bytes(), token.as_bytes());
    let same = a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0;
    if same {
        Ok(())
    } else {
        Err("bearer token required (the node's admin token)".into())
    }
}

/// `GET /v1/tap`: the event stream for `peer`. `request` (the admin
/// connection's in-flight guard) lives as long as the stream, so the idle
/// timeout does not close a tap that is waiting for traffic.
pub(crate) fn serve(
    req: &Request<Incoming>,
    peer: SocketAddr,
    state: &NodeState,
    request: RequestGuard,
) -> Response<AdminBody> {
    if req.method() != http::Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed".into());
    }
    if let Err(why) = authorized(req.headers(), peer, state) {
        let status = if state.admin_token.is_some() {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::FORBIDDEN
        };
        return plain(status, format!("tap: {why}"));
    }
    let filter = match parse_query(req.uri().query().unwrap_or("")) {
        Ok(f) => f,
        Err(why) => return plain(StatusCode::BAD_REQUEST, format!("tap: {why}")),
    };
    let rx = state.proxy.tap();
    let mut beat = tokio::time::interval(KEEP_ALIVE);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let frame = |s: String| Some(Ok(Frame::data(Bytes::from(s))));
    let stream = futures::stream::unfold(
        (rx, filter, beat, request, true),
        move |(mut rx, filter, mut beat, request, first)| async move {
            if first {
                beat.reset();
                let f = frame(": tapping\n\n".into())?;
                return Some((f, (rx, filter, beat, request, false)));
            }
            let out = loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(e) if filter.matches(&e) => match serde_json::to_string(&*e) {
                            Ok(json) => break frame(format!("data: {json}\n\n")),
                            Err(_) => continue,
                        },
                        Ok(_) => continue,
                        Err(RecvError::Lagged(n)) => {
                            break frame(format!("event: lagged\ndata: {{\"missed\":{n}}}\n\n"));
                        }
                        Err(RecvError::Closed) => break None,
                    },
                    _ = beat.tick() => break frame(": keep-alive\n\n".into()),
                }
            }?;
            Some((out, (rx, filter, beat, request, false)))
        },
    );
    let body: TapBody = StreamBody::new(Box::pin(stream));
    let mut r = Response::new(Either::Right(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    r
}

/// One event as a `shoal tap` line.
pub fn tap_line(e: &Event) -> String {
    let dash = |s: &str| {
        if s.is_empty() {
            "-".to_string()
        } else {
            s.to_string()
        }
    };
    format!(
        "{} {} {}->{} route={} endpoint={} {} {} status={} grpc={} {:.1}ms{}",
        e.time,
        e.direction,
        e.source,
        e.service,
        dash(&e.route),
        dash(&e.endpoint),
        e.method,
        e.path,
        e.status,
        e.grpc_status.map_or("-".to_string(), |g| g.to_string()),
        e.duration_ms,
        if e.shoal_error.is_empty() {
            String::new()
        } else {
            format!(" error={}", e.shoal_error)
        }
    )
}

/// `shoal tap`: streams `/v1/tap` from `admin` and prints one line per
/// event (the event's JSON with `json`) until the node ends the stream.
pub async fn tap_command(
    admin: &str,
    service: Option<&str>,
    status: Option<&str>,
    token_file: Option<&Path>,
    json: bool,
) -> i32 {
    let mut query = Vec::new();
    if let Some(s) = service {
        query.push(format!("service={s}"));
    }
    if let Some(s) = status {
        if let Err(e) = StatusFilter::parse(s) {
            eprintln!("shoal: --status: {e}");
            return crate::config::EXIT_USAGE;
        }
        query.push(format!("status={s}"));
    }
    let path = if query.is_empty() {
        "/v1/tap".to_string()
    } else {
        format!("/v1/tap?{}", query.join("&"))
    };
    let mut headers: Vec<(&str, String)> = Vec::new();
    if let Some(f) = token_file {
        match std::fs::read_to_string(f) {
            Ok(t) => headers.push(("authorization", format!("Bearer {}", t.trim()))),
            Err(e) => {
                eprintln!("shoal: --token-file {}: {e}", f.display());
                return 1;
            }
        }
    }
    match stream(admin, &path, &headers, json).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shoal: {admin}: {e}");
            1
        }
    }
}

async fn stream(
    admin: &str,
    path: &str,
    headers: &[(&str, String)],
    json: bool,
) -> Result<(), String> {
    let tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .uri(path)
        .header(header::HOST, admin)
        .header(header::ACCEPT, "text/event-stream");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let mut body = resp.into_body();
    if !status.is_success() {
        let text = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&text).trim()
        ));
    }
    eprintln!("shoal: tapping {admin}{path}");
    let mut buf: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("tap stream broke: {e}"))?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let msg: Vec<u8> = buf.drain(..end + 2).collect();
            let msg = String::from_utf8_lossy(&msg);
            let mut kind = "message";
            let mut data = String::new();
            for line in msg.lines() {
                if let Some(k) = line.strip_prefix("event: ") {
                    kind = if k == "lagged" { "lagged" } else { "other" };
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            if data.is_empty() {
                continue;
            }
            let line = match kind {
                "lagged" => {
                    let missed = serde_json::from_str::<serde_json::Value>(&data)
                        .ok()
                        .and_then(|v| v["missed"].as_u64())
                        .unwrap_or(0);
                    eprintln!("shoal: the tap fell behind; {missed} events were dropped");
                    continue;
                }
                "message" if json => data,
                "message" => match serde_json::from_str::<Event>(&data) {
                    Ok(e) => tap_line(&e),
                    Err(_) => continue,
                },
                _ => continue,
            };
            let mut out = stdout.lock();
            // A closed stdout (`shoal tap | head`) ends the tap quietly.
            if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                return Ok(());
            }
        }
        if buf.len() > 1 << 20 {
            return Err("tap stream sent an over-long event".into());
        }
    }
    Err("the node closed the tap".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_or_name_the_problem() {
        let f = parse_query("service=web&status=5xx").unwrap();
        assert_eq!(f.service.as_deref(), Some("web"));
        assert_eq!(f.status, Some(StatusFilter::Class(5)));
        assert_eq!(parse_query("").unwrap(), TapFilter::default());
        assert!(parse_query("service=Web").unwrap_err().contains("service"));
        assert!(parse_query("status=9xx").unwrap_err().contains("status"));
        assert!(parse_query("bogus=1").unwrap_err().contains("bogus"));
    }

    #[test]
    fn a_line_names_what_happened() {
        let e = Event {
            time: "2026-12-02T05:36:49.007Z".into(),
            direction: "outbound".into(),
            source: "client".into(),
            service: "web".into(),
            route: String::new(),
            endpoint: "n2".into(),
            method: "GET".into(),
            path: "/x".into(),
            status: 503,
            grpc_status: None,
            classification: "failure".into(),
            attempts: 3,
            duration_ms: 1.24,
            request_bytes: 0,
            response_bytes: 10,
            shoal_error: "no-healthy-endpoint".into(),
        };
        assert_eq!(
            tap_line(&e),
            "2026-12-02T05:36:49.007Z outbound client->web route=- endpoint=n2 GET /x status=503 grpc=- 1.2ms error=no-healthy-endpoint"
        );
    }
}
