//! Probe connections for active health checks: a connection that reaches one worker alone.
//!
//! - Channel policies ([`super::handoff`]): a `socketpair(AF_UNIX, SOCK_STREAM)`; one end is
//!   handed to the worker over its channel like any accepted connection, sockvisor talks on
//!   the other. The worker sees a connection without a peer address.
//! - `reuseport` ([`super::reuseport::steered`]): a TCP connection from loopback to the
//!   listener's port, from a source port bound first and pinned to the worker's member key
//!   (`SteeredGroup::pin_probe`), so the program sends its SYN to that worker's listener
//!   only, ready or not, in the schedule or not (docs/reuseport.md).
//!
//! Both are non-blocking on sockvisor's side; the exchange itself (write a request, read the
//! status line, with a deadline) is the supervisor's (`supervisor/checks.rs`).

use nix::errno::Errno;
use nix::sys::socket::{
    bind, connect, getsockname, socket, socketpair, AddressFamily, SockFlag, SockType,
    SockaddrLike, SockaddrStorage,
};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};

/// sockvisor's end of a probe connection.
#[derive(Debug)]
pub struct ProbeConn {
    /// Non-blocking.
    pub fd: OwnedFd,
    /// A TCP connect in progress: writable once it is established (or failed).
    pub connecting: bool,
    /// What the listener must release when the probe is over
    /// ([`super::ListenerDispatch::close_probe`]): the pinned source port under reuseport.
    pub route: Option<u16>,
}

/// A connected unix stream pair: `(sockvisor's end, non-blocking; the worker's end, blocking
/// like an accepted connection)`.
pub fn socket_pair() -> io::Result<(ProbeConn, OwnedFd)> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    set_nonblocking(&ours)?;
    Ok((
        ProbeConn {
            fd: ours,
            connecting: false,
            route: None,
        },
        theirs,
    ))
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A non-blocking TCP socket bound to loopback (the listener's own address when it is bound
/// to one) on a port the kernel picks, and the address to connect to: the listener's port on
/// that address. Returns `(socket, its source port, target)`.
pub fn bound_tcp_socket(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, u16, SockaddrStorage)> {
    let local: SockaddrStorage = getsockname(listener.as_raw_fd())?;
    let (family, source, target) = if let Some(v4) = local.as_sockaddr_in() {
        let ip = match v4.ip() {
            ip if ip.is_unspecified() => Ipv4Addr::LOCALHOST,
            ip => ip,
        };
        (
            AddressFamily::Inet,
            SockaddrStorage::from(SocketAddrV4::new(ip, 0)),
            SockaddrStorage::from(SocketAddrV4::new(ip, v4.port())),
        )
    } else if let Some(v6) = local.as_sockaddr_in6() {
        let ip = match v6.ip() {
            ip if ip.is_unspecified() => Ipv6Addr::LOCALHOST,
            ip => ip,
        };
        (
            AddressFamily::Inet6,
            SockaddrStorage::from(SocketAddrV6::new(ip, 0, 0, v6.scope_id())),
            SockaddrStorage::from(SocketAddrV6::new(ip, v6.port(), 0, v6.scope_id())),
        )
    } else {
        return Err(io::Error::other("not a TCP listener"));
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    bind(fd.as_raw_fd(), &source)?;
    let bound: SockaddrStorage = getsockname(fd.as_raw_fd())?;
    let port = bound
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| bound.as_sockaddr_in6().map(|a| a.port()))
        .unwrap_or(0);
    if port == 0 || target.family().is_none() {
        return Err(io::Error::other("the probe socket has no port"));
    }
    Ok((fd, port, target))
}

/// Start connecting `fd` to `target`: `Ok(true)` while in progress, `Ok(false)` if already
/// connected.
pub fn start_connect(fd: &OwnedFd, target: &SockaddrStorage) -> io::Result<bool> {
    match connect(fd.as_raw_fd(), target) {
        Ok(()) => Ok(false),
        Err(Errno::EINPROGRESS | Errno::EINTR) => Ok(true),
        Err(e) => Err(e.into()),
    }
}
