//! The `NOTIFY_SOCKET` sockvisor offers its workers: sockvisor is their systemd.
//!
//! A unix datagram socket with `SO_PASSCRED` in a directory only sockvisor (and, when
//! workers run as another user, that user's group) can enter. Each datagram is attributed to
//! the sender's pid from the kernel's credentials; the supervisor drops messages from pids
//! that are not live workers. Fds sent along are closed. Parsing follows systemd: one
//! `KEY=VALUE` per line, unknown keys ignored.

use std::cell::{Cell, RefCell};
use std::ffi::OsString;
use std::io;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
    UnixCredentials,
};

/// Longest `STATUS=` text kept (bytes, cut on a char boundary).
pub const MAX_STATUS_LEN: usize = 512;

/// Receive buffer: a datagram longer than this is truncated and parsed as far as it goes.
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
    path: PathBuf,
    sock: OwnedFd,
    /// Directory to remove on drop: the temporary one we created.
    remove_dir: Option<PathBuf>,
    buf: RefCell<Vec<u8>>,
    cmsg: RefCell<Vec<u8>>,
    stats: Cell<NotifyStats>,
}

impl NotifyServer {
    /// Bind `dir/notify.sock` (non-blocking, close-on-exec, `SO_PASSCRED`). `dir` must exist
    /// and be private to sockvisor. With `worker_gid`, the socket is made writable by that
    /// group so workers running as another user can send.
    ///
    /// A stale `notify.sock` is removed first, only if it is a socket (never follows a
    /// symlink). The socket file is unlinked on drop.
    pub fn bind(dir: &Path, worker_gid: Option<u32>) -> std::io::Result<NotifyServer> {
        let path = dir.join("notify.sock");
        remove_stale_socket(&path)?;
        let sock = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        socket::setsockopt(&sock, sockopt::PassCred, &true)?;
        // Best effort: room for bursts of notifications from many workers.
        let _ = socket::setsockopt(&sock, sockopt::RcvBuf, &(1 << 20));
        let addr = UnixAddr::new(&path).map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!(
                    "cannot use {} as the workers' notify socket: {e} (at most 107 bytes)",
                    path.display()
                ),
            )
        })?;
        socket::bind(sock.as_raw_fd(), &addr)?;
        let mode = match worker_gid {
            Some(gid) => {
                nix::unistd::fchownat(
                    nix::fcntl::AT_FDCWD,
                    &path,
                    None,
                    Some(nix::unistd::Gid::from_raw(gid)),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&path);
                })?;
                0o620
            }
            None => 0o600,
        };
        if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)) {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(NotifyServer {
            path,
            sock,
            remove_dir: None,
            buf: RefCell::new(vec![0u8; RECV_BUFFER_LEN]),
            cmsg: RefCell::new(nix::cmsg_space!(UnixCredentials, [RawFd; MAX_FDS])),
            stats: Cell::new(NotifyStats::default()),
        })
    }

    /// Create the runtime directory ([`make_private_runtime_dir`], made group-enterable for
    /// `worker_gid`) and bind in it. A temporary directory created here is removed on drop.
    pub fn bind_private(worker_gid: Option<u32>) -> io::Result<NotifyServer> {
        let dir = runtime_dir(worker_gid)?;
        match NotifyServer::bind(&dir.path, worker_gid) {
            Ok(mut server) => {
                if dir.created_temp {
                    server.remove_dir = Some(dir.path);
                }
                Ok(server)
            }
            Err(e) => {
                if dir.created_temp {
                    let _ = std::fs::remove_dir(&dir.path);
                }
                Err(e)
            }
        }
    }

    /// Also remove `dir` (if empty) on drop: for a directory the caller created for us.
    pub fn remove_dir_on_drop(&mut self, dir: PathBuf) {
        self.remove_dir = Some(dir);
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub fn stats(&self) -> NotifyStats {
        self.stats.get()
    }

    /// The next datagram, or `None` when there is none (EAGAIN). Oversized datagrams are
    /// truncated and parsed as far as they go; fds that came with it are closed.
    pub fn recv(&self) -> std::io::Result<Option<Received>> {
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
                Err(Errno::EAGAIN) => return Ok(None),
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
            break (msg.bytes.min(buf.len()), pid);
        };
        self.stats.set(stats);
        Ok(Some(Received {
            pid,
            notification: parse(&buf[..len]),
        }))
    }
}

