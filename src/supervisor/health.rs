//! Health: sockvisor is its workers' systemd. Their notifications drive readiness and the
//! worker watchdog; the fleet's health drives `READY=1` and `WATCHDOG=1` upstream.

use super::fleet::{Departure, WorkerState};
use super::{Phase, Supervisor};
use crate::config::{NotifyAccess, ReadyMode};
use crate::logging::Throttle;
use crate::notify_server::Notification;
use crate::observe::metrics::{EndReason, WatchdogSnapshot};
use crate::upstream::Upstream;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// How far up the process tree a sender is traced to its worker (`notify_access = "all"`).
const MAX_ANCESTRY: usize = 64;

/// The parent of `pid` (`/proc/PID/stat`, field 4), also for a zombie.
fn parent_of(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain anything: split after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let ppid: i32 = rest.split(' ').nth(1)?.parse().ok()?;
    Some(Pid::from_raw(ppid))
}

/// Messages from processes that are not live workers are logged at most this often.
const DROPPED_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub(super) struct HealthState {
    /// When to send the next `WATCHDOG=1` (systemd asked for a watchdog).
    next_ping: Option<Instant>,
    ping_interval: Option<Duration>,
    /// Since when fewer than `min_healthy` workers are healthy.
    unhealthy_since: Option<Instant>,
    /// `WATCHDOG=trigger` was sent for the current unhealthy period.
    triggered: bool,
    /// Notifications dropped because the sender was not a live worker.
    dropped: Throttle,
}

impl Default for HealthState {
    fn default() -> HealthState {
        HealthState {
            next_ping: None,
            ping_interval: None,
            unhealthy_since: None,
            triggered: false,
            dropped: Throttle::new(DROPPED_LOG_INTERVAL),
        }
    }
}

impl HealthState {
    pub(super) fn start(&mut self, upstream: &Upstream, now: Instant) {
        self.ping_interval = upstream.watchdog_interval();
        self.next_ping = self.ping_interval.map(|_| now);
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.next_ping
    }

    /// The upstream watchdog, for the metrics.
    pub(super) fn watchdog_snapshot(&self) -> WatchdogSnapshot {
        WatchdogSnapshot {
            interval: self.ping_interval,
            withheld: self.unhealthy_since.is_some(),
            triggered: self.triggered,
        }
    }
}

