//! `reuseport`: the kernel steers. Every worker gets its own listener (UDP: socket) at its
//! listener's fd position, in one `SO_REUSEPORT` group with the anchor (the socket systemd
//! passed, or the one sockvisor bound), and our program ([`SteeredGroup`]) picks the next
//! ready worker for each new connection (each UDP flow by its hash). An unmodified program
//! accepts on fd 3 as it would under systemd; sockvisor is out of the per-connection path
//! and only edits the schedule when the ready set changes. docs/reuseport.md has the
//! measurements behind every rule below.
//!
//! Rules (what keeps a connection from being lost or reset):
//! - The anchor is in the socket array from the start and is never scheduled: whatever the
//!   program cannot place (nobody ready, or an instant during a change) waits there, and is
//!   moved to a worker by *requeueing* the anchor (`shutdown(SHUT_RD)` + `listen`, which
//!   migrates its queue through the program) as soon as someone is ready, and whenever it
//!   is readable while someone is.
//! - sockvisor keeps its own copy of every worker listener. When a worker leaves (told to
//!   stop, `STOPPING=1`) its listener leaves the schedule; what is queued on it stays for it
//!   to drain (requeueing a listener a live program accepts on fails its `accept()`). A
//!   wedged worker's listener is requeued at once: its queue goes to the ready workers. When
//!   a worker is gone sockvisor's copy is the last reference: closing it migrates what is
//!   left, half-open handshakes included. A dead worker's queue is never left with nobody to
//!   accept it.
//! - At stop the schedule empties: new connections wait on the anchor (under systemd, for the
//!   next start); a draining worker keeps what is queued on its own listener.
//! - The program stays attached when sockvisor exits or dies: it holds its maps, and the
//!   group holds it, so the kernel keeps steering to the anchor until a new sockvisor
//!   attaches its own (a takeover: the anchor is still in the old socket array, `EBUSY`;
//!   requeueing it detaches it).
//! - UDP has no migration and no accept queue: with nobody ready, the starting workers are
//!   scheduled (their sockets buffer), and a leaving worker's unread datagrams are lost.

use super::bpf::AttachType;
use super::group::{Key, SteeredGroup};
use super::listener;
use crate::activation::{Listener, SocketKind};
use crate::dispatch::{
    ListenerDispatch, ListenerFigures, Settings, Trouble, WorkerFigures, WorkerRef,
};
use crate::poller::{Poller, Token};
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Keys for worker listeners: two generations of the largest fleet (a reload), with room.
const CAPACITY: u32 = 2 * crate::config::WORKERS_CEILING as u32;
/// How often worker listeners are checked for a wedged worker.
const WEDGE_CHECK: Duration = Duration::from_secs(1);

/// One worker's listener.
struct Member {
    worker: WorkerRef,
    key: Key,
    /// sockvisor's copy; the worker has it at its fd 3+i.
    listener: OwnedFd,
    ready: bool,
    leaving: bool,
    /// Connections it had taken (selected minus still queued) at the last wedge check, and
    /// when that last moved.
    received_at_check: u64,
    progress_at: Instant,
}

pub struct Steered {
    /// Position in `LISTEN_FDS`, for the anchor's epoll token.
    index: usize,
    /// The anchor: the socket systemd passed or sockvisor bound, for sockvisor's whole life.
    listener: Listener,
    group: SteeredGroup,
    datagram: bool,
    backlog: i32,
    members: BTreeMap<Pid, Member>,
    /// A listener made for the next worker, in the socket array, not scheduled.
    spare: Option<(Key, OwnedFd)>,
    free_keys: Vec<Key>,
    next_key: u32,
    /// Our program steers the group (false during a takeover, until the first worker is
    /// ready: the previous instance's program sends everything to the anchor meanwhile).
    attached: bool,
    /// The anchor is in epoll: only while the schedule is not empty (it is readable exactly
    /// when something waits on it that a ready worker could take).
    polling_anchor: bool,
    stopped: bool,
    settings: Settings,
    troubles: Vec<Trouble>,
    wedge_checked: Option<Instant>,
    /// Connections moved off the listeners of leaving or dead workers.
    taken_back: u64,
}

