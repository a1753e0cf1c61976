//! Policy documents: parsing and validation ("parse, don't validate").
//!
//! A document is Kubernetes-shaped (`apiVersion`, `kind`, `metadata.name`,
//! `spec`) in YAML or JSON. [`Document::parse`] either returns a fully valid,
//! typed policy or every problem found, each as `field path: reason`. The
//! data plane only ever sees parsed documents.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use regex::Regex;
use serde_json::{Map, Value};

/// Largest accepted document, in bytes.
pub const MAX_DOCUMENT: usize = 1 << 20;
/// Deepest nesting (maps and lists, flow or block style) a document may have.
/// Checked by a linear scan before any parser runs.
pub const MAX_DEPTH: usize = 64;

/// The policy kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Gateway API `HTTPRoute`, mesh (GAMMA) style.
    HttpRoute,
    /// Gateway API `GRPCRoute`, mesh (GAMMA) style.
    GrpcRoute,
    /// Who may call a service.
    AuthorizationPolicy,
    /// Token bucket on a service, enforced inbound.
    RateLimit,
    /// Delay or abort a share of requests.
    FaultInjection,
    /// Mesh-wide defaults (one document, named `default`).
    MeshConfig,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 6] = [
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::AuthorizationPolicy,
        Kind::RateLimit,
        Kind::FaultInjection,
        Kind::MeshConfig,
    ];

    /// The `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::RateLimit => "RateLimit",
            Kind::FaultInjection => "FaultInjection",
            Kind::MeshConfig => "MeshConfig",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown kind {s:?} (one of HTTPRoute, GRPCRoute, AuthorizationPolicy, RateLimit, FaultInjection, MeshConfig)"
                )
            })
    }
}

/// A valid policy document.
#[derive(Debug, Clone)]
pub struct Document {
    /// Its kind.
    pub kind: Kind,
    /// `metadata.name`.
    pub name: String,
    /// The typed spec.
    pub spec: Spec,
    /// The document as canonical JSON (what is stored, hashed and gossiped).
    pub canonical: String,
}

/// The typed spec of each kind.
#[derive(Debug, Clone)]
pub enum Spec {
    /// HTTPRoute or GRPCRoute ([`HttpRoute::grpc`] tells which).
    Route(HttpRoute),
    /// AuthorizationPolicy.
    Authz(Authorization),
    /// RateLimit.
    RateLimit(RateLimit),
    /// FaultInjection.
    Fault(FaultInjection),
    /// MeshConfig.
    Mesh(MeshConfig),
}

/// The namespace of a document that names none, and of nodes started
/// without `--namespace`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// HTTPRoute or GRPCRoute: routing rules for requests to its parent services.
#[derive(Debug, Clone)]
pub struct HttpRoute {
    /// `metadata.namespace` (default `default`). A route in its parent
    /// service's namespace is a producer route (all callers); in another
    /// namespace, a consumer route (only callers in this namespace).
    pub namespace: String,
    /// Whether this is a GRPCRoute (matches on gRPC service and method).
    pub grpc: bool,
    /// Mesh services this route attaches to (`parentRefs`).
    pub parents: Vec<ParentRef>,
    /// Rules, in document order.
    pub rules: Vec<RouteRule>,
}

/// One `parentRefs[]` entry: a mesh service, optionally one of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentRef {
    /// Service name.
    pub name: String,
    /// Service namespace (default: the route's).
    pub namespace: String,
    /// `port`: the route applies only to calls made to this port.
    pub port: Option<u16>,
}

/// A service a backendRef or mirror names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRef {
    /// Service name.
    pub name: String,
    /// Namespace (default: the route's).
    pub namespace: String,
    /// Port (optional in Shoal).
    pub port: Option<u16>,
}

/// One HTTPRoute / GRPCRoute rule.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// `name` (Gateway API named rules).
    pub name: Option<String>,
    /// Any of these matches selects the rule; empty means "every request".
    pub matches: Vec<RouteMatch>,
    /// Request header changes.
    pub request_headers: HeaderMods,
    /// Response header changes.
    pub response_headers: HeaderMods,
    /// `RequestRedirect`: answer with a redirect instead of forwarding.
    pub redirect: Option<Redirect>,
    /// `URLRewrite`: change the path and/or host before forwarding.
    pub rewrite: Option<Rewrite>,
    /// `RequestMirror`: copies sent fire-and-forget, answers ignored.
    pub mirrors: Vec<Mirror>,
    /// Weighted backends; empty means the parent service itself.
    pub backends: Vec<Backend>,
    /// `timeouts.request`: whole request, retries included.
    pub timeout: Option<Duration>,
    /// `timeouts.backendRequest`: each attempt.
    pub backend_timeout: Option<Duration>,
    /// `retry`.
    pub retry: Option<Retry>,
}

/// Conditions that must all hold.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    /// Path condition.
    pub path: Option<PathMatch>,
    /// Header conditions (lower-case names).
    pub headers: Vec<(String, StrMatch)>,
    /// Query parameter conditions.
    pub query: Vec<(String, StrMatch)>,
    /// HTTP method.
    pub method: Option<String>,
    /// GRPCRoute `method`: gRPC service and method.
    pub grpc: Option<GrpcMethod>,
}

/// A GRPCRoute method condition (the request path is `/<service>/<method>`).
#[derive(Debug, Clone, Default)]
pub struct GrpcMethod {
    /// The fully qualified service, e.g. `grpc.health.v1.Health`.
    pub service: Option<StrMatch>,
    /// The method, e.g. `Check`.
    pub method: Option<StrMatch>,
}

/// A path condition.
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Whole path equals.
    Exact(String),
    /// Path starts with, on segment boundaries.
    Prefix(String),
    /// Whole path matches the regex.
    Regex(Regex),
}

/// A string condition.
#[derive(Debug, Clone)]
pub enum StrMatch {
    /// Equals.
    Exact(String),
    /// Whole value matches.
    Regex(Regex),
}

impl StrMatch {
    /// Whether `v` satisfies the condition.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            StrMatch::Exact(s) => s == v,
            StrMatch::Regex(r) => r.is_match(v),
        }
    }
}

/// Header modifications (Gateway API HTTPHeaderFilter).
#[derive(Debug, Clone, Default)]
pub struct HeaderMods {
    /// Replace or add.
    pub set: Vec<(String, String)>,
    /// Append.
    pub add: Vec<(String, String)>,
    /// Remove.
    pub remove: Vec<String>,
}

impl HeaderMods {
    /// Whether this changes nothing.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

/// `RequestRedirect`.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// `scheme` (`http` or `https`); default: the request's.
    pub scheme: Option<String>,
    /// `hostname`; default: the request's host.
    pub hostname: Option<String>,
    /// `path`; default: the request's path.
    pub path: Option<PathModifier>,
    /// `port`; default: the scheme's well-known port when `scheme` is set,
    /// else the port the caller used.
    pub port: Option<u16>,
    /// `statusCode`: 301, 302 (default), 303, 307 or 308.
    pub status: u16,
}

/// `URLRewrite`.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    /// `hostname`: the Host / `:authority` the backend sees.
    pub hostname: Option<String>,
    /// `path`.
    pub path: Option<PathModifier>,
}

/// `path` of a redirect or rewrite.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathModifier {
    /// `ReplaceFullPath`: the whole path becomes this.
    Full(String),
    /// `ReplacePrefixMatch`: the matched `PathPrefix` is replaced by this.
    Prefix(String),
}

/// `RequestMirror`: a copy of each selected request goes to `backend`.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// Where copies go.
    pub backend: ServiceRef,
    /// Share of requests mirrored, `numerator / denominator` (default 1/1,
    /// from `percent` or `fraction`).
    pub fraction: (u32, u32),
}

impl Mirror {
    /// Whether the request with `roll` (uniform in [0, 1)) is mirrored.
    pub fn fires(&self, roll: f64) -> bool {
        let (n, d) = self.fraction;
        n >= d || roll * f64::from(d) < f64::from(n)
    }
}

/// A weighted backend service.
#[derive(Debug, Clone)]
pub struct Backend {
    /// Service name.
    pub service: String,
    /// Namespace (default: the route's).
    pub namespace: String,
    /// Port (optional in Shoal).
    pub port: Option<u16>,
    /// Relative weight (0 disables).
    pub weight: u32,
    /// `filters` that apply only when this backend is chosen: request headers...
    pub request_headers: HeaderMods,
    /// ...response headers...
    pub response_headers: HeaderMods,
    /// ...a rewrite (overrides the rule's, field by field)...
    pub rewrite: Option<Rewrite>,
    /// ...and mirrors.
    pub mirrors: Vec<Mirror>,
}

