//! The applied policy set: an immutable snapshot the data plane reads, and
//! the decisions it answers (route, authorize, rate-limit, fault).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::HeaderMap;
use transport::Identity;

use super::doc::{
    Authorization, Document, FaultInjection, HttpRoute, MeshConfig, PathMatch, RateLimit,
    RouteMatch, RouteRule, Spec,
};
use super::store::Entry;

/// Everything in force on this node at one instant.
#[derive(Debug, Default)]
pub struct PolicySet {
    routes: HashMap<String, Vec<(String, Arc<Document>)>>,
    authz: HashMap<String, Vec<Authorization>>,
    limits: HashMap<String, Vec<(String, RateLimit)>>,
    faults: HashMap<String, FaultInjection>,
    mesh: Option<MeshConfig>,
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

/// The rule a request matched.
#[derive(Debug, Clone, Copy)]
pub struct RouteDecision<'a> {
    /// The HTTPRoute's name.
    pub route: &'a str,
    /// The matched rule.
    pub rule: &'a RouteRule,
}

impl RouteDecision<'_> {
    /// Picks a backend service by weight (`roll` uniform in [0, 1)); the
    /// parent service when the rule names none.
    pub fn backend(&self, parent: &str, roll: f64) -> String {
        let total: u64 = self.rule.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return parent.to_string();
        }
        let mut point = (roll * total as f64) as u64;
        for b in &self.rule.backends {
            if point < u64::from(b.weight) {
                return b.service.clone();
            }
            point -= u64::from(b.weight);
        }
        self.rule
            .backends
            .last()
            .map(|b| b.service.clone())
            .unwrap_or_else(|| parent.to_string())
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
                            .entry(p.clone())
                            .or_default()
                            .push((doc.name.clone(), doc.clone()));
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
            routes.sort_by(|a, b| a.0.cmp(&b.0));
        }
        set
    }

    /// The rule of the highest-precedence match among `service`'s routes
    /// (Gateway API order: exact path, then longest prefix, then method,
    /// then most header matches, then most query matches, then document order).
    pub fn route(&self, service: &str, req: &RequestInfo<'_>) -> Option<RouteDecision<'_>> {
        let routes = self.routes.get(service)?;
        let mut best: Option<(Rank, RouteDecision<'_>)> = None;
        for (name, doc) in routes {
            let Spec::Route(HttpRoute { rules, .. }) = &doc.spec else {
                continue;
            };
            for rule in rules {
                let candidates: Vec<Option<&RouteMatch>> = if rule.matches.is_empty() {
                    vec![None]
                } else {
                    rule.matches.iter().map(Some).collect()
                };
                for m in candidates {
                    let Some(rank) = match_rank(m, req) else {
                        continue;
                    };
                    if best.as_ref().is_none_or(|(r, _)| rank > *r) {
                        best = Some((rank, RouteDecision { route: name, rule }));
                    }
                }
            }
        }
        best.map(|(_, d)| d)
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

/// Precedence of a match: path kind, path length, has method, header count, query count.
type Rank = (u8, usize, bool, usize, usize);

fn match_rank(m: Option<&RouteMatch>, req: &RequestInfo<'_>) -> Option<Rank> {
    let Some(m) = m else {
        return Some((1, 1, false, 0, 0));
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
    for (name, cond) in &m.headers {
        let ok = req
            .headers
            .get_all(name.as_str())
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| cond.matches(v)));
        if !ok {
            return None;
        }
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
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    ))
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
        let req = |h: &HeaderMap, path: &'static str| {
            let info = RequestInfo {
                method: "GET",
                path,
                query: None,
                headers: h,
            };
            set.route("web", &info)
                .map(|d| (d.backend("web", 0.95), d.backend("web", 0.5)))
        };
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
        let info = RequestInfo {
            method: "GET",
            path: "/",
            query: None,
            headers: &headers,
        };
        assert!(set.route("other", &info).is_none());
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apix"));
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
