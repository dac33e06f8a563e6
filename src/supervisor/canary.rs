//! Canary reloads (`sockvisor reload --canary N`, or `canary_workers = N`): the new
//! generation starts with N workers beside the whole old fleet and gets a share of new
//! connections; after `canary_observe` with no crash, no kill (ready timeout, watchdog,
//! wedge, health checks) and passing active health checks, it is promoted and the reload
//! goes on as a plain one; otherwise its workers are retired and the old fleet, which never
//! stopped serving, stays. docs/canary.md.
//!
//! Until the promotion the running configuration, command and generation stay the old
//! ones: an old worker that dies meanwhile is restarted as before, and only the canary's
//! workers are forked with the new ones ([`Supervisor::fork_canary_worker`]). The canary
//! workers take the slots `0..N` (`SOCKVISOR_WORKER_ID`), beside those slots' old workers,
//! and become those slots' workers at the promotion, as a plain reload's would.
//!
//! The share: by weight (nothing to do when `canary_share` is unset: each worker has its
//! generation's `weight`), by a configured share (dispatch's [`Split`]), or by client
//! address buckets (channel policies only: under `reuseport` the program sees a flow hash
//! that includes the client's port, not its address alone, so it is refused there).
//! `RELOADING=1` went upstream when the reload began; `READY=1` goes at its very end
//! (promotion and the rest of the rollout, or rollback).

use super::fleet::Departure;
use super::reload::Reload;
use super::Supervisor;
use crate::config::{Config, DispatchPolicy};
use crate::control::CanaryStatus;
use crate::dispatch::Split;
use crate::spawn;
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

pub(super) struct Canary {
    /// The configuration and command of the new generation, applied at the promotion.
    config: Option<Config>,
    command: Option<spawn::Command>,
    generation: u64,
    /// Its workers by slot.
    workers: BTreeMap<usize, Pid>,
    split: Option<Split>,
    phase: Phase,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Its workers are starting; rolled back if they are not all ready by then.
    Starting { ready_by: Instant },
    /// Serving its share until `until` (pushed once if an active check is still to pass).
    Observing {
        since: Instant,
        until: Instant,
        extended: bool,
    },
}

impl Canary {
    pub(super) fn deadline(&self) -> Instant {
        match self.phase {
            Phase::Starting { ready_by } => ready_by,
            Phase::Observing { until, .. } => until,
        }
    }

    fn config(&self) -> &Config {
        self.config
            .as_ref()
            .expect("the canary's config until the promotion")
    }
}

/// `10%`, `12.5%`.
fn percent(permille: u32) -> String {
    if permille % 10 == 0 {
        format!("{}%", permille / 10)
    } else {
        format!("{}.{}%", permille / 10, permille % 10)
    }
}

impl Supervisor {
    /// Begin a canary rollout of `new` with `n` workers (the reload has been announced).
    pub(super) fn start_canary(
        &mut self,
        new: Config,
        command: spawn::Command,
        n: usize,
        now: Instant,
    ) -> Result<(), String> {
        let slots = self.slots.len().min(new.workers);
        if n > slots {
            return Err(format!(
                "a canary of {n} workers is more than the fleet's {slots} (the old fleet has {}, the new configuration {}); use --canary 1..={slots}",
                self.slots.len(),
                new.workers
            ));
        }
        let by_client = new.canary.by_client && new.canary.share_permille.is_some();
        if by_client {
            if let Some(l) = self
                .dispatch
                .listeners()
                .find(|l| !l.policy.uses_channels() && l.kind.is_stream())
            {
                return Err(format!(
                    "canary_by = \"client\" needs a channel policy, and listener {} is {}: under reuseport the kernel program sees a flow hash that includes the client's port, not its address alone (use canary_by = \"weight\", or dispatch = \"ip-hash\")",
                    l.name,
                    l.policy.name()
                ));
            }
        }
        let generation = self.generation + 1;
        let split = new.canary.share_permille.map(|permille| Split {
            generation,
            permille,
            by_client,
        });
        let share = match split {
            Some(s) => format!(
                "{} of new connections by {}",
                percent(s.permille),
                if s.by_client {
                    "client address"
                } else {
                    "weight"
                }
            ),
            None => format!(
                "weight {} per worker against the old workers' {}",
                new.weight, self.config.weight
            ),
        };
        log::info!(
            "reload: canary of generation {generation}: {n} workers, {share}, observed for {}s once ready",
            new.canary.observe.as_secs_f64()
        );
        if self
            .dispatch
            .listeners()
            .any(|l| l.policy == DispatchPolicy::Shared)
        {
            log::warn!(
                "reload: canary: shared listeners are not steered (each worker accepts when the kernel wakes it): the canary's share there is whatever the kernel gives it"
            );
        }
        let mut canary = Canary {
            config: Some(new),
            command: Some(command),
            generation,
            workers: BTreeMap::new(),
            split,
            phase: Phase::Starting {
                ready_by: now + self.config.reload_timeout,
            },
        };
        let mut failed = None;
        for slot in 0..n {
            match self.fork_canary_worker(slot, &mut canary, now) {
                Some(pid) => {
                    canary.workers.insert(slot, pid);
                }
                None => {
                    failed = Some(slot);
                    break;
                }
            }
        }
        if let Some(slot) = failed {
            for &pid in canary.workers.values() {
                self.retire(pid, "its canary could not start", now);
            }
            return Err(format!("could not start the canary worker of slot {slot}"));
        }
        self.reload = Some(Reload {
            generation,
            old_config: self.config.clone(),
            old_command: self.command.clone(),
            old_generation: self.generation,
            to_replace: VecDeque::new(),
            starting: BTreeMap::new(),
            deadline: now + self.config.reload_timeout,
            started: now,
            waiters: Vec::new(),
            canary: Some(canary),
        });
        self.dirty = true;
        Ok(())
    }

