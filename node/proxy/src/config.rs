//! The proxy's own configuration: local services, the outbound listener,
//! timeouts, retries and limits. The node's own configuration (`node::config`)
//! flattens [`ProxyArgs`] into its flags and feeds it from `SHOAL_*` variables
//! and the config file.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {msg}")]
pub struct ConfigError {
    /// The flag or file key at fault.
    pub field: String,
    /// What is wrong with it.
    pub msg: String,
}

impl ConfigError {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, msg: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            msg: msg.into(),
        }
    }
}

/// Parses `250ms`, `2s`, `1.5s`, `1m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?}: missing unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: not a number followed by a unit"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// Which HTTP version the node speaks to a local instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Detected once per instance: the caller's version if the instance
    /// speaks it (gRPC reaches a gRPC server unconfigured), else the one it
    /// speaks.
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 with prior knowledge (cleartext).
    H2c,
    /// Opaque TCP: each connection is carried as bytes (`docs/FRAMES.md`,
    /// stream kind 0x02); no HTTP is spoken or parsed.
    Tcp,
}

impl Protocol {
    /// The name gossip publishes and config files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Auto => "auto",
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::Tcp => "tcp",
        }
    }
}

/// A local service instance this node fronts.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceSpec {
    /// Service name (must be named by the node certificate's svc SANs).
    pub name: String,
    /// Where the instance listens.
    pub addr: SocketAddr,
    /// HTTP version to speak to it.
    pub protocol: Protocol,
    /// Health check: `Some(path)` for an HTTP GET (2xx/3xx is healthy),
    /// `None` for a TCP connect.
    pub health_path: Option<String>,
    /// Interval between health checks. Default 1 s.
    pub health_interval: Duration,
    /// Relative weight for balancing. Default 100.
    pub weight: u32,
}

impl ServiceSpec {
    /// Parses `NAME=ADDR`, `NAME=h2c://ADDR`, `NAME=http://ADDR` (HTTP/1.1
    /// pinned) or `NAME=tcp://ADDR` (opaque TCP).
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let err = |m: String| ConfigError::new("--service", m);
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| err(format!("{s:?} is not NAME=ADDR")))?;
        check_service_name(name).map_err(err)?;
        let (protocol, addr) = if let Some(a) = rest.strip_prefix("h2c://") {
            (Protocol::H2c, a)
        } else if let Some(a) = rest.strip_prefix("http://") {
            (Protocol::Http1, a)
        } else if let Some(a) = rest.strip_prefix("tcp://") {
            (Protocol::Tcp, a)
        } else if let Some((scheme, _)) = rest.split_once("://") {
            return Err(err(format!(
                "{s:?}: unknown scheme {scheme:?} (use http://, h2c:// or tcp://, or none for auto)"
            )));
        } else {
            (Protocol::Auto, rest)
        };
        Ok(ServiceSpec::new(
            name,
            resolve(addr).map_err(err)?,
            protocol,
        ))
    }

    /// A spec with default health checking (TCP connect every second).
    pub fn new(name: impl Into<String>, addr: SocketAddr, protocol: Protocol) -> Self {
        ServiceSpec {
            name: name.into(),
            addr,
            protocol,
            health_path: None,
            health_interval: Duration::from_secs(1),
            weight: 100,
        }
    }
}

/// A `[[service]]` table in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceFile {
    name: String,
    address: String,
    #[serde(default)]
    protocol: Protocol,
    health_path: Option<String>,
    health_interval: Option<String>,
    weight: Option<u32>,
}

/// A listener whose every request goes to one service (for apps that cannot
/// set a Host header): `--upstream web=127.0.0.1:4141` or `[[upstream]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamListener {
    /// The service everything arriving here goes to.
    pub service: String,
    /// Where to listen (port 0 picks one).
    pub listen: SocketAddr,
}

impl UpstreamListener {
    /// Parses `SERVICE=ADDR`.
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let err = |m: String| ConfigError::new("--upstream", m);
        let (service, addr) = s
            .split_once('=')
            .ok_or_else(|| err(format!("{s:?} is not SERVICE=ADDR")))?;
        check_service_name(service).map_err(err)?;
        Ok(UpstreamListener {
            service: service.into(),
            listen: resolve(addr).map_err(err)?,
        })
    }
}

