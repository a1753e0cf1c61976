//! Node configuration: one place reads flags, `SHOAL_*` variables and the
//! config file.
//!
//! Precedence, highest first: command-line flag, `SHOAL_*` environment
//! variable, `--config` file, built-in default. When an environment variable
//! overrides a value that the file also set, the node logs it, so nothing is
//! overridden silently.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;

/// Exit code for bad usage or configuration (EX_USAGE).
pub const EXIT_USAGE: i32 = 64;

/// Default `--join-timeout`.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Representatives per zone on the backbone unless told (`--zone-representatives`).
pub const DEFAULT_ZONE_REPRESENTATIVES: usize = 3;

pub use proxy::config::{ConfigError, parse_duration};

/// Log output format.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum, Default,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `shoal node` flags. Every flag also reads `SHOAL_<FLAG>`.
#[derive(Debug, Args, Default)]
pub struct NodeArgs {
    /// Node name, unique in the mesh; must match the certificate's node SAN.
    #[arg(long, env = "SHOAL_NAME")]
    pub name: Option<String>,
    /// QUIC (UDP) address for mesh traffic and gossip [default: 127.0.0.1:7000].
    #[arg(long, env = "SHOAL_LISTEN")]
    pub listen: Option<String>,
    /// Admin HTTP address [default: 127.0.0.1:9000]. Keep it on loopback
    /// unless the network around it is trusted.
    #[arg(long, env = "SHOAL_ADMIN")]
    pub admin: Option<String>,
    /// Seed peer `host:port` (repeatable; a name resolving to several
    /// addresses counts as several seeds). Env: comma-separated.
    #[arg(long = "seed", env = "SHOAL_SEED", value_delimiter = ',')]
    pub seeds: Vec<String>,
    /// Certificate folder holding ca.pem, node.pem, node.key.
    #[arg(long, env = "SHOAL_CERTS")]
    pub certs: Option<PathBuf>,
    /// Zone this node runs in [default: default].
    #[arg(long, env = "SHOAL_ZONE")]
    pub zone: Option<String>,
    /// Zone pools: each zone gossips in its own pool, and a few
    /// representatives per zone carry zone summaries over a backbone pool
    /// [default: off].
    #[arg(long, env = "SHOAL_ZONE_POOLS")]
    pub zone_pools: bool,
    /// Representatives per zone on the backbone (with --zone-pools) [default: 3].
    #[arg(long, env = "SHOAL_ZONE_REPRESENTATIVES")]
    pub zone_representatives: Option<usize>,
    /// Folder for durable state (created if missing).
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Gossip round interval, e.g. 300ms or 1s [default: 300ms].
    #[arg(long, env = "SHOAL_GOSSIP_INTERVAL")]
    pub gossip_interval: Option<String>,
    /// Failure detector phi threshold [default: 8]; a member is dead after
    /// about threshold × gossip interval of silence.
    #[arg(long, env = "SHOAL_PHI_THRESHOLD")]
    pub phi_threshold: Option<f64>,
    /// File holding the bearer token that policy writes must present.
    /// Without it, policy writes are accepted from loopback only.
    #[arg(long, env = "SHOAL_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "SHOAL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Runtime worker threads [default: one per CPU]. A sidecar beside one
    /// app does best with 1, which runs every task on one thread (a
    /// current-thread runtime: no cross-thread wakeups per request).
    #[arg(long, env = "SHOAL_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Linux scheduling policy of the node's threads [default: normal].
    /// `batch`: a woken node does not preempt the running thread, which
    /// costs less CPU per request on a host with spare cores and adds
    /// latency when CPU-bound work fills them (docs/PROXY.md).
    #[arg(long, env = "SHOAL_SCHED_POLICY", value_enum)]
    pub sched_policy: Option<crate::sched::SchedPolicy>,
    /// TOML config file; flags and SHOAL_* variables override it.
    #[arg(long, env = "SHOAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// How long a node restarted with remembered peers (`--data-dir`) waits
    /// to hear from one before it is ready anyway [default: 30s].
    #[arg(long, env = "SHOAL_JOIN_TIMEOUT")]
    pub join_timeout: Option<String>,
    /// Print the effective configuration as TOML (a valid --config file)
    /// and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Proxy flags (services, outbound listener, timeouts).
    #[command(flatten)]
    pub proxy: proxy::ProxyArgs,
}

