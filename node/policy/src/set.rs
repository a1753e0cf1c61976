//! The applied policy set: an immutable snapshot the data plane reads, and
//! the decisions it answers (route, authorize, rate-limit, fault).
//!
//! Routing is pure: [`PolicySet::decide`] takes a [`Call`] (who calls, which
//! service, namespace and port, and the request head) and returns a
//! [`Decision`]; [`RouteDecision::plan`] turns a matched rule into what the
//! data plane must do ([`Plan`]: forward somewhere with changes, or answer a
//! redirect). No I/O, no clock; randomness comes in as `roll`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;
use transport::Identity;

use super::doc::{
    Authorization, Backend, Document, FaultInjection, HeaderMods, MeshConfig, Mirror, PathMatch,
    PathModifier, RateLimit, Redirect, Retry, RouteMatch, RouteRule, Spec, valid_name,
    valid_namespace,
};
use super::store::Entry;

/// Everything in force on this node at one instant.
#[derive(Debug, Default)]
pub struct PolicySet {
    routes: HashMap<(String, String), Vec<Attached>>,
    authz: HashMap<String, Vec<Authorization>>,
    limits: HashMap<String, Vec<(String, RateLimit)>>,
    faults: HashMap<String, FaultInjection>,
    mesh: Option<MeshConfig>,
}

/// A route attached to one service (one `parentRefs[]` entry).
#[derive(Debug)]
struct Attached {
    /// `<namespace>/<name>`: the order between routes of equal precedence.
    key: String,
    name: String,
    namespace: String,
    port: Option<u16>,
    grpc: bool,
    doc: Arc<Document>,
}

impl Attached {
    fn rules(&self) -> &[RouteRule] {
        match &self.doc.spec {
            Spec::Route(r) => &r.rules,
            _ => &[],
        }
    }
}

/// What the router needs to know about a request.
pub struct RequestInfo<'a> {
    /// Method.
    pub method: &'a str,
    /// Path (no query).
    pub path: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
    /// Request headers.
    pub headers: &'a HeaderMap,
}

/// The service a call goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destination<'a> {
    /// Service name.
    pub name: &'a str,
    /// Service namespace.
    pub namespace: &'a str,
    /// The port the caller used; `None` when unknown (then routes for any
    /// port apply).
    pub port: Option<u16>,
}

/// One call, as the router sees it.
pub struct Call<'a> {
    /// The calling node's namespace (consumer routes apply only to it).
    pub caller_namespace: &'a str,
    /// The service called.
    pub destination: Destination<'a>,
    /// `http` or `https`: what the caller used (redirect defaults).
    pub scheme: &'a str,
    /// The host the caller named, without port (redirect default).
    pub host: &'a str,
    /// A gRPC call (`content-type: application/grpc*`): GRPCRoutes apply
    /// first.
    pub grpc: bool,
    /// The request head.
    pub request: RequestInfo<'a>,
}

/// What routing says about a call.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'a> {
    /// No route attaches to the destination (for this caller and port):
    /// forward to the destination unchanged.
    Unrouted,
    /// Routes attach but no rule matches: answer 404.
    NoMatch {
        /// The first route considered, for the error message.
        route: &'a str,
    },
    /// A rule matched.
    Route(RouteDecision<'a>),
}

/// The rule a request matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteDecision<'a> {
    /// The route's name.
    pub route: &'a str,
    /// The route's namespace.
    pub namespace: &'a str,
    /// The matched rule.
    pub rule: &'a RouteRule,
    /// The match that selected it (`None`: the rule has no matches).
    pub matched: Option<&'a RouteMatch>,
}

/// A service to send to, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Service name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Port (`None`: the port the caller used, or none known).
    pub port: Option<u16>,
}

/// What the data plane does with a matched call.
#[derive(Debug, Clone)]
pub enum Plan<'a> {
    /// Answer with a redirect; nothing is forwarded.
    Redirect {
        /// 301, 302, 303, 307 or 308.
        status: u16,
        /// The absolute `Location`.
        location: String,
        /// The rule's ResponseHeaderModifier.
        response_headers: &'a HeaderMods,
    },
    /// Forward.
    Forward(Forward<'a>),
}

/// Where and how a call is forwarded.
#[derive(Debug, Clone)]
pub struct Forward<'a> {
    /// The backend chosen by weight (the destination when the rule names none).
    pub backend: Target,
    /// The new path and query (URLRewrite), if rewritten.
    pub path_and_query: Option<String>,
    /// The new Host / `:authority` (URLRewrite hostname), if rewritten.
    pub host: Option<String>,
    /// Request header changes, applied in order (the rule's, then the backend's).
    pub request_headers: Vec<&'a HeaderMods>,
    /// Response header changes, applied in order.
    pub response_headers: Vec<&'a HeaderMods>,
    /// Mirrors that fire for this request (fire-and-forget copies).
    pub mirrors: Vec<&'a Mirror>,
    /// `timeouts.request`.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`.
    pub backend_timeout: Option<Duration>,
    /// `retry`.
    pub retry: Option<&'a Retry>,
}

