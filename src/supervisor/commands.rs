//! Requests from the control socket (`sockvisor status | reload | scale N | signal | send |
//! messages --follow`).

use super::reload::Waiter;
use super::Supervisor;
use crate::control::{Reply, Request, RequestId};
use crate::messages::payload;
use std::time::Instant;

impl Supervisor {
    /// The control socket is readable: answer what can be answered now (the server hands
    /// out a few requests per client per wake-up). A reload is answered when it ends.
    pub(super) fn serve_control(&mut self) {
        let Some(control) = self.control.as_mut() else {
            return;
        };
        let requests = control.poll();
        let now = Instant::now();
        for (id, request) in requests {
            // Its client went away (or was dropped for not reading): build nothing for it.
            if !self.control.as_ref().is_some_and(|c| c.wants_reply(id)) {
                continue;
            }
            let reply = match request {
                Request::Status => Some(Reply::with_status(self.fleet_status(now))),
                Request::Metrics => Some(Reply::with_metrics(self.metrics_text(now, false))),
                Request::Scale { workers } => Some(match self.scale(workers, now) {
                    Ok(m) => Reply::ok(Some(m)),
                    Err(e) => Reply::error(e),
                }),
                Request::Reload { canary } => match self.reload(now, Some(id.0), canary) {
                    Ok(()) => None,
                    Err(e) => Some(Reply::error(format!("reload refused: {e}"))),
                },
                Request::Signal {
                    signal,
                    slot,
                    generation,
                } => Some(self.signal_workers(&signal, slot, generation)),
                Request::Send {
                    slot,
                    payload,
                    payload_base64,
                } => Some(
                    match payload::from_json(payload.as_deref(), payload_base64.as_deref()) {
                        Ok(bytes) => self.operator_send(slot, bytes),
                        Err(e) => Reply::error(e),
                    },
                ),
                Request::Messages { follow: true } => Some(self.follow_messages()),
                Request::Messages { follow: false } => Some(Reply::error(
                    "messages needs \"follow\": true (the figures are in status)",
                )),
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
            control.reply(RequestId(w), &reply);
        }
    }
}
