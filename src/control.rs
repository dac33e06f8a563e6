//! The control socket (`sockvisor status | reload | scale N`): a unix stream socket,
//! mode 0600, peer credentials checked (root or sockvisor's own uid). One JSON request and
//! one JSON reply per line (docs/control.md).
//!
//! # Server: built for a single-threaded epoll loop
//!
//! [`ControlServer`] never blocks and never spawns a thread. It keeps an epoll instance of
//! its own for the listening socket and its clients, so the supervisor registers **one**
//! fd, [`ControlServer::as_fd`] (level-triggered `EPOLLIN`), and when it is readable calls
//! [`ControlServer::poll`]: that accepts, checks peer credentials, reads, splits lines,
//! flushes buffered replies, and returns the requests as `(ClientId, Result<Request, String>)`.
//! The supervisor answers each one, now or later (a reload answers when it is done), with
//! [`ControlServer::reply`]; an `Err` is a line that was not a request and gets
//! `Reply::error`. A reply to a client that has gone is a no-op.
//!
//! ```ignore
//! epoll.add(control.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, TOKEN_CONTROL))?;
//! // on TOKEN_CONTROL:
//! for (client, request) in control.poll() {
//!     match request {
//!         Ok(Request::Status) => { control.reply(client, &Reply::with_status(self.status())); }
//!         Ok(Request::Reload) => self.start_reload(Some(client)), // reply when it ends
//!         Ok(Request::Scale { workers }) => { /* ... */ }
//!         Err(e) => { control.reply(client, &Reply::error(e)); }
//!     }
//! }
//! ```
//!
//! Lower-level pieces ([`ControlServer::accept`], [`ControlServer::read`],
//! [`ControlServer::client_fds`], [`ControlServer::flush`]) are public too, for a loop that
//! wants to register each client itself under a token derived from [`ClientId`]; `poll` is
//! simpler and handles half-closed clients without busy-looping.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Reload,
    Scale { workers: usize },
}

/// One worker in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    /// starting | ready | draining | stopping
    pub state: String,
    pub uptime_secs: f64,
    pub restarts: u64,
    pub dispatched: u64,
    pub queued: u64,
    /// Open connections, when the worker reports closes.
    pub open: Option<u64>,
    /// The worker's last `STATUS=`.
    pub status: Option<String>,
}

/// `status` reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub pid: i32,
    pub generation: u64,
    /// starting | running | reloading | stopping
    pub state: String,
    pub workers_wanted: usize,
    pub summary: String,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub policy: String,
    /// Why the policy is not the one asked for (`auto` that fell back to `shared`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub policy_note: Option<String>,
    /// Connections sockvisor accepted; `None` where the workers accept (shared, reuseport).
    pub accepted: Option<u64>,
    pub pending: u64,
}

/// Every reply: `{"ok":true,...}` or `{"ok":false,"error":"..."}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub status: Option<FleetStatus>,
}

impl Reply {
    /// `{"ok":true}` with an optional message.
    pub fn ok(message: Option<String>) -> Reply {
        Reply {
            ok: true,
            error: None,
            message,
            status: None,
        }
    }

    /// `{"ok":false,"error":...}`
    pub fn error(error: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(error.into()),
            message: None,
            status: None,
        }
    }

    /// `{"ok":true,"status":{...}}`
    pub fn with_status(status: FleetStatus) -> Reply {
        Reply {
            ok: true,
            error: None,
            message: None,
            status: Some(status),
        }
    }
}

/// Longest request line (bytes, without the newline). A longer one is answered with one
/// error (as an `Err` from `read`/`poll`) and skipped up to its newline.
pub const MAX_LINE: usize = 64 * 1024;
/// Clients connected at once; more are answered with an error and closed.
pub const MAX_CLIENTS: usize = 16;
/// Reply bytes kept for a client that does not read them; beyond that it is dropped.
pub const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Bytes read from one client per `read` call, so one client cannot hog the loop (the
/// level-triggered epoll calls again).
const READ_BUDGET: usize = 256 * 1024;
/// Internal epoll token of the listening socket; clients use their id (from 1).
const LISTENER_TOKEN: u64 = 0;

/// A connected control client. Ids are never reused during a server's life (they start at 1
/// and count up), so a late reply cannot reach the wrong client. A loop that registers
/// clients itself can use `id.0` (plus its own offset) as the epoll token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "control client #{}", self.0)
    }
}

