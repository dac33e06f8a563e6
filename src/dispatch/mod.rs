//! Dispatch: how new connections reach workers, one owner per listener.
//!
//! Every listener has one [`ListenerDispatch`], chosen by its policy:
//! - [`handoff::Handoff`] (round-robin, ip-hash, least-connections): sockvisor accepts and
//!   hands each connection to a worker over that worker's channel ([`channel`]); it owns the
//!   listener, the channels, the ready set, the windows and the pending queue. Needs workers
//!   that speak the channel protocol (docs/protocol.md).
//! - [`reuseport::steered::Steered`] (`reuseport`, and `auto` where it can run): every
//!   worker gets its own listener in one `SO_REUSEPORT` group and an eBPF program picks the
//!   next ready worker for each connection. Any program serves; sockvisor is out of the
//!   per-connection path.
//! - [`shared::Shared`]: every worker gets the listening socket itself and accepts (or reads
//!   datagrams) on it; the kernel picks who wakes up.
//!
//! The supervisor tells the owner what happens to the fleet (a worker is added, gets ready,
//! is told to leave, is gone) and passes it the events of its fds; the owner never calls back
//! into the supervisor. What the supervisor must act on (a worker whose channel broke, a
//! wedged worker) is collected as [`Trouble`] and read by the supervisor.
//!
//! A worker is added in two steps, because its fds must exist before `fork` and its pid only
//! after: [`Dispatcher::stage_worker`] prepares what the next worker gets at every listener's
//! position, [`Dispatcher::staged_fds`] lends them to `spawn`, then
//! [`Dispatcher::commit_worker`] (forked) or [`Dispatcher::discard_staged`] (fork failed).

pub mod channel;
pub mod handoff;
pub mod policy;
pub mod probe;
pub mod reuseport;
pub mod shared;
pub(crate) mod sys;

pub use channel::{Channel, Reports, SendError};
pub use policy::{Candidate, Policy};
pub use probe::ProbeConn;

use crate::activation::Listener;
use crate::config::DispatchPolicy;
use crate::poller::{Poller, Token};
use nix::unistd::Pid;
use std::io;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

/// The worker a dispatch owner is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerRef {
    pub pid: Pid,
    /// `SOCKVISOR_WORKER_ID`: stable across restarts; round-robin order and the ip-hash key.
    pub slot: usize,
    pub generation: u64,
    /// Its weight in (smooth weighted) round robin: its generation's `weight`.
    pub weight: u32,
}

/// A canary's share of new connections (`reload --canary`): the workers of `generation`
/// together get `permille` of them, the rest of the fleet the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub generation: u64,
    /// 0..=1000.
    pub permille: u32,
    /// By client address (sticky: a client's bucket, [`policy::client_bucket`], decides)
    /// rather than by weight (smooth weighted round robin between the two groups).
    pub by_client: bool,
}

/// Settings that a reload may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Connections a worker's channel may hold (not yet received by the worker).
    pub window: usize,
    /// A worker whose channel queue has not moved for this long is wedged.
    pub wedged_after: Duration,
}

/// Something about a worker that the supervisor must act on: the worker cannot take
/// connections any more and must be replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    pub pid: Pid,
    /// For the log: `its channel is closed`, `wedged: ...`.
    pub reason: String,
    /// SIGABRT (a hung worker: a core dump helps) rather than SIGTERM.
    pub hung: bool,
}

/// Per-listener figures for `status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListenerFigures {
    /// Connections accepted, where sockvisor accepts (`None`: the workers accept).
    pub accepted: Option<u64>,
    /// New connections the kernel steered into the listener's `SO_REUSEPORT` group, as the
    /// group's eBPF program counted them (reuseport streams; `None` elsewhere): counted when
    /// the kernel picks a listener for a connection request, before the worker accepts it.
    pub steered: Option<u64>,
    /// Connections waiting for a worker: accepted by sockvisor (channel policies), or queued
    /// on the anchor (reuseport).
    pub pending: u64,
    /// Connections taken back from workers that left or died and given to others.
    pub reclaimed: u64,
}