/// An `[[upstream]]` table in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    service: String,
    listen: String,
}

/// Retry settings.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Tries per request, the first included. Default 3.
    pub max_attempts: u32,
    /// Retries may add at most this share of requests. Default 0.2.
    pub budget_ratio: f64,
    /// Retries always allowed per second, whatever the ratio. Default 10.
    pub budget_min_per_sec: f64,
    /// The window the budget is counted over. Default 10 s.
    pub budget_window: Duration,
    /// First backoff (then doubling, with full jitter). Default 10 ms.
    pub backoff_base: Duration,
    /// Largest backoff. Default 250 ms.
    pub backoff_max: Duration,
    /// Largest request body buffered for replay. Default 64 KiB.
    pub max_replay_body: usize,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            budget_ratio: 0.2,
            budget_min_per_sec: 10.0,
            budget_window: Duration::from_secs(10),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(250),
            max_replay_body: 64 * 1024,
        }
    }
}

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Local service instances.
    pub services: Vec<ServiceSpec>,
    /// Outbound listener address (none: the node takes no app traffic).
    pub outbound: Option<SocketAddr>,
    /// Per-upstream listeners: each sends everything to one service.
    pub upstreams: Vec<UpstreamListener>,
    /// Default request timeout (until the response head). Default 30 s.
    pub request_timeout: Duration,
    /// How long a draining node waits for in-flight requests. Default 30 s.
    pub drain_timeout: Duration,
    /// Retries.
    pub retry: RetryConfig,
    /// In-flight cap per endpoint; an endpoint at the cap is not chosen. Default 1000.
    pub max_in_flight_per_endpoint: u64,
    /// In-flight cap for the node's outbound side; above it, 503. Default 10000.
    pub max_in_flight: u64,
    /// Consecutive failures that eject an endpoint. Default 5.
    pub eject_after: u32,
    /// First ejection (doubling per repeat). Default 1 s.
    pub eject_base: Duration,
    /// Longest ejection. Default 30 s.
    pub eject_max: Duration,
    /// Time a connection to the outbound, upstream or admin listener has to
    /// deliver a complete request head. Default 10 s.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection to those listeners may stay idle. Default 60 s.
    pub http_idle_timeout: Duration,
    /// Connections open at once on the outbound and upstream listeners
    /// together; past it new ones are refused. Default 10000.
    pub max_connections: usize,
    /// Connections open at once on the admin listener. Default 256.
    pub admin_max_connections: usize,
    /// Seed of the request path's randomness (endpoint choice, backend
    /// weights, fault percentages, backoff jitter); `None`: from entropy.
    pub rng_seed: Option<u64>,
    /// Which requests get a `shoal::access` log line. Default `errors`.
    pub access_log: crate::access::AccessLog,
    /// The node's namespace (`--namespace`). Default `default`.
    pub namespace: String,
    /// Which hosts that are not mesh services this node forwards to
    /// directly (`--egress`). Default off.
    pub egress: crate::egress::Egress,
    /// An opaque TCP connection with no byte either way for this long is
    /// closed (`--tcp-idle-timeout`). Default 1 h.
    pub tcp_idle_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            services: Vec::new(),
            outbound: None,
            upstreams: Vec::new(),
            request_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(30),
            retry: RetryConfig::default(),
            max_in_flight_per_endpoint: 1000,
            max_in_flight: 10_000,
            eject_after: 5,
            eject_base: Duration::from_secs(1),
            eject_max: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(10),
            http_idle_timeout: Duration::from_secs(60),
            max_connections: 10_000,
            admin_max_connections: 256,
            rng_seed: None,
            access_log: crate::access::AccessLog::Errors,
            namespace: "default".into(),
            egress: crate::egress::Egress::Off,
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}