/// A service address as a caller writes it in Host / `:authority`:
/// `name`, `name.namespace`, `name.namespace.svc`,
/// `name.namespace.svc.cluster.local` (or `name.shoal`), each with an
/// optional `:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAddr {
    /// Service name.
    pub name: String,
    /// Namespace (the caller's when the address names none).
    pub namespace: String,
    /// The port written, else `default_port`.
    pub port: u16,
}

impl ServiceAddr {
    /// Parses an authority; `None` for IP addresses and anything that is not
    /// a service name.
    pub fn parse(authority: &str, caller_namespace: &str, default_port: u16) -> Option<Self> {
        if authority.starts_with('[') {
            return None;
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0)?),
            None => (authority, default_port),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.parse::<IpAddr>().is_ok() {
            return None;
        }
        let host = host.strip_suffix(".shoal").unwrap_or(&host);
        let labels: Vec<&str> = host.split('.').collect();
        let (name, namespace) = match labels.as_slice() {
            [name] => (*name, caller_namespace),
            [name, ns] | [name, ns, "svc"] | [name, ns, "svc", "cluster", "local"] => (*name, *ns),
            _ => return None,
        };
        (valid_name(name) && valid_namespace(namespace)).then(|| ServiceAddr {
            name: name.to_string(),
            namespace: namespace.to_string(),
            port,
        })
    }

    /// As a [`Destination`].
    pub fn destination(&self) -> Destination<'_> {
        Destination {
            name: &self.name,
            namespace: &self.namespace,
            port: Some(self.port),
        }
    }
}

impl<'a> RouteDecision<'a> {
    /// Picks a backend service by weight (`roll` uniform in [0, 1)); the
    /// parent service when the rule names none.
    pub fn backend(&self, parent: &str, roll: f64) -> String {
        self.pick(roll)
            .map(|b| b.service.clone())
            .unwrap_or_else(|| parent.to_string())
    }

    /// The backendRef chosen by weight (`roll` uniform in [0, 1)); `None`
    /// when the rule names none. Weight 0 is never chosen.
    pub fn pick(&self, roll: f64) -> Option<&'a Backend> {
        let backends = &self.rule.backends;
        let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = ((roll.clamp(0.0, 1.0) * total as f64) as u64).min(total - 1);
        for b in backends {
            if point < u64::from(b.weight) {
                return Some(b);
            }
            point -= u64::from(b.weight);
        }
        backends.iter().rev().find(|b| b.weight > 0)
    }

    /// The `PathPrefix` the request matched (`/` when the rule's match has
    /// no path), for `ReplacePrefixMatch`.
    pub fn matched_prefix(&self) -> &'a str {
        match self.matched.and_then(|m| m.path.as_ref()) {
            Some(PathMatch::Prefix(p)) => p,
            _ => "/",
        }
    }

    /// What to do with `call`: redirect, or forward to the backend chosen
    /// with `roll` with its rewrites, header changes and mirrors
    /// (`mirror_roll` decides fractional mirrors).
    pub fn plan(&self, call: &Call<'_>, roll: f64, mirror_roll: f64) -> Plan<'a> {
        let rule = self.rule;
        if let Some(r) = &rule.redirect {
            return Plan::Redirect {
                status: r.status,
                location: redirect_location(r, self.matched_prefix(), call),
                response_headers: &rule.response_headers,
            };
        }
        let chosen = self.pick(roll);
        let backend = match chosen {
            Some(b) => Target {
                name: b.service.clone(),
                namespace: b.namespace.clone(),
                port: b.port,
            },
            None => Target {
                name: call.destination.name.to_string(),
                namespace: call.destination.namespace.to_string(),
                port: call.destination.port,
            },
        };
        let backend_rewrite = chosen.and_then(|b| b.rewrite.as_ref());
        let path_mod = backend_rewrite
            .and_then(|r| r.path.as_ref())
            .or(rule.rewrite.as_ref().and_then(|r| r.path.as_ref()));
        let host = backend_rewrite
            .and_then(|r| r.hostname.clone())
            .or(rule.rewrite.as_ref().and_then(|r| r.hostname.clone()));
        let path_and_query = path_mod.map(|m| {
            let path = modify_path(m, self.matched_prefix(), call.request.path);
            with_query(path, call.request.query)
        });
        let mut request_headers = vec![&rule.request_headers];
        let mut response_headers = vec![&rule.response_headers];
        let mut mirrors: Vec<&Mirror> = rule.mirrors.iter().collect();
        if let Some(b) = chosen {
            request_headers.push(&b.request_headers);
            response_headers.push(&b.response_headers);
            mirrors.extend(&b.mirrors);
        }
        request_headers.retain(|m| !m.is_empty());
        response_headers.retain(|m| !m.is_empty());
        mirrors.retain(|m| m.fires(mirror_roll));
        Plan::Forward(Forward {
            backend,
            path_and_query,
            host,
            request_headers,
            response_headers,
            mirrors,
            timeout: rule.timeout,
            backend_timeout: rule.backend_timeout,
            retry: rule.retry.as_ref(),
        })
    }
}