/// The `--config` file. Keys match the flags (with `_` for `-`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    listen: Option<String>,
    admin: Option<String>,
    #[serde(default)]
    seeds: Vec<String>,
    certs: Option<PathBuf>,
    zone: Option<String>,
    zone_pools: Option<bool>,
    zone_representatives: Option<usize>,
    data_dir: Option<PathBuf>,
    gossip_interval: Option<String>,
    phi_threshold: Option<f64>,
    admin_token_file: Option<PathBuf>,
    log_format: Option<LogFormat>,
    worker_threads: Option<usize>,
    sched_policy: Option<crate::sched::SchedPolicy>,
    #[serde(default)]
    service: Vec<proxy::config::ServiceFile>,
    outbound: Option<String>,
    #[serde(default)]
    upstream: Vec<proxy::config::UpstreamFile>,
    request_timeout: Option<String>,
    drain_timeout: Option<String>,
    tcp_idle_timeout: Option<String>,
    join_timeout: Option<String>,
    egress: Option<String>,
}

/// A node's complete, validated configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Node name.
    pub name: String,
    /// QUIC bind address.
    pub listen: SocketAddr,
    /// Admin HTTP bind address.
    pub admin: SocketAddr,
    /// Seeds as given (resolved by gossip, repeatedly).
    pub seeds: Vec<String>,
    /// Certificate folder.
    pub certs: PathBuf,
    /// Zone.
    pub zone: String,
    /// Whether each zone gossips in its own pool, with a backbone of
    /// representatives between zones.
    pub zone_pools: bool,
    /// Representatives per zone (zone pools on).
    pub zone_representatives: usize,
    /// Durable state folder.
    pub data_dir: Option<PathBuf>,
    /// Gossip interval.
    pub gossip_interval: Duration,
    /// Failure detector threshold.
    pub phi_threshold: f64,
    /// Bearer token file for policy writes.
    pub admin_token_file: Option<PathBuf>,
    /// Log format.
    pub log_format: LogFormat,
    /// Tokio worker threads of the `shoal node` process (`None`: one per CPU).
    /// Only the binary reads it; an in-process node runs on its caller's runtime.
    pub worker_threads: Option<usize>,
    /// Scheduling policy of the `shoal node` process's threads. Only the
    /// binary applies it, as for `worker_threads`.
    pub sched_policy: crate::sched::SchedPolicy,
    /// Optional wrapper for the QUIC socket (fault injection in `simulate`).
    pub socket_layer: Option<std::sync::Arc<dyn transport::socket::SocketLayer>>,
    /// Proxy settings.
    pub proxy: proxy::ProxyConfig,
    /// How long a restarted node that remembers peers waits for one before
    /// it is ready anyway.
    pub join_timeout: Duration,
}

