//! A rogue peer holding a valid mesh certificate abuses the QUIC message
//! channels: unfinished uni streams by the thousand, oversize messages.
//! Checked from outside: what the rogue manages to open and send, what the
//! victim counts and holds in memory, and whether honest peers still get
//! their messages (and gossip) through during the attack.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tests::{Cluster, Pki, admin_get, eventually};
use tokio::task::JoinHandle;
use transport::{Connected, Endpoint, EndpointConfig, TlsFiles};

const DEADLINE: Duration = Duration::from_secs(20);
/// The channel policy bodies travel on (1 MiB-class messages are legitimate).
const POLICY: u8 = 3;
/// The gossip channel (messages of at most 64 KiB).
const GOSSIP: u8 = 1;

fn endpoint(dir: &std::path::Path) -> Endpoint {
    transport::install_crypto_provider();
    Endpoint::bind(EndpointConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        TlsFiles::new(dir),
    ))
    .unwrap()
}

/// What the rogue saw of its own attack.
struct Attack {
    /// Uni streams the victim let the rogue open.
    opened: AtomicUsize,
    /// Streams the victim stopped (STOP_SENDING seen by the writer).
    stopped: AtomicU64,
    /// Set to let go of stopped streams, as a stock QUIC stack does (quinn
    /// resets a stopped stream when it is dropped); until then the rogue
    /// holds them, which no stock stack would.
    release: tokio::sync::watch::Sender<bool>,
}

/// Opens up to `streams` uni streams on `conn`, one after another (each
/// `open_uni` waits for the victim's stream credit), and on each writes the
/// channel tag and `body` without ever finishing.
fn unfinished_streams(
    conn: Connected,
    channel: u8,
    body: Bytes,
    streams: usize,
) -> (Arc<Attack>, JoinHandle<()>) {
    let attack = Arc::new(Attack {
        opened: AtomicUsize::new(0),
        stopped: AtomicU64::new(0),
        release: tokio::sync::watch::channel(false).0,
    });
    let a = attack.clone();
    let task = tokio::spawn(async move {
        let mut writers = Vec::new();
        for _ in 0..streams {
            let Ok(mut s) = conn.conn.open_uni().await else {
                break;
            };
            a.opened.fetch_add(1, Ordering::SeqCst);
            let (a, body) = (a.clone(), body.clone());
            writers.push(tokio::spawn(async move {
                let r = async {
                    s.write_all(&[channel]).await?;
                    s.write_chunk(body).await
                }
                .await;
                let r = match r {
                    Ok(()) => s.stopped().await.map_err(|_| ()),
                    Err(quinn::WriteError::Stopped(code)) => Ok(Some(code)),
                    Err(_) => Err(()),
                };
                if let Ok(Some(_)) = r {
                    a.stopped.fetch_add(1, Ordering::SeqCst);
                }
                // Never finish; hold the stream until released.
                let _ = a.release.subscribe().wait_for(|r| *r).await;
                drop(s);
                std::future::pending::<()>().await;
            }));
        }
        std::future::pending::<()>().await;
        drop(writers);
    });
    (attack, task)
}

/// Sends `count` messages of `size` bytes from `from` to `to` on `channel`.
async fn send_many(from: &Endpoint, to: std::net::SocketAddr, channel: u8, size: usize, count: u8) {
    for i in 0..count {
        let mut payload = vec![i; size];
        payload[0] = i;
        from.send_message(to, channel, &payload).await.unwrap();
    }
}

