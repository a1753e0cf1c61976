//! Policy: documents, versions, the durable store, the applied set the data
//! plane reads, operator signatures, and propagation by gossip. Nothing here
//! serves HTTP; the admin API (`admin_policy.rs`) and the proxy call in.

pub mod doc;
pub mod hlc;
pub mod set;
pub mod store;
pub mod sync;
pub mod trust;

pub use doc::{Document, Kind, Problems};
pub use hlc::{ClockError, Hlc, Version};
pub use set::{
    Call, Decision, Destination, Forward, Plan, PolicySet, RateLimiter, RequestInfo, RouteDecision,
    ServiceAddr, Target,
};
pub use store::{Conflict, Entry, PolicyStore, Signature, StoreError};
pub use sync::{PolicyMetrics, PolicySync};
pub use trust::{OperatorKey, Refusal, Trust};

use std::sync::Arc;

/// What the data plane needs of policy: the store (for snapshots), the rate
/// limiter's buckets, and the metrics for refusals.
#[derive(Clone)]
pub struct PolicyPlane {
    /// Applied policies.
    pub store: Arc<PolicyStore>,
    /// Token buckets.
    pub limiter: Arc<RateLimiter>,
    /// Counters.
    pub metrics: PolicyMetrics,
}
