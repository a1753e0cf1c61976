//! The route plan: from a request head, the policy snapshot and the proxy's
//! settings, where the request goes and under which rules — the service it
//! addresses (name, namespace, port), what routing decides
//! ([`PolicySet::decide`], [`policy::RouteDecision::plan`]): answer a
//! redirect or the no-match 404 here, or forward to the backend chosen by
//! weight with the route's rewrites, header changes and mirrors; then
//! timeouts, the retry policy and any FaultInjection decision. A pure
//! function: no I/O, no clock, randomness passed in. `outbound.rs` carries
//! a plan out.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::request::Parts;
use http::{Method, StatusCode};
use policy::doc::{HeaderMods, RouteRule};
use policy::set::{Call, Decision, Forward, Plan as RoutePlan, ServiceAddr};
use policy::{PolicySet, RequestInfo};
use rand::Rng;

use crate::config::{ProxyConfig, parse_duration};
use crate::error::MeshError;
use crate::retry::{Backoff, RetryPolicy};
use crate::stats;

/// Request header an app may set to override the default timeout (`250ms`, `2s`).
pub const TIMEOUT_HEADER: &str = "shoal-timeout";
/// [`TIMEOUT_HEADER`] as a name: a lookup by `&str` parses the name first.
pub(crate) const TIMEOUT_NAME: http::HeaderName = http::HeaderName::from_static(TIMEOUT_HEADER);

/// The port a service address without one means (HTTP).
pub const DEFAULT_PORT: u16 = 80;

/// Serving nodes a request may already have crossed (`shoal-forwarded`
/// entries it carries) before the mesh calls it a loop: a local instance
/// whose address is another node's outbound listener sends every request
/// round the same nodes again, one entry more each turn. Apps that copy
/// every incoming header into their own calls add one entry per app in the
/// chain, far fewer than this.
pub const MAX_MESH_HOPS: usize = 16;

/// Where a request goes and under which rules.
#[derive(Debug)]
pub struct Plan<'p> {
    /// The service the request addresses (its name).
    pub service: String,
    /// The HTTPRoute or GRPCRoute that matched, by name.
    pub route: Option<&'p str>,
    /// The rule of it that matched.
    pub rule: Option<&'p RouteRule>,
    /// What to do.
    pub action: Action<'p>,
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

/// What the calling node does with a request.
#[derive(Debug)]
pub enum Action<'p> {
    /// Forward to [`Plan::backend`], with the matched rule's changes
    /// (`None`: no route applies, forwarded unchanged).
    Forward(Option<Forward<'p>>),
    /// Answer a redirect (RequestRedirect); nothing is forwarded.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: u16,
        /// The absolute `Location`.
        location: String,
        /// The rule's response header changes.
        response_headers: &'p HeaderMods,
    },
    /// Routes apply but no rule matches: answer 404 `no-route-match`.
    NoMatch {
        /// The first route considered.
        route: &'p str,
    },
    /// The request addresses an IP address, not a service: it goes there
    /// directly, unrouted.
    Passthrough(SocketAddr),
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
    /// The forward's rewrites and header changes, when routed.
    pub fn forward(&self) -> Option<&Forward<'p>> {
        match &self.action {
            Action::Forward(f) => f.as_ref(),
            _ => None,
        }
    }
}

