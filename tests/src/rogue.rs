//! A rogue mesh member: it holds a valid certificate from the mesh CA and
//! speaks raw chitchat bytes on the gossip channel, as a modified binary
//! would. It also accepts data-plane streams and counts them, so a test can
//! tell whether any caller's traffic reached it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use gossip::guard::{CERT_KEY, sign_value};
use gossip::wire::{KeyValue, KvStatus, Message, NodeId};
use transport::signing::Signer;
use transport::{Endpoint, EndpointConfig, TlsFiles};

use crate::Pki;

/// A peer with a valid certificate that lies.
pub struct Rogue {
    /// Its QUIC endpoint.
    pub endpoint: Endpoint,
    /// Its certificate key.
    pub signer: Signer,
    /// Data-plane streams callers opened to it.
    pub streams: Arc<AtomicU64>,
}

impl Rogue {
    /// A rogue whose certificate names node `name` and `services`.
    pub async fn start(pki: &Pki, name: &str, services: &[&str]) -> Rogue {
        transport::install_crypto_provider();
        let dir = pki.issue(name, services);
        let endpoint = Endpoint::bind(EndpointConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            TlsFiles::new(&dir),
        ))
        .expect("rogue endpoint");
        let signer = Signer::from_files(&dir.join("node.pem"), &dir.join("node.key")).unwrap();
        let streams = Arc::new(AtomicU64::new(0));
        if let Some(mut rx) = endpoint.take_bi_streams() {
            let n = streams.clone();
            tokio::spawn(async move {
                while let Some(s) = rx.recv().await {
                    n.fetch_add(1, Ordering::Relaxed);
                    drop(s);
                }
            });
        }
        Rogue {
            endpoint,
            signer,
            streams,
        }
    }

    /// Its QUIC address.
    pub fn addr(&self) -> SocketAddr {
        self.endpoint.local_addr()
    }

    /// Data-plane streams received so far.
    pub fn streams(&self) -> u64 {
        self.streams.load(Ordering::Relaxed)
    }

    /// A key-value signed with the rogue's own key, claimed for `id`.
    pub fn signed(&self, id: &NodeId, key: &str, version: u64, value: &str) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: sign_value(&self.signer, id, key, version, value),
            version,
            status: KvStatus::Set,
        }
    }

    /// The rogue's certificate as a signed `cert` key-value for `id`.
    pub fn cert_kv(&self, id: &NodeId, version: u64) -> KeyValue {
        let der = base64::engine::general_purpose::STANDARD.encode(self.signer.cert_der().as_ref());
        self.signed(id, CERT_KEY, version, &der)
    }

    /// Sends a chitchat message to `to` on the gossip channel.
    pub async fn send(&self, to: SocketAddr, msg: &Message) {
        self.send_raw(to, &msg.encode()).await;
    }

    /// Sends raw bytes to `to` on the gossip channel.
    pub async fn send_raw(&self, to: SocketAddr, bytes: &[u8]) {
        let _ = self
            .endpoint
            .send_message(to, gossip::GOSSIP_CHANNEL, bytes)
            .await;
    }
}

/// A plain (unsigned) key-value, as an unmodified chitchat would carry it.
pub fn plain(key: &str, version: u64, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: value.into(),
        version,
        status: KvStatus::Set,
    }
}

/// The chitchat id a node's member entry stands for.
pub fn id_of(m: &gossip::Member) -> NodeId {
    NodeId {
        name: m.name.clone(),
        generation: m.generation,
        addr: m.addr,
    }
}

/// The value of `name{label}` in Prometheus text, 0 if absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}
