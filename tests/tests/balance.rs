//! Endpoint choice through a real mesh: identical instances share
//! sequential load, and an instance that was slow once is tried again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hyper::Request;
use hyper::body::Incoming;
use tests::eventually;
use tests::traffic::*;

/// Two nodes each fronting one identical `web` instance, and a client node.
async fn two_instances(
    a: Handler,
    b: Handler,
) -> (Upstream, Upstream, node::Node, node::Node, node::Node) {
    let ua = Upstream::start(a).await;
    let ub = Upstream::start(b).await;
    let mut mesh = Mesh::new();
    let n1 = mesh.client("n1", |_| {}).await;
    let n2 = mesh
        .start(mesh.config("n2", &["web"], &[("web", ua.addr)]))
        .await;
    let n3 = mesh
        .start(mesh.config("n3", &["web"], &[("web", ub.addr)]))
        .await;
    routable(&n1, "web", 2).await;
    (ua, ub, n1, n2, n3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_instances_share_200_sequential_requests() {
    let (ua, ub, n1, n2, n3) = two_instances(ok("a"), ok("b")).await;
    let routable_at = Instant::now();
    let out = n1.outbound_addr().unwrap();
    let client = http1();
    // The scenario: a caller sends 200 requests one after another, 1 s
    // after both instances are routable, and again 3 s after.
    for at in [Duration::from_secs(1), Duration::from_secs(3)] {
        tokio::time::sleep(at.saturating_sub(routable_at.elapsed())).await;
        let before = (ua.hits(), ub.hits());
        for _ in 0..200 {
            let resp = client.request(get(out, "web", "/")).await.unwrap();
            assert_eq!(resp.status(), 200);
            body_of(resp).await;
        }
        let (a, b) = (ua.hits() - before.0, ub.hits() - before.1);
        println!("split of 200 sequential requests {at:?} after routable: n2 {a}, n3 {b}");
        assert_eq!(a + b, 200);
        assert!(
            (60..=140).contains(&a),
            "each instance should get 30-70 %: n2 {a}, n3 {b}"
        );
    }
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_slow_once_is_tried_again_within_seconds() {
    let slow_done = Arc::new(AtomicBool::new(false));
    let flag = slow_done.clone();
    // n3's instance takes 300 ms for its first request, then answers at once.
    let slow_once: Handler = Arc::new(move |_req: Request<Incoming>| {
        let flag = flag.clone();
        Box::pin(async move {
            if !flag.swap(true, Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            hyper::Response::new(full("b"))
        })
    });
    let (_ua, ub, n1, n2, n3) = two_instances(ok("a"), slow_once).await;
    let out = n1.outbound_addr().unwrap();
    let client = http1();
    // Sequential requests until the slow instance has served its slow one.
    eventually("the slow instance gets a request", WAIT, || async {
        let resp = client.request(get(out, "web", "/")).await.unwrap();
        assert_eq!(resp.status(), 200);
        body_of(resp).await;
        (ub.hits() >= 1).then_some(())
    })
    .await;
    assert!(slow_done.load(Ordering::SeqCst));
    let slow_at = Instant::now();
    // Keep calling, 100 a second: it must be chosen again within seconds.
    let back = eventually(
        "the once-slow instance is chosen again",
        Duration::from_secs(5),
        || async {
            let resp = client.request(get(out, "web", "/")).await.unwrap();
            assert_eq!(resp.status(), 200);
            body_of(resp).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            (ub.hits() >= 2).then(|| slow_at.elapsed())
        },
    )
    .await;
    println!("slow-once instance chosen again after {back:?}");
    n1.shutdown().await;
    n2.shutdown().await;
    n3.shutdown().await;
}
