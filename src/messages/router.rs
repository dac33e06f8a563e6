//! sockvisor's side of worker messages: one endpoint per worker, and the routing between
//! them and the operator. Owned by the supervisor's loop; never blocks it.
//!
//! Rules (docs/messages.md):
//! - **Bounded reads**: at most [`READS_PER_WAKE`] messages are read from one worker per
//!   wake-up, and a wake-up stops reading once it has made [`DELIVERIES_PER_WAKE`]
//!   deliveries (a broadcast is one delivery per receiver); the rest waits in the socket
//!   (epoll is level-triggered, so the loop comes back to it after the other events).
//! - **Non-blocking sends, bounded queues**: a message for a worker is written to its socket
//!   with `MSG_DONTWAIT`. When the socket is full (the worker does not read), it waits in
//!   that worker's queue, at most [`QUEUE_MESSAGES`] messages and [`QUEUE_BYTES`] bytes, and
//!   goes out when the socket is writable again (`EPOLLOUT`). Beyond that the message is
//!   dropped and counted against the receiver (`dropped`), never silently.
//! - **Order**: messages from one sender to one receiver arrive in the order sent.
//! - **Who sent it**: sockvisor stamps `from` with the sender's slot.
//! - Messages for the operator are handed to the caller ([`OperatorMessage`]); the router
//!   does not know who follows them.

use super::wire::{self, Address};
use crate::dispatch::{sys, WorkerRef};
use crate::logging::Throttle;
use crate::poller::{Poller, Token};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::unistd::Pid;
use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Messages that may wait for one worker (its socket full).
pub const QUEUE_MESSAGES: usize = 128;
/// Bytes that may wait for one worker.
pub const QUEUE_BYTES: usize = 256 * 1024;
/// Messages read from one worker per wake-up.
pub const READS_PER_WAKE: usize = 64;
/// Deliveries (one per receiver) made for one worker's messages per wake-up.
pub const DELIVERIES_PER_WAKE: usize = 4096;
/// Warnings about dropped or malformed messages are logged at most this often.
const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One worker's message figures, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EndpointFigures {
    /// Messages it sent (read from its socket, well formed).
    pub sent: u64,
    /// Messages written into its socket.
    pub received: u64,
    /// Messages waiting in sockvisor's queue for it.
    pub queued: u64,
    /// Messages meant for it and lost: its queue was full, or it closed its socket or
    /// exited with messages queued.
    pub dropped: u64,
}

/// The fleet's message figures since sockvisor started, for `status` (its `messages` object,
/// with the followers beside them: `control::MessageTotals`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Totals {
    /// Messages written into workers' sockets.
    pub delivered: u64,
    /// Messages workers sent to the operator.
    pub to_operator: u64,
    /// Of those, how many found no `messages --follow` client.
    pub unheard: u64,
    /// Messages for a slot with no worker (or one that has no message socket).
    pub undeliverable: u64,
    /// Messages dropped: a receiver's queue was full, or it went away with messages queued.
    pub dropped: u64,
    /// Packets from workers that were not messages of this version (skipped).
    pub malformed: u64,
}

/// A message a worker sent to the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorMessage {
    pub from: WorkerRef,
    pub payload: Vec<u8>,
}

/// Where an operator's message went.
#[derive(Debug, Default)]
pub struct Delivery {
    /// The workers it was written or queued for.
    pub to: Vec<WorkerRef>,
    /// Workers whose queue was full or whose socket is closed.
    pub dropped: Vec<WorkerRef>,
}

struct Endpoint {
    worker: WorkerRef,
    /// sockvisor's end of the worker's socketpair (non-blocking).
    fd: OwnedFd,
    /// Packets waiting for the socket to take them, oldest first.
    queue: VecDeque<Rc<[u8]>>,
    queued_bytes: usize,
    /// `EPOLLOUT` is registered (exactly while the queue is not empty).
    waiting_writable: bool,
    /// The worker closed its end (or it broke): unregistered, nothing more goes to it.
    closed: bool,
    figures: EndpointFigures,
}

