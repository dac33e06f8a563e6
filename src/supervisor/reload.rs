//! Reload in generations (docs/design.md): re-read the config, start the new
//! generation a few workers at a time (`reload_surge`), drain each old worker only once its
//! replacement is ready, and roll back if the new generation does not get ready.
//!
//! Protocol rule: `RELOADING=1` (+ `MONOTONIC_USEC`) goes upstream when a reload starts,
//! and `READY=1` when it ends, successfully or not, so that `systemctl reload` returns at
//! the right moment with `Type=notify-reload` (systemd 253+) as with `ExecReload=`.

use super::{Phase, Supervisor};
use crate::config::{self, Config, Invocation};
use crate::observe::metrics::ReloadResult;
use crate::spawn;
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

/// A control client waiting for the outcome of a reload.
pub(super) type Waiter = u64;

pub(super) struct Reload {
    /// The generation being started.
    pub(super) generation: u64,
    /// What to go back to if it fails.
    pub(super) old_config: Config,
    pub(super) old_command: spawn::Command,
    pub(super) old_generation: u64,
    /// Slots whose worker is still to be replaced, in order.
    pub(super) to_replace: VecDeque<usize>,
    /// New workers started and not ready yet, by slot.
    pub(super) starting: BTreeMap<usize, Pid>,
    pub(super) deadline: Instant,
    pub(super) started: Instant,
    pub(super) waiters: Vec<Waiter>,
    /// A canary rollout not promoted yet (canary.rs): the new generation is not applied, the
    /// fields above describe the running one until the promotion.
    pub(super) canary: Option<super::canary::Canary>,
}

impl Supervisor {
    /// The end of a reload, whatever its outcome. Protocol rule: `READY=1` closes the
    /// `RELOADING=1` sent at its start; before the fleet's first `READY=1` neither is sent,
    /// since a `READY=1` then would tell systemd the service is up too early.
    pub(super) fn reload_ended(&mut self, status: String, now: Instant) {
        if self.phase == Phase::Running {
            self.upstream.ready(&status);
        } else {
            self.upstream.status(&status);
        }
        self.status.sent(status, now);
    }
}

impl Reload {
    /// When the new generation must be ready, or is rolled back.
    pub(super) fn deadline(&self) -> Instant {
        self.canary.as_ref().map_or(self.deadline, |c| c.deadline())
    }
}

/// The listeners a config asks for, in a form that compares.
fn listener_plan(c: &Config) -> Vec<(String, Option<String>, &'static str)> {
    c.listeners
        .iter()
        .map(|l| {
            (
                l.name.clone(),
                l.addr.as_ref().map(|a| a.to_string()),
                l.policy.name(),
            )
        })
        .collect()
}

impl Supervisor {
    /// Start a reload (SIGHUP or `sockvisor reload`). An error means it was refused and the
    /// running fleet is untouched.
    /// `canary`: start with that many canary workers (`reload --canary N`; `None`: the new
    /// configuration's `canary_workers`).
    pub(super) fn reload(
        &mut self,
        now: Instant,
        waiter: Option<Waiter>,
        canary: Option<usize>,
    ) -> Result<(), String> {
        if self.stopping() {
            return Err("sockvisor is stopping".to_string());
        }
        self.refuse_while_draining()?;
        if let (Some(r), Some(_)) = (&self.reload, canary) {
            return Err(format!(
                "generation {} is being rolled out; ask for a canary once it is over",
                r.generation
            ));
        }
        if let Some(r) = &self.reload {
            // One reload at a time. This request runs when the current one ends, reading
            // the configuration as it is then (an edit made meanwhile is applied); requests
            // made meanwhile are one reload.
            log::info!(
                "reload requested while generation {} is starting; it follows that one",
                r.generation
            );
            self.queued_reload
                .get_or_insert_with(Vec::new)
                .extend(waiter);
            return Ok(());
        }
        if self.phase == Phase::Running {
            self.upstream
                .reloading("reloading: reading the configuration");
        }
        let result = self.start_reload(now, canary);
        match result {
            Ok(()) => {
                self.reload
                    .as_mut()
                    .expect("reload started")
                    .waiters
                    .extend(waiter);
                Ok(())
            }
            Err(e) => {
                let status = format!("reload refused: {e}; {}", self.summary());
                log::error!("reload refused: {e}");
                self.observer.tally.reloaded(ReloadResult::Refused);
                self.reload_ended(status, now);
                Err(e)
            }
        }
    }