/// The `Location` of a redirect, as Gateway API defines it: scheme, host
/// and path from the filter or else the request; the port from the filter,
/// else the well-known port of the filter's scheme when it sets one, else
/// the port the caller used; the port is left out when it is the scheme's
/// well-known one (http 80, https 443). The query is kept.
pub fn redirect_location(r: &Redirect, matched_prefix: &str, call: &Call<'_>) -> String {
    let scheme = r.scheme.as_deref().unwrap_or(call.scheme);
    let well_known = |s: &str| if s == "https" { 443 } else { 80 };
    let port = r
        .port
        .unwrap_or_else(|| match (&r.scheme, call.destination.port) {
            (Some(s), _) => well_known(s),
            (None, Some(p)) => p,
            (None, None) => well_known(scheme),
        });
    let host = r.hostname.as_deref().unwrap_or(call.host);
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let path = match &r.path {
        Some(m) => modify_path(m, matched_prefix, call.request.path),
        None => call.request.path.to_string(),
    };
    let authority = if port == well_known(scheme) && matches!(scheme, "http" | "https") {
        host
    } else {
        format!("{host}:{port}")
    };
    with_query(format!("{scheme}://{authority}{path}"), call.request.query)
}

/// Applies a path modifier. `ReplacePrefixMatch` replaces the matched
/// prefix on element boundaries: with prefix `/foo`, `/foo/bar` becomes
/// `/xyz/bar` for `/xyz` or `/xyz/`, and `/bar` for `/`; `/foo` becomes
/// `/xyz` (or `/`).
pub fn modify_path(m: &PathModifier, matched_prefix: &str, path: &str) -> String {
    match m {
        PathModifier::Full(p) => p.clone(),
        PathModifier::Prefix(replacement) => {
            let prefix = matched_prefix.trim_end_matches('/');
            let rest = path.get(prefix.len()..).unwrap_or("");
            let out = format!("{}{rest}", replacement.trim_end_matches('/'));
            if out.is_empty() { "/".to_string() } else { out }
        }
    }
}

fn with_query(path: String, query: Option<&str>) -> String {
    match query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    }
}

