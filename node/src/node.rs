//! A running node: QUIC endpoint, gossip, admin API.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gossip::{Gossip, GossipConfig, Member, MemberState, NodeRecord};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use transport::{Endpoint, EndpointConfig, TlsFiles};

use crate::config::NodeConfig;
use crate::metrics::Metrics;
use policy::{PolicyMetrics, PolicyPlane, PolicyStore, PolicySync, StoreError};
use proxy::Proxy;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("certificate {0}")]
    Certificate(String),
    #[error("QUIC endpoint: {0}")]
    Endpoint(#[from] transport::EndpointError),
    #[error("gossip: {0}")]
    Gossip(#[from] gossip::GossipError),
    #[error("admin listener {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("policy store: {0}")]
    Policy(#[from] StoreError),
    #[error("admin token file {path}: {msg}")]
    Token {
        path: std::path::PathBuf,
        msg: String,
    },
    #[error("proxy: {0}")]
    Proxy(#[from] proxy::ProxyError),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The shortest admin token a node accepts.
pub const MIN_TOKEN_CHARS: usize = 16;

/// What the admin API and other parts of the node share.
pub(crate) struct NodeState {
    pub gossip: Gossip,
    pub metrics: Metrics,
    pub store: Arc<PolicyStore>,
    pub sync: PolicySync,
    pub policy_metrics: PolicyMetrics,
    pub admin_token: Option<String>,
    pub proxy: Arc<Proxy>,
    /// Whether the node is routable, and why not (`/readyz`).
    pub readiness: Arc<crate::lifecycle::Readiness>,
    /// Flipped by `POST /shutdown`: the process drains and exits.
    pub stop: watch::Sender<bool>,
}

/// A running node.
pub struct Node {
    config: NodeConfig,
    endpoint: Endpoint,
    gossip: Gossip,
    admin_addr: SocketAddr,
    store: Arc<PolicyStore>,
    proxy: Arc<Proxy>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    state: Arc<NodeState>,
    zones: Option<Arc<gossip::zone::ZoneAgent>>,
}

impl Node {
    /// Starts a node: binds QUIC and admin listeners, joins gossip.
    pub async fn start(config: NodeConfig) -> Result<Self, NodeError> {
        transport::install_crypto_provider();
        if let Some(dir) = &config.data_dir {
            std::fs::create_dir_all(dir).map_err(|source| NodeError::DataDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ep_config = EndpointConfig::new(config.listen, TlsFiles::new(&config.certs));
        ep_config.socket_layer = config.socket_layer.clone();
        ep_config.expected_node = Some(config.name.clone());
        let endpoint = Endpoint::bind(ep_config)?;
        // A chitchat message is one UDP datagram: at most 64 KiB.
        endpoint.limit_channel(gossip::GOSSIP_CHANNEL, 64 << 10);
        let identity = endpoint.identity();
        if identity.node != config.name {
            endpoint.close();
            return Err(NodeError::Certificate(format!(
                "names node {:?} but this node is {:?}",
                identity.node, config.name
            )));
        }

        let admin_listener =
            TcpListener::bind(config.admin)
                .await
                .map_err(|source| NodeError::Admin {
                    addr: config.admin,
                    source,
                })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Admin {
                addr: config.admin,
                source,
            })?;

        // Peers remembered from the last run are extra seeds, so a node
        // restarted without --seed finds its mesh again.
        let remembered = config
            .data_dir
            .as_deref()
            .map(crate::lifecycle::remembered_peers)
            .unwrap_or_default();
        let mut seeds = config.seeds.clone();
        for p in &remembered {
            let addr = p.addr.to_string();
            if p.addr != endpoint.local_addr() && !seeds.contains(&addr) {
                seeds.push(addr);
            }
        }
        let mut gossip_config = GossipConfig::new(config.name.clone());
        gossip_config.seeds = seeds.clone();
        gossip_config.interval = config.gossip_interval;
        gossip_config.phi_threshold = config.phi_threshold;
        if config.zone_pools {
            gossip_config.cluster_id = gossip::zone::zone_cluster(&config.zone);
            gossip_config.pool = gossip::Pool::Zone {
                zone: config.zone.clone(),
                representatives: config.zone_representatives,
            };
        }
        let record = NodeRecord::new(
            config.zone.clone(),
            admin_addr.to_string(),
            identity.services.clone(),
        );
        let gossip_trust = gossip::Trust::from_dir(&config.certs)?;
        let gossip = Gossip::start(
            endpoint.clone(),
            gossip_config,
            record.clone(),
            gossip_trust.clone(),
        )
        .await?;
        let zones = gossip::zone::ZoneAgent::spawn(
            gossip.clone(),
            endpoint.clone(),
            gossip_trust,
            record,
            seeds.clone(),
        )
        .map(Arc::new);

        let admin_token = match &config.admin_token_file {
            Some(path) => Some(read_token(path)?),
            None => None,
        };
        if config.data_dir.is_none() {
            tracing::warn!("no --data-dir: accepted policies are kept in memory only");
        }
        let store = Arc::new(PolicyStore::open(&config.name, config.data_dir.as_deref())?);
        let mut metrics = Metrics::new(endpoint.clone(), gossip.clone());
        crate::metrics::register_cert_expiry(
            metrics.registry_mut(),
            config.certs.clone(),
            store.clone(),
        );
        let policy_metrics = PolicyMetrics::new(metrics.registry_mut());
        let trust = policy::Trust::from_cert_dir(&config.certs, &identity.trust_domain)
            .map_err(|e| NodeError::Certificate(format!("CA for operator signatures: {e}")))?;
        let sync = PolicySync::new(
            store.clone(),
            gossip.clone(),
            endpoint.clone(),
            policy_metrics.clone(),
            Arc::new(trust),
        );
        let mut tasks = sync.spawn();
        if let Some(z) = &zones {
            tasks.push(tokio::spawn(relay_policy_over_backbone(
                sync.clone(),
                z.backbone(),
            )));
        }
        tasks.push(tokio::spawn(crate::clock::serve(endpoint.clone())));
        let proxy = Arc::new(
            Proxy::start(
                &proxy::NodeInfo {
                    name: config.name.clone(),
                    zone: config.zone.clone(),
                    proxy: config.proxy.clone(),
                },
                endpoint.clone(),
                gossip.clone(),
                metrics.registry_mut(),
                PolicyPlane {
                    store: store.clone(),
                    limiter: Default::default(),
                    metrics: policy_metrics.clone(),
                },
            )
            .await?,
        );
        let readiness = Arc::new(crate::lifecycle::Readiness::new(
            seeds.clone(),
            !remembered.is_empty(),
            config.gossip_interval * 3,
        ));
        let (stop, _) = watch::channel(false);
        let state = Arc::new(NodeState {
            readiness: readiness.clone(),
            stop,
            gossip: gossip.clone(),
            metrics,
            proxy: proxy.clone(),
            store: store.clone(),
            sync,
            policy_metrics,
            admin_token,
        });
        tasks.push(tokio::spawn(drop_dead_connections(
            gossip.clone(),
            endpoint.clone(),
        )));
        tasks.extend(lifecycle_tasks(
            &config, &gossip, &endpoint, readiness, seeds,
        ));
        let (shutdown, shutdown_rx) = watch::channel(false);
        tasks.push(tokio::spawn(crate::admin::serve(
            admin_listener,
            state.clone(),
            shutdown_rx,
        )));
        tracing::info!(
            node = %config.name,
            quic = %endpoint.local_addr(),
            admin = %admin_addr,
            "node started"
        );
        Ok(Node {
            config,
            endpoint,
            gossip,
            admin_addr,
            store,
            proxy,
            shutdown,
            tasks,
            state,
            zones,
        })
    }

    /// `Ok` once the node is routable (what `/readyz` answers 200 to);
    /// otherwise why not.
    pub async fn ready(&self) -> Result<(), String> {
        self.state.readiness.check(&self.state).await
    }

    /// Resolves when someone asked this node to stop (`POST /shutdown`).
    pub async fn stop_requested(&self) {
        let mut rx = self.state.stop.subscribe();
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Resolves when the node must stop: gossip died (exit code 70: the
    /// view of the mesh would be frozen), or another live node with this
    /// node's name was found during start-up (exit code 78). A duplicate
    /// found later only makes the node unready (see `/readyz`).
    pub async fn fatal(&self) -> (i32, String) {
        let started = std::time::Instant::now();
        let window = (self.config.gossip_interval * 12).max(Duration::from_secs(10));
        loop {
            if let Some(why) = self.gossip.failure() {
                return (
                    70,
                    format!("gossip stopped ({why}); exiting instead of serving a frozen view"),
                );
            }
            if let Some(other) = self.gossip.duplicate_of_self()
                && started.elapsed() < window
            {
                return (
                    78,
                    format!(
                        "another node named {} is alive at {other}; refusing to start",
                        self.config.name
                    ),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Node name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The gossip participant.
    pub fn gossip(&self) -> &Gossip {
        &self.gossip
    }

    /// The zone agent (zone pools on): whether this node represents its
    /// zone, and its backbone pool while it does.
    pub fn zones(&self) -> Option<&gossip::zone::ZoneAgent> {
        self.zones.as_deref()
    }

    /// The QUIC endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The policy store (what this node has applied).
    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.store
    }

    /// The member list as this node sees it.
    pub async fn members(&self) -> Vec<Member> {
        self.gossip.members().await
    }

    /// The outbound listener's address, if the node has one.
    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.proxy.outbound_addr()
    }

    /// The bound address of the per-upstream listener for `service`, if any.
    pub fn upstream_addr(&self, service: &str) -> Option<SocketAddr> {
        self.proxy.upstream_addr(service)
    }

    /// The service proxy.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Graceful drain (what SIGTERM does): announce `draining`, keep serving
    /// while peers learn it, finish in-flight requests up to the configured
    /// drain timeout, then leave. Returns the requests cut off (0 if clean).
    pub async fn drain(self) -> u64 {
        let linger = (self.config.gossip_interval * 5).max(Duration::from_millis(300));
        let left = self
            .proxy
            .drain(linger, self.config.proxy.drain_timeout)
            .await;
        self.shutdown().await;
        left
    }

    /// Graceful stop: announce `left` to peers, then close everything.
    pub async fn shutdown(self) {
        if let Some(z) = &self.zones {
            z.shutdown(true).await;
        }
        self.gossip.leave().await;
        self.stop().await;
    }

    /// Abrupt stop, like a crash: no goodbye to peers.
    pub async fn kill(self) {
        self.stop().await;
    }

    async fn stop(self) {
        self.shutdown.send_replace(true);
        self.proxy.stop();
        for t in &self.tasks {
            t.abort();
        }
        if let Some(z) = &self.zones {
            z.shutdown(false).await;
        }
        self.gossip.shutdown().await;
        self.endpoint.close();
    }
}

/// While this node represents its zone, advertises and pulls policy over
/// the backbone too (same store): a write in any zone reaches the other
/// zones' representatives, whose own zone pools then carry it to every
/// member.
async fn relay_policy_over_backbone(
    sync: PolicySync,
    mut backbone: watch::Receiver<Option<Gossip>>,
) {
    /// Aborts the relay tasks when replaced or when this task is aborted.
    struct Running(Vec<JoinHandle<()>>);
    impl Drop for Running {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }
    let mut running = Running(Vec::new());
    loop {
        let current = backbone.borrow_and_update().clone();
        let next = Running(match current {
            Some(bb) => sync.over(bb).spawn_relay(),
            None => Vec::new(),
        });
        drop(std::mem::replace(&mut running, next));
        if backbone.changed().await.is_err() {
            return;
        }
    }
}

/// The background tasks of [`crate::lifecycle`]: the bound on waiting for a
/// remembered peer, remembering peers, seed and certificate warnings.
fn lifecycle_tasks(
    config: &NodeConfig,
    gossip: &Gossip,
    endpoint: &Endpoint,
    readiness: Arc<crate::lifecycle::Readiness>,
    seeds: Vec<String>,
) -> Vec<JoinHandle<()>> {
    use crate::lifecycle as l;
    let mut tasks = vec![
        tokio::spawn(readiness.bound_wait(gossip.clone(), config.join_timeout)),
        tokio::spawn(l::warn_unreachable_seeds(
            gossip.clone(),
            endpoint.clone(),
            seeds,
        )),
        tokio::spawn(l::warn_expiring_certificates(config.certs.clone())),
    ];
    if let Some(dir) = &config.data_dir {
        tasks.push(tokio::spawn(l::remember_peers(gossip.clone(), dir.clone())));
    }
    tasks
}

/// Closes the connection to a member soon after gossip declares it dead or
/// gone: a crashed peer sends no QUIC close, and requests in flight on its
/// connection would otherwise wait for the idle timeout instead of failing
/// over (retried elsewhere when safe). A connection on which the member is
/// still heard (a datagram within [`DEAD_CONNECTION_QUIET`]) is kept: the
/// verdict was wrong.
async fn drop_dead_connections(gossip: Gossip, endpoint: Endpoint) {
    let mut events = gossip.subscribe();
    loop {
        let event = match events.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(_) => return,
        };
        let gone = matches!(event.current, Some(MemberState::Dead) | None);
        if !gone || event.previous.is_none() {
            continue;
        }
        let addrs: Vec<SocketAddr> = gossip
            .members()
            .await
            .into_iter()
            .filter(|m| m.name == event.name && !m.is_self && m.state != MemberState::Alive)
            .map(|m| m.addr)
            .collect();
        for addr in addrs {
            let Some(conn) = endpoint.cached(addr) else {
                continue;
            };
            let (endpoint, name) = (endpoint.clone(), event.name.clone());
            tokio::spawn(async move {
                // Gossip's verdict is an inference from silence; packets
                // arriving on the connection are proof of life. After a
                // stall of this node (or of the machine) every peer looks
                // dead for a moment, and closing their connections would
                // reset every request in flight on them.
                let heard = conn.conn.stats().udp_rx.datagrams;
                tokio::time::sleep(DEAD_CONNECTION_QUIET).await;
                if conn.conn.stats().udp_rx.datagrams > heard {
                    tracing::debug!(member = %name, %addr, "member declared dead still sends on its connection: keeping it");
                    return;
                }
                if endpoint
                    .cached(addr)
                    .is_some_and(|c| c.conn.stable_id() == conn.conn.stable_id())
                {
                    tracing::debug!(member = %name, %addr, "member dead and silent: closing its connection");
                    endpoint.disconnect(addr);
                }
            });
        }
    }
}

/// How long the connection to a member gossip declares dead must stay
/// silent (no datagram received) before it is closed.
const DEAD_CONNECTION_QUIET: Duration = Duration::from_millis(300);

fn read_token(path: &std::path::Path) -> Result<String, NodeError> {
    let err = |msg: String| NodeError::Token {
        path: path.to_path_buf(),
        msg,
    };
    let token = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = token.trim().to_string();
    if token.chars().count() < MIN_TOKEN_CHARS {
        return Err(err(format!(
            "token must be at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 16`)"
        )));
    }
    Ok(token)
}
