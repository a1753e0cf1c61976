//! The `shoal` command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use transport::certs::{self, Validity};

use crate::config::{EXIT_USAGE, LogFormat, NodeArgs, NodeConfig};
use crate::node::Node;

/// Shoal: a service mesh with no control plane.
#[derive(Debug, Parser)]
#[command(name = "shoal", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a mesh node.
    Node(Box<NodeArgs>),
    /// Make the mesh CA, node certificates and operator certificates.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Print the member list of a running node as a table.
    Members {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:9000", env = "SHOAL_ADMIN")]
        admin: String,
    },
    /// Push, read and delete policies through any node's admin API.
    Policy(PolicyArgs),
    /// Print per-edge traffic over the last minute (rps, success, latency).
    Stat(crate::cli_stat::StatArgs),
    /// Stream live request events from a node (one line each) until Ctrl-C.
    Tap(crate::cli_stat::TapArgs),
    /// Run a throwaway local mesh of N nodes in one process, until Ctrl-C.
    Up {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
    },
    /// Run a node and an app beside it: start the node, wait until it is
    /// ready, start APP with SHOAL_OUTBOUND and http_proxy set, forward
    /// SIGTERM/SIGINT to it, and when it exits drain the node and exit
    /// with the app's code.
    Run(Box<RunArgs>),
    /// Wait until a node is ready (its /readyz answers 200); exit 1 on timeout.
    Await {
        /// The node's admin address.
        #[arg(long, default_value = "127.0.0.1:9000", env = "SHOAL_ADMIN")]
        admin: String,
        /// How long to wait, e.g. 30s or 500ms.
        #[arg(long, default_value = "30s")]
        timeout: String,
    },
    /// Check a node's setup without starting it: certificates, ports,
    /// seeds (a real QUIC handshake), data dir, admin token. One line per
    /// check; exit 1 if any fails.
    Check(Box<NodeArgs>),
}

/// `shoal run` arguments: node flags, then `--`, then the app.
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// The app and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "APP")]
    app: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct PolicyArgs {
    /// Admin address of any node.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:9000",
        env = "SHOAL_ADMIN"
    )]
    admin: String,
    /// File holding the node's admin bearer token.
    #[arg(long, global = true, env = "SHOAL_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Operator certificate folder (operator.pem, operator.key from
    /// `shoal cert issue-operator`); apply and delete are signed with it.
    #[arg(long, global = true, env = "SHOAL_OPERATOR")]
    operator_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Create or replace the policy in a YAML or JSON file.
    Apply {
        /// The document.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Return only once every live node runs the new version.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "10s")]
        timeout: String,
    },
    /// List policies: kind, name, version, origin node, applied-on count.
    List,
    /// Print one policy.
    Get {
        /// Kind, e.g. HTTPRoute.
        kind: String,
        /// Name.
        name: String,
        /// Output format.
        #[arg(short = 'o', long = "output", default_value = "yaml", value_parser = ["yaml", "json"])]
        output: String,
    },
    /// Delete a policy (a tombstone that propagates like a write).
    Delete {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// Return only once every live node has applied the delete.
        #[arg(long)]
        wait: bool,
    },
    /// Per node: which version of each policy it runs.
    Status,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Make a new mesh CA: OUT/ca.pem and OUT/ca.key (mode 0600).
    /// Key: ECDSA P-256 with SHA-256. Validity: --days, default 3650 (10 years).
    Init {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Trust domain, the host part of every SPIFFE ID in this mesh.
        #[arg(long)]
        trust_domain: String,
        /// Validity in days.
        #[arg(long, default_value_t = certs::DEFAULT_CA_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a node certificate: OUT/{ca.pem,node.pem,node.key} (key mode 0600).
    /// URI SANs: spiffe://<td>/node/<name> and spiffe://<td>/svc/<service> per
    /// --service. Key: ECDSA P-256 with SHA-256. Validity: --days, default 365.
    Issue {
        /// Folder holding the CA (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// Node name.
        #[arg(long)]
        name: String,
        /// Service this node may serve or call as (repeatable).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = certs::DEFAULT_NODE_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Reissue a node certificate from the CA with the same node and service
    /// names and a new key (node.pem, node.key in --certs; ca.pem is left
    /// alone). A running node picks it up within seconds.
    Renew {
        /// Folder holding the CA (ca.pem, ca.key); its certificate must be
        /// in --certs/ca.pem.
        #[arg(long)]
        ca: PathBuf,
        /// The node's certificate folder (ca.pem, node.pem, node.key).
        #[arg(long)]
        certs: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = certs::DEFAULT_NODE_DAYS)]
        days: u32,
    },
    /// Issue an operator certificate, the one that signs policy writes:
    /// OUT/{ca.pem,operator.pem,operator.key} (key mode 0600). URI SAN:
    /// spiffe://<td>/operator/<name> only (not usable as a node).
    /// Key: ECDSA P-256 with SHA-256. Validity: --days, default 90.
    IssueOperator {
        /// Folder holding the CA (ca.pem, ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// Operator name.
        #[arg(long)]
        name: String,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = certs::DEFAULT_OPERATOR_DAYS)]
        days: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Parses the command line, runs the command, returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let code = match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => 0,
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => EXIT_USAGE,
                _ => EXIT_USAGE,
            };
            if code == 0 {
                let _ = e.print();
            } else {
                let msg = e.to_string();
                let first = msg.lines().next().unwrap_or("bad usage");
                eprintln!("shoal: {}", first.trim_start_matches("error: "));
            }
            return code;
        }
    };
    match cli.command {
        Command::Cert(c) => cert(c),
        Command::Node(args) => {
            let print_config = args.print_config;
            let config = match NodeConfig::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shoal: invalid configuration: {e}");
                    return EXIT_USAGE;
                }
            };
            if print_config {
                print!("{}", crate::config::to_toml(&config));
                return 0;
            }
            init_tracing(config.log_format);
            node_runtime(&config).block_on(run_node(config))
        }
        Command::Members { admin } => runtime().block_on(members(&admin)),
        Command::Policy(args) => runtime().block_on(crate::cli_policy::run(
            &args.admin,
            args.token_file.as_deref(),
            args.operator_cert.as_deref(),
            args.command,
        )),
        Command::Stat(args) => runtime().block_on(crate::cli_stat::stat_command(args)),
        Command::Tap(args) => runtime().block_on(crate::cli_stat::tap_command(args)),
        Command::Up { nodes } => {
            if nodes == 0 || nodes > 64 {
                eprintln!("shoal: --nodes: must be between 1 and 64");
                return EXIT_USAGE;
            }
            init_tracing(LogFormat::Text);
            runtime().block_on(crate::up::run(nodes))
        }
        Command::Run(args) => {
            let RunArgs { node, app } = *args;
            let config = match NodeConfig::resolve(node) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("shoal: invalid configuration: {e}");
                    return EXIT_USAGE;
                }
            };
            init_tracing(config.log_format);
            node_runtime(&config).block_on(crate::cli_life::run_app(config, app))
        }
        Command::Await { admin, timeout } => {
            let timeout = match crate::config::parse_duration(&timeout) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("shoal: --timeout: {e}");
                    return EXIT_USAGE;
                }
            };
            runtime().block_on(crate::cli_life::await_ready(&admin, timeout))
        }
        Command::Check(args) => {
            let config = match NodeConfig::resolve(*args) {
                Ok(c) => c,
                Err(e) => {
                    println!("FAIL  configuration: {e}");
                    return EXIT_USAGE;
                }
            };
            transport::install_crypto_provider();
            runtime().block_on(crate::cli_life::check(config))
        }
    }
}

