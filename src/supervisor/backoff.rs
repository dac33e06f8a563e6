//! Restart backoff of one slot: capped exponential, reset once a worker stays up; and the
//! give-up rule: a slot has failed for good only when its workers keep failing to *start*.
//!
//! Two counts, on purpose (docs/reliability.md): a worker that dies soon after start, for
//! whatever reason, makes its slot wait longer before the next try (backoff); but only a
//! worker that never got going (it exited before it was ready, or within [`MIN_UPTIME`] of
//! its start) counts towards giving up. A fleet whose workers booted and served is never
//! given up on, however often they are killed (an OOM-killer storm), as Node's cluster,
//! gunicorn and PM2 never give up on workers that booted.

use crate::config::Backoff;
use std::time::Duration;

/// The restart history of one slot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotHistory {
    /// Restarts of this slot since sockvisor started.
    pub restarts: u64,
    /// Failures in a row: exits of workers that did not stay up `reset_after`.
    pub consecutive_failures: u32,
    /// Failures in a row of workers that failed to start (see the module docs).
    pub boot_failures: u32,
}

/// A ready worker that lived at least this long started: its later death is not a failure
/// to start (PM2's `min_uptime`).
pub const MIN_UPTIME: Duration = Duration::from_secs(1);

impl SlotHistory {
    /// Record an unexpected exit after `uptime` of a worker that `started` (it got ready
    /// and lived [`MIN_UPTIME`]); returns the delay before the restart.
    pub fn failed(&mut self, policy: &Backoff, uptime: Duration, started: bool) -> Duration {
        if uptime >= policy.reset_after {
            self.consecutive_failures = 0;
        }
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.boot_failures = if started {
            0
        } else {
            self.boot_failures.saturating_add(1)
        };
        self.restarts += 1;
        delay(policy, self.consecutive_failures)
    }

    /// Record an expected exit (drained, or the worker said STOPPING=1 and exited 0).
    pub fn replaced(&mut self) {
        self.restarts += 1;
    }

    /// True once this slot's workers failed to start `give_up_after` times in a row.
    pub fn exhausted(&self, policy: &Backoff) -> bool {
        self.boot_failures >= policy.give_up_after
    }
}

/// The delay before restart number `failures` (1-based): `initial * 2^(failures-1)`, capped.
pub fn delay(policy: &Backoff, failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(31);
    policy
        .initial
        .checked_mul(1u32 << exponent)
        .unwrap_or(policy.max)
        .min(policy.max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            reset_after: Duration::from_secs(10),
            give_up_after: 4,
        }
    }

    #[test]
    fn grows_and_caps() {
        let p = policy();
        let mut h = SlotHistory::default();
        let delays: Vec<_> = (0..7)
            .map(|_| h.failed(&p, Duration::ZERO, false))
            .collect();
        let ms: Vec<u128> = delays.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert!(h.exhausted(&p));
        assert_eq!(h.restarts, 7);
    }

    #[test]
    fn resets_after_staying_up() {
        let p = policy();
        let mut h = SlotHistory::default();
        h.failed(&p, Duration::ZERO, false);
        h.failed(&p, Duration::ZERO, false);
        h.failed(&p, Duration::ZERO, false);
        assert_eq!(
            h.failed(&p, Duration::from_secs(11), true),
            Duration::from_millis(100)
        );
        assert_eq!(h.consecutive_failures, 1);
        assert!(!h.exhausted(&p));
    }

    #[test]
    fn workers_that_started_never_exhaust_a_slot() {
        let p = policy();
        let mut h = SlotHistory::default();
        // killed quickly again and again after they got going: backoff grows, no give-up
        let delays: Vec<_> = (0..10)
            .map(|_| h.failed(&p, Duration::from_secs(2), true).as_millis())
            .collect();
        assert_eq!(delays[..5], [100, 200, 400, 800, 1600]);
        assert!(!h.exhausted(&p));
        // one that failed to start in between counts from 1 again
        for _ in 0..3 {
            h.failed(&p, Duration::ZERO, false);
        }
        h.failed(&p, Duration::from_secs(2), true);
        h.failed(&p, Duration::ZERO, false);
        assert!(!h.exhausted(&p));
    }

    #[test]
    fn huge_counts_do_not_overflow() {
        assert_eq!(delay(&policy(), u32::MAX), Duration::from_secs(2));
    }
}
