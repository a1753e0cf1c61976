//! Seeds given as DNS names (in-process nodes on 127.0.0.1): a name that
//! resolves only to the node itself (the first pod behind a headless
//! Service) lets it start the mesh and be ready, while a name naming
//! nobody alive keeps a node unready. Re-resolution of a name whose records
//! change is shown across network namespaces in `multihost.rs`.

use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::Duration;

use node::Node;
use tests::{Pki, TEST_GOSSIP, admin_get, eventually};

/// A UDP port on 127.0.0.1 that was free a moment ago.
fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("bind")
        .port()
}

#[tokio::test]
async fn a_seed_name_naming_only_this_node_starts_the_mesh() {
    let resolved: Vec<SocketAddr> = "localhost:1"
        .to_socket_addrs()
        .expect("localhost")
        .collect();
    if resolved.iter().any(|a| a.ip().to_string() != "127.0.0.1") {
        println!("SKIPPED: localhost resolves to {resolved:?}, not only 127.0.0.1");
        return;
    }
    let pki = Pki::new("seeds.shoal");

    // B's seed name points at a port where no node runs: it must stay unready.
    let mut b = pki.node_config("b", &[format!("localhost:{}", free_udp_port())]);
    b.gossip_interval = TEST_GOSSIP;
    let b = Node::start(b).await.expect("start b");

    // A's seed name resolves to A's own address only.
    let port = free_udp_port();
    let mut a = pki.node_config("a", &[format!("localhost:{port}")]);
    a.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let a = Node::start(a).await.expect("start a");
    assert_eq!(a.quic_addr().port(), port);

    let admin = a.admin_addr();
    eventually("a ready", Duration::from_secs(10), || async move {
        (admin_get(admin, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    assert!(a.gossip().joined().await);

    assert!(!b.gossip().joined().await, "b's seed names nobody alive");
    assert_eq!(admin_get(b.admin_addr(), "/readyz").await.0, 503);

    a.shutdown().await;
    b.shutdown().await;
}
