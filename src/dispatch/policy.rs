//! Balancing policies: which worker gets the next connection.
//!
//! SKELETON: signatures are the contract used by the supervisor.

use crate::config::DispatchPolicy;
use std::net::IpAddr;

/// A worker that could take a connection now: ready, and with room in its channel window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The worker's slot (`SOCKVISOR_WORKER_ID`): stable across restarts, the ip-hash key.
    pub slot: usize,
    /// A unique key of this worker incarnation (e.g. its pid), for round-robin position.
    pub key: u64,
    /// Connections waiting in its channel.
    pub queued: usize,
    /// Connections it holds open, if it sends close reports; `None` if it never did.
    pub open: Option<u64>,
}

/// Per-listener policy state.
#[derive(Debug)]
pub struct Policy {
    kind: DispatchPolicy,
    /// Round-robin position.
    next: u64,
}

impl Policy {
    pub fn new(kind: DispatchPolicy) -> Policy {
        Policy { kind, next: 0 }
    }

    pub fn kind(&self) -> DispatchPolicy {
        self.kind
    }

    /// Candidates in the order to try them for this connection. The first that accepts the
    /// connection gets it; the caller then calls [`Policy::chose`].
    pub fn order(&mut self, candidates: &[Candidate], peer: Option<IpAddr>, out: &mut Vec<usize>) {
        let _ = (candidates, peer, out, self.next);
        todo!()
    }

    /// The connection went to `candidates[index]`.
    pub fn chose(&mut self, candidate: &Candidate) {
        let _ = candidate;
        todo!()
    }
}