impl Supervisor {
    /// Drain the workers' notify socket.
    pub(super) fn read_notifications(&mut self) {
        let now = Instant::now();
        loop {
            let received = match self.notify.recv() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("reading the workers' notify socket failed: {e}");
                    break;
                }
            };
            let live = received.pid.map(Pid::from_raw).and_then(|pid| {
                if self.workers.contains_key(&pid) {
                    Some(pid)
                } else if self.config.notify_access == NotifyAccess::All {
                    self.worker_ancestor(pid)
                } else {
                    None
                }
            });
            match live {
                Some(pid) => self.apply_notification(pid, received.notification, now),
                None => self.drop_notification(received.pid, now),
            }
        }
    }

    /// The worker `pid` descends from (`notify_access = "all"`), by the kernel's view of the
    /// process tree: the parent chain in /proc. A sender that already exited and was reaped
    /// has no chain left and is not attributed (systemd has the same limit).
    fn worker_ancestor(&self, pid: Pid) -> Option<Pid> {
        let me = Pid::this();
        let mut p = pid;
        for _ in 0..MAX_ANCESTRY {
            p = parent_of(p)?;
            if self.workers.contains_key(&p) {
                return Some(p);
            }
            if p == me || p.as_raw() <= 1 {
                return None;
            }
        }
        None
    }

    fn drop_notification(&mut self, pid: Option<i32>, now: Instant) {
        if self.health.dropped.hit(now) {
            log::warn!(
                "ignored a notification from {} (not a live worker; {} ignored so far)",
                pid.map_or("an unknown sender".to_string(), |p| format!("pid {p}")),
                self.health.dropped.count
            );
        }
    }

    fn apply_notification(&mut self, pid: Pid, n: Notification, now: Instant) {
        let stop_timeout = self.config.stop_timeout;
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if let Some(status) = n.status {
            w.last_status = Some(status);
            self.status.changed = true;
        }
        // A stopping worker has no watchdog: neither WATCHDOG=1 nor WATCHDOG_USEC= re-arms it.
        if !w.stopping() {
            if let Some(usec) = n.watchdog_usec {
                w.watchdog = (usec > 0).then(|| Duration::from_micros(usec));
                w.watchdog_deadline = w.watchdog.map(|d| now + d);
            }
            if n.watchdog {
                w.watchdog_deadline = w.watchdog.map(|d| now + d);
            }
        }
        if n.ready && matches!(w.state, WorkerState::Starting { .. }) {
            log::info!(
                "worker {} ready (pid {pid}, {:.0} ms after start)",
                w.slot,
                now.saturating_duration_since(w.started).as_secs_f64() * 1000.0
            );
            self.worker_ready(pid);
        }
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        if n.stopping && !w.stopping() {
            // Never forwarded upstream: a worker stopping is not the service stopping.
            // As systemd does: as if it had been sent SIGTERM. Its watchdog stops, and the
            // stop timeout runs (SIGKILL then): a worker that says it stops but lingers
            // would hold its slot forever.
            w.state = WorkerState::Stopping {
                departure: Departure::Announced,
                kill_at: Some(now + stop_timeout),
            };
            w.watchdog_deadline = None;
            log::info!(
                "worker {} (pid {pid}) is stopping (STOPPING=1); no more connections for it",
                w.slot
            );
            self.dispatch.worker_leaving(pid);
            self.dirty = true;
        }
        // After STOPPING=1 (systemd's order), so one datagram with both extends the stop.
        if let Some(usec) = n.extend_timeout_usec {
            if let Some(w) = self.workers.get_mut(&pid) {
                let until = now + Duration::from_micros(usec);
                match &mut w.state {
                    WorkerState::Starting { ready_by } => *ready_by = (*ready_by).max(until),
                    WorkerState::Stopping {
                        kill_at: Some(kill_at),
                        ..
                    } => *kill_at = (*kill_at).max(until),
                    _ => {}
                }
            }
        }
        if n.watchdog_trigger {
            self.stop_failed(
                pid,
                Signal::SIGABRT,
                EndReason::Watchdog,
                "asked for it (WATCHDOG=trigger)",
                now,
            );
        }
        if let Some(errno) = n.errno {
            log::info!("worker (pid {pid}) reported ERRNO={errno}");
        }
    }

    pub(super) fn healthy_workers(&self, now: Instant) -> usize {
        self.workers.values().filter(|w| w.healthy(now)).count()
    }

    pub(super) fn ready_count(&self) -> usize {
        self.workers.values().filter(|w| w.ready()).count()
    }

    /// `READY=1` once the initial fleet is ready; the upstream watchdog.
    pub(super) fn tick_health(&mut self, now: Instant) {
        if self.phase == Phase::Starting {
            let needed = self
                .config
                .min_ready
                .unwrap_or(self.slots.len())
                .min(self.slots.len());
            if self.ready_count() >= needed {
                self.phase = Phase::Running;
                let summary = self.summary();
                log::info!("fleet ready: {summary}");
                self.upstream.ready(&summary);
                self.status.sent(summary, now);
            } else if self.config.ready == ReadyMode::Notify && !self.status.start_extended {
                self.status.start_extended = true;
                self.upstream
                    .extend_timeout(self.config.ready_timeout + Duration::from_secs(5));
            }
        }
        let Some(interval) = self.health.ping_interval else {
            return;
        };
        if self.health.next_ping.is_some_and(|t| now < t) {
            return;
        }
        self.health.next_ping = Some(now + interval);
        if self.stopping() {
            return;
        }
        let healthy = self.healthy_workers(now);
        if self.phase == Phase::Starting || healthy >= self.config.min_healthy {
            if self.health.unhealthy_since.take().is_some() {
                log::info!(
                    "fleet healthy again ({healthy} healthy workers); watchdog pings resume"
                );
            }
            self.health.triggered = false;
            self.upstream.watchdog();
            return;
        }
        let since = *self.health.unhealthy_since.get_or_insert_with(|| {
            log::warn!(
                "fleet unhealthy: {healthy} healthy workers, {} needed; withholding watchdog pings",
                self.config.min_healthy
            );
            now
        });
        if !self.health.triggered
            && now.saturating_duration_since(since) >= self.config.unhealthy_grace
        {
            self.health.triggered = true;
            log::error!(
                "fleet unhealthy for {:?}: asking systemd to restart the service (WATCHDOG=trigger)",
                self.config.unhealthy_grace
            );
            self.upstream.watchdog_trigger(&format!(
                "unhealthy: {healthy} healthy workers, {} needed",
                self.config.min_healthy
            ));
        }
    }
}
