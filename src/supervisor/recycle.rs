//! Memory recycling (`worker_memory_max`): a worker whose resident memory passes the limit
//! is replaced the way a reload replaces it (reload.rs's `switch_slot`): a new worker for
//! its slot starts, and once it is ready it takes the slot over and the old one drains
//! (SIGTERM, its queue handed to others, the stop timeout). No connection is refused on the
//! way: the old worker serves until its replacement does.
//!
//! Checked every [`CHECK_INTERVAL`] for the slots' current, ready workers; not while a
//! reload runs or the fleet stops or drains. A replacement that fails (exits, or is not
//! ready within `ready_timeout`) leaves the old worker serving, and its slot is not tried
//! again for [`HOLD_OFF`]. The RSS is the worker process's own (`VmRSS`), not its children's.

use super::Supervisor;
use crate::observe::metrics::EndReason;
use crate::observe::process;
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub(super) const HOLD_OFF: Duration = Duration::from_secs(10);

struct Replacement {
    old: Pid,
    new: Pid,
    /// For the log and the metrics: `RSS 70.1 MiB > worker_memory_max 64.0 MiB`.
    why: String,
}

#[derive(Default)]
pub(super) struct Recycler {
    next_check: Option<Instant>,
    /// By slot.
    replacing: BTreeMap<usize, Replacement>,
    /// Slots not tried again before then.
    hold_off: BTreeMap<usize, Instant>,
}

impl Recycler {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.next_check
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

impl Supervisor {
    /// Move replacements forward; every [`CHECK_INTERVAL`], start new ones.
    pub(super) fn recycle_workers(&mut self, now: Instant) {
        self.advance_replacements(now);
        let Some(max) = self.config.worker_memory_max else {
            self.recycler.next_check = None;
            return;
        };
        if self.recycler.next_check.is_some_and(|t| now < t) {
            return;
        }
        self.recycler.next_check = Some(now + CHECK_INTERVAL);
        if self.stopping() || self.drain_until.is_some() || self.reload.is_some() {
            return;
        }
        self.recycler.hold_off.retain(|_, t| now < *t);
        for slot in 0..self.slots.len() {
            if self.recycler.replacing.contains_key(&slot)
                || self.recycler.hold_off.contains_key(&slot)
            {
                continue;
            }
            let Some(old) = self.slots[slot].current else {
                continue;
            };
            if !self.workers.get(&old).is_some_and(|w| w.ready()) {
                continue;
            }
            let Some(rss) = process::resident_bytes(old.as_raw()) else {
                continue;
            };
            if rss <= max {
                continue;
            }
            let why = format!("RSS {} > worker_memory_max {}", mib(rss), mib(max));
            log::info!("worker {slot} (pid {old}): {why}; starting its replacement");
            match self.fork_worker(slot, now, false) {
                Some(new) => {
                    self.recycler
                        .replacing
                        .insert(slot, Replacement { old, new, why });
                }
                None => {
                    self.recycler.hold_off.insert(slot, now + HOLD_OFF);
                }
            }
        }
    }

    /// Switch the slots whose replacement is ready; give up on the ones that failed.
    fn advance_replacements(&mut self, now: Instant) {
        let slots: Vec<usize> = self.recycler.replacing.keys().copied().collect();
        for slot in slots {
            let r = &self.recycler.replacing[&slot];
            let (old, new) = (r.old, r.new);
            let still_current = self.slots.get(slot).and_then(|s| s.current) == Some(old);
            let new_state = self.workers.get(&new).map(|w| w.ready());
            match new_state {
                // The slot moved on (a reload, a scale down, the old worker died, the
                // fleet stops): the replacement is not needed.
                Some(_) if !still_current || self.stopping() => {
                    self.recycler.replacing.remove(&slot);
                    self.retire(new, "memory replacement no longer needed", now);
                }
                Some(true) => {
                    let Some(r) = self.recycler.replacing.remove(&slot) else {
                        continue;
                    };
                    self.slots[slot].current = Some(new);
                    self.slots[slot].history.replaced();
                    self.observer
                        .tally
                        .restarted(slot, EndReason::Memory, &r.why);
                    self.retire(
                        old,
                        &format!("recycled ({}), replaced by pid {new}", r.why),
                        now,
                    );
                }
                Some(false) => {}
                None => {
                    self.recycler.replacing.remove(&slot);
                    if still_current {
                        log::warn!(
                            "worker {slot}: its memory replacement (pid {new}) failed; pid {old} goes on serving, next try in {}s",
                            HOLD_OFF.as_secs()
                        );
                        self.recycler.hold_off.insert(slot, now + HOLD_OFF);
                    }
                }
            }
        }
    }
}
