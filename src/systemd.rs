//! Notifications to systemd (`sd_notify`), and the watchdog schedule systemd asks for.
//!
//! Sent only when `NOTIFY_SOCKET` was set at start; a missing or unreachable socket is
//! logged once at debug level and never an error for the fleet.
//!
//! SKELETON: signatures are the contract used by the supervisor.

use std::time::Duration;

pub struct Upstream {
    watchdog: Option<Duration>,
}

impl Upstream {
    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Must run before any thread
    /// exists (it unsets `WATCHDOG_*`).
    pub fn from_env() -> Upstream {
        todo!()
    }

    /// An upstream that sends nothing (tests, and `sockvisor` run by hand).
    pub fn disabled() -> Upstream {
        Upstream { watchdog: None }
    }

    /// `WATCHDOG_USEC` as systemd set it.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How often to send `WATCHDOG=1`: half the timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    pub fn ready(&self, status: &str) {
        let _ = status;
        todo!()
    }
    pub fn status(&self, status: &str) {
        let _ = status;
        todo!()
    }
    /// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`).
    pub fn reloading(&self, status: &str) {
        let _ = status;
        todo!()
    }
    pub fn stopping(&self, status: &str) {
        let _ = status;
        todo!()
    }
    pub fn watchdog(&self) {
        todo!()
    }
    pub fn watchdog_trigger(&self, status: &str) {
        let _ = status;
        todo!()
    }
    pub fn extend_timeout(&self, by: Duration) {
        let _ = by;
        todo!()
    }
    /// `ERRNO=` with a status, when the fleet gives up.
    pub fn failed(&self, errno: i32, status: &str) {
        let _ = (errno, status);
        todo!()
    }
}
