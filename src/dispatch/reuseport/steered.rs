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
    probe, ListenerDispatch, ListenerFigures, ProbeConn, Settings, Split, Trouble, WorkerFigures,
    WorkerRef,
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
    /// Not taken out by a failed active health check.
    in_rotation: bool,
    /// Connections it had taken (selected minus still queued) at the last wedge check, and
    /// when that last moved.
    received_at_check: u64,
    progress_at: Instant,
    /// What the program had counted for its key before it joined: keys are reused, and the
    /// program's counters never reset.
    selected_before: u64,
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
    /// A canary's share (weights are then scaled so the canary's members get it).
    split: Option<Split>,
}

/// Why a worker listener cannot bind beside `anchor`.
fn cannot_join(anchor: BorrowedFd<'_>, e: &io::Error) -> String {
    if e.raw_os_error() == Some(libc::EACCES) {
        return format!(
            "cannot open a worker listener beside the socket: {e} (a port below \
             net.ipv4.ip_unprivileged_port_start needs CAP_NET_BIND_SERVICE, also in the unit's \
             CapabilityBoundingSet=)"
        );
    }
    if e.raw_os_error() != Some(libc::EADDRINUSE) {
        return format!("cannot open a worker listener beside the socket: {e}");
    }
    let me = nix::unistd::geteuid().as_raw();
    match listener::owner_uid(anchor) {
        Some(owner) if owner == me => {
            // Sockets of our uid on the port without SO_REUSEPORT: connections the socket
            // took before it had it, when it was bound without SO_REUSEADDR.
            format!(
                "cannot bind a worker listener to the socket's address: {e} (connections that \
                 reached the socket before sockvisor made it shareable hold the port; \
                 ReusePort=yes in the socket unit avoids that)"
            )
        }
        owner => format!(
            "sockvisor runs as uid {me} but the socket was bound by {}, and a SO_REUSEPORT \
             group takes one user's sockets (run sockvisor as the socket's user; systemd creates \
             its sockets as root: no User= in the service unit, start the workers as another \
             user with `user =` in the config)",
            owner.map_or_else(|| "another user".to_string(), |uid| format!("uid {uid}"))
        ),
    }
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
                    split: None,
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
            // A UDP socket bound without SO_REUSEPORT (systemd's, unless ReusePort=yes) may
            // get it now: the first worker socket bound beside it makes a group of both
            // (udp_reuseport_add_sock allocates the anchor's group then).
            if !getsockopt(&anchor, sockopt::ReusePort).unwrap_or(false) {
                listener::enable_reuseport(anchor)
                    .map_err(|e| format!("cannot set SO_REUSEPORT on the socket: {e}"))?;
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
        // The first worker listener, bound but not listening yet, proves that sockvisor may
        // join the group: the kernel refuses a socket of another uid than the anchor's. This
        // comes before the program: without the right uid, CAP_BPF would not help.
        let first = listener::bound_sibling(anchor).map_err(|e| cannot_join(anchor, &e))?;
        let group =
            SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).map_err(|e| e.to_string())?;
        listener::listen_sibling(first.as_fd(), backlog)
            .map_err(|e| format!("cannot listen on a worker listener beside the socket: {e}"))?;
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

    /// Give the kernel the current schedule: the ready workers in the rotation by (slot,
    /// generation), or for UDP with nobody ready, every worker that is not leaving. Equal
    /// weights and no split: plain round robin; otherwise one cycle of smooth weighted round
    /// robin ([`weighted_schedule`]).
    fn reschedule(&mut self, poller: Option<&Poller>) {
        if self.stopped {
            return;
        }
        let mut ready: Vec<(usize, u64, Pid, Key, u32)> = self
            .members
            .values()
            .filter(|m| m.ready && !m.leaving && m.in_rotation)
            .map(|m| {
                let w = &m.worker;
                (w.slot, w.generation, w.pid, m.key, w.weight)
            })
            .collect();
        if ready.is_empty() && self.datagram {
            ready = self
                .members
                .values()
                .filter(|m| !m.leaving)
                .map(|m| {
                    let w = &m.worker;
                    (w.slot, w.generation, w.pid, m.key, w.weight)
                })
                .collect();
        }
        ready.sort();
        let members: Vec<(Key, u64, u32)> = ready.iter().map(|r| (r.3, r.1, r.4)).collect();
        let was_empty = self.group.schedule_len() == 0;
        let result = match weighted_schedule(&members, self.split) {
            None => {
                let keys: Vec<Key> = members.iter().map(|m| m.0).collect();
                self.group.set_ready(&keys)
            }
            Some(weights) => self.group.set_weighted(&weights),
        };
        if let Err(e) = result {
            log::error!("{}: cannot update the schedule: {e}", self.listener.name);
            return;
        }
        if members.is_empty() {
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

    /// New connections the program placed (on the anchor or a worker's listener) or left to
    /// the kernel's hash, since the group was made: every key ever used, and the unplaced.
    fn steered_total(&self) -> u64 {
        let keys = std::iter::once(Key::ANCHOR).chain((1..self.next_key).filter_map(Key::worker));
        let placed: u64 = keys
            .map(|k| self.group.counters(k).map_or(0, |c| c.dispatched))
            .sum();
        placed + self.group.unselected().unwrap_or(0)
    }

    fn selected(&self, key: Key) -> u64 {
        self.group
            .counters(key)
            .map_or(0, |c| c.dispatched + c.migrated)
    }
}

/// The weights of a schedule for `(key, generation, weight)` members, or `None` when plain
/// round robin gives the same shares (equal weights, no split in effect). With a split that
/// has members on both sides, each member's weight is scaled so that the canary's members
/// together get exactly `permille` of the turns: a canary member's weight is multiplied by
/// `permille x (the rest's total weight)`, another's by `(1000 - permille) x (the canary's
/// total weight)`. (A split by client address is not possible here: see `set_split` in
/// docs/canary.md; the supervisor refuses it under reuseport.)
pub fn weighted_schedule(
    members: &[(Key, u64, u32)],
    split: Option<Split>,
) -> Option<Vec<(Key, u32)>> {
    let weight = |w: u32| u64::from(w.max(1));
    let split = split.filter(|s| {
        members.iter().any(|m| m.1 == s.generation) && members.iter().any(|m| m.1 != s.generation)
    });
    let Some(split) = split else {
        let first = members.first().map(|m| weight(m.2));
        if members.iter().all(|m| Some(weight(m.2)) == first) {
            return None;
        }
        return Some(members.iter().map(|m| (m.0, m.2.max(1))).collect());
    };
    let p = u64::from(split.permille.min(1000));
    let canary_total: u64 = members
        .iter()
        .filter(|m| m.1 == split.generation)
        .map(|m| weight(m.2))
        .sum();
    let rest_total: u64 = members
        .iter()
        .filter(|m| m.1 != split.generation)
        .map(|m| weight(m.2))
        .sum();
    let mut scaled: Vec<(Key, u64)> = members
        .iter()
        .map(|m| {
            let factor = if m.1 == split.generation {
                p * rest_total
            } else {
                (1000 - p) * canary_total
            };
            (m.0, weight(m.2) * factor)
        })
        .collect();
    // Keep them in u32 (the schedule divides by their gcd and fits them in its length).
    let divisor = scaled.iter().fold(0, |g, m| gcd(g, m.1)).max(1);
    for m in &mut scaled {
        m.1 /= divisor;
    }
    let max = scaled.iter().map(|m| m.1).max().unwrap_or(1);
    let shrink = max.div_ceil(u64::from(u32::MAX)).max(1);
    Some(
        scaled
            .into_iter()
            .map(|(k, w)| (k, u32::try_from(w / shrink).unwrap_or(u32::MAX)))
            .collect(),
    )
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
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
        let selected_before = self.selected(key);
        self.members.insert(
            worker.pid,
            Member {
                worker,
                key,
                listener,
                ready: false,
                leaving: false,
                in_rotation: true,
                received_at_check: selected_before,
                progress_at: now,
                selected_before,
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

    /// Out of the schedule (or back in). What is queued on its listener stays for it: it is
    /// alive, and requeueing a listener a live program accepts on fails its `accept()`.
    fn set_in_rotation(&mut self, pid: Pid, in_rotation: bool) {
        if let Some(m) = self.members.get_mut(&pid) {
            if m.in_rotation != in_rotation {
                m.in_rotation = in_rotation;
                self.reschedule(None);
            }
        }
    }

    fn set_split(&mut self, split: Option<Split>) {
        if split != self.split {
            self.split = split;
            self.reschedule(None);
        }
    }

    /// A TCP connection from loopback whose source port is pinned to the worker's key: the
    /// program sends it to that worker's listener alone. The pin stays until
    /// [`ListenerDispatch::close_probe`]: a probe left on a listener that closes is dropped
    /// by the program, never moved to another worker (it would pass for the wrong one).
    fn open_probe(&mut self, pid: Pid) -> Option<io::Result<ProbeConn>> {
        if self.datagram || self.stopped {
            return None;
        }
        let key = self.members.get(&pid)?.key;
        let (fd, port, target) = match probe::bound_tcp_socket(self.listener.fd.as_fd()) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        if let Err(e) = self.group.pin_probe(port, key) {
            // The probe routes are few (64 at once): a full table is not the worker's fault.
            let kind = if e.errno == libc::E2BIG || e.errno == libc::ENOSPC {
                io::ErrorKind::WouldBlock
            } else {
                io::ErrorKind::Other
            };
            return Some(Err(io::Error::new(
                kind,
                format!("cannot pin the probe: {e}"),
            )));
        }
        Some(match probe::start_connect(&fd, &target) {
            Ok(connecting) => Ok(ProbeConn {
                fd,
                connecting,
                route: Some(port),
            }),
            Err(e) => {
                let _ = self.group.unpin_probe(port);
                Err(e)
            }
        })
    }

    fn close_probe(&mut self, route: u16) {
        if let Err(e) = self.group.unpin_probe(route) {
            log::warn!(
                "{}: cannot remove the probe route of port {route}: {e}",
                self.listener.name
            );
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
            steered: (!self.datagram).then(|| self.steered_total()),
            pending: self.queued_on(self.listener.fd.as_fd()),
            reclaimed: self.taken_back,
        }
    }

    fn worker_figures(&self, pid: Pid) -> WorkerFigures {
        self.members
            .get(&pid)
            .map(|m| WorkerFigures {
                dispatched: self.selected(m.key).saturating_sub(m.selected_before),
                queued: self.queued_on(m.listener.as_fd()),
                open: None,
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod weight_tests {
    use super::*;
    use crate::dispatch::reuseport::schedule::smooth_weighted;

    fn key(n: u32) -> Key {
        Key::worker(n).unwrap()
    }

    fn shares(members: &[(Key, u64, u32)], split: Option<Split>) -> Vec<usize> {
        let w = weighted_schedule(members, split).expect("weighted");
        let raw: Vec<(u32, u32)> = w.iter().map(|&(k, w)| (k.get(), w)).collect();
        let cycle = smooth_weighted(&raw, 1024);
        members
            .iter()
            .map(|m| cycle.iter().filter(|&&k| k == m.0.get()).count() * 1000 / cycle.len())
            .collect()
    }

    #[test]
    fn equal_weights_without_split_are_plain() {
        let m = [(key(1), 1, 1), (key(2), 1, 1)];
        assert_eq!(weighted_schedule(&m, None), None);
        // a split with one side empty is no split
        let s = Split {
            generation: 2,
            permille: 100,
            by_client: false,
        };
        assert_eq!(weighted_schedule(&m, Some(s)), None);
    }

    #[test]
    fn generation_weights_and_a_canary_share() {
        // old weight 3, canary weight 1: 3:1
        let m = [(key(1), 1, 3), (key(2), 2, 1)];
        assert_eq!(shares(&m, None), [750, 250]);
        // 10% to one canary beside three old workers, whatever the weights
        let m = [
            (key(1), 1, 1),
            (key(2), 1, 1),
            (key(3), 1, 1),
            (key(4), 2, 5),
        ];
        let s = Split {
            generation: 2,
            permille: 100,
            by_client: false,
        };
        assert_eq!(shares(&m, Some(s)), [300, 300, 300, 100]);
        // two canary workers with 12.5%: 62 or 63 per mille each
        let m = [(key(1), 1, 1), (key(2), 2, 1), (key(3), 2, 1)];
        let s = Split {
            generation: 2,
            permille: 125,
            by_client: false,
        };
        assert_eq!(shares(&m, Some(s)), [875, 62, 62]);
    }
}
