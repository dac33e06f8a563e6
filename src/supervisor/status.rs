//! Summaries of the fleet: the `STATUS=` line, the log at stop, the control socket's view.

use super::{Phase, Supervisor};
use std::time::{Duration, Instant};

/// `STATUS=` is refreshed at most this often when only counters changed.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
pub(super) struct StatusState {
    last_sent: Option<String>,
    sent_at: Option<Instant>,
    /// A worker's `STATUS=` changed.
    pub changed: bool,
    pub wedge_checked: Option<Instant>,
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
        if self.listeners.iter().any(|l| l.dispatched()) {
            let accepted: u64 = self.listeners.iter().map(|l| l.accepted).sum();
            let pending: usize = self
                .listeners
                .iter()
                .map(|l| l.pending_connections.len())
                .sum();
            let queued: usize = self
                .workers
                .values()
                .flat_map(|w| w.channels.iter().flatten())
                .map(|c| c.channel.queued())
                .sum();
            s.push_str(&format!(
                ", {accepted} connections accepted, {queued} queued, {pending} pending"
            ));
        }
        if let Phase::Stopping { .. } = self.phase {
            s.insert_str(0, "stopping: ");
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
        let accepted: u64 = self.listeners.iter().map(|l| l.accepted).sum();
        format!(
            "{accepted} connections accepted, {} restarts",
            self.restarts()
        )
    }
}