struct Client {
    fd: OwnedFd,
    uid: u32,
    pid: i32,
    /// The current (incomplete) line.
    line: Vec<u8>,
    /// Inside an over-long line: skip to the next newline.
    discarding: bool,
    /// Reply bytes the socket did not take yet.
    out: Vec<u8>,
    /// Requests handed out (including `Err` ones) that were not replied to yet.
    pending: usize,
    /// The client shut down its writing side (or closed): no more requests.
    eof: bool,
    /// What the internal epoll watches for it (empty: not registered).
    interest: EpollFlags,
}

pub struct ControlServer {
    path: PathBuf,
    listener: OwnedFd,
    epoll: Epoll,
    /// (dev, ino) of the socket file we bound, so drop removes only our own.
    ident: (u64, u64),
    clients: BTreeMap<u64, Client>,
    next_id: u64,
    euid: u32,
    gone: Vec<ClientId>,
    /// An fd held in reserve to accept (and refuse) a connection when out of fds.
    spare: Option<OwnedFd>,
}

impl ControlServer {
    /// Bind the control socket at `path`.
    ///
    /// The parent directory is created (mode 0700) when missing; an existing one must not be
    /// a symlink, must be owned by root or sockvisor's euid, and must not be writable by
    /// others unless it is root-owned and sticky (`/tmp`). An existing socket at `path` that
    /// answers means another sockvisor is running: an error. A stale one is removed; anything
    /// that is not a socket (a symlink included) is an error. The socket is mode 0600 and is
    /// removed on drop.
    pub fn bind(path: &Path) -> io::Result<ControlServer> {
        let euid = nix::unistd::geteuid().as_raw();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        check_parent(parent, euid)?;
        let addr = UnixAddr::new(path).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "control socket path {} is not usable ({e}; at most 107 bytes)",
                    path.display()
                ),
            )
        })?;
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if socket_answers(&addr)? {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!(
                            "another sockvisor is already running at {} (set control_socket to run a second one)",
                            path.display()
                        ),
                    ));
                }
                log::debug!("removing stale control socket {}", path.display());
                std::fs::remove_file(path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket; refusing to replace it",
                        path.display()
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = socket::socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::bind(listener.as_raw_fd(), &addr)?;
        let meta = std::fs::symlink_metadata(path)?;
        let ident = (meta.dev(), meta.ino());
        let cleanup = |e: io::Error| {
            let _ = std::fs::remove_file(path);
            e
        };
        // Peer credentials are checked on every connection anyway; the mode keeps other
        // users from even connecting.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
        socket::listen(&listener, socket::Backlog::new(MAX_CLIENTS as i32)?)
            .map_err(|e| cleanup(e.into()))?;
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| cleanup(e.into()))?;
        epoll
            .add(
                &listener,
                EpollEvent::new(EpollFlags::EPOLLIN, LISTENER_TOKEN),
            )
            .map_err(|e| cleanup(e.into()))?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            listener,
            epoll,
            ident,
            clients: BTreeMap::new(),
            next_id: 1,
            euid,
            gone: Vec::new(),
            spare: open_spare(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The one fd to register with the supervisor's epoll (level-triggered `EPOLLIN`):
    /// readable when [`ControlServer::poll`] has work. (An epoll fd of our own that watches
    /// the listener and every client.)
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.epoll.0.as_fd()
    }

    /// The listening socket itself, for a loop that registers it directly and calls
    /// [`ControlServer::accept`].
    pub fn listener_fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Do everything that is ready (accept, read, flush) without blocking, and return the
    /// request lines received, in order per client.
    pub fn poll(&mut self) -> Vec<(ClientId, Result<Request, String>)> {
        let mut out = Vec::new();
        let mut events = [EpollEvent::empty(); 32];
        let n = loop {
            match self.epoll.wait(&mut events, 0u8) {
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    log::warn!("control socket: epoll_wait: {e}");
                    return out;
                }
                Ok(n) => break n,
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER_TOKEN {
                self.accept();
                continue;
            }
            let id = ClientId(token);
            let flags = ev.events();
            // On a hangup, try the write too: a client waiting for buffered output that went
            // away is dropped (EPIPE) instead of staying readable forever.
            if flags.intersects(EpollFlags::EPOLLOUT | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR)
            {
                self.flush(id);
            }
            if flags.intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                out.extend(self.read(id).into_iter().map(|r| (id, r)));
            }
        }
        out
    }

    /// Accept every pending connection (until EAGAIN). Clients that are neither root nor
    /// sockvisor's euid get one error line and are closed (logged as a warning), as are
    /// clients beyond [`MAX_CLIENTS`]. Returns the clients accepted; they are already
    /// watched by [`ControlServer::as_fd`].
    pub fn accept(&mut self) -> Vec<ClientId> {
        let mut accepted = Vec::new();
        loop {
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
                            self.path.display()
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
                    log::warn!("control socket {}: accept: {e}", self.path.display());
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
            let id = self.next_id;
            self.next_id += 1;
            if let Err(e) = self
                .epoll
                .add(&fd, EpollEvent::new(EpollFlags::EPOLLIN, id))
            {
                log::warn!("control socket: epoll_ctl: {e}");
                continue;
            }
            log::debug!("control client #{id} connected: pid {pid} uid {uid}");
            self.clients.insert(
                id,
                Client {
                    fd,
                    uid,
                    pid,
                    line: Vec::new(),
                    discarding: false,
                    out: Vec::new(),
                    pending: 0,
                    eof: false,
                    interest: EpollFlags::EPOLLIN,
                },
            );
            accepted.push(ClientId(id));
        }
        accepted
    }

    /// Connected clients and their sockets (for a loop that registers them itself).
    pub fn client_fds(&self) -> impl Iterator<Item = (ClientId, BorrowedFd<'_>)> + '_ {
        self.clients
            .iter()
            .map(|(id, c)| (ClientId(*id), c.fd.as_fd()))
    }

    /// One client's socket, if it is still connected.
    pub fn client_fd(&self, id: ClientId) -> Option<BorrowedFd<'_>> {
        self.clients.get(&id.0).map(|c| c.fd.as_fd())
    }

    /// Whether `id` is still connected.
    pub fn contains(&self, id: ClientId) -> bool {
        self.clients.contains_key(&id.0)
    }

    /// Peer credentials (uid, pid) of a connected client.
    pub fn client_credentials(&self, id: ClientId) -> Option<(u32, i32)> {
        self.clients.get(&id.0).map(|c| (c.uid, c.pid))
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    /// Read what `id` sent (non-blocking, bounded) and return its complete lines as
    /// requests. Blank lines are skipped; a line that is not a request, or is longer than
    /// [`MAX_LINE`], is an `Err` with the message to send back. At end of input an
    /// unterminated last line counts as a line. A client that closed is kept until it has
    /// its replies, then removed; removed clients are listed by
    /// [`ControlServer::take_gone`].
    pub fn read(&mut self, id: ClientId) -> Vec<Result<Request, String>> {
        let mut requests = Vec::new();
        let Some(c) = self.clients.get_mut(&id.0) else {
            return requests;
        };
        let mut buf = [0u8; 16 * 1024];
        let mut budget = READ_BUDGET;
        let mut failed = false;
        while !c.eof && budget > 0 {
            match nix::unistd::read(&c.fd, &mut buf) {
                Ok(0) => {
                    c.eof = true;
                    if !c.line.is_empty() && !c.discarding {
                        let line = std::mem::take(&mut c.line);
                        c.pending += 1;
                        requests.push(parse_request(&line));
                    }
                }
                Ok(n) => {
                    budget = budget.saturating_sub(n);
                    split_lines(c, &buf[..n], &mut requests);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::debug!("{id}: read: {e}");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            // The replies could not be delivered either.
            self.drop_client(id);
        } else {
            self.settle(id);
        }
        requests
    }

    /// Send one reply line. Returns false if the client is gone (or was dropped because it
    /// does not read its replies). What the socket cannot take now is buffered (bounded by
    /// [`MAX_PENDING_OUTPUT`]) and flushed as the client reads.
    pub fn reply(&mut self, id: ClientId, reply: &Reply) -> bool {
        let Some(c) = self.clients.get_mut(&id.0) else {
            return false;
        };
        c.pending = c.pending.saturating_sub(1);
        let mut line = match serde_json::to_vec(reply) {
            Ok(v) => v,
            Err(e) => {
                // Cannot happen for these types; never panic on it.
                log::warn!("{id}: cannot encode reply: {e}");
                serde_json::to_vec(&Reply::error("internal error: cannot encode the reply"))
                    .unwrap_or_else(|_| br#"{"ok":false}"#.to_vec())
            }
        };
        line.push(b'\n');
        if c.out.len() + line.len() > MAX_PENDING_OUTPUT {
            log::warn!("{id} does not read its replies; dropping it");
            self.drop_client(id);
            return false;
        }
        c.out.extend_from_slice(&line);
        self.flush(id)
    }

    /// Whether `id` has reply bytes waiting for its socket to take them.
    pub fn wants_write(&self, id: ClientId) -> bool {
        self.clients.get(&id.0).is_some_and(|c| !c.out.is_empty())
    }

    /// Write buffered reply bytes (non-blocking). Returns false if the client is gone or
    /// failed.
    pub fn flush(&mut self, id: ClientId) -> bool {
        let Some(c) = self.clients.get_mut(&id.0) else {
            return false;
        };
        let mut written = 0;
        let mut failed = false;
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
                    log::debug!("{id}: write: {e}");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.drop_client(id);
            return false;
        }
        c.out.drain(..written);
        // Written or buffered: a client at EOF that has all its replies is closed here.
        self.settle(id);
        true
    }

    /// Close a client now (its unsent replies are dropped). Closing its fd also removes it
    /// from any epoll it was registered with.
    pub fn close(&mut self, id: ClientId) {
        if let Some(c) = self.clients.remove(&id.0) {
            let _ = self.epoll.delete(&c.fd);
        }
    }

    /// Clients that went away on their own (closed, errors, dropped) since the last call.
    pub fn take_gone(&mut self) -> Vec<ClientId> {
        std::mem::take(&mut self.gone)
    }

    fn drop_client(&mut self, id: ClientId) {
        if self.clients.contains_key(&id.0) {
            self.close(id);
            self.gone.push(id);
        }
    }

    /// After a read or write: close a finished half-closed client, and make the internal
    /// epoll watch what the client still needs (input until EOF, output while buffered), so
    /// a half-closed client waiting for a slow reply does not keep `as_fd` readable.
    /// Returns whether the client is still there.
    fn settle(&mut self, id: ClientId) -> bool {
        let Some(c) = self.clients.get_mut(&id.0) else {
            return false;
        };
        if c.eof && c.pending == 0 && c.out.is_empty() {
            log::debug!("{id} closed");
            self.drop_client(id);
            return false;
        }
        let mut want = EpollFlags::empty();
        if !c.eof {
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
            self.epoll.add(&c.fd, EpollEvent::new(want, id.0))
        } else {
            self.epoll.modify(&c.fd, &mut EpollEvent::new(want, id.0))
        };
        match result {
            Ok(()) => {
                c.interest = want;
                true
            }
            Err(e) => {
                log::warn!("{id}: epoll_ctl: {e}");
                self.drop_client(id);
                false
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        // Only our own socket: another sockvisor may have replaced a file we lost.
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.file_type().is_socket() && (m.dev(), m.ino()) == self.ident {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn split_lines(c: &mut Client, mut data: &[u8], requests: &mut Vec<Result<Request, String>>) {
    while !data.is_empty() {
        let (chunk, rest, complete) = match data.iter().position(|&b| b == b'\n') {
            Some(i) => (&data[..i], &data[i + 1..], true),
            None => (data, &data[data.len()..], false),
        };
        data = rest;
        if c.discarding {
            if complete {
                c.discarding = false;
            }
            continue;
        }
        if c.line.len() + chunk.len() > MAX_LINE {
            c.line.clear();
            c.discarding = !complete;
            c.pending += 1;
            requests.push(Err(format!(
                "request line longer than {MAX_LINE} bytes; ignored"
            )));
            continue;
        }
        c.line.extend_from_slice(chunk);
        if complete {
            let line = std::mem::take(&mut c.line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            c.pending += 1;
            requests.push(parse_request(&line));
        }
    }
}

fn parse_request(line: &[u8]) -> Result<Request, String> {
    serde_json::from_slice::<Request>(line).map_err(|e| {
        format!(
            r#"bad request ({e}); expected one JSON object per line: {{"cmd":"status"}}, {{"cmd":"reload"}} or {{"cmd":"scale","workers":N}}"#
        )
    })
}

fn open_spare() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

/// Best effort: one error line to a client we are about to close.
fn refuse(fd: &OwnedFd, error: &str) {
    if let Ok(mut line) = serde_json::to_vec(&Reply::error(error)) {
        line.push(b'\n');
        let _ = socket::send(
            fd.as_raw_fd(),
            &line,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        );
    }
}

/// Does a server answer at `addr`? (non-blocking connect: a full backlog counts as alive)
fn socket_answers(addr: &UnixAddr) -> io::Result<bool> {
    let probe = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    match socket::connect(probe.as_raw_fd(), addr) {
        Ok(()) | Err(Errno::EAGAIN) | Err(Errno::EINPROGRESS) => Ok(true),
        Err(Errno::ECONNREFUSED) | Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot probe the existing control socket: {e}"),
        )),
    }
}

fn check_parent(parent: &Path, euid: u32) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(parent) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "cannot create the control socket directory {}: {e}",
                            parent.display()
                        ),
                    )
                })?;
            std::fs::symlink_metadata(parent)?
        }
        Err(e) => return Err(e),
    };
    let refuse = |why: String| {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "control socket directory {} {why}; refusing to use it (set control_socket to another path)",
                parent.display()
            ),
        ))
    };
    if meta.file_type().is_symlink() {
        return refuse("is a symlink".into());
    }
    if !meta.is_dir() {
        return refuse("is not a directory".into());
    }
    let mode = meta.mode();
    if meta.uid() != 0 && meta.uid() != euid {
        return refuse(format!("is owned by uid {}", meta.uid()));
    }
    if mode & 0o002 != 0 && !(meta.uid() == 0 && mode & 0o1000 != 0) {
        return refuse("is writable by other users and not a root-owned sticky directory".into());
    }
    Ok(())
}

