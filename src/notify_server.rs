//! The `NOTIFY_SOCKET` sockvisor offers its workers: sockvisor is their systemd.
//!
//! A unix datagram socket with `SO_PASSCRED`. Each datagram is attributed to the sender's
//! pid from the kernel's credentials (`SCM_CREDENTIALS`, which a sender cannot forge); the
//! supervisor acts only on datagrams from pids that are live workers of this fleet, and
//! drops the rest. Fds sent along are closed. Parsing follows systemd: one `KEY=VALUE` per
//! line, unknown keys ignored.
//!
//! # Where it is
//!
//! - Under systemd with `RuntimeDirectory=` (`$RUNTIME_DIRECTORY` set, as in the shipped
//!   units): `$RUNTIME_DIRECTORY/workers/notify.sock`, in a private directory (0700, or 0710
//!   to the workers' group when they run as another user; `runtime_files`). systemd removes
//!   the directory when the service stops, SIGKILL included, and every sd_notify client
//!   speaks paths, the `sd-notify` crate (0.5) included, which does not know `@` names.
//! - Elsewhere: an abstract socket, `NOTIFY_SOCKET=@sockvisor/<pid>/<random>`. It has no
//!   file, so a SIGKILLed sockvisor leaves nothing behind (a fresh `/tmp/sockvisor.XXXXXX`
//!   per start used to pile up). libsystemd (`sd_notify(3)`, `systemd-notify`,
//!   python-systemd), the `libsystemd` crate, Go's go-systemd, `sockvisor::worker` and
//!   raw senders that map a leading `@` to a NUL byte accept it, as `sd_notify(3)`
//!   documents.
//!
//! # Trust boundary
//!
//! An abstract socket has no file mode: **any process in sockvisor's network namespace**,
//! of any user, can send to it (as to systemd's own `/run/systemd/notify`, which is
//! world-writable). What keeps a stranger out is the pid check, not permissions: a datagram
//! acts only if the kernel says it came from a live worker of this fleet. A stranger can
//! make sockvisor log (rate-limited) and spend a bounded effort per wake-up ([`RECV_BATCH`]
//! datagrams), and by flooding it can delay the workers' own notifications; it cannot make
//! a worker ready, healthy or stopping. Under `$RUNTIME_DIRECTORY` the directory's mode
//! also keeps out everyone but sockvisor's user and the workers' group. Workers moved into
//! another network namespace cannot reach an abstract socket.

use std::cell::{Cell, RefCell};
use std::ffi::{OsStr, OsString};
use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, ControlMessageOwned, MsgFlags, SockType, UnixAddr, UnixCredentials,
};

use crate::runtime_files::{self, DirSetup, SocketFile};

/// Datagrams [`NotifyServer::recv`] returns before it returns `None` once, so one drain of
/// the socket is bounded even while someone floods it.
pub const RECV_BATCH: usize = 256;

/// Longest `STATUS=` text kept (bytes, cut on a char boundary).
pub const MAX_STATUS_LEN: usize = 512;

/// Receive buffer: a datagram longer than this is dropped whole (systemd does the same), so a
/// value cut at the buffer's end is never taken for a shorter one.
pub const RECV_BUFFER_LEN: usize = 4096;

/// Most fds one `SCM_RIGHTS` message can carry (the kernel's `SCM_MAX_FD`): the control
/// buffer has room for all of them, so the kernel never truncates the credentials away.
const MAX_FDS: usize = 253;

/// What one datagram said. Fields absent from the datagram are `None`/`false`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Notification {
    pub ready: bool,
    pub reloading: bool,
    pub stopping: bool,
    pub status: Option<String>,
    /// `WATCHDOG=1`
    pub watchdog: bool,
    /// `WATCHDOG=trigger`
    pub watchdog_trigger: bool,
    pub watchdog_usec: Option<u64>,
    pub extend_timeout_usec: Option<u64>,
    pub errno: Option<i32>,
}

