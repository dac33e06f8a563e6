//! hello: sockvisor's demo, test and benchmark worker.
//!
//! Serves a minimal HTTP/1.1 hello on every stream listener it is given (sockvisor channel or
//! shared listening socket: `sockvisor::worker` hides the difference) and echoes datagrams on
//! every datagram socket. One epoll loop, non-blocking sockets, like the C reference server
//! (research/bench/refserver).
//!
//! ```text
//! sockvisor -l tcp://127.0.0.1:8000 -- target/release/examples/hello
//! hello --reuseport 127.0.0.1:8000 --processes 2    # kernel SO_REUSEPORT reference
//! ```
//! Env: HELLO_READY=1 (send READY=1), HELLO_READY_DELAY_MS=N, HELLO_WATCHDOG=1 (WATCHDOG=1 at
//! WATCHDOG_USEC/2), HELLO_STATS_DIR or BENCH_STATS_DIR (on exit write "<conns> <reqs>" to
//! $DIR/<pid>). SIGTERM: stop accepting, drain the channel, finish requests (at most 1 s), exit 0.
//! Test knobs: HELLO_STATUS=500 (answer every request with that status), HELLO_EXIT_AFTER_MS=N
//! (exit with status 3 after N ms: a crashing worker), HELLO_BREAK_DIR=DIR (before each
//! request: if DIR/<worker id> exists and says `500`, answer 500; if it says `hang`, never
//! answer: a worker that turns bad while it runs).
//! `GET /grow` answers like `/` and keeps HELLO_GROW_KB KiB (default 1024) more memory for good
//! (a leak, for worker_memory_max tests).

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::socket::{self as sock, sockopt, AddressFamily, SockFlag, SockType, SockaddrStorage};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};
use sockvisor::worker::{self, Connection, Incoming, ListenerKind, Listeners};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

const BUF: usize = 8192;
const DRAIN_TIME: Duration = Duration::from_secs(1);

enum Source {
    Incoming(Incoming),
    Udp(UdpSocket),
    UnixDgram(UnixDatagram),
    Conn(Box<Conn>),
    Signal(SignalFd),
    Timer(TimerFd),
}

struct Conn {
    c: Connection,
    buf: Vec<u8>,
    served: u64,
    /// Draining: our side is shut down (FIN sent); what still arrives is read and dropped
    /// until the client closes, so the client sees a clean close, never a reset.
    closing: bool,
}

/// The four possible replies, built once.
struct Replies {
    hello: String,
    echo_prefix: Vec<u8>,    // "worker <id> (pid <pid>): "
    responses: [Vec<u8>; 4], // [hello keep-alive, hello close, pid keep-alive, pid close]
}

impl Replies {
    fn new() -> Replies {
        let id = worker::worker_id().map_or("-".to_owned(), |i| i.to_string());
        let pid = std::process::id();
        let hello = format!("hello from worker {id} (pid {pid})\n");
        let echo_prefix = format!("worker {id} (pid {pid}): ").into_bytes();
        let pidb = format!("{pid}\n");
        let resp = |b: &str, close: bool| {
            let conn = if close { "close" } else { "keep-alive" };
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{b}", b.len()).into_bytes()
        };
        let responses = [
            resp(&hello, false),
            resp(&hello, true),
            resp(&pidb, false),
            resp(&pidb, true),
        ];
        Replies {
            hello,
            echo_prefix,
            responses,
        }
    }
}