/// `shoal node` flags for the proxy (each also reads `SHOAL_<FLAG>`).
#[derive(Debug, Args, Default)]
pub struct ProxyArgs {
    /// Local service instance `NAME=ADDR` (repeatable; `NAME=h2c://ADDR` pins
    /// h2c, `NAME=http://ADDR` pins HTTP/1.1). Env: comma-separated.
    #[arg(long = "service", env = "SHOAL_SERVICE", value_delimiter = ',')]
    pub services: Vec<String>,
    /// Outbound listener for apps (HTTP/1.1 and h2c), e.g. 127.0.0.1:4140.
    #[arg(long, env = "SHOAL_OUTBOUND")]
    pub outbound: Option<String>,
    /// Per-upstream listener `SERVICE=ADDR` (repeatable): everything arriving
    /// there goes to SERVICE, whatever its Host header. Env: comma-separated.
    #[arg(long = "upstream", env = "SHOAL_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Default request timeout [default: 30s].
    #[arg(long, env = "SHOAL_REQUEST_TIMEOUT")]
    pub request_timeout: Option<String>,
    /// On SIGTERM, how long to wait for in-flight requests [default: 30s].
    #[arg(long, env = "SHOAL_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<String>,
    /// Time an outbound, upstream or admin connection has to send a complete
    /// request head before it is closed [default: 10s].
    #[arg(long, env = "SHOAL_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// Idle keep-alive connections to the outbound, upstream and admin
    /// listeners are closed after this long [default: 60s].
    #[arg(long, env = "SHOAL_HTTP_IDLE_TIMEOUT")]
    pub http_idle_timeout: Option<String>,
    /// Open connections the outbound and upstream listeners accept together;
    /// past it new ones get 503 and are closed [default: 10000].
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Open connections the admin listener accepts [default: 256].
    #[arg(long, env = "SHOAL_ADMIN_MAX_CONNECTIONS")]
    pub admin_max_connections: Option<usize>,
    /// The node's namespace: a bare service name in a Host means a service
    /// of this namespace, and consumer routes of this namespace apply to
    /// this node's calls [default: default].
    #[arg(long, env = "SHOAL_NAMESPACE")]
    pub namespace: Option<String>,
    /// Seeds the request path's randomness, so a run can be repeated
    /// (`simulate` passes each node one derived from the scenario seed).
    #[arg(long, env = "SHOAL_RNG_SEED", hide = true)]
    pub rng_seed: Option<u64>,
    /// One `shoal::access` log line per request: `off`, `errors` (failures,
    /// denials and rate limits) or `all` [default: errors].
    #[arg(long, env = "SHOAL_ACCESS_LOG", value_enum)]
    pub access_log: Option<crate::access::AccessLog>,
    /// Hosts that are not mesh services: `off` (503 unknown-service),
    /// `allow` (this node forwards to any host name) or comma-separated host
    /// suffixes (`example.com,.corp`) [default: off].
    #[arg(long, env = "SHOAL_EGRESS")]
    pub egress: Option<String>,
    /// Opaque TCP connections (`tcp://` services, CONNECT tunnels) with no
    /// byte either way for this long are closed [default: 1h].
    #[arg(long, env = "SHOAL_TCP_IDLE_TIMEOUT")]
    pub tcp_idle_timeout: Option<String>,
}

/// The proxy keys of the config file.
#[derive(Debug, Default, Clone)]
pub struct ProxyFile {
    /// `[[service]]` tables.
    pub service: Vec<ServiceFile>,
    /// `outbound`.
    pub outbound: Option<String>,
    /// `[[upstream]]` tables.
    pub upstream: Vec<UpstreamFile>,
    /// `request_timeout`.
    pub request_timeout: Option<String>,
    /// `drain_timeout`.
    pub drain_timeout: Option<String>,
    /// `egress`.
    pub egress: Option<String>,
    /// `tcp_idle_timeout`.
    pub tcp_idle_timeout: Option<String>,
}

