//! The `NOTIFY_SOCKET` sockvisor offers its workers: sockvisor is their systemd.
//!
//! A unix datagram socket with `SO_PASSCRED` in a directory only sockvisor (and, when
//! workers run as another user, that user's group) can enter. Each datagram is attributed to
//! the sender's pid from the kernel's credentials; the supervisor drops messages from pids
//! that are not live workers. Fds sent along are closed. Parsing follows systemd: one
//! `KEY=VALUE` per line, unknown keys ignored.
//!
//! SKELETON: signatures are the contract used by the supervisor.

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

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
pub fn parse(datagram: &[u8]) -> Notification {
    let _ = datagram;
    todo!()
}

/// One received datagram.
#[derive(Debug)]
pub struct Received {
    /// The sender's pid from `SCM_CREDENTIALS`, if the kernel attached credentials.
    pub pid: Option<i32>,
    pub notification: Notification,
}

pub struct NotifyServer {
    path: PathBuf,
}

impl NotifyServer {
    /// Bind `dir/notify.sock` (non-blocking, close-on-exec, `SO_PASSCRED`). `dir` must exist
    /// and be private to sockvisor. With `worker_gid`, the socket is made writable by that
    /// group so workers running as another user can send.
    pub fn bind(dir: &Path, worker_gid: Option<u32>) -> std::io::Result<NotifyServer> {
        let _ = (dir, worker_gid);
        todo!()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        todo!()
    }

    /// The next datagram, or `None` when there is none (EAGAIN). Oversized datagrams are
    /// truncated and parsed as far as they go; fds that came with it are closed.
    pub fn recv(&self) -> std::io::Result<Option<Received>> {
        todo!()
    }
}

/// SKELETON stub.
pub fn make_private_runtime_dir() -> std::io::Result<PathBuf> {
    todo!()
}
