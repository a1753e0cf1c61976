//! The UDP socket seam under QUIC.
//!
//! The endpoint never binds its own socket: it asks for a [`SharedSocket`],
//! and an optional [`SocketLayer`] may wrap it first. `simulate` plugs in a
//! layer that drops, delays, duplicates or cuts packets per link; production
//! runs with no layer.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{AsyncUdpSocket, Runtime, TokioRuntime};

/// A socket as quinn sees it.
pub type SharedSocket = Arc<dyn AsyncUdpSocket>;

/// Wraps the endpoint's real socket (fault injection, capture, accounting).
pub trait SocketLayer: Send + Sync + 'static {
    /// Returns the socket the endpoint will use in place of `inner`.
    fn wrap(&self, inner: SharedSocket) -> SharedSocket;
}

/// Binds a UDP socket on `addr` for use under quinn on the tokio runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<SharedSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    TokioRuntime.wrap_udp_socket(socket)
}

impl std::fmt::Debug for dyn SocketLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SocketLayer")
    }
}
