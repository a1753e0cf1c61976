//! The route plan: from a request head, the policy snapshot and the proxy's
//! settings, where the request goes and under which rules — the service it
//! addresses, the HTTPRoute rule it matches, the backend chosen by weight,
//! header changes, timeouts, the retry policy and any FaultInjection
//! decision. A pure function: no I/O, no clock, randomness passed in.
//! `outbound.rs` carries a plan out.

use std::time::Duration;

use http::request::Parts;
use http::{Method, StatusCode};
use policy::doc::{HeaderMods, RouteRule};
use policy::{PolicySet, RequestInfo};
use rand::Rng;

use crate::config::{ProxyConfig, parse_duration};
use crate::error::MeshError;
use crate::retry::{Backoff, RetryPolicy};

/// Request header an app may set to override the default timeout (`250ms`, `2s`).
pub const TIMEOUT_HEADER: &str = "shoal-timeout";

/// Where a request goes and under which rules.
#[derive(Debug, Clone)]
pub struct Plan<'p> {
    /// The service the request addresses.
    pub service: String,
    /// The HTTPRoute that matched, by name.
    pub route: Option<&'p str>,
    /// The rule of it that matched.
    pub rule: Option<&'p RouteRule>,
    /// The service the request goes to (the rule's weighted backend, else
    /// `service`).
    pub backend: String,
    /// Until the response head, retries included.
    pub timeout: Duration,
    /// Per attempt (HTTPRoute `timeouts.backendRequest`).
    pub attempt_timeout: Option<Duration>,
    /// Attempts, which statuses are retried, backoff.
    pub retry: RetryPolicy<'p>,
    /// Whether the method is idempotent (a retry after an unknown outcome
    /// is safe).
    pub idempotent: bool,
    /// What FaultInjection on the backend decided for this request.
    pub fault: Fault,
}

/// A FaultInjection decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fault {
    /// Wait this long first.
    pub delay: Option<Duration>,
    /// Then answer with this status (`shoal-error: fault-injected`).
    pub abort: Option<StatusCode>,
}

impl<'p> Plan<'p> {
    /// The rule's request header changes.
    pub fn request_headers(&self) -> Option<&'p HeaderMods> {
        self.rule.map(|r| &r.request_headers)
    }

    /// The rule's response header changes.
    pub fn response_headers(&self) -> Option<&'p HeaderMods> {
        self.rule.map(|r| &r.response_headers)
    }
}

/// Plans `head`: to `fixed` on a per-upstream listener, else to the service
/// its URI or Host names. `rng` draws the backend and fault rolls, in that
/// order. Fails with `no-host` when the request names no service.
pub fn plan<'p, R: Rng + ?Sized>(
    head: &Parts,
    fixed: Option<&str>,
    set: &'p PolicySet,
    config: &ProxyConfig,
    rng: &mut R,
) -> Result<Plan<'p>, MeshError> {
    let service = match fixed {
        Some(s) => s.to_string(),
        None => service_name(head).ok_or(MeshError::NoHost)?,
    };
    let info = RequestInfo {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        headers: &head.headers,
    };
    let decision = set.route(&service, &info);
    let backend = match &decision {
        Some(d) => d.backend(&service, rng.r#gen::<f64>()),
        None => service.clone(),
    };
    let rule = decision.as_ref().map(|d| d.rule);
    // The app's header, else the route's, else MeshConfig's, else the node's.
    let timeout = head
        .headers
        .get(TIMEOUT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_duration(v).ok())
        .or(rule.and_then(|r| r.timeout))
        .or(set.mesh().and_then(|m| m.request_timeout))
        .unwrap_or(config.request_timeout);
    let route_retry = rule.and_then(|r| r.retry.as_ref());
    let retry = RetryPolicy {
        max_attempts: route_retry.map_or(config.retry.max_attempts, |r| r.attempts + 1),
        codes: route_retry.map_or(&[][..], |r| &r.codes[..]),
        backoff: match route_retry.and_then(|r| r.backoff) {
            Some(base) => Backoff {
                base,
                max: base * 16,
            },
            None => Backoff {
                base: config.retry.backoff_base,
                max: config.retry.backoff_max,
            },
        },
    };
    let mut fault = Fault::default();
    if let Some(f) = set.fault(&backend) {
        if let Some((percent, delay)) = f.delay
            && rng.r#gen::<f64>() * 100.0 < percent
        {
            fault.delay = Some(delay);
        }
        if let Some((percent, status)) = f.abort
            && rng.r#gen::<f64>() * 100.0 < percent
        {
            fault.abort =
                Some(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE));
        }
    }
    Ok(Plan {
        service,
        route: decision.map(|d| d.route),
        rule,
        backend,
        timeout,
        attempt_timeout: rule.and_then(|r| r.backend_timeout),
        retry,
        idempotent: idempotent(&head.method),
        fault,
    })
}