    /// The reload requested while the previous one ran.
    fn start_queued_reload(&mut self, waiters: Vec<Waiter>, now: Instant) {
        match self.reload(now, None, None) {
            Ok(()) => match self.reload.as_mut() {
                Some(r) => r.waiters.extend(waiters),
                None => self.queued_reload = Some(waiters),
            },
            Err(e) => self.answer_waiters(&waiters, Err(format!("reload refused: {e}"))),
        }
    }

    fn start_reload(&mut self, now: Instant, canary: Option<usize>) -> Result<(), String> {
        let new = match config::load(&self.sources) {
            Ok(Invocation::Run(c)) => *c,
            Ok(_) => return Err("the command line no longer runs a fleet".to_string()),
            Err(e) => return Err(e.to_string()),
        };
        if listener_plan(&new) != listener_plan(&self.config) {
            let why = if self.dispatch.listeners().any(|l| l.from_systemd) {
                "listeners come from systemd and cannot change without a restart (systemctl restart)"
            } else {
                "listeners cannot change on reload; restart sockvisor to apply them"
            };
            return Err(format!("the listeners changed: {why}"));
        }
        let command = spawn::Command::new(&new.command, new.user.as_deref(), new.group.as_deref())
            .map_err(|e| format!("command: {e}"))?;
        let canary_workers = canary.unwrap_or(new.canary.workers);
        if canary_workers > 0 {
            return self.start_canary(new, command, canary_workers, now);
        }
        let old_generation = self.generation;
        self.generation += 1;
        let workers = new.workers;
        let reload = Reload {
            generation: self.generation,
            old_config: std::mem::replace(&mut self.config, new),
            old_command: std::mem::replace(&mut self.command, command),
            old_generation,
            to_replace: (0..workers).collect(),
            starting: BTreeMap::new(),
            deadline: now + self.config.reload_timeout,
            started: now,
            waiters: Vec::new(),
            canary: None,
        };
        if workers > self.slots.len() {
            self.slots.resize_with(workers, Default::default);
        }
        self.dispatch
            .set_settings(super::dispatch_settings(&self.config));
        log::info!(
            "reload: starting generation {} ({} workers, surge {})",
            reload.generation,
            workers,
            self.config.reload_surge.max(1)
        );
        self.reload = Some(reload);
        self.dirty = true;
        Ok(())
    }

    /// Move the running reload forward: switch slots whose new worker is ready, start more
    /// new workers within the surge, finish or roll back.
    pub(super) fn advance_reload(&mut self, now: Instant) {
        if self.stopping() {
            let waiters = self.reload.take().map(|r| r.waiters).into_iter().flatten();
            let queued = self.queued_reload.take().into_iter().flatten();
            let all: Vec<Waiter> = waiters.chain(queued).collect();
            self.answer_waiters(&all, Err("sockvisor is stopping".to_string()));
            return;
        }
        self.advance_current_reload(now);
        if self.reload.is_none() {
            if let Some(waiters) = self.queued_reload.take() {
                self.start_queued_reload(waiters, now);
            }
        }
    }

