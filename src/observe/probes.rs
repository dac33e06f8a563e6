//! What `/readyz` and `sockvisor status --check` answer: one rule, one place.
//!
//! Ready when the fleet has started (its first `READY=1`), is neither stopping nor in its
//! `drain_delay`, and has at least `min_ready` ready workers (all slots when `min_ready` is
//! `all`); with active health checks, a worker out of the rotation does not count. Otherwise the reason, in one line. `/livez` has no rule: it is answered by the
//! loop, so an answer means the loop runs.

use std::time::Duration;

/// The fleet as readiness sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fleet {
    /// Before the first `READY=1`.
    pub starting: bool,
    pub stopping: bool,
    /// In `drain_delay`: how long until the stop.
    pub draining: Option<Duration>,
    pub ready_workers: usize,
    /// `min_ready`, or the slot count for `all`.
    pub needed: usize,
}

/// `Ok` when ready, else why not.
pub fn readiness(f: Fleet) -> Result<(), String> {
    if f.stopping {
        return Err("stopping".to_string());
    }
    if let Some(left) = f.draining {
        return Err(format!(
            "draining before stop (drain_delay): stopping in {:.1}s",
            left.as_secs_f64()
        ));
    }
    if f.starting || f.ready_workers < f.needed {
        return Err(format!(
            "{}{} workers ready, {} needed",
            if f.starting { "starting: " } else { "" },
            f.ready_workers,
            f.needed
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let up = Fleet {
            starting: false,
            stopping: false,
            draining: None,
            ready_workers: 2,
            needed: 2,
        };
        assert_eq!(readiness(up), Ok(()));
        let e = readiness(Fleet {
            starting: true,
            ready_workers: 1,
            ..up
        });
        assert_eq!(e.unwrap_err(), "starting: 1 workers ready, 2 needed");
        assert_eq!(
            readiness(Fleet {
                ready_workers: 1,
                ..up
            })
            .unwrap_err(),
            "1 workers ready, 2 needed"
        );
        let e = readiness(Fleet {
            draining: Some(Duration::from_millis(4200)),
            ..up
        });
        assert_eq!(
            e.unwrap_err(),
            "draining before stop (drain_delay): stopping in 4.2s"
        );
        let e = readiness(Fleet {
            stopping: true,
            draining: Some(Duration::ZERO),
            ..up
        });
        assert_eq!(e.unwrap_err(), "stopping");
    }
}