/// Parse one datagram. Never fails: malformed lines are ignored, as systemd does.
///
/// * One `KEY=VALUE` per line (`\n`); lines without `=`, unknown keys (`MAINPID=`,
///   `FDSTORE=`, `BUSERROR=`, ...) and unparsable values are ignored.
/// * Flags count only with the value systemd accepts: `READY=1`, `RELOADING=1`,
///   `STOPPING=1`, `WATCHDOG=1`, `WATCHDOG=trigger`.
/// * For keys with a value, the first valid occurrence wins (systemd's
///   `strv_find_startswith`).
/// * `STATUS=` is converted lossily from UTF-8, control characters become spaces (it is
///   shown on terminals), and it is cut to [`MAX_STATUS_LEN`] bytes on a char boundary.
///   An empty `STATUS=` is `Some("")`: the worker cleared its status.
/// * `ERRNO=` must be a non-negative integer.
pub fn parse(datagram: &[u8]) -> Notification {
    let mut n = Notification::default();
    for line in datagram.split(|&b| b == b'\n') {
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (key, value) = (&line[..eq], &line[eq + 1..]);
        match key {
            b"READY" => n.ready |= value == b"1",
            b"RELOADING" => n.reloading |= value == b"1",
            b"STOPPING" => n.stopping |= value == b"1",
            b"WATCHDOG" => match value {
                b"1" => n.watchdog = true,
                b"trigger" => n.watchdog_trigger = true,
                _ => {}
            },
            b"STATUS" if n.status.is_none() => n.status = Some(clean_status(value)),
            b"WATCHDOG_USEC" if n.watchdog_usec.is_none() => {
                n.watchdog_usec = parse_num::<u64>(value)
            }
            b"EXTEND_TIMEOUT_USEC" if n.extend_timeout_usec.is_none() => {
                n.extend_timeout_usec = parse_num::<u64>(value)
            }
            b"ERRNO" if n.errno.is_none() => n.errno = parse_num::<i32>(value).filter(|e| *e >= 0),
            _ => {}
        }
    }
    n
}

