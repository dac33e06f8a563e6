//! The Rust API for workers: take listeners by name, accept connections in every mode.
//!
//! A worker started by sockvisor (or directly by systemd) gets its sockets through
//! `LISTEN_FDS`/`LISTEN_FDNAMES`. For a dispatched stream listener the fd is one end of a
//! sockvisor channel (`SOCK_SEQPACKET`) carrying accepted connections; for a shared one it is
//! the listening socket itself; datagram sockets are always shared. [`Incoming::accept`]
//! hides the difference, so the same worker runs under sockvisor in any dispatch mode, under
//! plain systemd socket activation, or under `systemd-socket-activate`.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use sockvisor::worker::{self, Listeners};
//!
//! fn main() -> std::io::Result<()> {
//!     let mut listeners = Listeners::from_env()?;
//!     let web = listeners.take_stream("web").expect("no stream listener named web");
//!     worker::notify_ready()?;
//!     loop {
//!         let mut conn = match web.accept() {
//!             Ok(conn) => conn,
//!             // sockvisor is gone: nothing more will come
//!             Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
//!             Err(e) => return Err(e),
//!         };
//!         let mut buf = [0u8; 1024];
//!         let _ = conn.read(&mut buf)?;
//!         conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nhi\n")?;
//!     } // dropping `conn` closes it (and reports the close to sockvisor if it asked)
//! }
//! ```
//!
//! The wire protocol is in docs/protocol.md; [`crate::protocol`] is its code.
//!
//! With `messages = true`, [`Messages`] talks to the operator and the other workers
//! (docs/messages.md).

pub use crate::messages::{Address, Message, Messages};

use crate::dispatch::sys;
use crate::protocol::{Message as ChannelMessage, MSG_LEN};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::socket::{
    accept4, getsockname, getsockopt, sockopt, AddressFamily, SockFlag, SockType, SockaddrLike,
    SockaddrStorage,
};
use nix::sys::stat::{fstat, SFlag};
use std::io::{self, Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a received fd is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// A sockvisor channel (`AF_UNIX`, `SOCK_SEQPACKET`, not listening): connections arrive
    /// as messages. Taken with [`Listeners::take_stream`].
    Channel,
    /// A listening stream socket shared by the workers (TCP or unix): accept on it.
    /// Taken with [`Listeners::take_stream`].
    Stream,
    /// A datagram socket (UDP or unix datagram), shared by the workers.
    Datagram,
    /// Anything else (a FIFO, a connected socket, a listening `SOCK_SEQPACKET` socket...):
    /// only available raw, with [`Listeners::take_fd`].
    Other,
}

#[derive(Debug)]
struct Entry {
    name: String,
    kind: ListenerKind,
    family: Option<AddressFamily>,
    fd: Option<OwnedFd>,
}

/// The sockets a worker was given, by name.
#[derive(Debug, Default)]
pub struct Listeners {
    entries: Vec<Entry>,
}

/// `from_env` wraps raw fds in `OwnedFd`: doing it twice would close them twice.
static FROM_ENV_DONE: AtomicBool = AtomicBool::new(false);

