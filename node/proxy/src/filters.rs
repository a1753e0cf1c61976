//! Route filters as HTTP: turns a routing decision ([`policy::set::Plan`])
//! into the response a node answers itself (a redirect, or 404 when routes
//! attach to a service but no rule matches) and into the request head a
//! backend or a mirror receives (path and host rewrites, header changes).
//!
//! Pure functions over `http` types: no I/O, no policy lookups. The
//! outbound path calls them; what to do is decided by
//! [`policy::PolicySet::decide`] and [`policy::RouteDecision::plan`].

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use policy::doc::{HeaderMods, ServiceRef};
use policy::set::{Forward, Plan};

use crate::ERROR_HEADER;

/// `shoal-error` of the 404 answered when routes attach but no rule matches.
pub const NO_ROUTE_MATCH: &str = "no-route-match";

/// Applies one header filter: `set` replaces every value, `add` appends a
/// value, `remove` drops the header. Names are case-insensitive.
pub fn apply_header_mods(headers: &mut HeaderMap, mods: &HeaderMods) {
    for (name, value) in &mods.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &mods.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(n, v);
        }
    }
    for name in &mods.remove {
        headers.remove(name.as_str());
    }
}

/// The 404 for a call to a service whose routes have no rule matching it.
pub fn no_match(route: &str) -> Response<Bytes> {
    let mut r = Response::new(Bytes::from(format!(
        "no rule of route {route} matches this request\n"
    )));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r.headers_mut()
        .insert(ERROR_HEADER, HeaderValue::from_static(NO_ROUTE_MATCH));
    r
}

/// The response a plan answers without forwarding (a redirect), if any.
pub fn answer(plan: &Plan<'_>) -> Option<Response<Bytes>> {
    match plan {
        Plan::Redirect {
            status,
            location,
            response_headers,
        } => Some(redirect(*status, location, response_headers)),
        Plan::Forward(_) => None,
    }
}

/// A redirect: `status`, `Location`, an empty body, then the rule's
/// response header changes.
pub fn redirect(status: u16, location: &str, response_headers: &HeaderMods) -> Response<Bytes> {
    let mut r = Response::new(Bytes::new());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
    match HeaderValue::from_str(location) {
        Ok(v) => {
            r.headers_mut().insert(LOCATION, v);
        }
        Err(_) => *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR,
    }
    apply_header_mods(r.headers_mut(), response_headers);
    r
}

/// Rewrites a request head for the backend a plan chose: the new path
/// (query kept) and Host / `:authority`, then the request header changes
/// in order. An absolute-form URI keeps its form.
pub fn forward_request(parts: &mut Parts, fwd: &Forward<'_>) {
    let mut uri = parts.uri.clone().into_parts();
    if let Some(pq) = &fwd.path_and_query
        && let Ok(pq) = pq.parse::<PathAndQuery>()
    {
        uri.path_and_query = Some(pq);
    }
    if let Some(host) = &fwd.host
        && let Ok(v) = HeaderValue::from_str(host)
    {
        if uri.authority.is_some()
            && let Ok(a) = host.parse::<Authority>()
        {
            uri.authority = Some(a);
        }
        parts.headers.insert(HOST, v);
    }
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
    for mods in &fwd.request_headers {
        apply_header_mods(&mut parts.headers, mods);
    }
}

/// Applies a plan's response header changes to the backend's response.
pub fn forward_response(headers: &mut HeaderMap, fwd: &Forward<'_>) {
    for mods in &fwd.response_headers {
        apply_header_mods(headers, mods);
    }
}