struct Server {
    ep: Epoll,
    chunk: Box<[u8]>,         // read buffer shared by all connections
    src: Vec<Option<Source>>, // by fd
    replies: Replies,
    conns: u64,
    reqs: u64,
    open: usize,
    draining: Option<Instant>,
    /// HELLO_EXIT_AFTER_MS: exit with status 3 at the first moment after this that no
    /// connection is open (a crash that loses no request: what sockvisor does is measured).
    exit_at: Option<Instant>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = match args.first().map(String::as_str) {
        Some("--reuseport") => reuseport_main(&args),
        Some(a) => {
            eprintln!(
                "hello: unknown argument {a}; usage: hello [--reuseport HOST:PORT --processes N]"
            );
            2
        }
        None => match worker_main(None) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("hello: {e}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn env_on(k: &str) -> bool {
    std::env::var(k).is_ok_and(|v| v == "1")
}

fn block_signals(extra: &[Signal]) -> io::Result<SigSet> {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT].iter().chain(extra) {
        mask.add(*s);
    }
    mask.thread_block()?;
    Ok(mask)
}

fn worker_main(reuseport: Option<Incoming>) -> io::Result<()> {
    let mask = block_signals(&[])?;
    let mut s = Server {
        ep: Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?,
        chunk: vec![0; BUF].into_boxed_slice(),
        src: Vec::new(),
        replies: Replies::new(),
        conns: 0,
        reqs: 0,
        open: 0,
        draining: None,
        exit_at: None,
    };
    let mut listeners = Listeners::from_env()?;
    let all: Vec<(String, ListenerKind)> =
        listeners.iter().map(|(n, k)| (n.to_owned(), k)).collect();
    for (name, kind) in all {
        match kind {
            ListenerKind::Channel | ListenerKind::Stream => {
                if let Some(inc) = listeners.take_stream(&name) {
                    inc.set_nonblocking_connections(true);
                    s.add(Source::Incoming(inc))?;
                }
            }
            ListenerKind::Datagram => {
                if let Some(u) = listeners.take_udp(&name) {
                    u.set_nonblocking(true)?;
                    s.add(Source::Udp(u))?;
                } else if let Some(u) = listeners.take_unix_datagram(&name) {
                    u.set_nonblocking(true)?;
                    s.add(Source::UnixDgram(u))?;
                }
            }
            ListenerKind::Other => eprintln!("hello: ignoring fd {name:?} (not a listener)"),
        }
    }
    if let Some(inc) = reuseport {
        inc.set_nonblocking_connections(true);
        s.add(Source::Incoming(inc))?;
    }
    if s.src.iter().flatten().count() == 0 {
        return Err(io::Error::other(
            "no listeners (LISTEN_FDS) and no --reuseport",
        ));
    }
    s.add(Source::Signal(SignalFd::new(&mask)?))?;
    if env_on("HELLO_WATCHDOG") {
        if let Some(t) = worker::watchdog_interval() {
            let tfd = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)?;
            let half = TimeSpec::from_duration(t / 2);
            tfd.set(Expiration::Interval(half), TimerSetTimeFlags::empty())?;
            worker::notify_watchdog()?;
            s.add(Source::Timer(tfd))?;
        }
    }
    s.exit_at = std::env::var("HELLO_EXIT_AFTER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    if env_on("HELLO_READY") {
        if let Some(ms) = std::env::var("HELLO_READY_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            std::thread::sleep(Duration::from_millis(ms));
        }
        worker::notify_ready()?;
    }
    s.run()?;
    s.write_stats();
    Ok(())
}

