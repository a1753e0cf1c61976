//! `/v1/policies`: the policy half of the admin API.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::json;

use crate::admin::{json, text};
use crate::node::NodeState;
use policy::doc::MAX_DOCUMENT;
use policy::store::{SignedWrite, Written};
use policy::trust::{self, MAX_HTTP_SKEW, Refusal};
use policy::{Document, Entry, Kind, Signature, StoreError};

/// How long `?wait=all` waits by default.
const DEFAULT_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn handle(
    req: Request<Incoming>,
    peer: SocketAddr,
    state: &NodeState,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["v1", "policies"]) => list(state).await,
        (Method::GET, ["v1", "policies", "status"]) => json(&status(state).await),
        (method, ["v1", "policies", kind, name]) => {
            let kind = match kind.parse::<Kind>() {
                Ok(k) => k,
                Err(e) => return problem(StatusCode::BAD_REQUEST, &[format!("kind: {e}")]),
            };
            let name = name.to_string();
            match method {
                Method::GET => get(state, kind, &name, &query, req.headers()),
                Method::PUT | Method::DELETE => {
                    if let Err(resp) = authorize(req.headers(), peer, state) {
                        return *resp;
                    }
                    if method == Method::PUT {
                        put(req, state, kind, &name, &query).await
                    } else {
                        delete(req.headers(), state, kind, &name, &query).await
                    }
                }
                _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Writes need `Authorization: Bearer <token>` when the node has a token;
/// without one, only loopback callers may write. (`POST /shutdown` too.)
pub(crate) fn authorize(
    headers: &HeaderMap,
    peer: SocketAddr,
    state: &NodeState,
) -> Result<(), Box<Response<Full<Bytes>>>> {
    let Some(token) = &state.admin_token else {
        if peer.ip().is_loopback() {
            return Ok(());
        }
        return Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            &["authorization: this node has no admin token; policy writes are accepted from loopback only".into()],
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        None => {
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                &["authorization: bearer token required".into()],
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            Err(Box::new(r))
        }
        Some(t) if constant_time_eq(t.trim().as_bytes(), token.as_bytes()) => Ok(()),
        Some(_) => Err(Box::new(problem(
            StatusCode::FORBIDDEN,
            &["authorization: wrong token".into()],
        ))),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn put(
    req: Request<Incoming>,
    state: &NodeState,
    kind: Kind,
    name: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    let headers = req.headers().clone();
    let too_big = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n > MAX_DOCUMENT);
    if too_big {
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            &[format!("document: larger than {MAX_DOCUMENT} bytes")],
        );
    }
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let ct = ct.split(';').next().unwrap_or("").trim();
        let ct = ct.to_ascii_lowercase();
        let ok = [
            "application/json",
            "application/yaml",
            "application/x-yaml",
            "text/yaml",
            "text/x-yaml",
        ];
        if !ok.contains(&ct.as_str()) {
            return problem(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                &[format!(
                    "content-type: {ct:?} (send application/yaml or application/json)"
                )],
            );
        }
    }
    let body = match Limited::new(req.into_body(), MAX_DOCUMENT).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                &[format!("document: larger than {MAX_DOCUMENT} bytes")],
            );
        }
    };
    let Ok(text_body) = std::str::from_utf8(&body) else {
        return problem(StatusCode::BAD_REQUEST, &["document: not UTF-8".into()]);
    };
    // The signature covers the bytes as sent: check it before any parsing,
    // so nobody without an operator key makes this node parse anything.
    let (sig, operator) = match signed(state, &headers, kind, name, Some(text_body)) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let text = text_body.to_string();
    let doc = match state
        .sync
        .parse_off_thread(move || Document::parse(&text))
        .await
    {
        Some(Ok(d)) => d,
        Some(Err(p)) => {
            state.policy_metrics.refused("http", "invalid_document");
            return problem(StatusCode::BAD_REQUEST, &p.0);
        }
        None => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                &["document: parser unavailable".into()],
            );
        }
    };
    let mut mismatch = Vec::new();
    if doc.kind != kind {
        mismatch.push(format!(
            "kind: document is {} but the URL says {kind}",
            doc.kind
        ));
    }
    if doc.name != name {
        mismatch.push(format!(
            "metadata.name: document is {:?} but the URL says {name:?}",
            doc.name
        ));
    }
    if !mismatch.is_empty() {
        return problem(StatusCode::BAD_REQUEST, &mismatch);
    }
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    let source = Some(text_body.to_string());
    match state
        .store
        .put_signed_off_thread(
            kind,
            name,
            SignedWrite {
                doc: Some(doc),
                source,
                signature: sig,
                operator,
            },
            if_match,
        )
        .await
    {
        Ok(w) => {
            let status = if w.existed || w.unchanged {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            accepted(state, w, status, query).await
        }
        Err(e) => store_error(state, e),
    }
}

