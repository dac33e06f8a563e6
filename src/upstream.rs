//! Notifications to systemd (`sd_notify`), and the watchdog schedule systemd asks for.
//!
//! Sent only when `NOTIFY_SOCKET` was set at start; a missing or unreachable socket is
//! logged once at debug level and never an error for the fleet.
//!
//! Messages are formatted with the `sd-notify` crate's [`NotifyState`], and sent by our own
//! small sender: the crate only knows path sockets and re-reads the environment on every
//! call, while systemd may hand out an abstract `@name` socket (containers, `systemd-run
//! --user` in some setups), and tests must not mutate the process environment. The
//! sender is one unbound datagram socket opened once (close-on-exec), with a 1 s send
//! timeout so a wedged manager cannot stall the event loop for long.
//!
//! `NOTIFY_SOCKET` stays in sockvisor's own environment; `spawn` keeps it out of workers'.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{self, sockopt, AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;
use sd_notify::NotifyState;

/// How long one notification may block when systemd's queue is full.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

pub struct Upstream {
    watchdog: Option<Duration>,
    /// Where to send, and how to name it in logs; `None`: disabled.
    target: Option<(UnixAddr, String)>,
    sock: Option<OwnedFd>,
    /// Only the first failure is logged.
    failed_once: AtomicBool,
}

impl Upstream {
    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Must run before any thread
    /// exists (it unsets `WATCHDOG_*`).
    ///
    /// `NOTIFY_SOCKET` may be a path or an abstract `@name`; other kinds (`vsock:`) are
    /// logged as a warning and disable notifications. `NOTIFY_SOCKET` itself is left in
    /// the environment.
    pub fn from_env() -> Upstream {
        // SAFETY: `from_env` is called at the start of `main`, before any thread exists (lib
        // invariant 1: sockvisor is single-threaded), so removing WATCHDOG_USEC/WATCHDOG_PID
        // from the environment cannot race with a reader in another thread.
        let watchdog = unsafe { sd_notify::watchdog_enabled_and_unset_env() };
        match std::env::var_os("NOTIFY_SOCKET").filter(|v| !v.is_empty()) {
            Some(addr) => Upstream::to_address(&addr, watchdog),
            None => Upstream {
                watchdog,
                ..Upstream::disabled()
            },
        }
    }

    /// An upstream that sends to the datagram socket at `path` (tests, and `from_env`).
    pub fn to_socket(path: PathBuf, watchdog: Option<Duration>) -> Upstream {
        let name = path.display().to_string();
        match UnixAddr::new(&path) {
            Ok(addr) => Upstream::with_addr(addr, name, watchdog),
            Err(e) => Upstream::refuse(format!("NOTIFY_SOCKET={name}: {e}"), watchdog),
        }
    }

    /// An upstream for a `NOTIFY_SOCKET` value: an absolute path, or `@name` for an abstract
    /// socket. Anything else (`vsock:...`) is unsupported: a warning, and nothing is sent.
    pub fn to_address(value: &OsStr, watchdog: Option<Duration>) -> Upstream {
        let bytes = value.as_bytes();
        let name = value.to_string_lossy().into_owned();
        if let Some(abs) = bytes.strip_prefix(b"@") {
            match UnixAddr::new_abstract(abs) {
                Ok(addr) => Upstream::with_addr(addr, name, watchdog),
                Err(e) => Upstream::refuse(format!("NOTIFY_SOCKET={name}: {e}"), watchdog),
            }
        } else if bytes.starts_with(b"/") {
            Upstream::to_socket(PathBuf::from(value), watchdog)
        } else {
            Upstream::refuse(
                format!("NOTIFY_SOCKET={name} is not an absolute path or @name (unsupported)"),
                watchdog,
            )
        }
    }

    fn refuse(why: String, watchdog: Option<Duration>) -> Upstream {
        log::warn!("not notifying systemd: {why}");
        Upstream {
            watchdog,
            ..Upstream::disabled()
        }
    }

