//! The one source of truth for how Shoal configures chitchat: the
//! [`ChitchatConfig`] a node runs with, the construction of its chitchat
//! node id, and the key names it publishes (the node schema of
//! [`crate::schema`], re-exported here, and the zone / backbone keys).
//!
//! [`crate::Gossip::start`] builds its chitchat instance with
//! [`chitchat_config`]; `simulate model` builds every model node with the
//! same function, so the model runs the settings that ship.
//!
//! ## Failure detector
//!
//! chitchat keeps one sampling window of heartbeat intervals (8 bytes a
//! sample) per peer, so every node pays `peers × window × 8` bytes and a
//! pool pays N² × window × 8. Shoal uses [`SAMPLING_WINDOW`] samples instead
//! of chitchat's default 1,000: the phi estimate is a smoothed mean of the
//! intervals (chitchat adds a prior of 5 samples at `initial_interval`), and
//! with a steady gossip interval 100 recent samples estimate it as well as
//! 1,000 do, while a node in a 1,000-member pool keeps 0.8 MB of windows
//! instead of 8 MB (the whole 1,000-node model: 0.8 GB instead of 8 GB).
//!
//! ## Live-node watcher
//!
//! Whenever the set of live members or any live member's `max_version`
//! changes, chitchat clones the `NodeState` of every live member into its
//! live-node watch channel, which keeps the last copy for good. Shoal never
//! reads that channel (membership reads `live_nodes()` and the cluster
//! state), so the copy was a second full replica of the pool's state in
//! every node and an O(pool) clone on most rounds. chitchat's
//! `extra_liveness_predicate` filters only what goes into that channel
//! (liveness itself is the failure detector's), so a predicate that admits
//! no member keeps the channel empty.
//!
//! `max_interval` drops heartbeat gaps longer than 20 rounds (2 s at
//! least) from the estimate, so a node that was partitioned away does not
//! teach its peers that long silences are normal.

use std::net::SocketAddr;
use std::time::Duration;

use chitchat::{ChitchatConfig, ChitchatId, FailureDetectorConfig};

pub use crate::schema::{SCHEMA_VERSION, keys};

/// Cluster id of a single-pool mesh (and the base of zone pool ids).
pub const CLUSTER_ID: &str = "shoal";

/// Default gossip interval. 300 ms rather than 500 ms: detection, which
/// is about phi x the mean interval of a peer's heartbeat news plus its
/// spread, falls from 5.9 s to 3.3 s (300 nodes, 10 % loss), and a new key
/// reaches a 300-member pool in 1.1 s instead of 2.0 s (1,000 members:
/// 1.4 s instead of 2.5 s), for about 1.66 x the steady-state bytes
/// (chitchat's digests, sent every round; docs/SIMULATE.md "What each
/// setting bought").
pub const INTERVAL: Duration = Duration::from_millis(300);

/// Default phi-accrual threshold. 7 detects 0.3 s sooner at 300 ms but
/// counted 11 false `dead` in a 1,000-member pool at 10 % loss in the
/// model, so 8 stays.
pub const PHI_THRESHOLD: f64 = 8.0;

/// Heartbeat intervals each node keeps per peer (chitchat's default: 1,000).
pub const SAMPLING_WINDOW: usize = 100;

/// How long dead and left members stay listed before they are forgotten.
pub const DEAD_GRACE: Duration = Duration::from_secs(3600);

/// Gossip settings that shape chitchat's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuning {
    /// Interval between gossip rounds.
    pub interval: Duration,
    /// Phi-accrual threshold.
    pub phi_threshold: f64,
    /// Heartbeat intervals kept per peer.
    pub sampling_window: usize,
    /// How long dead members stay listed.
    pub dead_grace: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            interval: INTERVAL,
            phi_threshold: PHI_THRESHOLD,
            sampling_window: SAMPLING_WINDOW,
            dead_grace: DEAD_GRACE,
        }
    }
}

impl Tuning {
    /// Longest heartbeat gap counted in the phi estimate.
    pub fn max_interval(&self) -> Duration {
        (self.interval * 20).max(Duration::from_secs(2))
    }