/// Retry settings of a rule.
#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first attempt (0..=10).
    pub attempts: u32,
    /// Response codes that are retried (empty: 502, 503, 504 and connection failures).
    pub codes: Vec<u16>,
    /// Base backoff.
    pub backoff: Option<Duration>,
}

/// AuthorizationPolicy: who may call a service.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// Target service.
    pub target: String,
    /// Allow rules; a request is allowed if any rule matches.
    pub rules: Vec<AuthzRule>,
}

/// One allow rule.
#[derive(Debug, Clone)]
pub struct AuthzRule {
    /// Caller service names or SPIFFE IDs (empty: any mesh caller).
    pub from: Vec<String>,
    /// Methods (empty: any).
    pub methods: Vec<String>,
    /// Path prefixes (empty: any).
    pub paths: Vec<String>,
}

/// RateLimit: a token bucket.
#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Target service.
    pub target: String,
    /// Sustained rate.
    pub requests_per_second: f64,
    /// Bucket size.
    pub burst: u32,
    /// One bucket per caller identity instead of one for all.
    pub per_caller: bool,
    /// Only requests whose path starts with this.
    pub path_prefix: Option<String>,
}

/// FaultInjection.
#[derive(Debug, Clone)]
pub struct FaultInjection {
    /// Target service.
    pub target: String,
    /// Delay `percent`% of requests by `duration`.
    pub delay: Option<(f64, Duration)>,
    /// Abort `percent`% of requests with `status`.
    pub abort: Option<(f64, u16)>,
}

/// MeshConfig defaults.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    /// Default request timeout.
    pub request_timeout: Option<Duration>,
    /// Retry budget: retries may add this share of requests...
    pub retry_budget_percent: Option<f64>,
    /// ...plus this many per second.
    pub retry_budget_min_per_second: Option<u32>,
    /// Whether services no AuthorizationPolicy names accept any mesh caller.
    pub default_allow: bool,
}

/// Why a document was refused: every problem, `path: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("; "))
    }
}

impl std::error::Error for Problems {}

impl Document {
    /// Parses YAML or JSON text into a valid document.
    pub fn parse(text: &str) -> Result<Self, Problems> {
        if text.len() > MAX_DOCUMENT {
            return Err(Problems(vec![format!(
                "document: larger than {MAX_DOCUMENT} bytes"
            )]));
        }
        if exceeds_depth(text, MAX_DEPTH) {
            return Err(Problems(vec![format!(
                "document: nested deeper than {MAX_DEPTH} levels"
            )]));
        }
        let value: Value = if text.trim_start().starts_with('{') {
            serde_json::from_str(text)
                .map_err(|e| Problems(vec![format!("document: invalid JSON: {e}")]))?
        } else {
            serde_yaml::from_str(text)
                .map_err(|e| Problems(vec![format!("document: invalid YAML: {e}")]))?
        };
        Self::from_value(value)
    }

    /// Validates an already-decoded document.
    pub fn from_value(value: Value) -> Result<Self, Problems> {
        let mut p = Parser::default();
        let doc = p.document(&value);
        match doc {
            Some(d) if p.errors.is_empty() => Ok(d),
            _ => {
                if p.errors.is_empty() {
                    p.errors.push("document: invalid".into());
                }
                Err(Problems(p.errors))
            }
        }
    }

    /// A tombstone-free display id, `Kind/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }
}

