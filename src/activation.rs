//! Listeners: taken from systemd (`LISTEN_FDS`/`LISTEN_FDNAMES`, matched to the configured
//! listeners by name) or bound by sockvisor itself when not socket-activated. Every fd is
//! validated before it is trusted: a socket, of the expected type, listening if it is a
//! stream, of a known family.
//!
//! Matching (see [`listeners`]): a configured listener takes every passed fd of its name (a
//! socket unit may pass, say, an IPv4 and an IPv6 socket both named `web`). When systemd
//! passed fds without names (no `LISTEN_FDNAMES`: all are named `unknown`), a single fd is
//! matched to a single configured listener by position.
//!
//! Blocking mode: `O_NONBLOCK` lives on the open file description, which a worker shares in
//! `shared` mode. Passed fds that sockvisor accepts on (a dispatch policy) are made
//! non-blocking; the others keep the mode systemd gave them (blocking, unless the socket unit
//! says otherwise). Sockets sockvisor binds itself are non-blocking
//! when sockvisor accepts on them (a dispatch policy) and blocking when the workers accept or
//! read on them (`shared`, and every datagram socket), as an unmodified program expects.

use crate::config::{DispatchPolicy, ListenAddr, ListenerSpec};
use crate::runtime_files::{self, DirSetup};
use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage,
    UnixAddr,
};
use nix::sys::stat::{self, SFlag};
use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    /// A listening TCP socket (IPv4 or IPv6).
    TcpListener,
    /// A UDP socket.
    Udp,
    /// A listening unix stream socket.
    UnixListener,
    /// A unix datagram socket (shared like UDP).
    UnixDatagram,
}

impl SocketKind {
    pub fn is_stream(self) -> bool {
        matches!(self, SocketKind::TcpListener | SocketKind::UnixListener)
    }
}

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub kind: SocketKind,
    /// Resolved: datagram sockets are always `Shared`.
    pub policy: DispatchPolicy,
    pub fd: OwnedFd,
    /// Human-readable address (`127.0.0.1:8000`, `/run/x.sock`) for logs and status.
    pub address: String,
    /// Came from systemd (and so cannot change on reload).
    pub from_systemd: bool,
    /// Why the policy is what it is when it is not what was asked for (`auto` that could not
    /// run `reuseport`), for the log and `status`.
    pub policy_note: Option<String>,
}

/// An activation error. Its `Display` names the fd, the name and the fix.
#[derive(Debug)]
pub struct ActivationError(pub String);

impl fmt::Display for ActivationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ActivationError {}

/// The fds systemd passed, with their names, taken out of the environment (`LISTEN_*` are
/// unset in every case). Call first thing in `main`, before any thread exists.
/// Its warnings go through `log`: initialise logging before (env_logger starts no thread).
///
/// Not socket-activated (no `LISTEN_FDS`, or `LISTEN_PID` missing or someone else's): empty.
/// Names that do not fit the fds (a broken `LISTEN_FDNAMES`) are logged and the fds named
/// `unknown`.
pub fn take_from_env() -> Vec<(OwnedFd, String)> {
    // The plain list first: the call below unsets the environment even when it fails, and its
    // failure on a stale LISTEN_FDNAMES must not be mistaken for "fds without names".
    let plain: Vec<RawFd> = match sd_notify::listen_fds() {
        Ok(fds) => fds.collect(),
        Err(e) => {
            log::warn!("ignoring LISTEN_FDS: {e}");
            Vec::new()
        }
    };
    // SAFETY: called first thing in `main`, while the process has a single thread, so nothing
    // can read the environment concurrently with its modification.
    let named = unsafe { sd_notify::listen_fds_with_names_and_unset_env() };
    let pairs: Vec<(RawFd, String)> = match named {
        Ok(fds) => fds.collect(),
        Err(e) if plain.is_empty() => {
            // A stale LISTEN_FDNAMES without our LISTEN_PID: not socket-activated.
            log::debug!("no sockets from systemd ({e})");
            Vec::new()
        }
        Err(e) => {
            log::warn!("{e}: naming the {} passed fds \"unknown\"", plain.len());
            plain
                .into_iter()
                .map(|fd| (fd, "unknown".to_string()))
                .collect()
        }
    };
    pairs
        .into_iter()
        // SAFETY: systemd passed these fds to this process (LISTEN_PID matched); nothing else
        // in the process knows about them, so each gets exactly one owner here.
        .map(|(fd, name)| (unsafe { OwnedFd::from_raw_fd(fd) }, name))
        .collect()
}

