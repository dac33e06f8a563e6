//! The supervisor's side of observability (src/observe/): the metrics listener's events,
//! the readiness rule applied to the fleet, the snapshot a scrape renders, and why each
//! worker ended (the `reason` of `sockvisor_worker_restarts_total`).
//!
//! OOM kills: a worker killed by SIGKILL that sockvisor did not send is an OOM kill when its
//! cgroup's OOM-kill counter (v2 `memory.events`, v1 `memory.oom_control`: workers share
//! sockvisor's cgroup) moved since the last kill attributed to the OOM killer; else a kill
//! by someone else (`signal`). Each counted kill is attributed once, so two workers killed
//! by one OOM event are both `oom`, and a third SIGKILL is not. A process of the cgroup
//! that is not a worker (an orphan, sockvisor itself is never killed and still here) being
//! OOM-killed at the same moment as a worker's SIGKILL from elsewhere is the one case
//! misread.

use super::fleet::{Departure, Worker};
use super::Supervisor;
use crate::cgroup::OomCounter;
use crate::observe::http::{HttpServer, Request};
use crate::observe::metrics::{self, EndReason, ListenerSnapshot, SlotSnapshot, Snapshot, Tally};
use crate::observe::{probes, process};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use std::time::Instant;

/// What the supervisor keeps for observability.
#[derive(Default)]
pub(super) struct Observer {
    pub(super) http: Option<HttpServer>,
    pub(super) tally: Tally,
    oom: Option<OomCounter>,
    /// OOM kills already attributed (or counted before sockvisor started).
    oom_seen: u64,
}

impl Observer {
    pub(super) fn new(http: Option<HttpServer>) -> Observer {
        let oom = OomCounter::of_this_process();
        let oom_seen = oom.as_ref().and_then(OomCounter::read).unwrap_or(0);
        match &oom {
            Some(c) => log::debug!("OOM kills are read from {}", c.path().display()),
            None => log::debug!("no cgroup OOM-kill counter: OOM kills read as signal"),
        }
        Observer {
            http,
            tally: Tally::default(),
            oom,
            oom_seen,
        }
    }

    /// Whether a SIGKILL that sockvisor did not send was the OOM killer's (module docs).
    fn oom_killed(&mut self) -> bool {
        let Some(now) = self.oom.as_ref().and_then(OomCounter::read) else {
            return false;
        };
        if now > self.oom_seen {
            self.oom_seen += 1;
            return true;
        }
        false
    }
}

impl Supervisor {
    /// Why `worker` ended with `status`, for a restart of its slot.
    pub(super) fn end_reason(&mut self, worker: &Worker, status: WaitStatus) -> EndReason {
        if let Some(r) = worker.failure {
            return r;
        }
        match status {
            WaitStatus::Signaled(_, Signal::SIGKILL, _)
                if worker.departure() != Some(Departure::Failed) && self.observer.oom_killed() =>
            {
                EndReason::Oom
            }
            WaitStatus::Signaled(..) => EndReason::Signal,
            _ => EndReason::Exit,
        }
    }

