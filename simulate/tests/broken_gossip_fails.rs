//! The suite is meaningful: with the gossip path deliberately broken (every
//! node's socket silently drops everything once the cluster has formed), a
//! scenario that expects a restarted node to rejoin must fail.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use node::socket::{SharedSocket, SocketLayer};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use simulate::{RunEvent, RunOptions, Scenario, run_scenario};

/// A socket layer that, once armed, sends nothing and reports success.
struct BlackHole {
    armed: Arc<AtomicBool>,
}

impl SocketLayer for BlackHole {
    fn wrap(&self, inner: SharedSocket) -> SharedSocket {
        Arc::new(BlackHoleSocket {
            inner,
            armed: self.armed.clone(),
        })
    }
}

struct BlackHoleSocket {
    inner: SharedSocket,
    armed: Arc<AtomicBool>,
}

impl fmt::Debug for BlackHoleSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlackHoleSocket")
    }
}

impl AsyncUdpSocket for BlackHoleSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if self.armed.load(Ordering::Relaxed) {
            return Ok(());
        }
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

const REJOIN: &str = r#"
name = "rejoin"
description = "Crash n3, restart it; everyone sees it again"
duration = "4s"

[cluster]
nodes = 3
gossip_interval = "100ms"

[[step]]
at = "1s"
do = "crash"
node = "n3"

[[step]]
at = "2s"
do = "restart"
node = "n3"

[[invariant]]
kind = "converges"
within = "3s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_gossip_path_makes_convergence_fail() {
    let scenario = Scenario::parse(REJOIN, "rejoin").unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let arm = armed.clone();
    let options = RunOptions {
        seed: 1,
        extra_layer: Some(Arc::new(BlackHole {
            armed: armed.clone(),
        })),
        on_event: Some(Arc::new(move |e: &RunEvent| {
            if matches!(e, RunEvent::Formed { .. }) {
                arm.store(true, Ordering::Relaxed);
            }
        })),
        processes: None,
    };
    let report = run_scenario(&scenario, &options).await.expect("run");
    assert!(!report.passed, "{}", report.table());
    let v = &report.verdicts[0];
    assert!(!v.passed && v.figure == "never", "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_scenario_passes_with_the_path_intact() {
    let scenario = Scenario::parse(REJOIN, "rejoin").unwrap();
    let report = run_scenario(&scenario, &RunOptions::default())
        .await
        .expect("run");
    assert!(report.passed, "{}", report.table());
}
