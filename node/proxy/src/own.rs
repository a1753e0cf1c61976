//! This node's own listening addresses. A request the node would send to
//! one of them comes straight back into the node, which would plan it the
//! same way again: a forwarding loop that holds a connection and a task per
//! turn until the node runs out of descriptors. The outbound path refuses
//! such a destination (`508 forwarding-loop`) and start-up refuses a local
//! service whose address is one of them.
//!
//! [`is_own`] is pure: which addresses count is decided from the listeners'
//! addresses and a test for "this host has this IP", which the caller
//! supplies ([`host_has_ip`] in the node).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

/// Whether a TCP connection to `to` would reach one of `listeners`:
/// the same port, and the same IP, or a listener bound to the unspecified
/// address (`0.0.0.0` takes IPv4 only; `[::]` takes both) and an IP this
/// host has (`host_has`). A destination of `0.0.0.0` / `[::]` is the
/// loopback address (where Linux connects it).
pub fn is_own(listeners: &[SocketAddr], to: SocketAddr, host_has: impl Fn(IpAddr) -> bool) -> bool {
    let ip = match to.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        other => other,
    };
    listeners.iter().any(|l| {
        if l.port() != to.port() {
            return false;
        }
        match l.ip() {
            lip if lip == ip => true,
            IpAddr::V4(v4) if v4.is_unspecified() => ip.is_ipv4() && host_has(ip),
            IpAddr::V6(v6) if v6.is_unspecified() => host_has(ip),
            _ => false,
        }
    })
}

/// Whether this host has `ip` (binding a UDP socket to it succeeds; no
/// packet is sent). Only asked when a destination's port is one this node
/// listens on.
pub fn host_has_ip(ip: IpAddr) -> bool {
    ip.is_loopback() || UdpSocket::bind((ip, 0)).is_ok()
}

/// The local addresses of the TCP connections this node has open to its
/// own local instances. A peer's opaque TCP stream whose app connection came
/// from one of them was opened for a connection this node made: the local
/// service's address is another node's listener for the same service, and
/// the two nodes would hand the connection to each other until both run
/// out of descriptors. The serving side refuses such a stream
/// (`forwarding-loop`), which ends the loop at its second turn.
#[derive(Debug, Default)]
pub struct Dials {
    open: std::sync::Mutex<std::collections::HashSet<SocketAddr>>,
}

impl Dials {
    /// Counts `local` (a connection's own address) until the guard drops.
    pub fn hold(self: &std::sync::Arc<Self>, local: SocketAddr) -> Dialled {
        self.open.lock().unwrap().insert(local);
        Dialled {
            dials: self.clone(),
            local,
        }
    }

    /// Whether a connection from `from` is one this node made.
    pub fn made(&self, from: SocketAddr) -> bool {
        self.open.lock().unwrap().contains(&from)
    }

    /// Whether a peer's TCP head whose app connection came from `client`
    /// (`ip:port`, as the head carries it) is a loop. A loopback `client`
    /// counts only when the caller itself is on loopback
    /// (`caller_on_loopback`): sidecars in separate network namespaces each
    /// have their own 127.0.0.1, where an app's port may equal one of this
    /// node's dials without being it.
    pub fn loops(&self, client: &str, caller_on_loopback: bool) -> bool {
        client
            .parse::<SocketAddr>()
            .is_ok_and(|c| (caller_on_loopback || !c.ip().is_loopback()) && self.made(c))
    }
}

/// One of [`Dials`], forgotten on drop.
#[derive(Debug)]
pub struct Dialled {
    dials: std::sync::Arc<Dials>,
    local: SocketAddr,
}

impl Drop for Dialled {
    fn drop(&mut self) {
        self.dials.open.lock().unwrap().remove(&self.local);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_client_is_a_loop_only_for_a_caller_on_loopback() {
        let d = std::sync::Arc::new(Dials::default());
        let _lo = d.hold(a("127.0.0.1:50001"));
        let _ext = d.hold(a("10.1.2.3:50002"));
        // On one host (every node on loopback): the loop.
        assert!(d.loops("127.0.0.1:50001", true));
        // A caller in another network namespace: its app's 127.0.0.1:50001
        // is not this node's.
        assert!(!d.loops("127.0.0.1:50001", false));
        // A routable address is the same socket from anywhere.
        assert!(d.loops("10.1.2.3:50002", false));
        assert!(d.loops("10.1.2.3:50002", true));
        assert!(!d.loops("10.1.2.3:50003", false));
        assert!(!d.loops("", true));
        assert!(!d.loops("not an address", true));
    }

    #[test]
    fn a_dial_counts_while_its_guard_lives() {
        let d = std::sync::Arc::new(Dials::default());
        let one = d.hold(a("127.0.0.1:50001"));
        let two = d.hold(a("10.1.2.3:50002"));
        assert!(d.made(a("127.0.0.1:50001")));
        assert!(d.made(a("10.1.2.3:50002")));
        assert!(!d.made(a("127.0.0.1:50002")), "another port");
        drop(one);
        assert!(!d.made(a("127.0.0.1:50001")));
        assert!(d.made(a("10.1.2.3:50002")));
        drop(two);
        assert!(!d.made(a("10.1.2.3:50002")));
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The test's own idea of the host: loopback and 10.1.2.3.
    fn host(ip: IpAddr) -> bool {
        ip.is_loopback() || ip == "10.1.2.3".parse::<IpAddr>().unwrap()
    }

    #[test]
    fn the_same_address_is_own_and_another_port_or_ip_is_not() {
        let l = [a("127.0.0.1:4140"), a("127.0.0.1:5000")];
        assert!(is_own(&l, a("127.0.0.1:4140"), host));
        assert!(is_own(&l, a("127.0.0.1:5000"), host));
        assert!(!is_own(&l, a("127.0.0.1:4141"), host));
        // A 127.0.0.1 listener does not take connections to 127.0.0.2.
        assert!(!is_own(&l, a("127.0.0.2:4140"), host));
        assert!(!is_own(&l, a("10.1.2.3:4140"), host));
        assert!(!is_own(&[], a("127.0.0.1:4140"), host));
    }

    #[test]
    fn the_unspecified_destination_is_loopback() {
        let l = [a("127.0.0.1:4140")];
        assert!(is_own(&l, a("0.0.0.0:4140"), host));
        assert!(!is_own(&l, a("0.0.0.0:80"), host));
        assert!(is_own(&[a("[::1]:4140")], a("[::]:4140"), host));
    }

    #[test]
    fn a_wildcard_listener_takes_every_ip_of_the_host_in_its_family() {
        let v4 = [a("0.0.0.0:4140")];
        assert!(is_own(&v4, a("127.0.0.9:4140"), host));
        assert!(is_own(&v4, a("10.1.2.3:4140"), host));
        assert!(!is_own(&v4, a("10.9.9.9:4140"), host), "another host");
        assert!(!is_own(&v4, a("[::1]:4140"), host), "0.0.0.0 takes no IPv6");
        let v6 = [a("[::]:4140")];
        assert!(is_own(&v6, a("[::1]:4140"), host));
        assert!(is_own(&v6, a("10.1.2.3:4140"), host), "dual stack");
        assert!(is_own(&v6, a("[::ffff:10.1.2.3]:4140"), host));
        assert!(!is_own(&v6, a("10.9.9.9:4140"), host));
    }

    #[test]
    fn this_host_has_its_loopback_and_not_a_documentation_address() {
        assert!(host_has_ip("127.0.0.1".parse().unwrap()));
        assert!(!host_has_ip("192.0.2.1".parse().unwrap()));
    }
}
