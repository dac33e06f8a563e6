//! Processes left behind by workers.
//!
//! Policy (docs/reliability.md): sockvisor keeps no process it does not supervise. It is a
//! child subreaper (`PR_SET_CHILD_SUBREAPER`; as PID 1 it is one anyway), so whatever a
//! worker leaves behind reparents to sockvisor: the real server of a program that
//! daemonizes, the children of a worker that crashed, a double-forked helper. Each such
//! orphan gets SIGTERM when sockvisor finds it, and SIGKILL after the stop timeout; every
//! child, orphan or worker, is reaped (no zombie). As systemd stops what is left of a
//! service whose main process exited, so sockvisor stops what is left of a worker.
//!
//! Orphans are looked for when a child exits and at stop; `/proc/self/task/*/children`
//! lists sockvisor's children (the loop is one thread, so one task).

use super::Supervisor;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::time::Instant;

/// A process that reparented to sockvisor.
pub(super) struct Orphan {
    name: String,
    /// SIGKILL then; `None` once sent.
    kill_at: Option<Instant>,
}

/// Make orphaned descendants of workers reparent to sockvisor.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        log::warn!(
            "cannot become a child subreaper ({}): processes that workers leave behind will not be stopped",
            std::io::Error::last_os_error()
        );
    }
}

/// sockvisor's children now.
fn children() -> Vec<Pid> {
    let me = std::process::id();
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{me}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(list) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    out
}

/// The command name of `pid`, for the log.
fn command_name(pid: Pid) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".to_string())
}

/// Send `signal` to a worker and everything in its process group (it leads one: spawn).
pub(super) fn signal_group(pid: Pid, signal: Signal) {
    if kill(Pid::from_raw(-pid.as_raw()), signal).is_err() {
        if let Err(e) = kill(pid, signal) {
            log::debug!("kill({pid}, {}) failed: {e}", signal.as_str());
        }
    }
}

/// Whether a process group still has members.
pub(super) fn group_alive(pgid: Pid) -> bool {
    kill(Pid::from_raw(-pgid.as_raw()), None).is_ok()
}

#[derive(Default)]
pub(super) struct Orphans {
    by_pid: BTreeMap<Pid, Orphan>,
}

impl Orphans {
    pub(super) fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// An orphan was reaped. True if `pid` was one.
    pub(super) fn reaped(&mut self, pid: Pid) -> bool {
        self.by_pid.remove(&pid).is_some()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.by_pid.values().filter_map(|o| o.kill_at).min()
    }
}

impl Supervisor {
    /// Find the children that are not workers and stop them. Returns how many were new.
    pub(super) fn stop_orphans(&mut self, now: Instant) -> usize {
        let mut found = 0;
        for pid in children() {
            if self.workers.contains_key(&pid) || self.orphans.by_pid.contains_key(&pid) {
                continue;
            }
            let name = command_name(pid);
            log::warn!(
                "pid {pid} ({name}) was left behind by a worker (it reparented to sockvisor); stopping it"
            );
            signal_group(pid, Signal::SIGTERM);
            self.orphans.by_pid.insert(
                pid,
                Orphan {
                    name,
                    kill_at: Some(now + self.config.stop_timeout),
                },
            );
            found += 1;
        }
        found
    }

    /// SIGKILL the orphans that outlived the stop timeout.
    pub(super) fn kill_overdue_orphans(&mut self, now: Instant) {
        for (&pid, o) in &mut self.orphans.by_pid {
            if o.kill_at.is_some_and(|t| now >= t) {
                log::warn!(
                    "pid {pid} ({}) did not stop within the stop timeout; sending SIGKILL",
                    o.name
                );
                signal_group(pid, Signal::SIGKILL);
                o.kill_at = None;
            }
        }
    }
}