/// Every worker's message endpoint, and the figures.
pub struct Router {
    endpoints: BTreeMap<Pid, Endpoint>,
    /// The socketpair of the worker about to be forked: (sockvisor's end, the worker's).
    staged: Option<(OwnedFd, OwnedFd)>,
    totals: Totals,
    /// One packet, reused: [`wire::MAX_PACKET`] + 1 bytes (one more tells a longer packet).
    buf: Vec<u8>,
    dropped_log: Throttle,
    malformed_log: Throttle,
}

impl Default for Router {
    fn default() -> Router {
        Router {
            endpoints: BTreeMap::new(),
            staged: None,
            totals: Totals::default(),
            buf: Vec::new(),
            dropped_log: Throttle::new(LOG_INTERVAL),
            malformed_log: Throttle::new(LOG_INTERVAL),
        }
    }
}

/// What reading one worker's socket gave.
enum Read {
    Packet(usize),
    /// Nothing more now.
    Empty,
    /// The worker closed its end (or it broke).
    Closed,
}

impl Router {
    /// Make the socketpair of the next worker; its end is [`Router::staged_fd`] until
    /// [`Router::commit`] or [`Router::discard_staged`].
    pub fn stage(&mut self) -> io::Result<()> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let fl = OFlag::from_bits_truncate(fcntl(&mine, FcntlArg::F_GETFL)?);
        fcntl(&mine, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
        self.staged = Some((mine, theirs));
        Ok(())
    }

