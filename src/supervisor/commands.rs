//! Requests from the control socket (`sockvisor status | reload | scale N`).

use super::reload::Waiter;
use super::Supervisor;

impl Supervisor {
    /// Tell the clients waiting for a reload how it ended.
    pub(super) fn answer_waiters(&mut self, waiters: &[Waiter], outcome: Result<String, String>) {
        let _ = (waiters, outcome);
    }
}