/// Whether `text` nests deeper than `max`, by one linear scan that
/// over-approximates YAML and JSON nesting: open brackets outside quotes and
/// comments (flow style) plus the block-indentation levels and `- ` entries
/// in force on each line. Legitimate policies nest a dozen levels at most.
fn exceeds_depth(text: &str, max: usize) -> bool {
    let mut flow = 0usize;
    let mut indents: Vec<usize> = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim_start_matches([' ', '\t']);
        if flow == 0 && !trimmed.is_empty() && !trimmed.starts_with('#') {
            let indent = line.len() - trimmed.len();
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - - x` opens one sequence per dash on one line.
            let mut rest = trimmed;
            let mut dashes = 0;
            while let Some(r) = rest.strip_prefix('-') {
                if !(r.is_empty() || r.starts_with([' ', '\t'])) {
                    break;
                }
                dashes += 1;
                rest = r.trim_start_matches([' ', '\t']);
            }
            if indents.len() + dashes > max {
                return true;
            }
        }
        let mut quote: Option<char> = None;
        let mut escaped = false;
        // Quotes open a string only where a scalar can start (YAML plain
        // scalars may contain `'`); `#` starts a comment only after a space.
        let mut prev = ' ';
        for c in trimmed.chars() {
            let at_start = matches!(prev, ' ' | '\t' | '[' | '{' | ',' | ':');
            let was = prev;
            prev = c;
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' && q == '"' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                    }
                }
                None => match c {
                    '"' | '\'' if at_start => quote = Some(c),
                    '#' if matches!(was, ' ' | '\t') => break,
                    '[' | '{' => {
                        flow += 1;
                        if flow + indents.len() > max {
                            return true;
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
        }
    }
    false
}

#[derive(Default)]
struct Parser {
    errors: Vec<String>,
}

type Obj = Map<String, Value>;

impl Parser {
    fn err(&mut self, path: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    /// An object with only `allowed` keys.
    fn obj<'v>(&mut self, v: &'v Value, path: &str, allowed: &[&str]) -> Option<&'v Obj> {
        let Some(m) = v.as_object() else {
            self.err(path, "must be an object");
            return None;
        };
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                let p = join(path, k);
                self.err(
                    &p,
                    format!("unknown field (expected one of: {})", allowed.join(", ")),
                );
            }
        }
        Some(m)
    }

    fn string(&mut self, m: &Obj, key: &str, path: &str, required: bool) -> Option<String> {
        let p = join(path, key);
        match m.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.err(&p, "required");
                }
                None
            }
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => {
                self.err(&p, "must be a string");
                None
            }
        }
    }

    fn name(&mut self, m: &Obj, key: &str, path: &str, required: bool) -> Option<String> {
        let s = self.string(m, key, path, required)?;
        if valid_name(&s) {
            Some(s)
        } else {
            self.err(
                &join(path, key),
                format!("{s:?} is not a valid name (letters, digits, '-', '_', '.'; 1-63 chars)"),
            );
            None
        }
    }

    fn array<'v>(&mut self, m: &'v Obj, key: &str, path: &str) -> Vec<(String, &'v Value)> {
        match m.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{}[{i}]", join(path, key)), v))
                .collect(),
            Some(_) => {
                self.err(&join(path, key), "must be a list");
                Vec::new()
            }
        }
    }

    fn strings(&mut self, m: &Obj, key: &str, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (p, v) in self.array(m, key, path) {
            match v.as_str() {
                Some(s) => out.push(s.to_string()),
                None => self.err(&p, "must be a string"),
            }
        }
        out
    }

    fn number(&mut self, m: &Obj, key: &str, path: &str, range: (f64, f64)) -> Option<f64> {
        let p = join(path, key);
        let v = m.get(key)?;
        match v.as_f64() {
            Some(n) if n >= range.0 && n <= range.1 => Some(n),
            Some(n) => {
                self.err(&p, format!("{n} out of range ({} to {})", range.0, range.1));
                None
            }
            None => {
                self.err(&p, "must be a number");
                None
            }
        }
    }

    fn integer(&mut self, m: &Obj, key: &str, path: &str, range: (u64, u64)) -> Option<u64> {
        let p = join(path, key);
        let v = m.get(key)?;
        match v.as_u64() {
            Some(n) if n >= range.0 && n <= range.1 => Some(n),
            Some(n) => {
                self.err(&p, format!("{n} out of range ({} to {})", range.0, range.1));
                None
            }
            None => {
                self.err(&p, "must be a whole number");
                None
            }
        }
    }

    fn duration(&mut self, m: &Obj, key: &str, path: &str) -> Option<Duration> {
        let s = self.string(m, key, path, false)?;
        match parse_gateway_duration(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(&join(path, key), e);
                None
            }
        }
    }

    fn regex(&mut self, pattern: &str, path: &str) -> Option<Regex> {
        match Regex::new(&format!("^(?:{pattern})$")) {
            Ok(r) => Some(r),
            Err(e) => {
                let msg = e.to_string().replace('\n', " ");
                self.err(path, format!("bad regular expression: {msg}"));
                None
            }
        }
    }

    fn document(&mut self, v: &Value) -> Option<Document> {
        let m = self.obj(
            v,
            "document",
            &["apiVersion", "kind", "metadata", "spec", "status"],
        )?;
        let kind_s = self.string(m, "kind", "", true);
        let kind = kind_s.and_then(|k| match k.parse::<Kind>() {
            Ok(k) => Some(k),
            Err(e) => {
                self.err("kind", e);
                None
            }
        });
        let api = self.string(m, "apiVersion", "", true);
        if let (Some(kind), Some(api)) = (kind, &api) {
            let ok: &[&str] = match kind {
                Kind::HttpRoute => &[
                    "gateway.networking.k8s.io/v1",
                    "gateway.networking.k8s.io/v1beta1",
                ],
                Kind::GrpcRoute => &[
                    "gateway.networking.k8s.io/v1",
                    "gateway.networking.k8s.io/v1alpha2",
                ],
                _ => &["shoal.dev/v1"],
            };
            if !ok.contains(&api.as_str()) {
                self.err(
                    "apiVersion",
                    format!("{api:?} is not served for {kind} (use {})", ok[0]),
                );
            }
        }
        let (mut name, mut namespace) = (None, None);
        match m.get("metadata") {
            Some(md) => {
                if let Some(md) = self.obj(
                    md,
                    "metadata",
                    &["name", "namespace", "labels", "annotations"],
                ) {
                    name = self.name(md, "name", "metadata", true);
                    namespace = self.namespace(md, "namespace", "metadata");
                }
            }
            None => self.err("metadata", "required"),
        }
        let namespace = namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
        let Some(spec_v) = m.get("spec") else {
            self.err("spec", "required");
            return None;
        };
        let kind = kind?;
        let spec = match kind {
            Kind::HttpRoute => self.route(spec_v, &namespace, false).map(Spec::Route),
            Kind::GrpcRoute => self.route(spec_v, &namespace, true).map(Spec::Route),
            Kind::AuthorizationPolicy => self.authz(spec_v).map(Spec::Authz),
            Kind::RateLimit => self.rate_limit(spec_v).map(Spec::RateLimit),
            Kind::FaultInjection => self.fault(spec_v).map(Spec::Fault),
            Kind::MeshConfig => self.mesh(spec_v).map(Spec::Mesh),
        };
        let name = name?;
        if kind == Kind::MeshConfig && name != "default" {
            self.err(
                "metadata.name",
                "a mesh has one MeshConfig, named \"default\"",
            );
        }
        let mut canonical_v = v.clone();
        if let Some(o) = canonical_v.as_object_mut() {
            o.remove("status");
        }
        Some(Document {
            kind,
            name,
            spec: spec?,
            canonical: serde_json::to_string(&canonical_v).unwrap_or_default(),
        })
    }

    /// An optional Kubernetes namespace (a DNS label).
    fn namespace(&mut self, m: &Obj, key: &str, path: &str) -> Option<String> {
        let s = self.string(m, key, path, false)?;
        if valid_namespace(&s) {
            Some(s)
        } else {
            self.err(
                &join(path, key),
                format!(
                    "{s:?} is not a valid namespace (lower-case letters, digits, '-'; 1-63 chars)"
                ),
            );
            None
        }
    }

    fn port(&mut self, o: &Obj, p: &str) -> Option<u16> {
        self.integer(o, "port", p, (1, 65535)).map(|n| n as u16)
    }

    fn route(&mut self, v: &Value, namespace: &str, grpc: bool) -> Option<HttpRoute> {
        let m = self.obj(v, "spec", &["parentRefs", "hostnames", "rules"])?;
        if m.get("hostnames")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            self.err(
                "spec.hostnames",
                "not supported for mesh routes (route by parentRefs)",
            );
        }
        let mut parents = Vec::new();
        let refs = self.array(m, "parentRefs", "spec");
        if refs.is_empty() {
            self.err("spec.parentRefs", "at least one mesh service is required");
        }
        for (p, r) in refs {
            let Some(o) = self.obj(
                r,
                &p,
                &["name", "kind", "group", "namespace", "port", "sectionName"],
            ) else {
                continue;
            };
            self.service_ref_kind(o, &p);
            if o.contains_key("sectionName") {
                self.err(&join(&p, "sectionName"), "not supported for mesh routes");
            }
            let port = self.port(o, &p);
            let ns = self.namespace(o, "namespace", &p);
            if let Some(name) = self.name(o, "name", &p, true) {
                let parent = ParentRef {
                    name,
                    namespace: ns.unwrap_or_else(|| namespace.to_string()),
                    port,
                };
                if parents.contains(&parent) {
                    self.err(&p, "the same service and port twice");
                } else {
                    parents.push(parent);
                }
            }
        }
        let mut rules = Vec::new();
        let rule_vals = self.array(m, "rules", "spec");
        if rule_vals.len() > 64 {
            self.err("spec.rules", "at most 64 rules");
        }
        let mut names = Vec::new();
        for (p, r) in rule_vals {
            if let Some(rule) = self.rule(r, &p, namespace, grpc) {
                if let Some(n) = &rule.name {
                    if names.contains(n) {
                        self.err(&join(&p, "name"), format!("{n:?} names another rule too"));
                    }
                    names.push(n.clone());
                }
                rules.push(rule);
            }
        }
        if rules.is_empty() && self.errors.is_empty() {
            rules.push(RouteRule {
                name: None,
                matches: Vec::new(),
                request_headers: HeaderMods::default(),
                response_headers: HeaderMods::default(),
                redirect: None,
                rewrite: None,
                mirrors: Vec::new(),
                backends: Vec::new(),
                timeout: None,
                backend_timeout: None,
                retry: None,
            });
        }
        Some(HttpRoute {
            namespace: namespace.to_string(),
            grpc,
            parents,
            rules,
        })
    }

    fn service_ref_kind(&mut self, o: &Obj, p: &str) {
        if let Some(k) = self.string(o, "kind", p, false)
            && k != "Service"
        {
            self.err(
                &join(p, "kind"),
                format!("{k:?} not supported (only Service)"),
            );
        }
        if let Some(g) = self.string(o, "group", p, false)
            && !g.is_empty()
            && g != "core"
        {
            self.err(
                &join(p, "group"),
                format!("{g:?} not supported (only the core group)"),
            );
        }
    }

    fn rule(&mut self, v: &Value, path: &str, namespace: &str, grpc: bool) -> Option<RouteRule> {
        let allowed: &[&str] = if grpc {
            &[
                "name",
                "matches",
                "filters",
                "backendRefs",
                "sessionPersistence",
            ]
        } else {
            &[
                "name",
                "matches",
                "filters",
                "backendRefs",
                "timeouts",
                "retry",
                "sessionPersistence",
            ]
        };
        let m = self.obj(v, path, allowed)?;
        if m.contains_key("sessionPersistence") {
            self.err(&join(path, "sessionPersistence"), "not supported by Shoal");
        }
        let name = self.string(m, "name", path, false);
        if let Some(n) = &name
            && !valid_namespace(n)
        {
            self.err(
                &join(path, "name"),
                format!(
                    "{n:?} is not a valid rule name (lower-case letters, digits, '-'; 1-63 chars)"
                ),
            );
        }
        let mut matches = Vec::new();
        let match_vals = self.array(m, "matches", path);
        if match_vals.len() > 64 {
            self.err(&join(path, "matches"), "at most 64 matches");
        }
        for (p, mv) in match_vals {
            let x = if grpc {
                self.grpc_match(mv, &p)
            } else {
                self.route_match(mv, &p)
            };
            if let Some(x) = x {
                matches.push(x);
            }
        }
        let place = if grpc {
            Place::GrpcRule
        } else {
            Place::HttpRule
        };
        let filters = self.filters(m, path, namespace, place);
        let mut backends = Vec::new();
        let refs = self.array(m, "backendRefs", path);
        for (p, b) in &refs {
            let Some(o) = self.obj(
                b,
                p,
                &[
                    "name",
                    "kind",
                    "group",
                    "namespace",
                    "port",
                    "weight",
                    "filters",
                ],
            ) else {
                continue;
            };
            self.service_ref_kind(o, p);
            let port = self.port(o, p);
            let ns = self.namespace(o, "namespace", p);
            let weight = self.integer(o, "weight", p, (0, 1_000_000)).unwrap_or(1) as u32;
            let place = if grpc {
                Place::GrpcBackend
            } else {
                Place::HttpBackend
            };
            let bf = self.filters(o, p, namespace, place);
            if bf
                .rewrite
                .as_ref()
                .is_some_and(|r| matches!(r.path, Some(PathModifier::Prefix(_))))
            {
                self.prefix_rewrite_needs_prefix_match(&matches, &join(p, "filters"));
            }
            if let Some(service) = self.name(o, "name", p, true) {
                backends.push(Backend {
                    service,
                    namespace: ns.unwrap_or_else(|| namespace.to_string()),
                    port,
                    weight,
                    request_headers: bf.request_headers,
                    response_headers: bf.response_headers,
                    rewrite: bf.rewrite,
                    mirrors: bf.mirrors,
                });
            }
        }
        if !refs.is_empty()
            && backends.len() == refs.len()
            && backends.iter().all(|b| b.weight == 0)
        {
            self.err(&join(path, "backendRefs"), "weights are all zero");
        }
        if filters.redirect.is_some() && !refs.is_empty() {
            self.err(
                &join(path, "backendRefs"),
                "must be empty when the rule has a RequestRedirect filter (a redirect answers without a backend)",
            );
        }
        if filters.redirect.is_some() && filters.rewrite.is_some() {
            self.err(
                &join(path, "filters"),
                "RequestRedirect and URLRewrite cannot both be used in one rule",
            );
        }
        let prefix_redirect = filters
            .redirect
            .as_ref()
            .is_some_and(|r| matches!(r.path, Some(PathModifier::Prefix(_))));
        let prefix_rewrite = filters
            .rewrite
            .as_ref()
            .is_some_and(|r| matches!(r.path, Some(PathModifier::Prefix(_))));
        if prefix_redirect || prefix_rewrite {
            self.prefix_rewrite_needs_prefix_match(&matches, &join(path, "filters"));
        }
        let (mut timeout, mut backend_timeout) = (None, None);
        if let Some(t) = m.get("timeouts") {
            let tp = join(path, "timeouts");
            if let Some(o) = self.obj(t, &tp, &["request", "backendRequest"]) {
                timeout = self.duration(o, "request", &tp);
                backend_timeout = self.duration(o, "backendRequest", &tp);
                if let (Some(r), Some(b)) = (timeout, backend_timeout)
                    && b > r
                {
                    self.err(
                        &join(&tp, "backendRequest"),
                        "must not exceed timeouts.request",
                    );
                }
            }
        }
        let mut retry = None;
        if let Some(r) = m.get("retry") {
            let rp = join(path, "retry");
            if let Some(o) = self.obj(r, &rp, &["attempts", "codes", "backoff"]) {
                let attempts = self.integer(o, "attempts", &rp, (0, 10)).unwrap_or(1) as u32;
                let mut codes = Vec::new();
                for (p, c) in self.array(o, "codes", &rp) {
                    match c.as_u64() {
                        Some(c @ 400..=599) => codes.push(c as u16),
                        _ => self.err(&p, "must be an HTTP status from 400 to 599"),
                    }
                }
                let backoff = self.duration(o, "backoff", &rp);
                retry = Some(Retry {
                    attempts,
                    codes,
                    backoff,
                });
            }
        }
        Some(RouteRule {
            name,
            matches,
            request_headers: filters.request_headers,
            response_headers: filters.response_headers,
            redirect: filters.redirect,
            rewrite: filters.rewrite,
            mirrors: filters.mirrors,
            backends,
            timeout,
            backend_timeout,
            retry,
        })
    }

    /// `ReplacePrefixMatch` replaces the matched prefix, so the rule must
    /// have exactly one match and it must be a `PathPrefix` (an omitted
    /// match or path is `PathPrefix /`).
    fn prefix_rewrite_needs_prefix_match(&mut self, matches: &[RouteMatch], path: &str) {
        let ok = match matches {
            [] => true,
            [m] => matches!(m.path, None | Some(PathMatch::Prefix(_))),
            _ => false,
        };
        if !ok {
            self.err(
                path,
                "path.replacePrefixMatch needs exactly one match, with a PathPrefix path",
            );
        }
    }

    /// A `filters` list, with the types allowed at `place`.
    fn filters(&mut self, m: &Obj, path: &str, namespace: &str, place: Place) -> Filters {
        const FIELDS: [(&str, &str); 5] = [
            ("RequestHeaderModifier", "requestHeaderModifier"),
            ("ResponseHeaderModifier", "responseHeaderModifier"),
            ("RequestRedirect", "requestRedirect"),
            ("URLRewrite", "urlRewrite"),
            ("RequestMirror", "requestMirror"),
        ];
        let mut out = Filters::default();
        let mut seen: Vec<String> = Vec::new();
        for (p, f) in self.array(m, "filters", path) {
            let Some(o) = self.obj(
                f,
                &p,
                &[
                    "type",
                    "requestHeaderModifier",
                    "responseHeaderModifier",
                    "requestRedirect",
                    "urlRewrite",
                    "requestMirror",
                    "extensionRef",
                    "cors",
                    "externalAuth",
                ],
            ) else {
                continue;
            };
            let Some(ty) = self.string(o, "type", &p, true) else {
                continue;
            };
            let tp = join(&p, "type");
            let field = FIELDS.iter().find(|(t, _)| *t == ty).map(|(_, f)| *f);
            // A filter's settings live in the field named after its type only.
            for (t, f) in FIELDS {
                if t != ty && o.contains_key(f) {
                    self.err(&join(&p, f), format!("must not be set for type {ty}"));
                }
            }
            let allowed = place.allowed();
            match field {
                None => {
                    let why = match ty.as_str() {
                        "ExtensionRef" => "not supported by Shoal".to_string(),
                        "CORS" | "ExternalAuth" => {
                            "experimental, not supported by Shoal".to_string()
                        }
                        _ => format!("unknown filter type (one of {})", allowed.join(", ")),
                    };
                    self.err(&tp, format!("{ty:?} {why}"));
                    continue;
                }
                Some(_) if !allowed.contains(&ty.as_str()) => {
                    self.err(
                        &tp,
                        format!(
                            "{ty:?} not allowed in {} (one of {})",
                            place.what(),
                            allowed.join(", ")
                        ),
                    );
                    continue;
                }
                Some(_) => {}
            }
            if ty != "RequestMirror" {
                if seen.contains(&ty) {
                    self.err(&tp, format!("{ty} may appear once per filters list"));
                    continue;
                }
                seen.push(ty.clone());
            }
            let field = field.unwrap_or_default();
            let fp = join(&p, field);
            let Some(body) = o.get(field) else {
                self.err(&fp, "required for this type");
                continue;
            };
            match ty.as_str() {
                "RequestHeaderModifier" => out.request_headers = self.header_mods(body, &fp),
                "ResponseHeaderModifier" => out.response_headers = self.header_mods(body, &fp),
                "RequestRedirect" => out.redirect = self.redirect(body, &fp),
                "URLRewrite" => out.rewrite = self.rewrite(body, &fp),
                _ => {
                    if let Some(mirror) = self.mirror(body, &fp, namespace) {
                        out.mirrors.push(mirror);
                    }
                }
            }
        }
        out
    }

    fn redirect(&mut self, v: &Value, path: &str) -> Option<Redirect> {
        let o = self.obj(
            v,
            path,
            &["scheme", "hostname", "path", "port", "statusCode"],
        )?;
        let scheme = self.string(o, "scheme", path, false);
        if let Some(s) = &scheme
            && s != "http"
            && s != "https"
        {
            self.err(&join(path, "scheme"), format!("{s:?} (http or https)"));
        }
        let hostname = self.hostname(o, path);
        let port = self.port(o, path);
        let status = match o.get("statusCode") {
            None | Some(Value::Null) => 302,
            Some(v) => match v.as_u64() {
                Some(c @ (301 | 302 | 303 | 307 | 308)) => c as u16,
                _ => {
                    self.err(
                        &join(path, "statusCode"),
                        format!("{v} not supported (301, 302, 303, 307 or 308)"),
                    );
                    302
                }
            },
        };
        let rpath = match o.get("path") {
            Some(pv) => self.path_modifier(pv, &join(path, "path")),
            None => None,
        };
        Some(Redirect {
            scheme,
            hostname,
            path: rpath,
            port,
            status,
        })
    }

    fn rewrite(&mut self, v: &Value, path: &str) -> Option<Rewrite> {
        let o = self.obj(v, path, &["hostname", "path"])?;
        let hostname = self.hostname(o, path);
        let rpath = match o.get("path") {
            Some(pv) => self.path_modifier(pv, &join(path, "path")),
            None => None,
        };
        Some(Rewrite {
            hostname,
            path: rpath,
        })
    }

    /// A precise hostname (RFC 1123, lower case, no wildcard).
    fn hostname(&mut self, o: &Obj, path: &str) -> Option<String> {
        let h = self.string(o, "hostname", path, false)?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if h.len() <= 253 && h.split('.').all(label_ok) {
            Some(h)
        } else {
            self.err(
                &join(path, "hostname"),
                format!("{h:?} is not a precise hostname (RFC 1123, lower case, no wildcard)"),
            );
            None
        }
    }

    fn path_modifier(&mut self, v: &Value, path: &str) -> Option<PathModifier> {
        let o = self.obj(v, path, &["type", "replaceFullPath", "replacePrefixMatch"])?;
        let ty = self.string(o, "type", path, true)?;
        let (key, other) = match ty.as_str() {
            "ReplaceFullPath" => ("replaceFullPath", "replacePrefixMatch"),
            "ReplacePrefixMatch" => ("replacePrefixMatch", "replaceFullPath"),
            _ => {
                self.err(
                    &join(path, "type"),
                    format!("{ty:?} (ReplaceFullPath or ReplacePrefixMatch)"),
                );
                return None;
            }
        };
        if o.contains_key(other) {
            self.err(&join(path, other), format!("must not be set for type {ty}"));
        }
        let kp = join(path, key);
        let value = self.string(o, key, path, true)?;
        let valid = value.starts_with('/')
            && value.len() <= 1024
            && !value.contains(['?', '#'])
            && http::uri::PathAndQuery::from_str(&value).is_ok();
        if !valid {
            self.err(
                &kp,
                format!(
                    "{value:?} is not a path (starts with '/', no '?' or '#', at most 1024 bytes)"
                ),
            );
            return None;
        }
        Some(if key == "replaceFullPath" {
            PathModifier::Full(value)
        } else {
            PathModifier::Prefix(value)
        })
    }

    fn mirror(&mut self, v: &Value, path: &str, namespace: &str) -> Option<Mirror> {
        let o = self.obj(v, path, &["backendRef", "percent", "fraction"])?;
        let bp = join(path, "backendRef");
        let backend = match o.get("backendRef") {
            Some(b) => {
                let bo = self.obj(b, &bp, &["name", "namespace", "port", "group", "kind"])?;
                self.service_ref_kind(bo, &bp);
                let port = self.port(bo, &bp);
                let ns = self.namespace(bo, "namespace", &bp);
                let name = self.name(bo, "name", &bp, true)?;
                ServiceRef {
                    name,
                    namespace: ns.unwrap_or_else(|| namespace.to_string()),
                    port,
                }
            }
            None => {
                self.err(&bp, "required");
                return None;
            }
        };
        let mut fraction = (1, 1);
        if o.contains_key("percent") && o.contains_key("fraction") {
            self.err(path, "percent and fraction are exclusive");
        }
        if let Some(p) = self.integer(o, "percent", path, (0, 100)) {
            fraction = (p as u32, 100);
        }
        if let Some(f) = o.get("fraction") {
            let fp = join(path, "fraction");
            if let Some(fo) = self.obj(f, &fp, &["numerator", "denominator"]) {
                let n = self.integer(fo, "numerator", &fp, (0, 1_000_000));
                if !fo.contains_key("numerator") {
                    self.err(&join(&fp, "numerator"), "required");
                }
                let d = self
                    .integer(fo, "denominator", &fp, (1, 1_000_000))
                    .unwrap_or(100);
                if let Some(n) = n {
                    if n > d {
                        self.err(&fp, "numerator must not exceed denominator");
                    }
                    fraction = (n as u32, d as u32);
                }
            }
        }
        Some(Mirror { backend, fraction })
    }

    fn route_match(&mut self, v: &Value, path: &str) -> Option<RouteMatch> {
        let m = self.obj(v, path, &["path", "headers", "queryParams", "method"])?;
        let mut out = RouteMatch::default();
        if let Some(pv) = m.get("path") {
            let pp = join(path, "path");
            if let Some(o) = self.obj(pv, &pp, &["type", "value"]) {
                let ty = self
                    .string(o, "type", &pp, false)
                    .unwrap_or("PathPrefix".into());
                let value = self.string(o, "value", &pp, false).unwrap_or("/".into());
                let vp = join(&pp, "value");
                if ty != "RegularExpression" && !value.starts_with('/') {
                    self.err(&vp, "must start with '/'");
                }
                out.path = match ty.as_str() {
                    "Exact" => Some(PathMatch::Exact(value)),
                    "PathPrefix" => Some(PathMatch::Prefix(value)),
                    "RegularExpression" => self.regex(&value, &vp).map(PathMatch::Regex),
                    other => {
                        self.err(
                            &join(&pp, "type"),
                            format!("{other:?} (Exact, PathPrefix, RegularExpression)"),
                        );
                        None
                    }
                };
            }
        }
        out.headers = self.header_matches(m, "headers", path, true);
        out.query = self.header_matches(m, "queryParams", path, false);
        if let Some(method) = self.string(m, "method", path, false) {
            const METHODS: [&str; 9] = [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
            ];
            if METHODS.contains(&method.as_str()) {
                out.method = Some(method);
            } else {
                self.err(
                    &join(path, "method"),
                    format!("{method:?} is not an HTTP method"),
                );
            }
        }
        Some(out)
    }

    /// `headers` or `queryParams` conditions (header names lower-cased).
    fn header_matches(
        &mut self,
        m: &Obj,
        key: &str,
        path: &str,
        header: bool,
    ) -> Vec<(String, StrMatch)> {
        let mut out = Vec::new();
        for (p, h) in self.array(m, key, path) {
            let Some(o) = self.obj(h, &p, &["type", "name", "value"]) else {
                continue;
            };
            let ty = self.string(o, "type", &p, false).unwrap_or("Exact".into());
            let (Some(name), Some(value)) = (
                self.string(o, "name", &p, true),
                self.string(o, "value", &p, true),
            ) else {
                continue;
            };
            let cond = match ty.as_str() {
                "Exact" => Some(StrMatch::Exact(value)),
                "RegularExpression" => self.regex(&value, &join(&p, "value")).map(StrMatch::Regex),
                other => {
                    self.err(
                        &join(&p, "type"),
                        format!("{other:?} (Exact, RegularExpression)"),
                    );
                    None
                }
            };
            if let Some(c) = cond {
                if header {
                    out.push((name.to_ascii_lowercase(), c));
                } else {
                    out.push((name, c));
                }
            }
        }
        out
    }

    /// A GRPCRoute match: `method` (service and/or method) and `headers`.
    fn grpc_match(&mut self, v: &Value, path: &str) -> Option<RouteMatch> {
        let m = self.obj(v, path, &["method", "headers"])?;
        let mut out = RouteMatch {
            headers: self.header_matches(m, "headers", path, true),
            ..RouteMatch::default()
        };
        if let Some(mv) = m.get("method") {
            let mp = join(path, "method");
            if let Some(o) = self.obj(mv, &mp, &["type", "service", "method"]) {
                let ty = self.string(o, "type", &mp, false).unwrap_or("Exact".into());
                let service = self.string(o, "service", &mp, false);
                let method = self.string(o, "method", &mp, false);
                if service.is_none() && method.is_none() {
                    self.err(&mp, "needs service, method or both");
                }
                let mut g = GrpcMethod::default();
                match ty.as_str() {
                    "Exact" => {
                        if let Some(s) = service {
                            if valid_grpc_service(&s) {
                                g.service = Some(StrMatch::Exact(s));
                            } else {
                                self.err(
                                    &join(&mp, "service"),
                                    format!(
                                        "{s:?} is not a gRPC service name (e.g. pkg.v1.Service)"
                                    ),
                                );
                            }
                        }
                        if let Some(s) = method {
                            if valid_grpc_method(&s) {
                                g.method = Some(StrMatch::Exact(s));
                            } else {
                                self.err(
                                    &join(&mp, "method"),
                                    format!("{s:?} is not a gRPC method name"),
                                );
                            }
                        }
                    }
                    "RegularExpression" => {
                        g.service = service
                            .and_then(|s| self.regex(&s, &join(&mp, "service")))
                            .map(StrMatch::Regex);
                        g.method = method
                            .and_then(|s| self.regex(&s, &join(&mp, "method")))
                            .map(StrMatch::Regex);
                    }
                    other => self.err(
                        &join(&mp, "type"),
                        format!("{other:?} (Exact, RegularExpression)"),
                    ),
                }
                out.grpc = Some(g);
            }
        }
        Some(out)
    }

    fn header_mods(&mut self, v: &Value, path: &str) -> HeaderMods {
        let mut out = HeaderMods::default();
        let Some(m) = self.obj(v, path, &["set", "add", "remove"]) else {
            return out;
        };
        for (key, list) in [("set", &mut out.set), ("add", &mut out.add)] {
            let items = self.array(m, key, path);
            for (p, h) in items {
                let Some(o) = self.obj(h, &p, &["name", "value"]) else {
                    continue;
                };
                let name = self.string(o, "name", &p, true);
                let value = self.string(o, "value", &p, true);
                if let (Some(n), Some(v)) = (name, value) {
                    if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                        self.err(&join(&p, "name"), format!("{n:?} is not a header name"));
                    } else if http::HeaderValue::from_str(&v).is_err() {
                        self.err(&join(&p, "value"), "not a valid header value");
                    } else if list.iter().any(|(k, _)| k.eq_ignore_ascii_case(&n)) {
                        self.err(&join(&p, "name"), format!("{n:?} appears twice in {key}"));
                    } else {
                        list.push((n.to_ascii_lowercase(), v));
                    }
                }
            }
        }
        let remove = self.strings(m, "remove", path);
        for (i, n) in remove.into_iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "remove"));
            let n = n.to_ascii_lowercase();
            if http::HeaderName::from_bytes(n.as_bytes()).is_err() {
                self.err(&p, format!("{n:?} is not a header name"));
            } else if out.remove.contains(&n) {
                self.err(&p, format!("{n:?} appears twice in remove"));
            } else {
                out.remove.push(n);
            }
        }
        out
    }

    fn authz(&mut self, v: &Value) -> Option<Authorization> {
        let m = self.obj(v, "spec", &["target", "rules"])?;
        let target = self.name(m, "target", "spec", true);
        let mut rules = Vec::new();
        for (p, r) in self.array(m, "rules", "spec") {
            let Some(o) = self.obj(r, &p, &["from", "methods", "paths"]) else {
                continue;
            };
            let from = self.strings(o, "from", &p);
            for (i, f) in from.iter().enumerate() {
                if !(valid_name(f) || f.starts_with("spiffe://")) {
                    self.err(
                        &format!("{p}.from[{i}]"),
                        format!("{f:?} is neither a service name nor a SPIFFE ID"),
                    );
                }
            }
            let methods = self.strings(o, "methods", &p);
            let paths = self.strings(o, "paths", &p);
            for (i, path) in paths.iter().enumerate() {
                if !path.starts_with('/') {
                    self.err(&format!("{p}.paths[{i}]"), "must start with '/'");
                }
            }
            rules.push(AuthzRule {
                from,
                methods,
                paths,
            });
        }
        Some(Authorization {
            target: target?,
            rules,
        })
    }

    fn rate_limit(&mut self, v: &Value) -> Option<RateLimit> {
        let m = self.obj(
            v,
            "spec",
            &[
                "target",
                "requestsPerSecond",
                "burst",
                "perCaller",
                "pathPrefix",
            ],
        )?;
        let target = self.name(m, "target", "spec", true);
        let rps = self.number(m, "requestsPerSecond", "spec", (0.001, 1e9));
        if !m.contains_key("requestsPerSecond") {
            self.err("spec.requestsPerSecond", "required");
        }
        let burst = self.integer(m, "burst", "spec", (1, 1_000_000_000));
        let per_caller = match m.get("perCaller") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                self.err("spec.perCaller", "must be true or false");
                false
            }
        };
        let path_prefix = self.string(m, "pathPrefix", "spec", false);
        if path_prefix.as_ref().is_some_and(|p| !p.starts_with('/')) {
            self.err("spec.pathPrefix", "must start with '/'");
        }
        let rps = rps?;
        Some(RateLimit {
            target: target?,
            requests_per_second: rps,
            burst: burst
                .map(|b| b as u32)
                .unwrap_or_else(|| rps.ceil().max(1.0) as u32),
            per_caller,
            path_prefix,
        })
    }

    fn fault(&mut self, v: &Value) -> Option<FaultInjection> {
        let m = self.obj(v, "spec", &["target", "delay", "abort"])?;
        let target = self.name(m, "target", "spec", true);
        let mut delay = None;
        if let Some(d) = m.get("delay")
            && let Some(o) = self.obj(d, "spec.delay", &["percent", "duration"])
        {
            let pct = self.number(o, "percent", "spec.delay", (0.0, 100.0));
            let dur = self.duration(o, "duration", "spec.delay");
            if dur.is_none() && !o.contains_key("duration") {
                self.err("spec.delay.duration", "required");
            }
            if let (Some(p), Some(d)) = (pct, dur) {
                delay = Some((p, d));
            }
        }
        let mut abort = None;
        if let Some(a) = m.get("abort")
            && let Some(o) = self.obj(a, "spec.abort", &["percent", "status"])
        {
            let pct = self.number(o, "percent", "spec.abort", (0.0, 100.0));
            let status = self.integer(o, "status", "spec.abort", (200, 599));
            if let (Some(p), Some(s)) = (pct, status) {
                abort = Some((p, s as u16));
            } else if !o.contains_key("status") {
                self.err("spec.abort.status", "required");
            }
        }
        if delay.is_none()
            && abort.is_none()
            && !m.contains_key("delay")
            && !m.contains_key("abort")
        {
            self.err("spec", "needs delay, abort or both");
        }
        Some(FaultInjection {
            target: target?,
            delay,
            abort,
        })
    }

    fn mesh(&mut self, v: &Value) -> Option<MeshConfig> {
        let m = self.obj(
            v,
            "spec",
            &["requestTimeout", "retryBudget", "defaultAuthorization"],
        )?;
        let request_timeout = self.duration(m, "requestTimeout", "spec");
        let (mut pct, mut min) = (None, None);
        if let Some(b) = m.get("retryBudget")
            && let Some(o) = self.obj(b, "spec.retryBudget", &["percent", "minPerSecond"])
        {
            pct = self.number(o, "percent", "spec.retryBudget", (0.0, 100.0));
            min = self
                .integer(o, "minPerSecond", "spec.retryBudget", (0, 100_000))
                .map(|v| v as u32);
        }
        let default_allow = match self
            .string(m, "defaultAuthorization", "spec", false)
            .as_deref()
        {
            None | Some("allow") => true,
            Some("deny") => false,
            Some(other) => {
                self.err(
                    "spec.defaultAuthorization",
                    format!("{other:?} (allow or deny)"),
                );
                true
            }
        };
        Some(MeshConfig {
            request_timeout,
            retry_budget_percent: pct,
            retry_budget_min_per_second: min,
            default_allow,
        })
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Names of services and policies: letters, digits, `-`, `_`, `.`; 1-63 chars.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !s.starts_with(['-', '.'])
}