/// Plans `head`: to `fixed` on a per-upstream listener, else to the service
/// its URI or Host names (`name`, `name.namespace`, `name.namespace.svc`,
/// `name.namespace.svc.cluster.local`, `:port`; the node's namespace when
/// none is named, port 80 when none is written). `rng` draws the backend,
/// mirror and fault rolls, in that order. Fails with `no-host` when the
/// request names no service.
pub fn plan<'p, R: Rng + ?Sized>(
    head: &Parts,
    fixed: Option<&str>,
    set: &'p PolicySet,
    config: &ProxyConfig,
    rng: &mut R,
) -> Result<Plan<'p>, MeshError> {
    if mesh_hops(head) >= MAX_MESH_HOPS {
        return Err(MeshError::ForwardingLoop);
    }
    let namespace = config.namespace.as_str();
    let authority = authority(head);
    let addr = match fixed {
        Some(s) => ServiceAddr::parse(s, namespace, DEFAULT_PORT),
        None => {
            let a = authority.as_deref().ok_or(MeshError::NoHost)?;
            if let Some(ip) = ip_destination(a) {
                return Ok(passthrough(head, ip, set, config));
            }
            ServiceAddr::parse(a, namespace, DEFAULT_PORT)
        }
    };
    let host = authority
        .as_deref()
        .map(strip_port)
        .unwrap_or_default()
        .to_string();
    let info = RequestInfo {
        method: head.method.as_str(),
        path: head.uri.path(),
        query: head.uri.query(),
        headers: &head.headers,
    };
    let (service, decision, call_plan) = match &addr {
        Some(addr) => {
            let call = Call {
                caller_namespace: namespace,
                destination: addr.destination(),
                scheme: head.uri.scheme_str().unwrap_or("http"),
                host: &host,
                grpc: stats::is_grpc(&head.headers),
                request: info,
            };
            let decision = set.decide(&call);
            let planned = match &decision {
                Decision::Route(d) => {
                    let roll = rng.r#gen::<f64>();
                    Some(d.plan(&call, roll, rng.r#gen::<f64>()))
                }
                _ => None,
            };
            (addr.name.clone(), decision, planned)
        }
        // Not a service address this mesh routes (e.g. `a.b.c.d`): the
        // name as written, unrouted.
        None => (
            match fixed {
                Some(s) => s.to_string(),
                None => service_name(head).ok_or(MeshError::NoHost)?,
            },
            Decision::Unrouted,
            None,
        ),
    };
    let (route, rule) = match &decision {
        Decision::Route(d) => (Some(d.route), Some(d.rule)),
        Decision::NoMatch { route } => (Some(*route), None),
        Decision::Unrouted => (None, None),
    };
    let action = match (decision, call_plan) {
        (Decision::NoMatch { route }, _) => Action::NoMatch { route },
        (
            _,
            Some(RoutePlan::Redirect {
                status,
                location,
                response_headers,
            }),
        ) => Action::Redirect {
            status,
            location,
            response_headers,
        },
        (_, Some(RoutePlan::Forward(f))) => Action::Forward(Some(f)),
        (_, None) => Action::Forward(None),
    };
    let backend = match &action {
        Action::Forward(Some(f)) => f.backend.name.clone(),
        _ => service.clone(),
    };
    let mut p = defaults(head, service, set, config);
    p.route = route;
    p.rule = rule;
    p.action = action;
    p.backend = backend;
    if let Some(r) = rule {
        p.timeout = header_timeout(head).or(r.timeout).unwrap_or(p.timeout);
        p.attempt_timeout = r.backend_timeout;
        if let Some(retry) = &r.retry {
            p.retry = RetryPolicy {
                max_attempts: retry.attempts + 1,
                codes: &retry.codes[..],
                backoff: match retry.backoff {
                    Some(base) => Backoff {
                        base,
                        max: base * 16,
                    },
                    None => p.retry.backoff,
                },
            };
        }
    }
    if matches!(p.action, Action::Forward(_))
        && let Some(f) = set.fault(&p.backend)
    {
        if let Some((percent, delay)) = f.delay
            && rng.r#gen::<f64>() * 100.0 < percent
        {
            p.fault.delay = Some(delay);
        }
        if let Some((percent, status)) = f.abort
            && rng.r#gen::<f64>() * 100.0 < percent
        {
            p.fault.abort =
                Some(StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE));
        }
    }
    Ok(p)
}

/// An unrouted plan with the node's defaults (the app's `shoal-timeout`,
/// else MeshConfig's, else the node's).
fn defaults<'p>(
    head: &Parts,
    service: String,
    set: &'p PolicySet,
    config: &ProxyConfig,
) -> Plan<'p> {
    Plan {
        backend: service.clone(),
        service,
        route: None,
        rule: None,
        action: Action::Forward(None),
        timeout: header_timeout(head)
            .or(set.mesh().and_then(|m| m.request_timeout))
            .unwrap_or(config.request_timeout),
        attempt_timeout: None,
        retry: RetryPolicy {
            max_attempts: config.retry.max_attempts,
            codes: &[],
            backoff: Backoff {
                base: config.retry.backoff_base,
                max: config.retry.backoff_max,
            },
        },
        idempotent: idempotent(&head.method),
        fault: Fault::default(),
    }
}

fn passthrough<'p>(
    head: &Parts,
    to: SocketAddr,
    set: &'p PolicySet,
    config: &ProxyConfig,
) -> Plan<'p> {
    let mut p = defaults(head, to.to_string(), set, config);
    p.action = Action::Passthrough(to);
    p
}

/// The serving nodes the request crossed: `by=` entries in its
/// `shoal-forwarded` fields (one field per node, or joined with commas by
/// an app that merged them).
fn mesh_hops(head: &Parts) -> usize {
    head.headers
        .get_all(crate::upstream::FORWARDED)
        .iter()
        .map(|v| v.as_bytes().split(|b| *b == b',').count())
        .sum()
}

fn header_timeout(head: &Parts) -> Option<Duration> {
    head.headers
        .get(TIMEOUT_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_duration(v).ok())
}

/// The authority a request names: the absolute-form URI's, else Host /
/// `:authority`.
fn authority(head: &Parts) -> Option<String> {
    match head.uri.authority() {
        Some(a) => Some(a.as_str().to_string()),
        None => head
            .headers
            .get(http::header::HOST)?
            .to_str()
            .ok()
            .map(str::to_string),
    }
    .filter(|a| !a.is_empty())
}

/// `host[:port]` without the port (IPv6 literals keep their brackets).
fn strip_port(a: &str) -> &str {
    match a.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => a,
    }
}

