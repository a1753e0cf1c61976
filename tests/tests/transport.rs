//! The QUIC endpoint on its own: dial merging, reconnects, certificate
//! reload without dropping established connections.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tests::{Pki, eventually};
use transport::certs::{Validity, write_node_dir};
use transport::{Endpoint, EndpointConfig, TlsFiles};

fn endpoint(dir: &std::path::Path) -> Endpoint {
    transport::install_crypto_provider();
    let mut config = EndpointConfig::new("127.0.0.1:0".parse().unwrap(), TlsFiles::new(dir));
    config.reload_interval = Duration::from_millis(50);
    Endpoint::bind(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dials_share_one_connection_and_reconnect_after_loss() {
    let pki = Pki::new("test.shoal");
    let a = endpoint(&pki.issue("a", &["web"]));
    let b = endpoint(&pki.issue("b", &[]));
    let dials = (0..16).map(|_| {
        let b = b.clone();
        let addr = a.local_addr();
        tokio::spawn(async move { b.connect(addr).await.unwrap() })
    });
    let conns: Vec<_> = futures_join(dials).await;
    let first = conns[0].conn.stable_id();
    assert!(conns.iter().all(|c| c.conn.stable_id() == first));
    assert_eq!(b.stats().connections_total.load(Ordering::Relaxed), 1);
    assert_eq!(conns[0].peer.node, "a");
    assert_eq!(conns[0].peer.services, vec!["web"]);

    b.disconnect(a.local_addr());
    let again = b.connect(a.local_addr()).await.unwrap();
    assert_ne!(again.conn.stable_id(), first);
    a.close();
    b.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_is_used_for_next_handshake_without_dropping_old_ones() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let a = endpoint(&a_dir);
    let b = endpoint(&pki.issue("b", &[]));
    let old = b.connect(a.local_addr()).await.unwrap();
    assert_eq!(old.peer.services, vec!["web"]);

    // Rotate a's certificate on disk: same node, one more service.
    let cert = pki
        .ca()
        .issue("a", &["web".into(), "api".into()], Validity::days(1))
        .unwrap();
    write_node_dir(&a_dir, &pki.ca().cert_pem(), &cert, true).unwrap();
    eventually(
        "a reloads its certificate",
        Duration::from_secs(10),
        || async { (a.stats().cert_reloads.load(Ordering::Relaxed) >= 1).then_some(()) },
    )
    .await;
    assert_eq!(a.identity().services, vec!["web", "api"]);

    // A new handshake sees the new certificate...
    let c = endpoint(&pki.issue("c", &[]));
    let fresh = c.connect(a.local_addr()).await.unwrap();
    assert_eq!(fresh.peer.services, vec!["web", "api"]);

    // ...while the established connection still carries streams.
    assert!(old.conn.close_reason().is_none());
    let mut incoming = a.take_bi_streams().unwrap();
    let (mut send, _recv) = old.conn.open_bi().await.unwrap();
    send.write_all(b"still here").await.unwrap();
    send.finish().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), incoming.recv())
        .await
        .unwrap()
        .unwrap();
    let got = s.recv.read_to_end(64).await.unwrap();
    assert_eq!(got, b"still here");
    assert_eq!(s.from.peer.node, "b");
    for e in [a, b, c] {
        e.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_files_on_disk_keep_the_old_certificate() {
    let pki = Pki::new("test.shoal");
    let a_dir = pki.issue("a", &["web"]);
    let a = endpoint(&a_dir);
    std::fs::write(a_dir.join("node.pem"), "not a certificate").unwrap();
    eventually("reload error counted", Duration::from_secs(10), || async {
        (a.stats().cert_reload_errors.load(Ordering::Relaxed) >= 1).then_some(())
    })
    .await;
    let b = endpoint(&pki.issue("b", &[]));
    let c = b.connect(a.local_addr()).await.unwrap();
    assert_eq!(c.peer.node, "a");
    a.close();
    b.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_travel_as_datagrams_or_streams() {
    let pki = Pki::new("test.shoal");
    let a = endpoint(&pki.issue("a", &[]));
    let b = endpoint(&pki.issue("b", &[]));
    let mut rx = a.subscribe(7, 16);
    let small = vec![1u8; 100];
    let large: Vec<u8> = (0..60_000u32).map(|i| i as u8).collect();
    b.send_message(a.local_addr(), 7, &small).await.unwrap();
    b.send_message(a.local_addr(), 7, &large).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.channel, 7);
        assert_eq!(m.from.peer.node, "b");
        got.push(m.payload.to_vec());
    }
    got.sort_by_key(|p| p.len());
    assert_eq!(got, vec![small, large]);
    a.close();
    b.close();
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
