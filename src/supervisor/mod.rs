//! The supervisor: one event loop that owns the fleet.
//!
//! SKELETON: being written.

use crate::config::Config;
use std::os::fd::OwnedFd;

/// Run a fleet until it stops; returns the process exit code.
pub fn run(config: Config, passed: Vec<(OwnedFd, String)>) -> i32 {
    let _ = (config, passed);
    todo!()
}