impl ProxyConfig {
    /// Merges flags over the file (flags win; `--service` flags replace the
    /// file's services).
    pub fn resolve(args: ProxyArgs, file: ProxyFile) -> Result<Self, ConfigError> {
        let mut c = ProxyConfig::default();
        if args.services.is_empty() {
            for (i, s) in file.service.into_iter().enumerate() {
                c.services.push(from_file(i, s)?);
            }
        } else {
            for s in &args.services {
                c.services.push(ServiceSpec::parse_flag(s)?);
            }
        }
        let mut names: Vec<&str> = c.services.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::new(
                "--service",
                format!("{:?} registered twice", w[0]),
            ));
        }
        if args.upstreams.is_empty() {
            for (i, u) in file.upstream.into_iter().enumerate() {
                let field = |k: &str| format!("upstream[{i}].{k}");
                check_service_name(&u.service)
                    .map_err(|m| ConfigError::new(field("service"), m))?;
                let listen =
                    resolve(&u.listen).map_err(|m| ConfigError::new(field("listen"), m))?;
                c.upstreams.push(UpstreamListener {
                    service: u.service,
                    listen,
                });
            }
        } else {
            for u in &args.upstreams {
                c.upstreams.push(UpstreamListener::parse_flag(u)?);
            }
        }
        if let Some(o) = args.outbound.or(file.outbound) {
            c.outbound = Some(resolve(&o).map_err(|m| ConfigError::new("--outbound", m))?);
        }
        if let Some(t) = args.request_timeout.or(file.request_timeout) {
            c.request_timeout =
                parse_duration(&t).map_err(|m| ConfigError::new("--request-timeout", m))?;
        }
        if let Some(t) = args.drain_timeout.or(file.drain_timeout) {
            c.drain_timeout =
                parse_duration(&t).map_err(|m| ConfigError::new("--drain-timeout", m))?;
        }
        let positive = |flag: &'static str, d: Duration| {
            if d.is_zero() {
                Err(ConfigError::new(flag, "must be more than 0"))
            } else {
                Ok(d)
            }
        };
        if let Some(t) = args.header_read_timeout {
            let d = parse_duration(&t).map_err(|m| ConfigError::new("--header-read-timeout", m))?;
            c.header_read_timeout = positive("--header-read-timeout", d)?;
        }
        if let Some(t) = args.http_idle_timeout {
            let d = parse_duration(&t).map_err(|m| ConfigError::new("--http-idle-timeout", m))?;
            c.http_idle_timeout = positive("--http-idle-timeout", d)?;
        }
        for (flag, value, field) in [
            (
                "--max-connections",
                args.max_connections,
                &mut c.max_connections,
            ),
            (
                "--admin-max-connections",
                args.admin_max_connections,
                &mut c.admin_max_connections,
            ),
        ] {
            match value {
                Some(0) => return Err(ConfigError::new(flag, "must be at least 1")),
                Some(n) => *field = n,
                None => {}
            }
        }
        if let Some(e) = args.egress.or(file.egress) {
            c.egress =
                crate::egress::Egress::parse(&e).map_err(|m| ConfigError::new("--egress", m))?;
        }
        if let Some(t) = args.tcp_idle_timeout.or(file.tcp_idle_timeout) {
            let d = parse_duration(&t).map_err(|m| ConfigError::new("--tcp-idle-timeout", m))?;
            c.tcp_idle_timeout = positive("--tcp-idle-timeout", d)?;
        }
        c.rng_seed = args.rng_seed;
        if let Some(a) = args.access_log {
            c.access_log = a;
        }
        if let Some(ns) = args.namespace {
            if !policy::doc::valid_namespace(&ns) {
                return Err(ConfigError::new(
                    "--namespace",
                    format!(
                        "{ns:?} is not a namespace (lowercase letters, digits and '-', at most 63)"
                    ),
                ));
            }
            c.namespace = ns;
        }
        Ok(c)
    }
}

