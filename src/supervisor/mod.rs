//! The supervisor: one event loop (epoll + signalfd + timerfd) that owns the fleet.
//!
//! This file is the loop, top to bottom: `Supervisor::run` waits, turns every event into
//! state changes (`Supervisor::handle_event`; signals are only queued), then
//! `Supervisor::manage` acts once per wake-up on what is due, and the timer is armed for
//! the next deadline (`Supervisor::next_deadline`). The other files hold verbs:
//! - `lifecycle`: fork, reap, stop and restart workers; scale; the fleet's stop and give-up;
//! - `reload`: reload in generations, rollback;
//! - `health`: workers' notifications, readiness, worker watchdogs, the upstream watchdog;
//! - `status` and `commands`: summaries, and requests from the control socket;
//! - `messages`: signals and messages for workers (the router is `crate::messages`);
//! - `fleet`: the worker table; `backoff`: restart delays.
//!
//! Connections are not handled here: the [`Dispatcher`] owns listeners, channels and
//! pending connections; the supervisor tells it what happens to the fleet.

mod backoff;
mod canary;
mod checks;
mod commands;
mod drain;
mod fleet;
mod health;
mod lifecycle;
mod messages;
mod observe;
mod orphans;
mod recycle;
mod reload;
mod status;

use crate::activation;
use crate::config::{Config, Sources};
use crate::dispatch::{Dispatcher, Settings};
use crate::notify_server::NotifyServer;
use crate::poller::{self, Poller, Token};
use crate::spawn;
use crate::upstream::Upstream;
use fleet::{Slot, Worker};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// The signals sockvisor handles; blocked in `main` before anything else runs.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        set.add(s);
    }
    set
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The initial fleet is not ready yet: no `READY=1` upstream.
    Starting,
    Running,
    /// Stopping for good; the exit code is decided.
    Stopping {
        exit_code: i32,
    },
}

pub struct Supervisor {
    config: Config,
    /// Where the config came from, re-read on reload.
    sources: Sources,
    /// The reload in progress.
    reload: Option<reload::Reload>,
    /// A reload requested while one ran, and who waits for it.
    queued_reload: Option<Vec<reload::Waiter>>,
    command: spawn::Command,
    dispatch: Dispatcher,
    /// Live workers (not yet reaped), by pid.
    workers: BTreeMap<Pid, Worker>,
    slots: Vec<Slot>,
    generation: u64,
    phase: Phase,
    notify: NotifyServer,
    control: Option<crate::control::ControlServer>,
    upstream: Upstream,
    poller: Poller,
    signals: SignalFd,
    timer: TimerFd,
    /// The deadline the timer is armed for.
    armed: Option<Instant>,
    /// Signals read but not handled yet.
    queued_signals: VecDeque<Signal>,
    /// Something changed that `manage` must look at even if no deadline passed.
    dirty: bool,
    health: health::HealthState,
    status: status::StatusState,
    /// Processes workers left behind, being stopped.
    orphans: orphans::Orphans,
    /// Active health checks of each worker.
    checks: checks::ActiveChecks,
    /// The workers' message sockets (`messages = true`).
    messages: crate::messages::Router,
    /// Why the fleet is stopping, kept at the end of `STATUS=` until sockvisor exits (so
    /// `systemctl status` still says why after a give-up).
    stop_reason: Option<String>,
    /// What dispatch made of the last failed worker (a program accepting on a channel),
    /// repeated in `STATUS=` and at give-up until the slots start up again.
    diagnosis: Option<String>,
    /// Metrics, probes and the reasons workers ended (observe.rs).
    observer: observe::Observer,
    /// In `drain_delay` after SIGTERM: the stop is due then (drain.rs).
    drain_until: Option<Instant>,
    /// Workers being replaced for their memory (recycle.rs).
    recycler: recycle::Recycler,
}

/// Why the supervisor could not start; `main` prints it and exits with `exit_code`.
#[derive(Debug)]
pub struct StartError {
    pub message: String,
    pub exit_code: i32,
}

fn internal(what: &str, e: impl std::fmt::Display) -> StartError {
    StartError {
        message: format!("{what}: {e}"),
        exit_code: crate::exit::INTERNAL,
    }
}

fn config_error(message: String) -> StartError {
    StartError {
        message,
        exit_code: crate::exit::CONFIG,
    }
}

/// What the dispatch owners take from the config (a reload may change it).
fn dispatch_settings(config: &Config) -> Settings {
    Settings {
        window: config.window,
        wedged_after: config.wedged_after,
    }
}

