//! Clock readings between nodes, for `shoal check`'s clock-offset line.
//!
//! A prober sends an 8-byte nonce on [`CLOCK_CHANNEL`]; the node answers with
//! the nonce and its wall clock (Unix nanoseconds, big-endian). The prober
//! takes the offset against the midpoint of its own send and receive times.
//! Answers are capped (a peer cannot turn the node into an amplifier: the
//! answer is 16 bytes for 8, and at most [`MAX_ANSWERS_PER_SEC`] a second).

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use transport::Endpoint;

/// The QUIC message channel of clock readings.
pub const CLOCK_CHANNEL: u8 = 6;
/// At most this many answers a second, whoever asks.
pub const MAX_ANSWERS_PER_SEC: u32 = 20;

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Answers clock probes until the endpoint closes.
pub async fn serve(endpoint: Endpoint) {
    endpoint.limit_channel(CLOCK_CHANNEL, 8);
    let mut rx = endpoint.subscribe(CLOCK_CHANNEL, 16);
    let mut window = Instant::now();
    let mut answered = 0u32;
    while let Some(msg) = rx.recv().await {
        if msg.payload.len() != 8 {
            continue;
        }
        if window.elapsed() >= Duration::from_secs(1) {
            window = Instant::now();
            answered = 0;
        }
        if answered >= MAX_ANSWERS_PER_SEC {
            continue;
        }
        answered += 1;
        let mut answer = [0u8; 16];
        answer[..8].copy_from_slice(&msg.payload);
        answer[8..].copy_from_slice(&unix_nanos().to_be_bytes());
        let to = msg.from.addr();
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            let _ = endpoint.send_message(to, CLOCK_CHANNEL, &answer).await;
        });
    }
}

/// One reading of `addr`'s clock against ours.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Peer clock minus ours, in milliseconds (positive: the peer is ahead).
    pub offset_ms: f64,
    /// Round trip of the probe, in milliseconds (the offset's uncertainty is
    /// at most half of it).
    pub rtt_ms: f64,
}

/// Probes `addr` (a node's QUIC address) up to three times within
/// `timeout` and returns the reading with the shortest round trip.
pub async fn probe(endpoint: &Endpoint, addr: SocketAddr, timeout: Duration) -> Option<Reading> {
    let mut rx = endpoint.subscribe(CLOCK_CHANNEL, 16);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut best: Option<Reading> = None;
    for _ in 0..3 {
        let nonce: u64 = rand::random();
        let sent_wall = unix_nanos();
        let sent = Instant::now();
        let bytes = nonce.to_be_bytes();
        let send = endpoint.send_message(addr, CLOCK_CHANNEL, &bytes);
        if !matches!(tokio::time::timeout_at(deadline, send).await, Ok(Ok(()))) {
            return best;
        }
        let answer = loop {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) if m.payload.len() == 16 && m.payload[..8] == nonce.to_be_bytes() => {
                    break Some(m.payload);
                }
                Ok(Some(_)) => continue,
                _ => break None,
            }
        };
        let Some(answer) = answer else {
            return best;
        };
        let rtt = sent.elapsed();
        let theirs = u64::from_be_bytes(answer[8..16].try_into().expect("16 bytes")) as f64;
        let midpoint = sent_wall as f64 + rtt.as_nanos() as f64 / 2.0;
        let reading = Reading {
            offset_ms: (theirs - midpoint) / 1e6,
            rtt_ms: rtt.as_secs_f64() * 1e3,
        };
        if best.is_none_or(|b| reading.rtt_ms < b.rtt_ms) {
            best = Some(reading);
        }
    }
    best
}