/// The node's runtime: `threads` workers (default one per CPU). One thread
/// is a current-thread runtime: every task runs on the thread that called
/// `block_on`, with no work-stealing queues or cross-thread wake-ups (in
/// `bench proxy` this cut a node's CPU per request; see docs/PROXY.md).
/// The threads take `--sched-policy` first, so every one the runtime starts
/// inherits it.
fn node_runtime(config: &NodeConfig) -> tokio::runtime::Runtime {
    if let Err(e) = crate::sched::apply(config.sched_policy) {
        tracing::warn!(
            "--sched-policy {:?}: cannot set it ({e}); the node runs under the kernel's default",
            config.sched_policy
        );
    }
    let mut b = match config.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    b.enable_all().build().expect("tokio runtime")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Sets up `tracing` output on stderr (level from `RUST_LOG`, default info).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person watching a terminal; NO_COLOR turns it off.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn cert(c: CertCommand) -> i32 {
    let result = match c {
        CertCommand::Init {
            out,
            trust_domain,
            days,
            force,
        } => certs::init_ca(&out, &trust_domain, days, force).map(|_| {
            println!(
                "wrote {0}/ca.pem and {0}/ca.key (trust domain {trust_domain})",
                out.display()
            )
        }),
        CertCommand::Issue {
            ca,
            name,
            services,
            out,
            days,
            force,
        } => {
            certs::issue_node(&ca, &name, &services, &out, Validity::days(days), force).map(|_| {
                println!(
                    "wrote {0}/ca.pem, {0}/node.pem and {0}/node.key for node {name}",
                    out.display()
                )
            })
        }
        CertCommand::Renew { ca, certs: dir, days } => {
            certs::renew_node(&ca, &dir, Validity::days(days)).map(|r| {
                let services = if r.services.is_empty() {
                    "no services".to_string()
                } else {
                    format!("services {}", r.services.join(","))
                };
                println!(
                    "renewed {}/node.pem for node {} ({services}) for {days} days; a running node uses it for its next handshake",
                    dir.display(),
                    r.node
                )
            })
        }
        CertCommand::IssueOperator {
            ca,
            name,
            out,
            days,
            force,
        } => certs::issue_operator(&ca, &name, &out, Validity::days(days), force).map(|_| {
            println!(
                "wrote {0}/ca.pem, {0}/operator.pem and {0}/operator.key for operator {name}",
                out.display()
            )
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("shoal: {e}");
            match e {
                certs::CertError::Exists(_) | certs::CertError::InvalidName(_) => EXIT_USAGE,
                _ => 1,
            }
        }
    }
}

async fn run_node(config: NodeConfig) -> i32 {
    let name = config.name.clone();
    let node = match Node::start(config).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("shoal: node {name}: {e}");
            return 1;
        }
    };
    let outbound = node
        .outbound_addr()
        .map_or(String::new(), |a| format!(" outbound={a}"));
    println!(
        "shoal node {} ready quic={} admin={}{outbound}",
        node.name(),
        node.quic_addr(),
        node.admin_addr()
    );
    crate::resident::spawn_code_release();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = node.stop_requested() => tracing::info!("shutdown requested through the admin API"),
        (code, why) = node.fatal() => {
            eprintln!("shoal: node {name}: {why}");
            node.kill().await;
            return code;
        }
    }
    let signalled = std::time::Instant::now();
    tracing::info!("draining, then leaving the mesh");
    let cut = node.drain().await;
    if cut > 0 {
        tracing::warn!(cut, "drain timeout passed with requests in flight");
    }
    tracing::info!(took = ?signalled.elapsed(), "stopped");
    0
}