impl Supervisor {
    pub fn new(
        config: Config,
        sources: Sources,
        passed: Vec<(OwnedFd, String)>,
        upstream: Upstream,
    ) -> Result<Supervisor, StartError> {
        let command = spawn::Command::new(
            &config.command,
            config.user.as_deref(),
            config.group.as_deref(),
        )
        .map_err(|e| config_error(format!("command: {e}")))?;
        let listeners = activation::listeners(passed, &config.listeners, config.dispatch)
            .map_err(|e| config_error(e.to_string()))?;
        if listeners.len() > poller::MAX_LISTENERS {
            return Err(config_error(format!(
                "{} listeners: at most {} are supported",
                listeners.len(),
                poller::MAX_LISTENERS
            )));
        }
        spawn::raise_fd_limit();
        orphans::become_subreaper();
        let worker_gid = command.credentials().map(|c| c.gid);
        let notify = NotifyServer::bind_for_workers(worker_gid)
            .map_err(|e| internal("cannot bind the workers' notify socket", e))?;
        let control = match &config.control_socket {
            None => None,
            Some(path) => match crate::control::ControlServer::bind(path) {
                Ok(c) => Some(c),
                Err(e) if config.control_socket_explicit => {
                    return Err(config_error(format!(
                        "control socket {}: {e}",
                        path.display()
                    )))
                }
                Err(e) => {
                    log::warn!(
                        "no control socket (sockvisor status/reload/scale will not reach this fleet): {}: {e}",
                        path.display()
                    );
                    None
                }
            },
        };
        let poller = Poller::new().map_err(|e| internal("epoll", e))?;
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
        )
        .map_err(|e| internal("signalfd", e))?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(|e| internal("timerfd", e))?;
        let mut fds = vec![
            (signals.as_fd(), Token::Signal),
            (timer.as_fd(), Token::Timer),
            (notify.as_fd(), Token::Notify),
        ];
        if let Some(c) = &control {
            fds.push((c.as_fd(), Token::Control));
        }
        let http = match config.metrics_listen {
            None => None,
            Some(addr) => {
                let h = crate::observe::http::HttpServer::bind(addr).map_err(|e| {
                    config_error(format!("metrics_listen: cannot listen on {addr}: {e}"))
                })?;
                h.register(&poller).map_err(|e| internal("epoll", e))?;
                let local = h
                    .local_addr()
                    .map_err(|e| internal("metrics listener", e))?;
                log::info!("metrics listening on {local} (GET /metrics, /livez, /readyz)");
                Some(h)
            }
        };
        for (fd, token) in fds {
            poller
                .register(fd, token)
                .map_err(|e| internal("epoll", e))?;
        }
        let dispatch =
            Dispatcher::new(listeners, dispatch_settings(&config)).map_err(config_error)?;
        for l in dispatch.listeners() {
            log::info!(
                "listening on {} ({}, {}{})",
                l.address,
                l.name,
                l.policy.name(),
                if l.from_systemd { ", from systemd" } else { "" }
            );
        }
        // Checked again now that systemd's sockets are known (the config assumed one).
        crate::config::check_worker_count(config.workers, dispatch.per_worker_listeners())
            .map_err(|e| config_error(format!("workers: {e}")))?;
        if let Some(auto) = &config.workers_auto {
            log::info!("workers: {} (auto: {auto})", config.workers);
        }
        let slots = (0..config.workers).map(|_| Slot::default()).collect();
        Ok(Supervisor {
            config,
            sources,
            reload: None,
            queued_reload: None,
            command,
            dispatch,
            workers: BTreeMap::new(),
            slots,
            generation: 1,
            phase: Phase::Starting,
            notify,
            control,
            upstream,
            poller,
            signals,
            timer,
            armed: None,
            queued_signals: VecDeque::new(),
            dirty: true,
            health: health::HealthState::default(),
            status: status::StatusState::default(),
            orphans: orphans::Orphans::default(),
            checks: checks::ActiveChecks::default(),
            messages: crate::messages::Router::default(),
            diagnosis: None,
            stop_reason: None,
            observer: observe::Observer::new(http),
            drain_until: None,
            recycler: recycle::Recycler::default(),
        })
    }

    /// Start the fleet and run until it stops. Returns the exit code.
    pub fn run(mut self) -> i32 {
        let now = Instant::now();
        self.dispatch.start(&self.poller);
        self.health.start(&self.upstream, now);
        for slot in 0..self.slots.len() {
            self.start_slot(slot, now);
        }
        let mut events = poller::event_buffer();
        let mut tokens = Vec::new();
        loop {
            let now = Instant::now();
            self.manage(now);
            if let Phase::Stopping { exit_code } = self.phase {
                if self.workers.is_empty() && self.stop_orphans(now) == 0 && self.orphans.is_empty()
                {
                    self.finish();
                    return exit_code;
                }
            }
            self.arm_timer(now);
            match self.poller.wait(&mut events, &mut tokens) {
                Ok(()) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("epoll_wait failed: {e}; stopping");
                    self.stop(crate::exit::INTERNAL, "internal error");
                    continue;
                }
            }
            for &token in &tokens {
                self.handle_event(token);
            }
        }
    }

    fn handle_event(&mut self, token: Token) {
        match token {
            Token::Signal => {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                        self.queued_signals.push_back(sig);
                    }
                }
                self.dirty = true;
            }
            Token::Timer => {
                let _ = self.timer.wait();
                self.armed = None;
                self.dirty = true;
            }
            Token::Notify => self.read_notifications(),
            Token::Control => self.serve_control(),
            Token::Probe(pid) => self.probe_event(pid),
            Token::Messages(pid) => self.route_messages(pid),
            Token::HttpListener => self.http_accept(),
            Token::HttpClient(id) => self.http_ready(id),
            Token::Exec(pid) => self.exec_reported(pid),
            Token::Listener(_) | Token::Channel { .. } => {
                let now = Instant::now();
                self.dispatch.handle(token, &self.poller, now);
                self.replace_troubled(None, now);
            }
        }
    }

    /// Act on everything due: signals, exits, deadlines, restarts, health, status.
    fn manage(&mut self, now: Instant) {
        if !self.dirty && self.armed.is_some_and(|a| now < a) {
            return;
        }
        self.dirty = false;
        while let Some(sig) = self.queued_signals.pop_front() {
            self.handle_signal(sig, now);
        }
        // Read what workers said before reaping them: a worker's last words (STOPPING=1)
        // must not arrive after it is forgotten.
        self.read_notifications();
        self.reap(now);
        self.drain_due(now);
        self.expire_http(now);
        self.enforce_deadlines(now);
        self.restart_due(now);
        self.advance_reload(now);
        self.recycle_workers(now);
        self.replace_troubled(Some(now), now);
        self.tick_checks(now);
        self.dispatch.flush(&self.poller, now);
        self.check_fleet();
        self.tick_health(now);
        self.refresh_status(now);
    }

    fn handle_signal(&mut self, sig: Signal, now: Instant) {
        match sig {
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => self.stop_signal(sig, now),
            Signal::SIGCHLD => {} // reaped right after
            Signal::SIGTTIN | Signal::SIGTTOU => {
                let n = if sig == Signal::SIGTTIN {
                    self.slots.len() + 1
                } else {
                    self.slots.len().saturating_sub(1)
                };
                if let Err(e) = self.scale(n, now) {
                    log::warn!("{} ignored: {e}", sig.as_str());
                }
            }
            Signal::SIGHUP => {
                if let Err(e) = self.reload(now, None, None) {
                    log::warn!("reload (SIGHUP) refused: {e}");
                }
            }
            _ => {}
        }
    }

    /// The earliest moment something is due.
    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let workers = self.workers.values().map(Worker::deadline);
        let slots = self.slots.iter().map(|s| s.restart_at);
        let reload = self.reload.as_ref().map(|r| r.deadline());
        let checks = self
            .checks
            .next_deadline(|pid| self.workers.get(&pid).is_some_and(|w| w.ready()));
        workers
            .chain(slots)
            .chain([
                self.dispatch.next_deadline(now),
                self.health.next_deadline(),
                self.status.next_deadline(),
                self.orphans.next_deadline(),
                reload,
                checks,
                self.drain_until,
                self.recycler.next_deadline(),
                self.observer.http.as_ref().and_then(|h| h.next_deadline()),
            ])
            .flatten()
            .min()
    }

    /// Arm the timer for the earliest deadline (only when it changed: one syscall saved per
    /// wake-up on the busy dispatch path).
    fn arm_timer(&mut self, now: Instant) {
        let next = self.next_deadline(now);
        if next == self.armed {
            return;
        }
        self.armed = next;
        let result = match next {
            None => self.timer.unset(),
            Some(at) => {
                let after = at
                    .saturating_duration_since(now)
                    .max(Duration::from_micros(50));
                self.timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(after)),
                    TimerSetTimeFlags::empty(),
                )
            }
        };
        if let Err(e) = result {
            log::error!("timerfd_settime failed: {e}");
        }
    }

    fn stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }
}

/// Run a fleet until it stops; returns the process exit code.
pub fn run(
    config: Config,
    sources: Sources,
    passed: Vec<(OwnedFd, String)>,
    upstream: Upstream,
) -> i32 {
    match Supervisor::new(config, sources, passed, upstream) {
        Ok(s) => s.run(),
        Err(e) => {
            log::error!("{}", e.message);
            e.exit_code
        }
    }
}
