//! Accepting connections and handing each to a worker (DESIGN.md section 4).
//!
//! Backpressure: a worker takes a connection only while its channel holds fewer than
//! `window`. When no ready worker has room, the connection waits in `pending_connections`
//! and the listener leaves epoll, so the kernel backlog absorbs the burst; the pending queue
//! is retried every `PENDING_RETRY` and whenever the fleet changes.

use super::fleet::WorkerState;
use super::{Supervisor, TOKEN_LISTENER};
use crate::config::DispatchPolicy;
use crate::dispatch::{Candidate, SendError};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{accept4, getpeername, SockFlag, SockaddrStorage};
use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How often full channels are re-checked while connections are pending.
pub(super) const PENDING_RETRY: Duration = Duration::from_millis(2);
/// Connections accepted per wake-up of one listener, so one busy listener cannot starve
/// the rest of the loop.
const ACCEPT_BATCH: usize = 64;
/// Accepting pauses this long after EMFILE/ENFILE instead of spinning.
const FD_EXHAUSTED_PAUSE: Duration = Duration::from_millis(100);
/// How often channels are checked for wedged workers.
const WEDGE_CHECK: Duration = Duration::from_secs(1);

fn peer_ip(conn: &OwnedFd) -> Option<IpAddr> {
    let addr: SockaddrStorage = getpeername(conn.as_raw_fd()).ok()?;
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(IpAddr::V4(v4.ip()));
    }
    addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
}

impl Supervisor {
    /// The listener is readable: accept a batch and hand each connection over.
    pub(super) fn accept(&mut self, index: usize) {
        for _ in 0..ACCEPT_BATCH {
            let fd = self.listeners[index].listener.fd.as_raw_fd();
            let conn = match accept4(fd, SockFlag::SOCK_CLOEXEC) {
                // SAFETY: accept4 returned a new fd that nothing else owns.
                Ok(raw) => unsafe { OwnedFd::from_raw_fd(raw) },
                Err(Errno::EAGAIN) => return,
                Err(Errno::EINTR | Errno::ECONNABORTED | Errno::EPROTO | Errno::EPERM) => continue,
                Err(e @ (Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM)) => {
                    log::warn!(
                        "{}: accept failed: {e}; pausing accepts for {} ms",
                        self.listeners[index].listener.name,
                        FD_EXHAUSTED_PAUSE.as_millis()
                    );
                    self.pause_listener(index);
                    self.listeners[index].resume_at = Some(Instant::now() + FD_EXHAUSTED_PAUSE);
                    return;
                }
                Err(e) => {
                    log::error!(
                        "{}: accept failed: {e}",
                        self.listeners[index].listener.name
                    );
                    return;
                }
            };
            self.listeners[index].accepted += 1;
            if let Err(conn) = self.hand_off(index, conn) {
                self.listeners[index].pending_connections.push_back(conn);
                self.pause_listener(index);
                return;
            }
        }
    }

    /// Give `conn` to a worker chosen by the listener's policy; hand it back if none can
    /// take it now.
    fn hand_off(&mut self, index: usize, conn: OwnedFd) -> Result<(), OwnedFd> {
        let window = self.config.window;
        let kind = self.listeners[index].policy.kind();
        let report_close = kind == DispatchPolicy::LeastConnections;
        let mut candidates = std::mem::take(&mut self.candidates_buf);
        let mut order = std::mem::take(&mut self.order_buf);
        candidates.clear();
        order.clear();
        for pid in &self.ready_workers {
            let Some(w) = self.workers.get_mut(&pid.as_raw()) else {
                continue;
            };
            let Some(c) = w.channels[index].as_mut() else {
                continue;
            };
            let queued = if report_close {
                c.refresh_queued()
            } else {
                c.queued_bound
            };
            candidates.push(Candidate {
                slot: w.slot,
                key: pid.as_raw() as u64,
                queued,
                open: c.open(),
            });
        }
        let peer = if kind == DispatchPolicy::IpHash {
            peer_ip(&conn)
        } else {
            None
        };
        self.listeners[index]
            .policy
            .order(&candidates, peer, &mut order);
        let mut conn = Some(conn);
        // A worker whose channel is closed cannot take connections any more: replaced.
        let mut closed_channel = None;
        for &i in &order {
            let candidate = candidates[i];
            let Some(w) = self.workers.get_mut(&(candidate.key as i32)) else {
                continue;
            };
            let Some(c) = w.channels[index].as_mut() else {
                continue;
            };
            if c.queued_bound >= window && c.refresh_queued() >= window {
                continue;
            }
            match c.channel.send(
                conn.take().expect("conn is present until sent"),
                report_close,
            ) {
                Ok(()) => {
                    c.dispatched += 1;
                    c.queued_bound += 1;
                    self.listeners[index].policy.chose(&candidate);
                    break;
                }
                Err((back, err)) => {
                    conn = Some(back);
                    match err {
                        SendError::Full => c.queued_bound = window,
                        SendError::Transient(e) => log::warn!(
                            "worker {} (pid {}): send failed: {e}; trying another worker",
                            w.slot,
                            w.pid
                        ),
                        SendError::Closed(e) => {
                            log::warn!("worker {} (pid {}): channel closed ({e})", w.slot, w.pid);
                            closed_channel = Some(w.pid);
                        }
                    }
                }
            }
        }
        self.candidates_buf = candidates;
        self.order_buf = order;
        if let Some(pid) = closed_channel {
            self.murder(
                pid,
                Signal::SIGTERM,
                "its channel is closed",
                true,
                Instant::now(),
            );
        }
        if self.dirty {
            self.rebuild_ready_workers();
        }
        match conn {
            None => Ok(()),
            Some(c) => Err(c),
        }
    }