/// Kubernetes namespaces (and rule names): DNS labels, lower-case letters,
/// digits and `-`, 1-63 chars, starting and ending with a letter or digit.
pub fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A fully qualified gRPC service name: dot-separated identifiers.
fn valid_grpc_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    !s.is_empty() && s.len() <= 1024 && s.split('.').all(valid_grpc_method)
}

/// A gRPC method name (an identifier).
fn valid_grpc_method(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 1024
}

/// Where a `filters` list sits, which decides the filter types it may hold.
#[derive(Debug, Clone, Copy)]
enum Place {
    HttpRule,
    HttpBackend,
    GrpcRule,
    GrpcBackend,
}

impl Place {
    fn allowed(self) -> &'static [&'static str] {
        match self {
            Place::HttpRule => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestRedirect",
                "URLRewrite",
                "RequestMirror",
            ],
            Place::HttpBackend => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "URLRewrite",
                "RequestMirror",
            ],
            Place::GrpcRule | Place::GrpcBackend => &[
                "RequestHeaderModifier",
                "ResponseHeaderModifier",
                "RequestMirror",
            ],
        }
    }

    fn what(self) -> &'static str {
        match self {
            Place::HttpRule => "HTTPRoute rule filters",
            Place::HttpBackend => "HTTPRoute backendRefs[].filters",
            Place::GrpcRule => "GRPCRoute rule filters",
            Place::GrpcBackend => "GRPCRoute backendRefs[].filters",
        }
    }
}

