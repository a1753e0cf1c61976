//! What recording a request costs the proxy, per request, on this machine:
//! the metrics and window alone (`Stats::record`), the whole finish path
//! (`Stats::finish`: body wrapper, byte counts, metrics, window) with nobody
//! tapping and the access log skipping successes, and the same with one tap
//! listener draining events on another thread.
//!
//! `cargo run --release -p proxy --example observe_cost`

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Full};
use prometheus_client::registry::Registry;
use proxy::access::AccessLog;
use proxy::stats::{Direction, Edge, Exchange, Stats};

const N: u32 = 200_000;

fn finish_one(stats: &Arc<Stats>) {
    let x = Exchange {
        edge: Edge::new(Direction::Outbound, "client".into(), "web".into()),
        route: String::new(),
        method: "GET".into(),
        path: "/hello".into(),
        grpc_call: false,
        start: Instant::now(),
        access_log: AccessLog::Errors,
    };
    let body = Full::new(Bytes::from_static(b"hello world"))
        .map_err(|e| match e {})
        .boxed_unsync();
    let resp = stats.finish(x, Response::new(body));
    let collected = futures::executor::block_on(resp.into_body().collect());
    assert!(collected.is_ok());
}

fn per_request(label: &str, mut f: impl FnMut()) {
    for _ in 0..N / 10 {
        f();
    }
    let start = Instant::now();
    for _ in 0..N {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(N);
    println!("{label:<46} {ns:>8.0} ns/request");
}

fn main() {
    let mut reg = Registry::default();
    let stats = Stats::new(&mut reg);
    let edge = Edge::new(Direction::Outbound, "client".into(), "web".into());
    println!("{N} requests each, one thread");
    per_request("metrics + window only (Stats::record)", || {
        stats.record(&edge, "", 200, None, Duration::from_micros(300));
    });
    per_request("finish, nobody tapping, log skips successes", || {
        finish_one(&stats)
    });
    let mut rx = stats.subscribe();
    let drain = std::thread::spawn(move || {
        let mut got = 0u64;
        loop {
            match rx.blocking_recv() {
                Ok(_) => got += 1,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => got += n,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return got,
            }
        }
    });
    per_request("finish, one tap listener", || finish_one(&stats));
    drop(stats);
    let got = drain.join().unwrap();
    println!("(the listener saw or was told it missed {got} events)");
}