const LISTEN_FDS_START: RawFd = 3;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Listeners {
    /// The sockets passed in `LISTEN_FDS` (starting at fd 3), named by `LISTEN_FDNAMES`.
    ///
    /// `LISTEN_PID` must equal this process's pid; if it is missing or names another process
    /// (the variables were inherited by mistake) the result is empty, as with
    /// `sd_listen_fds(3)`. Malformed variables or a name count that does not match
    /// `LISTEN_FDS` are errors; an fd that is not open is an error. Every fd is set
    /// close-on-exec. The environment is left as it is (removing variables is not
    /// thread-safe); since every fd is close-on-exec and `LISTEN_PID` is this pid, a child
    /// process will not mistake them for its own.
    ///
    /// Can be called once per process: a second call fails with `AlreadyExists`, since the
    /// fds already belong to the first result.
    pub fn from_env() -> io::Result<Listeners> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let Some(pid) = var("LISTEN_PID") else {
            return Ok(Listeners::default());
        };
        let pid: u32 = pid
            .trim()
            .parse()
            .map_err(|_| invalid(format!("LISTEN_PID={pid:?} is not a pid")))?;
        if pid != std::process::id() {
            return Ok(Listeners::default());
        }
        let count = match var("LISTEN_FDS") {
            None => return Ok(Listeners::default()),
            Some(n) => n
                .trim()
                .parse::<u16>()
                .map_err(|_| invalid(format!("LISTEN_FDS={n:?} is not a count")))?,
        };
        let names: Vec<String> = match var("LISTEN_FDNAMES") {
            Some(names) => names.split(':').map(str::to_owned).collect(),
            None => vec!["unknown".to_owned(); usize::from(count)],
        };
        if names.len() != usize::from(count) {
            return Err(invalid(format!(
                "LISTEN_FDNAMES has {} names for LISTEN_FDS={count}",
                names.len()
            )));
        }
        if FROM_ENV_DONE.swap(true, Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "Listeners::from_env was already called in this process",
            ));
        }
        let mut fds = Vec::with_capacity(names.len());
        for (i, name) in names.into_iter().enumerate() {
            let raw = LISTEN_FDS_START + i as RawFd;
            // SAFETY: borrowed only for the duration of the check; F_GETFD fails with EBADF
            // if the fd is not open, and no OwnedFd is made for it then.
            let borrowed = unsafe { BorrowedFd::borrow_raw(raw) };
            let flags = fcntl(borrowed, FcntlArg::F_GETFD)
                .map_err(|e| invalid(format!("LISTEN_FDS: fd {raw} ({name}): {e}")))?;
            fcntl(
                borrowed,
                FcntlArg::F_SETFD(FdFlag::from_bits_truncate(flags) | FdFlag::FD_CLOEXEC),
            )?;
            // SAFETY: fd `raw` is open (checked above) and was handed to this process by the
            // LISTEN_FDS protocol; FROM_ENV_DONE makes sure it is wrapped only once.
            fds.push((unsafe { OwnedFd::from_raw_fd(raw) }, name));
        }
        Listeners::from_fds(fds)
    }

    /// Classify fds obtained some other way (tests, another activation scheme).
    pub fn from_fds(fds: impl IntoIterator<Item = (OwnedFd, String)>) -> io::Result<Listeners> {
        let mut entries = Vec::new();
        for (fd, name) in fds {
            let (kind, family) = classify(fd.as_fd())?;
            entries.push(Entry {
                name,
                kind,
                family,
                fd: Some(fd),
            });
        }
        Ok(Listeners { entries })
    }

    /// Number of sockets not taken yet.
    pub fn len(&self) -> usize {
        self.entries.iter().filter(|e| e.fd.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Names of the sockets not taken yet, in `LISTEN_FDS` order (a name may repeat).
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.iter().map(|(name, _)| name)
    }

    /// `(name, kind)` of every socket not taken yet, in `LISTEN_FDS` order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, ListenerKind)> + '_ {
        self.entries
            .iter()
            .filter(|e| e.fd.is_some())
            .map(|e| (e.name.as_str(), e.kind))
    }

    fn take_where(&mut self, name: &str, ok: impl Fn(&Entry) -> bool) -> Option<Entry> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.fd.is_some() && e.name == name && ok(e))?;
        Some(Entry {
            name: e.name.clone(),
            kind: e.kind,
            family: e.family,
            fd: e.fd.take(),
        })
    }

    /// The first stream source named `name`: a sockvisor channel or a shared listening
    /// socket. `None` if there is none (left).
    pub fn take_stream(&mut self, name: &str) -> Option<Incoming> {
        let e = self.take_where(name, |e| {
            matches!(e.kind, ListenerKind::Channel | ListenerKind::Stream)
        })?;
        Some(Incoming::new(
            e.name,
            e.kind == ListenerKind::Channel,
            e.fd?,
        ))
    }

    /// The first UDP socket named `name`.
    pub fn take_udp(&mut self, name: &str) -> Option<UdpSocket> {
        let e = self.take_where(name, |e| {
            e.kind == ListenerKind::Datagram
                && matches!(e.family, Some(AddressFamily::Inet | AddressFamily::Inet6))
        })?;
        e.fd.map(UdpSocket::from)
    }

    /// The first unix datagram socket named `name`.
    pub fn take_unix_datagram(&mut self, name: &str) -> Option<UnixDatagram> {
        let e = self.take_where(name, |e| {
            e.kind == ListenerKind::Datagram && e.family == Some(AddressFamily::Unix)
        })?;
        e.fd.map(UnixDatagram::from)
    }

    /// The first socket named `name`, whatever it is.
    pub fn take_fd(&mut self, name: &str) -> Option<(ListenerKind, OwnedFd)> {
        let e = self.take_where(name, |_| true)?;
        Some((e.kind, e.fd?))
    }
}

