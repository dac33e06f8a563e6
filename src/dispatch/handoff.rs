//! Hand-off: sockvisor accepts on the listener and hands each connection to a worker over
//! that worker's channel (round-robin, ip-hash, least-connections). The model is Node's
//! `RoundRobinHandle`: one object owns the listener, the workers' channels, which of them are
//! ready, and the queue of connections no worker could take yet.
//!
//! Invariant (lib.rs, 5): an accepted connection is in `pending_connections`, or in exactly
//! one worker's channel, or owned by a worker. A channel of a worker that is leaving or gone
//! is read back ([`Channel::reclaim`]) into the front of `pending_connections`.
//!
//! Backpressure: a worker takes a connection only while its channel holds fewer than
//! `window`. When no ready worker has room, the connection waits in `pending_connections`
//! and the listener leaves epoll, so the kernel backlog absorbs the burst; the pending queue
//! is retried every `PENDING_RETRY` and on every [`ListenerDispatch::flush`].

use super::policy::client_bucket;
use super::{
    probe, Candidate, Channel, ListenerDispatch, ListenerFigures, Policy, ProbeConn, SendError,
    Settings, Split, Trouble, WorkerFigures, WorkerRef,
};
use crate::activation::Listener;
use crate::config::DispatchPolicy;
use crate::logging::Throttle;
use crate::poller::{Poller, Token};
use nix::errno::Errno;
use nix::sys::socket::{accept4, getpeername, SockFlag, SockaddrStorage};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often full channels are re-checked while connections are pending.
const PENDING_RETRY: Duration = Duration::from_millis(2);
/// Connections accepted per wake-up, so one busy listener cannot starve the rest of the loop.
const ACCEPT_BATCH: usize = 64;
/// Accepting pauses this long after EMFILE/ENFILE/ENOBUFS/ENOMEM instead of spinning.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
/// Transient send failures are logged at most this often.
const SEND_FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often channels are checked for wedged workers.
const WEDGE_CHECK: Duration = Duration::from_secs(1);

/// One worker's channel, with its counters.
struct WorkerChannel {
    worker: WorkerRef,
    channel: Channel,
    /// May receive connections (ready, and not leaving).
    ready: bool,
    /// Not taken out by a failed active health check.
    in_rotation: bool,
    /// Connections sent on this channel.
    dispatched: u64,
    /// Connections taken back from it unreceived (it was leaving or wedged).
    taken_back: u64,
    /// Connections the worker reported closed (least-connections).
    reported_closed: u64,
    /// Whether it ever sent a close report.
    reports: bool,
    /// Queue depth as last read with FIONREAD, plus what was sent since: an upper bound of
    /// the real depth, so the FIONREAD is needed only when this reaches the window.
    queued_bound: usize,
    /// `received` at the last wedge check, and when it last moved.
    received_at_check: u64,
    progress_at: Instant,
}

impl WorkerChannel {
    /// Read the real queue depth and tighten the bound.
    fn refresh_queued(&mut self) -> usize {
        self.queued_bound = self.channel.queued();
        self.queued_bound
    }

    /// Connections the worker took from its channel, given what is still queued in it.
    fn received(&self, queued: usize) -> u64 {
        self.dispatched
            .saturating_sub(self.taken_back)
            .saturating_sub(queued as u64)
    }

    fn open(&self) -> Option<u64> {
        self.reports
            .then(|| self.received(0).saturating_sub(self.reported_closed))
    }
}

