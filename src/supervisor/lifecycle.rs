//! Workers' lives (gunicorn's arbiter verbs): fork into a slot, reap, stop a worker, restart
//! with backoff, scale; the fleet's stop and give-up.

use super::fleet::{Departure, Slot, Worker, WorkerState};
use super::{orphans, Phase, Supervisor};
use crate::config::ReadyMode;
use crate::dispatch::WorkerRef;
use crate::exit;
use crate::observe::metrics::EndReason;
use crate::poller::Token;
use crate::spawn::{self, ExecReport, WorkerSetup};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::os::fd::OwnedFd;
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
        WaitStatus::Exited(_, 127) => "exited with status 127 (command not found?)".to_string(),
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

/// Whether an exit was the expected end of a worker, or a failure of its slot.
fn exit_expected(departure: Option<Departure>, status: WaitStatus) -> bool {
    match departure {
        Some(Departure::Retired) => true,
        Some(Departure::Announced) => matches!(status, WaitStatus::Exited(_, 0)),
        Some(Departure::Failed) | None => false,
    }
}

impl Supervisor {
    /// Fill `slot` with a new worker now.
    pub(super) fn start_slot(&mut self, slot: usize, now: Instant) {
        self.slots[slot].restart_at = None;
        if self.fork_worker(slot, now, true).is_none() {
            self.schedule_restart(slot, now, Duration::ZERO, true);
        }
    }

    /// Fork a worker for `slot`. With `make_current`, it becomes the slot's worker at once;
    /// otherwise (a reload) only once it is ready. `None` when fork or its fds failed.
    pub(super) fn fork_worker(
        &mut self,
        slot: usize,
        now: Instant,
        make_current: bool,
    ) -> Option<Pid> {
        if let Err(e) = self.dispatch.stage_worker() {
            log::error!("slot {slot}: cannot prepare the worker's sockets: {e}");
            return None;
        }
        let names = self.dispatch.fd_names();
        let mut env = vec![
            ("SOCKVISOR_WORKER_ID", slot.to_string()),
            (
                "NOTIFY_SOCKET",
                self.notify.address().to_string_lossy().into_owned(),
            ),
        ];
        if let Some(w) = self.config.worker_watchdog {
            env.push(("WATCHDOG_USEC", w.as_micros().to_string()));
        }
        self.stage_message_socket(slot);
        let fds = self.dispatch.staged_fds();
        let extra_fds: Vec<_> = self.messages.staged_fd().into_iter().collect();
        if !extra_fds.is_empty() {
            // Right after the LISTEN_FDS sockets (spawn places it there).
            env.push((
                crate::messages::MESSAGES_FD_VAR,
                (3 + fds.len()).to_string(),
            ));
        }
        let setup = WorkerSetup {
            fds: &fds,
            extra_fds: &extra_fds,
            fd_names: &names,
            env: &env,
            watchdog_pid: self.config.worker_watchdog.is_some(),
        };
        let forked = spawn::spawn(&self.command, &setup);
        drop(fds);
        drop(extra_fds);
        let (pid, exec_report) = match forked {
            Ok(spawned) => (spawned.pid, spawned.exec_report),
            Err(e) => {
                log::error!("slot {slot}: fork failed: {e}");
                self.dispatch.discard_staged();
                self.messages.discard_staged();
                return None;
            }
        };
        let worker = WorkerRef {
            pid,
            slot,
            generation: self.generation,
            weight: self.config.weight,
        };
        self.dispatch.commit_worker(worker, &self.poller, now);
        self.messages.commit(worker, &self.poller);
        if self
            .checks
            .worker_forked(pid, self.config.health_check.clone(), now)
        {
            self.dispatch.set_in_rotation(pid, false);
        }
        let ready_at_exec = self.config.ready == ReadyMode::Exec;
        self.workers.insert(
            pid,
            Worker {
                pid,
                slot,
                generation: self.generation,
                weight: self.config.weight,
                state: WorkerState::Starting {
                    ready_by: now + self.config.ready_timeout,
                },
                started: now,
                ready_at: None,
                last_status: None,
                watchdog: self.config.worker_watchdog,
                watchdog_deadline: self.config.worker_watchdog.map(|w| now + w),
                failure: None,
                exec_report: None,
                exec_error: None,
            },
        );
        self.watch_exec(pid, exec_report);
        log::info!(
            "worker {slot} started (pid {pid}, generation {}){}",
            self.generation,
            if ready_at_exec {
                ""
            } else {
                ", waiting for READY=1"
            }
        );
        if make_current {
            self.slots[slot].current = Some(pid);
        }
        self.dirty = true;
        Some(pid)
    }