/// Why a control request failed (the reply itself may also be `ok: false`).
#[derive(Debug)]
pub enum ClientError {
    /// Nothing listens at the path.
    NotRunning {
        path: PathBuf,
    },
    /// The socket (or its directory) is not ours to use.
    PermissionDenied {
        path: PathBuf,
    },
    /// No reply within the timeout.
    Timeout {
        path: PathBuf,
        after: Duration,
    },
    /// The reply was not a reply.
    Protocol {
        path: PathBuf,
        detail: String,
    },
    Io {
        path: PathBuf,
        error: io::Error,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NotRunning { path } => write!(
                f,
                "no sockvisor is running at {} (is the service started? use --control PATH)",
                path.display()
            ),
            ClientError::PermissionDenied { path } => write!(
                f,
                "permission denied on {} (run as root or as the user sockvisor runs as)",
                path.display()
            ),
            ClientError::Timeout { path, after } => write!(
                f,
                "no reply from sockvisor at {} within {:.1}s",
                path.display(),
                after.as_secs_f64()
            ),
            ClientError::Protocol { path, detail } => {
                write!(f, "unexpected reply from {}: {detail}", path.display())
            }
            ClientError::Io { path, error } => write!(f, "{}: {error}", path.display()),
        }
    }
}

impl std::error::Error for ClientError {}