/// The head of a mirrored copy of `parts` (already rewritten for the
/// backend): same method, path and headers, addressed to the mirror's
/// service (`name.namespace[:port]`). The body is the caller's to copy; the
/// mirror's answer is ignored.
pub fn mirror_request(parts: &Parts, to: &ServiceRef) -> Request<()> {
    let authority = match to.port {
        Some(p) => format!("{}.{}:{p}", to.name, to.namespace),
        None => format!("{}.{}", to.name, to.namespace),
    };
    let mut r = Request::new(());
    *r.method_mut() = parts.method.clone();
    *r.version_mut() = parts.version;
    *r.headers_mut() = parts.headers.clone();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *r.uri_mut() = Uri::from(pq);
    if let Ok(v) = HeaderValue::from_str(&authority) {
        r.headers_mut().insert(HOST, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::set::{Call, Decision, Destination, RequestInfo, ServiceAddr};
    use policy::{Document, PolicyStore};

    #[allow(dead_code)]
    mod cases {
        include!("../../../tests/src/gamma_cases.rs");
    }
    use cases::{Case, MESH_NS};

    fn manifest_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/conformance/gateway-api-mesh")
    }

    fn store_for(manifests: &[&str]) -> PolicyStore {
        let store = PolicyStore::open("n1", None).unwrap();
        for m in manifests {
            let path = manifest_dir().join(m);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            for part in text.split("\n---") {
                if !part.trim().is_empty() {
                    store.put(Document::parse(part).unwrap(), None).unwrap();
                }
            }
        }
        store
    }

    /// What the caller gets back in one pure run of a case.
    #[derive(Debug)]
    struct Outcome {
        status: u16,
        backend: String,
        /// The request the backend sees.
        seen: Option<Parts>,
        response: HeaderMap,
        location: Option<String>,
    }

    /// Runs a case through decide, plan and the filters, with a fixed roll.
    fn run(store: &PolicyStore, case: &Case, roll: f64) -> Outcome {
        let set = store.snapshot();
        let mut b = Request::builder().uri(case.path);
        for (k, v) in &case.headers {
            b = b.header(*k, *v);
        }
        if case.grpc {
            b = b.method("POST").header("content-type", "application/grpc");
        }
        let host = case.host_header.unwrap_or(case.dial);
        let (mut parts, ()) = b.header("host", host).body(()).unwrap().into_parts();
        // A pod address is not a service: the call passes through unrouted.
        if let Some(pod) = case.dial.strip_prefix("pod:") {
            let owner = pod.split(':').next().unwrap().to_string();
            return Outcome {
                status: 200,
                backend: owner,
                seen: Some(parts),
                response: HeaderMap::new(),
                location: None,
            };
        }
        let default_port = if case.grpc { 7070 } else { 80 };
        let addr = ServiceAddr::parse(case.dial, case.caller_ns, default_port).unwrap();
        let hostname = host.split(':').next().unwrap().to_string();
        let headers = parts.headers.clone();
        let call = Call {
            caller_namespace: case.caller_ns,
            destination: Destination {
                name: &addr.name,
                namespace: &addr.namespace,
                port: Some(addr.port),
            },
            scheme: "http",
            host: &hostname,
            grpc: case.grpc,
            request: RequestInfo {
                method: parts.method.as_str(),
                path: parts.uri.path(),
                query: parts.uri.query(),
                headers: &headers,
            },
        };
        match set.decide(&call) {
            Decision::Unrouted => Outcome {
                status: 200,
                backend: addr.name.clone(),
                seen: Some(parts),
                response: HeaderMap::new(),
                location: None,
            },
            Decision::NoMatch { route } => {
                let r = no_match(route);
                assert_eq!(r.headers()[ERROR_HEADER], NO_ROUTE_MATCH);
                Outcome {
                    status: r.status().as_u16(),
                    backend: String::new(),
                    seen: None,
                    response: r.headers().clone(),
                    location: None,
                }
            }
            Decision::Route(d) => {
                let plan = d.plan(&call, roll, 0.0);
                if let Some(r) = answer(&plan) {
                    let location = r
                        .headers()
                        .get(LOCATION)
                        .map(|v| v.to_str().unwrap().to_string());
                    return Outcome {
                        status: r.status().as_u16(),
                        backend: String::new(),
                        seen: None,
                        response: r.headers().clone(),
                        location,
                    };
                }
                let Plan::Forward(fwd) = plan else {
                    unreachable!()
                };
                forward_request(&mut parts, &fwd);
                let mut response = HeaderMap::new();
                forward_response(&mut response, &fwd);
                Outcome {
                    status: 200,
                    backend: fwd.backend.name.clone(),
                    seen: Some(parts),
                    response,
                    location: None,
                }
            }
        }
    }

    /// Splits an absolute Location as Go's url.URL does: scheme, host, port, path.
    fn split_location(l: &str) -> (String, String, String, String) {
        let u: Uri = l.parse().unwrap();
        let a = u.authority().unwrap();
        (
            u.scheme_str().unwrap().to_string(),
            a.host().to_string(),
            a.port_u16().map(|p| p.to_string()).unwrap_or_default(),
            u.path().to_string(),
        )
    }

    /// The upstream comparisons, as the conformance suite makes them.
    fn check(case: &Case, o: &Outcome) -> Result<(), String> {
        if o.status != case.status {
            return Err(format!("status {} (want {})", o.status, case.status));
        }
        if let Some(want) = &case.redirect {
            let l = o.location.as_deref().ok_or("no Location")?;
            let (scheme, host, port, path) = split_location(l);
            let req_path = case.path.split('?').next().unwrap();
            let want_scheme = if want.scheme.is_empty() {
                "http"
            } else {
                want.scheme
            };
            let want_path = if want.path.is_empty() {
                req_path
            } else {
                want.path
            };
            if !want.host.is_empty() && host != want.host {
                return Err(format!("redirect host {host} in {l}"));
            }
            let port_ok = if want.port.is_empty() {
                match scheme.as_str() {
                    "http" => port.is_empty() || port == "80",
                    "https" => port.is_empty() || port == "443",
                    _ => true,
                }
            } else {
                port == want.port
            };
            if !port_ok || scheme != want_scheme || path != want_path {
                return Err(format!("redirect {l}"));
            }
            return Ok(());
        }
        if o.status != 200 {
            return Ok(());
        }
        if !o.backend.starts_with(case.backend) {
            return Err(format!("backend {} (want {})", o.backend, case.backend));
        }
        let seen = o.seen.as_ref().ok_or("nothing forwarded")?;
        if let Some(p) = case.expect_path
            && seen.uri.path() != p
        {
            return Err(format!("backend saw path {}", seen.uri.path()));
        }
        for (k, v) in &case.expect_headers {
            let got: Vec<&str> = seen
                .headers
                .get_all(*k)
                .iter()
                .map(|v| v.to_str().unwrap())
                .collect();
            if got.join(",") != *v {
                return Err(format!("backend saw {k}: {got:?} (want {v})"));
            }
        }
        for k in &case.absent_headers {
            if seen.headers.contains_key(*k) {
                return Err(format!("backend saw {k}"));
            }
        }
        for (k, v) in &case.response_headers {
            if o.response.get(*k).is_none_or(|g| g != v) {
                return Err(format!("response {k}: {:?} (want {v})", o.response.get(*k)));
            }
        }
        for k in &case.response_absent {
            if o.response.contains_key(*k) {
                return Err(format!("response has {k}"));
            }
        }
        Ok(())
    }

    /// Every upstream mesh case, decided and filtered without a network:
    /// what the data plane must do for each. (`tests/tests/gamma_conformance.rs`
    /// runs the same cases through real nodes.)
    #[test]
    fn every_upstream_mesh_case_decides_as_the_suite_expects() {
        let all = cases::all();
        assert_eq!(all.len(), 85);
        let mut failed = Vec::new();
        for case in &all {
            let store = store_for(case.manifests);
            if case.weights.is_empty() {
                let o = run(&store, case, 0.5);
                if let Err(e) = check(case, &o) {
                    failed.push(format!("{} {} {}: {e}", case.test, case.dial, case.path));
                }
                continue;
            }
            // Weights: the share of rolls spread evenly over [0, 1).
            let n = 1000;
            for (backend, share) in &case.weights {
                let got = (0..n)
                    .filter(|i| run(&store, case, (*i as f64 + 0.5) / n as f64).backend == *backend)
                    .count();
                if ((got as f64 / n as f64) - share).abs() > 0.05 {
                    failed.push(format!("{}: {backend} got {got}/{n}", case.test));
                }
            }
            let total: usize = (0..n)
                .filter(|i| {
                    let b = run(&store, case, (*i as f64 + 0.5) / n as f64).backend;
                    case.weights.iter().any(|(w, _)| *w == b)
                })
                .count();
            if total != n {
                failed.push(format!(
                    "{}: {} requests went elsewhere",
                    case.test,
                    n - total
                ));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of 85 failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }

    #[test]
    fn header_filters_set_add_and_remove_case_insensitively() {
        let mods = HeaderMods {
            set: vec![("x-set".into(), "new".into())],
            add: vec![("x-add".into(), "two".into())],
            remove: vec!["x-gone".into()],
        };
        let mut h = HeaderMap::new();
        h.insert("X-Set", "old".parse().unwrap());
        h.append("x-set", "older".parse().unwrap());
        h.insert("X-Add", "one".parse().unwrap());
        h.insert("X-GONE", "x".parse().unwrap());
        apply_header_mods(&mut h, &mods);
        assert_eq!(h.get_all("x-set").iter().collect::<Vec<_>>(), ["new"]);
        assert_eq!(
            h.get_all("x-add").iter().collect::<Vec<_>>(),
            ["one", "two"]
        );
        assert!(!h.contains_key("x-gone"));
    }

    #[test]
    fn redirects_carry_location_and_the_rules_response_headers() {
        let mods = HeaderMods {
            set: vec![("x-why".into(), "moved".into())],
            ..HeaderMods::default()
        };
        let r = redirect(308, "https://example.org/new?q=1", &mods);
        assert_eq!(r.status(), 308);
        assert_eq!(r.headers()[LOCATION], "https://example.org/new?q=1");
        assert_eq!(r.headers()["x-why"], "moved");
        assert!(r.body().is_empty());
        let bad = redirect(302, "http://x/\n", &HeaderMods::default());
        assert_eq!(bad.status(), 500);
        let nm = no_match("q");
        assert_eq!(nm.status(), 404);
        assert_eq!(nm.headers()[ERROR_HEADER], NO_ROUTE_MATCH);
    }

    /// Redirect ports as Gateway API defines them, beyond the suite's cases:
    /// the caller's port is kept when neither port nor scheme is set.
    #[test]
    fn redirect_port_follows_the_callers_port_unless_the_scheme_is_set() {
        let store = PolicyStore::open("n1", None).unwrap();
        let doc = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: {MESH_NS}}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules:\n  - matches: [{{path: {{value: /hostname-redirect}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{hostname: example.org}}}}]\n  - matches: [{{path: {{value: /scheme}}}}]\n    filters: [{{type: RequestRedirect, requestRedirect: {{scheme: https}}}}]\n"
        );
        store.put(Document::parse(&doc).unwrap(), None).unwrap();
        let set = store.snapshot();
        let h = HeaderMap::new();
        let loc = |port: u16, path: &'static str, query: Option<&'static str>| {
            let call = Call {
                caller_namespace: MESH_NS,
                destination: Destination {
                    name: "echo",
                    namespace: MESH_NS,
                    port: Some(port),
                },
                scheme: "http",
                host: "echo",
                grpc: false,
                request: RequestInfo {
                    method: "GET",
                    path,
                    query,
                    headers: &h,
                },
            };
            let Decision::Route(d) = set.decide(&call) else {
                panic!()
            };
            match d.plan(&call, 0.0, 0.0) {
                Plan::Redirect { location, .. } => location,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(
            loc(8080, "/hostname-redirect", None),
            "http://example.org:8080/hostname-redirect"
        );
        assert_eq!(
            loc(80, "/hostname-redirect", Some("a=1")),
            "http://example.org/hostname-redirect?a=1"
        );
        assert_eq!(loc(8080, "/scheme", None), "https://echo/scheme");
    }

    #[test]
    fn mirrors_copy_the_rewritten_head_to_the_mirror_service() {
        let (mut parts, ()) = Request::builder()
            .method("PUT")
            .uri("http://web/a?b=c")
            .header("x-k", "v")
            .body(())
            .unwrap()
            .into_parts();
        parts.headers.insert(HOST, "web".parse().unwrap());
        let m = mirror_request(
            &parts,
            &ServiceRef {
                name: "shadow".into(),
                namespace: "ops".into(),
                port: Some(8080),
            },
        );
        assert_eq!(m.method(), "PUT");
        assert_eq!(m.uri(), "/a?b=c");
        assert_eq!(m.headers()[HOST], "shadow.ops:8080");
        assert_eq!(m.headers()["x-k"], "v");
    }
}
