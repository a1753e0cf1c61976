//! The Shoal node: configuration, admin API, metrics, and the `shoal` CLI.
//!
//! `main.rs` only calls [`cli::main`]; everything else is a library so tests
//! and `simulate` run real nodes in process with [`Node::start`].
// One `unsafe` block, allowed where it is: `resident.rs`'s `madvise`.
#![deny(unsafe_code)]

mod admin;
mod admin_policy;
pub mod cli;
mod cli_life;
mod cli_policy;
mod cli_stat;
pub mod clock;
pub mod config;
mod demo;
pub mod lifecycle;
pub mod metrics;
mod node;
mod resident;
pub mod sched;
mod tap;
pub mod up;

// The dashboard's assets, served by the admin API at `/ui`.
mod ui;

pub use config::{ConfigError, LogFormat, NodeArgs, NodeConfig};
pub use gossip::{Member, MemberState, ServingState};
pub use node::{Node, NodeError};
/// Certificate tooling and the UDP socket seam, for harnesses such as
/// `simulate` that run nodes in process and wrap their sockets.
pub use transport::{Identity, certs, socket};
/// The gossip and transport crates, for harnesses that play a peer speaking
/// raw gossip and policy bytes (the `simulate` byzantine scenario).
pub use {gossip, transport};
/// The policy plane and the data plane, crates of their own (`node/policy`,
/// `node/proxy`) that the node wires together.
pub use {policy, proxy};