    /// Fork a worker of the canary's generation: its configuration, command and generation
    /// stand in for the running ones during the fork only.
    fn fork_canary_worker(&mut self, slot: usize, c: &mut Canary, now: Instant) -> Option<Pid> {
        let (Some(config), Some(command)) = (c.config.take(), c.command.take()) else {
            return None;
        };
        let old_config = std::mem::replace(&mut self.config, config);
        let old_command = std::mem::replace(&mut self.command, command);
        let old_generation = std::mem::replace(&mut self.generation, c.generation);
        let pid = self.fork_worker(slot, now, false);
        c.config = Some(std::mem::replace(&mut self.config, old_config));
        c.command = Some(std::mem::replace(&mut self.command, old_command));
        self.generation = old_generation;
        pid
    }

    /// Why the canary failed, if it did.
    fn canary_failure(&self, c: &Canary, now: Instant) -> Option<String> {
        for (&slot, &pid) in &c.workers {
            let Some(w) = self.workers.get(&pid) else {
                return Some(format!("its worker for slot {slot} (pid {pid}) exited"));
            };
            if w.departure().is_some() {
                let how = match w.departure() {
                    Some(Departure::Failed) => "was stopped as unhealthy",
                    _ => "is stopping on its own",
                };
                return Some(format!("its worker for slot {slot} (pid {pid}) {how}"));
            }
            if let Some(f) = self.checks.figures(pid) {
                if f.consecutive_failures > 0 {
                    return Some(format!(
                        "its worker for slot {slot} (pid {pid}) failed its health check ({})",
                        f.last.as_deref().unwrap_or("failed")
                    ));
                }
            }
        }
        if let Phase::Starting { ready_by } = c.phase {
            if now >= ready_by {
                return Some(format!(
                    "it was not ready within the reload timeout ({}s)",
                    self.config.reload_timeout.as_secs()
                ));
            }
        }
        None
    }

    /// Move a canary rollout on: watch it, start observing once it is ready, promote or roll
    /// back.
    pub(super) fn advance_canary(&mut self, mut r: Reload, now: Instant) {
        let Some(mut c) = r.canary.take() else {
            self.reload = Some(r);
            return;
        };
        if let Some(why) = self.canary_failure(&c, now) {
            self.roll_back_canary(r, c, &why, now);
            return;
        }
        match c.phase {
            Phase::Starting { .. } => {
                let all_ready = c
                    .workers
                    .values()
                    .all(|p| self.workers.get(p).is_some_and(|w| w.ready()));
                if all_ready {
                    let observe = c.config().canary.observe;
                    c.phase = Phase::Observing {
                        since: now,
                        until: now + observe,
                        extended: false,
                    };
                    self.dispatch.set_split(c.split);
                    log::info!(
                        "reload: canary of generation {} ready; observing it for {}s",
                        c.generation,
                        observe.as_secs_f64()
                    );
                }
            }
            Phase::Observing {
                since,
                until,
                extended,
            } if now >= until => {
                let unchecked: Vec<usize> = c
                    .workers
                    .iter()
                    .filter(|(_, p)| self.checks.figures(**p).is_some_and(|f| f.passes == 0))
                    .map(|(&s, _)| s)
                    .collect();
                if unchecked.is_empty() {
                    self.promote_canary(r, c, now);
                    return;
                }
                if extended {
                    let why = format!(
                        "its worker for slot {} never passed a health check",
                        unchecked[0]
                    );
                    self.roll_back_canary(r, c, &why, now);
                    return;
                }
                // One more check round for a worker not checked yet.
                let more = c
                    .config()
                    .health_check
                    .as_ref()
                    .map_or(Duration::from_secs(1), |h| h.interval + h.timeout);
                c.phase = Phase::Observing {
                    since,
                    until: now + more,
                    extended: true,
                };
            }
            Phase::Observing { .. } => {}
        }
        r.canary = Some(c);
        self.reload = Some(r);
    }