    fn with_addr(addr: UnixAddr, name: String, watchdog: Option<Duration>) -> Upstream {
        let sock = match socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        ) {
            Ok(s) => s,
            Err(e) => return Upstream::refuse(format!("cannot create a socket: {e}"), watchdog),
        };
        let tv = TimeVal::new(SEND_TIMEOUT.as_secs() as _, 0);
        let _ = socket::setsockopt(&sock, sockopt::SendTimeout, &tv);
        Upstream {
            watchdog,
            target: Some((addr, name)),
            sock: Some(sock),
            failed_once: AtomicBool::new(false),
        }
    }

    /// An upstream that sends nothing (tests, and `sockvisor` run by hand).
    pub fn disabled() -> Upstream {
        Upstream {
            watchdog: None,
            target: None,
            sock: None,
            failed_once: AtomicBool::new(false),
        }
    }

    /// Whether `NOTIFY_SOCKET` was set (and usable): notifications are sent.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// `WATCHDOG_USEC` as systemd set it.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// How often to send `WATCHDOG=1`: half the timeout.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// `READY=1` with a `STATUS=`.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready], Some(status));
    }
    /// A status refresh: dropped rather than waited for when systemd's queue is full (the
    /// next refresh carries the same news).
    pub fn status(&self, status: &str) {
        self.send_with(&[], Some(status), MsgFlags::MSG_DONTWAIT);
    }
    /// `RELOADING=1` with `MONOTONIC_USEC` (required by `Type=notify-reload`).
    pub fn reloading(&self, status: &str) {
        if !self.is_enabled() {
            return;
        }
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now], Some(status)),
            Err(e) => {
                // Cannot happen (CLOCK_MONOTONIC always works); still better than nothing.
                log::debug!("CLOCK_MONOTONIC: {e}");
                self.send(&[NotifyState::Reloading], Some(status))
            }
        }
    }
    pub fn stopping(&self, status: &str) {
        self.send(&[NotifyState::Stopping], Some(status));
    }
    /// A ping: never worth stalling the loop for (the next one is half a timeout away).
    pub fn watchdog(&self) {
        self.send_with(&[NotifyState::Watchdog], None, MsgFlags::MSG_DONTWAIT);
    }
    /// `WATCHDOG=trigger`: ask systemd to act as if the watchdog had expired.
    pub fn watchdog_trigger(&self, status: &str) {
        self.send(&[NotifyState::WatchdogTrigger], Some(status));
    }
    /// `EXTEND_TIMEOUT_USEC=` (capped at `u32::MAX` µs, about 71 minutes).
    pub fn extend_timeout(&self, by: Duration) {
        let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
        self.send(&[NotifyState::ExtendTimeoutUsec(usec)], None);
    }
    /// `ERRNO=` with a status, when the fleet gives up.
    pub fn failed(&self, errno: i32, status: &str) {
        self.send(&[NotifyState::Errno(errno.unsigned_abs())], Some(status));
    }

    /// One datagram: `states` then `STATUS=` (newlines in it become spaces, so it cannot add
    /// keys). Errors are logged once, at debug level, and never returned.
    fn send(&self, states: &[NotifyState], status: Option<&str>) {
        self.send_with(states, status, MsgFlags::empty())
    }

    fn send_with(&self, states: &[NotifyState], status: Option<&str>, flags: MsgFlags) {
        let (Some((addr, name)), Some(sock)) = (&self.target, &self.sock) else {
            return;
        };
        let mut msg = String::with_capacity(128);
        for s in states {
            let _ = writeln!(msg, "{s}");
        }
        if let Some(status) = status {
            let clean: String = status
                .chars()
                .map(|c| if c == '\n' || c == '\0' { ' ' } else { c })
                .collect();
            let _ = writeln!(msg, "{}", NotifyState::Status(&clean));
        }
        let result = loop {
            match socket::sendmsg(
                sock.as_raw_fd(),
                &[IoSlice::new(msg.as_bytes())],
                &[],
                MsgFlags::MSG_NOSIGNAL | flags,
                Some(addr),
            ) {
                Err(nix::errno::Errno::EINTR) => continue,
                r => break r,
            }
        };
        if let Err(e) = result {
            if !self.failed_once.swap(true, Ordering::Relaxed) {
                log::debug!("sd_notify to {name} failed: {e} (further failures are not logged)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    fn pair() -> (tempfile::TempDir, UnixDatagram, Upstream) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_nonblocking(true).unwrap();
        let up = Upstream::to_socket(path, Some(Duration::from_secs(3)));
        (dir, rx, up)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 1024];
        let n = rx.recv(&mut buf).expect("a datagram was sent");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn messages() {
        let (_d, rx, up) = pair();
        assert!(up.is_enabled());
        assert_eq!(up.watchdog_interval(), Some(Duration::from_millis(1500)));

        up.ready("2 workers ready");
        assert_eq!(recv(&rx), "READY=1\nSTATUS=2 workers ready\n");
        up.status("a\nREADY=1");
        assert_eq!(recv(&rx), "STATUS=a READY=1\n");
        up.stopping("bye");
        assert_eq!(recv(&rx), "STOPPING=1\nSTATUS=bye\n");
        up.watchdog();
        assert_eq!(recv(&rx), "WATCHDOG=1\n");
        up.watchdog_trigger("fleet unhealthy");
        assert_eq!(recv(&rx), "WATCHDOG=trigger\nSTATUS=fleet unhealthy\n");
        up.extend_timeout(Duration::from_secs(5));
        assert_eq!(recv(&rx), "EXTEND_TIMEOUT_USEC=5000000\n");
        up.extend_timeout(Duration::from_secs(1 << 40));
        assert_eq!(recv(&rx), format!("EXTEND_TIMEOUT_USEC={}\n", u32::MAX));
        up.failed(libc::EIO, "every slot keeps failing");
        assert_eq!(recv(&rx), "ERRNO=5\nSTATUS=every slot keeps failing\n");

        up.reloading("reloading");
        let m = recv(&rx);
        let lines: Vec<&str> = m.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert_eq!(lines[2], "STATUS=reloading");
    }

    #[test]
    fn parsed_by_our_own_worker_parser() {
        let (_d, rx, up) = pair();
        up.ready("ok");
        let n = crate::notify_server::parse(recv(&rx).as_bytes());
        assert!(n.ready);
        assert_eq!(n.status.as_deref(), Some("ok"));
    }

    #[test]
    fn abstract_socket() {
        let name = format!(
            "sockvisor-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        );
        let addr = UnixAddr::new_abstract(name.as_bytes()).unwrap();
        let rx = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .unwrap();
        socket::bind(rx.as_raw_fd(), &addr).unwrap();
        let rx = UnixDatagram::from(rx);
        let up = Upstream::to_address(OsStr::new(&format!("@{name}")), None);
        assert!(up.is_enabled());
        up.ready("abstract");
        assert_eq!(recv(&rx), "READY=1\nSTATUS=abstract\n");
    }

    #[test]
    fn unreachable_or_disabled_is_silent() {
        let dir = tempfile::tempdir().unwrap();
        let up = Upstream::to_socket(dir.path().join("missing"), None);
        up.ready("x");
        up.watchdog();
        assert!(up.failed_once.load(Ordering::Relaxed));

        let off = Upstream::disabled();
        assert!(!off.is_enabled());
        off.ready("x");
        off.reloading("x");
        assert_eq!(off.watchdog_interval(), None);

        let odd = Upstream::to_address(OsStr::new("vsock:2:1234"), None);
        assert!(!odd.is_enabled());
        odd.ready("x");
        let relative = Upstream::to_address(OsStr::new("notify.sock"), None);
        assert!(!relative.is_enabled());

        // A relative path given to to_socket is a path, even one starting with '@'.
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("@odd");
        let rx = UnixDatagram::bind(&p).unwrap();
        let up = Upstream::to_socket(p, None);
        up.watchdog();
        assert_eq!(recv(&rx), "WATCHDOG=1\n");
    }
}