fn describe_mode(mode: SFlag) -> &'static str {
    match mode & SFlag::S_IFMT {
        SFlag::S_IFIFO => "a pipe or FIFO",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFLNK => "a symlink",
        _ => "not a socket",
    }
}

/// The printable address of a socket address: `127.0.0.1:8000`, `[::1]:80`, `/run/x.sock`,
/// `@abstract`, `(unnamed)`.
fn format_addr(addr: &SockaddrStorage) -> String {
    match addr.family() {
        Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => addr.to_string(),
        Some(AddressFamily::Unix) => match addr.as_unix_addr() {
            Some(u) => match (u.path(), u.as_abstract()) {
                (Some(p), _) => p.display().to_string(),
                (None, Some(a)) => format!("@{}", String::from_utf8_lossy(a)),
                _ => "(unnamed)".to_string(),
            },
            None => "(unix)".to_string(),
        },
        _ => "(unknown)".to_string(),
    }
}

/// Inspect an fd: what kind of socket it is and its address, or what is wrong with it
/// ("not a socket (a pipe or FIFO)", "a TCP socket that is not listening", ...).
pub fn classify(fd: BorrowedFd<'_>) -> Result<(SocketKind, String), String> {
    let st = stat::fstat(fd).map_err(|e| format!("cannot fstat it: {e}"))?;
    let mode = SFlag::from_bits_truncate(st.st_mode);
    if mode & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(format!("not a socket ({})", describe_mode(mode)));
    }
    let ty: SockType = socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| format!("cannot read SO_TYPE: {e}"))?;
    let addr: SockaddrStorage =
        socket::getsockname(fd.as_raw_fd()).map_err(|e| format!("cannot read its address: {e}"))?;
    let family = addr.family();
    let address = format_addr(&addr);
    let inet = matches!(family, Some(AddressFamily::Inet | AddressFamily::Inet6));
    let unix = family == Some(AddressFamily::Unix);
    if !inet && !unix {
        return Err(format!(
            "a socket of an unsupported family ({family:?}); only IPv4, IPv6 and unix sockets are supported"
        ));
    }
    let what = if inet { "TCP" } else { "unix stream" };
    match ty {
        SockType::Stream => {
            let listening = socket::getsockopt(&fd, sockopt::AcceptConn)
                .map_err(|e| format!("cannot read SO_ACCEPTCONN: {e}"))?;
            if !listening {
                return Err(format!(
                    "a {what} socket at {address} that is not listening (a connection, not a ListenStream= socket)"
                ));
            }
            Ok((
                if inet { SocketKind::TcpListener } else { SocketKind::UnixListener },
                address,
            ))
        }
        SockType::Datagram => Ok((
            if inet { SocketKind::Udp } else { SocketKind::UnixDatagram },
            address,
        )),
        other => Err(format!(
            "a {other:?} socket at {address}; only stream (ListenStream=) and datagram (ListenDatagram=) sockets are supported"
        )),
    }
}

fn kind_name(kind: SocketKind) -> &'static str {
    match kind {
        SocketKind::TcpListener => "a listening TCP socket",
        SocketKind::Udp => "a UDP socket",
        SocketKind::UnixListener => "a listening unix stream socket",
        SocketKind::UnixDatagram => "a unix datagram socket",
    }
}

fn expected_kind(addr: &ListenAddr) -> SocketKind {
    match addr {
        ListenAddr::Tcp(_) => SocketKind::TcpListener,
        ListenAddr::Udp(_) => SocketKind::Udp,
        ListenAddr::Unix(_) => SocketKind::UnixListener,
    }
}

/// The policy a socket of `kind` gets: channel policies hand over connections, which
/// datagram sockets do not have; unix sockets have no `SO_REUSEPORT` groups. `auto` and
/// `reuseport` are decided later, by the dispatcher (they may fall back to `shared`).
fn resolve_policy(kind: SocketKind, policy: DispatchPolicy) -> DispatchPolicy {
    match kind {
        SocketKind::TcpListener => policy,
        SocketKind::Udp if policy.uses_channels() => DispatchPolicy::Shared,
        SocketKind::Udp => policy,
        SocketKind::UnixListener if policy == DispatchPolicy::Auto => DispatchPolicy::Shared,
        SocketKind::UnixListener => policy,
        SocketKind::UnixDatagram => DispatchPolicy::Shared,
    }
}