/// What one `filters` list configures.
#[derive(Debug, Default)]
struct Filters {
    request_headers: HeaderMods,
    response_headers: HeaderMods,
    redirect: Option<Redirect>,
    rewrite: Option<Rewrite>,
    mirrors: Vec<Mirror>,
}

/// Parses a Gateway API duration (GEP-2257): one to four `<n><unit>` parts,
/// units `h`, `m`, `s`, `ms`, e.g. `1h30m`, `500ms`, `10s`.
pub fn parse_gateway_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 500ms, 10s, 1m30s)");
    if s.is_empty() {
        return Err(bad());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return Err(bad());
        };
        total += unit;
        rest = &rest[len..];
        parts += 1;
    }
    if parts > 4 {
        return Err(bad());
    }
    Ok(total)
}

/// Groups documents' problems per field, for tests and messages.
pub fn problem_fields(p: &Problems) -> BTreeMap<String, String> {
    p.0.iter()
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_nesting_is_refused_before_parsing_in_every_style() {
        let flow = format!("{}{}", "[".repeat(60_000), "]".repeat(60_000));
        let map = format!("a: {}1{}", "{a: ".repeat(70), "}".repeat(70));
        let json = format!("{}1{}", "{\"a\":".repeat(70), "}".repeat(70));
        let mut block = String::new();
        for i in 0..70 {
            block.push_str(&format!("{}a:\n", "  ".repeat(i)));
        }
        let dashes = format!("{}x\n", "- ".repeat(70));
        let sneaky = format!("[a'b, {}]", "[".repeat(100));
        for text in [&flow, &map, &json, &block, &dashes, &sneaky] {
            let err = Document::parse(text).unwrap_err();
            assert!(err.0[0].contains("nested deeper than 64"), "{err}");
        }
        // Quotes, comments and apostrophes do not count.
        assert!(!exceeds_depth("a: \"[[[[\" # {{{{\nb: don't [ stop\n", 3));
        assert!(!exceeds_depth(CANARY, 12));
    }

    const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web-canary
  namespace: default
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
    port: 80
  rules:
  - matches:
    - headers:
      - name: x-canary
        value: "true"
    backendRefs:
    - name: web-v2
      port: 80
  - backendRefs:
    - name: web
      port: 80
      weight: 90
    - name: web-v2
      port: 80
      weight: 10
    timeouts:
      request: 10s
      backendRequest: 2s
    retry:
      attempts: 2
      codes: [502, 503]
      backoff: 100ms
"#;

    #[test]
    fn accepts_a_gamma_route_unchanged() {
        let d = Document::parse(CANARY).unwrap();
        assert_eq!(d.kind, Kind::HttpRoute);
        assert_eq!(d.name, "web-canary");
        let Spec::Route(r) = d.spec else { panic!() };
        assert_eq!(
            r.parents,
            vec![ParentRef {
                name: "web".into(),
                namespace: "default".into(),
                port: Some(80)
            }]
        );
        assert_eq!(r.rules.len(), 2);
        assert_eq!(r.rules[1].backends[1].weight, 10);
        assert_eq!(r.rules[1].timeout, Some(Duration::from_secs(10)));
        assert_eq!(r.rules[1].retry.as_ref().unwrap().codes, vec![502, 503]);
    }

    #[test]
    fn lists_every_problem_with_its_path() {
        let bad = r#"{
          "apiVersion": "gateway.networking.k8s.io/v1",
          "kind": "HTTPRoute",
          "metadata": {"name": "r"},
          "spec": {
            "parentRefs": [{"name": "web"}],
            "colour": "blue",
            "rules": [{
              "matches": [{"path": {"type": "RegularExpression", "value": "(unclosed"}}],
              "backendRefs": [{"name": "a", "weight": 0}, {"name": "b", "weight": 0}],
              "timeouts": {"request": "ten seconds"},
              "retry": {"attempts": 99}
            }, {
              "backendRefs": [{"name": "not/valid"}]
            }]
          }
        }"#;
        let p = Document::parse(bad).unwrap_err();
        let f = problem_fields(&p);
        assert!(f.contains_key("spec.colour"), "{p}");
        assert!(
            f["spec.rules[0].matches[0].path.value"].contains("regular expression"),
            "{p}"
        );
        assert!(f["spec.rules[0].backendRefs"].contains("all zero"), "{p}");
        assert!(f.contains_key("spec.rules[0].timeouts.request"), "{p}");
        assert!(
            f["spec.rules[0].retry.attempts"].contains("out of range"),
            "{p}"
        );
        assert!(f.contains_key("spec.rules[1].backendRefs[0].name"), "{p}");
        assert_eq!(p.0.len(), 6, "{p}");
    }

    #[test]
    fn unknown_kind_and_unsupported_features_are_named() {
        let p = Document::parse(
            "apiVersion: shoal.dev/v1\nkind: Gizmo\nmetadata: {name: g}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(p.0[0].starts_with("kind: unknown kind"), "{p}");
        let p = Document::parse(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - filters:\n    - type: ExtensionRef\n      extensionRef: {group: x, kind: Y, name: z}\n",
        )
        .unwrap_err();
        assert_eq!(
            p.0,
            ["spec.rules[0].filters[0].type: \"ExtensionRef\" not supported by Shoal"]
        );
    }

    fn route_doc(kind: &str, rules: &str) -> Result<Document, Problems> {
        Document::parse(&format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: {kind}\nmetadata: {{name: r, namespace: shop}}\nspec:\n  parentRefs: [{{name: web, port: 80}}, {{name: api, namespace: core}}]\n  rules:\n{rules}"
        ))
    }

    fn route_of(d: Document) -> HttpRoute {
        match d.spec {
            Spec::Route(r) => r,
            other => panic!("not a route: {other:?}"),
        }
    }

    #[test]
    fn namespaces_and_ports_are_part_of_the_model() {
        let r = route_of(
            route_doc(
                "HTTPRoute",
                "  - backendRefs: [{name: web-v2, port: 8080}, {name: api, namespace: core}]\n",
            )
            .unwrap(),
        );
        assert_eq!(r.namespace, "shop");
        assert!(!r.grpc);
        assert_eq!(
            r.parents,
            vec![
                ParentRef {
                    name: "web".into(),
                    namespace: "shop".into(),
                    port: Some(80)
                },
                ParentRef {
                    name: "api".into(),
                    namespace: "core".into(),
                    port: None
                },
            ]
        );
        let b = &r.rules[0].backends;
        assert_eq!((b[0].namespace.as_str(), b[0].port), ("shop", Some(8080)));
        assert_eq!((b[1].namespace.as_str(), b[1].port), ("core", None));
        let unnamed = Document::parse("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {parentRefs: [{name: web}]}\n").unwrap();
        assert_eq!(route_of(unnamed).namespace, DEFAULT_NAMESPACE);
        let p = Document::parse("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: Bad_NS}\nspec: {parentRefs: [{name: web, port: 0}]}\n").unwrap_err();
        let f = problem_fields(&p);
        assert!(
            f["metadata.namespace"].contains("not a valid namespace"),
            "{p}"
        );
        assert!(f["spec.parentRefs[0].port"].contains("out of range"), "{p}");
    }

    #[test]
    fn redirects_rewrites_mirrors_and_backend_filters_parse() {
        let rules = r#"  - name: moved
    matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: example.org, port: 8443, statusCode: 308, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: internal.example, path: {type: ReplaceFullPath, replaceFullPath: /v2}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}
    - type: RequestMirror
      requestMirror: {backendRef: {name: audit, namespace: ops}, fraction: {numerator: 1, denominator: 3}}
    backendRefs:
    - name: web-v2
      port: 8080
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: X-Backend, value: v2}]}
      - type: ResponseHeaderModifier
        responseHeaderModifier: {remove: [Server]}
