//! The Linux scheduling policy of the node's own threads (`--sched-policy`).
//!
//! `batch` (SCHED_BATCH) means a node woken by a packet does not preempt the
//! thread that is running on its CPU; it runs when that thread sleeps or its
//! slice ends. On a host with spare cores, where the running thread is
//! usually the next hop of the same request (the app, the other node,
//! nginx) and about to sleep anyway, that saves a context switch and a cold
//! cache per hop (docs/PROXY.md, "Scheduling policy"). When CPU-bound work
//! fills the cores it makes the node wait for the end of a slice, so it is
//! not the default.

use std::io;

/// A policy the node can run its threads under.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    clap::ValueEnum,
    Default,
)]
#[serde(rename_all = "lowercase")]
pub enum SchedPolicy {
    /// SCHED_OTHER, the kernel's default: a woken node may preempt.
    #[default]
    Normal,
    /// SCHED_BATCH: a woken node never preempts the running thread.
    Batch,
}

impl SchedPolicy {
    fn raw(self) -> libc::c_int {
        match self {
            SchedPolicy::Normal => libc::SCHED_OTHER,
            SchedPolicy::Batch => libc::SCHED_BATCH,
        }
    }
}

#[allow(unsafe_code)]
fn set(tid: libc::pid_t, policy: SchedPolicy) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call's duration.
    if unsafe { libc::sched_setscheduler(tid, policy.raw(), &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts every thread of this process under `policy`; threads started later
/// inherit it from the thread that starts them. `Normal` changes nothing.
pub fn apply(policy: SchedPolicy) -> io::Result<()> {
    if policy == SchedPolicy::Normal {
        return Ok(());
    }
    for task in std::fs::read_dir("/proc/self/task")? {
        let Some(tid) = task?
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        match set(tid, policy) {
            Ok(()) => {}
            // The thread ended between the listing and the call.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Makes `command`'s process (the app of `shoal run`) start under the
/// kernel's default policy, whatever the node runs under.
#[allow(unsafe_code)]
pub fn child_starts_normal(command: &mut tokio::process::Command) {
    // SAFETY: between fork and exec the closure makes one system call and
    // allocates nothing.
    unsafe {
        command.pre_exec(|| set(0, SchedPolicy::Normal));
    }
}