/// Largest reply the client accepts.
const MAX_REPLY: usize = 64 << 20;

/// Send one request and wait (at most `timeout`, in total) for its reply. Blocking: for the
/// `sockvisor status|reload|scale` commands. `reload` replies when the reload is over, so
/// give it at least the reload timeout.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ClientError> {
    let deadline = Instant::now() + timeout;
    let p = || path.to_path_buf();
    let io_err = |error: io::Error| match error.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path: p() }
        }
        io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: p() },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: p(),
            after: timeout,
        },
        _ => ClientError::Io { path: p(), error },
    };
    let remaining = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(ClientError::Timeout {
                path: p(),
                after: timeout,
            })
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol {
        path: p(),
        detail: e.to_string(),
    })?;
    line.push(b'\n');
    stream
        .set_write_timeout(Some(remaining()?))
        .map_err(io_err)?;
    // A server that refuses us (peer credentials) writes its error and closes, maybe before
    // our write: read its reply anyway.
    let write_error = match stream.write_all(&line) {
        Ok(()) => None,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            Some(e)
        }
        Err(e) => return Err(io_err(e)),
    };
    let mut reply = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        stream
            .set_read_timeout(Some(remaining()?))
            .map_err(io_err)?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(write_error.unwrap_or(e))),
        };
        if n == 0 {
            if let (true, Some(e)) = (reply.is_empty(), write_error) {
                return Err(io_err(e));
            }
            if reply.is_empty() {
                return Err(ClientError::Protocol {
                    path: p(),
                    detail: "sockvisor closed the connection without replying".into(),
                });
            }
            break;
        }
        if let Some(i) = buf[..n].iter().position(|&b| b == b'\n') {
            reply.extend_from_slice(&buf[..i]);
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        if reply.len() > MAX_REPLY {
            return Err(ClientError::Protocol {
                path: p(),
                detail: format!("reply longer than {MAX_REPLY} bytes"),
            });
        }
    }
    serde_json::from_slice(&reply).map_err(|e| ClientError::Protocol {
        path: p(),
        detail: format!(
            "{e}: {}",
            String::from_utf8_lossy(&reply[..reply.len().min(200)])
        ),
    })
}

