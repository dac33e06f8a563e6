//! The sockets of a steered group: making the anchor shareable, creating a worker's listener
//! beside it, reading a listener's queue, and requeueing a listener (moving its queue to the
//! program's choice without closing the port).

use nix::sys::socket::{
    bind, getsockname, getsockopt, listen, setsockopt, shutdown, socket, sockopt, AddressFamily,
    Backlog, Shutdown, SockFlag, SockType, SockaddrLike, SockaddrStorage,
};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// Set `SO_REUSEPORT` on a socket that may already be listening (systemd binds without it
/// unless `ReusePort=yes`). Siblings of the same uid can then bind the same address; the
/// socket joins their group when the first of them listens.
pub fn enable_reuseport(socket: BorrowedFd<'_>) -> io::Result<()> {
    setsockopt(&socket, sockopt::ReusePort, &true).map_err(io::Error::from)
}

/// A new socket like `anchor` (family, type, address, `IPV6_V6ONLY`, bound device) with
/// `SO_REUSEPORT`, bound to the anchor's address, listening with `backlog` if it is a stream
/// socket. `O_CLOEXEC`. It joins the anchor's group: the caller must have the uid that
/// created the anchor (the kernel refuses another uid with `EADDRINUSE`).
pub fn sibling(anchor: BorrowedFd<'_>, backlog: i32) -> io::Result<OwnedFd> {
    let s = bound_sibling(anchor)?;
    listen_sibling(s.as_fd(), backlog)?;
    Ok(s)
}

/// [`sibling`] up to the bind: bound to the anchor's address, not yet in its group, so the
/// kernel sends it nothing. The bind is where another uid than the anchor's is refused
/// (`EADDRINUSE`), which makes this the cheap way to learn whether we may join the group.
/// `SO_REUSEADDR` is copied from the anchor (stream sockets only).
pub fn bound_sibling(anchor: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let addr: SockaddrStorage = getsockname(anchor.as_raw_fd())?;
    let family = addr
        .family()
        .filter(|f| matches!(f, AddressFamily::Inet | AddressFamily::Inet6))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an inet socket"))?;
    let kind = getsockopt(&anchor, sockopt::SockType)?;
    let s = socket(family, kind, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&s, sockopt::ReusePort, &true)?;
    if kind == SockType::Stream && getsockopt(&anchor, sockopt::ReuseAddr)? {
        // The connections the anchor took before it had SO_REUSEPORT (the one that
        // socket-activated the service, waiting in its queue) hold the port without it; the
        // kernel lets a new socket bind beside them only if both have SO_REUSEADDR, which
        // systemd (and sockvisor) set on every listening socket.
        setsockopt(&s, sockopt::ReuseAddr, &true)?;
    }
    if family == AddressFamily::Inet6 {
        let v6only = getsockopt(&anchor, sockopt::Ipv6V6Only)?;
        setsockopt(&s, sockopt::Ipv6V6Only, &v6only)?;
    }
    let device = getsockopt(&anchor, sockopt::BindToDevice)?;
    if !device.is_empty() {
        setsockopt(&s, sockopt::BindToDevice, &device)?;
    }
    bind(s.as_raw_fd(), &addr)?;
    Ok(s)
}

/// The second half of [`sibling`]: a stream socket listens (and joins the group); a datagram
/// socket is in the group from its bind.
pub fn listen_sibling(s: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    if getsockopt(&s, sockopt::SockType)? == SockType::Stream {
        listen(&s, backlog_of(backlog)?)?;
    }
    Ok(())
}

/// The uid that created `socket` (the socket's inode owner, which the kernel compares when a
/// sibling binds), from `/proc/net/{tcp,tcp6,udp,udp6}`; `None` if it cannot be found.
pub fn owner_uid(socket: BorrowedFd<'_>) -> Option<u32> {
    let inode = nix::sys::stat::fstat(socket).ok()?.st_ino.to_string();
    ["tcp", "tcp6", "udp", "udp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(format!("/proc/net/{table}")).ok()?;
        // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ...
        text.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.get(9) == Some(&inode.as_str()))
                .then(|| f.get(7)?.parse().ok())
                .flatten()
        })
    })
}

fn backlog_of(n: i32) -> io::Result<Backlog> {
    Backlog::new(n.clamp(0, Backlog::MAXCONN.into())).map_err(io::Error::from)
}

/// `TCP_LISTEN` in the kernel's `enum` of TCP states (`tcpi_state`).
const TCP_LISTEN: u8 = 10;

/// A listener's accept queue: connections waiting for `accept()`, and its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub queued: u32,
    pub backlog: u32,
}

/// The accept queue of a TCP listener (`TCP_INFO`: for a listener the kernel reports the
/// queue length in `tcpi_unacked` and the backlog in `tcpi_sacked`).
pub fn queue_depth(listener: BorrowedFd<'_>) -> io::Result<QueueDepth> {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is live for the borrow; `info` and `len` are valid for writes and `len`
    // holds the buffer's size, which the kernel never exceeds.
    let r = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            &mut info as *mut libc::tcp_info as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if info.tcpi_state != TCP_LISTEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening socket",
        ));
    }
    Ok(QueueDepth {
        queued: info.tcpi_unacked,
        backlog: info.tcpi_sacked,
    })
}

/// Whether a socket is listening (`SO_ACCEPTCONN`).
pub fn is_listening(socket: BorrowedFd<'_>) -> io::Result<bool> {
    getsockopt(&socket, sockopt::AcceptConn).map_err(io::Error::from)
}

/// `shutdown(SHUT_RD)` then `listen(backlog)`: the listener leaves the group's listening set
/// (the kernel clears its sockarray entry), every connection queued on it is handed to the
/// program as a migration (with `SELECT_OR_MIGRATE` attached; otherwise they are reset), and
/// it listens again at once in the same group (the port was bound explicitly, so it keeps it).
/// Its half-open connections move later, when their handshake completes. The port stays open
/// throughout as long as another member of the group listens. The caller re-inserts the
/// socket in the sockarray afterwards.
pub fn requeue(listener: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    shutdown(listener.as_raw_fd(), Shutdown::Read)?;
    listen(&listener.as_fd(), backlog_of(backlog)?)?;
    Ok(())
}