/// The service a request addresses: the absolute-form URI's host, else the
/// Host header / `:authority`, without port, trailing dot or `.shoal`.
pub fn service_name(head: &Parts) -> Option<String> {
    let host = match head.uri.host() {
        Some(h) => h.to_string(),
        None => {
            let h = head.headers.get(http::header::HOST)?.to_str().ok()?;
            h.rsplit_once(':')
                .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
                .map(|(h, _)| h)
                .unwrap_or(h)
                .to_string()
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let name = host.strip_suffix(".shoal").unwrap_or(&host);
    (!name.is_empty()).then(|| name.to_string())
}

/// Readdresses a request that arrived on `service`'s per-upstream listener:
/// the app addressed the listener, not the service, so it is forwarded as
/// if it had named the service (Host: `service`, origin-form URI).
pub fn address_to(head: &mut Parts, service: &str) {
    if let Ok(host) = http::HeaderValue::from_str(service) {
        head.headers.insert(http::header::HOST, host);
    }
    if head.uri.authority().is_some() {
        let mut parts = head.uri.clone().into_parts();
        parts.scheme = None;
        parts.authority = None;
        if parts.path_and_query.is_none() {
            parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
        }
        if let Ok(uri) = http::Uri::from_parts(parts) {
            head.uri = uri;
        }
    }
}

/// Methods a retry after an unknown outcome may repeat.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::doc::Document;
    use policy::store::PolicyStore;
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use std::sync::Arc;

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn set(docs: &[&str]) -> Arc<PolicySet> {
        let store = PolicyStore::open("n1", None).unwrap();
        for d in docs {
            store.put(Document::parse(d).unwrap(), None).unwrap();
        }
        store.snapshot()
    }

    const SPLIT: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: web}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web-v1, weight: 90}, {name: web-v2, weight: 10}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 4, codes: [500], backoff: 20ms}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: api}]}