fn parse_num<T: std::str::FromStr>(value: &[u8]) -> Option<T> {
    // Digits only: no sign, no spaces (systemd's safe_atou64 would accept leading
    // whitespace; no client sends it).
    if value.is_empty() || value.len() > 20 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

fn clean_status(value: &[u8]) -> String {
    // Cut the bytes first so a huge status never costs a huge allocation; lossy conversion
    // can grow the text (1 invalid byte -> 3 bytes of U+FFFD), so cut again after.
    let raw = &value[..value.len().min(MAX_STATUS_LEN)];
    let mut s: String = String::from_utf8_lossy(raw)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.len() > MAX_STATUS_LEN {
        let mut cut = MAX_STATUS_LEN;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// One received datagram.
#[derive(Debug)]
pub struct Received {
    /// The sender's pid from `SCM_CREDENTIALS`, if the kernel attached credentials.
    pub pid: Option<i32>,
    pub notification: Notification,
}

/// Counters of odd datagrams, for logs and `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NotifyStats {
    /// Datagrams received (any content).
    pub received: u64,
    /// Datagrams longer than [`RECV_BUFFER_LEN`], parsed as far as they went.
    pub truncated: u64,
    /// Datagrams that came without credentials (should not happen with `SO_PASSCRED`).
    pub without_pid: u64,
    /// Fds that came along and were closed.
    pub fds_closed: u64,
}

pub struct NotifyServer {
    /// The `NOTIFY_SOCKET` value workers get: `@name` (abstract) or a path.
    address: OsString,
    /// The socket file, for a socket bound on a path (removed on drop).
    file: Option<SocketFile>,
    sock: OwnedFd,
    buf: RefCell<Vec<u8>>,
    cmsg: RefCell<Vec<u8>>,
    stats: Cell<NotifyStats>,
    /// Datagrams returned since `recv` last returned `None`.
    batch: Cell<usize>,
}

impl NotifyServer {
    /// The workers' notify socket, where the module documentation says: in
    /// `$RUNTIME_DIRECTORY/workers` (made private, group `worker_gid` when workers run as
    /// another user) under systemd, else an abstract socket.
    pub fn bind_for_workers(worker_gid: Option<u32>) -> io::Result<NotifyServer> {
        match runtime_directory() {
            Some(rd) => {
                let dir = rd.join("workers");
                runtime_files::prepare_dir(&dir, DirSetup::Private { group: worker_gid })?;
                NotifyServer::bind_path(&dir.join("notify.sock"), worker_gid)
            }
            None => NotifyServer::bind_abstract(),
        }
    }

    /// Bind an abstract socket `@sockvisor/<pid>/<random>`: unique to this sockvisor (the
    /// pid), and to this start even when another pid namespace shares the network namespace
    /// (the random part). It vanishes with the socket: nothing to clean up after a crash.
    pub fn bind_abstract() -> io::Result<NotifyServer> {
        let sock = new_socket()?;
        let mut tries = 0;
        loop {
            let name = format!("sockvisor/{}/{:016x}", std::process::id(), random_u64());
            let addr = UnixAddr::new_abstract(name.as_bytes())?;
            match socket::bind(sock.as_raw_fd(), &addr) {
                Ok(()) => {
                    return Ok(NotifyServer::new(
                        OsString::from(format!("@{name}")),
                        None,
                        sock,
                    ))
                }
                Err(Errno::EADDRINUSE) if tries < 8 => tries += 1,
                Err(e) => {
                    return Err(io::Error::new(
                        io::Error::from(e).kind(),
                        format!("cannot bind the workers' notify socket @{name}: {e}"),
                    ))
                }
            }
        }
    }

    /// Bind at `path` (its directory prepared by the caller). A stale socket there is
    /// replaced, a live one or any other file refused (`runtime_files`). The socket is mode
    /// 0600, or 0620 with group `worker_gid` so workers running as another user can send.
    pub fn bind_path(path: &Path, worker_gid: Option<u32>) -> io::Result<NotifyServer> {
        runtime_files::unix_addr(path)?;
        runtime_files::claim_socket_path(path, SockType::Datagram)?;
        let sock = new_socket()?;
        let mode = if worker_gid.is_some() { 0o620 } else { 0o600 };
        let file = SocketFile::bind(&sock, path, mode, worker_gid)?;
        Ok(NotifyServer::new(
            path.as_os_str().to_owned(),
            Some(file),
            sock,
        ))
    }

    fn new(address: OsString, file: Option<SocketFile>, sock: OwnedFd) -> NotifyServer {
        NotifyServer {
            address,
            file,
            sock,
            buf: RefCell::new(vec![0u8; RECV_BUFFER_LEN]),
            cmsg: RefCell::new(nix::cmsg_space!(UnixCredentials, [RawFd; MAX_FDS])),
            stats: Cell::new(NotifyStats::default()),
            batch: Cell::new(0),
        }
    }

    /// The `NOTIFY_SOCKET` value for workers: `@sockvisor/...` or a path.
    pub fn address(&self) -> &OsStr {
        &self.address
    }

    /// [`NotifyServer::address`] as a `Path`, for a path socket. An `@name` is not a file:
    /// never open it as one.
    pub fn path(&self) -> &Path {
        Path::new(&self.address)
    }

    /// Whether the socket is abstract (no file).
    pub fn is_abstract(&self) -> bool {
        self.file.is_none()
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn stats(&self) -> NotifyStats {
        self.stats.get()
    }

    /// The next datagram, or `None` when there is none (EAGAIN), or when [`RECV_BATCH`]
    /// datagrams were returned since the last `None`: a flood cannot hold the loop in one
    /// drain (the socket stays readable and the loop comes back). An oversized datagram is
    /// dropped whole, as systemd does (`WATCHDOG_USEC=30000000` cut after `30` must not
    /// become 30 µs); fds that came with any datagram are closed.
    pub fn recv(&self) -> std::io::Result<Option<Received>> {
        if self.batch.get() >= RECV_BATCH {
            self.batch.set(0);
            return Ok(None);
        }
        let mut buf = self.buf.borrow_mut();
        let mut cmsg = self.cmsg.borrow_mut();
        let mut stats = self.stats.get();
        let (len, pid) = loop {
            let mut iov = [IoSliceMut::new(&mut buf[..])];
            let msg = match socket::recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg[..]),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => msg,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    self.batch.set(0);
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            };
            stats.received += 1;
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                stats.truncated += 1;
            }
            let mut pid = None;
            match msg.cmsgs() {
                Ok(cmsgs) => {
                    for c in cmsgs {
                        match c {
                            ControlMessageOwned::ScmCredentials(cr) => pid = Some(cr.pid()),
                            ControlMessageOwned::ScmRights(fds) => {
                                for fd in fds {
                                    // SAFETY: the kernel just installed this fd in our table
                                    // for us (MSG_CMSG_CLOEXEC); nothing else owns it.
                                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                                    stats.fds_closed += 1;
                                }
                            }
                            _ => {}
                        }
                    }
                }
                // Cannot happen with room for SCM_MAX_FD fds; the kernel closes what did not
                // fit, and we lose the credentials.
                Err(_) => log::debug!("worker notification with truncated control data"),
            }
            if pid.is_none() {
                stats.without_pid += 1;
            }
            if msg.flags.contains(MsgFlags::MSG_TRUNC) {
                log::debug!(
                    "dropped a notification longer than {RECV_BUFFER_LEN} bytes (pid {pid:?})"
                );
                continue;
            }
            break (msg.bytes.min(buf.len()), pid);
        };
        self.stats.set(stats);
        self.batch.set(self.batch.get() + 1);
        Ok(Some(Received {
            pid,
            notification: parse(&buf[..len]),
        }))
    }
}