    /// The staged worker's end, to place in it (blocking, as a worker expects).
    pub fn staged_fd(&self) -> Option<BorrowedFd<'_>> {
        self.staged.as_ref().map(|(_, theirs)| theirs.as_fd())
    }

    /// The staged worker was forked as `worker`: sockvisor's end is polled, the worker's end
    /// closed here (the worker has its copy).
    pub fn commit(&mut self, worker: WorkerRef, poller: &Poller) {
        let Some((fd, _theirs)) = self.staged.take() else {
            return;
        };
        if let Err(e) = poller.register(&fd, Token::Messages(worker.pid)) {
            log::warn!(
                "worker {} (pid {}): cannot poll its message socket: {e}; it gets no messages",
                worker.slot,
                worker.pid
            );
            return;
        }
        self.endpoints.insert(
            worker.pid,
            Endpoint {
                worker,
                fd,
                queue: VecDeque::new(),
                queued_bytes: 0,
                waiting_writable: false,
                closed: false,
                figures: EndpointFigures::default(),
            },
        );
    }

    pub fn discard_staged(&mut self) {
        self.staged = None;
    }

    /// The worker is gone: what was queued for it is lost (counted).
    pub fn worker_gone(&mut self, pid: Pid, poller: &Poller) {
        if let Some(mut e) = self.endpoints.remove(&pid) {
            poller.unregister(&e.fd);
            let lost = e.queue.len() as u64;
            e.figures.dropped += lost;
            self.totals.dropped += lost;
            if lost > 0 {
                log::info!(
                    "worker {} (pid {pid}) exited with {lost} messages queued for it; they are dropped",
                    e.worker.slot
                );
            }
        }
    }

    pub fn figures(&self, pid: Pid) -> Option<EndpointFigures> {
        self.endpoints.get(&pid).map(|e| EndpointFigures {
            queued: e.queue.len() as u64,
            ..e.figures
        })
    }

    /// Some live worker has a message socket.
    pub fn has_endpoints(&self) -> bool {
        !self.endpoints.is_empty()
    }

    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// Messages to the operator that nobody heard (no follower).
    pub fn count_unheard(&mut self, n: u64) {
        self.totals.unheard += n;
    }

    /// The worker's socket is ready: write what waits for it, then read and route what it
    /// sent (within the per-wake-up bounds). `current` maps a slot to the worker that
    /// receives its messages. Returns the messages for the operator.
    pub fn handle(
        &mut self,
        pid: Pid,
        poller: &Poller,
        current: &[Option<Pid>],
    ) -> Vec<OperatorMessage> {
        let mut for_operator = Vec::new();
        self.flush(pid, poller);
        let Some(sender) = self.endpoints.get(&pid).map(|e| e.worker) else {
            return for_operator;
        };
        if self.buf.len() != wire::MAX_PACKET + 1 {
            self.buf = vec![0; wire::MAX_PACKET + 1];
        }
        let mut deliveries = 0;
        for _ in 0..READS_PER_WAKE {
            if deliveries >= DELIVERIES_PER_WAKE {
                break;
            }
            let n = match self.read(pid) {
                Read::Packet(n) => n,
                Read::Empty => break,
                Read::Closed => {
                    self.close(pid, poller, "it closed its message socket");
                    break;
                }
            };
            let to = match wire::decode(&self.buf[..n]) {
                Ok(m) => m.to,
                Err(e) => {
                    self.malformed(sender, &e.to_string());
                    continue;
                }
            };
            if let Some(e) = self.endpoints.get_mut(&pid) {
                e.figures.sent += 1;
            }
            wire::set_from(&mut self.buf[..n], Address::Slot(sender.slot as u32));
            match to {
                Address::Operator => {
                    self.totals.to_operator += 1;
                    for_operator.push(OperatorMessage {
                        from: sender,
                        payload: self.buf[wire::HEADER_LEN..n].to_vec(),
                    });
                }
                Address::All => {
                    let packet: Rc<[u8]> = Rc::from(&self.buf[..n]);
                    let receivers: Vec<Pid> = self
                        .endpoints
                        .keys()
                        .copied()
                        .filter(|&p| p != pid)
                        .collect();
                    deliveries += receivers.len();
                    for r in receivers {
                        self.deliver(r, &packet, poller);
                    }
                }
                Address::Slot(slot) => {
                    deliveries += 1;
                    match self.slot_endpoint(slot as usize, current) {
                        Some(r) => {
                            let packet: Rc<[u8]> = Rc::from(&self.buf[..n]);
                            self.deliver(r, &packet, poller);
                        }
                        None => {
                            self.totals.undeliverable += 1;
                            log::debug!(
                                "worker {} (pid {pid}): message for slot {slot}, which has no worker that takes messages; dropped",
                                sender.slot
                            );
                        }
                    }
                }
            }
        }
        for_operator
    }

    /// Send `payload` from the operator to the worker of `slot`, or to every worker.
    pub fn send_from_operator(
        &mut self,
        slot: Option<usize>,
        payload: &[u8],
        poller: &Poller,
        current: &[Option<Pid>],
    ) -> Result<Delivery, String> {
        let to = match slot {
            Some(s) => Address::Slot(s as u32),
            None => Address::All,
        };
        let packet: Rc<[u8]> = wire::encode(Address::Operator, to, payload)
            .map_err(|e| e.to_string())?
            .into();
        let receivers: Vec<Pid> = match slot {
            Some(s) => {
                let pid = self.slot_endpoint(s, current).ok_or_else(|| {
                    match current.get(s) {
                        None => format!("no slot {s} (slots 0 to {})", current.len().saturating_sub(1)),
                        Some(None) => format!("slot {s} has no worker right now"),
                        Some(Some(p)) => format!(
                            "the worker of slot {s} (pid {p}) has no message socket (it started before messages were turned on, or closed it)"
                        ),
                    }
                })?;
                vec![pid]
            }
            None => self
                .endpoints
                .iter()
                .filter(|(_, e)| !e.closed)
                .map(|(&p, _)| p)
                .collect(),
        };
        if receivers.is_empty() {
            return Err("no worker takes messages".to_string());
        }
        let mut delivery = Delivery::default();
        for r in receivers {
            let worker = self.endpoints[&r].worker;
            if self.deliver(r, &packet, poller) {
                delivery.to.push(worker);
            } else {
                delivery.dropped.push(worker);
            }
        }
        Ok(delivery)
    }

    /// The endpoint of the slot's current worker, if it takes messages.
    fn slot_endpoint(&self, slot: usize, current: &[Option<Pid>]) -> Option<Pid> {
        let pid = current.get(slot).copied().flatten()?;
        self.endpoints.get(&pid).filter(|e| !e.closed).map(|_| pid)
    }

    /// One packet from the worker's socket into `buf`.
    fn read(&mut self, pid: Pid) -> Read {
        let Some(e) = self.endpoints.get(&pid) else {
            return Read::Empty;
        };
        if e.closed {
            return Read::Empty;
        }
        loop {
            let got = match sys::recv(e.fd.as_fd(), &mut self.buf, libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Read::Empty,
                Err(err) => {
                    log::debug!("worker pid {pid}: reading its message socket: {err}");
                    return Read::Closed;
                }
            };
            let fds = got.fds.len();
            drop(got.fds); // a worker has no business sending fds here: close them
            if got.bytes == 0 && fds == 0 {
                // End of file, or an empty packet (not a message).
                if sys::peer_hung_up(e.fd.as_fd()) {
                    return Read::Closed;
                }
            }
            if got.flags & libc::MSG_TRUNC != 0 {
                // Longer than the buffer: the kernel dropped the rest; decode says TooLong.
                return Read::Packet(self.buf.len());
            }
            return Read::Packet(got.bytes);
        }
    }

    /// Write `packet` to worker `to`, or queue it; false when it was dropped.
    fn deliver(&mut self, to: Pid, packet: &Rc<[u8]>, poller: &Poller) -> bool {
        let Some(e) = self.endpoints.get_mut(&to) else {
            self.totals.undeliverable += 1;
            return false;
        };
        if e.closed {
            e.figures.dropped += 1;
            self.totals.dropped += 1;
            return false;
        }
        if e.queue.is_empty() {
            match send(e.fd.as_fd(), packet) {
                Sent::Yes => {
                    e.figures.received += 1;
                    self.totals.delivered += 1;
                    return true;
                }
                Sent::Full => {}
                Sent::Closed => {
                    e.figures.dropped += 1;
                    self.totals.dropped += 1;
                    self.close(to, poller, "its message socket is closed");
                    return false;
                }
            }
        }
        if e.queue.len() >= QUEUE_MESSAGES || e.queued_bytes + packet.len() > QUEUE_BYTES {
            e.figures.dropped += 1;
            self.totals.dropped += 1;
            let (slot, dropped) = (e.worker.slot, e.figures.dropped);
            if self.dropped_log.hit(Instant::now()) {
                log::warn!(
                    "worker {slot} (pid {to}) does not read its messages: its queue is full ({QUEUE_MESSAGES} messages or {} KiB), {dropped} dropped for it so far ({} in all)",
                    QUEUE_BYTES / 1024,
                    self.totals.dropped
                );
            }
            return false;
        }
        e.queued_bytes += packet.len();
        e.queue.push_back(Rc::clone(packet));
        if !e.waiting_writable {
            match poller.set_writable(&e.fd, Token::Messages(to), true) {
                Ok(()) => e.waiting_writable = true,
                Err(err) => log::warn!("worker pid {to}: epoll_ctl on its message socket: {err}"),
            }
        }
        true
    }

    /// Write what waits for worker `pid` until its socket is full again.
    fn flush(&mut self, pid: Pid, poller: &Poller) {
        let Some(e) = self.endpoints.get_mut(&pid) else {
            return;
        };
        let mut broken = false;
        while let Some(packet) = e.queue.front() {
            match send(e.fd.as_fd(), packet) {
                Sent::Yes => {
                    e.queued_bytes -= packet.len();
                    e.queue.pop_front();
                    e.figures.received += 1;
                    self.totals.delivered += 1;
                }
                Sent::Full => break,
                Sent::Closed => {
                    broken = true;
                    break;
                }
            }
        }
        if broken {
            self.close(pid, poller, "its message socket is closed");
            return;
        }
        if e.queue.is_empty() && e.waiting_writable {
            match poller.set_writable(&e.fd, Token::Messages(pid), false) {
                Ok(()) => e.waiting_writable = false,
                Err(err) => log::warn!("worker pid {pid}: epoll_ctl on its message socket: {err}"),
            }
        }
    }

    /// Stop polling a worker's socket for good (it closed its end): what waits for it is
    /// dropped, and so is what comes for it later. Logged at debug level: a worker that
    /// exits closes its end too, usually noticed here just before it is reaped.
    fn close(&mut self, pid: Pid, poller: &Poller, why: &str) {
        let Some(e) = self.endpoints.get_mut(&pid) else {
            return;
        };
        if e.closed {
            return;
        }
        e.closed = true;
        poller.unregister(&e.fd);
        let lost = e.queue.len() as u64;
        e.queue.clear();
        e.queued_bytes = 0;
        e.waiting_writable = false;
        e.figures.dropped += lost;
        self.totals.dropped += lost;
        log::debug!(
            "worker {} (pid {pid}): {why}; it gets no more messages ({lost} queued were dropped)",
            e.worker.slot
        );
    }

    fn malformed(&mut self, sender: WorkerRef, what: &str) {
        self.totals.malformed += 1;
        if self.malformed_log.hit(Instant::now()) {
            log::warn!(
                "worker {} (pid {}): skipped a packet on its message socket: {what} ({} skipped in all; docs/messages.md)",
                sender.slot,
                sender.pid,
                self.totals.malformed
            );
        }
    }
}