fn classify(fd: BorrowedFd<'_>) -> io::Result<(ListenerKind, Option<AddressFamily>)> {
    let st = fstat(fd)?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Ok((ListenerKind::Other, None));
    }
    let ty = getsockopt(&fd, sockopt::SockType)?;
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let family = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    let kind = match ty {
        SockType::Stream if listening => ListenerKind::Stream,
        SockType::SeqPacket if !listening && family == Some(AddressFamily::Unix) => {
            ListenerKind::Channel
        }
        SockType::Datagram => ListenerKind::Datagram,
        _ => ListenerKind::Other,
    };
    Ok((kind, family))
}

/// A source of stream connections: a sockvisor channel or a shared listening socket.
///
/// For an event loop, register [`AsRawFd::as_raw_fd`] for readability (mio's `SourceFd`,
/// tokio's `AsyncFd`, epoll) and call [`Incoming::try_accept`] until it returns `Ok(None)`:
///
/// ```no_run
/// # fn serve(_: sockvisor::worker::Connection) {}
/// use sockvisor::worker::Listeners;
/// use std::os::fd::AsFd;
///
/// let mut listeners = Listeners::from_env()?;
/// let web = listeners.take_stream("web").expect("no listener named web");
/// web.set_nonblocking_connections(true);
/// let ep = nix::sys::epoll::Epoll::new(nix::sys::epoll::EpollCreateFlags::EPOLL_CLOEXEC)?;
/// ep.add(web.as_fd(), nix::sys::epoll::EpollEvent::new(nix::sys::epoll::EpollFlags::EPOLLIN, 0))?;
/// let mut events = [nix::sys::epoll::EpollEvent::empty(); 16];
/// loop {
///     ep.wait(&mut events, nix::sys::epoll::EpollTimeout::NONE)?;
///     while let Some(conn) = web.try_accept()? {
///         serve(conn); // register it, read when readable...
///     }
/// }
/// # #[allow(unreachable_code)] Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Incoming {
    name: String,
    channel: bool,
    /// Shared with the connections that must report their close on it.
    fd: Arc<OwnedFd>,
    nonblocking_set: AtomicBool,
    nonblocking_conns: AtomicBool,
    /// Address family of the connections, learnt from the first one.
    family: AtomicU8,
    /// sockvisor was told that this worker reports closes (a `closed` of 0).
    announced: AtomicBool,
}

const FAMILY_UNKNOWN: u8 = 0;
const FAMILY_INET: u8 = 1;
const FAMILY_OTHER: u8 = 2;

/// Why the channel ended: sockvisor closed its end (it exited). Carried in an
/// `io::ErrorKind::UnexpectedEof` error from [`Incoming::accept`]/[`Incoming::try_accept`].
pub const CHANNEL_CLOSED: &str = "sockvisor closed the channel";

