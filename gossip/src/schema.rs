//! The gossip key schema: what each node publishes about itself.
//!
//! Schema version 1. Every key lives in the node's own chitchat key space:
//!
//! | key        | value                                              |
//! |------------|----------------------------------------------------|
//! | `schema`   | schema version, `"1"`                               |
//! | `zone`     | the node's zone (free text, `default` if unset)     |
//! | `admin`    | the node's admin HTTP address, `host:port`          |
//! | `build`    | the Shoal version the node runs                     |
//! | `state`    | `serving`, `draining` or `left`                     |
//! | `services` | JSON array of the service names the node fronts     |
//! | `svc.<name>` | JSON [`ServiceRecord`]: one local instance of service `<name>` |
//!
//! A `svc.<name>` key exists while the node fronts an instance of `<name>`
//! (registered with `--service` or `[[service]]`) and is deleted when it stops.
//! Its value holds nothing address-specific (the node's QUIC address is its
//! gossip address), only what balancing needs:
//!
//! ```json
//! {"health":"healthy","weight":100,"zone":"eu-1","in_flight":3,"ewma_ms":1.25,"protocol":"auto"}
//! ```
//!
//! `health` is `healthy`, `unhealthy` or `unknown` (not checked yet); only
//! `healthy` instances on `serving` nodes take traffic. `in_flight` and
//! `ewma_ms` (peak-EWMA latency of the instance as its node measures it) are
//! refreshed at most once a second, so they seed cold balancers rather than
//! steer every request. Unknown fields are ignored; missing ones get defaults.
//!
//! Readers ignore keys they do not know, so later versions may add keys
//! (service health and load, policy versions) without breaking older nodes.
//! A node that sees a higher `schema` than it knows still reads the keys above.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Key names (see the module docs).
pub mod keys {
    /// Schema version.
    pub const SCHEMA: &str = "schema";
    /// Zone.
    pub const ZONE: &str = "zone";
    /// Admin address.
    pub const ADMIN: &str = "admin";
    /// Build version.
    pub const BUILD: &str = "build";
    /// Serving state.
    pub const STATE: &str = "state";
    /// Service names, JSON array.
    pub const SERVICES: &str = "services";
    /// Prefix of per-service instance keys: `svc.<name>`.
    pub const SERVICE_PREFIX: &str = "svc.";

    /// The key of service `name`'s instance record.
    pub fn service(name: &str) -> String {
        format!("{SERVICE_PREFIX}{name}")
    }
}

/// Health of a service instance as its node checks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not checked yet.
    #[default]
    Unknown,
    /// Passing its checks.
    Healthy,
    /// Failing its checks.
    Unhealthy,
}

/// What a node publishes under `svc.<name>` about its instance of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServiceRecord {
    /// Health from active checks.
    pub health: Health,
    /// Relative weight.
    pub weight: u32,
    /// The node's zone.
    pub zone: String,
    /// Requests in flight to the instance.
    pub in_flight: u64,
    /// Peak-EWMA latency of the instance, milliseconds.
    pub ewma_ms: f64,
    /// `auto`, `http1` or `h2c`.
    pub protocol: String,
}

impl Default for ServiceRecord {
    fn default() -> Self {
        ServiceRecord {
            health: Health::Unknown,
            weight: 100,
            zone: "default".into(),
            in_flight: 0,
            ewma_ms: 0.0,
            protocol: "auto".into(),
        }
    }
}

/// Whether a node takes new traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServingState {
    /// Takes traffic.
    Serving,
    /// Finishing in-flight work; peers should stop choosing it.
    Draining,
    /// Left the mesh gracefully.
    Left,
}

impl fmt::Display for ServingState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServingState::Serving => "serving",
            ServingState::Draining => "draining",
            ServingState::Left => "left",
        })
    }
}

impl FromStr for ServingState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "serving" => Ok(ServingState::Serving),
            "draining" => Ok(ServingState::Draining),
            "left" => Ok(ServingState::Left),
            other => Err(format!("unknown state {other:?}")),
        }
    }
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Schema version the publisher wrote.
    pub schema: u32,
    /// Zone.
    pub zone: String,
    /// Admin HTTP address.
    pub admin: String,
    /// Build version.
    pub build: String,
    /// Serving state.
    pub state: ServingState,
    /// Services the node fronts.
    pub services: Vec<String>,
}

impl NodeRecord {
    /// A serving record for this build.
    pub fn new(zone: impl Into<String>, admin: impl Into<String>, services: Vec<String>) -> Self {
        NodeRecord {
            schema: SCHEMA_VERSION,
            zone: zone.into(),
            admin: admin.into(),
            build: env!("CARGO_PKG_VERSION").to_string(),
            state: ServingState::Serving,
            services,
        }
    }

    /// The record as chitchat key-values.
    pub fn to_kvs(&self) -> Vec<(String, String)> {
        vec![
            (keys::SCHEMA.into(), self.schema.to_string()),
            (keys::ZONE.into(), self.zone.clone()),
            (keys::ADMIN.into(), self.admin.clone()),
            (keys::BUILD.into(), self.build.clone()),
            (keys::STATE.into(), self.state.to_string()),
            (
                keys::SERVICES.into(),
                serde_json::to_string(&self.services).unwrap_or_else(|_| "[]".into()),
            ),
        ]
    }

    /// Reads a record from key lookups; missing or unreadable keys get
    /// defaults (a node may not have published everything yet).
    pub fn from_lookup<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Self {
        NodeRecord {
            schema: get(keys::SCHEMA).and_then(|v| v.parse().ok()).unwrap_or(0),
            zone: get(keys::ZONE).unwrap_or("default").to_string(),
            admin: get(keys::ADMIN).unwrap_or_default().to_string(),
            build: get(keys::BUILD).unwrap_or_default().to_string(),
            state: get(keys::STATE)
                .and_then(|v| v.parse().ok())
                .unwrap_or(ServingState::Serving),
            services: get(keys::SERVICES)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn record_round_trips_through_keys() {
        let mut rec = NodeRecord::new("eu-1", "127.0.0.1:9001", vec!["web".into(), "api".into()]);
        rec.state = ServingState::Draining;
        let kvs: HashMap<String, String> = rec.to_kvs().into_iter().collect();
        let back = NodeRecord::from_lookup(|k| kvs.get(k).map(String::as_str));
        assert_eq!(back, rec);
    }

    #[test]
    fn service_record_reads_partial_json() {
        let r: ServiceRecord = serde_json::from_str(r#"{"health":"healthy","x":1}"#).unwrap();
        assert_eq!(r.health, Health::Healthy);
        assert_eq!(r.weight, 100);
    }

    #[test]
    fn missing_keys_get_defaults() {
        let rec = NodeRecord::from_lookup(|_| None);
        assert_eq!(rec.zone, "default");
        assert_eq!(rec.state, ServingState::Serving);
        assert!(rec.services.is_empty());
    }
}