pub struct Handoff {
    /// Position in `LISTEN_FDS`, for epoll tokens.
    index: usize,
    listener: Listener,
    choice: Policy,
    settings: Settings,
    /// Every live worker's channel, by pid.
    channels: BTreeMap<Pid, WorkerChannel>,
    /// The channel of the worker about to be forked.
    staged: Option<Channel>,
    /// Accepted connections no worker could take yet (a leaving worker's queue lands here).
    pending_connections: VecDeque<OwnedFd>,
    /// The listener is in epoll. Not while connections are pending, nor during a pause.
    polling: bool,
    /// Accepting paused (out of fds or memory) until then.
    paused_until: Option<Instant>,
    stopped: bool,
    accepted: u64,
    /// Connections taken back from leaving or dead workers.
    reclaimed: u64,
    troubles: Vec<Trouble>,
    wedge_checked: Option<Instant>,
    /// Transient send failures (`ETOOMANYREFS`, `ENOMEM`): logged now and then.
    send_failures: Throttle,
    /// A canary's share, and the smooth weighted round robin between the canary (`[0]`)
    /// and the rest (`[1]`) when it is by weight.
    split: Option<Split>,
    split_current: [i64; 2],
    /// Scratch buffers reused for every connection.
    candidates: Vec<Candidate>,
    order: Vec<usize>,
}

