//! The supervisor: one event loop (epoll + signalfd + timerfd) that owns the fleet.
//!
//! One idea per file, all of them `impl Supervisor` blocks over the state declared here:
//! - `fleet`: the worker table (workers by pid, slots by `SOCKVISOR_WORKER_ID`);
//! - `lifecycle`: spawn, reap, murder, restart with backoff, stop (gunicorn's verbs);
//! - `dispatching`: accept and hand connections to workers, pending queue, backpressure;
//! - `health`: workers' notifications, readiness, worker watchdogs, the upstream watchdog;
//! - `status`: summaries for `STATUS=`, the log and the control socket.
//!
//! The loop: wait; turn every event into state changes (signals are only queued); then
//! `manage` once per wake-up acts on what is due.

mod backoff;
mod commands;
mod dispatching;
mod fleet;
mod health;
mod lifecycle;
mod reload;
mod status;

use crate::activation::{self, Listener};
use crate::config::{Config, DispatchPolicy, Sources};
use crate::dispatch::Policy;
use crate::spawn;
use crate::systemd::Upstream;
use crate::worker_notify::NotifyServer;
use fleet::{Slot, Worker};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

/// The signals sockvisor handles; blocked in `main` before anything else runs.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        set.add(s);
    }
    set
}

// epoll tokens. Channel tokens carry the worker's pid and the listener index.
const TOKEN_SIGNAL: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const TOKEN_NOTIFY: u64 = 3;
const TOKEN_CONTROL: u64 = 4;
const TOKEN_LISTENER: u64 = 1 << 16;
const TOKEN_CHANNEL: u64 = 1 << 40;

