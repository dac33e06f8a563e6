//! One worker's channel for one dispatched listener: a `SOCK_SEQPACKET` socketpair.
//!
//! sockvisor keeps **both** ends. It sends on its own end; it keeps a reference to the
//! worker's end (the same open file the worker has at fd 3..), which gives two things for
//! free: the queue depth (`FIONREAD` on the worker's end counts the bytes of messages the
//! worker has not received yet) and, when the worker dies, the connections it never
//! received (read back with `recvmsg` on that end). See docs/protocol.md.
//!
//! # Blocking modes
//!
//! `O_NONBLOCK` is a property of the *open file description*, and the worker's end is one
//! open file shared by sockvisor's reference and the worker's fd. So:
//!
//! * the **worker's end is blocking**, which is what a simple worker (`recvmsg` in a loop)
//!   expects. sockvisor never blocks on it: its own `recvmsg` there ([`Channel::reclaim`])
//!   passes `MSG_DONTWAIT`, and `FIONREAD` never blocks. (A worker may set `O_NONBLOCK` on
//!   its end; that changes nothing for sockvisor for the same reason.)
//! * **sockvisor's end is non-blocking** (nobody else has it), and `sendmsg` passes
//!   `MSG_DONTWAIT | MSG_NOSIGNAL` anyway: a full queue is `EAGAIN`, never a stall, and a
//!   gone peer is `EPIPE`, never `SIGPIPE`.
//!
//! # Worker death is learned from `SIGCHLD`, not from the channel
//!
//! Because sockvisor holds the worker's end itself, the socket never hangs up when the
//! worker process dies: its copy of the fd closes, sockvisor's does not. sockvisor learns
//! of the death from `SIGCHLD`/`waitpid`, then calls [`Channel::reclaim`] and drops the
//! channel. The channel only reports a hang-up when a live worker calls `shutdown(2)` on its
//! end.

use super::sys;
use crate::protocol::{Message, MSG_LEN};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`Channel::read_reports`] read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reports {
    /// Connections the worker reported closed.
    pub closed: u64,
    /// `closed` messages read (a worker announces that it reports with a `closed` of 0).
    pub reports: u64,
    /// The worker's side hung up: stop polling this channel.
    pub hung_up: bool,
}

impl Reports {
    fn hung_up(mut self) -> Reports {
        self.hung_up = true;
        self
    }
}

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

impl SendError {
    /// Classify a `sendmsg` errno. Unknown errors count as `Closed`: a channel that fails in
    /// a way we do not understand is not retried forever.
    pub fn from_errno(e: Errno) -> SendError {
        match e {
            Errno::EAGAIN | Errno::ENOBUFS => SendError::Full,
            Errno::ETOOMANYREFS | Errno::ENOMEM | Errno::EINTR => SendError::Transient(e),
            _ => SendError::Closed(e),
        }
    }
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Full => write!(f, "channel full"),
            SendError::Transient(e) => write!(f, "transient send error: {e}"),
            SendError::Closed(e) => write!(f, "channel closed: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

/// Malformed messages seen from workers (all channels); only the first few are logged.
static MALFORMED: AtomicU64 = AtomicU64::new(0);
const MALFORMED_LOGGED: u64 = 5;

fn note_malformed(what: std::fmt::Arguments<'_>) {
    let n = MALFORMED.fetch_add(1, Ordering::Relaxed) + 1;
    if n <= MALFORMED_LOGGED || n.is_power_of_two() {
        log::warn!("channel: skipped a malformed message from a worker ({what}); {n} so far");
    }
}

/// How many malformed messages all channels have skipped so far (for status/metrics).
pub fn malformed_total() -> u64 {
    MALFORMED.load(Ordering::Relaxed)
}

pub struct Channel {
    /// The end sockvisor sends on and reads close reports from.
    sockvisor_end: OwnedFd,
    /// sockvisor's reference to the worker's end (placed at the worker's fd 3+i).
    worker_end: OwnedFd,
    /// Sequence number of the next connection message.
    next_sequence: u32,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("sockvisor_end", &self.sockvisor_end)
            .field("worker_end", &self.worker_end)
            .field("next_sequence", &self.next_sequence)
            .finish()
    }
}

impl Channel {
    /// A new close-on-exec socketpair: sockvisor's end non-blocking, the worker's end
    /// blocking (see the module docs).
    pub fn new() -> nix::Result<Channel> {
        let (sockvisor_end, worker_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let fl = OFlag::from_bits_truncate(fcntl(&sockvisor_end, FcntlArg::F_GETFL)?);
        fcntl(&sockvisor_end, FcntlArg::F_SETFL(fl | OFlag::O_NONBLOCK))?;
        Ok(Channel {
            sockvisor_end,
            worker_end,
            next_sequence: 0,
        })
    }

    /// The fd to place in the worker.
    pub fn worker_end(&self) -> BorrowedFd<'_> {
        self.worker_end.as_fd()
    }