impl NodeConfig {
    /// A loopback config for `name` on ephemeral ports (tests, `shoal up`).
    pub fn local(name: impl Into<String>, certs: impl Into<PathBuf>) -> Self {
        NodeConfig {
            name: name.into(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            seeds: Vec::new(),
            certs: certs.into(),
            zone: "default".into(),
            zone_pools: false,
            zone_representatives: DEFAULT_ZONE_REPRESENTATIVES,
            data_dir: None,
            gossip_interval: gossip::settings::INTERVAL,
            phi_threshold: gossip::settings::PHI_THRESHOLD,
            admin_token_file: None,
            log_format: LogFormat::Text,
            worker_threads: None,
            sched_policy: crate::sched::SchedPolicy::Normal,
            socket_layer: None,
            proxy: proxy::ProxyConfig::default(),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
        }
    }

    /// Merges flags, environment and file into a validated config.
    pub fn resolve(args: NodeArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        note_env_overrides(&file);
        let name = args
            .name
            .or(file.name)
            .ok_or_else(|| ConfigError::new("--name", "required"))?;
        check_name(&name)?;
        let listen = parse_addr(
            "--listen",
            &args
                .listen
                .or(file.listen)
                .unwrap_or("127.0.0.1:7000".into()),
        )?;
        let admin = parse_addr(
            "--admin",
            &args.admin.or(file.admin).unwrap_or("127.0.0.1:9000".into()),
        )?;
        let seeds = if args.seeds.is_empty() {
            file.seeds
        } else {
            args.seeds
        };
        for s in &seeds {
            check_seed(s)?;
        }
        let certs = args.certs.or(file.certs).ok_or_else(|| {
            ConfigError::new("--certs", "required (a folder from `shoal cert issue`)")
        })?;
        for f in ["ca.pem", "node.pem", "node.key"] {
            if !certs.join(f).is_file() {
                return Err(ConfigError::new(
                    "--certs",
                    format!("{} has no {f}", certs.display()),
                ));
            }
        }
        let gossip_interval = match args.gossip_interval.or(file.gossip_interval) {
            Some(s) => parse_duration(&s).map_err(|m| ConfigError::new("--gossip-interval", m))?,
            None => gossip::settings::INTERVAL,
        };
        if gossip_interval < Duration::from_millis(10) || gossip_interval > Duration::from_secs(60)
        {
            return Err(ConfigError::new(
                "--gossip-interval",
                "must be between 10ms and 60s",
            ));
        }
        let proxy = proxy::ProxyConfig::resolve(
            args.proxy,
            proxy::ProxyFile {
                service: file.service,
                outbound: file.outbound,
                upstream: file.upstream,
                request_timeout: file.request_timeout,
                drain_timeout: file.drain_timeout,
                egress: file.egress,
                tcp_idle_timeout: file.tcp_idle_timeout,
            },
        )?;
        let worker_threads = args.worker_threads.or(file.worker_threads);
        if let Some(n) = worker_threads
            && !(1..=1024).contains(&n)
        {
            return Err(ConfigError::new(
                "--worker-threads",
                "must be between 1 and 1024",
            ));
        }
        let join_timeout = match args.join_timeout.or(file.join_timeout) {
            Some(s) => parse_duration(&s).map_err(|m| ConfigError::new("--join-timeout", m))?,
            None => DEFAULT_JOIN_TIMEOUT,
        };
        let zone = args.zone.or(file.zone).unwrap_or("default".into());
        let zone_pools = args.zone_pools || file.zone_pools.unwrap_or(false);
        if zone_pools && !gossip::zone::valid_zone(&zone) {
            return Err(ConfigError::new(
                "--zone",
                "with --zone-pools, must be 1-64 characters of A-Z a-z 0-9 _ -",
            ));
        }
        let zone_representatives = args
            .zone_representatives
            .or(file.zone_representatives)
            .unwrap_or(DEFAULT_ZONE_REPRESENTATIVES);
        if !(1..=gossip::zone::MAX_REPRESENTATIVES).contains(&zone_representatives) {
            return Err(ConfigError::new(
                "--zone-representatives",
                format!(
                    "must be between 1 and {}",
                    gossip::zone::MAX_REPRESENTATIVES
                ),
            ));
        }
        let phi_threshold = args
            .phi_threshold
            .or(file.phi_threshold)
            .unwrap_or(gossip::settings::PHI_THRESHOLD);
        if !(1.0..=100.0).contains(&phi_threshold) {
            return Err(ConfigError::new(
                "--phi-threshold",
                "must be between 1 and 100",
            ));
        }
        Ok(NodeConfig {
            name,
            listen,
            admin,
            seeds,
            certs,
            zone,
            zone_pools,
            zone_representatives,
            data_dir: args.data_dir.or(file.data_dir),
            gossip_interval,
            phi_threshold,
            admin_token_file: args.admin_token_file.or(file.admin_token_file),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            worker_threads,
            sched_policy: args.sched_policy.or(file.sched_policy).unwrap_or_default(),
            socket_layer: None,
            proxy,
            join_timeout,
        })
    }
}

/// The effective configuration as a `--config` file (`shoal node
/// --print-config`): every key the file accepts, with the value in force,
/// and the flag-only settings as comments.
pub fn to_toml(c: &NodeConfig) -> String {
    #[derive(serde::Serialize)]
    struct Service {
        name: String,
        address: String,
        protocol: proxy::Protocol,
        #[serde(skip_serializing_if = "Option::is_none")]
        health_path: Option<String>,
        health_interval: String,
        weight: u32,
    }
    #[derive(serde::Serialize)]
    struct Upstream {
        service: String,
        listen: String,
    }
    #[derive(serde::Serialize)]
    struct File {
        name: String,
        listen: String,
        admin: String,
        seeds: Vec<String>,
        certs: PathBuf,
        zone: String,
        zone_pools: bool,
        zone_representatives: usize,
        #[serde(skip_serializing_if = "Option::is_none")]
        data_dir: Option<PathBuf>,
        gossip_interval: String,
        phi_threshold: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        admin_token_file: Option<PathBuf>,
        log_format: LogFormat,
        #[serde(skip_serializing_if = "Option::is_none")]
        worker_threads: Option<usize>,
        sched_policy: crate::sched::SchedPolicy,
        #[serde(skip_serializing_if = "Option::is_none")]
        outbound: Option<String>,
        request_timeout: String,
        drain_timeout: String,
        tcp_idle_timeout: String,
        join_timeout: String,
        egress: String,
        service: Vec<Service>,
        upstream: Vec<Upstream>,
    }
    let p = &c.proxy;
    let file = File {
        name: c.name.clone(),
        listen: c.listen.to_string(),
        admin: c.admin.to_string(),
        seeds: c.seeds.clone(),
        certs: c.certs.clone(),
        zone: c.zone.clone(),
        zone_pools: c.zone_pools,
        zone_representatives: c.zone_representatives,
        data_dir: c.data_dir.clone(),
        gossip_interval: duration_text(c.gossip_interval),
        phi_threshold: c.phi_threshold,
        admin_token_file: c.admin_token_file.clone(),
        log_format: c.log_format,
        worker_threads: c.worker_threads,
        sched_policy: c.sched_policy,
        outbound: p.outbound.map(|a| a.to_string()),
        request_timeout: duration_text(p.request_timeout),
        drain_timeout: duration_text(p.drain_timeout),
        tcp_idle_timeout: duration_text(p.tcp_idle_timeout),
        join_timeout: duration_text(c.join_timeout),
        egress: p.egress.to_string(),
        service: p
            .services
            .iter()
            .map(|s| Service {
                name: s.name.clone(),
                address: s.addr.to_string(),
                protocol: s.protocol,
                health_path: s.health_path.clone(),
                health_interval: duration_text(s.health_interval),
                weight: s.weight,
            })
            .collect(),
        upstream: p
            .upstreams
            .iter()
            .map(|u| Upstream {
                service: u.service.clone(),
                listen: u.listen.to_string(),
            })
            .collect(),
    };
    let mut out = toml::to_string(&file).unwrap_or_else(|e| format!("# cannot encode: {e}\n"));
    out.push_str(&format!(
        "\n# Flag and SHOAL_* only (no config key):\n\
         # --header-read-timeout {}\n# --http-idle-timeout {}\n\
         # --max-connections {}\n# --admin-max-connections {}\n",
        duration_text(p.header_read_timeout),
        duration_text(p.http_idle_timeout),
        p.max_connections,
        p.admin_max_connections,
    ));
    out
}

/// A duration as `parse_duration` reads it back: whole seconds as `Ns`,
/// anything else in milliseconds.
fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new("--config", format!("{}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().replace('\n', " ");
        let (line, key) = locate_error(&text, e.span(), &msg);
        let at = match line {
            Some(n) => format!("{}:{n}", path.display()),
            None => path.display().to_string(),
        };
        ConfigError::new(
            format!("{at}: {}", key.unwrap_or_else(|| "file".into())),
            msg,
        )
    })
}

