//! Summaries of the fleet: the `STATUS=` line, the log at stop, the control socket's view.

use super::fleet::Worker;
use super::{Phase, Supervisor};
use crate::control::{
    CheckStatus, FleetStatus, ListenerStatus, MessageTotals, WorkerMessages, WorkerStatus,
};
use std::time::{Duration, Instant};

/// `STATUS=` is refreshed at most this often when only counters changed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(super) struct StatusState {
    last_sent: Option<String>,
    sent_at: Option<Instant>,
    /// A worker's `STATUS=` changed.
    pub changed: bool,
    pub start_extended: bool,
}

impl StatusState {
    pub(super) fn sent(&mut self, summary: String, now: Instant) {
        self.last_sent = Some(summary);
        self.sent_at = Some(now);
        self.changed = false;
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.sent_at.map(|t| t + STATUS_INTERVAL)
    }
}

impl Supervisor {
    fn restarts(&self) -> u64 {
        self.slots.iter().map(|s| s.history.restarts).sum()
    }

    /// One line: `3/3 workers ready, 0 restarts, 1234 connections dispatched, 0 pending`.
    pub(super) fn summary(&self) -> String {
        let mut s = format!(
            "{}/{} workers ready, {} restarts",
            self.ready_count(),
            self.slots.len(),
            self.restarts()
        );
        if self.dispatch.accepts() {
            let (mut accepted, mut pending) = (0, 0);
            for (_, f) in self.dispatch.figures() {
                accepted += f.accepted.unwrap_or(0);
                pending += f.pending;
            }
            let queued: u64 = self
                .workers
                .keys()
                .map(|&pid| self.dispatch.worker_figures(pid).queued)
                .sum();
            s.push_str(&format!(
                ", {accepted} connections accepted, {queued} queued, {pending} pending"
            ));
        }
        if self.stopping() {
            s.insert_str(0, "stopping: ");
        } else if self.drain_until.is_some() {
            s.insert_str(0, "draining: ");
        }
        // Stopping: why (a give-up's reason already carries the diagnosis); else the
        // diagnosis of the last failed worker, if any.
        let why = match (self.stopping(), &self.stop_reason) {
            (true, Some(reason)) => Some(reason),
            _ => self.diagnosis.as_ref(),
        };
        if let Some(why) = why {
            s.push_str("; ");
            s.push_str(why);
        }
        s
    }

    /// Send `STATUS=` when the summary changed, at most once per `STATUS_INTERVAL` unless
    /// the fleet itself changed (ready count, restarts).
    pub(super) fn refresh_status(&mut self, now: Instant) {
        if self.phase == Phase::Starting {
            // READY=1 carries the first summary; no refresh deadline until then.
            self.status.sent_at = None;
            return;
        }
        let summary = self.summary();
        if self.status.last_sent.as_deref() == Some(summary.as_str()) {
            self.status.sent_at = None;
            return;
        }
        let head = |s: &str| s.split(", ").take(2).collect::<Vec<_>>().join(", ");
        let fleet_changed = self.status.last_sent.as_deref().map(head) != Some(head(&summary));
        if !fleet_changed
            && self
                .status
                .sent_at
                .is_some_and(|t| now < t + STATUS_INTERVAL)
        {
            return;
        }
        if fleet_changed {
            log::info!("{summary}");
        }
        self.upstream.status(&summary);
        self.status.sent(summary, now);
    }

    /// Per-worker figures for the log at stop.
    pub(super) fn final_report(&self) -> String {
        let accepted: u64 = self
            .dispatch
            .figures()
            .filter_map(|(_, f)| f.accepted.or(f.steered))
            .sum();
        format!(
            "{accepted} connections accepted, {} restarts",
            self.restarts()
        )
    }

    /// Everything `sockvisor status` shows.
    pub(super) fn fleet_status(&self, now: Instant) -> FleetStatus {
        let mut workers: Vec<&Worker> = self.workers.values().collect();
        workers.sort_by_key(|w| (w.slot, w.generation, w.started));
        let canary = self.canary_status(now);
        let workers = workers
            .into_iter()
            .map(|w| {
                let figures = self.dispatch.worker_figures(w.pid);
                let checks = self.checks.figures(w.pid);
                WorkerStatus {
                    slot: w.slot,
                    pid: w.pid.as_raw(),
                    generation: w.generation,
                    state: w.state_name().to_string(),
                    uptime_secs: now.saturating_duration_since(w.started).as_secs_f64(),
                    restarts: self.slots.get(w.slot).map_or(0, |s| s.history.restarts),
                    dispatched: figures.dispatched,
                    queued: figures.queued,
                    open: figures.open,
                    status: w.last_status.clone(),
                    weight: w.weight,
                    out_of_rotation: checks.is_some_and(|c| c.out_of_rotation),
                    canary: canary
                        .as_ref()
                        .is_some_and(|c| c.pids.contains(&w.pid.as_raw())),
                    health_check: checks.map(|c| CheckStatus {
                        passes: c.passes,
                        failures: c.failures,
                        consecutive_passes: c.consecutive_passes,
                        consecutive_failures: c.consecutive_failures,
                        last: c.last.clone(),
                    }),
                    messages: self.messages.figures(w.pid).map(|f| WorkerMessages {
                        sent: f.sent,
                        received: f.received,
                        queued: f.queued,
                        dropped: f.dropped,
                    }),
                    last_exit: self.observer.tally.last_end(w.slot).map(str::to_string),
                }
            })
            .collect();
        let listeners = self
            .dispatch
            .figures()
            .map(|(l, figures)| ListenerStatus {
                name: l.name.clone(),
                address: l.address.clone(),
                policy: l.policy.name().to_string(),
                policy_note: l.policy_note.clone(),
                accepted: figures.accepted,
                pending: figures.pending,
            })
            .collect();
        let readiness = self.readiness(now);
        FleetStatus {
            pid: std::process::id() as i32,
            generation: self.generation,
            state: self.state_name().to_string(),
            ready: readiness.is_ok(),
            not_ready: readiness.err(),
            workers_wanted: self.slots.len(),
            summary: self.summary(),
            workers,
            listeners,
            canary,
            messages: (self.config.messages || self.messages.has_endpoints()).then(|| {
                let t = self.messages.totals();
                MessageTotals {
                    totals: t,
                    followers: self.control.as_ref().map_or(0, |c| c.followers()),
                }
            }),
        }
    }
}
