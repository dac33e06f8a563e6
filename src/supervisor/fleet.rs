//! The worker table: what sockvisor knows about each live worker and each slot.
//!
//! A worker's life is one [`WorkerState`]: starting (until its `READY=1`), ready, then
//! stopping for one [`Departure`] reason. The reason alone decides what its exit means for
//! its slot (see [`Departure`]).

use super::backoff::{SlotHistory, MIN_UPTIME};
use crate::observe::metrics::EndReason;
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Why a worker is stopping. When several apply, the strongest is kept:
/// `Retired` over `Failed` over `Announced`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Departure {
    /// It said `STOPPING=1` on its own: an exit with status 0 refills its slot without
    /// counting a failure; any other exit is a failure.
    Announced,
    /// Stopped for a health reason (ready timeout, watchdog, wedged, broken channel): its
    /// exit is a failure of its slot, whatever its status.
    Failed,
    /// Told to go for good (scaled down, replaced by a reload, rolled back, sockvisor
    /// stopping): its exit never refills a slot.
    Retired,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Exec'd, waiting for its `READY=1` (`ready = "notify"`) until `ready_by`.
    Starting { ready_by: Instant },
    /// Receives connections.
    Ready,
    /// Receives nothing; SIGKILL at `kill_at` (`None` once sent).
    Stopping {
        departure: Departure,
        kill_at: Option<Instant>,
    },
}

pub struct Worker {
    pub pid: Pid,
    pub slot: usize,
    pub generation: u64,
    /// Its weight in (smooth weighted) round robin: its generation's `weight`.
    pub weight: u32,
    pub state: WorkerState,
    pub started: Instant,
    /// When it got ready, if it did.
    pub ready_at: Option<Instant>,
    pub last_status: Option<String>,
    /// Its watchdog interval (`WatchdogSec=` of workers, or its own `WATCHDOG_USEC=`).
    pub watchdog: Option<Duration>,
    /// When it is overdue; `None` while stopping.
    pub watchdog_deadline: Option<Instant>,
    /// Why sockvisor stopped it for its health (`Departure::Failed`), for the metrics.
    pub failure: Option<EndReason>,
    /// The read end of its exec report (spawn::ExecReport) until it says the worker exec'd.
    pub exec_report: Option<std::os::fd::OwnedFd>,
    /// Why its exec failed, once the report said so (its exit follows).
    pub exec_error: Option<nix::errno::Errno>,
}

impl Worker {
    /// May receive new connections.
    pub fn ready(&self) -> bool {
        self.state == WorkerState::Ready
    }

    pub fn stopping(&self) -> bool {
        matches!(self.state, WorkerState::Stopping { .. })
    }

    /// Counts towards fleet health: ready and not overdue on its watchdog.
    pub fn healthy(&self, now: Instant) -> bool {
        self.ready() && self.watchdog_deadline.is_none_or(|d| now < d)
    }

    /// It got going: ready, and up for at least [`MIN_UPTIME`] (the give-up rule).
    pub fn started_up(&self, now: Instant) -> bool {
        self.ready_at.is_some() && now.saturating_duration_since(self.started) >= MIN_UPTIME
    }

    pub fn departure(&self) -> Option<Departure> {
        match self.state {
            WorkerState::Stopping { departure, .. } => Some(departure),
            _ => None,
        }
    }

    /// For `status`: starting | ready | stopping (it said so) | draining (told to).
    pub fn state_name(&self) -> &'static str {
        match self.state {
            WorkerState::Starting { .. } => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Stopping {
                departure: Departure::Announced,
                ..
            } => "stopping",
            WorkerState::Stopping { .. } => "draining",
        }
    }

    /// The next moment something is due for it.
    pub fn deadline(&self) -> Option<Instant> {
        let state = match self.state {
            WorkerState::Starting { ready_by } => Some(ready_by),
            WorkerState::Ready => None,
            WorkerState::Stopping { kill_at, .. } => kill_at,
        };
        [state, self.watchdog_deadline].into_iter().flatten().min()
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
