//! Active health checks (`health_check = "tcp" | "http"`): every `health_check_interval`
//! sockvisor opens a connection that reaches one ready worker alone (dispatch's
//! `open_probe`: a socket pair handed over the worker's channel, or under `reuseport` a
//! loopback connection the eBPF program routes by its pinned source port), and for `http`
//! writes the request line and reads the status line, within `health_check_timeout`.
//!
//! Rules (nginx's and HAProxy's passive/active split, per worker):
//! - a new worker enters the rotation when its first check passes (a worker that answers
//!   errors from the start never gets a client);
//! - one failure takes the worker out of the rotation at once (`set_in_rotation(false)`: it
//!   stays ready and keeps what it holds, and gets no new connection);
//! - `health_check_passes` passes in a row put it back;
//! - `health_check_fails` failures in a row replace it (SIGTERM, a failure of its slot).
//!
//! Everything is non-blocking and driven by the loop: the probe's fd is in epoll
//! ([`Token::Probe`]), its deadline in [`Supervisor::next_deadline`]. At most one probe per
//! worker is in flight, so the fds and probe routes used are bounded by the fleet's size.
//! A worker is checked with the settings of the configuration it was started with (a
//! canary with its own generation's).

use super::Supervisor;
use crate::config::{CheckKind, HealthCheck};
use crate::dispatch::ProbeConn;
use crate::observe::metrics::EndReason;
use crate::poller::Token;
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, sockopt};
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

/// A check that found no room for its probe (too many in flight) is tried again after this.
const PROBE_RETRY: Duration = Duration::from_millis(20);
/// The most bytes read from a probe before its status line must have arrived.
const MAX_STATUS_LINE: usize = 1024;

/// What the checks of one worker found, for `status`, the log and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckFigures {
    pub passes: u64,
    pub failures: u64,
    pub consecutive_passes: u32,
    pub consecutive_failures: u32,
    /// Out of the rotation: since a failed check (until enough passes), or since its start
    /// until its first check passes.
    pub out_of_rotation: bool,
    /// Its first check passed: it entered the rotation.
    pub admitted: bool,
    /// The last outcome: `passed (HTTP 200, 3ms)`, `failed: HTTP 500`, ...
    pub last: Option<String>,
    /// How long the last check took (to its answer, or to its failure).
    pub last_duration: Option<Duration>,
}

enum Phase {
    Connecting,
    Writing { sent: usize },
    Reading,
}

struct InFlight {
    listener: usize,
    conn: ProbeConn,
    phase: Phase,
    started: Instant,
    deadline: Instant,
    request: Vec<u8>,
    answer: Vec<u8>,
}

struct Record {
    settings: HealthCheck,
    figures: CheckFigures,
    next_at: Instant,
    in_flight: Option<InFlight>,
}

/// Every worker's checks (only workers started with checks configured have a record).
#[derive(Default)]
pub(super) struct ActiveChecks {
    records: BTreeMap<Pid, Record>,
    /// No listener can reach one worker alone: said once in the log.
    unreachable_said: bool,
}

enum Outcome {
    Pass(String),
    Fail(String),
}

impl ActiveChecks {
    /// `pid` was started with these settings; its first check is due once it is ready, and
    /// it enters the rotation when that check passes (`true`: keep it out until then).
    pub(super) fn worker_forked(
        &mut self,
        pid: Pid,
        settings: Option<HealthCheck>,
        now: Instant,
    ) -> bool {
        let Some(settings) = settings else {
            return false;
        };
        self.records.insert(
            pid,
            Record {
                settings,
                figures: CheckFigures {
                    out_of_rotation: true,
                    ..CheckFigures::default()
                },
                next_at: now,
                in_flight: None,
            },
        );
        true
    }

    pub(super) fn figures(&self, pid: Pid) -> Option<&CheckFigures> {
        self.records.get(&pid).map(|r| &r.figures)
    }