/// Reads and verifies the operator signature on a write; the error is the
/// reply (401 unsigned, 400 malformed or out of the time window, 403 not an
/// operator of this mesh or not matching), counted by reason.
fn signed(
    state: &NodeState,
    headers: &HeaderMap,
    kind: Kind,
    name: &str,
    body: Option<&str>,
) -> Result<(Signature, String), Box<Response<Full<Bytes>>>> {
    let now_ms = state.store.clock().physical_ms();
    let result = trust::from_headers(headers)
        .and_then(|s| s.ok_or(Refusal::Unsigned))
        .and_then(|sig| {
            let op = state.sync.trust().verify(kind, name, body, &sig, now_ms)?;
            let behind = now_ms.saturating_sub(sig.signed_at_ms);
            if behind > MAX_HTTP_SKEW.as_millis() as u64 {
                return Err(Refusal::TooOld { behind_ms: behind });
            }
            Ok((sig, op))
        });
    result.map_err(|r| {
        state.policy_metrics.refused("http", r.reason());
        tracing::warn!(policy = %format!("{kind}/{name}"), reason = r.reason(), error = %r, "refused unsigned or badly signed policy write");
        let status = match r {
            Refusal::Unsigned => StatusCode::UNAUTHORIZED,
            Refusal::Malformed(_) | Refusal::ClockAhead { .. } | Refusal::TooOld { .. } => {
                StatusCode::BAD_REQUEST
            }
            _ => StatusCode::FORBIDDEN,
        };
        Box::new(problem(status, &[r.to_string()]))
    })
}

async fn delete(
    headers: &HeaderMap,
    state: &NodeState,
    kind: Kind,
    name: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    let (sig, operator) = match signed(state, headers, kind, name, None) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let if_match = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok());
    match state
        .store
        .put_signed_off_thread(
            kind,
            name,
            SignedWrite {
                doc: None,
                source: None,
                signature: sig,
                operator,
            },
            if_match,
        )
        .await
    {
        Ok(w) => accepted(state, w, StatusCode::OK, query).await,
        Err(e) => store_error(state, e),
    }
}

async fn accepted(
    state: &NodeState,
    w: Written,
    status: StatusCode,
    query: &str,
) -> Response<Full<Bytes>> {
    if !w.unchanged {
        state.policy_metrics.local_write(w.entry.kind);
    }
    written(state, w.entry, status, query).await
}

