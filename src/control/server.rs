//! The control socket's server side, built for the supervisor's single-threaded epoll loop:
//! it never blocks and starts no thread.
//!
//! It keeps an epoll instance of its own for the listening socket, its clients and a
//! "backlog" eventfd, so the supervisor registers one fd, [`ControlServer::as_fd`]
//! (level-triggered `EPOLLIN`), and calls [`ControlServer::poll`] when it is readable.
//!
//! Rules (docs/control.md):
//! - **Who**: every connection's `SO_PEERCRED` uid must be root or sockvisor's euid; others
//!   get one error line and are closed. The socket file's mode (0600) usually stops them
//!   first; this check is what holds when the mode is opened.
//! - **Order**: replies go out in request order per client. Each request handed out gets a
//!   [`RequestId`]; a reply given early (a `status` behind a `reload`) is held until the ones
//!   before it are written.
//! - **Bounded work per wake-up**: at most [`REQUESTS_PER_POLL`] requests and
//!   [`READ_PER_POLL`] bytes per client per `poll`; what is left stays buffered (the backlog
//!   eventfd keeps `as_fd` readable) or in the socket. A client with [`MAX_IN_FLIGHT`]
//!   unwritten replies, or a full output buffer, is not read until its replies go out. So a
//!   flood of requests costs each wake-up a bounded amount of work, and accepts, signals
//!   and watchdog pings go on.
//! - **Followers**: a `messages --follow` request is the last one read from its client;
//!   after its reply the client receives the lines given to [`ControlServer::publish`], at
//!   most [`FOLLOW_OUTPUT_LIMIT`] bytes of them unwritten: beyond that lines are dropped
//!   for that client and counted, and a `{"event":"dropped","count":N}` line tells it so
//!   before the next line that fits. What it sends is read and ignored.
//! - **Gone clients**: a client that hung up, failed, or let [`MAX_PENDING_OUTPUT`] bytes of
//!   replies pile up is dropped with whatever it had not sent or read; replies to it are
//!   no-ops, and the supervisor can skip building them ([`ControlServer::wants_reply`]).
//!   A client that only shut down its sending side is kept until its replies are written.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{self, sockopt, MsgFlags, SockFlag, SockType};

use super::protocol::{parse_request, Reply, Request, MAX_LINE};
use crate::runtime_files::{self, DirSetup, SocketFile};

/// Clients connected at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;
/// Reply bytes held for one client (written or waiting for an earlier reply); beyond that
/// the client is dropped.
pub const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Requests taken from one client per [`ControlServer::poll`].
pub const REQUESTS_PER_POLL: usize = 4;
/// Bytes read from one client per [`ControlServer::poll`].
pub const READ_PER_POLL: usize = 64 * 1024;
/// Requests of one client whose replies are not written yet; at this many it is not read.
pub const MAX_IN_FLIGHT: usize = 32;
/// Written-but-unsent reply bytes at which a client is not read until it reads.
const OUTPUT_HIGH_WATER: usize = 256 * 1024;
/// Unwritten bytes a follower may have; lines beyond are dropped (and counted) for it.
pub const FOLLOW_OUTPUT_LIMIT: usize = 1 << 20;
/// Connections accepted (or refused) per `poll`.
const ACCEPTS_PER_POLL: usize = 32;
const READ_CHUNK: usize = 16 * 1024;
/// Internal epoll tokens; clients use their id (from 1).
const LISTENER_TOKEN: u64 = u64::MAX;
const BACKLOG_TOKEN: u64 = u64::MAX - 1;

/// One request handed out by [`ControlServer::poll`], to be answered once with
/// [`ControlServer::reply`]. Ids are never reused during a server's life, so a late reply
/// cannot reach another client; the number fits where a `u64` is kept (reload waiters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "control request #{}", self.0)
    }
}

struct InFlight {
    id: u64,
    /// The encoded reply, once given.
    reply: Option<Vec<u8>>,
}