fn new_socket() -> io::Result<OwnedFd> {
    let sock = runtime_files::unix_socket(SockType::Datagram)?;
    socket::setsockopt(&sock, sockopt::PassCred, &true)?;
    // Best effort: room for bursts of notifications from many workers.
    let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &(1 << 20));
    Ok(sock)
}

/// `$RUNTIME_DIRECTORY` (its first entry, when systemd gives a list), if set.
fn runtime_directory() -> Option<PathBuf> {
    let rd = std::env::var_os("RUNTIME_DIRECTORY").filter(|v| !v.is_empty())?;
    let first = rd
        .into_vec()
        .split(|&b| b == b':')
        .find(|s| !s.is_empty())
        .map(<[u8]>::to_vec)?;
    Some(PathBuf::from(OsString::from_vec(first)))
}

/// Not a secret (the pid check is what protects the socket): only unlikely to repeat.
/// `RandomState` is seeded from the OS's random source.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixDatagram;

    fn server() -> (tempfile::TempDir, NotifyServer) {
        let dir = tempfile::tempdir().unwrap();
        let s = NotifyServer::bind_path(&dir.path().join("notify.sock"), None).unwrap();
        (dir, s)
    }

    /// Run the ignored test `name` of this binary in a child process with `var` set: the
    /// environment is per process, and this one is multi-threaded.
    fn run_child(name: &str, var: &str, value: impl AsRef<OsStr>) -> std::process::Output {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--ignored", "--nocapture"])
            .env(var, value)
            .output()
            .unwrap()
    }

    fn recv_one(s: &NotifyServer) -> Received {
        // The datagram is queued by the time send() returns.
        s.recv().unwrap().expect("a datagram")
    }

    #[test]
    fn parse_systemd_semantics() {
        let n = parse(b"READY=1\nSTATUS=serving 3 clients\nWATCHDOG=1\nMAINPID=42\nX=y\n");
        assert!(n.ready && n.watchdog);
        assert_eq!(n.status.as_deref(), Some("serving 3 clients"));
        assert!(!n.reloading && !n.stopping && !n.watchdog_trigger);

        let n = parse(b"READY=yes\nRELOADING=0\nSTOPPING=1\nWATCHDOG=trigger\n");
        assert!(!n.ready && !n.reloading && n.stopping && n.watchdog_trigger && !n.watchdog);

        let n = parse(b"WATCHDOG_USEC=5000000\nEXTEND_TIMEOUT_USEC=12\nERRNO=2");
        assert_eq!(n.watchdog_usec, Some(5_000_000));
        assert_eq!(n.extend_timeout_usec, Some(12));
        assert_eq!(n.errno, Some(2));

        let n = parse(b"WATCHDOG_USEC=-1\nEXTEND_TIMEOUT_USEC=abc\nERRNO=-5\nWATCHDOG_USEC=99999999999999999999999");
        assert_eq!(n, Notification::default());

        // First valid value wins; empty STATUS clears.
        let n = parse(b"STATUS=\nSTATUS=b\nERRNO=x\nERRNO=7\nERRNO=8");
        assert_eq!(n.status.as_deref(), Some(""));
        assert_eq!(n.errno, Some(7));

        assert_eq!(parse(b""), Notification::default());
        assert_eq!(parse(b"\n\n=\n=1\nREADY\nready=1"), Notification::default());
        assert!(parse(b"READY=1").ready);
    }

    #[test]
    fn parse_status_is_clean_and_bounded() {
        let n = parse(b"STATUS=caf\xc3\xa9 \xff\x1b[31m\tend");
        assert_eq!(n.status.as_deref(), Some("caf\u{e9} \u{fffd} [31m end"));

        let mut long = b"STATUS=".to_vec();
        long.extend(std::iter::repeat_n(b'a', 511));
        long.extend("é".as_bytes()); // straddles the 512-byte cap
        long.extend(std::iter::repeat_n(b'b', 10_000));
        let s = parse(&long).status.unwrap();
        assert_eq!(s.len(), 511);

        let mut invalid = b"STATUS=".to_vec();
        invalid.extend(std::iter::repeat_n(0xffu8, 1000));
        let s = parse(&invalid).status.unwrap();
        assert!(s.len() <= MAX_STATUS_LEN && s.chars().all(|c| c == '\u{fffd}'));
    }

    #[test]
    fn parse_never_panics_on_garbage() {
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    // Bias towards the interesting bytes.
                    match x % 8 {
                        0 => b'\n',
                        1 => b'=',
                        2 => b"READY=1STATUS"[i % 13],
                        _ => x as u8,
                    }
                })
                .collect();
            let _ = parse(&bytes);
        }
    }

    #[test]
    fn recv_reports_pid_and_parses() {
        let (_dir, s) = server();
        assert!(s.recv().unwrap().is_none());
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1\nSTATUS=hello\n", s.path()).unwrap();
        let r = recv_one(&s);
        assert_eq!(r.pid, Some(std::process::id() as i32));
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("hello"));
        assert!(s.recv().unwrap().is_none());

        c.send_to(b"\x00\xff\xfe garbage \n==\n", s.path()).unwrap();
        let r = recv_one(&s);
        assert_eq!(r.notification, Notification::default());
        assert_eq!(s.stats().received, 2);
    }

    #[test]
    fn socket_file_mode_and_stale_and_cleanup() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        // A stale socket is replaced.
        drop(UnixDatagram::bind(&path).unwrap());
        let s = NotifyServer::bind_path(&path, None).unwrap();
        assert!(!s.is_abstract());
        let m = std::fs::symlink_metadata(s.path()).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o600);
        // A live one is not: the first server keeps its socket.
        let e = NotifyServer::bind_path(&path, None).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
        assert!(path.exists());
        drop(s);
        assert!(!path.exists());

        // Anything else is not.
        std::fs::write(&path, b"x").unwrap();
        assert!(NotifyServer::bind_path(&path, None).is_err());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent", &path).unwrap();
        assert!(NotifyServer::bind_path(&path, None).is_err());

        // A group-writable socket for workers in that group (our own gid always works).
        let gid = nix::unistd::getegid().as_raw();
        let p2 = dir.path().join("g.sock");
        let s = NotifyServer::bind_path(&p2, Some(gid)).unwrap();
        let m = std::fs::symlink_metadata(s.path()).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o620, gid));
    }

    /// Outside systemd: an abstract socket, named per sockvisor and per start, that works
    /// and leaves no file.
    #[test]
    fn abstract_socket_reports_pid_and_leaves_no_file() {
        use std::os::linux::net::SocketAddrExt;
        let a = NotifyServer::bind_abstract().unwrap();
        let b = NotifyServer::bind_abstract().unwrap();
        assert!(a.is_abstract());
        let name = a.address().to_str().unwrap().to_string();
        let prefix = format!("@sockvisor/{}/", std::process::id());
        assert!(name.starts_with(&prefix), "{name}");
        assert_ne!(a.address(), b.address(), "two servers of one process");
        assert!(!Path::new(&name).exists());
        let to = std::os::unix::net::SocketAddr::from_abstract_name(&name.as_bytes()[1..]).unwrap();
        let c = UnixDatagram::unbound().unwrap();
        c.send_to_addr(b"READY=1\nSTATUS=abstract", &to).unwrap();
        let r = recv_one(&a);
        assert_eq!(r.pid, Some(std::process::id() as i32));
        assert_eq!(r.notification.status.as_deref(), Some("abstract"));
        assert!(b.recv().unwrap().is_none());
        drop(a);
        // Gone with the socket: nobody answers at the name any more.
        let e = c.send_to_addr(b"READY=1", &to).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    }

    /// A flood is taken at most `RECV_BATCH` datagrams per drain (`recv` says "none" in
    /// between, and the socket stays readable), and nothing is lost. The kernel queues only
    /// `net.unix.max_dgram_qlen` datagrams, so the flood comes from senders blocked on it.
    #[test]
    fn recv_is_bounded_per_drain() {
        let (_dir, s) = server();
        const SENDERS: usize = 4;
        const EACH: usize = 1000;
        let senders: Vec<_> = (0..SENDERS)
            .map(|_| {
                let path = s.path().to_path_buf();
                std::thread::spawn(move || {
                    let c = UnixDatagram::unbound().unwrap();
                    for _ in 0..EACH {
                        c.send_to(b"WATCHDOG=1", &path).unwrap();
                    }
                })
            })
            .collect();
        let (mut total, mut largest) = (0, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while total < SENDERS * EACH {
            assert!(std::time::Instant::now() < deadline, "{total} received");
            let n = std::iter::from_fn(|| s.recv().unwrap()).count();
            assert!(n <= RECV_BATCH, "{n} datagrams in one drain");
            (total, largest) = (total + n, largest.max(n));
        }
        for t in senders {
            t.join().unwrap();
        }
        assert_eq!(s.stats().received, (SENDERS * EACH) as u64);
        eprintln!("largest drain: {largest} datagrams");
    }

    /// Issue 14, item 11: an oversized datagram is dropped whole, not parsed up to the cut
    /// (a `WATCHDOG_USEC=30000000` cut after "30" used to become 30 µs).
    #[test]
    fn a_truncated_datagram_is_dropped_whole() {
        let (_dir, s) = server();
        let c = UnixDatagram::unbound().unwrap();
        socket::setsockopt(&c, sockopt::SndBuf, &(256 * 1024)).unwrap();
        let mut msg = b"READY=1\nSTATUS=big\n".to_vec();
        msg.resize(RECV_BUFFER_LEN - b"WATCHDOG_USEC=30".len(), b'x');
        msg.extend_from_slice(b"\nWATCHDOG_USEC=30000000\n");
        c.send_to(&msg, s.path()).unwrap();
        c.send_to(b"WATCHDOG=1", s.path()).unwrap();
        // The next datagram is the one returned: the long one is gone, not half-read.
        let r = recv_one(&s);
        assert!(r.notification.watchdog, "{:?}", r.notification);
        assert!(!r.notification.ready);
        assert_eq!(r.notification.watchdog_usec, None);
        assert_eq!(s.stats().truncated, 1);
    }

    #[test]
    fn fds_sent_along_are_closed() {
        use nix::sys::socket::ControlMessage;
        use std::io::IoSlice;
        let (_dir, s) = server();
        let (r, w) = nix::unistd::pipe().unwrap();
        let c = UnixDatagram::unbound().unwrap();
        let addr = UnixAddr::new(s.path()).unwrap();
        let fds = [w.as_raw_fd(), w.as_raw_fd()];
        socket::sendmsg(
            c.as_raw_fd(),
            &[IoSlice::new(b"READY=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        drop(w);
        let got = recv_one(&s);
        assert!(got.notification.ready);
        assert_eq!(got.pid, Some(std::process::id() as i32));
        assert_eq!(s.stats().fds_closed, 2);
        // Every copy of the write end is gone: the read end sees EOF at once.
        let mut b = [0u8; 1];
        assert_eq!(nix::unistd::read(&r, &mut b).unwrap(), 0);
    }

    #[test]
    fn sd_notify_crate_client_works() {
        let (_dir, s) = server();
        // The crate reads NOTIFY_SOCKET from the environment: set it only in a child process
        // (this test binary re-executed), never in this multi-threaded one.
        let out = run_child(
            "notify_server::tests::sd_notify_child",
            "NOTIFY_SOCKET",
            s.path(),
        );
        assert!(out.status.success(), "{out:?}");
        let r = recv_one(&s);
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("from sd-notify"));
        assert_eq!(r.notification.extend_timeout_usec, Some(5_000_000));
        assert!(r.pid.is_some() && r.pid != Some(std::process::id() as i32));
        let r = recv_one(&s);
        assert!(r.notification.watchdog && r.notification.stopping);
    }

    /// The abstract `NOTIFY_SOCKET` with a real client: the `libsystemd` crate (as
    /// `sd_notify(3)`, it maps `@` to the abstract namespace).
    #[test]
    fn libsystemd_crate_client_works_with_an_abstract_socket() {
        let s = NotifyServer::bind_abstract().unwrap();
        let out = run_child(
            "notify_server::tests::libsystemd_child",
            "NOTIFY_SOCKET",
            s.address(),
        );
        assert!(out.status.success(), "{out:?}");
        let r = recv_one(&s);
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("from libsystemd"));
        assert!(r.pid.is_some() && r.pid != Some(std::process::id() as i32));
    }

    /// Run only by `libsystemd_crate_client_works_with_an_abstract_socket`.
    #[test]
    #[ignore]
    fn libsystemd_child() {
        use libsystemd::daemon::{notify, NotifyState};
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        let sent = notify(
            false,
            &[
                NotifyState::Ready,
                NotifyState::Status("from libsystemd".into()),
            ],
        )
        .unwrap();
        assert!(sent);
    }

    /// Run only by `sd_notify_crate_client_works`, with NOTIFY_SOCKET set.
    #[test]
    #[ignore]
    fn sd_notify_child() {
        use sd_notify::NotifyState;
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return;
        }
        sd_notify::notify(&[
            NotifyState::Ready,
            NotifyState::Status("from sd-notify"),
            NotifyState::ExtendTimeoutUsec(5_000_000),
        ])
        .unwrap();
        sd_notify::notify(&[NotifyState::Watchdog, NotifyState::Stopping]).unwrap();
    }

    #[test]
    fn worker_of_another_user_can_send() {
        if !crate::prereq::require(crate::prereq::is_root(), "needs root to act as uid 65534") {
            return;
        }
        let python = Path::new("/usr/bin/python3");
        if !crate::prereq::require(python.exists(), "/usr/bin/python3 not found") {
            return;
        }
        use std::os::unix::process::CommandExt;
        let t = tempfile::tempdir().unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let d = t.path().join("workers");
        runtime_files::prepare_dir(&d, DirSetup::Private { group: Some(65534) }).unwrap();
        let s = NotifyServer::bind_path(&d.join("notify.sock"), Some(65534)).unwrap();
        let send = |gid: u32| {
            std::process::Command::new(python)
                .args([
                    "-c",
                    "import socket,sys\n\
                     s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
                     try:\n s.sendto(b'READY=1\\nSTATUS=nobody',sys.argv[1]); print('sent')\n\
                     except PermissionError: print('EACCES')\n",
                ])
                .arg(s.path())
                .uid(65534)
                .gid(gid)
                .output()
                .unwrap()
        };
        // In the group: allowed, and attributed to the sender's pid.
        let out = send(65534);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "sent",
            "{out:?}"
        );
        let r = recv_one(&s);
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("nobody"));
        assert!(r.pid.is_some_and(|p| p != std::process::id() as i32));
        // Not in the group: the directory (0710) keeps it out.
        let out = send(12345);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "EACCES",
            "{out:?}"
        );
        assert!(s.recv().unwrap().is_none());
    }

    /// `$RUNTIME_DIRECTORY` set (systemd): a path in its private `workers` directory, as
    /// every sd_notify client speaks paths. Run in a child: the environment is per process.
    #[test]
    fn under_runtime_directory_a_path_in_a_private_directory() {
        let rd = tempfile::tempdir().unwrap();
        let out = run_child(
            "notify_server::tests::runtime_directory_child",
            "RUNTIME_DIRECTORY",
            format!("{}:/nonexistent", rd.path().display()),
        );
        assert!(out.status.success(), "{out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want = rd.path().join("workers/notify.sock");
        assert!(
            stdout.contains(&format!("ADDRESS {}", want.display())),
            "{stdout}"
        );
        assert!(stdout.contains("MODE 700"), "{stdout}");
        // Dropped at the child's exit: the socket is gone, the directory (systemd's) stays.
        assert!(!want.exists() && rd.path().join("workers").is_dir());
    }

    /// Run only by `under_runtime_directory_a_path_in_a_private_directory`.
    #[test]
    #[ignore]
    fn runtime_directory_child() {
        use std::os::unix::fs::MetadataExt;
        if std::env::var_os("RUNTIME_DIRECTORY").is_none() {
            return;
        }
        let s = NotifyServer::bind_for_workers(None).unwrap();
        assert!(!s.is_abstract());
        let dir = s.path().parent().unwrap();
        println!("ADDRESS {}", s.path().display());
        println!("MODE {:o}", std::fs::metadata(dir).unwrap().mode() & 0o7777);
        let c = UnixDatagram::unbound().unwrap();
        c.send_to(b"READY=1", s.path()).unwrap();
        assert!(recv_one(&s).notification.ready);
    }
}