impl Steered {
    /// Set up the group around `listener`, or say why it cannot run (the caller falls back to
    /// `shared` and gets the listener back).
    pub fn try_new(
        index: usize,
        listener: Listener,
        settings: Settings,
    ) -> Result<Steered, (Listener, String)> {
        match Self::setup(&listener) {
            Ok((group, attached, spare, datagram)) => {
                let mut s = Steered {
                    index,
                    listener,
                    group,
                    datagram,
                    backlog: crate::activation::somaxconn(),
                    members: BTreeMap::new(),
                    spare: None,
                    free_keys: Vec::new(),
                    next_key: 2,
                    attached,
                    polling_anchor: false,
                    stopped: false,
                    settings,
                    troubles: Vec::new(),
                    wedge_checked: None,
                    taken_back: 0,
                };
                s.spare = Some((Key::worker(1).expect("1 is a worker key"), spare));
                Ok(s)
            }
            Err(why) => Err((listener, why)),
        }
    }

    fn setup(listener: &Listener) -> Result<(SteeredGroup, bool, OwnedFd, bool), String> {
        let anchor = listener.fd.as_fd();
        let datagram = match listener.kind {
            SocketKind::TcpListener => false,
            SocketKind::Udp => true,
            _ => return Err("unix sockets have no SO_REUSEPORT groups".into()),
        };
        let backlog = crate::activation::somaxconn();
        if datagram {
            // A UDP socket joins a group only if it had SO_REUSEPORT when it was bound.
            if !getsockopt(&anchor, sockopt::ReusePort).unwrap_or(false) {
                return Err(
                    "the UDP socket was bound without SO_REUSEPORT (add ReusePort=yes to the socket unit)"
                        .into(),
                );
            }
        } else {
            if !listener::is_listening(anchor).unwrap_or(false) {
                // A previous instance died between shutdown and listen of a requeue.
                nix::sys::socket::listen(
                    &anchor,
                    nix::sys::socket::Backlog::new(backlog)
                        .unwrap_or(nix::sys::socket::Backlog::MAXCONN),
                )
                .map_err(|e| format!("cannot listen on the socket again: {e}"))?;
            }
            // Allowed on a listening socket (systemd binds without it unless ReusePort=yes):
            // the anchor joins the group when the first sibling listens.
            listener::enable_reuseport(anchor)
                .map_err(|e| format!("cannot set SO_REUSEPORT on the socket: {e}"))?;
        }
        let group =
            SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).map_err(|e| e.to_string())?;
        // The first worker listener also proves that sockvisor may join the group: the
        // kernel refuses a socket of another uid than the anchor's.
        let first = listener::sibling(anchor, backlog).map_err(|e| {
            if e.raw_os_error() == Some(libc::EADDRINUSE) {
                format!(
                    "sockvisor runs as uid {} but the socket was bound by another user (run sockvisor as the socket's user: the service's User= must match the socket unit's)",
                    nix::unistd::geteuid()
                )
            } else {
                format!("cannot open a worker listener beside the socket: {e}")
            }
        })?;
        let attached = match group.insert(Key::ANCHOR, anchor) {
            Ok(()) => {
                group
                    .attach(anchor)
                    .map_err(|e| format!("cannot attach the program: {e}"))?;
                true
            }
            // A previous sockvisor's program still steers (to the anchor): take over when
            // the first worker is ready.
            Err(e) if e.errno == libc::EBUSY => {
                log::info!(
                    "{}: a previous instance's program steers this socket; it is replaced when the first worker is ready",
                    listener.name
                );
                false
            }
            Err(e) => return Err(format!("cannot put the socket in the program's map: {e}")),
        };
        let key = Key::worker(1).expect("1 is a worker key");
        group
            .insert(key, first.as_fd())
            .map_err(|e| format!("cannot put a worker listener in the program's map: {e}"))?;
        if attached && !datagram {
            // What the kernel's hash put on it before the program was attached.
            let _ = listener::requeue(first.as_fd(), backlog);
            let _ = group.insert(key, first.as_fd());
        }
        Ok((group, attached, first, datagram))
    }

    fn new_key(&mut self) -> Option<Key> {
        if let Some(k) = self.free_keys.pop() {
            return Some(k);
        }
        let k = Key::worker(self.next_key).filter(|k| k.get() <= CAPACITY)?;
        self.next_key += 1;
        Some(k)
    }

    /// Give the kernel the current schedule: the ready workers by (slot, generation), or for
    /// UDP with nobody ready, every worker that is not leaving.
    fn reschedule(&mut self, poller: Option<&Poller>) {
        if self.stopped {
            return;
        }
        let mut ready: Vec<(usize, u64, Pid, Key)> = self
            .members
            .values()
            .filter(|m| m.ready && !m.leaving)
            .map(|m| (m.worker.slot, m.worker.generation, m.worker.pid, m.key))
            .collect();
        if ready.is_empty() && self.datagram {
            ready = self
                .members
                .values()
                .filter(|m| !m.leaving)
                .map(|m| (m.worker.slot, m.worker.generation, m.worker.pid, m.key))
                .collect();
        }
        ready.sort();
        let keys: Vec<Key> = ready.iter().map(|r| r.3).collect();
        let was_empty = self.group.schedule_len() == 0;
        if let Err(e) = self.group.set_ready(&keys) {
            log::error!("{}: cannot update the schedule: {e}", self.listener.name);
            return;
        }
        if keys.is_empty() {
            self.stop_polling_anchor(poller);
            return;
        }
        if !self.attached {
            match self.group.attach(self.listener.fd.as_fd()) {
                Ok(()) => {
                    self.attached = true;
                    log::info!(
                        "{}: took over steering from the previous instance",
                        self.listener.name
                    );
                }
                Err(e) => log::error!("{}: cannot attach the program: {e}", self.listener.name),
            }
        }
        if was_empty && !self.datagram {
            self.requeue_anchor();
        }
        if let Some(poller) = poller {
            self.poll_anchor(poller);
        }
    }

    /// Move what waits on the anchor to the ready workers.
    fn requeue_anchor(&mut self) {
        if let Err(e) = self
            .group
            .requeue(Key::ANCHOR, self.listener.fd.as_fd(), self.backlog)
        {
            log::warn!(
                "{}: cannot move the connections waiting on the socket to the workers: {e}",
                self.listener.name
            );
        }
    }

    fn poll_anchor(&mut self, poller: &Poller) {
        if self.polling_anchor || self.datagram {
            return;
        }
        match poller.register(self.listener.fd.as_fd(), Token::Listener(self.index)) {
            Ok(()) => self.polling_anchor = true,
            Err(e) => log::error!("{}: cannot poll the socket: {e}", self.listener.name),
        }
    }

    fn stop_polling_anchor(&mut self, poller: Option<&Poller>) {
        if let (true, Some(poller)) = (self.polling_anchor, poller) {
            poller.unregister(self.listener.fd.as_fd());
            self.polling_anchor = false;
        }
    }

    fn queued_on(&self, listener: BorrowedFd<'_>) -> u64 {
        if self.datagram {
            return 0;
        }
        listener::queue_depth(listener).map_or(0, |d| u64::from(d.queued))
    }

    /// Move what is queued on a member's listener to the program's choice. Returns how many.
    fn requeue_member(&mut self, pid: Pid) -> u64 {
        let Some(m) = self.members.get(&pid) else {
            return 0;
        };
        if self.datagram {
            return 0;
        }
        let moved = self.queued_on(m.listener.as_fd());
        if let Err(e) = self.group.requeue(m.key, m.listener.as_fd(), self.backlog) {
            log::warn!(
                "worker {} (pid {pid}): cannot move the connections queued on its listener: {e}",
                m.worker.slot
            );
        }
        self.taken_back += moved;
        moved
    }

    fn selected(&self, key: Key) -> u64 {
        self.group
            .counters(key)
            .map_or(0, |c| c.dispatched + c.migrated)
    }
}