/// Per-worker figures for `status`, summed over listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WorkerFigures {
    pub dispatched: u64,
    /// Connections sent and not yet received.
    pub queued: u64,
    /// Connections it holds open, if it sends close reports.
    pub open: Option<u64>,
}

impl WorkerFigures {
    fn add(&mut self, other: WorkerFigures) {
        self.dispatched += other.dispatched;
        self.queued += other.queued;
        self.open = match (self.open, other.open) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
}

/// One listener's dispatch (see the module docs). Methods a policy has no use for keep
/// their empty default.
pub trait ListenerDispatch {
    fn listener(&self) -> &Listener;
    /// Prepare what the next worker gets at this listener's position.
    fn stage_worker(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// The fd the staged worker gets.
    fn staged_fd(&self) -> BorrowedFd<'_>;
    /// The staged worker was forked as `worker`.
    fn commit_worker(&mut self, _worker: WorkerRef, _poller: &Poller, _now: Instant) {}
    /// The staged worker was not forked.
    fn discard_staged(&mut self) {}
    /// Start polling what sockvisor accepts on.
    fn start(&mut self, _poller: &Poller) {}
    /// The worker may receive connections.
    fn worker_ready(&mut self, _pid: Pid) {}
    /// A ready worker leaves the rotation (`false`: an active health check failed; it gets
    /// no new connection but stays ready and keeps what it holds) or comes back (`true`).
    /// Workers start in the rotation.
    fn set_in_rotation(&mut self, _pid: Pid, _in_rotation: bool) {}
    /// Share new connections between a canary generation and the rest (`None`: by weight
    /// alone).
    fn set_split(&mut self, _split: Option<Split>) {}
    /// A connection that reaches `pid` alone, for an active health check: `None` when this
    /// listener has no such path (shared, datagrams).
    fn open_probe(&mut self, _pid: Pid) -> Option<io::Result<ProbeConn>> {
        None
    }
    /// The probe opened with that route is over (its socket is closed or about to be).
    fn close_probe(&mut self, _route: u16) {}
    /// The worker receives nothing more; connections queued to it that it has not received
    /// are taken back. Returns how many.
    fn worker_leaving(&mut self, _pid: Pid) -> usize {
        0
    }
    /// The worker exited: release what was kept for it, taking back its queue. Returns how
    /// many connections were taken back.
    fn worker_gone(&mut self, _pid: Pid, _poller: &Poller) -> usize {
        0
    }
    /// Why a worker that failed may have failed, as far as dispatch can tell (a program that
    /// never took a connection from its channel probably accepts on fd 3 itself).
    fn diagnose(&self, _pid: Pid) -> Option<String> {
        None
    }
    /// Its listener is readable.
    fn listener_readable(&mut self, _poller: &Poller, _now: Instant) {}
    /// A worker's channel is readable (close reports).
    fn channel_readable(&mut self, _pid: Pid, _poller: &Poller) {}
    /// Hand what is pending to workers with room; poll the listener again when nothing is.
    fn flush(&mut self, _poller: &Poller, _now: Instant) {}
    /// When [`ListenerDispatch::flush`] or a wedge check is due.
    fn next_deadline(&self, _now: Instant) -> Option<Instant> {
        None
    }
    /// Look for wedged workers.
    fn check_wedged(&mut self, _now: Instant, _troubles: &mut Vec<Trouble>) {}
    /// Troubles found since the last call.
    fn take_troubles(&mut self, _troubles: &mut Vec<Trouble>) {}
    /// Stop for good: accept nothing more, hand what is pending to ready workers, close the
    /// rest. Returns how many pending connections were closed.
    fn stop(&mut self, _poller: &Poller) -> usize {
        0
    }
    fn set_settings(&mut self, _settings: Settings) {}
    fn figures(&self) -> ListenerFigures {
        ListenerFigures::default()
    }
    fn worker_figures(&self, _pid: Pid) -> WorkerFigures {
        WorkerFigures::default()
    }
}

/// Every listener's dispatch owner, in `LISTEN_FDS` order.
pub struct Dispatcher {
    listeners: Vec<Box<dyn ListenerDispatch>>,
}

impl Dispatcher {
    /// Every listener's owner. `auto` becomes `reuseport` where it can run and `shared`
    /// elsewhere (the reason goes to the log and to `status`); an explicit `reuseport` that
    /// cannot run is an error.
    pub fn new(listeners: Vec<Listener>, settings: Settings) -> Result<Dispatcher, String> {
        let mut owners: Vec<Box<dyn ListenerDispatch>> = Vec::with_capacity(listeners.len());
        for (index, mut listener) in listeners.into_iter().enumerate() {
            let asked = listener.policy;
            let owner: Box<dyn ListenerDispatch> = match asked {
                DispatchPolicy::Shared => Box::new(shared::Shared::new(listener)),
                DispatchPolicy::Auto | DispatchPolicy::Reuseport => {
                    listener.policy = DispatchPolicy::Reuseport;
                    match reuseport::steered::Steered::try_new(index, listener, settings) {
                        Ok(s) => Box::new(s),
                        Err((listener, why)) if asked == DispatchPolicy::Reuseport => {
                            return Err(format!(
                                "listener {:?}: dispatch reuseport cannot run: {why}; use dispatch = \"shared\" (or auto) to serve without it",
                                listener.name
                            ));
                        }
                        Err((mut listener, why)) => {
                            log::warn!("{}: dispatch shared, not reuseport: {why}", listener.name);
                            listener.policy = DispatchPolicy::Shared;
                            listener.policy_note = Some(format!("not reuseport: {why}"));
                            Box::new(shared::Shared::new(listener))
                        }
                    }
                }
                _ => Box::new(handoff::Handoff::new(index, listener, settings)),
            };
            owners.push(owner);
        }
        Ok(Dispatcher { listeners: owners })
    }