/// The reply to an accepted write; with `?wait=all`, held until every live
/// node runs the version (or 202 with the current status on timeout).
async fn written(
    state: &NodeState,
    entry: Entry,
    status: StatusCode,
    query: &str,
) -> Response<Full<Bytes>> {
    let params = parse_query(query);
    let mut body = json!({
        "kind": entry.kind.to_string(),
        "name": entry.name,
        "version": entry.version.to_string(),
        "hash": entry.hash,
        "deleted": entry.is_tombstone(),
    });
    let mut status = status;
    if params.get("wait").map(String::as_str) == Some("all") {
        let timeout = params
            .get("timeout")
            .and_then(|t| crate::config::parse_duration(t).ok())
            .unwrap_or(DEFAULT_WAIT)
            .min(Duration::from_secs(300));
        let all = state
            .sync
            .wait_applied(entry.kind, &entry.name, &entry.version, timeout)
            .await;
        let nodes = state.sync.status_of(entry.kind, &entry.name).await;
        let pending: Vec<serde_json::Value> = nodes
            .iter()
            .filter(|n| {
                n.version
                    .as_deref()
                    .and_then(|v| v.parse::<policy::Version>().ok())
                    .is_none_or(|v| v < entry.version)
            })
            .map(|n| json!({ "node": n.node, "state": n.state, "version": n.version }))
            .collect();
        body["applied_everywhere"] = json!(all && pending.is_empty());
        body["nodes"] = json!(nodes);
        body["pending"] = json!(pending);
        if body["applied_everywhere"] != json!(true) {
            status = StatusCode::ACCEPTED;
        }
    }
    let mut r = json(&body);
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", entry.version)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn get(
    state: &NodeState,
    kind: Kind,
    name: &str,
    query: &str,
    headers: &HeaderMap,
) -> Response<Full<Bytes>> {
    let Some(entry) = state.store.entry(kind, name) else {
        return problem(
            StatusCode::NOT_FOUND,
            &[format!("{kind}/{name}: no such policy")],
        );
    };
    let Some(doc) = &entry.doc else {
        return problem(
            StatusCode::NOT_FOUND,
            &[format!(
                "{kind}/{name}: deleted at version {}",
                entry.version
            )],
        );
    };
    let want_yaml = parse_query(query).get("format").map(String::as_str) == Some("yaml")
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("yaml"));
    let value: serde_json::Value = serde_json::from_str(&doc.canonical).unwrap_or_default();
    let (ct, body) = if want_yaml {
        (
            "application/yaml",
            serde_yaml::to_string(&value)
                .unwrap_or_default()
                .into_bytes(),
        )
    } else {
        (
            "application/json",
            serde_json::to_vec_pretty(&value).unwrap_or_default(),
        )
    };
    let mut r = Response::builder()
        .header(header::CONTENT_TYPE, ct)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default();
    if let Ok(v) = http::HeaderValue::from_str(&format!("\"{}\"", entry.version)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    let operator = entry.provenance.as_ref().and_then(|p| p.operator.clone());
    if let Some(v) = operator.and_then(|o| http::HeaderValue::from_str(&o).ok()) {
        r.headers_mut().insert("shoal-operator", v);
    }
    if let Some(c) = state.store.conflict(kind, name)
        && let Ok(v) =
            http::HeaderValue::from_str(&format!("{} won over concurrent {}", c.winner, c.loser))
    {
        r.headers_mut().insert("shoal-conflict", v);
    }
    r
}

async fn list(state: &NodeState) -> Response<Full<Bytes>> {
    let status = state.sync.status().await;
    let live = status.len();
    let rows: Vec<serde_json::Value> = state
        .store
        .entries()
        .into_iter()
        .map(|e| {
            let id = format!("{}/{}", e.kind, e.name);
            let applied_on = status
                .iter()
                .filter(|(_, v)| {
                    v.get(&id)
                        .and_then(|s| s.split(' ').next())
                        .and_then(|s| s.parse::<policy::Version>().ok())
                        .is_some_and(|v| v >= e.version)
                })
                .count();
            json!({
                "kind": e.kind.to_string(),
                "name": e.name,
                "version": e.version.to_string(),
                "origin": e.version.node,
                "hash": e.hash,
                "deleted": e.is_tombstone(),
                "applied_on": applied_on,
                "live_nodes": live,
                "operator": e.provenance.as_ref().and_then(|p| p.operator.clone()),
                "signed_at_ms": e.signed_at_ms(),
                "conflict": state.store.conflict(e.kind, &e.name),
            })
        })
        .collect();
    json(&rows)
}

async fn status(state: &NodeState) -> Vec<serde_json::Value> {
    state
        .sync
        .status()
        .await
        .into_iter()
        .map(|(node, versions)| json!({ "node": node, "policies": versions }))
        .collect()
}

fn store_error(state: &NodeState, e: StoreError) -> Response<Full<Bytes>> {
    match e {
        StoreError::Stale { .. } => {
            state.policy_metrics.refused("http", "stale");
            problem(StatusCode::CONFLICT, &[format!("signed-at: {e}")])
        }
        StoreError::Clock(c) => {
            state.policy_metrics.refused("http", "clock");
            problem(StatusCode::BAD_REQUEST, &[format!("version: {c}")])
        }
        StoreError::PreconditionFailed { .. } => {
            problem(StatusCode::PRECONDITION_FAILED, &[format!("if-match: {e}")])
        }
        StoreError::NotFound => problem(StatusCode::NOT_FOUND, &["policy: no such policy".into()]),
        other => {
            tracing::error!(error = %other, "policy write failed");
            problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                &[format!("store: {other}")],
            )
        }
    }
}

/// A JSON error body: `{"errors": ["field path: reason", ...]}`.
fn problem(status: StatusCode, errors: &[String]) -> Response<Full<Bytes>> {
    let mut r = json(&json!({ "errors": errors }));
    *r.status_mut() = status;
    r
}

fn parse_query(q: &str) -> std::collections::HashMap<String, String> {
    q.split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k.to_string(), v.to_string())
        })
        .collect()
}
