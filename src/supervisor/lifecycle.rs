//! Workers' lives: spawn, reap, murder, restart with backoff; the fleet's stop and give-up.

use super::fleet::{Worker, WorkerChannel, WorkerState};
use super::{channel_token, Phase, Supervisor};
use crate::config::ReadyMode;
use crate::dispatch::Channel;
use crate::exit;
use crate::spawn::{self, WorkerSetup};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

/// `50ms`, `1.6s`.
fn human(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// How an exit reads in the log.
fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, 0) => "exited with status 0".to_string(),
        WaitStatus::Exited(_, 127) => {
            "exited with status 127 (exec failed: command not found?)".to_string()
        }
        WaitStatus::Exited(_, 126) => {
            "exited with status 126 (could not set up its fds or exec)".to_string()
        }
        WaitStatus::Exited(_, 125) => {
            "exited with status 125 (could not drop privileges)".to_string()
        }
        WaitStatus::Exited(_, c) => format!("exited with status {c}"),
        WaitStatus::Signaled(_, s, core) => {
            format!(
                "killed by {}{}",
                s.as_str(),
                if core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}

impl Supervisor {
    /// Fork a worker into `slot` as its current worker.
    pub(super) fn spawn(&mut self, slot: usize, now: Instant) {
        self.slots[slot].restart_at = None;
        if self.spawn_worker(slot, now, true).is_none() {
            self.schedule_restart(slot, now, Duration::ZERO, true);
        }
    }

    /// Fork a worker for `slot`. With `make_current`, it becomes the slot's worker at once;
    /// otherwise (a reload) only once it is ready. `None` when fork or a channel failed.
    pub(super) fn spawn_worker(
        &mut self,
        slot: usize,
        now: Instant,
        make_current: bool,
    ) -> Option<Pid> {
        let mut channels = Vec::with_capacity(self.listeners.len());
        for l in &self.listeners {
            if !l.dispatched() {
                channels.push(None);
                continue;
            }
            match Channel::new() {
                Ok(c) => channels.push(Some(WorkerChannel::new(c, now))),
                Err(e) => {
                    log::error!("slot {slot}: cannot create a channel: {e}");
                    return None;
                }
            }
        }
        let fds: Vec<BorrowedFd<'_>> = self
            .listeners
            .iter()
            .zip(&channels)
            .map(|(l, c)| match c {
                Some(c) => c.channel.worker_end(),
                None => l.listener.fd.as_fd(),
            })
            .collect();
        let names = self
            .listeners
            .iter()
            .map(|l| l.listener.name.as_str())
            .collect::<Vec<_>>()
            .join(":");
        let mut env = vec![
            ("SOCKVISOR_WORKER_ID", slot.to_string()),
            ("NOTIFY_SOCKET", self.notify.path().display().to_string()),
        ];
        if let Some(w) = self.config.worker_watchdog {
            env.push(("WATCHDOG_USEC", w.as_micros().to_string()));
        }
        let setup = WorkerSetup {
            fds: &fds,
            fd_names: &names,
            env: &env,
            watchdog_pid: self.config.worker_watchdog.is_some(),
        };
        let pid = match spawn::spawn(&self.command, &setup) {
            Ok(pid) => pid,
            Err(e) => {
                log::error!("slot {slot}: fork failed: {e}");
                return None;
            }
        };
        drop(fds);
        let ready = self.config.ready == ReadyMode::Exec;
        let worker = Worker {
            pid,
            slot,
            generation: self.generation,
            state: if ready {
                WorkerState::Ready
            } else {
                WorkerState::Starting
            },
            started: now,
            channels,
            said_stopping: false,
            retired: false,
            unhealthy: false,
            last_status: None,
            ready_deadline: (!ready).then(|| now + self.config.ready_timeout),
            watchdog: self.config.worker_watchdog,
            watchdog_deadline: self.config.worker_watchdog.map(|w| now + w),
            kill_at: None,
        };
        for (i, c) in worker.channels.iter().enumerate() {
            if let Some(c) = c {
                if self.listeners[i].policy.kind()
                    == crate::config::DispatchPolicy::LeastConnections
                {
                    self.register(c.channel.sockvisor_end(), channel_token(pid, i));
                }
            }
        }
        log::info!(
            "worker {slot} started (pid {pid}, generation {}){}",
            self.generation,
            if ready { "" } else { ", waiting for READY=1" }
        );
        if make_current {
            self.slots[slot].current = Some(pid);
        }
        self.workers.insert(pid.as_raw(), worker);
        self.fleet_changed();
        Some(pid)
    }

    /// Collect every exited child.
    pub(super) fn reap(&mut self, now: Instant) {
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
                Ok(status @ (WaitStatus::Exited(pid, _) | WaitStatus::Signaled(pid, _, _))) => {
                    self.worker_exited(pid, status, now)
                }
                Ok(_) => continue,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn worker_exited(&mut self, pid: Pid, status: WaitStatus, now: Instant) {
        let Some(worker) = self.workers.remove(&pid.as_raw()) else {
            log::debug!("reaped pid {pid}, not a worker");
            return;
        };
        self.fleet_changed();
        // Connections it never received go back to the pending queue, first in line.
        let mut recovered = 0;
        for (i, c) in worker.channels.iter().enumerate() {
            let Some(c) = c else { continue };
            self.unregister(c.channel.sockvisor_end());
            let mut conns = c.channel.reclaim();
            recovered += conns.len();
            while let Some(conn) = conns.pop() {
                self.listeners[i].pending_connections.push_front(conn);
            }
        }
        if recovered > 0 {
            log::info!(
                "worker {} (pid {pid}): {recovered} queued connections handed to other workers",
                worker.slot
            );
            self.dirty = true;
        }
        let slot = worker.slot;
        let uptime = now.saturating_duration_since(worker.started);
        let is_current = self.slots.get(slot).is_some_and(|s| s.current == Some(pid));
        if is_current {
            self.slots[slot].current = None;
        }
        // A worker stopped for a health reason (ready timeout, watchdog) failed, even when it
        // then said STOPPING=1 and exited 0 as a well-behaved SIGTERM handler does: otherwise
        // a worker that never gets ready is replaced at once, forever, without backoff.
        let expected = matches!(self.phase, Phase::Stopping { .. })
            || worker.retired
            || (!worker.unhealthy
                && (worker.state == WorkerState::Draining
                    || (worker.said_stopping && matches!(status, WaitStatus::Exited(_, 0)))));
        if expected {
            log::info!("worker {slot} (pid {pid}) {}", describe(status));
            if is_current && !matches!(self.phase, Phase::Stopping { .. }) && !worker.retired {
                if uptime >= self.config.backoff.reset_after {
                    self.slots[slot].history.replaced();
                    self.spawn(slot, now);
                } else {
                    // A clean exit right after start, again and again, is a crash loop too.
                    let delay = self.slots[slot]
                        .history
                        .failed(&self.config.backoff, uptime);
                    log::info!(
                        "worker {slot} stayed up only {:.1}s; restarting in {}",
                        uptime.as_secs_f64(),
                        human(delay)
                    );
                    self.schedule_restart(slot, now, delay, false);
                }
            }
            return;
        }
        if !is_current {
            return;
        }
        if let WaitStatus::Exited(_, code) = status {
            if self.config.fatal_exit_codes.contains(&code) {
                log::error!(
                    "worker {slot} (pid {pid}) exited with status {code}, declared fatal: slot {slot} is not restarted"
                );
                self.slots[slot].disabled = true;
                return;
            }
        }
        let delay = self.slots[slot]
            .history
            .failed(&self.config.backoff, uptime);
        log::warn!(
            "worker {slot} (pid {pid}) {} after {:.1}s; restarting in {}",
            describe(status),
            uptime.as_secs_f64(),
            human(delay)
        );
        self.schedule_restart(slot, now, delay, false);
    }

    fn schedule_restart(
        &mut self,
        slot: usize,
        now: Instant,
        delay: Duration,
        count_failure: bool,
    ) {
        if count_failure {
            let d = self.slots[slot]
                .history
                .failed(&self.config.backoff, Duration::ZERO);
            self.slots[slot].restart_at = Some(now + d.max(delay));
        } else {
            self.slots[slot].restart_at = Some(now + delay);
        }
    }

    /// Drain a worker for good: its slot is not restarted when it exits.
    pub(super) fn retire(&mut self, pid: Pid, reason: &str, now: Instant) {
        if let Some(w) = self.workers.get_mut(&pid.as_raw()) {
            w.retired = true;
        }
        self.murder(pid, Signal::SIGTERM, reason, false, now);
    }

    /// Remove the slots from `first` on, retiring their workers.
    pub(super) fn drop_slots_from(&mut self, first: usize, reason: &str, now: Instant) {
        if first >= self.slots.len() {
            return;
        }
        let removed: Vec<Pid> = self
            .slots
            .drain(first..)
            .filter_map(|s| s.current)
            .collect();
        for pid in removed {
            self.retire(pid, reason, now);
        }
    }

    /// Ask a worker to stop with `signal`; SIGKILL follows after the stop timeout.
    pub(super) fn murder(
        &mut self,
        pid: Pid,
        signal: Signal,
        reason: &str,
        unhealthy: bool,
        now: Instant,
    ) {
        let stop_timeout = self.config.stop_timeout;
        let Some(w) = self.workers.get_mut(&pid.as_raw()) else {
            return;
        };
        let mut reclaimed = Vec::new();
        if w.state != WorkerState::Draining {
            log::info!(
                "worker {} (pid {pid}): {reason}; sending {}",
                w.slot,
                signal.as_str()
            );
            w.state = WorkerState::Draining;
            w.kill_at = Some(now + stop_timeout);
            // What waits in its channel goes to the other workers now, not after it exits
            // (a hung worker would hold it until SIGKILL). Each message is received once, by
            // the worker or by us. Not at stop: then nobody else could take them, and a
            // worker drains its own channel on SIGTERM.
            if !matches!(self.phase, Phase::Stopping { .. }) {
                for (i, c) in w.channels.iter().enumerate() {
                    if let Some(c) = c {
                        reclaimed.push((i, c.channel.reclaim()));
                    }
                }
            }
        }
        for (i, conns) in reclaimed {
            for conn in conns.into_iter().rev() {
                self.listeners[i].pending_connections.push_front(conn);
            }
        }
        let Some(w) = self.workers.get_mut(&pid.as_raw()) else {
            return;
        };
        w.unhealthy |= unhealthy;
        w.ready_deadline = None;
        w.watchdog_deadline = None;
        if let Err(e) = kill(pid, signal) {
            log::debug!("kill({pid}, {}) failed: {e}", signal.as_str());
        }
        self.fleet_changed();
    }

    /// Act on everything due: signals, exits, deadlines, restarts, health, status.
    pub(super) fn manage(&mut self, now: Instant) {
        if !self.dirty && self.armed.is_some_and(|a| now < a) {
            return;
        }
        self.dirty = false;
        while let Some(sig) = self.queued_signals.pop_front() {
            self.handle_signal(sig, now);
        }
        // Read what workers said before reaping them: a worker's last words (STOPPING=1)
        // must not arrive after it is forgotten.
        self.read_notifications();
        self.reap(now);
        self.enforce_deadlines(now);
        self.restart_due(now);
        self.advance_reload(now);
        self.check_wedged(now);
        self.flush_all_pending();
        self.resume_paused_listeners(now);
        self.check_fleet(now);
        self.tick_health(now);
        self.refresh_status(now);
    }

    fn handle_signal(&mut self, sig: Signal, now: Instant) {
        match sig {
            Signal::SIGTERM | Signal::SIGINT => {
                self.stop(exit::OK, &format!("received {}", sig.as_str()))
            }
            Signal::SIGCHLD => {} // reaped right after
            Signal::SIGTTIN | Signal::SIGTTOU => {
                let n = if sig == Signal::SIGTTIN {
                    self.slots.len() + 1
                } else {
                    self.slots.len().saturating_sub(1)
                };
                if let Err(e) = self.scale(n, now) {
                    log::warn!("{} ignored: {e}", sig.as_str());
                }
            }
            Signal::SIGHUP => {
                if let Err(e) = self.reload(now, None) {
                    log::warn!("reload (SIGHUP) refused: {e}");
                }
            }
            _ => {}
        }
    }

    /// Change the number of slots. Removed slots' workers are drained.
    pub(super) fn scale(&mut self, workers: usize, now: Instant) -> Result<String, String> {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return Err("sockvisor is stopping".to_string());
        }
        if self.reload.is_some() {
            return Err("a reload is in progress; scale after it".to_string());
        }
        if workers == 0 {
            return Err("cannot scale to 0 workers (stop the service instead)".to_string());
        }
        let before = self.slots.len();
        if workers > before {
            log::info!("scaling up from {before} to {workers} workers");
            self.slots.resize_with(workers, Default::default);
            for slot in before..workers {
                self.spawn(slot, now);
            }
        } else if workers < before {
            log::info!("scaling down from {before} to {workers} workers");
            self.drop_slots_from(workers, "scaled down", now);
        }
        self.config.workers = workers;
        self.fleet_changed();
        Ok(format!("scaled from {before} to {workers} workers"))
    }

    fn enforce_deadlines(&mut self, now: Instant) {
        let mut actions = Vec::new();
        for w in self.workers.values() {
            if w.kill_at.is_some_and(|t| now >= t) {
                actions.push((
                    w.pid,
                    Signal::SIGKILL,
                    "did not stop within the stop timeout",
                    false,
                ));
            } else if w.ready_deadline.is_some_and(|t| now >= t) {
                actions.push((
                    w.pid,
                    Signal::SIGTERM,
                    "not ready within the ready timeout",
                    true,
                ));
            } else if w.watchdog_deadline.is_some_and(|t| now >= t) {
                actions.push((w.pid, Signal::SIGABRT, "watchdog timeout", true));
            }
        }
        for (pid, sig, reason, unhealthy) in actions {
            if sig == Signal::SIGKILL {
                log::warn!("pid {pid} {reason}; sending SIGKILL");
                let _ = kill(pid, Signal::SIGKILL);
                if let Some(w) = self.workers.get_mut(&pid.as_raw()) {
                    w.kill_at = None;
                }
            } else {
                self.murder(pid, sig, reason, unhealthy, now);
            }
        }
    }

    fn restart_due(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.current.is_none() && !s.disabled && s.restart_at.is_some_and(|t| now >= t) {
                self.spawn(slot, now);
            }
        }
    }

    /// Give up when no slot can run: every slot failed `give_up_after` times in a row or
    /// exited with a fatal code.
    fn check_fleet(&mut self, _now: Instant) {
        if matches!(self.phase, Phase::Stopping { .. }) || self.slots.is_empty() {
            return;
        }
        let backoff = &self.config.backoff;
        let all_failing = self
            .slots
            .iter()
            .all(|s| s.disabled || (s.current.is_none() && s.history.exhausted(backoff)));
        if all_failing {
            let reason = if self.slots.iter().all(|s| s.disabled) {
                "every worker exited with a fatal status".to_string()
            } else {
                format!(
                    "every worker slot failed {} times in a row",
                    self.config.backoff.give_up_after
                )
            };
            log::error!(
                "giving up: {reason}; exiting with status {}",
                exit::FLEET_FAILED
            );
            self.upstream
                .failed(libc::ECHILD, &format!("failed: {reason}"));
            self.stop(exit::FLEET_FAILED, &reason);
        }
    }

    /// Stop for good: `STOPPING=1`, stop accepting, hand over what was accepted, SIGTERM
    /// every worker (SIGKILL after the stop timeout); `run` returns once all are reaped.
    pub(super) fn stop(&mut self, exit_code: i32, reason: &str) {
        if let super::Phase::Stopping { .. } = self.phase {
            return;
        }
        log::info!("stopping: {reason}");
        self.phase = Phase::Stopping { exit_code };
        self.upstream.stopping(&format!("stopping: {reason}"));
        for i in 0..self.listeners.len() {
            self.pause_listener(i);
            self.listeners[i].resume_at = None;
        }
        self.flush_all_pending();
        let now = Instant::now();
        let pids: Vec<Pid> = self.workers.values().map(|w| w.pid).collect();
        for pid in pids {
            self.murder(pid, Signal::SIGTERM, "stopping", false, now);
        }
        for s in &mut self.slots {
            s.restart_at = None;
        }
        self.dirty = true;
    }

    /// Last words before `run` returns.
    pub(super) fn finish(&mut self) {
        let lost: usize = self
            .listeners
            .iter()
            .map(|l| l.pending_connections.len())
            .sum();
        if lost > 0 {
            log::warn!("{lost} accepted connections had no worker left to serve them at stop");
        }
        log::info!("stopped: {}", self.final_report());
    }

    /// The earliest moment something is due.
    pub(super) fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let workers = self
            .workers
            .values()
            .flat_map(|w| [w.kill_at, w.ready_deadline, w.watchdog_deadline]);
        let slots = self.slots.iter().map(|s| s.restart_at);
        // An EMFILE pause only matters for a listener that will be resumed.
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let listeners = self.listeners.iter().map(|l| {
            l.resume_at
                .filter(|_| !l.polling && l.pending_connections.is_empty() && !stopping)
        });
        let reload = self.reload.as_ref().map(|r| r.deadline());
        let retry = self
            .listeners
            .iter()
            .any(|l| !l.pending_connections.is_empty())
            .then(|| now + super::dispatching::PENDING_RETRY);
        workers
            .chain(slots)
            .chain(listeners)
            .chain([
                retry,
                self.health.next_deadline(),
                self.status.next_deadline(),
                self.next_wedge_check(),
                reload,
            ])
            .flatten()
            .min()
    }
}
