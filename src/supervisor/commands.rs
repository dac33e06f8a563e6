//! Requests from the control socket (`sockvisor status | reload | scale N`).

use super::reload::Waiter;
use super::{Phase, Supervisor};
use crate::control::{ClientId, FleetStatus, ListenerStatus, Reply, Request, WorkerStatus};
use std::time::Instant;

impl Supervisor {
    /// The control socket is readable: answer what can be answered now. A reload is
    /// answered when it ends.
    pub(super) fn serve_control(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let requests = control.poll();
        let now = Instant::now();
        for (id, request) in requests {
            let reply = match request {
                Err(e) => Some(Reply::error(e)),
                Ok(Request::Status) => Some(Reply::with_status(self.fleet_status(now))),
                Ok(Request::Scale { workers }) => Some(match self.scale(workers, now) {
                    Ok(m) => Reply::ok(Some(m)),
                    Err(e) => Reply::error(e),
                }),
                Ok(Request::Reload) => match self.reload(now, Some(id.0)) {
                    Ok(()) => None,
                    Err(e) => Some(Reply::error(format!("reload refused: {e}"))),
                },
            };
            if let (Some(reply), Some(control)) = (reply, self.control.as_mut()) {
                control.reply(id, &reply);
            }
        }
        self.dirty = true;
    }

    /// Tell the clients waiting for a reload how it ended.
    pub(super) fn answer_waiters(&mut self, waiters: &[Waiter], outcome: Result<String, String>) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let reply = match outcome {
            Ok(m) => Reply::ok(Some(m)),
            Err(e) => Reply::error(e),
        };
        for &w in waiters {
            control.reply(ClientId(w), &reply);
        }
    }

    /// Everything `sockvisor status` shows.
    pub(super) fn fleet_status(&self, now: Instant) -> FleetStatus {
        let workers = self
            .workers
            .values()
            .map(|w| WorkerStatus {
                slot: w.slot,
                pid: w.pid.as_raw(),
                generation: w.generation,
                state: if w.said_stopping && w.state != super::fleet::WorkerState::Draining {
                    "stopping".to_string()
                } else {
                    w.state.name().to_string()
                },
                uptime_secs: now.saturating_duration_since(w.started).as_secs_f64(),
                restarts: self.slots.get(w.slot).map_or(0, |s| s.history.restarts),
                dispatched: w.dispatched(),
                queued: w
                    .channels
                    .iter()
                    .flatten()
                    .map(|c| c.channel.queued() as u64)
                    .sum(),
                open: w.open(),
                status: w.last_status.clone(),
            })
            .collect();
        let listeners = self
            .listeners
            .iter()
            .map(|l| ListenerStatus {
                name: l.listener.name.clone(),
                address: l.listener.address.clone(),
                policy: l.listener.policy.name().to_string(),
                accepted: l.accepted,
                pending: l.pending_connections.len() as u64,
            })
            .collect();
        FleetStatus {
            pid: std::process::id() as i32,
            generation: self.generation,
            state: match self.phase {
                Phase::Starting => "starting",
                Phase::Running if self.reload.is_some() => "reloading",
                Phase::Running => "running",
                Phase::Stopping { .. } => "stopping",
            }
            .to_string(),
            workers_wanted: self.slots.len(),
            summary: self.summary(),
            workers,
            listeners,
        }
    }
}