/// Match the passed fds to `specs`, or bind `specs` when nothing was passed.
/// With no specs and passed fds, every passed fd becomes a listener under its own name
/// (with `default_policy` for streams).
pub fn listeners(
    passed: Vec<(OwnedFd, String)>,
    specs: &[ListenerSpec],
    default_policy: DispatchPolicy,
) -> Result<Vec<Listener>, ActivationError> {
    if passed.is_empty() {
        if specs.is_empty() {
            return Err(ActivationError(
                "nothing to listen on: give --listen or run under a systemd socket unit".into(),
            ));
        }
        return specs.iter().map(bind_spec).collect();
    }
    // Validate every passed fd first.
    let mut checked = Vec::with_capacity(passed.len());
    for (fd, name) in passed {
        let (kind, address) = classify(fd.as_fd()).map_err(|what| {
            ActivationError(format!(
                "fd {} ({name:?}) passed by systemd is {what}",
                fd.as_raw_fd()
            ))
        })?;
        checked.push(Some((fd, name, kind, address)));
    }
    let mut out = Vec::new();
    if specs.is_empty() {
        for (fd, name, kind, address) in checked.into_iter().flatten() {
            let policy = resolve_policy(kind, default_policy);
            set_accept_mode(&fd, &name, policy)?;
            out.push(Listener {
                name,
                kind,
                policy,
                fd,
                address,
                from_systemd: true,
                policy_note: None,
            });
        }
        return Ok(out);
    }
    let by_position = specs.len() == 1
        && checked.len() == 1
        && checked.iter().flatten().all(|(_, n, _, _)| n == "unknown");
    let passed_names: Vec<String> = checked
        .iter()
        .flatten()
        .map(|(fd, n, _, _)| format!("fd {} {n:?}", fd.as_raw_fd()))
        .collect();
    for spec in specs {
        let mut found = false;
        for slot in checked.iter_mut() {
            let matches = match slot {
                Some((_, name, _, _)) => by_position || *name == spec.name,
                None => false,
            };
            if !matches {
                continue;
            }
            let Some((fd, name, kind, address)) = slot.take() else {
                continue;
            };
            if let Some(addr) = &spec.addr {
                let want = expected_kind(addr);
                if want != kind {
                    return Err(ActivationError(format!(
                        "fd {} ({name:?}) passed by systemd is {} at {address}, but listener {:?} is configured as {addr}, which needs {}; make the socket unit's Listen*= line and the listener's url agree",
                        fd.as_raw_fd(),
                        kind_name(kind),
                        spec.name,
                        kind_name(want),
                    )));
                }
            }
            if by_position {
                log::info!(
                    "systemd passed one unnamed socket: using it as listener {:?}",
                    spec.name
                );
            }
            let policy = resolve_policy(kind, spec.policy);
            set_accept_mode(&fd, &name, policy)?;
            out.push(Listener {
                name: spec.name.clone(),
                kind,
                policy,
                fd,
                address,
                from_systemd: true,
                policy_note: None,
            });
            found = true;
        }
        if !found {
            return Err(ActivationError(format!(
                "listener {:?} was not passed by systemd (it passed: {}); add FileDescriptorName={} to the socket unit, or rename the listener",
                spec.name,
                passed_names.join(", "),
                spec.name
            )));
        }
    }
    for (fd, name, _, address) in checked.into_iter().flatten() {
        log::warn!(
            "closing fd {} ({name:?}, {address}) passed by systemd: no listener is configured with that name",
            fd.as_raw_fd()
        );
        drop(fd);
    }
    Ok(out)
}

/// A passed socket that sockvisor accepts on (a dispatch policy) must be non-blocking: systemd
/// passes blocking sockets, and the event loop accepts until `EAGAIN`, so a blocking one
/// would park the whole loop in `accept4` (no signals, timers or watchdog pings) until the
/// next connection. Sockets the workers use themselves (`shared`) keep systemd's mode.
fn set_accept_mode(
    fd: &OwnedFd,
    name: &str,
    policy: DispatchPolicy,
) -> Result<(), ActivationError> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    if !policy.uses_channels() {
        return Ok(());
    }
    let set = fcntl(fd, FcntlArg::F_GETFL)
        .map(OFlag::from_bits_truncate)
        .and_then(|fl| fcntl(fd, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK)));
    set.map(drop).map_err(|e| {
        ActivationError(format!(
            "fd {} ({name:?}) passed by systemd: cannot make it non-blocking: {e}",
            fd.as_raw_fd()
        ))
    })
}