/// The line (1-based) and key a TOML error is about. An unknown key is
/// named by the message itself (its span covers the whole table, so the
/// text around it would name a neighbour); other errors point at a value,
/// whose line starts with its key.
fn locate_error(
    text: &str,
    span: Option<std::ops::Range<usize>>,
    msg: &str,
) -> (Option<usize>, Option<String>) {
    let key_of = |line: &str| {
        let k = line.split('=').next().unwrap_or("").trim();
        (!k.is_empty() && !k.starts_with('[')).then(|| k.to_string())
    };
    if let Some(rest) = msg.strip_prefix("unknown field `")
        && let Some((field, _)) = rest.split_once('`')
    {
        let from_line = span
            .as_ref()
            .map_or(0, |s| text[..s.start.min(text.len())].matches('\n').count());
        let found = text
            .lines()
            .enumerate()
            .skip(from_line)
            .find(|(_, l)| key_of(l).as_deref() == Some(field))
            .map(|(i, _)| i + 1);
        return (found, Some(field.to_string()));
    }
    let Some(span) = span else {
        return (None, None);
    };
    let start = span.start.min(text.len());
    let line_no = text[..start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = key_of(line).or_else(|| {
        // A value on its own line (an array or table) belongs to the
        // nearest key above it.
        text[..start].lines().rev().find_map(key_of)
    });
    (Some(line_no), key)
}

/// Logs each `SHOAL_*` variable that overrides a value the file set.
fn note_env_overrides(file: &FileConfig) {
    let set = [
        ("SHOAL_NAME", file.name.is_some()),
        ("SHOAL_LISTEN", file.listen.is_some()),
        ("SHOAL_ADMIN", file.admin.is_some()),
        ("SHOAL_SEED", !file.seeds.is_empty()),
        ("SHOAL_CERTS", file.certs.is_some()),
        ("SHOAL_ZONE", file.zone.is_some()),
        ("SHOAL_ZONE_POOLS", file.zone_pools.is_some()),
        (
            "SHOAL_ZONE_REPRESENTATIVES",
            file.zone_representatives.is_some(),
        ),
        ("SHOAL_DATA_DIR", file.data_dir.is_some()),
        ("SHOAL_GOSSIP_INTERVAL", file.gossip_interval.is_some()),
        ("SHOAL_PHI_THRESHOLD", file.phi_threshold.is_some()),
        ("SHOAL_ADMIN_TOKEN_FILE", file.admin_token_file.is_some()),
        ("SHOAL_LOG_FORMAT", file.log_format.is_some()),
        ("SHOAL_WORKER_THREADS", file.worker_threads.is_some()),
        ("SHOAL_SCHED_POLICY", file.sched_policy.is_some()),
        ("SHOAL_SERVICE", !file.service.is_empty()),
        ("SHOAL_OUTBOUND", file.outbound.is_some()),
        ("SHOAL_UPSTREAM", !file.upstream.is_empty()),
        ("SHOAL_REQUEST_TIMEOUT", file.request_timeout.is_some()),
        ("SHOAL_DRAIN_TIMEOUT", file.drain_timeout.is_some()),
        ("SHOAL_TCP_IDLE_TIMEOUT", file.tcp_idle_timeout.is_some()),
        ("SHOAL_JOIN_TIMEOUT", file.join_timeout.is_some()),
        ("SHOAL_EGRESS", file.egress.is_some()),
    ];
    for (var, in_file) in set {
        if in_file && std::env::var_os(var).is_some() {
            eprintln!("shoal: note: {var} overrides the config file's value");
        }
    }
}

fn check_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "--name",
            format!("{name:?}: use letters, digits, '-', '_', '.' (1-63 chars)"),
        ))
    }
}