struct Client {
    fd: OwnedFd,
    /// Bytes read and not yet split into lines, from `start` on.
    input: Vec<u8>,
    start: usize,
    /// Inside an over-long line: skip to the next newline.
    discarding: bool,
    /// Requests handed out, oldest first; their replies are written in this order.
    in_flight: VecDeque<InFlight>,
    /// Reply bytes the socket did not take yet.
    out: Vec<u8>,
    /// The client shut down its sending side: no more requests.
    eof: bool,
    /// What the internal epoll watches for it (empty: not registered).
    interest: EpollFlags,
    /// It asked to follow messages (`messages --follow`): no more requests from it.
    follower: Option<Follower>,
}

struct Follower {
    /// The id of its `messages --follow` request: lines go out once its reply has.
    request: u64,
    /// Lines not written to it since the last `dropped` event it got.
    dropped: u64,
}

impl Client {
    fn pending(&self) -> &[u8] {
        &self.input[self.start..]
    }

    /// Not read while its replies are not going out.
    fn blocked(&self) -> bool {
        self.in_flight.len() >= MAX_IN_FLIGHT || self.out.len() >= OUTPUT_HIGH_WATER
    }

    /// Work waiting in our buffer (a complete line, or a last line at EOF), not in the socket.
    fn has_buffered_line(&self) -> bool {
        if self.follower.is_some() {
            return false;
        }
        let p = self.pending();
        !p.is_empty() && (self.eof || p.contains(&b'\n'))
    }

    fn held_bytes(&self) -> usize {
        self.out.len()
            + self
                .in_flight
                .iter()
                .filter_map(|r| r.reply.as_ref().map(Vec::len))
                .sum::<usize>()
    }
}

pub struct ControlServer {
    listener: OwnedFd,
    file: SocketFile,
    epoll: Epoll,
    /// Readable while some client has requests buffered that the per-poll cap left over.
    backlog: EventFd,
    backlog_armed: bool,
    clients: BTreeMap<u64, Client>,
    next_client: u64,
    next_request: u64,
    euid: u32,
    /// An fd held in reserve to accept (and refuse) a connection when out of fds.
    spare: Option<OwnedFd>,
}