/// An authority that is an IP address (`10.0.0.7:8080`, `[::1]:80`,
/// port 80 when none is written).
fn ip_destination(a: &str) -> Option<SocketAddr> {
    if let Ok(s) = a.parse::<SocketAddr>() {
        return Some(s);
    }
    let host = a.trim_start_matches('[').trim_end_matches(']');
    host.parse::<IpAddr>()
        .ok()
        .map(|ip| SocketAddr::new(ip, DEFAULT_PORT))
}

/// The service a request addresses: the absolute-form URI's host, else the
/// Host header / `:authority`, without port, trailing dot or `.shoal`.
pub fn service_name(head: &Parts) -> Option<String> {
    let host = match head.uri.host() {
        Some(h) => h,
        None => {
            let h = head.headers.get(http::header::HOST)?.to_str().ok()?;
            h.rsplit_once(':')
                .filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit()))
                .map(|(h, _)| h)
                .unwrap_or(h)
        }
    };
    // One allocation: the name as it is when it is already lower case.
    let host = host.trim_end_matches('.');
    let mut name = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase()
    } else {
        host.to_owned()
    };
    if name.ends_with(".shoal") {
        name.truncate(name.len() - ".shoal".len());
    }
    (!name.is_empty()).then_some(name)
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
    fn a_request_that_crossed_too_many_serving_nodes_is_a_loop() {
        let config = ProxyConfig::default();
        let none = PolicySet::default();
        let mut rng = StdRng::seed_from_u64(1);
        let entry = "by=n2;from=n1;svc=client";
        let with = |fields: &[&str]| {
            let mut h: Vec<(&str, &str)> = vec![("host", "web")];
            h.extend(fields.iter().map(|f| ("shoal-forwarded", *f)));
            head("GET", "/", &h)
        };
        let below = vec![entry; MAX_MESH_HOPS - 1];
        assert!(plan(&with(&below), None, &none, &config, &mut rng).is_ok());
        let at = vec![entry; MAX_MESH_HOPS];
        assert_eq!(
            plan(&with(&at), None, &none, &config, &mut rng).err(),
            Some(MeshError::ForwardingLoop)
        );
        // Merged into one field by an app, the entries still count.
        let joined = vec![entry; MAX_MESH_HOPS].join(", ");
        assert_eq!(
            plan(&with(&[joined.as_str()]), None, &none, &config, &mut rng).err(),
            Some(MeshError::ForwardingLoop)
        );
        // A per-upstream listener's fixed service is planned the same way.
        assert_eq!(
            plan(&with(&at), Some("web"), &none, &config, &mut rng).err(),
            Some(MeshError::ForwardingLoop)
        );
    }

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
            assert_eq!(p.forward().unwrap().request_headers[0].set[0].0, "x-route");
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
        // Routes attach to `web` but no rule matches: 404, no fall-through.
        assert!(other.rule.is_none());
        assert!(matches!(other.action, Action::NoMatch { route: "split" }));
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

    #[test]
    fn namespaces_ports_redirects_and_ip_addresses() {
        let set = set(&[
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: mesh}\nspec:\n  parentRefs: [{name: echo, port: 80}]\n  rules:\n  - matches: [{path: {value: /go}}]\n    filters: [{type: RequestRedirect, requestRedirect: {hostname: example.org, statusCode: 301}}]\n  - matches: [{path: {value: /x}}]\n    backendRefs: [{name: echo-v2}]\n",
        ]);
        let mut config = ProxyConfig::default();
        let mut rng = StdRng::seed_from_u64(1);
        let mut go = |host: &str, path: &str, config: &ProxyConfig| {
            plan(
                &head("GET", path, &[("host", host)]),
                None,
                &set,
                config,
                &mut rng,
            )
            .unwrap()
        };
        // In `default`, `echo` is another service: unrouted.
        let p = go("echo", "/x", &config);
        assert!(matches!(p.action, Action::Forward(None)));
        assert_eq!(p.backend, "echo");
        for host in [
            "echo.mesh",
            "echo.mesh.svc:80",
            "echo.mesh.svc.cluster.local",
        ] {
            assert_eq!(go(host, "/x", &config).backend, "echo-v2", "{host}");
        }
        config.namespace = "mesh".into();
        assert_eq!(go("echo", "/x", &config).backend, "echo-v2");
        // The route is for port 80 only.
        assert!(matches!(
            go("echo:8080", "/x", &config).action,
            Action::Forward(None)
        ));
        match go("echo", "/go?a=1", &config).action {
            Action::Redirect {
                status, location, ..
            } => assert_eq!(
                (status, location.as_str()),
                (301, "http://example.org/go?a=1")
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            go("echo", "/nothing", &config).action,
            Action::NoMatch { .. }
        ));
        let p = go("127.0.0.1:8080", "/x", &config);
        assert!(
            matches!(p.action, Action::Passthrough(a) if a == "127.0.0.1:8080".parse().unwrap())
        );
        let p = go("[::1]", "/", &config);
        assert!(matches!(p.action, Action::Passthrough(a) if a == "[::1]:80".parse().unwrap()));
    }
}
