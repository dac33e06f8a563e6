//! One worker's channel for one dispatched listener: a `SOCK_SEQPACKET` socketpair.
//!
//! sockvisor keeps **both** ends. It sends on its own end; it keeps a reference to the
//! worker's end (the same open file the worker has at fd 3..), which gives two things for
//! free: the queue depth (`FIONREAD` on the worker's end counts the bytes of messages the
//! worker has not received yet) and, when the worker dies, the connections it never
//! received (read back with `recvmsg` on that end). See docs/protocol.md.
//!
//! SKELETON: signatures are the contract used by the supervisor.

use std::os::fd::{BorrowedFd, OwnedFd};

/// Why a connection could not be queued. The connection itself is always handed back.
#[derive(Debug)]
pub enum SendError {
    /// The channel is full (kernel queue or our window): try another worker.
    Full,
    /// `ETOOMANYREFS` or another error that says nothing about this worker's health.
    Transient(nix::Error),
    /// The worker's side is gone (`EPIPE`, `ECONNRESET`): stop using this channel.
    Closed(nix::Error),
}

pub struct Channel {
    /// The end sockvisor sends on and reads close reports from.
    sockvisor_end: OwnedFd,
    /// sockvisor's reference to the worker's end (placed at the worker's fd 3+i).
    worker_end: OwnedFd,
    /// Sequence number of the next connection message.
    next_sequence: u32,
}

impl Channel {
    /// A new non-blocking, close-on-exec socketpair.
    pub fn new() -> nix::Result<Channel> {
        todo!()
    }

    /// The fd to place in the worker.
    pub fn worker_end(&self) -> BorrowedFd<'_> {
        todo!()
    }

    /// The fd sockvisor polls for close reports and hang-ups.
    pub fn sockvisor_end(&self) -> BorrowedFd<'_> {
        todo!()
    }

    /// Queue one connection (one message, one fd, `MSG_NOSIGNAL | MSG_DONTWAIT`). On success
    /// sockvisor's copy of the fd is closed (dropped). On failure the connection is handed back.
    pub fn send(&mut self, conn: OwnedFd, report_close: bool) -> Result<(), (OwnedFd, SendError)> {
        let _ = (conn, report_close, &self.next_sequence);
        todo!()
    }

    /// Connections sent and not yet received by the worker.
    pub fn queued(&self) -> usize {
        todo!()
    }

    /// Take back every connection still queued (the worker is dead or being replaced).
    /// Messages that carry no fd or that do not decode are skipped; any fd is returned.
    pub fn reclaim(&self) -> Vec<OwnedFd> {
        todo!()
    }

    /// Read the close reports the worker sent. Returns the number of connections it reported
    /// closed, and whether the worker's side hung up.
    pub fn read_reports(&self) -> (u64, bool) {
        let _ = (&self.sockvisor_end, &self.worker_end);
        todo!()
    }
}