"#;
        let r = route_of(route_doc("HTTPRoute", rules).unwrap());
        let moved = &r.rules[0];
        assert_eq!(moved.name.as_deref(), Some("moved"));
        let red = moved.redirect.as_ref().unwrap();
        assert_eq!(red.status, 308);
        assert_eq!(red.scheme.as_deref(), Some("https"));
        assert_eq!(red.hostname.as_deref(), Some("example.org"));
        assert_eq!(red.port, Some(8443));
        assert_eq!(red.path, Some(PathModifier::Prefix("/new".into())));
        let api = &r.rules[1];
        let rw = api.rewrite.as_ref().unwrap();
        assert_eq!(rw.hostname.as_deref(), Some("internal.example"));
        assert_eq!(rw.path, Some(PathModifier::Full("/v2".into())));
        assert_eq!(api.mirrors.len(), 2);
        assert_eq!(api.mirrors[0].fraction, (25, 100));
        assert_eq!(api.mirrors[1].backend.namespace, "ops");
        assert_eq!(api.mirrors[1].fraction, (1, 3));
        let b = &api.backends[0];
        assert_eq!(
            b.request_headers.set,
            vec![("x-backend".to_string(), "v2".to_string())]
        );
        assert_eq!(b.response_headers.remove, vec!["server".to_string()]);
        let plain = Document::parse("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec:\n  parentRefs: [{name: web}]\n  rules:\n  - filters: [{type: RequestRedirect, requestRedirect: {}}]\n").unwrap();
        assert_eq!(
            route_of(plain).rules[0].redirect.as_ref().unwrap().status,
            302
        );
    }

    #[test]
    fn filter_mistakes_are_refused_with_their_paths() {
        let rules = r#"  - matches: [{path: {type: Exact, value: /a}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: ftp, hostname: "*.example.org", statusCode: 305, path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}
      urlRewrite: {hostname: x}
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: "no-slash"}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: a, value: b}]}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: a, value: c}]}
    - type: CORS
    - type: ResponseHeaderModifier
      responseHeaderModifier: {set: [{name: X-A, value: "1"}, {name: x-a, value: "2"}], remove: ["bad header", x-b, X-B]}
    backendRefs:
    - name: web
      filters:
      - type: RequestRedirect
        requestRedirect: {}
  - filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow}, percent: 50, fraction: {numerator: 5, denominator: 2}}