    pub fn listeners(&self) -> impl Iterator<Item = &Listener> + '_ {
        self.listeners.iter().map(|l| l.listener())
    }

    /// Listeners that cost sockvisor fds per worker (all but `shared`): what bounds the
    /// worker count (`config::max_workers`).
    pub fn per_worker_listeners(&self) -> usize {
        self.listeners()
            .filter(|l| l.policy != DispatchPolicy::Shared)
            .count()
    }

    /// `LISTEN_FDNAMES` for workers.
    pub fn fd_names(&self) -> String {
        self.listeners()
            .map(|l| l.name.as_str())
            .collect::<Vec<_>>()
            .join(":")
    }

    pub fn start(&mut self, poller: &Poller) {
        for l in &mut self.listeners {
            l.start(poller);
        }
    }

    pub fn stage_worker(&mut self) -> io::Result<()> {
        for l in &mut self.listeners {
            if let Err(e) = l.stage_worker() {
                self.discard_staged();
                return Err(e);
            }
        }
        Ok(())
    }

    /// The staged worker's fds, in `LISTEN_FDS` order.
    pub fn staged_fds(&self) -> Vec<BorrowedFd<'_>> {
        self.listeners.iter().map(|l| l.staged_fd()).collect()
    }

    pub fn commit_worker(&mut self, worker: WorkerRef, poller: &Poller, now: Instant) {
        for l in &mut self.listeners {
            l.commit_worker(worker, poller, now);
        }
    }

    pub fn discard_staged(&mut self) {
        for l in &mut self.listeners {
            l.discard_staged();
        }
    }

    pub fn worker_ready(&mut self, pid: Pid) {
        for l in &mut self.listeners {
            l.worker_ready(pid);
        }
    }