fn parse_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.to_socket_addrs()
        .map_err(|e| ConfigError::new(field, format!("{s:?}: {e}")))?
        .next()
        .ok_or_else(|| ConfigError::new(field, format!("{s:?} resolves to no address")))
}

fn check_seed(s: &str) -> Result<(), ConfigError> {
    let ok = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(
            "--seed",
            format!("{s:?} is not host:port"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5y").is_err());
    }

    fn certs_dir() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        d
    }

    #[test]
    fn flags_override_file_and_errors_name_the_field() {
        let certs = certs_dir();
        let file = certs.path().join("shoal.toml");
        std::fs::write(
            &file,
            format!(
                "name = \"from-file\"\nzone = \"z1\"\ncerts = \"{}\"\n",
                certs.path().display()
            ),
        )
        .unwrap();
        let args = NodeArgs {
            name: Some("from-flag".into()),
            config: Some(file.clone()),
            ..Default::default()
        };
        let cfg = NodeConfig::resolve(args).unwrap();
        assert_eq!(cfg.name, "from-flag");
        assert_eq!(cfg.zone, "z1");
        assert_eq!(cfg.worker_threads, None);

        let err = NodeConfig::resolve(NodeArgs {
            name: Some("n".into()),
            certs: Some(certs.path().into()),
            worker_threads: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "--worker-threads");

        std::fs::write(&file, "name = \"x\"\nbogus = 1\n").unwrap();
        let err = NodeConfig::resolve(NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");

        std::fs::write(&file, "name = \"x\"\nphi_threshold = \"high\"\n").unwrap();
        let err = NodeConfig::resolve(NodeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.field.contains("phi_threshold"), "{err}");

        let err = NodeConfig::resolve(NodeArgs {
            name: Some("n".into()),
            certs: Some(certs.path().into()),
            gossip_interval: Some("fast".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "--gossip-interval");
    }

    #[test]
    fn zone_pools_from_file_and_flags_with_their_bounds() {
        let certs = certs_dir();
        let file = certs.path().join("shoal.toml");
        std::fs::write(
            &file,
            format!(
                "name = \"n1\"\nzone = \"eu-1\"\nzone_pools = true\nzone_representatives = 2\ncerts = \"{}\"\n",
                certs.path().display()
            ),
        )
        .unwrap();
        let cfg = NodeConfig::resolve(NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        assert!(cfg.zone_pools);
        assert_eq!(cfg.zone_representatives, 2);
        let back = to_toml(&cfg);
        assert!(back.contains("zone_pools = true"), "{back}");

        let off = NodeConfig::resolve(NodeArgs {
            name: Some("n".into()),
            certs: Some(certs.path().into()),
            ..Default::default()
        })
        .unwrap();
        assert!(!off.zone_pools);
        assert_eq!(off.zone_representatives, DEFAULT_ZONE_REPRESENTATIVES);

        let err = NodeConfig::resolve(NodeArgs {
            name: Some("n".into()),
            certs: Some(certs.path().into()),
            zone: Some("eu.1".into()),
            zone_pools: true,
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "--zone");
        let err = NodeConfig::resolve(NodeArgs {
            name: Some("n".into()),
            certs: Some(certs.path().into()),
            zone_representatives: Some(0),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "--zone-representatives");
    }
}

#[cfg(test)]
mod error_location_tests {
    use super::{NodeArgs, NodeConfig, to_toml};

    fn certs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        d
    }

    fn error_of(text: &str) -> String {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("shoal.toml");
        std::fs::write(&file, text).unwrap();
        let err = NodeConfig::resolve(NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err();
        err.to_string()
            .replace(&file.display().to_string(), "shoal.toml")
    }

    #[test]
    fn config_file_errors_name_the_field_its_file_and_line() {
        let e = error_of("name = \"n1\"\nzone = \"z\"\ncertz = \"x\"\n");
        assert!(
            e.starts_with("shoal.toml:3: certz: unknown field `certz`"),
            "{e}"
        );
        let e = error_of("name = \"n1\"\n\nphi_threshold = \"high\"\n");
        assert!(e.starts_with("shoal.toml:3: phi_threshold: "), "{e}");
        let e = error_of("name = \"n1\"\n[[service]]\nname = \"web\"\nadress = \"x\"\n");
        assert!(
            e.starts_with("shoal.toml:4: adress: unknown field `adress`"),
            "{e}"
        );
    }

    #[test]
    fn print_config_is_a_config_file_that_reads_back_the_same() {
        let c = certs();
        let cfg = NodeConfig::resolve(NodeArgs {
            name: Some("n1".into()),
            certs: Some(c.path().into()),
            seeds: vec!["127.0.0.1:7001".into()],
            join_timeout: Some("1500ms".into()),
            proxy: proxy::ProxyArgs {
                services: vec!["web=127.0.0.1:8080".into()],
                outbound: Some("127.0.0.1:4140".into()),
                ..Default::default()
            },
            ..Default::default()
        })
        .unwrap();
        let text = to_toml(&cfg);
        assert!(text.contains("join_timeout = \"1500ms\""), "{text}");
        assert!(text.contains("[[service]]"), "{text}");
        let file = c.path().join("printed.toml");
        std::fs::write(&file, &text).unwrap();
        let back = NodeConfig::resolve(NodeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(to_toml(&back), text);
        assert_eq!(back.seeds, cfg.seeds);
        assert_eq!(back.proxy.services.len(), 1);
    }
}

#[cfg(test)]
mod file_tests {
    use std::time::Duration;

    use proxy::config::{Protocol, UpstreamListener};

    use super::{NodeArgs, NodeConfig};

    #[test]
    fn node_config_reads_service_tables_and_proxy_keys() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "node.pem", "node.key"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let file = dir.path().join("shoal.toml");
        std::fs::write(
            &file,
            format!(
                r#"name = "n2"
certs = "{}"
outbound = "127.0.0.1:4140"
request_timeout = "5s"
drain_timeout = "10s"

[[service]]
name = "web"
address = "127.0.0.1:8080"
health_path = "/healthz"
health_interval = "500ms"

[[service]]
name = "grpc"
address = "127.0.0.1:9090"
protocol = "h2c"
weight = 50

[[upstream]]
service = "web"
listen = "127.0.0.1:4141"
"#,
                dir.path().display()
            ),
        )
        .unwrap();
        let c = NodeConfig::resolve(NodeArgs {
            config: Some(file.clone()),
            ..Default::default()
        })
        .unwrap();
        let p = &c.proxy;
        assert_eq!(p.outbound, Some("127.0.0.1:4140".parse().unwrap()));
        assert_eq!(p.request_timeout, Duration::from_secs(5));
        assert_eq!(p.drain_timeout, Duration::from_secs(10));
        assert_eq!(p.services.len(), 2);
        assert_eq!(p.services[0].health_interval, Duration::from_millis(500));
        assert_eq!(p.services[1].protocol, Protocol::H2c);
        assert_eq!(p.services[1].weight, 50);
        assert_eq!(
            p.upstreams,
            vec![UpstreamListener {
                service: "web".into(),
                listen: "127.0.0.1:4141".parse().unwrap(),
            }]
        );

        std::fs::write(
            &file,
            format!(
                "name = \"n\"\ncerts = \"{}\"\n[[service]]\nname = \"web\"\naddress = \"nowhere\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let err = NodeConfig::resolve(NodeArgs {
            config: Some(file),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(err.field, "service[0].address", "{err}");
    }
}