impl ControlServer {
    /// Bind the control socket at `path`, mode 0600, removed on drop (if still ours).
    ///
    /// The directory and the path follow the runtime-files policy (`runtime_files`): the
    /// directory is created 0700 when missing, and an existing one must not be a symlink,
    /// must be owned by root or sockvisor's euid, and not writable by others unless
    /// root-owned and sticky. A stale socket at `path` is replaced; a live one means another
    /// sockvisor is running (an `AddrInUse` error); anything else there is refused.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        runtime_files::prepare_dir(parent, DirSetup::Create).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{e} (set control_socket to another path)"),
            )
        })?;
        runtime_files::unix_addr(path)?;
        runtime_files::claim_socket_path(path, SockType::Stream).map_err(|e| {
            if e.kind() == io::ErrorKind::AddrInUse {
                io::Error::new(
                    e.kind(),
                    format!(
                        "another sockvisor is already running at {} (set control_socket to run a second one)",
                        path.display()
                    ),
                )
            } else {
                e
            }
        })?;
        let listener = runtime_files::unix_socket(SockType::Stream)?;
        // Peer credentials are checked on every connection anyway; the mode keeps other
        // users from even connecting.
        let file = SocketFile::bind(&listener, path, 0o600, None)?;
        socket::listen(&listener, socket::Backlog::new(MAX_CLIENTS as i32)?)?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(
            &listener,
            EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN),
        )?;
        let backlog = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(
            &backlog,
            EpollEvent::new(EpollFlags::EPOLLIN, BACKLOG_TOKEN),
        )?;
        Ok(ControlServer {
            listener,
            file,
            epoll,
            backlog,
            backlog_armed: false,
            clients: BTreeMap::new(),
            next_client: 1,
            next_request: 1,
            euid: nix::unistd::geteuid().as_raw(),
            spare: open_spare(),
        })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The one fd to register with the supervisor's epoll (level-triggered `EPOLLIN`):
    /// readable when [`ControlServer::poll`] has work.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// Do what is ready, within the per-client caps, without blocking: accept, read, write
    /// buffered replies. Returns the requests received, in order per client. Lines that are
    /// not requests are answered here (with an error, in their place in the order).
    pub fn poll(&mut self) -> Vec<(RequestId, Request)> {
        let mut requests = Vec::new();
        let mut events = [EpollEvent::empty(); 2 * MAX_CLIENTS + 2];
        let n = loop {
            match self.epoll.wait(&mut events, 0u8) {
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("control socket: epoll_wait: {e}");
                    return requests;
                }
                Ok(n) => break n,
            }
        };
        let mut readable = Vec::new();
        for ev in &events[..n] {
            match ev.data() {
                LISTENER_TOKEN => self.accept(),
                BACKLOG_TOKEN => {}
                id => {
                    let flags = ev.events();
                    if flags.intersects(EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                        // The peer closed (a half-close is EPOLLIN with EOF, not a hangup):
                        // nobody will read the replies of what it still had queued.
                        log::debug!("control client #{id} hung up");
                        self.drop_client(id);
                        continue;
                    }
                    if flags.contains(EpollFlags::EPOLLOUT) {
                        self.flush(id);
                    }
                    if flags.contains(EpollFlags::EPOLLIN) {
                        readable.push(id);
                    }
                }
            }
        }
        let ids: Vec<u64> = self.clients.keys().copied().collect();
        for id in ids {
            let buffered = self.clients.get(&id).is_some_and(Client::has_buffered_line);
            if buffered || readable.contains(&id) {
                self.take_requests(id, &mut requests);
                self.settle(id);
            }
        }
        self.update_backlog();
        requests
    }

    /// Answer `id` (once). Returns false if its client is gone, or was dropped now because
    /// too many reply bytes are waiting for it. The reply is written when every earlier
    /// request of the same client has been answered.
    pub fn reply(&mut self, id: RequestId, reply: &Reply) -> bool {
        if id.0 == 0 {
            return false; // never handed out (the id of held error replies)
        }
        let Some((&cid, c)) = self
            .clients
            .iter_mut()
            .find(|(_, c)| c.in_flight.iter().any(|r| r.id == id.0))
        else {
            return false;
        };
        if let Some(slot) = c.in_flight.iter_mut().find(|r| r.id == id.0) {
            slot.reply = Some(reply.to_line());
        }
        if !reply.ok && c.follower.as_ref().is_some_and(|f| f.request == id.0) {
            // Refused: nothing will follow; close once the error is written.
            c.follower = None;
            c.eof = true;
        }
        while c.in_flight.front().is_some_and(|r| r.reply.is_some()) {
            if let Some(InFlight { reply: Some(r), .. }) = c.in_flight.pop_front() {
                c.out.extend_from_slice(&r);
            }
        }
        if c.held_bytes() > MAX_PENDING_OUTPUT {
            log::warn!("control client #{cid} does not read its replies; dropping it");
            self.drop_client(cid);
            self.update_backlog();
            return false;
        }
        let alive = self.flush(cid);
        self.update_backlog();
        alive
    }

    /// Whether `id` still has a client to answer: a supervisor can skip building a reply
    /// (a full status) that nobody would read.
    pub fn wants_reply(&self, id: RequestId) -> bool {
        id.0 != 0
            && self
                .clients
                .values()
                .any(|c| c.in_flight.iter().any(|r| r.id == id.0))
    }

    /// `messages --follow` clients connected.
    pub fn followers(&self) -> usize {
        self.clients
            .values()
            .filter(|c| c.follower.is_some())
            .count()
    }

    /// Give `line` (one JSON line, newline included) to every follower whose follow reply
    /// is out, within [`FOLLOW_OUTPUT_LIMIT`] each (else it is counted as dropped for that
    /// follower). Returns how many followers took it.
    pub fn publish(&mut self, line: &[u8]) -> usize {
        let mut took = Vec::new();
        for (&cid, c) in self.clients.iter_mut() {
            let Some(f) = c.follower.as_mut() else {
                continue;
            };
            if !c.in_flight.is_empty() {
                // Its reply (or one before it) is not out yet.
                f.dropped += 1;
                continue;
            }
            let notice = (f.dropped > 0)
                .then(|| super::protocol::Event::Dropped { count: f.dropped }.to_line());
            let need = line.len() + notice.as_ref().map_or(0, Vec::len);
            if c.out.len() + need > FOLLOW_OUTPUT_LIMIT {
                f.dropped += 1;
                continue;
            }
            if let Some(n) = notice {
                c.out.extend_from_slice(&n);
                f.dropped = 0;
            }
            c.out.extend_from_slice(line);
            took.push(cid);
        }
        let mut alive = 0;
        for cid in took {
            if self.flush(cid) {
                alive += 1;
            }
        }
        alive
    }

    /// Accept pending connections (up to [`ACCEPTS_PER_POLL`]; the listener stays readable
    /// for the rest). Clients that are neither root nor sockvisor's euid, and clients beyond
    /// [`MAX_CLIENTS`], get one error line and are closed (logged as a warning).
    fn accept(&mut self) {
        for _ in 0..ACCEPTS_PER_POLL {
            let raw = match socket::accept4(
                self.listener.as_raw_fd(),
                SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            ) {
                Ok(fd) => fd,
                Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e @ (Errno::EMFILE | Errno::ENFILE)) if self.spare.is_some() => {
                    // Out of fds. accept4 fails with EMFILE before it looks at the queue, so
                    // this says nothing about a pending connection: free the spare fd and
                    // try again. A pending connection is taken, told why and closed (else
                    // it would keep the listener readable and spin the loop); none pending
                    // (EAGAIN) ends the loop, else this would retry forever.
                    self.spare = None;
                    let taken = socket::accept4(self.listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC);
                    if let Ok(raw) = taken {
                        // SAFETY: accept4 just returned this fd; nothing else owns it.
                        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                        log::warn!(
                            "control socket {}: accept: {e}; refused a client",
                            self.path().display()
                        );
                        refuse(&fd, &format!("sockvisor is out of file descriptors ({e})"));
                    }
                    self.spare = open_spare();
                    match taken {
                        Ok(_) | Err(Errno::EINTR | Errno::ECONNABORTED) => continue,
                        Err(_) => break,
                    }
                }
                Err(e) => {
                    log::warn!("control socket {}: accept: {e}", self.path().display());
                    break;
                }
            };
            // SAFETY: accept4 just returned this fd; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let (uid, pid) = match socket::getsockopt(&fd, sockopt::PeerCredentials) {
                Ok(c) => (c.uid(), c.pid()),
                Err(e) => {
                    log::warn!("control socket: SO_PEERCRED: {e}; closing the connection");
                    continue;
                }
            };
            if uid != 0 && uid != self.euid {
                log::warn!(
                    "control socket: refused pid {pid} uid {uid} (only root and uid {} may control this sockvisor)",
                    self.euid
                );
                refuse(
                    &fd,
                    &format!(
                        "permission denied: uid {uid} may not control this sockvisor (only root and uid {})",
                        self.euid
                    ),
                );
                continue;
            }
            if self.clients.len() >= MAX_CLIENTS {
                log::warn!(
                    "control socket: refused pid {pid}: already {MAX_CLIENTS} clients connected"
                );
                refuse(
                    &fd,
                    &format!("too many control clients ({MAX_CLIENTS} connected); try again"),
                );
                continue;
            }
            let id = self.next_client;
            if let Err(e) = self
                .epoll
                .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, id))
            {
                log::warn!("control socket: epoll_ctl: {e}");
                continue;
            }
            self.next_client += 1;
            log::debug!("control client #{id} connected: pid {pid} uid {uid}");
            self.clients.insert(
                id,
                Client {
                    fd,
                    input: Vec::new(),
                    start: 0,
                    discarding: false,
                    in_flight: VecDeque::new(),
                    out: Vec::new(),
                    eof: false,
                    interest: EpollFlags::EPOLLIN,
                    follower: None,
                },
            );
        }
    }

    /// Take up to [`REQUESTS_PER_POLL`] requests from client `cid`: complete lines already
    /// buffered first, then what the socket has (at most [`READ_PER_POLL`] bytes).
    fn take_requests(&mut self, cid: u64, requests: &mut Vec<(RequestId, Request)>) {
        let Some(c) = self.clients.get_mut(&cid) else {
            return;
        };
        let mut taken = 0;
        let mut read = 0;
        let mut failed = false;
        if c.follower.is_some() {
            // A follower sends nothing more that counts: read it to notice its EOF.
            c.input.clear();
            c.start = 0;
            let mut buf = [0u8; READ_CHUNK];
            while !c.eof && read < READ_PER_POLL {
                match nix::unistd::read(&c.fd, &mut buf) {
                    Ok(0) => c.eof = true,
                    Ok(n) => read += n,
                    Err(Errno::EINTR) => {}
                    Err(Errno::EAGAIN) => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                self.drop_client(cid);
            }
            return;
        }
        while taken < REQUESTS_PER_POLL && !c.blocked() {
            match next_line(c) {
                Next::Line(line) => {
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    taken += 1;
                    match parse_request(&line) {
                        Ok(request) => {
                            let id = self.next_request;
                            self.next_request += 1;
                            c.in_flight.push_back(InFlight { id, reply: None });
                            let follows = matches!(request, Request::Messages { follow: true });
                            requests.push((RequestId(id), request));
                            if follows {
                                // The last request read from this client.
                                c.follower = Some(Follower {
                                    request: id,
                                    dropped: 0,
                                });
                                c.input.clear();
                                c.start = 0;
                                break;
                            }
                        }
                        Err(e) => answer_now(c, Reply::error(e)),
                    }
                    continue;
                }
                Next::TooLong => {
                    taken += 1;
                    answer_now(
                        c,
                        Reply::error(format!(
                            "request line longer than {MAX_LINE} bytes; ignored"
                        )),
                    );
                    continue;
                }
                Next::End => break,
                Next::NeedMore => {}
            }
            // No complete line buffered: read more, within this poll's budget.
            if c.eof || read >= READ_PER_POLL {
                break;
            }
            if c.start > 0 {
                c.input.drain(..c.start);
                c.start = 0;
            }
            let mut buf = [0u8; READ_CHUNK];
            match nix::unistd::read(&c.fd, &mut buf) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    read += n;
                    c.input.extend_from_slice(&buf[..n]);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::debug!("control client #{cid}: read: {e}");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.drop_client(cid);
        } else if self.clients.get(&cid).is_some_and(|c| !c.out.is_empty()) {
            self.flush(cid);
        }
    }

    /// Write buffered reply bytes (non-blocking). Returns false if the client was gone or
    /// failed.
    fn flush(&mut self, cid: u64) -> bool {
        let Some(c) = self.clients.get_mut(&cid) else {
            return false;
        };
        let mut written = 0;
        while written < c.out.len() {
            match socket::send(
                c.fd.as_raw_fd(),
                &c.out[written..],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => written += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::debug!("control client #{cid}: write: {e}");
                    self.drop_client(cid);
                    return false;
                }
            }
        }
        c.out.drain(..written);
        // Written or buffered; a finished client is closed here, which is no failure.
        self.settle(cid);
        true
    }

    fn drop_client(&mut self, cid: u64) {
        // Closing the fd also removes it from the internal epoll.
        self.clients.remove(&cid);
    }

    /// After a read or write: close a finished client (EOF, everything answered and
    /// written), and make the internal epoll watch what the client still needs: input
    /// while it may send and is not blocked, output while replies wait. Returns whether the
    /// client is still there.
    fn settle(&mut self, cid: u64) -> bool {
        let Some(c) = self.clients.get_mut(&cid) else {
            return false;
        };
        if c.eof
            && c.follower.is_none()
            && c.in_flight.is_empty()
            && c.out.is_empty()
            && !c.has_buffered_line()
        {
            log::debug!("control client #{cid} closed");
            self.drop_client(cid);
            return false;
        }
        let mut want = EpollFlags::empty();
        if !c.eof && !c.blocked() {
            want |= EpollFlags::EPOLLIN;
        }
        if !c.out.is_empty() {
            want |= EpollFlags::EPOLLOUT;
        }
        if want == c.interest {
            return true;
        }
        let result = if want.is_empty() {
            self.epoll.delete(&c.fd)
        } else if c.interest.is_empty() {
            self.epoll.add(&c.fd, EpollEvent::new(want, cid))
        } else {
            self.epoll.modify(&c.fd, &mut EpollEvent::new(want, cid))
        };
        match result {
            Ok(()) => {
                c.interest = want;
                true
            }
            Err(e) => {
                log::warn!("control client #{cid}: epoll_ctl: {e}");
                self.drop_client(cid);
                false
            }
        }
    }

    /// Keep the backlog eventfd readable exactly while some client that may be read has
    /// complete lines buffered (left over by the per-poll cap).
    fn update_backlog(&mut self) {
        let want = self
            .clients
            .values()
            .any(|c| !c.blocked() && c.has_buffered_line());
        if want == self.backlog_armed {
            return;
        }
        let done = if want {
            self.backlog.write(1).map(drop)
        } else {
            self.backlog.read().map(drop)
        };
        match done {
            Ok(()) | Err(Errno::EAGAIN) => self.backlog_armed = want,
            Err(e) => log::warn!("control socket: eventfd: {e}"),
        }
    }
}