    /// The failure detector's settings.
    pub fn failure_detector(&self) -> FailureDetectorConfig {
        FailureDetectorConfig {
            phi_threshold: self.phi_threshold,
            sampling_window_size: self.sampling_window.max(1),
            max_interval: self.max_interval(),
            initial_interval: self.interval,
            dead_node_grace_period: self.dead_grace,
        }
    }
}

/// The chitchat node id of a node called `name`, incarnation `generation`,
/// gossiping at `addr`.
pub fn node_id(name: &str, generation: u64, addr: SocketAddr) -> ChitchatId {
    ChitchatId::new(name.to_string(), generation, addr)
}

/// The chitchat configuration a Shoal node runs with. `seeds` must not name
/// `id`'s own address (see [`seeds_without_self`]).
pub fn chitchat_config(
    id: ChitchatId,
    cluster_id: &str,
    seeds: Vec<String>,
    tuning: &Tuning,
) -> ChitchatConfig {
    ChitchatConfig {
        listen_addr: id.gossip_advertise_addr,
        chitchat_id: id,
        cluster_id: cluster_id.to_string(),
        gossip_interval: tuning.interval,
        seed_nodes: seeds,
        failure_detector_config: tuning.failure_detector(),
        marked_for_deletion_grace_period: tuning.dead_grace.max(Duration::from_secs(3600)),
        catchup_callback: None,
        extra_liveness_predicate: Some(Box::new(|_| false)),
        protocol_version: chitchat::ProtocolVersion::V1,
    }
}

/// `seeds` without the literal address `own` (chitchat must not gossip
/// with itself).
pub fn seeds_without_self(seeds: &[String], own: SocketAddr) -> Vec<String> {
    seeds
        .iter()
        .filter(|s| s.parse::<SocketAddr>().ok() != Some(own))
        .cloned()
        .collect()
}

/// Zone pools and the backbone: each zone is its own chitchat cluster; a
/// few representatives per zone also join the backbone cluster and carry
/// per-zone summaries between zones. The names and the representative rule
/// are [`crate::zone`]'s, which the nodes run; this module only gives them
/// the shape `simulate model` calls.
pub mod zones {
    pub use crate::zone::{
        MAX_ENDPOINTS_PER_SERVICE as MAX_ENDPOINTS, RELAYED_PREFIX, SUMMARY_PREFIX, fnv1a,
        rank_representatives,
    };

    /// Representatives per zone in the backbone (the nodes' default
    /// `--zone-representatives`).
    pub const REPRESENTATIVES: usize = crate::zone::DEFAULT_REPRESENTATIVES;

    /// Cluster id of zone `zone`'s pool.
    pub fn zone_cluster(base: &str, zone: &str) -> String {
        format!("{base}/zone/{zone}")
    }

    /// Cluster id of the backbone pool.
    pub fn backbone_cluster(base: &str) -> String {
        format!("{base}/backbone")
    }

    /// Key of zone `zone`'s summary of service `service` (the nodes publish
    /// its healthy endpoints there, bounded by [`MAX_ENDPOINTS`]).
    pub fn service_key(zone: &str, service: &str) -> String {
        format!("{SUMMARY_PREFIX}{zone}.svc.{service}")
    }

    /// Key of zone `zone`'s summary of policy `kind/name` in the model: the
    /// highest version in force there. The nodes instead carry a policy's
    /// advert itself over the backbone (`policy:<Kind>/<name>` published by
    /// each representative) beside the `zsum.<zone>.policy` digest; both
    /// cross zones in one backbone round.
    pub fn policy_key(zone: &str, policy: &str) -> String {
        format!("{SUMMARY_PREFIX}{zone}.policy.{policy}")
    }

    /// Key of zone `zone`'s load summary.
    pub fn load_key(zone: &str) -> String {
        format!("{SUMMARY_PREFIX}{zone}.load")
    }

    /// Splits a summary key into (zone, rest).
    pub fn parse_key(key: &str) -> Option<(&str, &str)> {
        key.strip_prefix(SUMMARY_PREFIX)?.split_once('.')
    }