    /// The canary is healthy: the new generation becomes the running one, its workers take
    /// their slots, and the reload goes on as a plain one for the other slots.
    fn promote_canary(&mut self, mut r: Reload, mut c: Canary, now: Instant) {
        self.dispatch.set_split(None);
        let (Some(config), Some(command)) = (c.config.take(), c.command.take()) else {
            return;
        };
        log::info!(
            "reload: canary of generation {} passed its observation; promoting it",
            c.generation
        );
        r.old_generation = self.generation;
        self.generation = c.generation;
        r.old_config = std::mem::replace(&mut self.config, config);
        r.old_command = std::mem::replace(&mut self.command, command);
        let workers = self.config.workers;
        if workers > self.slots.len() {
            self.slots.resize_with(workers, Default::default);
        }
        self.dispatch
            .set_settings(super::dispatch_settings(&self.config));
        r.to_replace = (0..workers)
            .filter(|s| !c.workers.contains_key(s))
            .collect();
        r.deadline = now + self.config.reload_timeout;
        for (slot, pid) in c.workers {
            self.switch_slot(slot, pid, c.generation, now);
        }
        self.reload = Some(r);
        self.dirty = true;
    }

    /// The canary failed: retire its workers; the running generation never changed.
    fn roll_back_canary(&mut self, r: Reload, c: Canary, why: &str, now: Instant) {
        log::error!(
            "reload failed: canary of generation {} rolled back: {why}",
            c.generation
        );
        self.dispatch.set_split(None);
        for &pid in c.workers.values() {
            self.retire(pid, "its canary is rolled back", now);
        }
        self.observer
            .tally
            .reloaded(crate::observe::metrics::ReloadResult::RolledBack);
        let message = format!(
            "reload failed: canary rolled back: {why}; generation {} kept",
            self.generation
        );
        let status = format!("{message}; {}", self.summary());
        self.reload_ended(status, now);
        self.answer_waiters(&r.waiters, Err(message));
        self.dirty = true;
    }

    /// The canary for `status`.
    pub(super) fn canary_status(&self, now: Instant) -> Option<CanaryStatus> {
        let c = self.reload.as_ref()?.canary.as_ref()?;
        let config = c.config();
        let share = match c.split {
            Some(s) if s.by_client => format!("{} by client address", percent(s.permille)),
            Some(s) => format!("{} by weight", percent(s.permille)),
            None => format!(
                "weight {} per worker (old workers: {})",
                config.weight, self.config.weight
            ),
        };
        let (phase, left) = match c.phase {
            Phase::Starting { .. } => ("starting", None),
            Phase::Observing { until, .. } => (
                "observing",
                Some(until.saturating_duration_since(now).as_secs_f64()),
            ),
        };
        let pids: Vec<Pid> = c.workers.values().copied().collect();
        let health = if config.health_check.is_none() {
            "no active checks; watching for exits and kills".to_string()
        } else {
            let passing = pids
                .iter()
                .filter(|p| {
                    self.checks
                        .figures(**p)
                        .is_some_and(|f| f.passes > 0 && f.consecutive_failures == 0)
                })
                .count();
            format!(
                "{passing}/{} workers passing their health checks",
                pids.len()
            )
        };
        Some(CanaryStatus {
            generation: c.generation,
            pids: pids.iter().map(|p| p.as_raw()).collect(),
            share,
            phase: phase.to_string(),
            observe_left_secs: left,
            health,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::percent;

    #[test]
    fn percents() {
        assert_eq!(percent(100), "10%");
        assert_eq!(percent(125), "12.5%");
        assert_eq!(percent(0), "0%");
    }
}