    /// The fd sockvisor polls for close reports and hang-ups.
    pub fn sockvisor_end(&self) -> BorrowedFd<'_> {
        self.sockvisor_end.as_fd()
    }

    /// Sequence number the next connection message will carry (messages sent so far,
    /// wrapping).
    pub fn next_sequence(&self) -> u32 {
        self.next_sequence
    }

    /// Queue one connection (one message, one fd, `MSG_NOSIGNAL | MSG_DONTWAIT`). On success
    /// sockvisor's copy of the fd is closed (dropped). On failure the connection is handed back.
    ///
    /// One `sendmsg`, no allocation. `EAGAIN`/`ENOBUFS` are [`SendError::Full`];
    /// `ETOOMANYREFS`/`ENOMEM`/`EINTR` [`SendError::Transient`]; anything else (`EPIPE`,
    /// `ECONNRESET`, `ECONNREFUSED`, ...) [`SendError::Closed`].
    pub fn send(&mut self, conn: OwnedFd, report_close: bool) -> Result<(), (OwnedFd, SendError)> {
        let msg = Message::Connection {
            report_close,
            sequence: self.next_sequence,
        }
        .encode();
        match sys::send(
            self.sockvisor_end.as_fd(),
            &msg,
            Some(conn.as_fd()),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        ) {
            Ok(_) => {
                self.next_sequence = self.next_sequence.wrapping_add(1);
                drop(conn);
                Ok(())
            }
            Err(e) => Err((conn, SendError::from_errno(e))),
        }
    }

    /// Connections sent and not yet received by the worker.
    ///
    /// `FIONREAD` on the worker's end: for `SOCK_SEQPACKET` unix sockets Linux sums the bytes
    /// of *all* queued messages (not only the first, as for datagrams), so this is the byte
    /// count divided by [`MSG_LEN`]. Checked by the `queued_counts_every_message` test.
    pub fn queued(&self) -> usize {
        match sys::inq(self.worker_end.as_fd()) {
            Ok(bytes) => bytes / MSG_LEN,
            Err(e) => {
                log::warn!("channel: FIONREAD failed: {e}");
                0
            }
        }
    }

    /// Take back every connection still queued (the worker is dead or being replaced).
    /// Messages that carry no fd or that do not decode are skipped; any fd is returned.
    pub fn reclaim(&self) -> Vec<OwnedFd> {
        let mut out = Vec::new();
        let mut buf = [0u8; MSG_LEN + 1];
        loop {
            let mut got = match sys::recv(self.worker_end.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => {
                    log::warn!("channel: reclaim stopped: recvmsg: {e}");
                    break;
                }
            };
            if got.ctrunc() {
                log::warn!(
                    "channel: reclaim: a message carried more fds than expected (MSG_CTRUNC)"
                );
            }
            let nfds = got.fds.len();
            if got.bytes == 0 && nfds == 0 {
                // End of file: cannot happen while we hold sockvisor's end; stop anyway.
                break;
            }
            if let Err(e) = Message::decode(&buf[..got.bytes.min(buf.len())]) {
                log::warn!("channel: reclaim: undecodable message ({e}) with {nfds} fd(s); keeping the fds");
            }
            out.extend(got.fds.drain());
        }
        out
    }

