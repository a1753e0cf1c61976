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

/// How far ahead of this node's clock a version's wall part may be: a stamp
/// further in the future is refused, so no record can push the clock (and
/// every later write) out of reach.
pub const MAX_AHEAD_MS: u64 = 10 * 60 * 1000;

/// Why a clock operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    /// The logical counter is at its maximum for this millisecond.
    #[error("logical counter exhausted at {wall_ms} ms")]
    Saturated {
        /// The millisecond whose counter is full.
        wall_ms: u64,
    },
    /// A version too far in the future.
    #[error(
        "version {version} is {ahead_ms} ms ahead of this node's clock (the bound is {MAX_AHEAD_MS} ms)"
    )]
    Ahead {
        /// The version.
        version: String,
        /// By how much.
        ahead_ms: u64,
    },
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
    /// Errors (and changes nothing) when the logical counter would wrap.
    pub fn stamp(&self) -> Result<Version, ClockError> {
        let pt = self.physical_ms();
        let mut last = self.last.lock().unwrap();
        let next = if pt > last.0 {
            (pt, 0)
        } else {
            let logical = last
                .1
                .checked_add(1)
                .ok_or(ClockError::Saturated { wall_ms: last.0 })?;
            (last.0, logical)
        };
        *last = next;
        Ok(Version {
            wall_ms: next.0,
            logical: next.1,
            node: self.node.clone(),
        })
    }

    /// The version of a write an operator signed at `signed_at_ms`, given
    /// the version it replaces: the wall part is the operator's timestamp
    /// (so versions order as the operator's signatures do), the logical part
    /// breaks ties within one millisecond and saturates instead of wrapping.
    pub fn stamp_signed(
        &self,
        signed_at_ms: u64,
        replaces: Option<&Version>,
    ) -> Result<Version, ClockError> {
        self.check_ahead(signed_at_ms, 0)?;
        let logical = match replaces {
            Some(r) if r.wall_ms == signed_at_ms => {
                r.logical.checked_add(1).ok_or(ClockError::Saturated {
                    wall_ms: signed_at_ms,
                })?
            }
            _ => 0,
        };
        let v = Version {
            wall_ms: signed_at_ms,
            logical,
            node: self.node.clone(),
        };
        self.observe(&v)?;
        Ok(v)
    }

    /// Refuses a wall time more than [`MAX_AHEAD_MS`] past this node's clock.
    pub fn check_ahead(&self, wall_ms: u64, logical: u32) -> Result<(), ClockError> {
        let now = self.physical_ms();
        if wall_ms > now.saturating_add(MAX_AHEAD_MS) {
            return Err(ClockError::Ahead {
                version: format!("{wall_ms}.{logical}"),
                ahead_ms: wall_ms - now,
            });
        }
        Ok(())
    }

    /// Folds in a version seen from elsewhere, so later stamps order after
    /// it. A version too far ahead of this node's clock is refused and
    /// changes nothing.
    pub fn observe(&self, v: &Version) -> Result<(), ClockError> {
        self.check_ahead(v.wall_ms, v.logical)?;
        let mut last = self.last.lock().unwrap();
        if (v.wall_ms, v.logical) > *last {
            *last = (v.wall_ms, v.logical);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_increase_and_survive_a_clock_behind() {
        let a = Hlc::new("a");
        let v1 = a.stamp().unwrap();
        let v2 = a.stamp().unwrap();
        assert!(v2 > v1);

        // b's clock is five minutes behind, but it has seen a's write.
        let b = Hlc::new("b");
        b.set_skew_ms(-300_000);
        b.observe(&v2).unwrap();
        let v3 = b.stamp().unwrap();
        assert!(v3 > v2, "{v3} should order after {v2}");
    }

    #[test]
    fn far_future_versions_are_refused_and_the_counter_saturates() {
        let c = Hlc::new("c");
        let forged: Version = "18446744073709551615.4294967295@n1".parse().unwrap();
        assert!(matches!(c.observe(&forged), Err(ClockError::Ahead { .. })));
        let before = c.stamp().unwrap();
        assert!(before.wall_ms < u64::MAX / 2, "{before}");
        // Eleven minutes ahead: refused; nine: accepted.
        let now = c.physical_ms();
        let ahead = |ms: u64| Version {
            wall_ms: now + ms,
            logical: 0,
            node: "x".into(),
        };
        assert!(c.observe(&ahead(11 * 60_000)).is_err());
        assert!(c.observe(&ahead(9 * 60_000)).is_ok());
        // A full logical counter errors instead of wrapping to 0.
        let full = Version {
            wall_ms: now + 9 * 60_000,
            logical: u32::MAX,
            node: "x".into(),
        };
        c.observe(&full).unwrap();
        assert!(matches!(c.stamp(), Err(ClockError::Saturated { .. })));
        assert!(matches!(
            c.stamp_signed(full.wall_ms, Some(&full)),
            Err(ClockError::Saturated { .. })
        ));
        // Signed stamps take the operator's time as their wall part.
        let v = c.stamp_signed(now, None).unwrap();
        assert_eq!((v.wall_ms, v.logical), (now, 0));
        let w = c.stamp_signed(now, Some(&v)).unwrap();
        assert_eq!((w.wall_ms, w.logical), (now, 1));
        assert!(c.stamp_signed(now + 11 * 60_000, None).is_err());
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
