//! The worker table: what sockvisor knows about each live worker and each slot.

use super::backoff::SlotHistory;
use crate::dispatch::Channel;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Exec'd, waiting for its `READY=1` (`ready = "notify"`).
    Starting,
    /// Receives connections.
    Ready,
    /// Asked to stop (SIGTERM or SIGABRT sent); receives nothing; SIGKILL at `kill_at`.
    Draining,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Draining => "draining",
        }
    }
}

/// One worker's channel for one dispatched listener, with its counters.
pub struct WorkerChannel {
    pub channel: Channel,
    /// Connections sent on this channel.
    pub dispatched: u64,
    /// Connections the worker reported closed (least-connections).
    pub reported_closed: u64,
    /// Whether it ever sent a close report.
    pub reports: bool,
    /// Queue depth as last read with FIONREAD, plus what was sent since: an upper bound of
    /// the real depth, so the FIONREAD is needed only when this reaches the window.
    pub queued_bound: usize,
    /// `dispatched - queued` at the last wedge check, and when it last moved.
    pub received_at_check: u64,
    pub progress_at: Instant,
}

impl WorkerChannel {
    pub fn new(channel: Channel, now: Instant) -> WorkerChannel {
        WorkerChannel {
            channel,
            dispatched: 0,
            reported_closed: 0,
            reports: false,
            queued_bound: 0,
            received_at_check: 0,
            progress_at: now,
        }
    }

    /// Read the real queue depth and tighten the bound.
    pub fn refresh_queued(&mut self) -> usize {
        self.queued_bound = self.channel.queued();
        self.queued_bound
    }

    pub fn open(&self) -> Option<u64> {
        self.reports
            .then(|| self.dispatched.saturating_sub(self.reported_closed))
    }
}

pub struct Worker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    pub state: WorkerState,
    pub started: Instant,
    /// Indexed like the listeners; `Some` for dispatched listeners.
    pub channels: Vec<Option<WorkerChannel>>,
    /// It sent `STOPPING=1`: no more connections, and its exit is expected.
    pub said_stopping: bool,
    /// When it exits, its slot is not restarted (scaled down, or replaced by a reload).
    pub retired: bool,
    /// It was stopped for a health reason: its exit counts as a failure of its slot.
    pub unhealthy: bool,
    pub last_status: Option<String>,
    pub ready_deadline: Option<Instant>,
    pub watchdog: Option<Duration>,
    pub watchdog_deadline: Option<Instant>,
    /// SIGKILL deadline once asked to stop.
    pub kill_at: Option<Instant>,
}

impl Worker {
    /// May receive new connections.
    pub fn dispatchable(&self) -> bool {
        self.state == WorkerState::Ready && !self.said_stopping
    }

    /// Counts towards fleet health: dispatchable and not overdue on its watchdog.
    pub fn healthy(&self, now: Instant) -> bool {
        self.dispatchable() && self.watchdog_deadline.is_none_or(|d| now < d)
    }

    pub fn dispatched(&self) -> u64 {
        self.channels.iter().flatten().map(|c| c.dispatched).sum()
    }

    pub fn open(&self) -> Option<u64> {
        self.channels
            .iter()
            .flatten()
            .filter_map(|c| c.open())
            .reduce(|a, b| a + b)
    }
}

/// A position in the fleet (`SOCKVISOR_WORKER_ID`), kept across restarts.
#[derive(Debug, Default)]
pub struct Slot {
    pub history: SlotHistory,
    /// The worker currently serving this slot (not one being replaced).
    pub current: Option<Pid>,
    /// When the next worker of this slot is due.
    pub restart_at: Option<Instant>,
    /// Its worker exited with a code declared fatal: not restarted.
    pub disabled: bool,
}