impl Incoming {
    /// Wrap an fd: a sockvisor channel or a listening stream socket.
    pub fn from_fd(name: impl Into<String>, fd: OwnedFd) -> io::Result<Incoming> {
        let (kind, _) = classify(fd.as_fd())?;
        let channel = match kind {
            ListenerKind::Channel => true,
            ListenerKind::Stream => false,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "neither a sockvisor channel nor a listening stream socket",
                ))
            }
        };
        Ok(Incoming::new(name.into(), channel, fd))
    }

    fn new(name: String, channel: bool, fd: OwnedFd) -> Incoming {
        Incoming {
            name,
            channel,
            fd: Arc::new(fd),
            announced: AtomicBool::new(false),
            nonblocking_set: AtomicBool::new(false),
            nonblocking_conns: AtomicBool::new(false),
            family: AtomicU8::new(FAMILY_UNKNOWN),
        }
    }

    /// Return connections in non-blocking mode (for event loops), saving the caller a
    /// syscall in shared mode (`accept4(SOCK_NONBLOCK)`). Off by default: connections are
    /// blocking, as `accept(2)` returns them.
    pub fn set_nonblocking_connections(&self, nonblocking: bool) {
        self.nonblocking_conns.store(nonblocking, Ordering::Relaxed);
    }

    /// Wrap an accepted fd. One listener's connections all have the same address family,
    /// so `getsockname` runs once per `Incoming`, not once per connection.
    fn stream(&self, fd: OwnedFd) -> Stream {
        let mut family = self.family.load(Ordering::Relaxed);
        if family == FAMILY_UNKNOWN {
            let inet = getsockname::<SockaddrStorage>(fd.as_raw_fd())
                .ok()
                .and_then(|a| a.family())
                .is_some_and(|f| matches!(f, AddressFamily::Inet | AddressFamily::Inet6));
            family = if inet { FAMILY_INET } else { FAMILY_OTHER };
            self.family.store(family, Ordering::Relaxed);
        }
        if family == FAMILY_INET {
            Stream::Tcp(TcpStream::from(fd))
        } else {
            Stream::Unix(UnixStream::from(fd))
        }
    }

    /// The name from `LISTEN_FDNAMES`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections arrive from sockvisor over a channel (dispatched mode), rather than from
    /// a shared listening socket.
    pub fn is_channel(&self) -> bool {
        self.channel
    }

    /// Wait for the next connection.
    ///
    /// Channel mode: receives the next connection message (messages this version does not
    /// understand are skipped, any fd they carry closed). When sockvisor is gone the error
    /// has kind [`io::ErrorKind::UnexpectedEof`] (message [`CHANNEL_CLOSED`]): exit then.
    /// Shared mode: `accept4(SOCK_CLOEXEC)`, waiting with `poll` if the socket is
    /// non-blocking. `EINTR` is retried in both modes.
    pub fn accept(&self) -> io::Result<Connection> {
        loop {
            match self.accept_once(0) {
                Ok(Some(c)) => return Ok(c),
                Ok(None) => continue, // a skipped message
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => match sys::poll_one(self.fd.as_fd(), libc::POLLIN, -1) {
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                },
                Err(e) if self.channel && e == Errno::ENODATA => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, CHANNEL_CLOSED))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The next connection if one is waiting, else `Ok(None)`; never blocks.
    ///
    /// Shared mode sets `O_NONBLOCK` on the listening socket the first time (a listening
    /// socket has no per-call non-blocking flag; the other workers share that flag, so they
    /// must cope with `EAGAIN`, which event-loop servers do anyway and [`Incoming::accept`]
    /// does too).
    pub fn try_accept(&self) -> io::Result<Option<Connection>> {
        if !self.channel && !self.nonblocking_set.swap(true, Ordering::Relaxed) {
            let fl = OFlag::from_bits_truncate(fcntl(self.fd.as_fd(), FcntlArg::F_GETFL)?);
            fcntl(self.fd.as_fd(), FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
        }
        loop {
            match self.accept_once(libc::MSG_DONTWAIT) {
                Ok(Some(c)) => return Ok(Some(c)),
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Ok(None),
                Err(e) if self.channel && e == Errno::ENODATA => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, CHANNEL_CLOSED))
                }
                // shared mode: the connection went away between the queue and accept
                Err(Errno::ECONNABORTED) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// One attempt. `Ok(None)`: a message was skipped. `Err(ENODATA)` (channel only): end of
    /// file.
    fn accept_once(&self, recv_flags: libc::c_int) -> Result<Option<Connection>, Errno> {
        let nonblocking = self.nonblocking_conns.load(Ordering::Relaxed);
        if !self.channel {
            let mut flags = SockFlag::SOCK_CLOEXEC;
            if nonblocking {
                flags |= SockFlag::SOCK_NONBLOCK;
            }
            let raw = accept4(self.fd.as_raw_fd(), flags)?;
            // SAFETY: accept4 just returned this fd; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            return Ok(Some(Connection {
                stream: self.stream(fd),
                report: None,
            }));
        }
        let mut buf = [0u8; MSG_LEN + 1];
        let mut got = sys::recv(self.fd.as_fd(), &mut buf, recv_flags)?;
        if got.bytes == 0 && got.fds.len() == 0 {
            return Err(Errno::ENODATA);
        }
        if got.ctrunc() {
            log::warn!(
                "{}: a channel message carried more fds than one (MSG_CTRUNC)",
                self.name
            );
        }
        match ChannelMessage::decode(&buf[..got.bytes.min(buf.len())]) {
            Ok(ChannelMessage::Connection { report_close, .. }) => match got.fds.take_first() {
                // any further fd in `got.fds` is closed when it drops
                Some(fd) => {
                    if report_close && !self.announced.swap(true, Ordering::Relaxed) {
                        // Protocol rule: say once that closes will be reported, so that
                        // sockvisor counts this worker by its open connections from now on.
                        announce_reports(self.fd.as_fd());
                    }
                    let report = report_close.then(|| CloseReport {
                        channel: Arc::clone(&self.fd),
                    });
                    let stream = self.stream(fd);
                    if nonblocking {
                        // sockvisor passes connections blocking; a failure here would only
                        // surface as blocking I/O, and FIONBIO on a socket does not fail
                        let _ = stream.set_nonblocking(true);
                    }
                    Ok(Some(Connection { stream, report }))
                }
                None => {
                    log::warn!("{}: connection message without an fd, skipped", self.name);
                    Ok(None)
                }
            },
            Ok(other) => {
                log::debug!("{}: skipped {other:?}", self.name);
                Ok(None)
            }
            Err(e) => {
                log::debug!("{}: skipped a message: {e}", self.name);
                Ok(None)
            }
        }
    }
}

