//! Gossip membership for Shoal: chitchat carried inside the mesh's mTLS QUIC
//! connections.
//!
//! This crate owns the chitchat instance, the bridge that moves its bytes over
//! QUIC ([`relay`]), the typed schema of what a node publishes ([`schema`]),
//! the membership view with its change events ([`membership`]), and zone
//! pools with their representatives and backbone ([`zone`]). It must
//! not touch HTTP, policy or the proxy: those live in `node` and publish
//! through [`Gossip::set_key`].
#![forbid(unsafe_code)]

pub mod guard;
mod membership;
mod relay;
pub mod schema;
pub mod seeds;
pub mod settings;
pub mod wire;
pub mod zone;

pub use membership::{
    Gossip, GossipConfig, GossipError, Member, MemberEvent, MemberState, Pool, Published, Trust,
};
pub use schema::{Health, NodeRecord, ServiceRecord, ServingState};

/// The transport channel tag gossip messages travel on.
pub const GOSSIP_CHANNEL: u8 = 1;

/// The transport channel of the zone backbone pool (zone pools on).
pub const BACKBONE_CHANNEL: u8 = 7;

/// The transport channel on which a zone representative asks a seed for its
/// zone's representatives (how backbones in different zones first meet).
pub const ZONE_HINT_CHANNEL: u8 = 8;