fn peer_ip(conn: &OwnedFd) -> Option<IpAddr> {
    let addr: SockaddrStorage = getpeername(conn.as_raw_fd()).ok()?;
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

/// Put what a channel still holds back at the front of `pending`, in its original order.
fn take_back(channel: &Channel, pending: &mut VecDeque<OwnedFd>) -> usize {
    let conns = channel.reclaim();
    let n = conns.len();
    for conn in conns.into_iter().rev() {
        pending.push_front(conn);
    }
    n
}

impl Handoff {
    pub fn new(index: usize, listener: Listener, settings: Settings) -> Handoff {
        Handoff {
            index,
            choice: Policy::new(listener.policy),
            listener,
            settings,
            channels: BTreeMap::new(),
            staged: None,
            pending_connections: VecDeque::new(),
            polling: false,
            paused_until: None,
            stopped: false,
            accepted: 0,
            reclaimed: 0,
            troubles: Vec::new(),
            wedge_checked: None,
            send_failures: Throttle::new(SEND_FAILURE_LOG_INTERVAL),
            split: None,
            split_current: [0; 2],
            candidates: Vec::new(),
            order: Vec::new(),
        }
    }

    /// What a worker that never took a connection from its channel is probably doing wrong.
    fn wrong_mode_hint(&self) -> String {
        format!(
            "it never took a connection from fd {} ({}), a sockvisor channel under dispatch {}: a program that calls accept() or listen() on its socket needs --dispatch reuseport (or shared); only workers that speak the channel protocol work with {}",
            3 + self.index,
            self.listener.name,
            self.listener.policy.name(),
            self.listener.policy.name()
        )
    }

    fn reports_close(&self) -> bool {
        self.choice.kind() == DispatchPolicy::LeastConnections
    }

    fn pause(&mut self, poller: &Poller) {
        if self.polling {
            self.polling = false;
            poller.unregister(self.listener.fd.as_fd());
        }
    }

    fn resume(&mut self, poller: &Poller) {
        if self.polling {
            return;
        }
        match poller.register(self.listener.fd.as_fd(), Token::Listener(self.index)) {
            Ok(()) => {
                self.polling = true;
                self.paused_until = None;
            }
            Err(e) => log::error!("{}: cannot poll the listener: {e}", self.listener.name),
        }
    }

    /// The canary group this connection goes to (`Some(true)`: the canary generation's
    /// workers, `Some(false)`: the others), or `None` without a split or while one group
    /// has nobody in the rotation.
    fn pick_group(&mut self, peer: Option<IpAddr>) -> Option<bool> {
        let split = self.split?;
        let serving = |canary: bool| {
            self.channels.values().any(|c| {
                c.ready && c.in_rotation && (c.worker.generation == split.generation) == canary
            })
        };
        if !serving(true) || !serving(false) {
            return None;
        }
        if split.by_client {
            // No address (unix sockets): the old fleet.
            return Some(peer.is_some_and(|ip| client_bucket(ip) < split.permille));
        }
        let p = i64::from(split.permille.min(1000));
        self.split_current[0] += p;
        self.split_current[1] += 1000 - p;
        let canary = self.split_current[0] > self.split_current[1];
        self.split_current[usize::from(!canary)] -= 1000;
        Some(canary)
    }

    /// Give `conn` to a worker chosen by the split and the policy; hand it back if none can
    /// take it now. A connection whose group has no room goes to the other group rather
    /// than wait.
    fn hand_off(&mut self, conn: OwnedFd) -> Result<(), OwnedFd> {
        let peer = match (self.choice.kind(), self.split) {
            (DispatchPolicy::IpHash, _) => peer_ip(&conn),
            (_, Some(s)) if s.by_client => peer_ip(&conn),
            _ => None,
        };
        let group = self.pick_group(peer);
        let conn = match self.hand_off_to(conn, peer, group) {
            Ok(()) => return Ok(()),
            Err(conn) => conn,
        };
        match group {
            Some(g) => self.hand_off_to(conn, peer, Some(!g)),
            None => Err(conn),
        }
    }

    /// [`Handoff::hand_off`] within one group (`None`: every worker).
    fn hand_off_to(
        &mut self,
        conn: OwnedFd,
        peer: Option<IpAddr>,
        group: Option<bool>,
    ) -> Result<(), OwnedFd> {
        let window = self.settings.window;
        let report_close = self.reports_close();
        let canary_generation = self.split.map(|s| s.generation);
        self.candidates.clear();
        for c in self
            .channels
            .values_mut()
            .filter(|c| c.ready && c.in_rotation)
        {
            if let Some(g) = group {
                if (Some(c.worker.generation) == canary_generation) != g {
                    continue;
                }
            }
            let queued = if report_close {
                c.refresh_queued()
            } else {
                c.queued_bound
            };
            self.candidates.push(Candidate {
                slot: c.worker.slot,
                key: c.worker.pid.as_raw() as u64,
                queued,
                open: c.open(),
                weight: c.worker.weight,
            });
        }
        self.choice.order(&self.candidates, peer, &mut self.order);
        let mut conn = conn;
        for &i in &self.order {
            let candidate = self.candidates[i];
            let pid = Pid::from_raw(candidate.key as i32);
            let Some(c) = self.channels.get_mut(&pid) else {
                continue;
            };
            if c.queued_bound >= window && c.refresh_queued() >= window {
                continue;
            }
            match c.channel.send(conn, report_close) {
                Ok(()) => {
                    c.dispatched += 1;
                    c.queued_bound += 1;
                    self.choice.chose(&candidate);
                    return Ok(());
                }
                Err((back, err)) => {
                    conn = back;
                    match err {
                        SendError::Full => c.queued_bound = window,
                        SendError::Transient(e) => {
                            if self.send_failures.hit(Instant::now()) {
                                log::warn!(
                                    "worker {} (pid {pid}): send failed: {e}; trying another worker ({} such failures so far)",
                                    c.worker.slot,
                                    self.send_failures.count
                                );
                            }
                        }
                        SendError::Closed(e) => {
                            // It cannot take connections any more: the supervisor replaces it.
                            c.ready = false;
                            self.troubles.push(Trouble {
                                pid,
                                reason: format!("its channel is closed ({e})"),
                                hung: false,
                            });
                        }
                    }
                }
            }
        }
        Err(conn)
    }
}

impl ListenerDispatch for Handoff {
    fn listener(&self) -> &Listener {
        &self.listener
    }

    fn stage_worker(&mut self) -> io::Result<()> {
        self.staged = Some(Channel::new().map_err(io::Error::from)?);
        Ok(())
    }

    fn staged_fd(&self) -> BorrowedFd<'_> {
        self.staged
            .as_ref()
            .expect("stage_worker before staged_fd")
            .worker_end()
    }

    fn commit_worker(&mut self, worker: WorkerRef, poller: &Poller, now: Instant) {
        let Some(channel) = self.staged.take() else {
            return;
        };
        if self.reports_close() {
            let token = Token::Channel {
                listener: self.index,
                pid: worker.pid,
            };
            if let Err(e) = poller.register(channel.sockvisor_end(), token) {
                log::error!("worker {}: cannot poll its channel: {e}", worker.slot);
            }
        }
        self.channels.insert(
            worker.pid,
            WorkerChannel {
                worker,
                channel,
                ready: false,
                in_rotation: true,
                dispatched: 0,
                taken_back: 0,
                reported_closed: 0,
                reports: false,
                queued_bound: 0,
                received_at_check: 0,
                progress_at: now,
            },
        );
    }

    fn discard_staged(&mut self) {
        self.staged = None;
    }

    fn start(&mut self, poller: &Poller) {
        self.resume(poller);
    }

    fn worker_ready(&mut self, pid: Pid) {
        if let Some(c) = self.channels.get_mut(&pid) {
            c.ready = true;
        }
    }

    /// Out of the rotation, what is queued in its channel and not received yet goes to the
    /// others (a worker answering errors would answer those with errors too).
    fn set_in_rotation(&mut self, pid: Pid, in_rotation: bool) {
        let Some(c) = self.channels.get_mut(&pid) else {
            return;
        };
        c.in_rotation = in_rotation;
        if !in_rotation && !self.stopped {
            let n = take_back(&c.channel, &mut self.pending_connections);
            self.reclaimed += n as u64;
        }
    }

    fn set_split(&mut self, split: Option<Split>) {
        if split != self.split {
            self.split_current = [0; 2];
        }
        self.split = split;
    }

    /// One end of a socket pair, handed over the worker's channel whatever its window (a
    /// probe must reach a busy worker too; only a full kernel queue refuses it).
    fn open_probe(&mut self, pid: Pid) -> Option<io::Result<ProbeConn>> {
        let c = self.channels.get_mut(&pid)?;
        Some((|| {
            let (ours, theirs) = probe::socket_pair()?;
            c.channel
                .send(
                    theirs,
                    self.choice.kind() == DispatchPolicy::LeastConnections,
                )
                .map_err(|(_, e)| match e {
                    SendError::Full => io::Error::other("its channel is full"),
                    SendError::Transient(e) | SendError::Closed(e) => io::Error::from(e),
                })?;
            c.dispatched += 1;
            c.queued_bound += 1;
            Ok(ours)
        })())
    }

    fn worker_leaving(&mut self, pid: Pid) -> usize {
        let Some(c) = self.channels.get_mut(&pid) else {
            return 0;
        };
        c.ready = false;
        // Each message is received once, by the worker or by us. Not at stop: nobody else
        // could take them then, and a worker drains its own channel on SIGTERM.
        if self.stopped {
            return 0;
        }
        let n = take_back(&c.channel, &mut self.pending_connections);
        c.taken_back += n as u64;
        self.reclaimed += n as u64;
        n
    }

    fn worker_gone(&mut self, pid: Pid, poller: &Poller) -> usize {
        let Some(c) = self.channels.remove(&pid) else {
            return 0;
        };
        poller.unregister(c.channel.sockvisor_end());
        let n = take_back(&c.channel, &mut self.pending_connections);
        self.reclaimed += n as u64;
        if self.stopped && n > 0 {
            let dropped = self.pending_connections.len();
            self.pending_connections.clear();
            log::warn!(
                "{}: closed {dropped} accepted connections: no worker is left to serve them",
                self.listener.name
            );
        }
        n
    }

    fn diagnose(&self, pid: Pid) -> Option<String> {
        let c = self.channels.get(&pid)?;
        (c.received(c.channel.queued()) == 0).then(|| self.wrong_mode_hint())
    }

    fn listener_readable(&mut self, poller: &Poller, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let conn = match accept4(self.listener.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR | Errno::ECONNABORTED | Errno::EPROTO | Errno::EPERM) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    log::warn!(
                        "{}: accept failed: {e}; pausing accepts for {} ms",
                        self.listener.name,
                        FD_EXHAUSTED_PAUSE.as_millis()
                    );
                    self.pause(poller);
                    self.paused_until = Some(now + FD_EXHAUSTED_PAUSE);
                    return;
                }
                Err(e) => {
                    log::error!("{}: accept failed: {e}", self.listener.name);
                    return;
                }
            };
            self.accepted += 1;
            if let Err(conn) = self.hand_off(conn) {
                self.pending_connections.push_back(conn);
                self.pause(poller);
                return;
            }
        }
    }

    fn channel_readable(&mut self, pid: Pid, poller: &Poller) {
        let Some(c) = self.channels.get_mut(&pid) else {
            return;
        };
        let r = c.channel.read_reports();
        c.reported_closed += r.closed;
        c.reports |= r.reports > 0;
        if r.hung_up {
            // The worker closed its end (it still runs, or SIGCHLD is on its way). Stop
            // listening for reports; its death is learned from SIGCHLD.
            poller.unregister(c.channel.sockvisor_end());
        }
    }

    fn flush(&mut self, poller: &Poller, now: Instant) {
        while let Some(conn) = self.pending_connections.pop_front() {
            if let Err(conn) = self.hand_off(conn) {
                self.pending_connections.push_front(conn);
                break;
            }
        }
        if !self.stopped
            && self.pending_connections.is_empty()
            && self.paused_until.is_none_or(|t| now >= t)
        {
            self.resume(poller);
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let retry = (!self.pending_connections.is_empty()).then(|| now + PENDING_RETRY);
        // A pause only matters for a listener that will be resumed.
        let resume = self
            .paused_until
            .filter(|_| !self.polling && self.pending_connections.is_empty() && !self.stopped);
        let wedge_check = self
            .channels
            .values()
            .any(|c| c.queued_bound > 0)
            .then(|| self.wedge_checked.map_or(now, |t| t + WEDGE_CHECK));
        [retry, resume, wedge_check].into_iter().flatten().min()
    }

    /// A worker whose channel queue has not moved for `wedged_after` while connections wait
    /// in it is wedged.
    fn check_wedged(&mut self, now: Instant, troubles: &mut Vec<Trouble>) {
        if self.wedge_checked.is_some_and(|t| now < t + WEDGE_CHECK) {
            return;
        }
        self.wedge_checked = Some(now);
        let wedged_after = self.settings.wedged_after;
        let hint = self.wrong_mode_hint();
        for c in self.channels.values_mut().filter(|c| c.ready) {
            let queued = c.refresh_queued();
            let received = c.received(queued);
            if queued == 0 || received != c.received_at_check {
                c.received_at_check = received;
                c.progress_at = now;
            } else if now.saturating_duration_since(c.progress_at) >= wedged_after {
                let mut reason = format!(
                    "wedged: {queued} connections waiting, none received for {}s",
                    wedged_after.as_secs()
                );
                if received == 0 {
                    reason = format!("{reason}; {}", hint);
                }
                troubles.push(Trouble {
                    pid: c.worker.pid,
                    reason,
                    hung: true,
                });
            }
        }
    }

    fn take_troubles(&mut self, troubles: &mut Vec<Trouble>) {
        troubles.append(&mut self.troubles);
    }

    fn stop(&mut self, poller: &Poller) -> usize {
        self.stopped = true;
        self.pause(poller);
        self.paused_until = None;
        self.flush(poller, Instant::now());
        // Under systemd, what was never accepted stays in the socket's backlog for the next
        // start; what was accepted and cannot be handed over is closed now, not after the
        // stop timeout.
        let dropped = self.pending_connections.len();
        if dropped > 0 {
            log::warn!(
                "{}: closed {dropped} accepted connections at stop: no worker had room for them",
                self.listener.name
            );
            self.pending_connections.clear();
        }
        dropped
    }

    fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    fn figures(&self) -> ListenerFigures {
        ListenerFigures {
            accepted: Some(self.accepted),
            steered: None,
            pending: self.pending_connections.len() as u64,
            reclaimed: self.reclaimed,
        }
    }

    fn worker_figures(&self, pid: Pid) -> WorkerFigures {
        self.channels
            .get(&pid)
            .map(|c| WorkerFigures {
                dispatched: c.dispatched,
                queued: c.channel.queued() as u64,
                open: c.open(),
            })
            .unwrap_or_default()
    }
}
