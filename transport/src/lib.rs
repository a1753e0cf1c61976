//! QUIC transport for Shoal: mutual TLS 1.3 between mesh nodes.
//!
//! This crate owns everything between two nodes' UDP sockets: node identities
//! (SPIFFE URI SANs), the mesh CA and certificate tooling, rustls verifiers that
//! accept only the mesh CA, the quinn endpoint with its connection cache, the
//! UDP socket seam that `simulate` wraps to inject faults, and certificate hot
//! reload. It knows nothing about gossip, HTTP or policy.
#![forbid(unsafe_code)]

pub mod certs;
mod endpoint;
mod identity;
pub mod signing;
pub mod socket;
mod tls;

pub use endpoint::{
    BiStream, CHANNEL_QUEUE_BYTES, CONNECTION_RECEIVE_WINDOW, Connected, Endpoint, EndpointConfig,
    EndpointError, EndpointStats, LARGE_MESSAGE_SLOTS, MAX_BIDI_STREAMS, MAX_CONNECTIONS_PER_PEER,
    MAX_MESSAGE_BYTES, MAX_UNI_STREAMS, Message, SMALL_MESSAGE_BYTES, STREAM_RECEIVE_WINDOW,
};
pub use identity::{Identity, IdentityError};
pub use tls::{RefusalReason, Refusals, TlsError, TlsFiles};

/// ALPN protocol id spoken between Shoal nodes.
pub const ALPN: &[u8] = b"shoal/1";

/// Installs ring as the process-wide rustls crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