    /// Wait for the worker's exec report (spawn::ExecReport): `ready = "exec"` workers are
    /// ready once it says they exec'd.
    fn watch_exec(&mut self, pid: Pid, report: OwnedFd) {
        if let Err(e) = self.poller.register(&report, Token::Exec(pid)) {
            // Without it the worker would never count as exec'd: assume it did.
            log::error!("pid {pid}: cannot poll its exec report: {e}");
            self.worker_execed(pid);
            return;
        }
        if let Some(w) = self.workers.get_mut(&pid) {
            w.exec_report = Some(report);
        }
    }

    /// The exec report pipe is readable: the worker exec'd, or its exec failed.
    pub(super) fn exec_reported(&mut self, pid: Pid) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(report) = w.exec_report.as_ref() else {
            return;
        };
        let said = ExecReport::read(report);
        if said == ExecReport::Pending {
            return;
        }
        if let Some(report) = w.exec_report.take() {
            self.poller.unregister(&report);
        }
        match said {
            // Its exit (127) follows; worker_exited tells why.
            ExecReport::Failed(e) => w.exec_error = Some(e),
            _ => self.worker_execed(pid),
        }
    }

    fn worker_execed(&mut self, pid: Pid) {
        let starting = self
            .workers
            .get(&pid)
            .is_some_and(|w| matches!(w.state, WorkerState::Starting { .. }));
        if starting && self.config.ready == ReadyMode::Exec {
            self.worker_ready(pid);
        }
    }

    /// The worker may receive connections.
    pub(super) fn worker_ready(&mut self, pid: Pid) {
        if let Some(w) = self.workers.get_mut(&pid) {
            let now = Instant::now();
            w.state = WorkerState::Ready;
            w.ready_at = Some(now);
            self.observer
                .tally
                .worker_ready(now.saturating_duration_since(w.started));
            self.dispatch.worker_ready(pid);
            self.dirty = true;
        }
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
        let Some(worker) = self.workers.remove(&pid) else {
            if !self.orphans.reaped(pid) {
                log::debug!("reaped pid {pid}, not a worker");
            }
            return;
        };
        self.dirty = true;
        // A failed exec wrote its errno before the exit; say that rather than guess from 127.
        let exec_error = worker.exec_error.or_else(|| {
            let report = worker.exec_report.as_ref()?;
            self.poller.unregister(report);
            match ExecReport::read(report) {
                ExecReport::Failed(e) => Some(e),
                _ => None,
            }
        });
        let how = match exec_error {
            Some(e) => format!(
                "could not be started: exec {}: {}",
                self.command.program_name(),
                e.desc()
            ),
            _ => describe(status),
        };
        let departure = worker.departure();
        let diagnosis = match departure {
            None | Some(Departure::Failed) if !self.stopping() => self.dispatch.diagnose(pid),
            _ => None,
        };
        // What it leaves behind is stopped (orphans.rs). A clean exit that leaves its
        // server running is a program that daemonizes.
        let group_lives = orphans::group_alive(pid);
        let left_behind = self.stop_orphans(now);
        if worker.departure().is_none()
            && matches!(status, WaitStatus::Exited(_, 0))
            && (group_lives || left_behind > 0)
        {
            log::warn!(
                "worker {} (pid {pid}) exited with status 0 but left processes running: it seems to daemonize; run it in the foreground (its own option: lighttpd -D, nginx -g 'daemon off;', ...)",
                worker.slot
            );
        }
        self.forget_checks(pid);
        self.messages.worker_gone(pid, &self.poller);
        let dispatched = self.dispatch.worker_figures(pid).dispatched;
        self.observer.tally.worker_gone(worker.slot, dispatched);
        // Connections it never received go to the other workers, first in line.
        let taken_back = self.dispatch.worker_gone(pid, &self.poller);
        if taken_back > 0 {
            log::info!(
                "worker {} (pid {pid}): {taken_back} queued connections handed to other workers",
                worker.slot
            );
        }
        let slot = worker.slot;
        let uptime = now.saturating_duration_since(worker.started);
        let is_current = self.slots.get(slot).is_some_and(|s| s.current == Some(pid));
        if is_current {
            self.slots[slot].current = None;
        }
        if self.stopping() || exit_expected(departure, status) {
            log::info!("worker {slot} (pid {pid}) {}", how);
            let refill = is_current && !self.stopping() && departure != Some(Departure::Retired);
            if refill {
                self.observer.tally.restarted(slot, EndReason::Exit, &how);
                self.refill(slot, uptime, worker.started_up(now), now);
            }
            return;
        }
        if !is_current {
            // A new generation's worker before it took its slot (reload, canary): the
            // reload decides.
            log::warn!(
                "worker {slot} (pid {pid}, generation {}) {} after {:.1}s",
                worker.generation,
                how,
                uptime.as_secs_f64()
            );
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
        let delay =
            self.slots[slot]
                .history
                .failed(&self.config.backoff, uptime, worker.started_up(now));
        let reason = self.end_reason(&worker, status);
        self.observer.tally.restarted(slot, reason, &how);
        log::warn!(
            "worker {slot} (pid {pid}) {}{} after {:.1}s; restarting in {}",
            how,
            if reason == EndReason::Oom {
                " (OOM kill: its cgroup counted one)"
            } else {
                ""
            },
            uptime.as_secs_f64(),
            human(delay)
        );
        if let Some(d) = diagnosis {
            log::warn!("worker {slot} (pid {pid}): {d}");
            self.upstream.status(&format!("worker {slot} failed: {d}"));
            self.diagnosis = Some(d);
        }
        self.schedule_restart(slot, now, delay, false);
    }

    /// A worker left its slot as it said it would (`STOPPING=1`, then exit 0): a new one
    /// takes the slot, at once if it had stayed up, after a backoff otherwise (a clean exit
    /// right after start, again and again, is a crash loop too).
    fn refill(&mut self, slot: usize, uptime: Duration, started: bool, now: Instant) {
        if uptime >= self.config.backoff.reset_after {
            self.slots[slot].history.replaced();
            self.start_slot(slot, now);
            return;
        }
        let delay = self.slots[slot]
            .history
            .failed(&self.config.backoff, uptime, started);
        log::info!(
            "worker {slot} stayed up only {:.1}s; restarting in {}",
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
        let delay = if count_failure {
            let d = self.slots[slot]
                .history
                .failed(&self.config.backoff, Duration::ZERO, false);
            d.max(delay)
        } else {
            delay
        };
        self.slots[slot].restart_at = Some(now + delay);
    }

    /// Ask a worker to stop with `signal`, for `departure`; SIGKILL follows after the stop
    /// timeout. It receives no new connection from now on, and what was queued to it and
    /// not received goes to the other workers.
    pub(super) fn stop_worker(
        &mut self,
        pid: Pid,
        signal: Signal,
        departure: Departure,
        reason: &str,
        now: Instant,
    ) {
        let stop_timeout = self.config.stop_timeout;
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let told_before = matches!(w.departure(), Some(Departure::Failed | Departure::Retired));
        let departure = w.departure().map_or(departure, |d| d.max(departure));
        let kill_at = match w.state {
            WorkerState::Stopping { kill_at, .. } if told_before => kill_at,
            _ => {
                log::info!(
                    "worker {} (pid {pid}): {reason}; sending {}",
                    w.slot,
                    signal.as_str()
                );
                Some(now + stop_timeout)
            }
        };
        w.state = WorkerState::Stopping { departure, kill_at };
        w.watchdog_deadline = None;
        self.dispatch.worker_leaving(pid);
        orphans::signal_group(pid, signal);
        self.dirty = true;
    }

    /// Stop a worker for a health `cause`: its exit is a failure of its slot, restarted for
    /// that reason (the metrics' `reason`).
    pub(super) fn stop_failed(
        &mut self,
        pid: Pid,
        signal: Signal,
        cause: EndReason,
        reason: &str,
        now: Instant,
    ) {
        if let Some(w) = self.workers.get_mut(&pid) {
            w.failure.get_or_insert(cause);
        }
        self.stop_worker(pid, signal, Departure::Failed, reason, now);
    }

    /// Drain a worker for good: its slot is not refilled when it exits.
    pub(super) fn retire(&mut self, pid: Pid, reason: &str, now: Instant) {
        self.stop_worker(pid, Signal::SIGTERM, Departure::Retired, reason, now);
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

    /// Replace the workers the dispatch owners found unable to take connections (a broken
    /// channel; with `wedge_check`, also wedged ones).
    pub(super) fn replace_troubled(&mut self, wedge_check: Option<Instant>, now: Instant) {
        for t in self.dispatch.troubles(wedge_check) {
            let (signal, cause) = if t.hung {
                (Signal::SIGABRT, EndReason::Wedged)
            } else {
                (Signal::SIGTERM, EndReason::Channel)
            };
            self.stop_failed(t.pid, signal, cause, &t.reason, now);
        }
    }

    /// Change the number of slots. Removed slots' workers are drained.
    pub(super) fn scale(&mut self, workers: usize, now: Instant) -> Result<String, String> {
        if self.stopping() {
            return Err("sockvisor is stopping".to_string());
        }
        self.refuse_while_draining()?;
        if self.reload.is_some() {
            return Err("a reload is in progress; scale after it".to_string());
        }
        if workers == 0 {
            return Err("cannot scale to 0 workers (stop the service instead)".to_string());
        }
        crate::config::check_worker_count(workers, self.dispatch.per_worker_listeners())
            .map_err(|e| e.to_string())?;
        // Fewer workers than the fleet needs to count as healthy or ready would make the
        // upstream watchdog fire (or `/readyz` fail) on purpose.
        for (key, floor) in [
            ("min_healthy", self.config.min_healthy),
            ("min_ready", self.config.min_ready.unwrap_or(0)),
        ] {
            if workers < floor {
                return Err(format!(
                    "cannot scale to {workers} workers: {key} is {floor}; lower {key} in the configuration and reload first, or scale to at least {floor}"
                ));
            }
        }
        let before = self.slots.len();
        if workers > before {
            log::info!("scaling up from {before} to {workers} workers");
            self.slots.resize_with(workers, Slot::default);
            for slot in before..workers {
                self.start_slot(slot, now);
            }
        } else if workers < before {
            log::info!("scaling down from {before} to {workers} workers");
            self.drop_slots_from(workers, "scaled down", now);
        }
        self.config.workers = workers;
        self.dirty = true;
        Ok(format!("scaled from {before} to {workers} workers"))
    }

    /// SIGKILL what outlived its stop timeout; stop what missed its ready deadline or its
    /// watchdog.
    pub(super) fn enforce_deadlines(&mut self, now: Instant) {
        let due = |t: Option<Instant>| t.is_some_and(|t| now >= t);
        let mut overdue = Vec::new();
        for w in self.workers.values_mut() {
            match w.state {
                WorkerState::Stopping { departure, kill_at } if due(kill_at) => {
                    log::warn!(
                        "pid {} did not stop within the stop timeout; sending SIGKILL",
                        w.pid
                    );
                    orphans::signal_group(w.pid, Signal::SIGKILL);
                    w.state = WorkerState::Stopping {
                        departure,
                        kill_at: None,
                    };
                }
                WorkerState::Starting { ready_by } if now >= ready_by => {
                    overdue.push((
                        w.pid,
                        Signal::SIGTERM,
                        EndReason::ReadyTimeout,
                        "not ready within the ready timeout",
                    ));
                }
                _ if due(w.watchdog_deadline) => {
                    overdue.push((
                        w.pid,
                        Signal::SIGABRT,
                        EndReason::Watchdog,
                        "watchdog timeout",
                    ));
                }
                _ => {}
            }
        }
        for (pid, signal, cause, reason) in overdue {
            self.stop_failed(pid, signal, cause, reason, now);
        }
        self.kill_overdue_orphans(now);
    }

    pub(super) fn restart_due(&mut self, now: Instant) {
        if self.stopping() {
            return;
        }
        for slot in 0..self.slots.len() {
            let s = &self.slots[slot];
            if s.current.is_none() && !s.disabled && s.restart_at.is_some_and(|t| now >= t) {
                self.start_slot(slot, now);
            }
        }
    }

    /// Give up when no slot can run: every slot failed `give_up_after` times in a row or
    /// exited with a fatal code.
    pub(super) fn check_fleet(&mut self) {
        if self.stopping() || self.slots.is_empty() {
            return;
        }
        let backoff = &self.config.backoff;
        if self.slots.iter().all(|s| s.history.boot_failures == 0) {
            self.diagnosis = None;
        }
        let all_failing = self
            .slots
            .iter()
            .all(|s| s.disabled || (s.current.is_none() && s.history.exhausted(backoff)));
        if !all_failing {
            return;
        }
        let reason = if self.slots.iter().all(|s| s.disabled) {
            "every worker exited with a fatal status".to_string()
        } else {
            format!(
                "every worker slot failed {} times in a row, each time before it was ready or within {}s of its start",
                self.config.backoff.give_up_after,
                super::backoff::MIN_UPTIME.as_secs()
            )
        };
        let reason = match &self.diagnosis {
            Some(d) => format!("{reason}; {d}"),
            None => reason,
        };
        log::error!(
            "giving up: {reason}; exiting with status {}",
            exit::FLEET_FAILED
        );
        self.upstream
            .failed(libc::ECHILD, &format!("failed: {reason}"));
        self.stop(exit::FLEET_FAILED, &reason);
    }

    /// Stop for good: `STOPPING=1`, stop accepting, hand over what was accepted, SIGTERM
    /// every worker (SIGKILL after the stop timeout); `run` returns once all are reaped.
    pub(super) fn stop(&mut self, exit_code: i32, reason: &str) {
        if self.stopping() {
            return;
        }
        log::info!("stopping: {reason}");
        self.phase = Phase::Stopping { exit_code };
        self.stop_reason = Some(reason.to_string());
        self.drain_until = None;
        self.upstream.stopping(&format!("stopping: {reason}"));
        self.dispatch.stop(&self.poller);
        let now = Instant::now();
        let pids: Vec<Pid> = self.workers.keys().copied().collect();
        for pid in pids {
            self.stop_worker(pid, Signal::SIGTERM, Departure::Retired, "stopping", now);
        }
        for s in &mut self.slots {
            s.restart_at = None;
        }
        self.stop_orphans(now);
        self.dirty = true;
    }

    /// Last words before `run` returns.
    pub(super) fn finish(&mut self) {
        log::info!("stopped: {}", self.final_report());
    }
}