impl AsFd for Incoming {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Incoming {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A connection's socket.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    /// A unix stream socket (also used for any non-IP stream family).
    Unix(UnixStream),
}

/// A connection's peer address.
#[derive(Debug, Clone)]
pub enum PeerAddr {
    Inet(std::net::SocketAddr),
    Unix(std::os::unix::net::SocketAddr),
}

impl Stream {
    pub fn peer_addr(&self) -> io::Result<PeerAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().map(PeerAddr::Inet),
            Stream::Unix(s) => s.peer_addr().map(PeerAddr::Unix),
        }
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(nonblocking),
            Stream::Unix(s) => s.set_nonblocking(nonblocking),
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// Sends sockvisor a `closed` report for one connection when dropped (best effort: never
/// blocks, never raises `SIGPIPE`, never panics).
#[derive(Debug)]
pub struct CloseReport {
    channel: Arc<OwnedFd>,
}

fn announce_reports(channel: BorrowedFd<'_>) {
    let msg = ChannelMessage::Closed { count: 0 }.encode();
    let _ = sys::send(channel, &msg, None, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
}

impl Drop for CloseReport {
    fn drop(&mut self) {
        let msg = ChannelMessage::Closed { count: 1 }.encode();
        let _ = sys::send(
            self.channel.as_fd(),
            &msg,
            None,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
}

/// An accepted connection. Reads and writes go to the socket; dropping it closes the socket
/// and then, if sockvisor asked for it (least-connections), reports the close.
#[derive(Debug)]
pub struct Connection {
    // Field order matters: the socket is closed before the report is sent.
    stream: Stream,
    report: Option<CloseReport>,
}

impl Connection {
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    pub fn as_tcp(&self) -> Option<&TcpStream> {
        match &self.stream {
            Stream::Tcp(s) => Some(s),
            Stream::Unix(_) => None,
        }
    }

    pub fn as_unix(&self) -> Option<&UnixStream> {
        match &self.stream {
            Stream::Unix(s) => Some(s),
            Stream::Tcp(_) => None,
        }
    }

    pub fn peer_addr(&self) -> io::Result<PeerAddr> {
        self.stream.peer_addr()
    }

    pub fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.stream.set_nonblocking(nonblocking)
    }

    /// sockvisor asked for a close report for this connection.
    pub fn reports_close(&self) -> bool {
        self.report.is_some()
    }

    /// The socket and the pending close report: keep the report alive as long as the socket
    /// (drop it after closing the socket) to keep sockvisor's connection count right.
    pub fn into_parts(self) -> (Stream, Option<CloseReport>) {
        (self.stream, self.report)
    }

    /// The socket alone; a requested close report is sent now.
    pub fn into_stream(self) -> Stream {
        self.stream
    }

    /// The TCP socket, or the connection back if it is not TCP. A requested close report is
    /// sent now (use [`Connection::into_parts`] to delay it).
    pub fn into_tcp(self) -> Result<TcpStream, Connection> {
        match self.stream {
            Stream::Tcp(s) => Ok(s),
            stream => Err(Connection {
                stream,
                report: self.report,
            }),
        }
    }

    /// The unix socket, or the connection back if it is not a unix socket.
    pub fn into_unix(self) -> Result<UnixStream, Connection> {
        match self.stream {
            Stream::Unix(s) => Ok(s),
            stream => Err(Connection {
                stream,
                report: self.report,
            }),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Connection {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_fd().as_raw_fd()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        Stream::as_fd(self)
    }
}

/// Send one notification to `NOTIFY_SOCKET`: a path, or `@name` for an abstract socket
/// (what sockvisor gives outside systemd), as `sd_notify(3)` reads it. A no-op without
/// `NOTIFY_SOCKET`. (The `sd-notify` crate, 0.5, knows only paths.)
fn notify(state: sd_notify::NotifyState<'_>) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    let Some(address) = std::env::var_os("NOTIFY_SOCKET").filter(|a| !a.is_empty()) else {
        return Ok(());
    };
    let message = format!("{state}\n");
    let socket = UnixDatagram::unbound()?;
    let sent = match address.as_bytes().strip_prefix(b"@") {
        Some(name) => socket.send_to_addr(
            message.as_bytes(),
            &std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        )?,
        None => socket.send_to(message.as_bytes(), &address)?,
    };
    if sent != message.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

/// Tell sockvisor (`NOTIFY_SOCKET`) this worker is ready (`READY=1`); it matters with
/// `--ready notify`. A no-op without `NOTIFY_SOCKET`.
pub fn notify_ready() -> io::Result<()> {
    notify(sd_notify::NotifyState::Ready)
}

/// `STATUS=<status>`, shown by `sockvisor status`.
pub fn notify_status(status: &str) -> io::Result<()> {
    notify(sd_notify::NotifyState::Status(status))
}

/// `WATCHDOG=1`: send at least every [`watchdog_interval`] / 2.
pub fn notify_watchdog() -> io::Result<()> {
    notify(sd_notify::NotifyState::Watchdog)
}

/// `STOPPING=1`.
pub fn notify_stopping() -> io::Result<()> {
    notify(sd_notify::NotifyState::Stopping)
}

/// The watchdog timeout (`WATCHDOG_USEC`, when `WATCHDOG_PID` is unset or this pid).
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// This worker's slot, `SOCKVISOR_WORKER_ID` (0..N-1, reused when the slot restarts).
pub fn worker_id() -> Option<usize> {
    std::env::var("SOCKVISOR_WORKER_ID")
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dispatch::Channel;
    use std::net::TcpListener;

    use crate::dispatch::channel::tests::tcp_pair;

    fn channel_incoming(ch: &Channel) -> Incoming {
        let fd = ch.worker_end().try_clone_to_owned().unwrap();
        Incoming::from_fd("web", fd).unwrap()
    }

    #[test]
    fn classifies_fds() {
        let ch = Channel::new().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let u = UdpSocket::bind("127.0.0.1:0").unwrap();
        let (c, _s) = UnixStream::pair().unwrap();
        let d = UnixDatagram::unbound().unwrap();
        let mut ls = Listeners::from_fds([
            (ch.worker_end().try_clone_to_owned().unwrap(), "web".into()),
            (OwnedFd::from(l), "shared".into()),
            (OwnedFd::from(u), "dns".into()),
            (OwnedFd::from(c), "conn".into()),
            (OwnedFd::from(d), "dgram".into()),
        ])
        .unwrap();
        let kinds: Vec<_> = ls.iter().map(|(_, k)| k).collect();
        assert_eq!(
            kinds,
            [
                ListenerKind::Channel,
                ListenerKind::Stream,
                ListenerKind::Datagram,
                ListenerKind::Other,
                ListenerKind::Datagram
            ]
        );
        assert!(ls.take_udp("web").is_none());
        assert!(ls.take_stream("web").unwrap().is_channel());
        assert!(ls.take_stream("web").is_none());
        assert!(!ls.take_stream("shared").unwrap().is_channel());
        assert!(ls.take_unix_datagram("dns").is_none());
        assert!(ls.take_udp("dns").is_some());
        assert!(ls.take_unix_datagram("dgram").is_some());
        assert_eq!(ls.names().collect::<Vec<_>>(), ["conn"]);
        assert_eq!(ls.take_fd("conn").unwrap().0, ListenerKind::Other);
        assert!(ls.is_empty());
    }

    #[test]
    fn channel_accept_reports_close_and_eof() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ch = Channel::new().unwrap();
        let inc = channel_incoming(&ch);
        assert!(inc.try_accept().unwrap().is_none());

        let (mut client, s) = tcp_pair(&l);
        ch.send(s, true).unwrap();
        let (mut client2, s2) = tcp_pair(&l);
        ch.send(s2, false).unwrap();

        let mut conn = inc.accept().unwrap();
        assert!(conn.reports_close());
        assert!(conn.as_tcp().is_some());
        match conn.peer_addr().unwrap() {
            PeerAddr::Inet(a) => assert_eq!(a, client.local_addr().unwrap()),
            PeerAddr::Unix(_) => panic!("not tcp"),
        }
        conn.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        client.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        let announced = ch.read_reports();
        assert_eq!(
            (announced.closed, announced.reports),
            (0, 1),
            "the worker said it reports closes"
        );
        drop(conn);
        assert_eq!(ch.read_reports().closed, 1);
        assert_eq!(client.read(&mut b).unwrap(), 0, "closed before reporting");

        let conn2 = inc.try_accept().unwrap().unwrap();
        assert!(!conn2.reports_close());
        drop(conn2);
        assert_eq!(ch.read_reports().reports, 0);
        assert_eq!(client2.read(&mut b).unwrap(), 0);

        // garbage and unknown kinds are skipped, their fds closed
        let (a, mut b_end) = UnixStream::pair().unwrap();
        sys::send(
            ch.sockvisor_end(),
            &[1, 9, 0, 0, 0, 0, 0, 0],
            Some(a.as_fd()),
            0,
        )
        .unwrap();
        drop(a);
        let (mut client3, s3) = tcp_pair(&l);
        ch.send(s3, false).unwrap();
        let mut conn3 = inc.accept().unwrap();
        conn3.write_all(b"3").unwrap();
        client3.read_exact(&mut b[..1]).unwrap();
        b_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(
            b_end.read(&mut b).unwrap(),
            0,
            "fd of an unknown message was closed"
        );

        // sockvisor gone: EOF. (Simulated with shutdown: sockvisor's Channel also holds the
        // worker's end, so only its own end closing would be a real EOF.)
        nix::sys::socket::shutdown(
            ch.sockvisor_end().as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        )
        .unwrap();
        let e = inc.accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let e = inc.try_accept().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn shared_accept_blocking_and_try() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let inc = Incoming::from_fd("web", OwnedFd::from(l)).unwrap();
        assert!(!inc.is_channel());
        let mut c1 = TcpStream::connect(addr).unwrap();
        let mut conn = inc.accept().unwrap();
        assert!(!conn.reports_close());
        conn.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        c1.read_exact(&mut b).unwrap();
        assert!(inc.try_accept().unwrap().is_none());
        let _c2 = TcpStream::connect(addr).unwrap();
        // the listener is non-blocking now; accept() waits with poll
        let conn2 = inc.accept().unwrap();
        let fl = OFlag::from_bits_truncate(fcntl(&conn2, FcntlArg::F_GETFL).unwrap());
        assert!(
            !fl.contains(OFlag::O_NONBLOCK),
            "accepted sockets are blocking"
        );
        let fdfl = FdFlag::from_bits_truncate(fcntl(&conn2, FcntlArg::F_GETFD).unwrap());
        assert!(fdfl.contains(FdFlag::FD_CLOEXEC));
    }

    #[test]
    fn nonblocking_connections_in_both_modes() {
        let is_nonblocking = |c: &Connection| {
            OFlag::from_bits_truncate(fcntl(c, FcntlArg::F_GETFL).unwrap())
                .contains(OFlag::O_NONBLOCK)
        };
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let shared = Incoming::from_fd("web", OwnedFd::from(l)).unwrap();
        let mut ch = Channel::new().unwrap();
        let chan = channel_incoming(&ch);
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        for nonblocking in [false, true] {
            shared.set_nonblocking_connections(nonblocking);
            chan.set_nonblocking_connections(nonblocking);
            let _c = TcpStream::connect(addr).unwrap();
            let conn = shared.accept().unwrap();
            assert_eq!(is_nonblocking(&conn), nonblocking);
            assert!(conn.as_tcp().is_some());
            let (_c2, s) = tcp_pair(&l2);
            ch.send(s, false).unwrap();
            let conn = chan.accept().unwrap();
            assert_eq!(is_nonblocking(&conn), nonblocking);
            assert!(conn.as_tcp().is_some());
        }
        // a unix connection through a channel is a unix stream
        let (_a, b) = UnixStream::pair().unwrap();
        let ch2 = Channel::new().unwrap();
        let mut ch2 = ch2;
        ch2.send(OwnedFd::from(b), false).unwrap();
        let chan2 = channel_incoming(&ch2);
        assert!(chan2.accept().unwrap().as_unix().is_some());
    }

    #[test]
    fn incoming_rejects_datagram_sockets() {
        assert!(
            Incoming::from_fd("x", OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap())).is_err()
        );
    }
}