";

    #[test]
    fn a_plain_request_goes_to_the_service_it_names_with_the_node_defaults() {
        let config = ProxyConfig::default();
        let none = PolicySet::default();
        let mut rng = StdRng::seed_from_u64(1);
        let p = plan(
            &head("POST", "/x", &[("host", "Web.shoal.:8080")]),
            None,
            &none,
            &config,
            &mut rng,
        )
        .unwrap();
        assert_eq!((p.service.as_str(), p.backend.as_str()), ("web", "web"));
        assert!(p.rule.is_none() && p.route.is_none());
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert_eq!(p.attempt_timeout, None);
        assert_eq!(p.retry.max_attempts, 3);
        assert!(p.retry.codes.is_empty());
        assert_eq!(p.retry.backoff.base, Duration::from_millis(10));
        assert_eq!(p.retry.backoff.max, Duration::from_millis(250));
        assert!(!p.idempotent, "POST");
        assert_eq!(p.fault, Fault::default());
        let p = plan(
            &head("GET", "http://api.shoal/y", &[("shoal-timeout", "250ms")]),
            None,
            &none,
            &config,
            &mut rng,
        )
        .unwrap();
        assert_eq!(p.service, "api");
        assert_eq!(p.timeout, Duration::from_millis(250));
        assert!(p.idempotent);
    }

    #[test]
    fn no_host_is_a_mesh_error_and_a_fixed_listener_ignores_the_host() {
        let config = ProxyConfig::default();
        let mut rng = StdRng::seed_from_u64(1);
        let none = PolicySet::default();
        let err = plan(&head("GET", "/", &[]), None, &none, &config, &mut rng).unwrap_err();
        assert_eq!(err, MeshError::NoHost);
        let mut h = head("GET", "http://elsewhere:9/a?b", &[("host", "elsewhere")]);
        address_to(&mut h, "web");
        assert_eq!(h.uri, "/a?b");
        assert_eq!(h.headers["host"], "web");
        let p = plan(&h, Some("web"), &none, &config, &mut rng).unwrap();
        assert_eq!(p.service, "web");
    }

    #[test]
    fn an_httproute_rule_sets_backend_timeouts_retry_and_header_mods() {
        let set = set(&[SPLIT]);
        let config = ProxyConfig::default();
        let mut rng = StdRng::seed_from_u64(3);
        let mut v2 = 0;
        for _ in 0..1000 {
            let p = plan(
                &head("GET", "/api/x", &[("host", "web")]),
                None,
                &set,
                &config,
                &mut rng,
            )
            .unwrap();
            assert_eq!(p.route, Some("split"));
            assert_eq!(p.timeout, Duration::from_secs(2));
            assert_eq!(p.attempt_timeout, Some(Duration::from_millis(500)));
            assert_eq!(p.retry.max_attempts, 5);
            assert_eq!(p.retry.codes, &[500]);
            assert_eq!(p.retry.backoff.base, Duration::from_millis(20));
            assert_eq!(p.retry.backoff.max, Duration::from_millis(320));
            assert_eq!(p.request_headers().unwrap().set[0].0, "x-route");
            match p.backend.as_str() {
                "web-v2" => v2 += 1,
                b => assert_eq!(b, "web-v1"),
            }
        }
        assert!((60..=140).contains(&v2), "about 10% to web-v2: {v2}");
        let other = plan(
            &head("GET", "/other", &[("host", "web")]),
            None,
            &set,
            &config,
            &mut rng,
        )
        .unwrap();
        assert!(other.rule.is_none());
        assert_eq!(other.backend, "web");
    }

    #[test]
    fn the_same_seed_plans_the_same_backends_and_faults() {
        let set = set(&[
            SPLIT,
            "apiVersion: shoal.dev/v1\nkind: FaultInjection\nmetadata: {name: chaos}\nspec: {target: web-v1, delay: {percent: 50, duration: 10ms}, abort: {percent: 30, status: 503}}\n",
        ]);
        let config = ProxyConfig::default();
        let run = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..200)
                .map(|_| {
                    let p = plan(
                        &head("GET", "/api", &[("host", "web")]),
                        None,
                        &set,
                        &config,
                        &mut rng,
                    )
                    .unwrap();
                    (p.backend, p.fault)
                })
                .collect::<Vec<_>>()
        };
        let a = run(9);
        assert_eq!(a, run(9));
        assert_ne!(a, run(10));
        let aborted = a.iter().filter(|(_, f)| f.abort.is_some()).count();
        let delayed = a.iter().filter(|(_, f)| f.delay.is_some()).count();
        assert!((30..=80).contains(&aborted), "{aborted}");
        assert!((70..=130).contains(&delayed), "{delayed}");
        assert!(
            a.iter()
                .filter(|(b, _)| b == "web-v2")
                .all(|(_, f)| *f == Fault::default()),
            "the fault targets web-v1 only"
        );
        assert!(
            a.iter()
                .filter_map(|(_, f)| f.abort)
                .all(|s| s == StatusCode::SERVICE_UNAVAILABLE)
        );
    }
}
