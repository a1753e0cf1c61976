//! The Shoal node: configuration, admin API, metrics, and the `shoal` CLI.
//!
//! `main.rs` only calls [`cli::main`]; everything else is a library so tests
//! and `simulate` run real nodes in process with [`Node::start`].
#![forbid(unsafe_code)]

mod admin;
mod admin_policy;
pub mod cli;
mod cli_policy;
pub mod config;
pub mod metrics;
mod node;
pub mod policy;
pub mod proxy;
pub mod up;

pub use config::{ConfigError, LogFormat, NodeArgs, NodeConfig};
pub use gossip::{Member, MemberState};
pub use node::{Node, NodeError};
