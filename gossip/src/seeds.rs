//! Seeds given as DNS names are resolved again and again.
//!
//! A Kubernetes headless Service (or any DNS name with one A/AAAA record per
//! node) is a seed list whose addresses change as pods come and go. Chitchat
//! resolves names once at start and then only every 60 s; this module
//! resolves every [`GossipConfig::seed_refresh`] and opens a gossip exchange
//! with each resolved address that is not yet a live member, so a node whose
//! seeds were all gone (every pod replaced) finds the new ones within one
//! refresh, and a name naming several addresses seeds all of them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Weak;
use std::sync::atomic::Ordering;

use crate::membership::{MemberState, Shared, members};

/// What resolving the seed list gave.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Every address, literal or resolved, deduplicated and sorted.
    pub addrs: BTreeSet<SocketAddr>,
    /// Seeds that failed to resolve, with the resolver's error.
    pub failed: Vec<(String, String)>,
}

/// Resolves `seeds` (`host:port` each; IP literals pass through). A name with
/// several A/AAAA records gives all of them.
pub async fn resolve(seeds: &[String]) -> Resolved {
    let mut out = Resolved::default();
    for seed in seeds {
        if let Ok(addr) = seed.parse::<SocketAddr>() {
            out.addrs.insert(addr);
            continue;
        }
        match tokio::net::lookup_host(seed.as_str()).await {
            Ok(addrs) => {
                let addrs: Vec<SocketAddr> = addrs.collect();
                if addrs.is_empty() {
                    out.failed.push((seed.clone(), "no address".into()));
                }
                out.addrs.extend(addrs);
            }
            Err(e) => out.failed.push((seed.clone(), e.to_string())),
        }
    }
    out
}

/// Runs (for a seed list holding at least one name) until the gossip
/// participant is dropped: every `seed_refresh`,
/// resolves the seeds and gossips with each address that is neither this
/// node nor a live member. When every seed resolved and they name only this
/// node, the node is alone by construction (the first pod behind a headless
/// Service) and counts as joined.
pub(crate) async fn refresh_loop(weak: Weak<Shared>) {
    let mut first = true;
    loop {
        let (seeds, every, me) = {
            let Some(shared) = weak.upgrade() else { return };
            (
                shared.config.seeds.clone(),
                shared.config.seed_refresh,
                shared.self_id.gossip_advertise_addr,
            )
        };
        if !first {
            tokio::time::sleep(every).await;
        }
        first = false;
        let resolved = resolve(&seeds).await;
        let Some(shared) = weak.upgrade() else { return };
        if shared.stopping.load(Ordering::Relaxed) {
            return;
        }
        for (seed, why) in &resolved.failed {
            tracing::debug!(seed, error = %why, "seed did not resolve");
        }
        let list = members(&shared).await;
        let live: BTreeSet<SocketAddr> = list
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.addr)
            .collect();
        let others: Vec<SocketAddr> = resolved
            .addrs
            .iter()
            .copied()
            .filter(|a| *a != me)
            .collect();
        let alone = others.is_empty() && resolved.failed.is_empty() && !seeds.is_empty();
        if alone && !shared.joined.swap(true, Ordering::Relaxed) {
            tracing::info!("the seeds name only this node; it starts the mesh");
        }
        for addr in others.into_iter().filter(|a| !live.contains(a)) {
            tracing::debug!(%addr, "gossiping with a resolved seed");
            let _ = shared.handle.gossip(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literals_pass_through_and_names_give_every_record() {
        let r = resolve(&["127.0.0.1:7001".into(), "127.0.0.1:7001".into()]).await;
        assert_eq!(
            r.addrs.iter().copied().collect::<Vec<_>>(),
            vec!["127.0.0.1:7001".parse::<SocketAddr>().unwrap()]
        );
        assert!(r.failed.is_empty());

        // `localhost` is in every /etc/hosts; whatever records it has, all of
        // them are seeds, each with the seed's port.
        let expected: BTreeSet<SocketAddr> =
            std::net::ToSocketAddrs::to_socket_addrs("localhost:7002")
                .unwrap()
                .collect();
        assert!(!expected.is_empty());
        let r = resolve(&["localhost:7002".into(), "127.0.0.1:7001".into()]).await;
        let mut want = expected.clone();
        want.insert("127.0.0.1:7001".parse().unwrap());
        assert_eq!(r.addrs, want);
        assert!(r.failed.is_empty());
    }

    #[tokio::test]
    async fn an_unresolvable_name_is_reported_and_the_rest_still_count() {
        let r = resolve(&["no-such-seed.invalid:7000".into(), "127.0.0.1:7003".into()]).await;
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].0, "no-such-seed.invalid:7000");
        assert!(r.addrs.contains(&"127.0.0.1:7003".parse().unwrap()));
    }
}