impl Drop for NotifyServer {
    fn drop(&mut self) {
        if is_socket(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
        if let Some(dir) = &self.remove_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn is_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path)
        .map(|m| m.file_type().is_socket())
        .unwrap_or(false)
}

/// Remove `path` if it is a socket (lstat: a symlink is never followed). Anything else there
/// is an error.
pub(crate) fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Create (or check) a private directory: mode 0700, or 0710 with group `worker_gid` so
/// workers of that group can reach a socket inside it. A symlink is refused; an existing
/// directory must be owned by sockvisor's euid, and its mode and group are then set.
pub fn private_dir(path: &Path, worker_gid: Option<u32>) -> io::Result<()> {
    private_dir_created(path, worker_gid).map(|_| ())
}

/// [`private_dir`], telling whether the directory was created.
fn private_dir_created(path: &Path, worker_gid: Option<u32>) -> io::Result<bool> {
    let created = match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("cannot create {}: {e}", path.display()),
            ))
        }
    };
    // O_NOFOLLOW|O_DIRECTORY: a symlink (or anything but a directory) fails here, and every
    // check below is on the object we opened, not on a path that could be swapped.
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} must be a directory, not a symlink or file: {e}",
                    path.display()
                ),
            )
        })?;
    let meta = dir.metadata()?;
    let euid = nix::unistd::geteuid().as_raw();
    if meta.uid() != euid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is owned by uid {}, not by sockvisor's uid {euid}; refusing to use it",
                path.display(),
                meta.uid()
            ),
        ));
    }
    let mode = match worker_gid {
        Some(gid) => {
            if meta.gid() != gid {
                nix::unistd::fchown(&dir, None, Some(nix::unistd::Gid::from_raw(gid)))?;
            }
            0o710
        }
        None => 0o700,
    };
    if meta.mode() & 0o7777 != mode {
        if !created {
            log::debug!(
                "{}: mode {:o} -> {:o}",
                path.display(),
                meta.mode() & 0o7777,
                mode
            );
        }
        dir.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(created)
}

/// Where the workers' notify socket lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeDir {
    pub path: PathBuf,
    /// A fresh temporary directory that its user should remove when done.
    pub created_temp: bool,
}

/// `$RUNTIME_DIRECTORY/workers` (the first entry, when systemd gives a list) when set, else
/// a fresh private directory `sockvisor.XXXXXX` under `$TMPDIR` or `/tmp`.
pub fn make_private_runtime_dir() -> io::Result<PathBuf> {
    runtime_dir(None).map(|d| d.path)
}