    /// Read the close reports the worker sent. Returns the number of connections it reported
    /// closed, and whether the worker's side hung up.
    ///
    /// Reads until `EAGAIN`. Any fd a worker sends is closed; malformed messages are skipped
    /// (counted in [`malformed_total`], the first few logged). A hang-up is `ECONNRESET` or
    /// end of file (the worker called `shutdown(2)`); after it, stop polling this channel. An
    /// empty message is told apart from end of file with `poll(POLLRDHUP)`.
    pub fn read_reports(&self) -> Reports {
        let mut r = Reports::default();
        let mut buf = [0u8; MSG_LEN + 1];
        loop {
            let got = match sys::recv(self.sockvisor_end.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                Ok(got) => got,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return r,
                Err(Errno::ECONNRESET) => return r.hung_up(),
                Err(e) => {
                    log::warn!("channel: reading close reports: {e}");
                    return r.hung_up();
                }
            };
            let nfds = got.fds.len();
            drop(got.fds); // a worker has no business sending fds: close them
            if got.bytes == 0 && nfds == 0 && sys::peer_hung_up(self.sockvisor_end.as_fd()) {
                return r.hung_up();
            }
            if nfds > 0 {
                note_malformed(format_args!("{nfds} fd(s) attached, closed"));
            }
            match Message::decode(&buf[..got.bytes.min(buf.len())]) {
                Ok(Message::Closed { count }) => {
                    r.closed += u64::from(count);
                    r.reports += 1;
                }
                Ok(m) => note_malformed(format_args!("unexpected {m:?}")),
                Err(e) => note_malformed(format_args!("{e}")),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// A connected loopback TCP pair: (client, accepted server side as OwnedFd).
    pub(crate) fn tcp_pair(l: &TcpListener) -> (TcpStream, OwnedFd) {
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        (c, OwnedFd::from(s))
    }

    fn listener() -> TcpListener {
        TcpListener::bind("127.0.0.1:0").unwrap()
    }

    /// Worker side: receive one message with the crate's own raw receive.
    fn worker_recv(ch: &Channel) -> (Message, Option<OwnedFd>) {
        let mut buf = [0u8; MSG_LEN];
        let mut got = sys::recv(ch.worker_end(), &mut buf, libc::MSG_DONTWAIT).unwrap();
        (
            Message::decode(&buf[..got.bytes]).unwrap(),
            got.fds.take_first(),
        )
    }

    #[test]
    fn ends_have_the_documented_flags() {
        let ch = Channel::new().unwrap();
        let fl =
            |fd: BorrowedFd<'_>| OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).unwrap());
        assert!(fl(ch.sockvisor_end()).contains(OFlag::O_NONBLOCK));
        assert!(!fl(ch.worker_end()).contains(OFlag::O_NONBLOCK));
        for fd in [ch.sockvisor_end(), ch.worker_end()] {
            let fdfl = fcntl(fd, FcntlArg::F_GETFD).unwrap();
            assert!(nix::fcntl::FdFlag::from_bits_truncate(fdfl)
                .contains(nix::fcntl::FdFlag::FD_CLOEXEC));
        }
    }

    #[test]
    fn queued_counts_every_message() {
        let l = listener();
        let mut ch = Channel::new().unwrap();
        assert_eq!(ch.queued(), 0);
        let mut clients = Vec::new();
        for i in 1..=5 {
            let (c, s) = tcp_pair(&l);
            clients.push(c);
            ch.send(s, false).unwrap();
            assert_eq!(
                ch.queued(),
                i,
                "FIONREAD must sum all queued SEQPACKET messages"
            );
        }
        let (m, fd) = worker_recv(&ch);
        assert_eq!(
            m,
            Message::Connection {
                report_close: false,
                sequence: 0
            }
        );
        assert!(fd.is_some());
        assert_eq!(ch.queued(), 4);
    }

    #[test]
    fn send_receive_and_reclaim_round_trip() {
        let l = listener();
        let mut ch = Channel::new().unwrap();
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (c, s) = tcp_pair(&l);
            clients.push(c);
            ch.send(s, true).unwrap();
        }
        // The worker takes the first one: sequence 0, report flag set, a working socket.
        let (m, fd) = worker_recv(&ch);
        assert_eq!(
            m,
            Message::Connection {
                report_close: true,
                sequence: 0
            }
        );
        let mut s0 = TcpStream::from(fd.unwrap());
        s0.write_all(b"zero").unwrap();
        let mut b = [0u8; 4];
        clients[0].read_exact(&mut b).unwrap();
        assert_eq!(&b, b"zero");

        // The worker "dies": the other two come back, in order, as the same sockets.
        let back = ch.reclaim();
        assert_eq!(back.len(), 2);
        assert_eq!(ch.queued(), 0);
        for (i, fd) in back.into_iter().enumerate() {
            let mut s = TcpStream::from(fd);
            assert_eq!(s.peer_addr().unwrap(), clients[i + 1].local_addr().unwrap());
            s.write_all(&[b'a' + i as u8]).unwrap();
            let mut b = [0u8; 1];
            clients[i + 1].read_exact(&mut b).unwrap();
            assert_eq!(b[0], b'a' + i as u8);
            // reclaimed fds are close-on-exec
            let fdfl = fcntl(&s, FcntlArg::F_GETFD).unwrap();
            assert!(nix::fcntl::FdFlag::from_bits_truncate(fdfl)
                .contains(nix::fcntl::FdFlag::FD_CLOEXEC));
        }
        assert!(ch.reclaim().is_empty());
        // sequence numbers continue
        let (_c, s) = tcp_pair(&l);
        ch.send(s, false).unwrap();
        let (m, _) = worker_recv(&ch);
        assert_eq!(
            m,
            Message::Connection {
                report_close: false,
                sequence: 3
            }
        );
    }

    #[test]
    fn full_channel_hands_the_connection_back() {
        let l = listener();
        let (_client, s) = tcp_pair(&l);
        let mut ch = Channel::new().unwrap();
        let mut sent = 0usize;
        let (back, err) = loop {
            let dup = s.try_clone().unwrap();
            match ch.send(dup, false) {
                Ok(()) => sent += 1,
                Err(x) => break x,
            }
            assert!(sent < 100_000, "the channel never filled");
        };
        assert!(matches!(err, SendError::Full), "{err:?}");
        assert!(sent > 0);
        // the connection came back, still open and the same socket
        let back = TcpStream::from(back);
        assert_eq!(
            back.local_addr().unwrap(),
            TcpStream::from(s.try_clone().unwrap())
                .local_addr()
                .unwrap()
        );
        assert_eq!(ch.queued(), sent);
        // a receive makes room again
        let _ = worker_recv(&ch);
        ch.send(OwnedFd::from(back), false).unwrap();
        assert_eq!(ch.reclaim().len(), sent);
        eprintln!("channel filled after {sent} messages");
    }

    #[test]
    fn close_reports_are_summed_and_garbage_skipped() {
        let ch = Channel::new().unwrap();
        let w = ch.worker_end();
        assert_eq!(ch.read_reports(), Reports::default());
        sys::send(w, &Message::Closed { count: 2 }.encode(), None, 0).unwrap();
        sys::send(w, &[1, 2, 3], None, 0).unwrap(); // malformed length
        sys::send(w, &[9, 2, 0, 0, 1, 0, 0, 0], None, 0).unwrap(); // unknown version
        sys::send(w, &[], None, 0).unwrap(); // empty message: not a hang-up
                                             // a message with an fd: counted as a report, the fd is closed by sockvisor
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        sys::send(
            w,
            &Message::Closed { count: 5 }.encode(),
            Some(a.as_fd()),
            0,
        )
        .unwrap();
        drop(a);
        let before = malformed_total();
        assert_eq!(ch.read_reports().closed, 7);
        assert!(malformed_total() >= before + 4);
        // the fd sent to sockvisor was closed: b sees EOF
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert_eq!((&b).read(&mut [0u8; 1]).unwrap(), 0);
    }

    #[test]
    fn hang_up_only_on_shutdown_not_on_worker_exit() {
        let l = listener();
        let mut ch = Channel::new().unwrap();
        // The worker's copy of its end (what it has at fd 3), then the worker exits.
        let worker_copy = ch.worker_end().try_clone_to_owned().unwrap();
        sys::send(
            worker_copy.as_fd(),
            &Message::Closed { count: 1 }.encode(),
            None,
            0,
        )
        .unwrap();
        drop(worker_copy);
        // Not visible on the channel: sockvisor still holds the worker's end.
        assert_eq!(ch.read_reports().closed, 1);
        let (_c, s) = tcp_pair(&l);
        ch.send(s, false).unwrap();
        assert_eq!(ch.reclaim().len(), 1);

        // A live worker that shuts its end down is a hang-up.
        let worker_copy = ch.worker_end().try_clone_to_owned().unwrap();
        nix::sys::socket::shutdown(worker_copy.as_raw_fd(), nix::sys::socket::Shutdown::Both)
            .unwrap();
        assert!(ch.read_reports().hung_up);
        let (_c, s) = tcp_pair(&l);
        let (back, err) = ch.send(s, false).unwrap_err();
        assert!(matches!(err, SendError::Closed(_)), "{err:?}");
        drop(back);
    }

    /// Regression (fuzz/channel_message, under libFuzzer's SIGALRM): an empty message read
    /// while a signal is pending made `poll` fail with EINTR, which was taken for a hang-up.
    #[test]
    fn empty_messages_under_signals_are_not_a_hang_up() {
        extern "C" fn nothing(_: libc::c_int) {}
        // SAFETY: an empty handler for SIGURG (ignored by default, used by nothing else in
        // the tests), without SA_RESTART so that syscalls see EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = nothing as extern "C" fn(libc::c_int) as usize;
            libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut());
        }
        let ch = Channel::new().unwrap();
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() } as usize;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let pest = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                // SAFETY: the target thread outlives this one (joined below).
                unsafe { libc::pthread_kill(me as libc::pthread_t, libc::SIGURG) };
            }
        });
        let start = std::time::Instant::now();
        let mut rounds = 0u64;
        let mut spurious = 0u64;
        while start.elapsed() < std::time::Duration::from_secs(2) {
            // SAFETY: send(2) of an empty message on a socket this test owns.
            let r = unsafe {
                libc::send(
                    ch.worker_end().as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                )
            };
            assert_eq!(r, 0);
            let r = ch.read_reports();
            assert_eq!(r.closed, 0);
            spurious += u64::from(r.hung_up);
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        pest.join().unwrap();
        assert_eq!(
            spurious, 0,
            "{spurious} spurious hang-ups in {rounds} rounds"
        );
    }

    #[test]
    fn reclaim_returns_fds_of_undecodable_messages() {
        let ch = Channel::new().unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        // sockvisor end -> worker end: garbage payload with an fd, and a message without fd
        sys::send(ch.sockvisor_end(), b"garbage!!", Some(a.as_fd()), 0).unwrap();
        sys::send(ch.sockvisor_end(), &[1, 1, 0, 0, 0, 0, 0, 0], None, 0).unwrap();
        let back = ch.reclaim();
        assert_eq!(back.len(), 1);
        assert_eq!(
            nix::sys::stat::fstat(&back[0]).unwrap().st_ino,
            nix::sys::stat::fstat(&a).unwrap().st_ino
        );
    }

    /// `cargo test --release --lib send_cost -- --ignored --nocapture`: CPU per `send`
    /// (one sendmsg with one fd), measured against the `dup` that makes each fd.
    #[test]
    #[ignore]
    fn send_cost() {
        let l = listener();
        let (_c, s) = tcp_pair(&l);
        let mut ch = Channel::new().unwrap();
        let rounds = 2000;
        let batch = 200;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let fds: Vec<_> = (0..batch).map(|_| s.try_clone().unwrap()).collect();
            drop(fds);
        }
        let dup_close = t.elapsed();
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            for _ in 0..batch {
                ch.send(s.try_clone().unwrap(), false).unwrap();
            }
            drop(ch.reclaim());
        }
        let all = t.elapsed();
        let n = (rounds * batch) as f64;
        eprintln!(
            "dup+close {:.2} us, dup+send+reclaim+close {:.2} us => send+reclaim {:.2} us per connection",
            dup_close.as_secs_f64() * 1e6 / n,
            all.as_secs_f64() * 1e6 / n,
            (all - dup_close).as_secs_f64() * 1e6 / n
        );
    }
}