/// Waits for SIGTERM or SIGINT (Ctrl-C).
pub async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn members(admin: &str) -> i32 {
    match get_json::<Vec<serde_json::Value>>(admin, "/v1/members").await {
        Ok(members) => {
            print!("{}", members_table(&members));
            0
        }
        Err(code) => code,
    }
}

/// GETs and decodes JSON from an admin address; on failure prints one line
/// naming the address and returns exit code 1.
pub async fn get_json<T: serde::de::DeserializeOwned>(admin: &str, path: &str) -> Result<T, i32> {
    let body = get(admin, path).await.map_err(|e| {
        eprintln!("shoal: {e}");
        1
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        eprintln!("shoal: admin API at {admin}: unexpected answer: {e}");
        1
    })
}

/// Left-aligned columns two spaces apart, one row a line.
pub fn render_table<R: AsRef<[String]>>(rows: &[R]) -> String {
    let cols = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .map(|r| r.as_ref().get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Renders `/v1/members` JSON as a table.
pub fn members_table(members: &[serde_json::Value]) -> String {
    let header = [
        "NAME",
        "ADDR",
        "STATE",
        "SERVING",
        "ZONE",
        "SERVICES",
        "LAST SEEN",
    ];
    let mut rows: Vec<[String; 7]> = vec![header.map(String::from)];
    for m in members {
        let s = |k: &str| m[k].as_str().unwrap_or("-").to_string();
        let services = m["services"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or("-".into());
        let mut name = s("name");
        if m["self"].as_bool() == Some(true) {
            name.push_str(" (self)");
        }
        let seen = m["last_seen_ms"].as_u64().unwrap_or(0);
        rows.push([
            name,
            s("addr"),
            s("state"),
            s("serving"),
            s("zone"),
            services,
            format!("{:.1}s", seen as f64 / 1000.0),
        ]);
    }
    render_table(&rows)
}

/// A plain HTTP/1.1 GET to an admin address; returns the body of a 2xx answer.
pub async fn get(admin: &str, path: &str) -> Result<bytes::Bytes, String> {
    let (status, body) = request(admin, http::Method::GET, path, &[], bytes::Bytes::new()).await?;
    if !status.is_success() {
        return Err(format!(
            "admin API at {admin}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    Ok(body)
}

/// One HTTP/1.1 request to an admin address; returns status and body. A
/// failure to reach it names the address tried and how to pick another.
pub async fn request(
    admin: &str,
    method: http::Method,
    path: &str,
    headers: &[(&str, String)],
    body: bytes::Bytes,
) -> Result<(http::StatusCode, bytes::Bytes), String> {
    request_inner(admin, method, path, headers, body)
        .await
        .map_err(|e| {
            format!("admin API at {admin}: {e} (is a node's admin API there? pass --admin ADDR or set SHOAL_ADMIN)")
        })
}

async fn request_inner(
    admin: &str,
    method: http::Method,
    path: &str,
    headers: &[(&str, String)],
    body: bytes::Bytes,
) -> Result<(http::StatusCode, bytes::Bytes), String> {
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(admin),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, admin);
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let req = req
        .body(http_body_util::Full::new(body))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}