    /// The representatives of a zone among its alive members' names:
    /// [`REPRESENTATIVES`] of them by the nodes' rule
    /// ([`rank_representatives`]: lowest FNV-1a hash of the name first).
    pub fn representatives<'a>(alive: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        let mut names: Vec<&str> = alive.into_iter().collect();
        names.sort_unstable();
        names.dedup();
        rank_representatives(&mut names);
        names.truncate(REPRESENTATIVES);
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_carries_the_tuning() {
        let addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let t = Tuning {
            interval: Duration::from_millis(300),
            phi_threshold: 6.0,
            sampling_window: 50,
            dead_grace: Duration::from_secs(60),
        };
        let c = chitchat_config(
            node_id("n1", 7, addr),
            "c",
            vec!["10.0.0.2:7000".into()],
            &t,
        );
        assert_eq!(c.listen_addr, addr);
        assert_eq!(c.gossip_interval, Duration::from_millis(300));
        assert_eq!(c.failure_detector_config.sampling_window_size, 50);
        assert_eq!(c.failure_detector_config.phi_threshold, 6.0);
        assert_eq!(
            c.failure_detector_config.max_interval,
            Duration::from_secs(6)
        );
        assert_eq!(
            c.marked_for_deletion_grace_period,
            Duration::from_secs(3600)
        );
        assert_eq!(c.chitchat_id.generation_id, 7);
    }

    #[tokio::test]
    async fn live_members_are_seen_but_never_copied_into_the_watch_channel() {
        use chitchat::transport::ChannelTransport;
        let transport = ChannelTransport::with_mtu(65_507);
        let tuning = Tuning {
            interval: Duration::from_millis(50),
            ..Tuning::default()
        };
        let addrs: Vec<SocketAddr> = (0..3)
            .map(|i| format!("127.0.0.1:{}", 17_000 + i).parse().unwrap())
            .collect();
        let mut handles = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let seeds = seeds_without_self(&[addrs[0].to_string()], *addr);
            let config = chitchat_config(node_id(&format!("n{i}"), 1, *addr), "c", seeds, &tuning);
            let kvs = vec![(keys::ZONE.to_string(), "z".to_string())];
            handles.push(
                chitchat::spawn_chitchat(config, kvs, &transport)
                    .await
                    .unwrap(),
            );
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let mut seen = Vec::new();
            for h in &handles {
                seen.push(h.chitchat().lock().await.live_nodes().count());
            }
            if seen.iter().all(|&n| n == 3) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "live counts {seen:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for h in &handles {
            let c = h.chitchat();
            let c = c.lock().await;
            // Every peer is live and its state is held once, in the cluster state...
            assert_eq!(c.state_snapshot().node_states.len(), 3);
            // ...and not a second time in chitchat's live-node watch channel.
            assert!(c.live_nodes_watcher().borrow().is_empty());
        }
        for h in handles {
            h.shutdown().await.unwrap();
        }
    }

    #[test]
    fn own_address_is_not_a_seed() {
        let own: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let seeds = vec![
            "127.0.0.1:7000".into(),
            "127.0.0.1:7001".into(),
            "db:7000".into(),
        ];
        assert_eq!(
            seeds_without_self(&seeds, own),
            vec!["127.0.0.1:7001".to_string(), "db:7000".to_string()]
        );
    }

    #[test]
    fn representatives_follow_the_nodes_rule() {
        let names = ["n5", "n1", "n9", "n1", "n3", "n7"];
        let r = zones::representatives(names);
        // Oracle: FNV-1a 64 written out here, lowest three hashes.
        let fnv = |s: &str| {
            s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            })
        };
        let mut want: Vec<&str> = vec!["n5", "n1", "n9", "n3", "n7"];
        want.sort_by_key(|n| fnv(n));
        want.truncate(3);
        assert_eq!(r, want);
        assert_eq!(zones::representatives(["a"]), vec!["a"]);
        let k = zones::service_key("eu-1", "web");
        assert_eq!(zones::parse_key(&k), Some(("eu-1", "svc.web")));
        assert_eq!(zones::parse_key("svc.web"), None);
    }
}