fn channel_token(pid: nix::unistd::Pid, listener: usize) -> u64 {
    TOKEN_CHANNEL | (pid.as_raw() as u64) << 8 | listener as u64
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

/// A listener and its dispatch state.
struct ListenerState {
    listener: Listener,
    policy: Policy,
    /// Accepted connections no worker could take yet (a dead worker's queue lands here too).
    pending_connections: VecDeque<OwnedFd>,
    /// Registered in epoll. Not while pending connections wait, nor during an EMFILE pause.
    polling: bool,
    /// Accepting paused (EMFILE) until then.
    resume_at: Option<Instant>,
    accepted: u64,
}

impl ListenerState {
    fn dispatched(&self) -> bool {
        self.listener.policy != DispatchPolicy::Shared
    }
}

pub struct Supervisor {
    config: Config,
    /// Where the config came from, re-read on reload.
    sources: Sources,
    /// The reload in progress.
    reload: Option<reload::Reload>,
    command: spawn::Command,
    listeners: Vec<ListenerState>,
    /// Live workers (not yet reaped), by pid.
    workers: BTreeMap<i32, Worker>,
    slots: Vec<Slot>,
    /// Workers that may receive connections, ordered by slot: rebuilt when the fleet changes.
    ready_workers: Vec<nix::unistd::Pid>,
    generation: u64,
    phase: Phase,
    notify: NotifyServer,
    control: Option<crate::control::ControlServer>,
    upstream: Upstream,
    epoll: Epoll,
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
    /// Scratch buffers reused on the dispatch path.
    order_buf: Vec<usize>,
    candidates_buf: Vec<crate::dispatch::Candidate>,
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

/// Raise the soft fd limit to the hard one: every worker costs sockvisor a few fds (its
/// channel ends), and every connection in flight one.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                log::debug!("could not raise RLIMIT_NOFILE from {soft} to {hard}: {e}");
            }
        }
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
        raise_fd_limit();
        let worker_gid = command.credentials().map(|c| c.gid);
        let notify = NotifyServer::bind_private(worker_gid)
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
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| internal("epoll", e))?;
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
        let ev = |token| EpollEvent::new(EpollFlags::EPOLLIN, token);
        epoll
            .add(signals.as_fd(), ev(TOKEN_SIGNAL))
            .map_err(|e| internal("epoll", e))?;
        epoll
            .add(timer.as_fd(), ev(TOKEN_TIMER))
            .map_err(|e| internal("epoll", e))?;
        epoll
            .add(notify.as_fd(), ev(TOKEN_NOTIFY))
            .map_err(|e| internal("epoll", e))?;
        if let Some(c) = &control {
            epoll
                .add(c.as_fd(), ev(TOKEN_CONTROL))
                .map_err(|e| internal("epoll", e))?;
        }
        let listeners: Vec<ListenerState> = listeners
            .into_iter()
            .map(|listener| ListenerState {
                policy: Policy::new(listener.policy),
                listener,
                pending_connections: VecDeque::new(),
                polling: false,
                resume_at: None,
                accepted: 0,
            })
            .collect();
        for l in &listeners {
            log::info!(
                "listening on {} ({}, {}{})",
                l.listener.address,
                l.listener.name,
                l.listener.policy.name(),
                if l.listener.from_systemd {
                    ", from systemd"
                } else {
                    ""
                }
            );
        }
        let slots = (0..config.workers).map(|_| Slot::default()).collect();
        Ok(Supervisor {
            config,
            sources,
            reload: None,
            command,
            listeners,
            workers: BTreeMap::new(),
            slots,
            ready_workers: Vec::new(),
            generation: 1,
            phase: Phase::Starting,
            notify,
            control,
            upstream,
            epoll,
            signals,
            timer,
            armed: None,
            queued_signals: VecDeque::new(),
            dirty: true,
            health: health::HealthState::default(),
            status: status::StatusState::default(),
            order_buf: Vec::new(),
            candidates_buf: Vec::new(),
        })
    }

    /// Start the fleet and run until it stops. Returns the exit code.
    pub fn run(mut self) -> i32 {
        let now = Instant::now();
        for i in 0..self.listeners.len() {
            if self.listeners[i].dispatched() {
                self.resume_listener(i);
            }
        }
        self.health.start(&self.upstream, now);
        for slot in 0..self.slots.len() {
            self.spawn(slot, now);
        }
        let mut events = vec![EpollEvent::empty(); 64];
        loop {
            let now = Instant::now();
            self.manage(now);
            if let Phase::Stopping { exit_code } = self.phase {
                if self.workers.is_empty() {
                    self.finish();
                    return exit_code;
                }
            }
            self.arm_timer(now);
            let n = match self.epoll.wait(&mut events, EpollTimeout::NONE) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    log::error!("epoll_wait failed: {e}; stopping");
                    self.stop(crate::exit::INTERNAL, "internal error");
                    continue;
                }
            };
            for ev in &events[..n] {
                self.handle_event(ev.data());
            }
        }
    }

    fn handle_event(&mut self, token: u64) {
        match token {
            TOKEN_SIGNAL => {
                while let Ok(Some(info)) = self.signals.read_signal() {
                    if let Ok(sig) = Signal::try_from(info.ssi_signo as i32) {
                        self.queued_signals.push_back(sig);
                    }
                }
                self.dirty = true;
            }
            TOKEN_TIMER => {
                let _ = self.timer.wait();
                self.armed = None;
                self.dirty = true;
            }
            TOKEN_NOTIFY => self.read_notifications(),
            TOKEN_CONTROL => self.serve_control(),
            t if t >= TOKEN_CHANNEL => {
                let pid = ((t & !TOKEN_CHANNEL) >> 8) as i32;
                let listener = (t & 0xff) as usize;
                self.read_close_reports(pid, listener);
            }
            t if t >= TOKEN_LISTENER => self.accept((t - TOKEN_LISTENER) as usize),
            _ => {}
        }
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

    fn register(&self, fd: impl AsFd, token: u64) {
        if let Err(e) = self
            .epoll
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
        {
            log::error!("epoll_ctl(ADD) failed: {e}");
        }
    }

    fn unregister(&self, fd: impl AsFd) {
        let _ = self.epoll.delete(fd);
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
