//! Stop signals, as an orchestrator sends them (docs/containers.md):
//!
//! - **SIGTERM** (systemd, `docker stop`, Kubernetes): with `drain_delay`, the fleet first
//!   *drains*: `/readyz` answers 503 at once and `status --check` fails, while the workers
//!   go on serving for `drain_delay`, so a balancer that polls readiness takes this endpoint
//!   out before it stops accepting; then the normal stop. Without `drain_delay`, the stop
//!   at once.
//! - **SIGINT** (Ctrl-C) and **SIGQUIT**: the stop at once, without `drain_delay`: the fast
//!   stop of nginx (`-s stop`), which an operator asks for by hand. It is still the normal
//!   stop: accepted connections are handed to workers, workers get SIGTERM and the stop
//!   timeout (a harder stop is SIGKILL, which the orchestrator sends itself).
//! - A second stop signal during `drain_delay` ends it: the stop follows at once.
//!
//! Every one of them exits 0 once the workers are gone. Reloads and scaling are refused
//! while draining: the fleet is on its way out.

use super::Supervisor;
use nix::sys::signal::Signal;
use std::time::Instant;

impl Supervisor {
    /// SIGTERM, SIGINT or SIGQUIT arrived.
    pub(super) fn stop_signal(&mut self, sig: Signal, now: Instant) {
        if self.stopping() {
            return;
        }
        let delay = self.config.drain_delay;
        if sig != Signal::SIGTERM || delay.is_zero() || self.drain_until.is_some() {
            let what = match self.drain_until.take() {
                Some(_) => format!("received {} while draining", sig.as_str()),
                None => format!("received {}", sig.as_str()),
            };
            self.stop(crate::exit::OK, &what);
            return;
        }
        log::info!(
            "received SIGTERM: draining for {:.1}s (drain_delay) before stopping; /readyz answers 503, the workers go on serving",
            delay.as_secs_f64()
        );
        // The summary (`STATUS=`, `status`) now starts with `draining: `.
        self.drain_until = Some(now + delay);
        self.dirty = true;
    }

    /// The end of `drain_delay`: the stop.
    pub(super) fn drain_due(&mut self, now: Instant) {
        if self.drain_until.is_some_and(|t| now >= t) {
            self.drain_until = None;
            self.stop(crate::exit::OK, "received SIGTERM (drain_delay over)");
        }
    }

    /// An error for what a draining fleet does not do any more.
    pub(super) fn refuse_while_draining(&self) -> Result<(), String> {
        match self.drain_until {
            Some(_) => Err("sockvisor is draining before it stops (drain_delay)".to_string()),
            None => Ok(()),
        }
    }
}