"#;
        let p = route_doc("HTTPRoute", rules).unwrap_err();
        let f = problem_fields(&p);
        let at = |k: &str| f.get(k).unwrap_or_else(|| panic!("no problem at {k}: {p}"));
        assert!(at("spec.rules[0].filters[0].requestRedirect.scheme").contains("http or https"));
        assert!(
            at("spec.rules[0].filters[0].requestRedirect.hostname").contains("precise hostname")
        );
        assert!(
            at("spec.rules[0].filters[0].requestRedirect.statusCode")
                .contains("301, 302, 303, 307 or 308")
        );
        assert!(
            at("spec.rules[0].filters[0].urlRewrite")
                .contains("must not be set for type RequestRedirect")
        );
        assert!(
            at("spec.rules[0].filters[1].urlRewrite.path.replaceFullPath")
                .contains("is not a path")
        );
        assert!(at("spec.rules[0].filters[3].type").contains("may appear once"));
        assert!(at("spec.rules[0].filters[4].type").contains("experimental"));
        assert!(
            at("spec.rules[0].filters[5].responseHeaderModifier.set[1].name")
                .contains("appears twice in set")
        );
        assert!(
            at("spec.rules[0].filters[5].responseHeaderModifier.remove[0]")
                .contains("not a header name")
        );
        assert!(
            at("spec.rules[0].filters[5].responseHeaderModifier.remove[2]")
                .contains("appears twice in remove")
        );
        assert!(
            at("spec.rules[0].backendRefs[0].filters[0].type")
                .contains("not allowed in HTTPRoute backendRefs[].filters")
        );
        assert!(at("spec.rules[0].backendRefs").contains("RequestRedirect"));
        assert!(at("spec.rules[0].filters").contains("PathPrefix"), "{p}");
        assert!(at("spec.rules[1].filters[0].requestMirror").contains("exclusive"));
        assert!(at("spec.rules[1].filters[0].requestMirror.fraction").contains("must not exceed"));
    }

    #[test]
    fn grpc_routes_parse_and_refuse_http_only_fields() {
        let rules = r#"  - matches:
    - method: {service: grpc.health.v1.Health, method: Check}
      headers: [{name: x-test-case, value: set}]
    - method: {type: RegularExpression, service: 'echo\..*'}
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-grpc, value: "1"}]}
    backendRefs: [{name: echo-v1, port: 7070, weight: 70}, {name: echo-v2, port: 7070, weight: 30}]