/// What the buffered input holds next.
enum Next {
    /// A complete line (without its newline), or the unterminated last one at EOF.
    Line(Vec<u8>),
    /// A line longer than [`MAX_LINE`]: answered with an error, skipped to its newline.
    TooLong,
    /// Nothing complete yet: read more.
    NeedMore,
    /// EOF and nothing left.
    End,
}

fn next_line(c: &mut Client) -> Next {
    loop {
        if let Some(i) = c.pending().iter().position(|&b| b == b'\n') {
            let start = c.start;
            c.start += i + 1;
            if std::mem::take(&mut c.discarding) {
                continue; // the end of an over-long line
            }
            if i > MAX_LINE {
                return Next::TooLong;
            }
            return Next::Line(c.input[start..start + i].to_vec());
        }
        if c.discarding {
            c.start = c.input.len();
        } else if c.pending().len() > MAX_LINE {
            c.start = c.input.len();
            c.discarding = true;
            return Next::TooLong;
        }
        if !c.eof {
            return Next::NeedMore;
        }
        let last = c.pending().to_vec();
        c.start = c.input.len();
        return if last.is_empty() {
            Next::End
        } else {
            Next::Line(last)
        };
    }
}

/// A line that is not a request: its error reply takes its place in the order.
fn answer_now(c: &mut Client, reply: Reply) {
    let line = reply.to_line();
    if c.in_flight.is_empty() {
        c.out.extend_from_slice(&line);
    } else {
        // Held behind the requests before it; its id is never handed out.
        c.in_flight.push_back(InFlight {
            id: 0,
            reply: Some(line),
        });
    }
}

fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

/// Best effort: one error line to a client we are about to close.
fn refuse(fd: &OwnedFd, error: &str) {
    let _ = socket::send(
        fd.as_raw_fd(),
        &Reply::error(error).to_line(),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
}