    pub fn worker_leaving(&mut self, pid: Pid) -> usize {
        self.listeners
            .iter_mut()
            .map(|l| l.worker_leaving(pid))
            .sum()
    }

    pub fn worker_gone(&mut self, pid: Pid, poller: &Poller) -> usize {
        self.listeners
            .iter_mut()
            .map(|l| l.worker_gone(pid, poller))
            .sum()
    }

    pub fn set_in_rotation(&mut self, pid: Pid, in_rotation: bool) {
        for l in &mut self.listeners {
            l.set_in_rotation(pid, in_rotation);
        }
    }

    pub fn set_split(&mut self, split: Option<Split>) {
        for l in &mut self.listeners {
            l.set_split(split);
        }
    }

    /// A probe connection to `pid` through the first listener that can reach it alone, with
    /// that listener's index (for [`Dispatcher::close_probe`]); `None` when no listener can.
    pub fn open_probe(&mut self, pid: Pid) -> Option<(usize, io::Result<ProbeConn>)> {
        self.listeners
            .iter_mut()
            .enumerate()
            .find_map(|(i, l)| l.open_probe(pid).map(|r| (i, r)))
    }

    pub fn close_probe(&mut self, listener: usize, route: u16) {
        if let Some(l) = self.listeners.get_mut(listener) {
            l.close_probe(route);
        }
    }

    /// Whether some listener can reach one worker alone (active health checks can run).
    pub fn can_probe(&self) -> bool {
        self.listeners.iter().any(|l| {
            let l = l.listener();
            l.policy.uses_channels()
                || (l.policy == DispatchPolicy::Reuseport
                    && l.kind == crate::activation::SocketKind::TcpListener)
        })
    }

    /// The first diagnosis any listener has for a failed worker.
    pub fn diagnose(&self, pid: Pid) -> Option<String> {
        self.listeners.iter().find_map(|l| l.diagnose(pid))
    }

    /// An event of one of the dispatch owners' fds.
    pub fn handle(&mut self, token: Token, poller: &Poller, now: Instant) {
        match token {
            Token::Listener(i) => {
                if let Some(l) = self.listeners.get_mut(i) {
                    l.listener_readable(poller, now);
                }
            }
            Token::Channel { listener, pid } => {
                if let Some(l) = self.listeners.get_mut(listener) {
                    l.channel_readable(pid, poller);
                }
            }
            _ => {}
        }
    }

    pub fn flush(&mut self, poller: &Poller, now: Instant) {
        for l in &mut self.listeners {
            l.flush(poller, now);
        }
    }

    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        self.listeners
            .iter()
            .filter_map(|l| l.next_deadline(now))
            .min()
    }

    /// Workers to replace: broken channels, and wedged workers when `now` is given.
    pub fn troubles(&mut self, now: Option<Instant>) -> Vec<Trouble> {
        let mut out = Vec::new();
        for l in &mut self.listeners {
            l.take_troubles(&mut out);
            if let Some(now) = now {
                l.check_wedged(now, &mut out);
            }
        }
        out
    }

    pub fn stop(&mut self, poller: &Poller) -> usize {
        self.listeners.iter_mut().map(|l| l.stop(poller)).sum()
    }

    pub fn set_settings(&mut self, settings: Settings) {
        for l in &mut self.listeners {
            l.set_settings(settings);
        }
    }

    /// Whether any listener is one sockvisor accepts on.
    pub fn accepts(&self) -> bool {
        self.listeners
            .iter()
            .any(|l| l.figures().accepted.is_some())
    }

    pub fn figures(&self) -> impl Iterator<Item = (&Listener, ListenerFigures)> + '_ {
        self.listeners.iter().map(|l| (l.listener(), l.figures()))
    }

    pub fn worker_figures(&self, pid: Pid) -> WorkerFigures {
        let mut sum = WorkerFigures::default();
        for l in &self.listeners {
            sum.add(l.worker_figures(pid));
        }
        sum
    }
}