    fn advance_current_reload(&mut self, now: Instant) {
        let Some(mut r) = self.reload.take() else {
            return;
        };
        if r.canary.is_some() {
            self.advance_canary(r, now);
            return;
        }
        let mut failure = None;
        for (slot, pid) in std::mem::take(&mut r.starting) {
            match self.workers.get(&pid) {
                None => {
                    failure = Some(format!(
                        "the new worker for slot {slot} exited before it was ready"
                    ))
                }
                Some(w) if w.ready() => self.switch_slot(slot, pid, r.generation, now),
                Some(_) => {
                    r.starting.insert(slot, pid);
                }
            }
        }
        if failure.is_none() && now >= r.deadline {
            failure = Some(format!(
                "generation {} was not ready within the reload timeout ({}s)",
                r.generation,
                self.config.reload_timeout.as_secs()
            ));
        }
        if let Some(why) = failure {
            self.roll_back(r, &why, now);
            return;
        }
        let surge = self.config.reload_surge.max(1);
        while r.starting.len() < surge {
            let Some(slot) = r.to_replace.pop_front() else {
                break;
            };
            match self.fork_worker(slot, now, false) {
                Some(pid) => {
                    r.starting.insert(slot, pid);
                }
                None => {
                    self.roll_back(r, "could not start a new worker", now);
                    return;
                }
            }
        }
        if r.starting.is_empty() && r.to_replace.is_empty() {
            self.finish_reload(r, now);
        } else {
            self.reload = Some(r);
        }
    }

    /// `pid` (new generation) is ready: it becomes the slot's worker; the old one drains.
    pub(super) fn switch_slot(&mut self, slot: usize, pid: Pid, generation: u64, now: Instant) {
        let old = self.slots[slot].current.replace(pid);
        self.slots[slot].restart_at = None;
        // A slot disabled by a fatal exit code serves again with the new generation.
        self.slots[slot].disabled = false;
        if let Some(old) = old.filter(|&o| o != pid) {
            self.retire(old, &format!("replaced by generation {generation}"), now);
        }
    }

    fn finish_reload(&mut self, r: Reload, now: Instant) {
        self.drop_slots_from(self.config.workers, "not in the new configuration", now);
        let took = now.saturating_duration_since(r.started).as_secs_f64();
        let message = format!("reloaded: generation {} serving ({took:.1}s)", r.generation);
        log::info!("{message}");
        self.observer.tally.reloaded(ReloadResult::Ok);
        if self.config.metrics_listen != r.old_config.metrics_listen {
            log::warn!("metrics_listen changed: it applies at the next start, not on reload");
        }
        let status = format!("{}; {}", message, self.summary());
        self.reload_ended(status, now);
        self.answer_waiters(&r.waiters, Ok(message));
        self.dirty = true;
    }

    /// The new generation failed: stop its workers and go back to the old configuration.
    /// Slots already switched get an old-generation worker again.
    fn roll_back(&mut self, r: Reload, why: &str, now: Instant) {
        log::error!(
            "reload failed: {why}; rolling back to generation {}",
            r.old_generation
        );
        for pid in r.starting.values() {
            self.retire(*pid, "its generation is rolled back", now);
        }
        self.config = r.old_config;
        self.dispatch
            .set_settings(super::dispatch_settings(&self.config));
        self.command = r.old_command;
        self.generation = r.old_generation;
        let old_count = self.config.workers;
        let switched: Vec<(usize, Pid)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.current.map(|p| (i, p)))
            .filter(|(_, p)| {
                self.workers
                    .get(p)
                    .is_some_and(|w| w.generation == r.generation)
            })
            .collect();
        for (slot, pid) in switched {
            self.retire(pid, "its generation is rolled back", now);
            self.slots[slot].current = None;
            if slot < old_count {
                self.start_slot(slot, now);
            }
        }
        self.drop_slots_from(old_count, "its generation is rolled back", now);
        self.observer.tally.reloaded(ReloadResult::RolledBack);
        let message = format!("reload failed: {why}; generation {} kept", r.old_generation);
        let status = format!("{message}; {}", self.summary());
        self.reload_ended(status, now);
        self.answer_waiters(&r.waiters, Err(message));
        self.dirty = true;
    }
}