impl PolicySet {
    /// Compiles live entries into a set.
    pub fn build<'a>(entries: impl Iterator<Item = &'a Entry>) -> Self {
        let mut set = PolicySet::default();
        for e in entries {
            let Some(doc) = &e.doc else { continue };
            match &doc.spec {
                Spec::Route(r) => {
                    for p in &r.parents {
                        set.routes
                            .entry((p.namespace.clone(), p.name.clone()))
                            .or_default()
                            .push(Attached {
                                key: format!("{}/{}", r.namespace, doc.name),
                                name: doc.name.clone(),
                                namespace: r.namespace.clone(),
                                port: p.port,
                                grpc: r.grpc,
                                doc: doc.clone(),
                            });
                    }
                }
                Spec::Authz(a) => set
                    .authz
                    .entry(a.target.clone())
                    .or_default()
                    .push(a.clone()),
                Spec::RateLimit(l) => set
                    .limits
                    .entry(l.target.clone())
                    .or_default()
                    .push((format!("{}@{}", doc.name, e.version), l.clone())),
                Spec::Fault(f) => {
                    set.faults.insert(f.target.clone(), f.clone());
                }
                Spec::Mesh(m) => set.mesh = Some(m.clone()),
            }
        }
        for routes in set.routes.values_mut() {
            routes.sort_by(|a, b| a.key.cmp(&b.key));
        }
        set
    }

    /// Routes one call (GAMMA semantics). The routes considered are those
    /// attached to the destination service for the caller's port (a
    /// `parentRefs[].port` limits a route to that port); for a gRPC call the
    /// GRPCRoutes among them if there are any, else the HTTPRoutes. Of
    /// those, consumer routes (in the caller's namespace, which is not the
    /// service's) win when any exist; otherwise producer routes (in the
    /// service's namespace) apply. Then the highest-precedence match wins:
    /// for HTTPRoute exact path, longest prefix, method, most header
    /// matches, most query matches; for GRPCRoute longest service, longest
    /// method, most header matches; ties go to the route first by
    /// `namespace/name`, then to document order.
    pub fn decide(&self, call: &Call<'_>) -> Decision<'_> {
        let dest = call.destination;
        let Some(attached) = self
            .routes
            .get(&(dest.namespace.to_string(), dest.name.to_string()))
        else {
            return Decision::Unrouted;
        };
        let on_port: Vec<&Attached> = attached
            .iter()
            .filter(|a| a.port.is_none() || dest.port.is_none() || a.port == dest.port)
            .collect();
        let grpc = call.grpc && on_port.iter().any(|a| a.grpc);
        let of_kind = on_port.into_iter().filter(|a| a.grpc == grpc);
        let (consumer, producer): (Vec<&Attached>, Vec<&Attached>) = of_kind
            .filter(|a| a.namespace == dest.namespace || a.namespace == call.caller_namespace)
            .partition(|a| a.namespace != dest.namespace);
        let routes = if consumer.is_empty() {
            producer
        } else {
            consumer
        };
        let Some(first) = routes.first() else {
            return Decision::Unrouted;
        };
        match best_match(&routes, grpc, &call.request) {
            Some(d) => Decision::Route(d),
            None => Decision::NoMatch { route: &first.name },
        }
    }
    /// Whether `caller` may call `service` with `method` on `path`.
    pub fn authorize(&self, service: &str, caller: &Identity, method: &str, path: &str) -> bool {
        let Some(policies) = self.authz.get(service) else {
            return self.mesh.as_ref().is_none_or(|m| m.default_allow);
        };
        let ids: Vec<String> = std::iter::once(caller.node_id())
            .chain(caller.service_ids())
            .collect();
        policies.iter().flat_map(|p| &p.rules).any(|r| {
            let from_ok = r.from.is_empty()
                || r.from
                    .iter()
                    .any(|f| caller.services.iter().any(|s| s == f) || ids.iter().any(|i| i == f));
            let method_ok =
                r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method));
            let path_ok =
                r.paths.is_empty() || r.paths.iter().any(|p| path.starts_with(p.as_str()));
            from_ok && method_ok && path_ok
        })
    }

    /// Rate limits on `service`, each with a key that changes with its version.
    pub fn rate_limits(&self, service: &str) -> &[(String, RateLimit)] {
        self.limits.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Fault injection on `service`.
    pub fn fault(&self, service: &str) -> Option<&FaultInjection> {
        self.faults.get(service)
    }

    /// Mesh defaults, if a MeshConfig is in force.
    pub fn mesh(&self) -> Option<&MeshConfig> {
        self.mesh.as_ref()
    }
}

/// The highest-precedence match among `routes` (in `namespace/name` order).
fn best_match<'s>(
    routes: &[&'s Attached],
    grpc: bool,
    req: &RequestInfo<'_>,
) -> Option<RouteDecision<'s>> {
    let mut best: Option<(Rank, RouteDecision<'s>)> = None;
    for a in routes {
        for rule in a.rules() {
            let candidates: Vec<Option<&RouteMatch>> = if rule.matches.is_empty() {
                vec![None]
            } else {
                rule.matches.iter().map(Some).collect()
            };
            for m in candidates {
                let rank = if grpc {
                    grpc_rank(m, req)
                } else {
                    match_rank(m, req)
                };
                let Some(rank) = rank else {
                    continue;
                };
                if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                    best = Some((
                        rank,
                        RouteDecision {
                            route: &a.name,
                            namespace: &a.namespace,
                            rule,
                            matched: m,
                        },
                    ));
                }
            }
        }
    }
    best.map(|(_, d)| d)
}

/// Precedence of a match. HTTPRoute: path kind (exact 3, regex 2, prefix
/// 1), path length, has method, header count, query count. GRPCRoute: 0,
/// service length, method length, header count, 0.
type Rank = (u8, usize, usize, usize, usize);

fn match_rank(m: Option<&RouteMatch>, req: &RequestInfo<'_>) -> Option<Rank> {
    let Some(m) = m else {
        return Some((1, 1, 0, 0, 0));
    };
    let path_rank = match &m.path {
        None => (1, 1),
        Some(PathMatch::Exact(p)) => {
            if req.path != p {
                return None;
            }
            (3, p.len())
        }
        Some(PathMatch::Prefix(p)) => {
            if !prefix_matches(p, req.path) {
                return None;
            }
            (1, p.len())
        }
        Some(PathMatch::Regex(r)) => {
            if !r.is_match(req.path) {
                return None;
            }
            (2, 0)
        }
    };
    if let Some(method) = &m.method
        && !method.eq_ignore_ascii_case(req.method)
    {
        return None;
    }
    if !headers_match(m, req.headers) {
        return None;
    }
    for (name, cond) in &m.query {
        let ok = req.query.is_some_and(|q| {
            q.split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                k == name && cond.matches(v)
            })
        });
        if !ok {
            return None;
        }
    }
    Some((
        path_rank.0,
        path_rank.1,
        usize::from(m.method.is_some()),
        m.headers.len(),
        m.query.len(),
    ))
}