/// The backlog sockvisor gives every listening socket it creates: max(4096, somaxconn).
pub(crate) fn somaxconn() -> i32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
        .unwrap_or(4096)
        .max(4096)
}

fn bind_spec(spec: &ListenerSpec) -> Result<Listener, ActivationError> {
    let addr = spec.addr.as_ref().ok_or_else(|| {
        ActivationError(format!(
            "listener {:?} has no url and systemd passed no sockets; add url = \"tcp://HOST:PORT\" (or --listen {}=URL) or start it with its socket unit",
            spec.name, spec.name
        ))
    })?;
    let kind = expected_kind(addr);
    let policy = resolve_policy(kind, spec.policy);
    let bind_err = |what: &str, e: Errno| {
        let hint = match e {
            Errno::EADDRINUSE => " (another process listens there)",
            Errno::EACCES => " (ports below 1024 need root or CAP_NET_BIND_SERVICE; for a unix socket, check the directory's permissions)",
            Errno::EADDRNOTAVAIL => " (no local interface has this address)",
            _ => "",
        };
        ActivationError(format!(
            "listener {:?}: cannot {what} {addr}: {e}{hint}",
            spec.name
        ))
    };
    // Non-blocking only when sockvisor itself accepts (see the module documentation).
    let mut flags = SockFlag::SOCK_CLOEXEC;
    if policy.uses_channels() {
        flags |= SockFlag::SOCK_NONBLOCK;
    }
    let fd = match addr {
        ListenAddr::Tcp(sa) | ListenAddr::Udp(sa) => {
            let open = |at: std::net::SocketAddr| open_inet(at, kind, flags);
            let opened = if sa.port() != 0 {
                open(*sa)
            } else {
                open_any_port(*sa, sock_type(kind), open)
            };
            opened.map_err(|(what, e)| bind_err(what, e))?
        }
        ListenAddr::Unix(path) => {
            let fd = socket::socket(AddressFamily::Unix, SockType::Stream, flags, None)
                .map_err(|e| bind_err("create a socket for", e))?;
            prepare_unix_path(&spec.name, path)?;
            let ua = UnixAddr::new(path.as_path()).map_err(|e| bind_err("use the path", e))?;
            socket::bind(fd.as_raw_fd(), &ua).map_err(|e| bind_err("bind", e))?;
            socket::listen(&fd, listen_backlog()).map_err(|e| bind_err("listen on", e))?;
            fd
        }
    };
    let address = socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .map(|a| format_addr(&a))
        .unwrap_or_else(|_| addr.to_string());
    Ok(Listener {
        name: spec.name.clone(),
        kind,
        policy,
        fd,
        address,
        from_systemd: false,
        policy_note: None,
    })
}

fn sock_type(kind: SocketKind) -> SockType {
    if kind.is_stream() {
        SockType::Stream
    } else {
        SockType::Datagram
    }
}

fn listen_backlog() -> Backlog {
    Backlog::new(somaxconn()).unwrap_or(Backlog::MAXCONN)
}

/// A socket of `kind` bound to `at`, listening if it is a stream socket. The error names the
/// step that failed, for the message.
///
/// No `SO_REUSEPORT` here, TCP or UDP: bound with it, the socket would silently join the
/// group of another process of the same user on that port (a second sockvisor) instead of
/// failing with "address in use". The `reuseport` policy sets it afterwards, as on a socket
/// systemd passed (dispatch/reuseport/steered.rs).
fn open_inet(
    at: std::net::SocketAddr,
    kind: SocketKind,
    flags: SockFlag,
) -> Result<OwnedFd, (&'static str, Errno)> {
    let family = if at.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket::socket(family, sock_type(kind), flags, None)
        .map_err(|e| ("create a socket for", e))?;
    if kind.is_stream() {
        socket::setsockopt(&fd, sockopt::ReuseAddr, &true)
            .map_err(|e| ("set SO_REUSEADDR for", e))?;
    }
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(at)).map_err(|e| ("bind", e))?;
    if kind.is_stream() {
        socket::listen(&fd, listen_backlog()).map_err(|e| ("listen on", e))?;
    }
    Ok(fd)
}