    /// Hand pending connections to workers that have room now.
    pub(super) fn flush_all_pending(&mut self) {
        for index in 0..self.listeners.len() {
            while let Some(conn) = self.listeners[index].pending_connections.pop_front() {
                if let Err(conn) = self.hand_off(index, conn) {
                    self.listeners[index].pending_connections.push_front(conn);
                    break;
                }
            }
        }
    }

    pub(super) fn pause_listener(&mut self, index: usize) {
        let l = &mut self.listeners[index];
        if l.polling {
            l.polling = false;
            let _ = self.epoll.delete(l.listener.fd.as_fd());
        }
    }

    pub(super) fn resume_listener(&mut self, index: usize) {
        if self.listeners[index].polling {
            return;
        }
        self.listeners[index].polling = true;
        self.listeners[index].resume_at = None;
        self.register(
            self.listeners[index].listener.fd.as_fd(),
            TOKEN_LISTENER + index as u64,
        );
    }

    /// Poll again the listeners whose pending queue drained or whose EMFILE pause is over.
    pub(super) fn resume_paused_listeners(&mut self, now: Instant) {
        if matches!(self.phase, super::Phase::Stopping { .. }) {
            return;
        }
        for i in 0..self.listeners.len() {
            let l = &self.listeners[i];
            if l.dispatched()
                && !l.polling
                && l.pending_connections.is_empty()
                && l.resume_at.is_none_or(|t| now >= t)
            {
                self.resume_listener(i);
            }
        }
    }

    /// A least-connections channel has close reports to read.
    pub(super) fn read_close_reports(&mut self, pid: i32, listener: usize) {
        let Some(w) = self.workers.get_mut(&pid) else {
            return;
        };
        let Some(c) = w.channels.get_mut(listener).and_then(|c| c.as_mut()) else {
            return;
        };
        let r = c.channel.read_reports();
        c.reported_closed += r.closed;
        c.reports |= r.reports > 0;
        if r.hung_up {
            // The worker closed its end (it still runs, or SIGCHLD is on its way). Stop
            // listening for reports; its death is learned from SIGCHLD.
            let _ = self.epoll.delete(c.channel.sockvisor_end());
        }
        self.dirty = true;
    }

    /// The fleet changed: rebuild the list of workers that may receive connections, in slot
    /// order, and retry what is pending.
    pub(super) fn fleet_changed(&mut self) {
        self.rebuild_ready_workers();
        self.dirty = true;
    }

    fn rebuild_ready_workers(&mut self) {
        self.ready_workers.clear();
        let mut ready: Vec<_> = self
            .workers
            .values()
            .filter(|w| w.dispatchable())
            .map(|w| (w.slot, w.generation, w.pid))
            .collect();
        ready.sort();
        self.ready_workers
            .extend(ready.into_iter().map(|(_, _, pid)| pid));
    }

    /// A worker whose channel queue has not moved for `wedged_after` while connections wait
    /// in it is wedged: it is stopped with SIGABRT and replaced.
    pub(super) fn check_wedged(&mut self, now: Instant) {
        if self
            .status
            .wedge_checked
            .is_some_and(|t| now < t + WEDGE_CHECK)
        {
            return;
        }
        self.status.wedge_checked = Some(now);
        let wedged_after = self.config.wedged_after;
        let mut wedged = Vec::new();
        for w in self.workers.values_mut() {
            if w.state != WorkerState::Ready {
                continue;
            }
            for c in w.channels.iter_mut().flatten() {
                let queued = c.refresh_queued();
                let received = c.dispatched - queued as u64;
                if queued == 0 || received != c.received_at_check {
                    c.received_at_check = received;
                    c.progress_at = now;
                } else if now.saturating_duration_since(c.progress_at) >= wedged_after {
                    wedged.push((w.pid, queued));
                    break;
                }
            }
        }
        for (pid, queued) in wedged {
            let reason = format!(
                "wedged: {queued} connections waiting, none received for {}s",
                wedged_after.as_secs()
            );
            self.murder(pid, Signal::SIGABRT, &reason, true, now);
        }
    }

    pub(super) fn next_wedge_check(&self) -> Option<Instant> {
        let any = self
            .workers
            .values()
            .any(|w| w.channels.iter().flatten().any(|c| c.queued_bound > 0));
        any.then(|| {
            self.status
                .wedge_checked
                .map_or_else(Instant::now, |t| t + WEDGE_CHECK)
        })
    }
}