fn headers_match(m: &RouteMatch, headers: &HeaderMap) -> bool {
    m.headers.iter().all(|(name, cond)| {
        headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| cond.matches(v)))
    })
}

/// A GRPCRoute match against a request whose path is `/<service>/<method>`.
fn grpc_rank(m: Option<&RouteMatch>, req: &RequestInfo<'_>) -> Option<Rank> {
    let Some(m) = m else {
        return Some((0, 0, 0, 0, 0));
    };
    let (mut service_len, mut method_len) = (0, 0);
    if let Some(g) = &m.grpc {
        let (service, method) = req.path.strip_prefix('/')?.split_once('/')?;
        if method.contains('/') {
            return None;
        }
        if let Some(cond) = &g.service {
            if !cond.matches(service) {
                return None;
            }
            if let super::doc::StrMatch::Exact(s) = cond {
                service_len = s.len();
            }
        }
        if let Some(cond) = &g.method {
            if !cond.matches(method) {
                return None;
            }
            if let super::doc::StrMatch::Exact(s) = cond {
                method_len = s.len();
            }
        }
    }
    if !headers_match(m, req.headers) {
        return None;
    }
    Some((0, service_len, method_len, m.headers.len(), 0))
}

/// Gateway API PathPrefix: matches on `/`-separated element boundaries.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let p = prefix.trim_end_matches('/');
    if p.is_empty() {
        return true;
    }
    path == p || (path.starts_with(p) && path[p.len()..].starts_with('/'))
}

/// Token buckets for [`RateLimit`] policies. Lives outside the snapshot so
/// buckets survive unrelated policy changes; a changed RateLimit gets fresh
/// buckets (its key includes its version).
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, String), (f64, Instant)>>,
}