"#;
        let d = route_doc("GRPCRoute", rules).unwrap();
        assert_eq!(d.kind, Kind::GrpcRoute);
        let r = route_of(d);
        assert!(r.grpc);
        let g = r.rules[0].matches[0].grpc.as_ref().unwrap();
        assert!(g.service.as_ref().unwrap().matches("grpc.health.v1.Health"));
        assert!(g.method.as_ref().unwrap().matches("Check"));
        assert!(
            r.rules[0].matches[1]
                .grpc
                .as_ref()
                .unwrap()
                .service
                .as_ref()
                .unwrap()
                .matches("echo.Echo")
        );
        let bad = r#"  - matches:
    - method: {type: Exact}
    - method: {service: "not a service", method: "2bad"}
    - path: {value: /x}
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: x}
    timeouts: {request: 1s}
"#;
        let p = route_doc("GRPCRoute", bad).unwrap_err();
        let f = problem_fields(&p);
        assert!(
            f["spec.rules[0].matches[0].method"].contains("needs service, method or both"),
            "{p}"
        );
        assert!(
            f["spec.rules[0].matches[1].method.service"].contains("not a gRPC service"),
            "{p}"
        );
        assert!(
            f["spec.rules[0].matches[1].method.method"].contains("not a gRPC method"),
            "{p}"
        );
        assert!(
            f["spec.rules[0].matches[2].path"].contains("unknown field"),
            "{p}"
        );
        assert!(
            f["spec.rules[0].filters[0].type"].contains("not allowed in GRPCRoute rule filters"),
            "{p}"
        );
        assert!(f["spec.rules[0].timeouts"].contains("unknown field"), "{p}");
        let p = Document::parse("apiVersion: shoal.dev/v1\nkind: GRPCRoute\nmetadata: {name: g}\nspec: {parentRefs: [{name: echo}]}\n").unwrap_err();
        assert!(p.0[0].starts_with("apiVersion:"), "{p}");
    }

    /// Every manifest of the upstream mesh suite parses unchanged.
    #[test]
    fn the_upstream_mesh_manifests_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/conformance/gateway-api-mesh");
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (the upstream manifests)", dir.display()));
        let mut seen = 0;
        for e in entries {
            let path = e.unwrap().path();
            if path.extension().is_none_or(|x| x != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for part in text.split("\n---") {
                if part.trim().is_empty() {
                    continue;
                }
                Document::parse(part).unwrap_or_else(|p| panic!("{}: {p}", path.display()));
                seen += 1;
            }
        }
        assert!(seen >= 22, "only {seen} documents in {}", dir.display());
    }

    #[test]
    fn other_kinds_parse() {
        let a = Document::parse("apiVersion: shoal.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: a}\nspec:\n  target: web\n  rules:\n  - from: [api, \"spiffe://demo.shoal/svc/ops\"]\n    methods: [GET]\n").unwrap();
        assert!(matches!(a.spec, Spec::Authz(ref z) if z.rules[0].from.len() == 2));
        let r = Document::parse("apiVersion: shoal.dev/v1\nkind: RateLimit\nmetadata: {name: r}\nspec: {target: web, requestsPerSecond: 50}\n").unwrap();
        assert!(matches!(r.spec, Spec::RateLimit(ref l) if l.burst == 50));
        let f = Document::parse("apiVersion: shoal.dev/v1\nkind: FaultInjection\nmetadata: {name: f}\nspec: {target: web, abort: {percent: 10, status: 503}}\n").unwrap();
        assert!(matches!(f.spec, Spec::Fault(ref x) if x.abort == Some((10.0, 503))));
        let m = Document::parse("apiVersion: shoal.dev/v1\nkind: MeshConfig\nmetadata: {name: default}\nspec: {defaultAuthorization: deny, requestTimeout: 5s}\n").unwrap();
        assert!(matches!(m.spec, Spec::Mesh(ref x) if !x.default_allow));
        let bad = Document::parse(
            "apiVersion: shoal.dev/v1\nkind: MeshConfig\nmetadata: {name: other}\nspec: {}\n",
        )
        .unwrap_err();
        assert!(bad.0[0].contains("metadata.name"), "{bad}");
    }

    #[test]
    fn gateway_durations() {
        assert_eq!(
            parse_gateway_duration("1h30m").unwrap(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            parse_gateway_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_gateway_duration("1.5s").is_err());
        assert!(parse_gateway_duration("10").is_err());
        assert!(parse_gateway_duration("1h1m1s1ms1h").is_err());
    }
}
