//! Hybrid logical clock versions: a total order over policy writes that
//! tolerates clock skew between nodes.
//!
//! A version is `(wall_ms, logical, node)`. A node's clock never goes
//! backwards: each stamp is above both the local wall clock and every version
//! the node has seen, so a write accepted after another write was observed
//! always orders after it, whatever the two nodes' clocks say.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A policy version: hybrid logical timestamp plus the stamping node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Version {
    /// Physical part, milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical counter within one millisecond.
    pub logical: u32,
    /// Node that accepted the write (breaks ties).
    pub node: String,
}

impl fmt::Display for Version {
    /// `<wall_ms>.<logical>@<node>`, e.g. `1764072000123.0@n1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}@{}", self.wall_ms, self.logical, self.node)
    }
}

impl FromStr for Version {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a version (<ms>.<n>@<node>)");
        let (ts, node) = s.split_once('@').ok_or_else(bad)?;
        let (ms, logical) = ts.split_once('.').ok_or_else(bad)?;
        if node.is_empty() {
            return Err(bad());
        }
        Ok(Version {
            wall_ms: ms.parse().map_err(|_| bad())?,
            logical: logical.parse().map_err(|_| bad())?,
            node: node.to_string(),
        })
    }
}

/// A node's hybrid logical clock.
#[derive(Debug)]
pub struct Hlc {
    node: String,
    last: Mutex<(u64, u32)>,
    skew_ms: AtomicI64,
}

impl Hlc {
    /// A clock for `node`.
    pub fn new(node: impl Into<String>) -> Self {
        Hlc {
            node: node.into(),
            last: Mutex::new((0, 0)),
            skew_ms: AtomicI64::new(0),
        }
    }

    /// Offsets this node's physical clock (chaos tests: a skewed node).
    pub fn set_skew_ms(&self, skew: i64) {
        self.skew_ms.store(skew, Ordering::Relaxed);
    }

    /// Physical time as this node believes it, in ms.
    pub fn physical_ms(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        (now + self.skew_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// A new version, above everything this clock has stamped or observed.
    pub fn stamp(&self) -> Version {
        let pt = self.physical_ms();
        let mut last = self.last.lock().unwrap();
        *last = if pt > last.0 {
            (pt, 0)
        } else {
            (last.0, last.1 + 1)
        };
        Version {
            wall_ms: last.0,
            logical: last.1,
            node: self.node.clone(),
        }
    }

    /// Folds in a version seen from elsewhere, so later stamps order after it.
    pub fn observe(&self, v: &Version) {
        let mut last = self.last.lock().unwrap();
        if (v.wall_ms, v.logical) > *last {
            *last = (v.wall_ms, v.logical);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_and_survive_a_clock_behind() {
        let a = Hlc::new("a");
        let v1 = a.stamp();
        let v2 = a.stamp();
        assert!(v2 > v1);

        // b's clock is an hour behind, but it has seen a's write.
        let b = Hlc::new("b");
        b.set_skew_ms(-3_600_000);
        b.observe(&v2);
        let v3 = b.stamp();
        assert!(v3 > v2, "{v3} should order after {v2}");
    }

    #[test]
    fn display_round_trips_and_ties_break_by_node() {
        let v = Version {
            wall_ms: 5,
            logical: 2,
            node: "n1".into(),
        };
        assert_eq!(v.to_string().parse::<Version>().unwrap(), v);
        let w = Version {
            node: "n2".into(),
            ..v.clone()
        };
        assert!(w > v);
        assert!("nonsense".parse::<Version>().is_err());
    }
}
