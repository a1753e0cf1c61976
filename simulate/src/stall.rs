//! Stalls: moments the machine kept the harness's own runtime (and so, in
//! process, every node on it) from running.
//!
//! In-process nodes share the harness's tokio runtime. When the OS leaves
//! its threads waiting on a run queue for half a second, every node is in
//! effect paused at once: none sends heartbeats, and on waking each may
//! rightly see the others silent for longer than its failure detector
//! allows. [`watch`] ticks every [`TICK`]; a tick at least [`MIN_STALL`]
//! late is recorded with how long the process's threads waited on a run
//! queue meanwhile (`/proc/self/task/*/schedstat`, second field). Only a
//! late tick during which the threads *waited to run* counts as the
//! machine's doing (see [`Stall::starved`]); a tick late because the
//! process was busy or blocked (a node's bug) is recorded but never
//! excuses anything.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

/// How often the watcher ticks.
pub const TICK: Duration = Duration::from_millis(100);
/// A tick at least this late is a stall.
pub const MIN_STALL: Duration = Duration::from_millis(500);

/// One late tick.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Stall {
    /// When the late tick finally ran, seconds from the start of the timeline.
    pub t: f64,
    /// How late it was: the runtime ran nothing of the watcher's for
    /// `late + TICK` before `t`.
    pub late: f64,
    /// Seconds the process's threads spent runnable but waiting for a CPU
    /// since the previous tick, summed over threads (`None`: the OS does
    /// not say).
    pub run_queue_wait: Option<f64>,
}

impl Stall {
    /// The OS kept the runtime's threads waiting for at least half the
    /// stall: the machine starved the process (not a bug in it).
    pub fn starved(&self) -> bool {
        self.run_queue_wait.is_some_and(|w| w >= 0.5 * self.late)
    }

    /// The span during which nothing ran: `[t - late - TICK, t)`.
    pub fn span(&self) -> (f64, f64) {
        (self.t - self.late - TICK.as_secs_f64(), self.t)
    }
}

/// How long each of this process's threads has waited on a run queue so
/// far: nanoseconds by thread id (`/proc/self/task/<tid>/schedstat`, second
/// field).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQueueWaits(HashMap<u64, u128>);

impl RunQueueWaits {
    /// Reads every thread's figure now (`None`: the OS does not say).
    pub fn read() -> Option<Self> {
        let mut waits = HashMap::new();
        for task in std::fs::read_dir("/proc/self/task").ok()? {
            let task = task.ok()?;
            let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            // A thread may end between listing and reading: skip it.
            let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
                continue;
            };
            let waited: u128 = text.split_whitespace().nth(1)?.parse().ok()?;
            waits.insert(tid, waited);
        }
        Some(RunQueueWaits(waits))
    }

    /// Seconds the threads waited on a run queue between `earlier` and
    /// `self`, summed over threads. A thread that ended meanwhile is left
    /// out (a plain total over threads would shrink by everything it ever
    /// waited, so a thread exit could hide a stall or make the figure go
    /// negative); one that started meanwhile counts whole.
    pub fn since(&self, earlier: &RunQueueWaits) -> f64 {
        let ns: u128 = self
            .0
            .iter()
            .map(|(tid, now)| now.saturating_sub(earlier.0.get(tid).copied().unwrap_or(0)))
            .sum();
        ns as f64 / 1e9
    }

    /// Threads read.
    pub fn threads(&self) -> usize {
        self.0.len()
    }
}

/// Ticks every [`TICK`] from `start` until aborted, recording late ticks.
pub async fn watch(start: Instant, out: Arc<Mutex<Vec<Stall>>>) {
    let mut next = start + TICK;
    let mut waited = RunQueueWaits::read();
    loop {
        tokio::time::sleep_until(next).await;
        let now = Instant::now();
        let late = now.saturating_duration_since(next);
        let waited_now = RunQueueWaits::read();
        if late >= MIN_STALL {
            let run_queue_wait = match (&waited, &waited_now) {
                (Some(a), Some(b)) => Some(b.since(a)),
                _ => None,
            };
            out.lock().unwrap().push(Stall {
                t: (now - start).as_secs_f64(),
                late: late.as_secs_f64(),
                run_queue_wait,
            });
        }
        waited = waited_now;
        next = now + TICK;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_stall_spent_waiting_for_a_cpu_is_the_machines_doing() {
        let s = |late: f64, wait: Option<f64>| Stall {
            t: 5.0,
            late,
            run_queue_wait: wait,
        };
        assert!(s(1.0, Some(1.7)).starved());
        assert!(s(1.0, Some(0.5)).starved());
        assert!(!s(1.0, Some(0.2)).starved(), "busy or blocked: not excused");
        assert!(!s(1.0, None).starved(), "unknown: not excused");
        assert_eq!(s(0.8, None).span(), (5.0 - 0.8 - 0.1, 5.0));
    }

    #[test]
    fn this_process_run_queue_wait_is_readable_and_never_negative() {
        let a = RunQueueWaits::read().expect("/proc/self/task/*/schedstat on Linux");
        assert!(a.threads() >= 1);
        let b = RunQueueWaits::read().expect("again");
        assert!(b.since(&a) >= 0.0);
    }

    #[test]
    fn a_thread_that_ends_between_readings_does_not_shrink_the_wait() {
        let waits = |pairs: &[(u64, u128)]| RunQueueWaits(pairs.iter().copied().collect());
        let before = waits(&[(1, 1_000_000_000), (2, 5_000_000_000)]);
        // Thread 2 ended; thread 1 waited 0.25 s more; thread 3 started and waited 0.1 s.
        let after = waits(&[(1, 1_250_000_000), (3, 100_000_000)]);
        let w = after.since(&before);
        assert!((w - 0.35).abs() < 1e-9, "{w}");
        // A plain total over threads would have said 1.35 - 6.0 < 0.
    }
}