impl RateLimiter {
    /// Takes a token for a request to `service` from `caller` on `path`.
    /// `Err(retry_after)` when a limit is exhausted.
    pub fn check(
        &self,
        set: &PolicySet,
        service: &str,
        caller: &str,
        path: &str,
    ) -> Result<(), Duration> {
        let limits = set.rate_limits(service);
        if limits.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap();
        for (key, l) in limits {
            if l.path_prefix
                .as_ref()
                .is_some_and(|p| !path.starts_with(p.as_str()))
            {
                continue;
            }
            let who = if l.per_caller {
                caller.to_string()
            } else {
                String::new()
            };
            let burst = f64::from(l.burst);
            let b = buckets.entry((key.clone(), who)).or_insert((burst, now));
            b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * l.requests_per_second).min(burst);
            b.1 = now;
            if b.0 < 1.0 {
                let wait = (1.0 - b.0) / l.requests_per_second;
                return Err(Duration::from_secs_f64(wait.max(0.001)));
            }
            b.0 -= 1.0;
        }
        if buckets.len() > 100_000 {
            buckets.retain(|_, (_, t)| now.duration_since(*t) < Duration::from_secs(60));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::PolicyStore;

    fn store_with(docs: &[&str]) -> PolicyStore {
        let store = PolicyStore::open("n1", None).unwrap();
        for d in docs {
            store.put(Document::parse(d).unwrap(), None).unwrap();
        }
        store
    }

    const ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - matches: [{headers: [{name: x-canary, value: \"true\"}]}]\n    backendRefs: [{name: web-v2}]\n  - matches: [{path: {type: Exact, value: /admin}}]\n    backendRefs: [{name: admin}]\n  - backendRefs: [{name: web, weight: 90}, {name: web-v2, weight: 10}]\n";

    #[test]
    fn routes_by_precedence_and_weight() {
        let store = store_with(&[ROUTE]);
        let set = store.snapshot();
        let mut headers = HeaderMap::new();
        let decide = |name: &'static str, h: &HeaderMap, path: &'static str| {
            let mut c = call("default", name, Some(80), path, None, h);
            c.destination.namespace = "default";
            match set.decide(&c) {
                Decision::Route(d) => Some((d.backend(name, 0.95), d.backend(name, 0.5))),
                _ => None,
            }
        };
        let req = |h: &HeaderMap, path: &'static str| decide("web", h, path);
        assert_eq!(req(&headers, "/x"), Some(("web-v2".into(), "web".into())));
        assert_eq!(
            req(&headers, "/admin"),
            Some(("admin".into(), "admin".into()))
        );
        headers.insert("x-canary", "true".parse().unwrap());
        assert_eq!(
            req(&headers, "/x"),
            Some(("web-v2".into(), "web-v2".into()))
        );
        assert!(decide("other", &headers, "/").is_none());
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
    }

    const NS: &str = "gateway-conformance-mesh";

    fn call<'a>(
        caller: &'a str,
        name: &'a str,
        port: Option<u16>,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> Call<'a> {
        Call {
            caller_namespace: caller,
            destination: Destination {
                name,
                namespace: NS,
                port,
            },
            scheme: "http",
            host: name,
            grpc: false,
            request: RequestInfo {
                method: "GET",
                path,
                query,
                headers,
            },
        }
    }

    fn route_doc(name: &str, ns: &str, parent: &str, header: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  parentRefs: [{{name: {parent}, namespace: {NS}}}]\n  rules:\n  - filters: [{{type: ResponseHeaderModifier, responseHeaderModifier: {{set: [{{name: x-route, value: {header}}}]}}}}]\n"
        )
    }

    fn header_of(d: Decision<'_>) -> Option<String> {
        match d {
            Decision::Route(r) => Some(r.rule.response_headers.set[0].1.clone()),
            _ => None,
        }
    }

    /// GEP-1426: a producer route (the service's namespace) applies to every
    /// caller; a consumer route (another namespace) only to callers in its
    /// namespace, and for them it replaces the producer's.
    /// Cases after upstream conformance/tests/mesh/mesh-consumer-route.go.
    #[test]
    fn consumer_routes_apply_to_their_namespace_and_win_there() {
        let store = store_with(&[
            &route_doc("producer", NS, "echo-v1", "producer"),
            &route_doc(
                "consumer",
                "gateway-conformance-mesh-consumer",
                "echo-v1",
                "consumer",
            ),
        ]);
        let set = store.snapshot();
        let h = HeaderMap::new();
        let d = |caller| header_of(set.decide(&call(caller, "echo-v1", Some(80), "/", None, &h)));
        assert_eq!(
            d("gateway-conformance-mesh-consumer").as_deref(),
            Some("consumer")
        );
        assert_eq!(d(NS).as_deref(), Some("producer"));
        assert_eq!(d("elsewhere").as_deref(), Some("producer"));
        // Only the consumer route: other namespaces are unrouted.
        let store = store_with(&[&route_doc(
            "consumer",
            "gateway-conformance-mesh-consumer",
            "echo-v1",
            "consumer",
        )]);
        let set = store.snapshot();
        let d = |caller| set.decide(&call(caller, "echo-v1", Some(80), "/", None, &h));
        assert!(matches!(d(NS), Decision::Unrouted));
        assert!(matches!(
            d("gateway-conformance-mesh-consumer"),
            Decision::Route(_)
        ));
        // Another service, or the same name in another namespace: unrouted.
        assert!(matches!(
            set.decide(&call(NS, "echo-v2", Some(80), "/", None, &h)),
            Decision::Unrouted
        ));
        let mut other = call(NS, "echo-v1", Some(80), "/", None, &h);
        other.destination.namespace = "default";
        assert!(matches!(set.decide(&other), Decision::Unrouted));
    }

    /// `parentRefs[].port` limits a route to that port; without one it
    /// applies to every port. Cases after upstream mesh-ports.go.
    #[test]
    fn parent_ports_limit_routes() {
        let with_port = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: v1, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo-v1, port: 80}}]\n"
        );
        let store = store_with(&[&with_port, &route_doc("v2", NS, "echo-v2", "v2")]);
        let set = store.snapshot();
        let h = HeaderMap::new();
        let routed = |name, port| {
            matches!(
                set.decide(&call(NS, name, port, "/", None, &h)),
                Decision::Route(_)
            )
        };
        assert!(routed("echo-v1", Some(80)));
        assert!(!routed("echo-v1", Some(8080)));
        assert!(routed("echo-v1", None));
        assert!(routed("echo-v2", Some(80)));
        assert!(routed("echo-v2", Some(8080)));
    }

    /// A route attached to a service where no rule matches answers 404
    /// (upstream httproute-query-param-matching.go, the 404 cases).
    #[test]
    fn no_matching_rule_is_no_match_not_fall_through() {
        let doc = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: q, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo, port: 80}}]\n  rules:\n  - matches: [{{queryParams: [{{name: animal, value: whale}}]}}]\n    backendRefs: [{{name: echo-v1, port: 8080}}]\n"
        );
        let store = store_with(&[&doc]);
        let set = store.snapshot();
        let h = HeaderMap::new();
        for q in [
            None,
            Some("color=blue"),
            Some("animal=dog"),
            Some("animal=whaledolphin"),
        ] {
            let d = set.decide(&call(NS, "echo", Some(80), "/", q, &h));
            assert!(
                matches!(d, Decision::NoMatch { route: "q" }),
                "{q:?}: {d:?}"
            );
        }
        let d = set.decide(&call(
            NS,
            "echo",
            Some(80),
            "/",
            Some("animal=whale&x=1"),
            &h,
        ));
        let Decision::Route(r) = d else {
            panic!("{d:?}")
        };
        assert_eq!(r.backend("echo", 0.3), "echo-v1");
    }

    fn grpc_call<'a>(path: &'a str, headers: &'a HeaderMap) -> Call<'a> {
        let mut c = call(NS, "echo", Some(7070), path, None, headers);
        c.grpc = true;
        c
    }

    /// GRPCRoute: service and method matches, precedence by service then
    /// method length then header count; gRPC calls use GRPCRoutes first.
    #[test]
    fn grpc_routes_match_service_and_method() {
        let grpc = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo, port: 7070}}]\n  rules:\n  - matches: [{{method: {{service: echo.Echo}}}}]\n    backendRefs: [{{name: svc-only}}]\n  - matches: [{{method: {{service: echo.Echo, method: Ping}}}}]\n    backendRefs: [{{name: svc-and-method}}]\n  - matches: [{{method: {{method: Ping}}, headers: [{{name: x-v, value: \"2\"}}]}}]\n    backendRefs: [{{name: method-and-header}}]\n  - matches: [{{method: {{type: RegularExpression, service: 'other\\..*'}}}}]\n    backendRefs: [{{name: regex}}]\n"
        );
        let http_route = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: h, namespace: {NS}}}\nspec:\n  parentRefs: [{{name: echo}}]\n  rules:\n  - backendRefs: [{{name: http-only}}]\n"
        );
        let store = store_with(&[&grpc, &http_route]);
        let set = store.snapshot();
        let mut h = HeaderMap::new();
        let to = |c: &Call<'_>| match set.decide(c) {
            Decision::Route(r) => r.backend("echo", 0.5),
            other => format!("{other:?}"),
        };
        assert_eq!(to(&grpc_call("/echo.Echo/Echo", &h)), "svc-only");
        assert_eq!(to(&grpc_call("/echo.Echo/Ping", &h)), "svc-and-method");
        assert_eq!(to(&grpc_call("/other.Svc/Ping", &h)), "regex");
        assert!(to(&grpc_call("/x.Y/Z", &h)).starts_with("NoMatch"));
        h.insert("x-v", "2".parse().unwrap());
        assert_eq!(to(&grpc_call("/x.Y/Ping", &h)), "method-and-header");
        // Service length beats method and headers.
        assert_eq!(to(&grpc_call("/echo.Echo/Ping", &h)), "svc-and-method");
        // Plain HTTP to the same service sees only the HTTPRoute.
        assert_eq!(
            to(&call(NS, "echo", Some(7070), "/echo.Echo/Ping", None, &h)),
            "http-only"
        );
    }

    /// A plan merges the rule's filters with the chosen backend's: the
    /// backend's rewrite wins field by field, header changes apply rule
    /// first, mirrors add up and fractional ones fire by roll.
    #[test]
    fn plans_merge_rule_and_backend_filters() {
        let doc = format!(
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: p, namespace: {NS}}}
spec:
  parentRefs: [{{name: echo}}]
  rules:
  - matches: [{{path: {{value: /api}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{hostname: rule.example, path: {{type: ReplacePrefixMatch, replacePrefixMatch: /v1}}}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {{set: [{{name: x-rule, value: r}}]}}
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: shadow, port: 80}}}}
    backendRefs:
    - name: echo-v2
      namespace: other
      port: 8080
      filters:
      - type: URLRewrite
        urlRewrite: {{hostname: backend.example}}
      - type: RequestHeaderModifier
        requestHeaderModifier: {{add: [{{name: x-backend, value: b}}]}}
      - type: RequestMirror
        requestMirror: {{backendRef: {{name: half}}, percent: 50}}
  - matches: [{{path: {{value: /self}}}}]
