//! Prometheus metrics for a node.
//!
//! Counters kept elsewhere (the QUIC endpoint, the gossip relay) are read at
//! scrape time by [`NodeCollector`], so the hot paths only bump atomics.
//! The exposition is Prometheus text format 0.0.4 (what `promtool check
//! metrics` reads); prometheus-client writes OpenMetrics, which
//! [`to_prometheus_text`] converts.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use gossip::{Gossip, MemberState};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use transport::{Endpoint, RefusalReason};

/// The node's metric registry.
pub struct Metrics {
    registry: Registry,
    members: Arc<Mutex<[i64; 3]>>,
}

impl Metrics {
    /// A registry exporting `endpoint` and `gossip` figures.
    pub fn new(endpoint: Endpoint, gossip: Gossip) -> Self {
        let mut registry = Registry::with_prefix("shoal");
        let members = Arc::new(Mutex::new([0; 3]));
        registry.register_collector(Box::new(NodeCollector {
            endpoint,
            gossip,
            members: members.clone(),
        }));
        Metrics { registry, members }
    }

    /// The registry, for other modules to register their metrics in.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Renders the Prometheus text exposition, refreshing membership first.
    pub async fn render(&self, gossip: &Gossip) -> String {
        let mut counts = [0i64; 3];
        for m in gossip.members().await {
            let i = MemberState::ALL
                .iter()
                .position(|s| *s == m.state)
                .unwrap_or(0);
            counts[i] += 1;
        }
        *self.members.lock().unwrap() = counts;
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            return String::new();
        }
        to_prometheus_text(&text)
    }
}

/// Registers `shoal_cert_expiry_timestamp_seconds{cert,id}`: when each
/// certificate this node depends on expires — its own (`node`), each CA it
/// trusts (`ca`), and each operator whose signature is on a policy it holds
/// (`operator`). Read from disk and the policy store at scrape time, so a
/// renewed certificate shows at the next scrape.
pub fn register_cert_expiry(
    registry: &mut Registry,
    certs: std::path::PathBuf,
    store: Arc<policy::PolicyStore>,
) {
    registry.register_collector(Box::new(CertExpiryCollector { certs, store }));
}

struct CertExpiryCollector {
    certs: std::path::PathBuf,
    store: Arc<policy::PolicyStore>,
}

impl fmt::Debug for CertExpiryCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CertExpiryCollector")
    }
}