/// Receives `count` messages from `node` on `rx` within the deadline,
/// skipping other senders' messages, and returns their sizes.
async fn receive_from(
    rx: &mut tokio::sync::mpsc::Receiver<transport::Message>,
    node: &str,
    count: usize,
) -> Vec<usize> {
    let mut sizes = Vec::new();
    let end = Instant::now() + DEADLINE;
    while sizes.len() < count {
        let left = end.saturating_duration_since(Instant::now());
        let m = tokio::time::timeout(left, rx.recv())
            .await
            .unwrap_or_else(|_| {
                let small = sizes.iter().filter(|s| **s < 1200).count();
                panic!(
                    "only {} of {count} messages from {node} ({small} datagram-sized)",
                    sizes.len()
                )
            })
            .unwrap();
        if m.from.peer.node == node {
            sizes.push(m.payload.len());
        }
    }
    sizes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_unfinished_streams_are_capped_stopped_and_do_not_block_honest_peers() {
    let pki = Pki::new("test.shoal");
    let victim = endpoint(&pki.issue("victim", &[]));
    let rogue = endpoint(&pki.issue("rogue", &["other"]));
    let honest = endpoint(&pki.issue("honest", &[]));
    let mut policy_rx = victim.subscribe(POLICY, 1024);
    let to = victim.local_addr();

    let conn = rogue.connect(to).await.unwrap();
    let started = Instant::now();
    let one_mb = Bytes::from(vec![0xAB; 1_000_000]);
    let (attack, task) = unfinished_streams(conn.clone(), POLICY, one_mb, 1000);

    // The victim grants the rogue 32 streams; until it stops the first
    // stalled one, no more open, however hard the rogue tries.
    eventually("the rogue opens its first streams", DEADLINE, || async {
        (attack.opened.load(Ordering::SeqCst) >= 32).then_some(())
    })
    .await;

    // Until the first stop, the rogue is held to 32 open streams, and
    // flow control stops its bytes: a few MB at most, not 1,000 × 1 MB.
    let mut peak_reading = 0i64;
    let mut last_tx = 0u64;
    let mut quiet_since = Instant::now();
    let blocked_tx = loop {
        let opened = attack.opened.load(Ordering::SeqCst);
        let stalled = victim.stats().stalled_streams.load(Ordering::SeqCst);
        let tx = conn.conn.stats().udp_tx.bytes;
        peak_reading =
            peak_reading.max(victim.stats().message_bytes_reading.load(Ordering::SeqCst));
        if stalled > 0 {
            panic!("a stream was stopped before the rogue's bytes settled");
        }
        assert_eq!(opened, 32, "streams beyond the cap were opened");
        if tx > last_tx + 64 * 1024 {
            last_tx = tx;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_millis(500) {
            break tx;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        blocked_tx < 16 << 20,
        "the rogue sent {blocked_tx} bytes before flow control blocked it"
    );
    assert!(
        peak_reading < 6 << 20,
        "the victim held {peak_reading} bytes of unfinished messages"
    );

    // While the rogue's streams sit unfinished, an honest peer's messages
    // (datagrams and 60 KB / 1 MB streams) get through. They are sent once
    // the rogue's burst has settled: while its 8 MiB window is in flight,
    // the victim's socket buffer may overflow, and a lost datagram is never
    // resent (that is UDP, not the attack).
    send_many(&honest, to, POLICY, 100, 20).await;
    send_many(&honest, to, POLICY, 60_000, 20).await;
    send_many(&honest, to, POLICY, 1_000_000, 2).await;
    let sizes = receive_from(&mut policy_rx, "honest", 42).await;
    assert_eq!(sizes.iter().filter(|s| **s == 1_000_000).count(), 2);
    assert_eq!(sizes.iter().filter(|s| **s == 100).count(), 20);
    let honest_done = started.elapsed();

    // After the 5 s message deadline the victim stops the stalled streams
    // (the rogue sees them stopped), which lets the next 32 open.
    eventually("stalled streams stopped and counted", DEADLINE, || async {
        (victim.stats().stalled_streams.load(Ordering::SeqCst) >= 32
            && attack.stopped.load(Ordering::SeqCst) >= 32)
            .then_some(())
    })
    .await;
    let first_wave = started.elapsed();
    assert!(
        first_wave >= Duration::from_secs(4),
        "stopped after {first_wave:?}"
    );

    // A rogue that holds its stopped streams (never resetting them) only
    // shuts itself out: its stream credit is not returned. Honest traffic
    // flows meanwhile.
    send_many(&honest, to, POLICY, 60_000, 5).await;
    receive_from(&mut policy_rx, "honest", 5).await;
    assert_eq!(attack.opened.load(Ordering::SeqCst), 32);

    // Once it lets them go, the next wave opens, and is held to 32 more.
    attack.release.send_replace(true);
    eventually("the next wave opens", DEADLINE, || async {
        (attack.opened.load(Ordering::SeqCst) >= 64).then_some(())
    })
    .await;
    let opened = attack.opened.load(Ordering::SeqCst);
    let stalled = victim.stats().stalled_streams.load(Ordering::SeqCst) as usize;
    assert!(
        opened <= stalled + 32,
        "{opened} streams opened but only {stalled} stopped"
    );
    send_many(&honest, to, POLICY, 60_000, 5).await;
    receive_from(&mut policy_rx, "honest", 5).await;
    // Nothing the rogue sent was delivered.
    while let Ok(m) = policy_rx.try_recv() {
        assert_ne!(m.from.peer.node, "rogue");
    }

    // When the rogue gives up, the memory its streams held is released.
    task.abort();
    rogue.close();
    eventually("unfinished messages released", DEADLINE, || async {
        (victim.stats().message_bytes_reading.load(Ordering::SeqCst) == 0).then_some(())
    })
    .await;
    eprintln!(
        "rogue: {opened} streams opened, {blocked_tx} bytes sent before blocked; \
         victim: peak {peak_reading} bytes held for unfinished messages, \
         {stalled} stalled streams stopped (first after {first_wave:?}); \
         honest 42 messages delivered in {honest_done:?}"
    );
    for e in [victim, honest] {
        e.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_messages_are_stopped_at_the_cap_and_counted() {
    let pki = Pki::new("test.shoal");
    let victim = endpoint(&pki.issue("victim", &[]));
    let rogue = endpoint(&pki.issue("rogue", &["other"]));
    let honest = endpoint(&pki.issue("honest", &[]));
    let mut policy_rx = victim.subscribe(POLICY, 64);
    let mut gossip_rx = victim.subscribe(GOSSIP, 64);
    victim.limit_channel(GOSSIP, 64 << 10);
    let to = victim.local_addr();
    let conn = rogue.connect(to).await.unwrap();

    // 10 MiB on the policy channel, 70 KB on the 64 KiB gossip channel, and
    // one byte past the global cap: each stream is stopped by the victim.
    let cases = [
        (POLICY, 10 << 20),
        (GOSSIP, 70_000),
        (POLICY, transport::MAX_MESSAGE_BYTES + 1),
    ];
    for (i, (channel, size)) in cases.into_iter().enumerate() {
        let mut s = conn.conn.open_uni().await.unwrap();
        let mut body = vec![channel];
        body.extend(std::iter::repeat_n(0x5A, size));
        let r = async {
            s.write_all(&body).await?;
            s.finish().map_err(|_| quinn::WriteError::ClosedStream)?;
            s.stopped()
                .await
                .map_err(|_| quinn::WriteError::ClosedStream)
        }
        .await;
        match r {
            Err(quinn::WriteError::Stopped(code)) | Ok(Some(code)) => {
                assert_eq!(code.into_inner(), 2, "case {i}: stop code")
            }
            // All of a message smaller than the stream window may be
            // acknowledged before the victim's reader reaches the cap.
            Ok(None) if size < transport::STREAM_RECEIVE_WINDOW as usize => {}
            other => panic!("case {i}: the victim did not stop the stream: {other:?}"),
        }
        eventually("oversize counted", DEADLINE, || async {
            (victim.stats().oversize_messages.load(Ordering::SeqCst) == i as u64 + 1).then_some(())
        })
        .await;
    }
    // The rogue's connection is still usable (a refused message is not a
    // reason to drop the peer), and the largest legitimate message passes.
    let ok = vec![7u8; transport::MAX_MESSAGE_BYTES];
    rogue.send_message(to, POLICY, &ok).await.unwrap();
    let got = tokio::time::timeout(DEADLINE, policy_rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.payload.len(), transport::MAX_MESSAGE_BYTES);
    drop(got);
    // A sender refuses to build a message past the cap.
    let too_big = vec![0u8; transport::MAX_MESSAGE_BYTES + 1];
    assert!(rogue.send_message(to, POLICY, &too_big).await.is_err());

    // Honest gossip-sized messages still arrive.
    send_many(&honest, to, GOSSIP, 60_000, 3).await;
    assert_eq!(
        receive_from(&mut gossip_rx, "honest", 3).await,
        vec![60_000; 3]
    );
    assert!(
        gossip_rx.try_recv().is_err(),
        "an oversize message was delivered"
    );
    eventually("no message bytes held", DEADLINE, || async {
        (victim.stats().message_bytes_reading.load(Ordering::SeqCst) == 0
            && victim.stats().message_bytes_queued.load(Ordering::SeqCst) == 0)
            .then_some(())
    })
    .await;
    for e in [victim, rogue, honest] {
        e.close();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_keeps_flowing_while_a_rogue_floods_a_node() {
    let mut cluster = Cluster::start(2).await;
    cluster.converged(&["n1", "n2"], DEADLINE).await;
    let target = cluster.nodes[0].quic_addr();
    let admin = cluster.nodes[0].admin_addr();

    // A rogue with a valid certificate (not a gossip member) opens two
    // connections' worth of unfinished streams on the gossip and policy
    // channels, and sends a 10 MiB message.
    let rogue_a = endpoint(&cluster.pki.issue("rogue", &["other"]));
    let rogue_b = endpoint(&cluster.pki.issue_into(
        "rogue-b",
        "rogue",
        &["other"],
        transport::certs::Validity::days(1),
    ));
    let a = rogue_a.connect(target).await.unwrap();
    let b = rogue_b.connect(target).await.unwrap();
    // On the gossip connection: its streams need no large-message slot, so
    // this one reaches the cap instead of waiting for a slot. It is opened
    // before the flood: the flood holds every stream credit the victim
    // gives, so an `open_uni` after it could wait for ever.
    let mut big = tokio::time::timeout(DEADLINE, a.conn.open_uni())
        .await
        .expect("the oversize stream opens within the deadline")
        .unwrap();
    let (gossip_attack, t1) =
        unfinished_streams(a.clone(), GOSSIP, Bytes::from(vec![0; 60_000]), 1000);
    let (policy_attack, t2) = unfinished_streams(b, POLICY, Bytes::from(vec![0; 1_000_000]), 1000);
    let oversize = tokio::spawn(async move {
        let mut body = vec![POLICY];
        body.resize(10 << 20, 0);
        let _ = big.write_all(&body).await;
    });
    eventually("the rogue holds its streams", DEADLINE, || async {
        (gossip_attack.opened.load(Ordering::SeqCst) >= 31
            && policy_attack.opened.load(Ordering::SeqCst) >= 32)
            .then_some(())
    })
    .await;

    // A new node joins through the flooded node and everyone converges.
    let n3 = node::Node::start(cluster.pki.node_config("n3", &[target.to_string()]))
        .await
        .unwrap();
    cluster.nodes.push(n3);
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;

    // The flooded node's metrics show the refusals.
    eventually("refusals exported", DEADLINE, || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        let stalled = metric(&m, "shoal_quic_messages_refused_total{reason=\"stalled\"}");
        let oversize = metric(&m, "shoal_quic_messages_refused_total{reason=\"oversize\"}");
        (stalled >= 32.0 && oversize >= 1.0).then_some(())
    })
    .await;
    let (_, m) = admin_get(admin, "/metrics").await;
    let held = metric(&m, "shoal_quic_message_bytes_buffered");
    assert!(
        held < 12.0 * 1024.0 * 1024.0,
        "n1 holds {held} bytes of messages"
    );
    // Gossip still flows after the first wave was stopped.
    cluster.converged(&["n1", "n2", "n3"], DEADLINE).await;

    for t in [t1, t2, oversize] {
        t.abort();
    }
    rogue_a.close();
    rogue_b.close();
    cluster.shutdown().await;
}

/// Reads one sample's value from Prometheus text.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_a_bounded_number_of_connections() {
    let pki = Pki::new("test.shoal");
    let victim = endpoint(&pki.issue("victim", &[]));
    let rogue_dir = pki.issue("rogue", &["other"]);
    let to = victim.local_addr();
    let mut rogues = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..10 {
        let r = endpoint(&rogue_dir);
        conns.push(r.connect(to).await.unwrap());
        rogues.push(r);
    }
    // The victim keeps the newest four and closes the rest.
    eventually("oldest rogue connections closed", DEADLINE, || async {
        (conns
            .iter()
            .filter(|c| c.conn.close_reason().is_some())
            .count()
            == 6)
            .then_some(())
    })
    .await;
    assert!(conns[6..].iter().all(|c| c.conn.close_reason().is_none()));
    assert_eq!(
        victim.stats().connections_superseded.load(Ordering::SeqCst),
        6
    );
    eventually("victim holds four", DEADLINE, || async {
        (victim.stats().connections_open.load(Ordering::SeqCst) == 4).then_some(())
    })
    .await;
    // Another identity is not affected.
    let honest = endpoint(&pki.issue("honest", &[]));
    let mut rx = victim.subscribe(POLICY, 8);
    send_many(&honest, to, POLICY, 60_000, 1).await;
    receive_from(&mut rx, "honest", 1).await;
    assert!(conns[6..].iter().all(|c| c.conn.close_reason().is_none()));
    for e in rogues.into_iter().chain([victim, honest]) {
        e.close();
    }
}

/// The `shoal` binary: `SHOAL_BIN`, or this workspace's debug build,
/// brought up to date with `cargo build -p node --bin shoal`.
fn shoal_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return bin.into();
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args(["build", "-q", "-p", "node", "--bin", "shoal"])
        .current_dir(workspace)
        .status()
        .expect("running cargo build -p node");
    assert!(status.success(), "cargo build -p node --bin shoal failed");
    target.join("debug").join("shoal")
}

/// A `shoal node` process, killed on drop.
struct Proc {
    child: Child,
    quic: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn start(bin: &Path, certs: &Path, name: &str, seed: Option<SocketAddr>) -> Proc {
        let mut cmd = Command::new(bin);
        cmd.args(["node", "--name", name, "--listen", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--gossip-interval", "100ms"])
            .arg("--certs")
            .arg(certs)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(s) = seed {
            cmd.args(["--seed", &s.to_string()]);
        }
        let mut child = cmd.spawn().expect("start shoal node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "shoal node NAME ready quic=ADDR admin=ADDR"
        let field = |k: &str| -> SocketAddr {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("no {k} in {line:?}"))
                .parse()
                .unwrap()
        };
        let (quic, admin) = (field("quic="), field("admin="));
        Proc { child, quic, admin }
    }

    /// Resident set size, from /proc.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_node_process_keeps_its_memory_bounded_under_unfinished_streams() {
    let bin = shoal_binary();
    let pki = Pki::new("test.shoal");
    let n1 = Proc::start(&bin, &pki.issue("n1", &["web"]), "n1", None);
    let n2 = Proc::start(&bin, &pki.issue("n2", &["web"]), "n2", Some(n1.quic));
    let members_alive = |admin: SocketAddr| async move {
        let (_, body) = admin_get(admin, "/v1/members").await;
        let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap_or_default();
        list.iter().filter(|m| m["state"] == "alive").count()
    };
    eventually("n1 and n2 converge", DEADLINE, || async {
        (members_alive(n1.admin).await == 2).then_some(())
    })
    .await;
    let before = n1.rss_bytes();

    // Four connections (the most one certificate may hold), each trying
    // 1,000 unfinished 1 MB streams on the policy channel.
    let rogue_dir = pki.issue("rogue", &["other"]);
    let mut rogues = Vec::new();
    let mut attacks = Vec::new();
    let body = Bytes::from(vec![0x42; 1_000_000]);
    for _ in 0..4 {
        let r = endpoint(&rogue_dir);
        let c = r.connect(n1.quic).await.unwrap();
        attacks.push(unfinished_streams(c, POLICY, body.clone(), 1000));
        rogues.push(r);
    }
    let opened = |attacks: &[(Arc<Attack>, JoinHandle<()>)]| {
        attacks
            .iter()
            .map(|(a, _)| a.opened.load(Ordering::SeqCst))
            .sum::<usize>()
    };
    let mut peak = before;
    // Two waves: held until stopped, then let go so the next 128 open.
    for wave in 1..=2u64 {
        eventually("a wave of streams stopped", DEADLINE, || {
            peak = peak.max(n1.rss_bytes());
            let admin = n1.admin;
            async move {
                let (_, m) = admin_get(admin, "/metrics").await;
                let stalled = metric(&m, "shoal_quic_messages_refused_total{reason=\"stalled\"}");
                (stalled >= 128.0 * wave as f64).then_some(())
            }
        })
        .await;
        for (a, _) in &attacks {
            a.release.send_replace(true);
        }
        // Gossip through n1 still works: a third node joins during the attack.
        if wave == 1 {
            assert!(opened(&attacks) >= 128);
        }
    }
    let n3 = Proc::start(&bin, &pki.issue("n3", &["web"]), "n3", Some(n1.quic));
    eventually("n3 joins through the attacked node", DEADLINE, || {
        peak = peak.max(n1.rss_bytes());
        async {
            (members_alive(n1.admin).await == 3 && members_alive(n3.admin).await == 3).then_some(())
        }
    })
    .await;
    let total_opened = opened(&attacks);
    for (_, t) in attacks {
        t.abort();
    }
    for r in rogues {
        r.close();
    }
    eventually("n1 drops the rogue's connections", DEADLINE, || async {
        let (_, m) = admin_get(n1.admin, "/metrics").await;
        (metric(&m, "shoal_quic_message_bytes_buffered") == 0.0).then_some(())
    })
    .await;
    let after = n1.rss_bytes();
    peak = peak.max(after);
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    eprintln!(
        "n1 RSS: {:.1} MiB before, {:.1} MiB peak, {:.1} MiB after; rogue opened {total_opened} \
         streams of 1 MB on 4 connections",
        mb(before),
        mb(peak),
        mb(after)
    );
    // Without the limits this attack took a node from 14 to 690 MiB in 12 s
    // (4,000 streams opened); the limits allow 4 × (8 MiB window + 4.3 MiB
    // of messages) ≈ 50 MiB plus allocator slack.
    assert!(
        peak < before + (128 << 20),
        "n1 grew from {before} to {peak} bytes"
    );
    drop((n2, n3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_readings_answer_a_flood_at_most_twenty_a_second() {
    let cluster = Cluster::start(1).await;
    let target = cluster.nodes[0].quic_addr();
    let rogue = endpoint(&cluster.pki.issue("rogue", &["other"]));
    // An honest reading first: the node answers, and on one host the offset
    // is near zero.
    let r = node::clock::probe(&rogue, target, DEADLINE)
        .await
        .expect("a clock reading");
    assert!(r.offset_ms.abs() < 250.0, "{r:?}");
    // (Subscribing replaces the probe's own subscription.)
    let mut answers = rogue.subscribe(node::clock::CLOCK_CHANNEL, 1024);
    // 500 probes in a burst, plus garbage of the wrong size: at most 20
    // answers come back per second, each 16 bytes for an 8-byte question.
    let started = Instant::now();
    for i in 0..500u64 {
        let _ = rogue
            .send_message(target, node::clock::CLOCK_CHANNEL, &i.to_be_bytes())
            .await;
        let _ = rogue
            .send_message(target, node::clock::CLOCK_CHANNEL, &[0; 9])
            .await;
    }
    let mut got = 0u32;
    let listen_until = tokio::time::Instant::now() + Duration::from_millis(1500);
    while let Ok(Some(m)) = tokio::time::timeout_at(listen_until, answers.recv()).await {
        assert_eq!(m.payload.len(), 16);
        got += 1;
    }
    let seconds = started.elapsed().as_secs_f64().ceil() as u32;
    assert!(got >= 1, "no answer at all");
    assert!(
        got <= 20 * (seconds + 1),
        "{got} answers in {seconds} s to a flood"
    );
    eprintln!("{got} answers to 500 probes over {seconds} s");
    rogue.close();
    cluster.shutdown().await;
}