    /// The earliest probe deadline or due check among `checkable` workers.
    pub(super) fn next_deadline(&self, checkable: impl Fn(Pid) -> bool) -> Option<Instant> {
        self.records
            .iter()
            .filter_map(|(&pid, r)| match &r.in_flight {
                Some(f) => Some(f.deadline),
                None => checkable(pid).then_some(r.next_at),
            })
            .min()
    }
}

fn request_bytes(kind: &CheckKind) -> Vec<u8> {
    match kind {
        CheckKind::Tcp => Vec::new(),
        CheckKind::Http { request, .. } => {
            format!("{request}\r\nHost: localhost\r\nConnection: close\r\n\r\n").into_bytes()
        }
    }
}

/// The status code of an HTTP status line (`HTTP/1.1 200 OK`).
fn status_code(line: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    let version = parts.next()?;
    if !version.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.trim().parse().ok()
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

impl Supervisor {
    /// Start the checks that are due, fail those past their deadline.
    pub(super) fn tick_checks(&mut self, now: Instant) {
        if self.checks.records.is_empty() {
            return;
        }
        let pids: Vec<Pid> = self.checks.records.keys().copied().collect();
        for pid in pids {
            let ready = self.workers.get(&pid).is_some_and(|w| w.ready());
            let Some(r) = self.checks.records.get_mut(&pid) else {
                continue;
            };
            enum Due {
                Cancel(usize, Option<u16>),
                Timeout(String),
                Start,
                Nothing,
            }
            let due = match &r.in_flight {
                // Stopping: what it answers no longer matters.
                Some(f) if !ready => Due::Cancel(f.listener, f.conn.route),
                Some(f) if now >= f.deadline => {
                    let what = match f.phase {
                        Phase::Connecting => "the connection was not made",
                        Phase::Writing { .. } => "the request was not taken",
                        Phase::Reading => "no answer",
                    };
                    Due::Timeout(format!("{what} within {}", millis(r.settings.timeout)))
                }
                None if ready && now >= r.next_at => {
                    r.next_at = now + r.settings.interval;
                    Due::Start
                }
                _ => Due::Nothing,
            };
            match due {
                Due::Cancel(listener, route) => {
                    if let Some(f) = r.in_flight.take() {
                        self.poller.unregister(f.conn.fd.as_fd());
                    }
                    self.release_probe(pid, (listener, route));
                }
                Due::Timeout(why) => self.finish_check(pid, Outcome::Fail(why), now),
                Due::Start => self.start_check(pid, now),
                Due::Nothing => {}
            }
        }
    }

    fn start_check(&mut self, pid: Pid, now: Instant) {
        let Some(r) = self.checks.records.get(&pid) else {
            return;
        };
        let (timeout, request) = (r.settings.timeout, request_bytes(&r.settings.kind));
        let (listener, conn) = match self.dispatch.open_probe(pid) {
            None => {
                if !self.checks.unreachable_said {
                    self.checks.unreachable_said = true;
                    log::warn!(
                        "active health checks cannot run: no listener reaches one worker alone (they need a channel policy or reuseport on a TCP listener)"
                    );
                }
                // Workers waiting for their first check would wait for ever: let them in.
                for (pid, r) in std::mem::take(&mut self.checks.records) {
                    if r.figures.out_of_rotation {
                        self.dispatch.set_in_rotation(pid, true);
                    }
                }
                return;
            }
            Some((_, Err(e))) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // No room for one more probe now (reuseport's probe routes): soon, uncounted.
                if let Some(r) = self.checks.records.get_mut(&pid) {
                    r.next_at = now + PROBE_RETRY;
                }
                return;
            }
            Some((_, Err(e))) => {
                self.finish_check(pid, Outcome::Fail(format!("cannot connect: {e}")), now);
                return;
            }
            Some((listener, Ok(conn))) => (listener, conn),
        };
        let phase = if conn.connecting {
            Phase::Connecting
        } else {
            Phase::Writing { sent: 0 }
        };
        let writable = conn.connecting || !request.is_empty();
        if let Err(e) = self
            .poller
            .watch(conn.fd.as_fd(), Token::Probe(pid), writable)
        {
            let route = (listener, conn.route);
            drop(conn);
            self.release_probe(pid, route);
            self.finish_check(
                pid,
                Outcome::Fail(format!("cannot poll the probe: {e}")),
                now,
            );
            return;
        }
        if let Some(r) = self.checks.records.get_mut(&pid) {
            r.in_flight = Some(InFlight {
                listener,
                conn,
                phase,
                started: now,
                deadline: now + timeout,
                request,
                answer: Vec::new(),
            });
        }
        // A socket pair is connected already: go on at once.
        self.probe_event(pid);
    }

    /// The probe of `pid` is writable or readable: move its exchange on.
    pub(super) fn probe_event(&mut self, pid: Pid) {
        let now = Instant::now();
        let Some(r) = self.checks.records.get_mut(&pid) else {
            return;
        };
        let expected = match &r.settings.kind {
            CheckKind::Http { status, .. } => Some(*status),
            CheckKind::Tcp => None,
        };
        let Some(f) = r.in_flight.as_mut() else {
            return;
        };
        let fd = f.conn.fd.as_fd();
        let outcome = loop {
            match f.phase {
                Phase::Connecting => {
                    match getsockopt(&fd, sockopt::SocketError) {
                        Ok(0) => {}
                        Ok(e) => {
                            break Some(Outcome::Fail(format!(
                                "cannot connect: {}",
                                Errno::from_raw(e).desc()
                            )))
                        }
                        Err(e) => break Some(Outcome::Fail(format!("cannot connect: {e}"))),
                    }
                    // Connected (or still connecting: a spurious wake-up shows as not
                    // connected on the first write, EAGAIN/ENOTCONN).
                    f.phase = Phase::Writing { sent: 0 };
                }
                Phase::Writing { sent } => {
                    if expected.is_none() {
                        break Some(Outcome::Pass(format!(
                            "connected in {}",
                            millis(now.saturating_duration_since(f.started))
                        )));
                    }
                    match nix::unistd::write(fd, &f.request[sent..]) {
                        Ok(n) if sent + n >= f.request.len() => {
                            f.phase = Phase::Reading;
                            if let Err(e) = self.poller.watch(fd, Token::Probe(pid), false) {
                                break Some(Outcome::Fail(format!("cannot poll the probe: {e}")));
                            }
                        }
                        Ok(n) => {
                            f.phase = Phase::Writing { sent: sent + n };
                            break None;
                        }
                        Err(Errno::EAGAIN | Errno::ENOTCONN | Errno::EINTR) => break None,
                        Err(e) => {
                            break Some(Outcome::Fail(format!("cannot send the request: {e}")))
                        }
                    }
                }
                Phase::Reading => {
                    let mut buf = [0u8; 512];
                    match nix::unistd::read(fd, &mut buf) {
                        Ok(0) => {
                            break Some(Outcome::Fail(if f.answer.is_empty() {
                                "closed without an answer".to_string()
                            } else {
                                "closed before the end of the status line".to_string()
                            }))
                        }
                        Ok(n) => f.answer.extend_from_slice(&buf[..n]),
                        Err(Errno::EAGAIN | Errno::EINTR) => break None,
                        Err(e) => break Some(Outcome::Fail(format!("reading the answer: {e}"))),
                    }
                    if let Some(end) = f.answer.windows(2).position(|w| w == b"\r\n") {
                        let took = millis(now.saturating_duration_since(f.started));
                        break Some(match (status_code(&f.answer[..end]), expected) {
                            (Some(code), Some(want)) if code == want => {
                                Outcome::Pass(format!("HTTP {code} in {took}"))
                            }
                            (Some(code), _) => Outcome::Fail(format!("HTTP {code} in {took}")),
                            (None, _) => Outcome::Fail("not an HTTP answer".to_string()),
                        });
                    }
                    if f.answer.len() > MAX_STATUS_LINE {
                        break Some(Outcome::Fail("not an HTTP answer".to_string()));
                    }
                }
            }
        };
        if let Some(outcome) = outcome {
            self.finish_check(pid, outcome, now);
        }
    }

    fn release_probe(&mut self, _pid: Pid, (listener, route): (usize, Option<u16>)) {
        if let Some(route) = route {
            self.dispatch.close_probe(listener, route);
        }
    }

    /// Record an outcome and act on it (rotation, replacement).
    fn finish_check(&mut self, pid: Pid, outcome: Outcome, now: Instant) {
        let Some(r) = self.checks.records.get_mut(&pid) else {
            return;
        };
        if let Some(f) = r.in_flight.take() {
            r.figures.last_duration = Some(now.saturating_duration_since(f.started));
            self.poller.unregister(f.conn.fd.as_fd());
            let route = (f.listener, f.conn.route);
            drop(f);
            self.release_probe(pid, route);
        }
        let Some(r) = self.checks.records.get_mut(&pid) else {
            return;
        };
        let slot = self.workers.get(&pid).map_or(0, |w| w.slot);
        let mut replace = None;
        let fig = &mut r.figures;
        match outcome {
            Outcome::Pass(what) => {
                fig.passes += 1;
                fig.consecutive_passes += 1;
                fig.consecutive_failures = 0;
                fig.last = Some(format!("passed: {what}"));
                if !fig.admitted {
                    fig.admitted = true;
                    fig.out_of_rotation = false;
                    log::info!(
                        "worker {slot} (pid {pid}) passed its first health check: in the rotation"
                    );
                    self.dispatch.set_in_rotation(pid, true);
                } else if fig.out_of_rotation && fig.consecutive_passes >= r.settings.passes {
                    fig.out_of_rotation = false;
                    log::info!(
                        "worker {slot} (pid {pid}) passed {} health checks in a row: back in the rotation",
                        fig.consecutive_passes
                    );
                    self.dispatch.set_in_rotation(pid, true);
                }
            }
            Outcome::Fail(why) => {
                fig.failures += 1;
                fig.consecutive_failures += 1;
                fig.consecutive_passes = 0;
                fig.last = Some(format!("failed: {why}"));
                let n = fig.consecutive_failures;
                if n >= r.settings.fails {
                    replace = Some(format!("failed {n} health checks in a row (last: {why})"));
                }
                if !fig.admitted {
                    log::warn!(
                        "worker {slot} (pid {pid}) failed its health check ({why}), {n} in a row; not in the rotation yet"
                    );
                } else if !fig.out_of_rotation {
                    fig.out_of_rotation = true;
                    log::warn!(
                        "worker {slot} (pid {pid}) failed its health check ({why}): out of the rotation"
                    );
                    self.dispatch.set_in_rotation(pid, false);
                } else {
                    log::warn!(
                        "worker {slot} (pid {pid}) failed its health check ({why}), {n} in a row"
                    );
                }
            }
        }
        if let Some(reason) = replace {
            self.stop_failed(pid, Signal::SIGTERM, EndReason::HealthCheck, &reason, now);
        }
        self.dirty = true;
    }

    /// The worker is gone: forget its checks (closing a probe in flight).
    pub(super) fn forget_checks(&mut self, pid: Pid) {
        if let Some(r) = self.checks.records.remove(&pid) {
            if let Some(f) = r.in_flight {
                self.poller.unregister(f.conn.fd.as_fd());
                let route = (f.listener, f.conn.route);
                drop(f);
                self.release_probe(pid, route);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK"), Some(200));
        assert_eq!(
            status_code(b"HTTP/1.0 500 Internal Server Error"),
            Some(500)
        );
        assert_eq!(status_code(b"HTTP/1.1 204"), Some(204));
        assert_eq!(status_code(b"hello from worker 0"), None);
        assert_eq!(status_code(b"HTTP/1.1 abc"), None);
    }

    #[test]
    fn http_request_has_host_and_close() {
        let r = request_bytes(&CheckKind::Http {
            request: "GET /healthz HTTP/1.1".into(),
            status: 200,
        });
        assert_eq!(
            r,
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        );
        assert!(request_bytes(&CheckKind::Tcp).is_empty());
    }
}