impl Server {
    fn add(&mut self, source: Source) -> io::Result<()> {
        let fd = match &source {
            Source::Incoming(x) => x.as_fd(),
            Source::Udp(x) => x.as_fd(),
            Source::UnixDgram(x) => x.as_fd(),
            Source::Conn(c) => c.c.as_fd(),
            Source::Signal(x) => x.as_fd(),
            Source::Timer(x) => x.as_fd(),
        };
        let raw = fd.as_raw_fd();
        self.ep
            .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, raw as u64))?;
        let i = raw as usize;
        if self.src.len() <= i {
            self.src.resize_with(i + 1, || None);
        }
        self.src[i] = Some(source);
        Ok(())
    }

    /// Deregister and return the source at `fd` (dropping it closes it).
    fn remove(&mut self, fd: RawFd) -> Option<Source> {
        let s = self.src.get_mut(fd as usize)?.take()?;
        if matches!(s, Source::Conn(_)) {
            self.open -= 1;
        }
        // Delete explicitly rather than rely on close: an Incoming's fd may be shared with
        // close reports, and a connection's file may outlive our close (sockvisor still
        // holds it for a moment after the hand-over). Left in epoll, its stale entry can be
        // polled by our epoll_wait just as sockvisor lets go, which defers the final release
        // (the FIN) to our next return from the kernel: the client waited for its end of
        // file until the next event (docs/protocol.md, lifetime rules).
        let _ = match &s {
            Source::Incoming(x) => self.ep.delete(x.as_fd()),
            Source::Conn(c) => self.ep.delete(c.c.as_fd()),
            _ => Ok(()),
        };
        Some(s)
    }

    fn run(&mut self) -> io::Result<()> {
        let mut events = vec![EpollEvent::empty(); 256];
        loop {
            if let Some(t) = self.exit_at {
                if Instant::now() >= t && self.open == 0 {
                    std::process::exit(3);
                }
            }
            let timeout = match self.draining {
                None if self.exit_at.is_some() => EpollTimeout::from(20u8),
                None => EpollTimeout::NONE,
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if self.open == 0 || left.is_zero() {
                        return Ok(());
                    }
                    EpollTimeout::try_from(left).unwrap_or(EpollTimeout::ZERO)
                }
            };
            let n = match self.ep.wait(&mut events, timeout) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            for ev in &events[..n] {
                self.event(ev.data() as RawFd)?;
            }
        }
    }

    fn event(&mut self, fd: RawFd) -> io::Result<()> {
        match self.src.get(fd as usize) {
            Some(Some(Source::Incoming(_))) => self.accept_all(fd),
            Some(Some(Source::Conn(_))) => {
                self.on_readable(fd);
                Ok(())
            }
            Some(Some(Source::Udp(_) | Source::UnixDgram(_))) => {
                self.echo(fd);
                Ok(())
            }
            Some(Some(Source::Signal(sfd))) => {
                if let Ok(Some(_)) = sfd.read_signal() {
                    self.start_drain();
                }
                Ok(())
            }
            Some(Some(Source::Timer(t))) => {
                let _ = t.wait();
                let _ = worker::notify_watchdog();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn accept_all(&mut self, fd: RawFd) -> io::Result<()> {
        loop {
            let Some(Some(Source::Incoming(inc))) = self.src.get(fd as usize) else {
                return Ok(());
            };
            match inc.try_accept() {
                Ok(Some(c)) => {
                    if let Err(e) = self.new_conn(c) {
                        eprintln!("hello: cannot watch a connection: {e}"); // it is closed
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    // sockvisor is gone: serve what we have, then exit
                    self.remove(fd);
                    self.start_drain();
                    return Ok(());
                }
                Err(e) => {
                    eprintln!("hello: accept: {e}");
                    return Ok(()); // EMFILE and friends: try again on the next event
                }
            }
        }
    }

    fn new_conn(&mut self, c: Connection) -> io::Result<()> {
        self.conns += 1;
        if let Some(t) = c.as_tcp() {
            let _ = t.set_nodelay(true);
        }
        let fd = c.as_raw_fd();
        self.add(Source::Conn(Box::new(Conn {
            c,
            buf: Vec::with_capacity(1024),
            served: 0,
            closing: false,
        })))?;
        self.open += 1;
        self.on_readable(fd); // the request has usually arrived already
        Ok(())
    }

    fn start_drain(&mut self) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(Instant::now() + DRAIN_TIME);
        let _ = worker::notify_stopping();
        for fd in 0..self.src.len() as RawFd {
            let slot = &self.src[fd as usize];
            let listener = matches!(
                slot,
                Some(Source::Incoming(_) | Source::Udp(_) | Source::UnixDgram(_))
            );
            // Idle keep-alive connections that were served: end them now, with a FIN first.
            // A close() with a request already in the socket (sent by the client as we
            // decide) would answer it with a reset, a failed request; after the FIN the
            // client reads a clean end of file and sends it again on a new connection.
            let idle = matches!(slot, Some(Source::Conn(c)) if c.served > 0 && c.buf.is_empty());
            if listener {
                if let Some(Source::Incoming(inc)) = self.remove(fd) {
                    // take everything sockvisor already queued for us, and serve it
                    while let Ok(Some(c)) = inc.try_accept() {
                        if self.new_conn(c).is_err() {
                            break;
                        }
                    }
                }
            } else if idle {
                if let Some(Some(Source::Conn(c))) = self.src.get_mut(fd as usize) {
                    c.closing = true;
                    if sock::shutdown(fd, sock::Shutdown::Write).is_err() {
                        self.remove(fd);
                    }
                }
            }
        }
    }

    fn on_readable(&mut self, fd: RawFd) {
        let Some(Some(Source::Conn(c))) = self.src.get_mut(fd as usize) else {
            return;
        };
        let draining = self.draining.is_some();
        let chunk = &mut self.chunk[..];
        if c.closing {
            // Drop what comes until the client closes (or the drain time is over).
            let keep = loop {
                match c.c.read(chunk) {
                    Ok(0) => break false,
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break false,
                }
            };
            if !keep {
                self.remove(fd);
            }
            return;
        }
        let keep = loop {
            let n = match c.c.read(chunk) {
                Ok(0) => break false,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break false,
            };
            c.buf.extend_from_slice(&chunk[..n]);
            if !serve(c, &self.replies, draining, &mut self.reqs) || c.buf.len() > BUF {
                break false; // done, or an oversized request head
            }
            if n < chunk.len() {
                break true; // a short read drained the socket: wait for epoll
            }
        };
        if !keep {
            self.remove(fd);
        }
    }

    /// Echo datagrams, prefixed, without allocating: the prefix sits in front of the data.
    fn echo(&mut self, fd: RawFd) {
        let mut buf = [0u8; 65536 + 64];
        let p = self.replies.echo_prefix.len().min(64);
        buf[..p].copy_from_slice(&self.replies.echo_prefix[..p]);
        for _ in 0..64 {
            let ok = match &self.src[fd as usize] {
                Some(Source::Udp(u)) => match u.recv_from(&mut buf[p..]) {
                    Ok((n, from)) => u.send_to(&buf[..p + n], from).map(drop).or(Ok(())),
                    Err(e) => Err(e),
                },
                Some(Source::UnixDgram(u)) => match u.recv_from(&mut buf[p..]) {
                    Ok((n, from)) => match from.as_pathname() {
                        Some(path) => u.send_to(&buf[..p + n], path).map(drop).or(Ok(())),
                        None => Ok(()), // an unbound sender cannot be answered
                    },
                    Err(e) => Err(e),
                },
                _ => return,
            };
            if ok.is_err() {
                return; // WouldBlock (or an error: try again on the next event)
            }
            self.reqs += 1;
        }
    }

    fn write_stats(&self) {
        let dir = std::env::var("HELLO_STATS_DIR").or_else(|_| std::env::var("BENCH_STATS_DIR"));
        if let Ok(dir) = dir.as_deref() {
            if !dir.is_empty() {
                let path = format!("{dir}/{}", std::process::id());
                let _ = std::fs::write(path, format!("{} {}\n", self.conns, self.reqs));
            }
        }
    }
}

/// How a broken worker answers (the test knobs in the module docs).
enum Broken {
    Status(u16),
    Hang,
}

fn broken() -> Option<Broken> {
    if let Some(code) = std::env::var("HELLO_STATUS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&c| c != 200)
    {
        return Some(Broken::Status(code));
    }
    let dir = std::env::var_os("HELLO_BREAK_DIR")?;
    let id = worker::worker_id()?;
    let what = std::fs::read_to_string(std::path::Path::new(&dir).join(id.to_string())).ok()?;
    match what.trim() {
        "" => None, // being written
        "hang" => Some(Broken::Hang),
        s => Some(Broken::Status(s.parse().unwrap_or(500))),
    }
}

/// Answer every complete request in `c.buf`; `false`: close the connection.
fn serve(c: &mut Conn, r: &Replies, draining: bool, reqs: &mut u64) -> bool {
    if find(&c.buf, b"\r\n\r\n").is_some() {
        match broken() {
            Some(Broken::Hang) => {
                c.buf.clear();
                return true; // never answered
            }
            Some(Broken::Status(code)) => {
                *reqs += 1;
                let body = "broken\n";
                let resp = format!("HTTP/1.1 {code} Broken\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = write_all(&mut c.c, resp.as_bytes());
                return false;
            }
            None => {}
        }
    }
    if c.served == 0 && looks_like_http(&c.buf) == Some(false) {
        // a plain line client (nc, socat): the body, then close
        *reqs += 1;
        c.served += 1;
        let _ = write_all(&mut c.c, r.hello.as_bytes());
        return false;
    }
    while let Some(end) = find(&c.buf, b"\r\n\r\n") {
        let head = &c.buf[..end];
        let line_end = find(head, b"\r\n").unwrap_or(head.len());
        let mut parts = head[..line_end].split(|&b| b == b' ');
        let (_method, path, version) = (
            parts.next(),
            parts.next().unwrap_or(b"/"),
            parts.next().unwrap_or(b""),
        );
        let conn_hdr = header(head, b"connection").unwrap_or(b"");
        let close = draining
            || has_token(conn_hdr, b"close")
            || (version == b"HTTP/1.0" && !has_token(conn_hdr, b"keep-alive"));
        if path == b"/grow" {
            grow();
        }
        let which = usize::from(path == b"/pid") * 2 + usize::from(close);
        *reqs += 1;
        c.served += 1;
        if write_all(&mut c.c, &r.responses[which]).is_err() || close {
            return false;
        }
        c.buf.drain(..end + 4);
    }
    true
}

/// Memory `/grow` keeps.
static GROWN: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Keep HELLO_GROW_KB KiB more, written (so it is resident).
fn grow() {
    let kb: usize = std::env::var("HELLO_GROW_KB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    if let Ok(mut g) = GROWN.lock() {
        g.push(vec![1u8; kb * 1024]);
    }
}

/// `Some(true)` for "METHOD ", `Some(false)` for anything else, `None` while undecided.
fn looks_like_http(buf: &[u8]) -> Option<bool> {
    for (i, &b) in buf.iter().enumerate().take(16) {
        if b == b' ' {
            return Some(i > 0);
        }
        if !b.is_ascii_uppercase() {
            return Some(false);
        }
    }
    if buf.len() >= 16 {
        Some(false)
    } else {
        None
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').skip(1).find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Write a small response on a non-blocking socket, waiting briefly if the buffer is full.
fn write_all(c: &mut Connection, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match c.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: c.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on an fd owned by `c`.
                if unsafe { libc::poll(&mut pfd, 1, 1000) } <= 0 {
                    return Err(ErrorKind::TimedOut.into());
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `--reuseport HOST:PORT --processes N`: N processes, each with its own SO_REUSEPORT
/// listener, the kernel balancing between them (the benchmark reference).
fn reuseport_main(args: &[String]) -> i32 {
    let (Some(addr), Some("--processes"), Some(n)) =
        (args.get(1), args.get(2).map(String::as_str), args.get(3))
    else {
        eprintln!("usage: hello --reuseport HOST:PORT --processes N");
        return 2;
    };
    let (Ok(addr), Ok(n)) = (addr.parse::<SocketAddr>(), n.parse::<usize>()) else {
        eprintln!("hello: bad --reuseport address or --processes count");
        return 2;
    };
    let mask = match block_signals(&[Signal::SIGCHLD]) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("hello: {e}");
            return 1;
        }
    };
    let mut children = Vec::new();
    for slot in 0..n.max(1) {
        // SAFETY: this process is single-threaded here; the child only runs its own loop.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
                std::env::set_var("SOCKVISOR_WORKER_ID", slot.to_string());
                let r = reuseport_listener(addr)
                    .and_then(|fd| worker_main(Some(Incoming::from_fd("web", fd)?)));
                if let Err(e) = &r {
                    eprintln!("hello: {e}");
                }
                std::process::exit(i32::from(r.is_err()));
            }
            Ok(ForkResult::Parent { child }) => children.push(child),
            Err(e) => {
                eprintln!("hello: fork: {e}");
                break;
            }
        }
    }
    let Ok(sfd) = SignalFd::new(&mask) else {
        return 1;
    };
    let mut failed = false;
    while !children.is_empty() {
        match sfd.read_signal() {
            Ok(Some(si)) if si.ssi_signo == Signal::SIGCHLD as u32 => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(st) => {
                        failed |= !matches!(st, WaitStatus::Exited(_, 0));
                        children.retain(|&c| Some(c) != st.pid());
                    }
                }
            },
            Ok(Some(_)) => {
                for &c in &children {
                    let _ = kill(c, Signal::SIGTERM);
                }
            }
            _ => {}
        }
    }
    i32::from(failed)
}

fn reuseport_listener(addr: SocketAddr) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = sock::socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    sock::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    sock::setsockopt(&fd, sockopt::ReusePort, &true)?;
    sock::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    sock::listen(&fd, sock::Backlog::new(1024)?)?;
    Ok(fd)
}