impl ListenerDispatch for Steered {
    fn listener(&self) -> &Listener {
        &self.listener
    }

    fn stage_worker(&mut self) -> io::Result<()> {
        if self.spare.is_some() {
            return Ok(());
        }
        let key = self
            .new_key()
            .ok_or_else(|| io::Error::other("no free key in the program's map"))?;
        let made = listener::sibling(self.listener.fd.as_fd(), self.backlog).and_then(|l| {
            self.group
                .insert(key, l.as_fd())
                .map_err(io::Error::from)
                .map(|()| l)
        });
        match made {
            Ok(l) => {
                self.spare = Some((key, l));
                Ok(())
            }
            Err(e) => {
                self.free_keys.push(key);
                Err(e)
            }
        }
    }

    fn staged_fd(&self) -> BorrowedFd<'_> {
        self.spare
            .as_ref()
            .expect("stage_worker before staged_fd")
            .1
            .as_fd()
    }

    fn commit_worker(&mut self, worker: WorkerRef, _poller: &Poller, now: Instant) {
        let Some((key, listener)) = self.spare.take() else {
            return;
        };
        self.members.insert(
            worker.pid,
            Member {
                worker,
                key,
                listener,
                ready: false,
                leaving: false,
                received_at_check: 0,
                progress_at: now,
            },
        );
        if self.datagram {
            // With nobody ready, starting UDP workers are scheduled (module docs).
            self.reschedule(None);
        }
    }

    // discard_staged: the spare listener is kept for the next worker.

    fn worker_ready(&mut self, pid: Pid) {
        if let Some(m) = self.members.get_mut(&pid) {
            m.ready = true;
            self.reschedule(None);
        }
    }

    /// Out of the schedule. What is already queued on its listener stays for it: a program
    /// that drains on SIGTERM (or after its `STOPPING=1`) accepts it, and requeueing a
    /// listener a live program accepts on would fail its `accept()` with `EINVAL`. What it
    /// leaves moves when it is gone (or at once if it is wedged: `check_wedged`).
    fn worker_leaving(&mut self, pid: Pid) -> usize {
        let Some(m) = self.members.get_mut(&pid) else {
            return 0;
        };
        if m.leaving {
            return 0;
        }
        m.leaving = true;
        m.ready = false;
        self.reschedule(None);
        0
    }

    fn worker_gone(&mut self, pid: Pid, _poller: &Poller) -> usize {
        let Some(m) = self.members.remove(&pid) else {
            return 0;
        };
        self.reschedule(None);
        // sockvisor's copy is the last reference: closing it migrates what is queued on it,
        // and the half-open handshakes when they complete, to the ready workers (or to the
        // anchor when nobody is ready; at stop, to the anchor for the next start).
        let moved = self.queued_on(m.listener.as_fd());
        self.taken_back += moved;
        drop(m.listener);
        self.free_keys.push(m.key);
        moved as usize
    }

    fn start(&mut self, poller: &Poller) {
        if self.group.schedule_len() > 0 {
            self.poll_anchor(poller);
        }
    }

    fn listener_readable(&mut self, poller: &Poller, _now: Instant) {
        if self.group.schedule_len() == 0 || self.stopped {
            self.stop_polling_anchor(Some(poller));
            return;
        }
        self.requeue_anchor();
    }

    fn flush(&mut self, poller: &Poller, _now: Instant) {
        // Keep epoll in step with the schedule (ready changes arrive without a poller).
        if self.group.schedule_len() > 0 && !self.stopped {
            self.poll_anchor(poller);
        } else {
            self.stop_polling_anchor(Some(poller));
        }
    }

    fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let any = !self.datagram && self.members.values().any(|m| m.ready);
        any.then(|| self.wedge_checked.map_or(now, |t| t + WEDGE_CHECK))
    }

    /// A ready worker whose listener holds connections and has taken none of them for
    /// `wedged_after` is wedged: out of the schedule, its queue to the others.
    fn check_wedged(&mut self, now: Instant, troubles: &mut Vec<Trouble>) {
        if self.datagram || self.wedge_checked.is_some_and(|t| now < t + WEDGE_CHECK) {
            return;
        }
        self.wedge_checked = Some(now);
        let wedged_after = self.settings.wedged_after;
        let mut wedged = Vec::new();
        for (&pid, m) in &self.members {
            if !m.ready {
                continue;
            }
            let queued = self.queued_on(m.listener.as_fd());
            let received = self.selected(m.key).saturating_sub(queued);
            wedged.push((pid, queued, received));
        }
        for (pid, queued, received) in wedged {
            let Some(m) = self.members.get_mut(&pid) else {
                continue;
            };
            if queued == 0 || received != m.received_at_check {
                m.received_at_check = received;
                m.progress_at = now;
            } else if now.saturating_duration_since(m.progress_at) >= wedged_after {
                // Out of the schedule, and its queue to the others now: it is not accepting.
                m.ready = false;
                m.leaving = true;
                self.reschedule(None);
                self.requeue_member(pid);
                troubles.push(Trouble {
                    pid,
                    reason: format!(
                        "wedged: {queued} connections waiting on its listener, none accepted for {}s",
                        wedged_after.as_secs()
                    ),
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
        if let Err(e) = self.group.set_ready(&[]) {
            log::warn!("{}: cannot empty the schedule: {e}", self.listener.name);
        }
        self.stop_polling_anchor(Some(poller));
        0
    }

    fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    fn figures(&self) -> ListenerFigures {
        ListenerFigures {
            accepted: None,
            pending: self.queued_on(self.listener.fd.as_fd()),
            reclaimed: self.taken_back,
        }
    }

    fn worker_figures(&self, pid: Pid) -> WorkerFigures {
        self.members
            .get(&pid)
            .map(|m| WorkerFigures {
                dispatched: self.selected(m.key),
                queued: self.queued_on(m.listener.as_fd()),
                open: None,
            })
            .unwrap_or_default()
    }
}
