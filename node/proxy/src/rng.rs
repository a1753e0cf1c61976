//! Where the request path's randomness comes from: one small generator per
//! request (endpoint choice, weighted backend pick, fault percentages,
//! backoff jitter). With `--rng-seed` every request's generator derives
//! from the seed and the request's number on this node, so a scenario's
//! seed decides the same draws for the same sequence of requests; without
//! it, from the thread's entropy-seeded generator.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::SeedableRng;
use rand::rngs::SmallRng;

/// Hands out per-request generators.
#[derive(Debug)]
pub(crate) struct Seeder {
    seed: Option<u64>,
    next: AtomicU64,
}

impl Seeder {
    /// Generators derived from `seed`, else from entropy.
    pub fn new(seed: Option<u64>) -> Self {
        Seeder {
            seed,
            next: AtomicU64::new(0),
        }
    }

    /// The generator for the next request.
    pub fn request(&self) -> SmallRng {
        match self.seed {
            Some(seed) => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                SmallRng::seed_from_u64(seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            }
            None => SmallRng::from_rng(rand::thread_rng()).expect("the thread rng never fails"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn draws(s: &Seeder) -> Vec<u64> {
        (0..4).map(|_| s.request().r#gen::<u64>()).collect()
    }

    #[test]
    fn a_seed_decides_every_request_s_draws() {
        let a = draws(&Seeder::new(Some(7)));
        assert_eq!(a, draws(&Seeder::new(Some(7))));
        assert_ne!(a, draws(&Seeder::new(Some(8))));
        let mut distinct = a.clone();
        distinct.dedup();
        assert_eq!(distinct.len(), 4, "each request gets its own stream");
        assert_ne!(draws(&Seeder::new(None)), draws(&Seeder::new(None)));
    }
}