"#
        );
        let store = store_with(&[&doc]);
        let set = store.snapshot();
        let h = HeaderMap::new();
        let c = call(NS, "echo", Some(80), "/api/x", Some("q=1"), &h);
        let Decision::Route(d) = set.decide(&c) else {
            panic!()
        };
        let plan = |mirror_roll| match d.plan(&c, 0.0, mirror_roll) {
            Plan::Forward(f) => f,
            other => panic!("{other:?}"),
        };
        let f = plan(0.9);
        assert_eq!(
            f.backend,
            Target {
                name: "echo-v2".into(),
                namespace: "other".into(),
                port: Some(8080)
            }
        );
        assert_eq!(f.host.as_deref(), Some("backend.example"));
        assert_eq!(f.path_and_query.as_deref(), Some("/v1/x?q=1"));
        assert_eq!(f.request_headers.len(), 2);
        assert_eq!(f.request_headers[0].set[0].0, "x-rule");
        assert_eq!(f.request_headers[1].add[0].0, "x-backend");
        assert!(f.response_headers.is_empty());
        let names = |f: &Forward<'_>| {
            f.mirrors
                .iter()
                .map(|m| m.backend.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&f), ["shadow"]);
        assert_eq!(names(&plan(0.2)), ["shadow", "half"]);
        assert_eq!(f.mirrors[0].backend.namespace, NS);
        // No backendRefs: the destination itself, unchanged.
        let c = call(NS, "echo", Some(80), "/self", None, &h);
        let Decision::Route(d) = set.decide(&c) else {
            panic!()
        };
        let Plan::Forward(f) = d.plan(&c, 0.5, 0.5) else {
            panic!()
        };
        assert_eq!(
            f.backend,
            Target {
                name: "echo".into(),
                namespace: NS.into(),
                port: Some(80)
            }
        );
        assert!(f.path_and_query.is_none() && f.host.is_none() && f.mirrors.is_empty());
    }

    #[test]
    fn service_addresses_in_every_form() {
        let a = |s: &str| ServiceAddr::parse(s, "home", 80);
        let sa = |name: &str, ns: &str, port| {
            Some(ServiceAddr {
                name: name.into(),
                namespace: ns.into(),
                port,
            })
        };
        assert_eq!(a("echo"), sa("echo", "home", 80));
        assert_eq!(a("echo:8080"), sa("echo", "home", 8080));
        assert_eq!(a("echo-v1.gateway-conformance-mesh"), sa("echo-v1", NS, 80));
        assert_eq!(a("echo.ns.svc:7070"), sa("echo", "ns", 7070));
        assert_eq!(a("Echo.NS.svc.cluster.local."), sa("echo", "ns", 80));
        assert_eq!(a("echo.shoal"), sa("echo", "home", 80));
        for bad in [
            "10.0.0.7:8080",
            "[::1]:80",
            "echo:x",
            "echo:0",
            "a.b.c.d",
            "",
            "-x",
            "echo.Bad_ns",
        ] {
            assert_eq!(a(bad), None, "{bad}");
        }
    }

    /// The ReplacePrefixMatch table of the Gateway API spec
    /// (HTTPPathModifier) plus the upstream rewrite/redirect cases.
    #[test]
    fn prefix_replacement_on_element_boundaries() {
        let p = |prefix, path, with: &str| {
            modify_path(&PathModifier::Prefix(with.into()), prefix, path)
        };
        for (prefix, path, with, want) in [
            ("/foo", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo", "/foo/bar", "/xyz/", "/xyz/bar"),
            ("/foo/", "/foo/bar", "/xyz", "/xyz/bar"),
            ("/foo/", "/foo/bar", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz"),
            ("/foo", "/foo/", "/xyz", "/xyz/"),
            ("/foo", "/foo/bar", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/foo", "/foo/", "/", "/"),
            ("/", "/foo", "/xyz", "/xyz/foo"),
            ("/prefix/one", "/prefix/one/two", "/one", "/one/two"),
            ("/strip-prefix", "/strip-prefix/three", "/", "/three"),
            ("/strip-prefix", "/strip-prefix", "/", "/"),
            (
                "/original-prefix",
                "/original-prefix/lemon",
                "/replacement-prefix",
                "/replacement-prefix/lemon",
            ),
        ] {
            assert_eq!(p(prefix, path, with), want, "{prefix} {path} {with}");
        }
        assert_eq!(
            modify_path(
                &PathModifier::Full("/one".into()),
                "/full/one",
                "/full/one/two"
            ),
            "/one"
        );
    }

    #[test]
    fn authorization_allows_named_callers_and_honours_the_mesh_default() {
        let caller = |svc: &str| Identity {
            trust_domain: "t".into(),
            node: "n".into(),
            services: vec![svc.into()],
        };
        let store = store_with(&[
            "apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  target: web\n  rules: [{from: [api], methods: [GET]}]\n",
        ]);
        let set = store.snapshot();
        assert!(set.authorize("web", &caller("api"), "GET", "/"));
        assert!(!set.authorize("web", &caller("api"), "POST", "/"));
        assert!(!set.authorize("web", &caller("batch"), "GET", "/"));
        assert!(set.authorize("other", &caller("batch"), "GET", "/"));
        store
            .put(Document::parse("apiVersion: shoal.dev/v1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {defaultAuthorization: deny}\n").unwrap(), None)
            .unwrap();
        assert!(
            !store
                .snapshot()
                .authorize("other", &caller("batch"), "GET", "/")
        );
    }

    #[test]
    fn token_bucket_limits_bursts() {
        let store = store_with(&[
            "apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {name: l}\nspec: {target: web, requestsPerSecond: 1, burst: 3}\n",
        ]);
        let set = store.snapshot();
        let rl = RateLimiter::default();
        for _ in 0..3 {
            assert!(rl.check(&set, "web", "c", "/").is_ok());
        }
        let wait = rl.check(&set, "web", "c", "/").unwrap_err();
        assert!(wait > Duration::from_millis(500));
        assert!(rl.check(&set, "other", "c", "/").is_ok());
    }
}