/// `open` at a free port of `addr`'s address. The port is resolved first and then bound by
/// number: a socket whose port the kernel picked is not port-locked, so `shutdown()` releases
/// its port and a later `listen()` takes it again outside its `SO_REUSEPORT` group, which the
/// `reuseport` policy's requeue of the anchor relies on (docs/reuseport.md).
///
/// Race: another process (a second sockvisor started with port 0) may resolve the same port
/// between the probe and the bind. Both binds can succeed (`SO_REUSEADDR`, nobody listening
/// yet) and only the second `listen` fails, so a port taken at the bind *or* at the listen
/// is tried again with a new socket and a new port.
fn open_any_port(
    addr: std::net::SocketAddr,
    ty: SockType,
    open: impl Fn(std::net::SocketAddr) -> Result<OwnedFd, (&'static str, Errno)>,
) -> Result<OwnedFd, (&'static str, Errno)> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let mut last = ("bind", Errno::EADDRINUSE);
    for _ in 0..16 {
        let port = free_port(addr, family, ty).map_err(|e| ("find a free port for", e))?;
        let mut at = addr;
        at.set_port(port);
        match open(at) {
            Err((what, Errno::EADDRINUSE)) => last = (what, Errno::EADDRINUSE),
            r => return r,
        }
    }
    Err(last)
}

/// A `ty` port of `addr`'s address that was free a moment ago (the kernel's pick for a
/// probe).
fn free_port(
    addr: std::net::SocketAddr,
    family: AddressFamily,
    ty: SockType,
) -> Result<u16, Errno> {
    let probe = socket::socket(family, ty, SockFlag::SOCK_CLOEXEC, None)?;
    socket::bind(probe.as_raw_fd(), &SockaddrStorage::from(addr))?;
    let bound = socket::getsockname::<SockaddrStorage>(probe.as_raw_fd())?;
    Ok(bound
        .as_sockaddr_in()
        .map(|a| a.port())
        .or_else(|| bound.as_sockaddr_in6().map(|a| a.port()))
        .unwrap_or(0))
}

/// Make `path` bindable, by the runtime-files policy (`runtime_files`): its directory must
/// exist and be safe to hold a socket; a stale socket there is removed; a live socket, a
/// symlink or any other file is refused.
fn prepare_unix_path(name: &str, path: &Path) -> Result<(), ActivationError> {
    let err = |e: std::io::Error| {
        ActivationError(format!("listener {name:?}: unix:{}: {e}", path.display()))
    };
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    runtime_files::prepare_dir(parent, DirSetup::Existing).map_err(err)?;
    runtime_files::claim_socket_path(path, SockType::Stream).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::os::unix::net::UnixListener;

    fn spec(name: &str, url: Option<&str>, policy: DispatchPolicy) -> ListenerSpec {
        ListenerSpec {
            name: name.into(),
            addr: url.map(|u| crate::config::parse_listen(u).unwrap().1),
            policy,
        }
    }

    fn nonblocking(fd: &OwnedFd) -> bool {
        let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        nix::fcntl::OFlag::from_bits_truncate(fl).contains(nix::fcntl::OFlag::O_NONBLOCK)
    }

    fn cloexec(fd: &OwnedFd) -> bool {
        let fl = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap();
        nix::fcntl::FdFlag::from_bits_truncate(fl).contains(nix::fcntl::FdFlag::FD_CLOEXEC)
    }

    fn tcp_fd() -> OwnedFd {
        OwnedFd::from(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn udp_fd() -> OwnedFd {
        OwnedFd::from(UdpSocket::bind("127.0.0.1:0").unwrap())
    }

    fn err(r: Result<Vec<Listener>, ActivationError>) -> String {
        r.expect_err("expected an error").to_string()
    }

    #[test]
    fn binds_tcp_udp_unix() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let specs = vec![
            spec("web", Some("tcp://127.0.0.1:0"), DispatchPolicy::RoundRobin),
            spec("dns", Some("udp://127.0.0.1:0"), DispatchPolicy::RoundRobin),
            ListenerSpec {
                name: "local".into(),
                addr: Some(ListenAddr::Unix(sock.clone())),
                policy: DispatchPolicy::Shared,
            },
        ];
        let ls = listeners(vec![], &specs, DispatchPolicy::RoundRobin).unwrap();
        assert_eq!(ls.len(), 3);
        assert_eq!(ls[0].kind, SocketKind::TcpListener);
        assert_eq!(ls[0].policy, DispatchPolicy::RoundRobin);
        assert!(ls[0].address.starts_with("127.0.0.1:") && !ls[0].address.ends_with(":0"));
        assert!(nonblocking(&ls[0].fd) && cloexec(&ls[0].fd));
        assert!(!ls[0].from_systemd);
        assert_eq!(ls[1].kind, SocketKind::Udp);
        assert_eq!(ls[1].policy, DispatchPolicy::Shared);
        assert!(!nonblocking(&ls[1].fd) && cloexec(&ls[1].fd));
        assert_eq!(ls[2].kind, SocketKind::UnixListener);
        assert_eq!(ls[2].address, sock.display().to_string());
        assert!(!nonblocking(&ls[2].fd));
        // They really listen.
        let port: u16 = ls[0].address.rsplit_once(':').unwrap().1.parse().unwrap();
        TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::os::unix::net::UnixStream::connect(&sock).unwrap();
        // And validate as what they are.
        for l in &ls {
            assert_eq!(classify(l.fd.as_fd()).unwrap().0, l.kind);
        }
    }

    #[test]
    fn bind_errors() {
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("tcp://{}", taken.local_addr().unwrap());
        let e = err(listeners(
            vec![],
            &[spec("web", Some(&url), DispatchPolicy::RoundRobin)],
            DispatchPolicy::RoundRobin,
        ));
        assert!(
            e.contains("listener \"web\"") && e.contains("Address already in use"),
            "{e}"
        );
        let e = err(listeners(
            vec![],
            &[spec("web", None, DispatchPolicy::RoundRobin)],
            DispatchPolicy::RoundRobin,
        ));
        assert!(
            e.contains("listener \"web\" has no url and systemd passed no sockets"),
            "{e}"
        );
        let e = err(listeners(vec![], &[], DispatchPolicy::RoundRobin));
        assert!(e.starts_with("nothing to listen on"), "{e}");
    }

    /// Port 0: a port taken by a second sockvisor between the probe and the listen (both
    /// binds succeed with SO_REUSEADDR; the second listen fails) is tried again with a new
    /// port; another error is not.
    #[test]
    fn a_port_taken_at_the_listen_is_tried_again() {
        let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
        let tries = std::cell::Cell::new(0);
        let fd = open_any_port(any, SockType::Stream, |at| {
            tries.set(tries.get() + 1);
            assert_ne!(at.port(), 0);
            match tries.get() {
                1 => Err(("bind", Errno::EADDRINUSE)),
                2 => Err(("listen on", Errno::EADDRINUSE)),
                _ => open_inet(at, SocketKind::TcpListener, SockFlag::SOCK_CLOEXEC),
            }
        })
        .unwrap();
        assert_eq!(tries.get(), 3);
        assert!(TcpStream::connect(
            socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
                .unwrap()
                .to_string()
        )
        .is_ok());
        let e = open_any_port(any, SockType::Stream, |_| Err(("listen on", Errno::EACCES)));
        assert_eq!(e.unwrap_err(), ("listen on", Errno::EACCES));
        let e = open_any_port(any, SockType::Stream, |_| Err(("bind", Errno::EADDRINUSE)));
        assert_eq!(
            e.unwrap_err(),
            ("bind", Errno::EADDRINUSE),
            "gives up after 16"
        );
    }

    #[test]
    fn unix_paths() {
        let dir = tempfile::tempdir().unwrap();
        let bind = |p: &Path| {
            listeners(
                vec![],
                &[ListenerSpec {
                    name: "u".into(),
                    addr: Some(ListenAddr::Unix(p.to_path_buf())),
                    policy: DispatchPolicy::RoundRobin,
                }],
                DispatchPolicy::RoundRobin,
            )
        };
        // A stale socket file is replaced. (Stale once nobody answers: a child another test
        // forks meanwhile holds a copy of the listener until it execs.)
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&stale).is_ok() {
            assert!(std::time::Instant::now() < deadline, "still answering");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        bind(&stale).unwrap();
        // A live one is not.
        let live = dir.path().join("live.sock");
        let _keep = UnixListener::bind(&live).unwrap();
        let e = err(bind(&live));
        assert!(e.contains("is in use"), "{e}");
        // A regular file is not.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = err(bind(&file));
        assert!(e.contains("exists and is a regular file"), "{e}");
        // A symlink is not followed.
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let e = err(bind(&link));
        assert!(e.contains("is a symlink"), "{e}");
        // A missing directory is not created.
        let e = err(bind(&dir.path().join("nope/x.sock")));
        assert!(e.contains("does not exist"), "{e}");
        // The runtime-files policy for the directory: no world-writable one (anyone could
        // swap the socket), no symlinked one.
        let ww = dir.path().join("ww");
        std::fs::create_dir(&ww).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ww, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = err(bind(&ww.join("x.sock")));
        assert!(e.contains("writable by other users"), "{e}");
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(dir.path(), &linked).unwrap();
        let e = err(bind(&linked.join("x.sock")));
        assert!(e.contains("is a symlink (to "), "{e}");
    }

    #[test]
    fn validates_passed_fds() {
        // A UDP socket where a TCP listener is expected.
        let e = err(listeners(
            vec![(udp_fd(), "web".into())],
            &[spec(
                "web",
                Some("tcp://127.0.0.1:8000"),
                DispatchPolicy::RoundRobin,
            )],
            DispatchPolicy::RoundRobin,
        ));
        assert!(e.starts_with("fd ") && e.contains("(\"web\")"), "{e}");
        assert!(
            e.contains("is a UDP socket") && e.contains("needs a listening TCP socket"),
            "{e}"
        );

        // A connected, non-listening TCP socket.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let conn = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let e = err(listeners(
            vec![(OwnedFd::from(conn), "web".into())],
            &[],
            DispatchPolicy::RoundRobin,
        ));
        assert!(
            e.contains("(\"web\")") && e.contains("not listening"),
            "{e}"
        );

        // A pipe.
        let (r, _w) = nix::unistd::pipe().unwrap();
        let raw = r.as_raw_fd();
        let e = err(listeners(
            vec![(r, "web".into())],
            &[],
            DispatchPolicy::RoundRobin,
        ));
        assert!(e.starts_with(&format!("fd {raw} (\"web\")")), "{e}");
        assert!(e.contains("not a socket (a pipe or FIFO)"), "{e}");
    }

    #[test]
    fn matches_by_name() {
        // Missing name.
        let e = err(listeners(
            vec![(tcp_fd(), "api".into())],
            &[spec("web", None, DispatchPolicy::RoundRobin)],
            DispatchPolicy::RoundRobin,
        ));
        assert!(
            e.contains("listener \"web\" was not passed by systemd"),
            "{e}"
        );
        assert!(
            e.contains("\"api\"") && e.contains("FileDescriptorName=web"),
            "{e}"
        );

        // Matched by name, in spec order; extras closed; policies resolved.
        let ls = listeners(
            vec![
                (udp_fd(), "dns".into()),
                (tcp_fd(), "extra".into()),
                (tcp_fd(), "web".into()),
            ],
            &[
                spec("web", Some("tcp://127.0.0.1:8000"), DispatchPolicy::IpHash),
                spec("dns", None, DispatchPolicy::RoundRobin),
            ],
            DispatchPolicy::RoundRobin,
        )
        .unwrap();
        let got: Vec<_> = ls
            .iter()
            .map(|l| (l.name.as_str(), l.kind, l.policy, l.from_systemd))
            .collect();
        assert_eq!(
            got,
            vec![
                ("web", SocketKind::TcpListener, DispatchPolicy::IpHash, true),
                ("dns", SocketKind::Udp, DispatchPolicy::Shared, true),
            ]
        );

        // One unnamed fd, one listener: by position.
        let ls = listeners(
            vec![(tcp_fd(), "unknown".into())],
            &[spec(
                "web",
                Some("tcp://127.0.0.1:8000"),
                DispatchPolicy::RoundRobin,
            )],
            DispatchPolicy::RoundRobin,
        )
        .unwrap();
        assert_eq!(ls[0].name, "web");

        // No specs: every fd under its own name with the default policy.
        let fd = tcp_fd();
        let ls = listeners(
            vec![(fd, "a".into()), (udp_fd(), "b".into())],
            &[],
            DispatchPolicy::LeastConnections,
        )
        .unwrap();
        assert_eq!(ls[0].name, "a");
        assert_eq!(ls[0].policy, DispatchPolicy::LeastConnections);
        assert_eq!(ls[1].policy, DispatchPolicy::Shared);
        assert!(ls[0].address.starts_with("127.0.0.1:"));
    }

    /// systemd passes blocking sockets: the ones sockvisor accepts on become non-blocking (or
    /// the event loop would block in accept4), the ones workers use keep systemd's mode.
    #[test]
    fn passed_fds_accept_mode() {
        let fds = [tcp_fd(), tcp_fd(), udp_fd()];
        assert!(fds.iter().all(|fd| !nonblocking(fd)));
        let [a, b, c] = fds;
        let ls = listeners(
            vec![(a, "web".into()), (b, "admin".into()), (c, "dns".into())],
            &[
                spec("web", None, DispatchPolicy::RoundRobin),
                spec("admin", None, DispatchPolicy::Shared),
                spec("dns", None, DispatchPolicy::RoundRobin),
            ],
            DispatchPolicy::RoundRobin,
        )
        .unwrap();
        assert!(nonblocking(&ls[0].fd));
        assert!(!nonblocking(&ls[1].fd));
        assert!(!nonblocking(&ls[2].fd));
        // without configured listeners too
        let ls = listeners(vec![(tcp_fd(), "x".into())], &[], DispatchPolicy::IpHash).unwrap();
        assert!(nonblocking(&ls[0].fd));
    }

    /// Runs only as the child of `take_from_env_in_a_child`: takes the fds and prints them.
    #[test]
    fn child_take_from_env() {
        if std::env::var_os("SOCKVISOR_TEST_TAKE_CHILD").is_none() {
            return;
        }
        let fds = take_from_env();
        for (fd, name) in &fds {
            let kind = classify(fd.as_fd()).map(|k| format!("{:?}", k.0));
            println!(
                "FD {} {name} {}",
                fd.as_raw_fd(),
                kind.unwrap_or_else(|e| e)
            );
        }
        for v in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            if std::env::var_os(v).is_some() {
                println!("STILL SET {v}");
            }
        }
        println!("COUNT {}", fds.len());
    }

    /// `take_from_env` in a fresh process whose fd 3 is a listening socket: `sh` puts the
    /// socket given as stdin at fd 3 and sets LISTEN_PID to its own pid before exec.
    #[test]
    fn take_from_env_in_a_child() {
        let exe = std::env::current_exe().unwrap();
        let run = |vars: &str| {
            let listener = tcp_fd();
            let out = std::process::Command::new("/bin/sh")
                .arg("-c")
                .arg(format!(
                    "exec 3<&0 0</dev/null; {vars} exec \"$0\" --exact activation::tests::child_take_from_env --nocapture --test-threads=1"
                ))
                .arg(&exe)
                .env("SOCKVISOR_TEST_TAKE_CHILD", "1")
                .env_remove("LISTEN_PID")
                .env_remove("LISTEN_FDS")
                .env_remove("LISTEN_FDNAMES")
                .stdin(std::process::Stdio::from(listener))
                .stderr(std::process::Stdio::null())
                .output()
                .unwrap();
            assert!(out.status.success());
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(!text.contains("STILL SET"), "{text}");
            text
        };
        let t = run("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=web");
        assert!(
            t.contains("FD 3 web TcpListener") && t.contains("COUNT 1"),
            "{t}"
        );
        let t = run("LISTEN_PID=$$ LISTEN_FDS=1");
        assert!(t.contains("FD 3 unknown TcpListener"), "{t}");
        // Stale names without our LISTEN_PID: not socket-activated.
        let t = run("LISTEN_FDS=1 LISTEN_FDNAMES=web");
        assert!(t.contains("COUNT 0"), "{t}");
        let t = run("LISTEN_PID=1 LISTEN_FDS=1 LISTEN_FDNAMES=web");
        assert!(t.contains("COUNT 0"), "{t}");
        // Names that do not fit: the fds are kept, named "unknown".
        let t = run("LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=a:b");
        assert!(t.contains("FD 3 unknown TcpListener"), "{t}");
    }
}