/// `3s`, `5m12s`, `2h3m`, `4d5h`.
pub fn format_uptime(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{}s", s / 60, s % 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The human `sockvisor status`: a summary line, the listeners, then one row per worker.
pub fn format_status_table(status: &FleetStatus) -> String {
    let mut out = format!(
        "sockvisor {} (pid {}, generation {}): {}\n",
        status.state, status.pid, status.generation, status.summary
    );
    if !status.listeners.is_empty() {
        out.push('\n');
        let mut rows = vec![["LISTENER", "ADDRESS", "POLICY", "ACCEPTED", "PENDING"]
            .map(String::from)
            .to_vec()];
        for l in &status.listeners {
            rows.push(vec![
                l.name.clone(),
                l.address.clone(),
                l.policy.clone(),
                l.accepted.map_or("-".to_string(), |a| a.to_string()),
                l.pending.to_string(),
            ]);
        }
        out.push_str(&table(&rows));
        for l in &status.listeners {
            if let Some(note) = &l.policy_note {
                out.push_str(&format!("{}: {}, {note}\n", l.name, l.policy));
            }
        }
    }
    out.push('\n');
    let mut rows = vec![[
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "UPTIME",
        "RESTARTS",
        "DISPATCHED",
        "QUEUED",
        "OPEN",
        "STATUS",
    ]
    .map(String::from)
    .to_vec()];
    for w in &status.workers {
        rows.push(vec![
            w.slot.to_string(),
            w.pid.to_string(),
            w.generation.to_string(),
            w.state.clone(),
            format_uptime(w.uptime_secs),
            w.restarts.to_string(),
            w.dispatched.to_string(),
            w.queued.to_string(),
            w.open.map_or_else(|| "-".to_string(), |o| o.to_string()),
            w.status
                .as_deref()
                .unwrap_or("-")
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect(),
        ]);
    }
    if status.workers.is_empty() {
        out.push_str("(no workers)\n");
    } else {
        out.push_str(&table(&rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn sample_status() -> FleetStatus {
        FleetStatus {
            pid: 4242,
            generation: 2,
            state: "running".into(),
            workers_wanted: 2,
            summary: "2/2 workers ready".into(),
            workers: vec![
                WorkerStatus {
                    slot: 0,
                    pid: 100,
                    generation: 2,
                    state: "ready".into(),
                    uptime_secs: 312.4,
                    restarts: 1,
                    dispatched: 1000,
                    queued: 3,
                    open: Some(7),
                    status: Some("serving".into()),
                },
                WorkerStatus {
                    slot: 1,
                    pid: 101,
                    generation: 2,
                    state: "starting".into(),
                    uptime_secs: 3.0,
                    restarts: 0,
                    dispatched: 0,
                    queued: 0,
                    open: None,
                    status: None,
                },
            ],
            listeners: vec![ListenerStatus {
                name: "web".into(),
                address: "tcp://127.0.0.1:8000".into(),
                policy: "round-robin".into(),
                policy_note: None,
                accepted: Some(1000),
                pending: 0,
            }],
        }
    }

    /// Run the server's side until `done` says so, waiting on `as_fd` like the supervisor
    /// (bounded: 10 s). `handle` answers each request.
    fn serve(
        server: &mut ControlServer,
        mut done: impl FnMut(&mut ControlServer) -> bool,
        mut handle: impl FnMut(&mut ControlServer, ClientId, Result<Request, String>),
    ) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done(server) {
            assert!(Instant::now() < deadline, "test server loop timed out");
            let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(50u8));
            for (id, r) in server.poll() {
                handle(server, id, r);
            }
        }
    }

    fn answer(server: &mut ControlServer, id: ClientId, r: Result<Request, String>) {
        let reply = match r {
            Ok(Request::Status) => Reply::with_status(sample_status()),
            Ok(Request::Reload) => Reply::ok(Some("reloaded".into())),
            Ok(Request::Scale { workers }) => Reply::ok(Some(format!("scaled to {workers}"))),
            Err(e) => Reply::error(e),
        };
        server.reply(id, &reply);
    }

    #[test]
    fn round_trip_with_blocking_client() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        // Parent created 0700, socket 0600.
        let pm = std::fs::metadata(path.parent().unwrap()).unwrap();
        assert_eq!(pm.mode() & 0o7777, 0o700);
        let sm = std::fs::symlink_metadata(&path).unwrap();
        assert!(sm.file_type().is_socket());
        assert_eq!(sm.mode() & 0o777, 0o600);

        let p = path.clone();
        let client = std::thread::spawn(move || {
            let t = Duration::from_secs(5);
            (
                request(&p, &Request::Status, t).unwrap(),
                request(&p, &Request::Scale { workers: 3 }, t).unwrap(),
                request(&p, &Request::Reload, t).unwrap(),
            )
        });
        serve(&mut server, |_| client.is_finished(), answer);
        let (status, scale, reload) = client.join().unwrap();
        assert!(status.ok);
        assert_eq!(status.status, Some(sample_status()));
        assert_eq!(scale.message.as_deref(), Some("scaled to 3"));
        assert_eq!(reload.message.as_deref(), Some("reloaded"));
        // Each client closed after its reply; the server forgets it.
        serve(&mut server, |s| s.client_count() == 0, answer);
        assert_eq!(server.take_gone().len(), 3);

        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn pipelined_garbage_and_over_long_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let writer = {
            let mut c = c.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut msg = b"garbage\n\n{\"cmd\":\"scale\",\"workers\":2}\n".to_vec();
                msg.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
                msg.extend(b"\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n");
                c.write_all(&msg).unwrap();
            })
        };
        let got = std::cell::RefCell::new(Vec::new());
        serve(
            &mut server,
            |_| got.borrow().len() >= 5,
            |s, id, r| {
                got.borrow_mut().push(r.clone());
                answer(s, id, r)
            },
        );
        writer.join().unwrap();
        let got = got.into_inner();
        assert!(got[0].as_ref().unwrap_err().starts_with("bad request"));
        assert_eq!(got[1], Ok(Request::Scale { workers: 2 }));
        assert!(got[2].as_ref().unwrap_err().contains("longer than"));
        assert!(got[3].is_err());
        assert_eq!(got[4], Ok(Request::Status));

        let mut lines = io::BufReader::new(&mut c).lines();
        let mut replies = Vec::new();
        for _ in 0..5 {
            let l = lines.next().unwrap().unwrap();
            replies.push(serde_json::from_str::<Reply>(&l).unwrap());
        }
        let oks: Vec<bool> = replies.iter().map(|r| r.ok).collect();
        assert_eq!(oks, [false, true, false, false, true]);
        assert!(replies[0]
            .error
            .as_deref()
            .unwrap()
            .contains(r#"{"cmd":"status"}"#));
    }

    #[test]
    fn half_closed_client_gets_late_reply() {
        // `echo '{"cmd":"reload"}' | socat - UNIX-CONNECT:...`: request, then EOF, then the
        // reply comes when the reload is over.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(br#"{"cmd":"reload"}"#).unwrap(); // no newline: EOF ends it
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let pending = std::cell::Cell::new(None);
        serve(
            &mut server,
            |_| pending.get().is_some(),
            |_, id, r| {
                assert_eq!(r, Ok(Request::Reload));
                pending.set(Some(id));
            },
        );
        let id = pending.get().unwrap();
        // Half-closed and waiting: the server's fd is quiet (no busy loop) and the client
        // is still there.
        for _ in 0..3 {
            assert!(server.poll().is_empty());
        }
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
        assert_eq!(poll(&mut fds, PollTimeout::ZERO).unwrap(), 0);
        assert!(server.contains(id));
        assert!(server.reply(id, &Reply::ok(Some("done".into()))));
        // Replied and at EOF: closed.
        assert!(!server.contains(id));
        assert_eq!(server.take_gone(), vec![id]);
        let mut s = String::new();
        c.read_to_string(&mut s).unwrap();
        assert_eq!(s, "{\"ok\":true,\"message\":\"done\"}\n");
        // Replying to a gone client is a no-op.
        assert!(!server.reply(id, &Reply::ok(None)));
    }

    #[test]
    fn slow_reader_is_buffered_then_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let c = UnixStream::connect(&path).unwrap();
        let id = server.accept()[0];
        let big = Reply::ok(Some("x".repeat(1 << 20)));
        assert!(server.reply(id, &big));
        assert!(server.wants_write(id), "1 MiB does not fit a socket buffer");
        // The client reads: the server's poll flushes the rest.
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            io::BufReader::new(&c).read_line(&mut line).unwrap();
            (line.len(), c)
        });
        serve(&mut server, |s| !s.wants_write(id), answer);
        let (len, c) = reader.join().unwrap();
        assert_eq!(len, (1 << 20) + r#"{"ok":true,"message":""}"#.len() + 1);
        // A client that never reads is dropped once too much is waiting for it.
        let mut delivered = 0;
        while server.reply(id, &big) {
            delivered += 1;
            assert!(delivered < 10);
        }
        assert!(!server.contains(id));
        assert_eq!(server.take_gone(), vec![id]);
        drop(c);
    }

    #[test]
    fn stale_socket_replaced_live_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
        let server = ControlServer::bind(&path).unwrap();
        let e = ControlServer::bind(&path).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(
            e.to_string()
                .contains("another sockvisor is already running"),
            "{e}"
        );
        // The failed second bind did not remove the first one's socket.
        assert!(path.exists());
        drop(server);
        assert!(!path.exists());

        std::fs::write(&path, b"not a socket").unwrap();
        assert!(ControlServer::bind(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
        assert!(ControlServer::bind(&path).is_err());
    }

    #[test]
    fn unsafe_parents_refused() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ControlServer::bind(&link.join("c.sock")).err().unwrap();
        assert!(e.to_string().contains("symlink"), "{e}");

        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ControlServer::bind(&real.join("c.sock")).err().unwrap();
        assert!(e.to_string().contains("writable by other users"), "{e}");
        // Sticky and ours (not root's, unless running as root) is still refused unless root.
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let r = ControlServer::bind(&real.join("c.sock"));
        assert_eq!(r.is_ok(), nix::unistd::geteuid().is_root());
    }

    #[test]
    fn client_errors_are_clear() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let e = request(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::NotRunning { .. }));
        assert!(
            e.to_string().starts_with("no sockvisor is running at"),
            "{e}"
        );

        // A server that never answers: timeout.
        let _server = ControlServer::bind(&path).unwrap();
        let t = Instant::now();
        let e = request(&path, &Request::Reload, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn too_many_clients_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();
        let conns: Vec<UnixStream> = (0..MAX_CLIENTS + 1)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        let accepted = server.accept();
        assert_eq!(accepted.len(), MAX_CLIENTS);
        assert_eq!(server.client_fds().count(), MAX_CLIENTS);
        let mut last = io::BufReader::new(&conns[MAX_CLIENTS]);
        let mut line = String::new();
        last.read_line(&mut line).unwrap();
        let r: Reply = serde_json::from_str(&line).unwrap();
        assert!(!r.ok && r.error.unwrap().contains("too many"));
    }

    #[test]
    fn other_uid_refused_by_peer_credentials() {
        if !crate::prereq::require(
            crate::prereq::is_root(),
            "needs root to connect as uid 65534",
        ) {
            return;
        }
        let python = Path::new("/usr/bin/python3");
        if !crate::prereq::require(python.exists(), "/usr/bin/python3 not found") {
            return;
        }
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let path = dir.path().join("ctl.sock");
        let mut server = ControlServer::bind(&path).unwrap();

        let script = "import socket,sys\n\
            s=socket.socket(socket.AF_UNIX)\n\
            try:\n s.connect(sys.argv[1])\n\
            except PermissionError:\n print('EACCES'); sys.exit(0)\n\
            try:\n s.sendall(b'{\"cmd\":\"status\"}\\n')\n\
            except OSError:\n pass\n\
            print(s.makefile().readline().strip())\n";
        let run = || {
            std::process::Command::new(python)
                .args(["-c", script])
                .arg(&path)
                .uid(65534)
                .gid(65534)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        // Mode 0600: the kernel refuses the connection itself.
        let out = run().wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "EACCES");

        // Even with the mode opened up, peer credentials refuse it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let mut child = run();
        serve(
            &mut server,
            |_| child.try_wait().unwrap().is_some(),
            |_, _, r| panic!("a refused client got through: {r:?}"),
        );
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let r: Reply = serde_json::from_str(out.trim()).unwrap();
        assert!(!r.ok);
        assert!(r.error.unwrap().starts_with("permission denied: uid 65534"));
        assert_eq!(server.client_count(), 0);
    }

    #[test]
    fn status_table() {
        let t = format_status_table(&sample_status());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "sockvisor running (pid 4242, generation 2): 2/2 workers ready"
        );
        assert!(lines[2].starts_with("LISTENER  ADDRESS"));
        assert!(lines[3].starts_with("web       tcp://127.0.0.1:8000  round-robin  1000"));
        assert!(lines[5].starts_with("SLOT  PID  GEN  STATE     UPTIME  RESTARTS  DISPATCHED"));
        assert_eq!(
            lines[6],
            "0     100  2    ready     5m12s   1         1000        3       7     serving"
        );
        assert_eq!(
            lines[7],
            "1     101  2    starting  3s      0         0           0       -     -"
        );
        assert_eq!(format_uptime(7380.0), "2h3m");
        assert_eq!(format_uptime(-1.0), "0s");
        assert_eq!(format_uptime(f64::NAN), "0s");
        assert_eq!(format_uptime(90000.0), "1d1h");
    }

    #[test]
    fn json_shapes() {
        assert_eq!(
            serde_json::to_string(&Request::Scale { workers: 4 }).unwrap(),
            r#"{"cmd":"scale","workers":4}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::error("x")).unwrap(),
            r#"{"ok":false,"error":"x"}"#
        );
        assert_eq!(
            serde_json::to_string(&Reply::ok(None)).unwrap(),
            r#"{"ok":true}"#
        );
    }
}