    /// `fleet_status`'s state, and `sockvisor_state`'s.
    pub(super) fn state_name(&self) -> &'static str {
        match self.phase {
            _ if self.stopping() => "stopping",
            _ if self.drain_until.is_some() => "draining",
            super::Phase::Starting => "starting",
            _ if self.reload.is_some() => "reloading",
            _ => "running",
        }
    }

    /// What `/readyz` and `status --check` answer. A worker counts when it is ready and, with
    /// active health checks, in the rotation (its checks pass).
    pub(super) fn readiness(&self, now: Instant) -> Result<(), String> {
        let wanted = self.slots.len();
        let serving = self
            .workers
            .values()
            .filter(|w| w.ready())
            .filter(|w| {
                !self
                    .checks
                    .figures(w.pid)
                    .is_some_and(|c| c.out_of_rotation)
            })
            .count();
        probes::readiness(probes::Fleet {
            starting: self.phase == super::Phase::Starting,
            stopping: self.stopping(),
            draining: self.drain_until.map(|t| t.saturating_duration_since(now)),
            ready_workers: serving,
            needed: self.config.min_ready.unwrap_or(wanted).min(wanted),
        })
    }

    /// Everything a scrape shows.
    pub(super) fn snapshot(&self, now: Instant) -> Snapshot {
        let mut s = Snapshot {
            generation: self.generation,
            state: self.state_name(),
            ready: self.readiness(now).is_ok(),
            workers_wanted: self.slots.len(),
            healthy_workers: self.healthy_workers(now),
            min_healthy: self.config.min_healthy,
            watchdog: self.health.watchdog_snapshot(),
            http: self.observer.http.as_ref().map(HttpServer::figures),
            process: process::this_process(),
            ..Snapshot::default()
        };
        for w in self.workers.values() {
            *s.workers.entry(w.state_name()).or_default() += 1;
        }
        let mut counted = false;
        for (l, f) in self.dispatch.figures() {
            counted |= f.accepted.is_some() || f.steered.is_some();
            s.listeners.push(ListenerSnapshot {
                name: l.name.clone(),
                accepted: f.accepted.or(f.steered),
                pending: f.pending,
                reclaimed: f.reclaimed,
            });
        }
        s.slots = (0..self.slots.len())
            .map(|i| {
                let current = self.slots[i].current.and_then(|p| self.workers.get(&p));
                let mut slot = SlotSnapshot {
                    up: current.is_some_and(Worker::ready),
                    resident_bytes: current.and_then(|w| process::resident_bytes(w.pid.as_raw())),
                    ..SlotSnapshot::default()
                };
                if counted {
                    let (mut dispatched, mut queued) = (self.observer.tally.dispatched_gone(i), 0);
                    for w in self.workers.values().filter(|w| w.slot == i) {
                        let f = self.dispatch.worker_figures(w.pid);
                        dispatched += f.dispatched;
                        queued += f.queued;
                    }
                    slot.dispatched = Some(dispatched);
                    slot.queued = Some(queued);
                    slot.open = current.and_then(|w| self.dispatch.worker_figures(w.pid).open);
                }
                slot
            })
            .collect();
        s.add_tally(&self.observer.tally);
        s
    }

    /// The text of `sockvisor metrics` and of `GET /metrics`.
    pub(super) fn metrics_text(&self, now: Instant, openmetrics: bool) -> String {
        metrics::render(self.snapshot(now), openmetrics)
    }

    /// The metrics listener is readable.
    pub(super) fn http_accept(&mut self) {
        let now = Instant::now();
        if let Some(h) = self.observer.http.as_mut() {
            h.accept(&self.poller, now);
        }
    }

    /// A metrics connection is readable or writable: answer its request once complete.
    pub(super) fn http_ready(&mut self, id: u32) {
        let Some(request) = self
            .observer
            .http
            .as_mut()
            .and_then(|h| h.ready(id, &self.poller))
        else {
            return;
        };
        let (status, content_type, body) = self.http_answer(&request, Instant::now());
        if let Some(h) = self.observer.http.as_mut() {
            h.respond(
                &request,
                &self.poller,
                status,
                content_type,
                body.as_bytes(),
            );
        }
    }

    fn http_answer(&self, request: &Request, now: Instant) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        match request.path.as_str() {
            "/metrics" => (
                200,
                metrics::content_type(request.openmetrics),
                self.metrics_text(now, request.openmetrics),
            ),
            "/livez" => (200, TEXT, "ok\n".to_string()),
            "/readyz" => match self.readiness(now) {
                Ok(()) => (200, TEXT, "ready\n".to_string()),
                Err(why) => (503, TEXT, format!("not ready: {why}\n")),
            },
            _ => (
                404,
                TEXT,
                "not found: try /metrics, /livez or /readyz\n".to_string(),
            ),
        }
    }

    /// Close metrics connections past their deadline.
    pub(super) fn expire_http(&mut self, now: Instant) {
        if let Some(h) = self.observer.http.as_mut() {
            h.expire(now, &self.poller);
        }
    }
}