impl CertExpiryCollector {
    /// `(cert kind, id, not_after)` for every certificate, deduplicated.
    fn expiries(&self) -> Vec<(&'static str, String, i64)> {
        use transport::certs::{CA_CERT, NODE_CERT, summarize_der, summarize_pem_file};
        let mut out = Vec::new();
        for (kind, file) in [("node", NODE_CERT), ("ca", CA_CERT)] {
            for c in summarize_pem_file(&self.certs.join(file)).unwrap_or_default() {
                let id = c.uris.first().cloned().unwrap_or(c.subject);
                out.push((kind, id, c.not_after));
            }
        }
        for entry in self.store.entries() {
            let cert = entry
                .provenance
                .as_ref()
                .and_then(|p| p.signature.as_ref())
                .and_then(|s| summarize_der(&s.cert));
            if let Some(c) = cert {
                let id = c.uris.first().cloned().unwrap_or(c.subject);
                out.push(("operator", id, c.not_after));
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

impl prometheus_client::collector::Collector for CertExpiryCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let mut family = enc.encode_descriptor(
            "cert_expiry_timestamp_seconds",
            "When a certificate stops being valid (Unix seconds), by certificate: the node's own, each trusted CA, each operator that signed a policy held here",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for (kind, id, not_after) in self.expiries() {
            let labels = [
                ("cert".to_string(), kind.to_string()),
                ("id".to_string(), id),
            ];
            ConstGauge::new(not_after).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Reads endpoint and gossip counters at scrape time.
struct NodeCollector {
    endpoint: Endpoint,
    gossip: Gossip,
    members: Arc<Mutex<[i64; 3]>>,
}

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

fn labelled_counters(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> fmt::Result {
    let mut family =
        enc.encode_descriptor(name, help, None, ConstCounter::new(0u64).metric_type())?;
    for (value, v) in values {
        let labels = [(label.to_string(), value.to_string())];
        ConstCounter::new(*v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl prometheus_client::collector::Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let members = *self.members.lock().unwrap();
        {
            let mut family = enc.encode_descriptor(
                "members",
                "Members of the mesh as this node sees them, by state",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for (state, n) in MemberState::ALL.iter().zip(members) {
                let labels = [("state".to_string(), state.as_str().to_string())];
                ConstGauge::new(n).encode(family.encode_family(&labels)?)?;
            }
        }
        let g = self.gossip.stats();
        let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        labelled_counters(
            &mut enc,
            "gossip_messages",
            "Gossip messages exchanged with peers over QUIC",
            "direction",
            &[("in", ld(&g.messages_in)), ("out", ld(&g.messages_out))],
        )?;
        labelled_counters(
            &mut enc,
            "gossip_bytes",
            "Gossip payload bytes exchanged with peers over QUIC",
            "direction",
            &[("in", ld(&g.bytes_in)), ("out", ld(&g.bytes_out))],
        )?;
        counter(
            &mut enc,
            "gossip_send_failures",
            "Gossip messages that could not be sent (peer unreachable)",
            ld(&g.send_failures),
        )?;
        let gs = self.gossip.guard_stats();
        let refused: Vec<(&str, u64)> = gossip::guard::Refusal::ALL
            .iter()
            .map(|r| (r.as_str(), gs.count(*r)))
            .collect();
        labelled_counters(
            &mut enc,
            "gossip_refused",
            "Gossip refused before it reached chitchat, by reason (forged, replayed, ghost, oversize...)",
            "reason",
            &refused,
        )?;
        counter(
            &mut enc,
            "gossip_signatures_checked",
            "Signatures on gossiped key-values checked",
            ld(&gs.verified),
        )?;
        {
            let c = ConstCounter::new(ld(&gs.verify_nanos) as f64 / 1e9);
            c.encode(enc.encode_descriptor(
                "gossip_verify_seconds",
                "Time spent checking gossip certificates and signatures",
                None,
                c.metric_type(),
            )?)?;
        }
        gauge(
            &mut enc,
            "gossip_healthy",
            "1 while the gossip loop runs, 0 once it stopped (the node then exits)",
            i64::from(self.gossip.failure().is_none()),
        )?;
        let s = self.endpoint.stats();
        gauge(
            &mut enc,
            "quic_connections",
            "QUIC connections currently open to peers",
            s.connections_open.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "quic_connections_opened",
            "QUIC connections established, both directions",
            ld(&s.connections_total),
        )?;
        counter(
            &mut enc,
            "quic_connections_superseded",
            "QUIC connections closed because their peer identity opened too many",
            ld(&s.connections_superseded),
        )?;
        counter(
            &mut enc,
            "quic_udp_sends_blocked",
            "UDP sends that found the socket's send buffer full and waited for it",
            ld(&s.udp_sends_blocked),
        )?;
        counter(
            &mut enc,
            "quic_handshake_failures",
            "QUIC handshakes that failed for any reason",
            ld(&s.handshake_failures),
        )?;
        let refusals: Vec<(&str, u64)> = RefusalReason::ALL
            .iter()
            .map(|r| (r.as_str(), self.endpoint.refusals().count(*r)))
            .collect();
        labelled_counters(
            &mut enc,
            "quic_handshake_refusals",
            "Peer certificates refused during the TLS handshake, by reason",
            "reason",
            &refusals,
        )?;
        labelled_counters(
            &mut enc,
            "cert_reloads",
            "Certificate reloads from disk, by result",
            "result",
            &[
                ("ok", ld(&s.cert_reloads)),
                ("error", ld(&s.cert_reload_errors)),
                ("wrong_identity", ld(&s.cert_reload_wrong_identity)),
            ],
        )?;
        labelled_counters(
            &mut enc,
            "quic_messages_refused",
            "Messages from peers refused on arrival, by reason",
            "reason",
            &[
                ("oversize", ld(&s.oversize_messages)),
                ("stalled", ld(&s.stalled_streams)),
                ("dropped", ld(&s.messages_dropped)),
            ],
        )?;
        gauge(
            &mut enc,
            "quic_message_bytes_buffered",
            "Bytes of received messages held in memory: partly read streams and subscriber queues",
            s.message_bytes_reading.load(Ordering::Relaxed)
                + s.message_bytes_queued.load(Ordering::Relaxed),
        )?;
        {
            let mut family = enc.encode_descriptor(
                "build_info",
                "Build information",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            let labels = [("version".to_string(), env!("CARGO_PKG_VERSION").to_string())];
            ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Converts OpenMetrics text to Prometheus text format 0.0.4: counter
/// families are named with their `_total` suffix, and `# EOF` / `# UNIT`
/// lines are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# TYPE ", "# HELP "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match rewritten {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_counters_to_prometheus_text() {
        let om = "# HELP x_req Requests.\n# TYPE x_req counter\nx_req_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n# EOF\n";
        let p = to_prometheus_text(om);
        assert_eq!(
            p,
            "# HELP x_req_total Requests.\n# TYPE x_req_total counter\nx_req_total 3\n# HELP g A gauge.\n# TYPE g gauge\ng 1\n"
        );
    }
}
