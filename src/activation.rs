//! Listeners: taken from systemd (`LISTEN_FDS`/`LISTEN_FDNAMES`, matched to the configured
//! listeners by name) or bound by sockvisor itself when not socket-activated. Every fd is
//! validated before it is trusted: a socket, of the expected type, listening if it is a
//! stream, of a known family.
//!
//! SKELETON: signatures are the contract used by the supervisor.

use crate::config::{DispatchPolicy, ListenerSpec};
use std::fmt;
use std::os::fd::OwnedFd;

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
/// unset). Call first thing in `main`, before any thread exists.
pub fn take_from_env() -> Vec<(OwnedFd, String)> {
    todo!()
}

/// Match the passed fds to `specs`, or bind `specs` when nothing was passed.
/// With no specs and passed fds, every passed fd becomes a listener under its own name
/// (with `default_policy` for streams).
pub fn listeners(
    passed: Vec<(OwnedFd, String)>,
    specs: &[ListenerSpec],
    default_policy: DispatchPolicy,
) -> Result<Vec<Listener>, ActivationError> {
    let _ = (passed, specs, default_policy);
    todo!()
}