fn from_file(i: usize, s: ServiceFile) -> Result<ServiceSpec, ConfigError> {
    let field = |k: &str| format!("service[{i}].{k}");
    check_service_name(&s.name).map_err(|m| ConfigError::new(field("name"), m))?;
    let addr = resolve(&s.address).map_err(|m| ConfigError::new(field("address"), m))?;
    let mut spec = ServiceSpec::new(s.name, addr, s.protocol);
    if let Some(p) = s.health_path {
        if spec.protocol == Protocol::Tcp {
            return Err(ConfigError::new(
                field("health_path"),
                "a tcp service is checked by a TCP connect; remove health_path",
            ));
        }
        if !p.starts_with('/') {
            return Err(ConfigError::new(
                field("health_path"),
                "must start with '/'",
            ));
        }
        spec.health_path = Some(p);
    }
    if let Some(iv) = s.health_interval {
        let d = parse_duration(&iv).map_err(|m| ConfigError::new(field("health_interval"), m))?;
        if d < Duration::from_millis(50) {
            return Err(ConfigError::new(
                field("health_interval"),
                "must be at least 50ms",
            ));
        }
        spec.health_interval = d;
    }
    if let Some(w) = s.weight {
        if w == 0 {
            return Err(ConfigError::new(field("weight"), "must be at least 1"));
        }
        spec.weight = w;
    }
    Ok(spec)
}

fn check_service_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "service name {name:?}: use lower-case letters, digits and '-' (1-63 chars)"
        ))
    }
}