enum Sent {
    Yes,
    /// The socket is full (the worker does not read fast enough): try later.
    Full,
    Closed,
}

fn send(fd: BorrowedFd<'_>, packet: &[u8]) -> Sent {
    loop {
        return match sys::send(fd, packet, None, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) {
            Ok(_) => Sent::Yes,
            Err(Errno::EINTR) => continue,
            // ENOBUFS/ENOMEM: the kernel is short of memory; the queue is the place to wait.
            Err(Errno::EAGAIN | Errno::ENOBUFS | Errno::ENOMEM) => Sent::Full,
            Err(_) => Sent::Closed,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    /// A router with `n` workers (slots 0..n, pid 1000+slot), each with the worker's end of
    /// its socketpair returned (a datagram wrapper reads a seqpacket socket just as well).
    fn fleet(n: usize) -> (Router, Poller, Vec<UnixDatagram>, Vec<Option<Pid>>) {
        let poller = Poller::new().unwrap();
        let mut router = Router::default();
        let mut ends = Vec::new();
        let mut current = Vec::new();
        for slot in 0..n {
            router.stage().unwrap();
            let end = router.staged_fd().unwrap().try_clone_to_owned().unwrap();
            let pid = Pid::from_raw(1000 + slot as i32);
            router.commit(
                WorkerRef {
                    pid,
                    slot,
                    generation: 1,
                    weight: 1,
                },
                &poller,
            );
            ends.push(UnixDatagram::from(end));
            current.push(Some(pid));
        }
        (router, poller, ends, current)
    }

    fn recv(end: &UnixDatagram) -> Option<(Address, Address, Vec<u8>)> {
        end.set_nonblocking(true).unwrap();
        let mut buf = vec![0; wire::MAX_PACKET];
        let n = end.recv(&mut buf).ok()?;
        let m = wire::decode(&buf[..n]).unwrap();
        Some((m.from, m.to, m.payload.to_vec()))
    }

    #[test]
    fn routes_to_a_slot_to_all_and_to_the_operator() {
        let (mut r, poller, ends, current) = fleet(3);
        let pid = |s: usize| current[s].unwrap();
        // slot 0 -> slot 2, pretending to be slot 9: sockvisor stamps the real sender.
        ends[0]
            .send(&wire::encode(Address::Slot(9), Address::Slot(2), b"direct").unwrap())
            .unwrap();
        ends[0]
            .send(&wire::encode(Address::Slot(0), Address::All, b"everyone").unwrap())
            .unwrap();
        ends[0]
            .send(&wire::encode(Address::Slot(0), Address::Operator, b"boss").unwrap())
            .unwrap();
        ends[0].send(b"junk").unwrap();
        let op = r.handle(pid(0), &poller, &current);
        assert_eq!(op.len(), 1);
        assert_eq!(
            (op[0].from.slot, op[0].payload.as_slice()),
            (0, &b"boss"[..])
        );
        let direct = (Address::Slot(0), Address::Slot(2), b"direct".to_vec());
        let all = (Address::Slot(0), Address::All, b"everyone".to_vec());
        assert_eq!(recv(&ends[2]), Some(direct));
        assert_eq!(recv(&ends[2]), Some(all.clone()));
        assert_eq!(recv(&ends[1]), Some(all));
        assert_eq!(recv(&ends[1]), None);
        assert_eq!(recv(&ends[0]), None, "a broadcast skips its sender");
        let t = r.totals();
        assert_eq!((t.delivered, t.to_operator, t.malformed), (3, 1, 1));
        assert_eq!(r.figures(pid(0)).unwrap().sent, 3);

        let d = r
            .send_from_operator(Some(1), b"hi", &poller, &current)
            .unwrap();
        assert_eq!(d.to.len(), 1);
        assert_eq!(
            recv(&ends[1]),
            Some((Address::Operator, Address::Slot(1), b"hi".to_vec()))
        );
        let d = r
            .send_from_operator(None, b"all", &poller, &current)
            .unwrap();
        assert_eq!(d.to.len(), 3);
        for e in &ends {
            assert_eq!(recv(e).unwrap().2, b"all");
        }
        let e = r
            .send_from_operator(Some(5), b"x", &poller, &current)
            .unwrap_err();
        assert!(e.contains("no slot 5"), "{e}");
    }

    /// A worker that never reads: its socket fills, then its queue, then the rest is dropped
    /// and counted; once it reads, the queue goes out in order.
    #[test]
    fn a_worker_that_does_not_read_overflows_into_a_count() {
        let (mut r, poller, ends, current) = fleet(2);
        let sent = 2000;
        for i in 0..sent {
            let payload = format!("{i}");
            let _ = r.send_from_operator(Some(1), payload.as_bytes(), &poller, &current);
        }
        let f = r.figures(current[1].unwrap()).unwrap();
        assert_eq!(f.queued, QUEUE_MESSAGES as u64);
        assert!(f.dropped > 0);
        assert_eq!(f.received + f.queued + f.dropped, sent);
        assert_eq!(r.totals().dropped, f.dropped);
        // It reads now: everything that was not dropped arrives, in order.
        let mut got = Vec::new();
        loop {
            while let Some((_, _, p)) = recv(&ends[1]) {
                got.push(String::from_utf8(p).unwrap().parse::<u64>().unwrap());
            }
            if r.figures(current[1].unwrap()).unwrap().queued == 0 {
                break;
            }
            r.handle(current[1].unwrap(), &poller, &current);
        }
        assert_eq!(got.len() as u64, f.received + f.queued);
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
        // Nothing was lost before the first drop.
        assert_eq!(
            got[..f.received as usize],
            (0..f.received).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_closed_end_or_a_gone_worker_counts_its_queue_as_dropped() {
        let (mut r, poller, mut ends, current) = fleet(2);
        drop(ends.remove(1));
        let pid1 = current[1].unwrap();
        r.handle(pid1, &poller, &current);
        let e = r
            .send_from_operator(Some(1), b"x", &poller, &current)
            .unwrap_err();
        assert!(e.contains("no message socket"), "{e}");
        r.worker_gone(pid1, &poller);
        assert!(r.figures(pid1).is_none());
        let d = r.send_from_operator(None, b"x", &poller, &current).unwrap();
        assert_eq!(d.to.len(), 1);
    }
}