/// [`make_private_runtime_dir`] with the group workers need, telling whether the directory
/// is a temporary one.
pub fn runtime_dir(worker_gid: Option<u32>) -> io::Result<RuntimeDir> {
    if let Some(rd) = std::env::var_os("RUNTIME_DIRECTORY").filter(|v| !v.is_empty()) {
        let first = rd
            .into_vec()
            .split(|&b| b == b':')
            .next()
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        let path = PathBuf::from(OsString::from_vec(first)).join("workers");
        private_dir(&path, worker_gid)?;
        return Ok(RuntimeDir {
            path,
            created_temp: false,
        });
    }
    let base = std::env::var_os("TMPDIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    // mkdtemp creates the directory 0700 with a name nobody could have predicted.
    let path = nix::unistd::mkdtemp(&base.join("sockvisor.XXXXXX")).map_err(|e| {
        io::Error::other(format!(
            "cannot create a directory in {}: {e}",
            base.display()
        ))
    })?;
    if let Err(e) = private_dir(&path, worker_gid) {
        let _ = std::fs::remove_dir(&path);
        return Err(e);
    }
    Ok(RuntimeDir {
        path,
        created_temp: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn server() -> (tempfile::TempDir, NotifyServer) {
        let dir = tempfile::tempdir().unwrap();
        let s = NotifyServer::bind(dir.path(), None).unwrap();
        (dir, s)
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
        use std::os::unix::fs::FileTypeExt;
        let dir = tempfile::tempdir().unwrap();
        // A stale socket is replaced.
        let stale = std::os::unix::net::UnixDatagram::bind(dir.path().join("notify.sock")).unwrap();
        drop(stale);
        let s = NotifyServer::bind(dir.path(), None).unwrap();
        let m = std::fs::symlink_metadata(s.path()).unwrap();
        assert!(m.file_type().is_socket());
        assert_eq!(m.mode() & 0o777, 0o600);
        let path = s.path().to_path_buf();
        drop(s);
        assert!(!path.exists());

        // Anything else is not.
        std::fs::write(&path, b"x").unwrap();
        assert!(NotifyServer::bind(dir.path(), None).is_err());
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/nonexistent", &path).unwrap();
        assert!(NotifyServer::bind(dir.path(), None).is_err());
    }

    #[test]
    fn large_datagram_is_truncated_not_lost() {
        let (_dir, s) = server();
        let c = UnixDatagram::unbound().unwrap();
        socket::setsockopt(&c, sockopt::SndBuf, &(256 * 1024)).unwrap();
        let mut msg = b"READY=1\nSTATUS=big\n".to_vec();
        msg.resize(64 * 1024, b'x');
        c.send_to(&msg, s.path()).unwrap();
        c.send_to(b"WATCHDOG=1", s.path()).unwrap();
        let r = recv_one(&s);
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("big"));
        assert_eq!(s.stats().truncated, 1);
        // The next datagram is intact.
        assert!(recv_one(&s).notification.watchdog);
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
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "worker_notify::tests::sd_notify_child",
                "--ignored",
                "--nocapture",
            ])
            .env("NOTIFY_SOCKET", s.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let r = recv_one(&s);
        assert!(r.notification.ready);
        assert_eq!(r.notification.status.as_deref(), Some("from sd-notify"));
        assert_eq!(r.notification.extend_timeout_usec, Some(5_000_000));
        assert!(r.pid.is_some() && r.pid != Some(std::process::id() as i32));
        let r = recv_one(&s);
        assert!(r.notification.watchdog && r.notification.stopping);
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
    fn private_dir_checks() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("w");
        private_dir(&d, None).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o700);
        // Existing and ours: mode is repaired.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&d, None).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o700);
        // Group mode for workers of another user (our own gid always works).
        let gid = nix::unistd::getegid().as_raw();
        private_dir(&d, Some(gid)).unwrap();
        assert_eq!(std::fs::metadata(&d).unwrap().mode() & 0o7777, 0o710);
        // Symlinks and files are refused.
        let l = t.path().join("link");
        std::os::unix::fs::symlink(&d, &l).unwrap();
        assert!(private_dir(&l, None).is_err());
        let f = t.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(private_dir(&f, None).is_err());

        // A group-writable socket for workers in that group.
        let s = NotifyServer::bind(&d, Some(gid)).unwrap();
        let m = std::fs::symlink_metadata(s.path()).unwrap();
        assert_eq!((m.mode() & 0o777, m.gid()), (0o620, gid));
    }

    #[test]
    fn worker_of_another_user_can_send() {
        if !crate::prereq::require(crate::prereq::is_root(), "needs root to send as uid 65534") {
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
        private_dir(&d, Some(65534)).unwrap();
        let s = NotifyServer::bind(&d, Some(65534)).unwrap();
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

    #[test]
    fn private_dir_refuses_foreign_owner() {
        if !crate::prereq::require(
            crate::prereq::is_root(),
            "needs root to create a directory owned by someone else",
        ) {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("foreign");
        std::fs::create_dir(&d).unwrap();
        nix::unistd::chown(&d, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = private_dir(&d, None).unwrap_err();
        assert!(e.to_string().contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn temp_runtime_dir_is_removed_on_drop() {
        if !crate::prereq::require(
            std::env::var_os("RUNTIME_DIRECTORY").is_none(),
            "RUNTIME_DIRECTORY is set (the private directory would go there)",
        ) {
            return;
        }
        let s = NotifyServer::bind_private(None).unwrap();
        let dir = s.path().parent().unwrap().to_path_buf();
        assert!(dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("sockvisor."));
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        drop(s);
        assert!(!dir.exists());
    }
}