fn resolve(s: &str) -> Result<SocketAddr, String> {
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_flags() {
        let s = ServiceSpec::parse_flag("web=127.0.0.1:8080").unwrap();
        assert_eq!(s.protocol, Protocol::Auto);
        assert_eq!(s.addr, "127.0.0.1:8080".parse().unwrap());
        let s = ServiceSpec::parse_flag("grpc=h2c://127.0.0.1:9090").unwrap();
        assert_eq!(s.protocol, Protocol::H2c);
        assert!(ServiceSpec::parse_flag("web").is_err());
        assert!(ServiceSpec::parse_flag("Web=127.0.0.1:1").is_err());
        let u = UpstreamListener::parse_flag("web=127.0.0.1:4141").unwrap();
        assert_eq!(u.service, "web");
        assert_eq!(u.listen, "127.0.0.1:4141".parse().unwrap());
        assert!(UpstreamListener::parse_flag("127.0.0.1:4141").is_err());
    }

    #[test]
    fn tcp_services_and_the_idle_timeout() {
        let s = ServiceSpec::parse_flag("db=tcp://127.0.0.1:6379").unwrap();
        assert_eq!(s.protocol, Protocol::Tcp);
        assert_eq!(s.addr, "127.0.0.1:6379".parse().unwrap());
        let e = ServiceSpec::parse_flag("db=udp://127.0.0.1:53").unwrap_err();
        assert!(e.to_string().contains("unknown scheme \"udp\""), "{e}");
        let c = ProxyConfig::resolve(ProxyArgs::default(), ProxyFile::default()).unwrap();
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(3600));
        let args = |t: &str| ProxyArgs {
            tcp_idle_timeout: Some(t.into()),
            ..ProxyArgs::default()
        };
        let c = ProxyConfig::resolve(args("90s"), ProxyFile::default()).unwrap();
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(90));
        let file = ProxyFile {
            tcp_idle_timeout: Some("5m".into()),
            ..ProxyFile::default()
        };
        let c = ProxyConfig::resolve(ProxyArgs::default(), file).unwrap();
        assert_eq!(c.tcp_idle_timeout, Duration::from_secs(300));
        for bad in ["0s", "soon"] {
            let e = ProxyConfig::resolve(args(bad), ProxyFile::default()).unwrap_err();
            assert!(e.to_string().contains("--tcp-idle-timeout"), "{bad}: {e}");
        }
    }

    #[test]
    fn namespace_flag_defaults_and_is_checked() {
        let c = ProxyConfig::resolve(ProxyArgs::default(), ProxyFile::default()).unwrap();
        assert_eq!(c.namespace, "default");
        let args = |ns: &str| ProxyArgs {
            namespace: Some(ns.into()),
            ..ProxyArgs::default()
        };
        let c = ProxyConfig::resolve(args("gateway-conformance-mesh"), ProxyFile::default());
        assert_eq!(c.unwrap().namespace, "gateway-conformance-mesh");
        for bad in ["Bad_NS", "", "-x", "a.b"] {
            let e = ProxyConfig::resolve(args(bad), ProxyFile::default()).unwrap_err();
            assert!(e.to_string().contains("--namespace"), "{bad}: {e}");
        }
    }

    #[test]
    fn listener_limit_flags() {
        let c = ProxyConfig::resolve(ProxyArgs::default(), ProxyFile::default()).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(60));
        assert_eq!((c.max_connections, c.admin_max_connections), (10_000, 256));
        let args = ProxyArgs {
            header_read_timeout: Some("2s".into()),
            http_idle_timeout: Some("90s".into()),
            max_connections: Some(500),
            admin_max_connections: Some(8),
            ..Default::default()
        };
        let c = ProxyConfig::resolve(args, ProxyFile::default()).unwrap();
        assert_eq!(c.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.http_idle_timeout, Duration::from_secs(90));
        assert_eq!((c.max_connections, c.admin_max_connections), (500, 8));
        assert_eq!(c.rng_seed, None);
        let seeded = ProxyArgs {
            rng_seed: Some(42),
            ..Default::default()
        };
        let c = ProxyConfig::resolve(seeded, ProxyFile::default()).unwrap();
        assert_eq!(c.rng_seed, Some(42));
        for (args, field) in [
            (
                ProxyArgs {
                    header_read_timeout: Some("0s".into()),
                    ..Default::default()
                },
                "--header-read-timeout",
            ),
            (
                ProxyArgs {
                    http_idle_timeout: Some("soon".into()),
                    ..Default::default()
                },
                "--http-idle-timeout",
            ),
            (
                ProxyArgs {
                    max_connections: Some(0),
                    ..Default::default()
                },
                "--max-connections",
            ),
            (
                ProxyArgs {
                    admin_max_connections: Some(0),
                    ..Default::default()
                },
                "--admin-max-connections",
            ),
        ] {
            let err = ProxyConfig::resolve(args, ProxyFile::default()).unwrap_err();
            assert_eq!(err.field, field, "{err}");
        }
    }

    #[test]
    fn egress_flag_and_file_key() {
        use crate::egress::Egress;
        let c = ProxyConfig::resolve(ProxyArgs::default(), ProxyFile::default()).unwrap();
        assert_eq!(c.egress, Egress::Off);
        let file = ProxyFile {
            egress: Some("example.com, .corp".into()),
            ..Default::default()
        };
        let c = ProxyConfig::resolve(ProxyArgs::default(), file.clone()).unwrap();
        assert_eq!(
            c.egress,
            Egress::Suffixes(vec!["example.com".into(), "corp".into()])
        );
        let args = ProxyArgs {
            egress: Some("allow".into()),
            ..Default::default()
        };
        assert_eq!(
            ProxyConfig::resolve(args, file).unwrap().egress,
            Egress::Allow,
            "the flag wins over the file"
        );
        let bad = ProxyArgs {
            egress: Some("10.0.0.0".into()),
            ..Default::default()
        };
        let e = ProxyConfig::resolve(bad, ProxyFile::default()).unwrap_err();
        assert_eq!(e.field, "--egress", "{e}");
    }

    #[test]
    fn file_services_and_duplicates() {
        let file = ProxyFile {
            service: vec![ServiceFile {
                name: "web".into(),
                address: "127.0.0.1:8080".into(),
                protocol: Protocol::Http1,
                health_path: Some("/healthz".into()),
                health_interval: Some("2s".into()),
                weight: None,
            }],
            ..Default::default()
        };
        let c = ProxyConfig::resolve(ProxyArgs::default(), file).unwrap();
        assert_eq!(c.services[0].health_path.as_deref(), Some("/healthz"));
        assert_eq!(c.services[0].health_interval, Duration::from_secs(2));
        let args = ProxyArgs {
            services: vec!["a=127.0.0.1:1".into(), "a=127.0.0.1:2".into()],
            ..Default::default()
        };
        assert!(ProxyConfig::resolve(args, ProxyFile::default()).is_err());
    }
}
