//! Measurements of the steered group on the real kernel (docs/reuseport.md has the figures).
//!
//! Every test needs `CAP_BPF` or `CAP_SYS_ADMIN` (root): without it a test prints why it is
//! skipped, and fails instead when `SOCKVISOR_REQUIRE_ALL=1` (or CI's
//! `SOCKVISOR_SYSTEMD_TESTS=1`) is set. Figures are printed as `MEASURE` lines:
//! `cargo test --lib dispatch::reuseport -- --nocapture --test-threads=1 | grep MEASURE`.
//!
//! Some scenarios need a second process (a holder that is SIGKILLed, another uid, fewer
//! capabilities): the test binary runs itself with `child_helper` selected and
//! `SOCKVISOR_REUSEPORT_CHILD` naming the role; the child prints `RESULT ...` lines.

use super::bpf::{self, AttachType, Program};
use super::group::{Key, SteeredGroup};
use super::listener;
use super::program::probes_of_kernel_behaviour as kernel_probe;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Safety timeout for anything that waits on the kernel.
const T: Duration = Duration::from_secs(10);
const CAPACITY: u32 = 8;
const CHILD_ENV: &str = "SOCKVISOR_REUSEPORT_CHILD";

fn require_all() -> bool {
    ["SOCKVISOR_REQUIRE_ALL", "SOCKVISOR_SYSTEMD_TESTS"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

/// `true`: this process can create the maps and load the program. Otherwise say why and
/// skip, or panic when every test is required.
fn gate(test: &str) -> bool {
    if std::env::var_os(CHILD_ENV).is_some() {
        return false; // a child run only does its role (child_helper)
    }
    match SteeredGroup::new(1, AttachType::SelectOrMigrate) {
        Ok(_) => true,
        Err(e) => {
            if require_all() {
                panic!(
                    "{test}: cannot run: {e} (SOCKVISOR_REQUIRE_ALL=1 requires it; run as root)"
                );
            }
            let msg = format!("{test}: skipped: {e}");
            eprintln!("{msg}");
            false
        }
    }
}

// ---- sockets ---------------------------------------------------------------------------

fn stream_socket(family: AddressFamily) -> OwnedFd {
    socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap()
}

/// `addr` with port 0 replaced by a port that was free a moment ago (the kernel's pick).
fn resolve_port(addr: SocketAddr) -> SocketAddr {
    let mut at = addr;
    if at.port() == 0 {
        at.set_port(TcpListener::bind(at).unwrap().local_addr().unwrap().port());
    }
    at
}

/// A TCP listener at `addr` (with `SO_REUSEPORT` or not), non-blocking.
///
/// Port 0 is resolved first and bound by number, as sockvisor does: a socket whose port the
/// kernel picked is not port-locked, and a requeue (shutdown + listen) would release it. As
/// sockvisor does too, `SO_REUSEPORT` comes after `listen`: set before the bind, another
/// test's listener that resolved the same free port in the meantime could join this group.
/// A port taken between the probe and the listen is tried again with a new one.
fn tcp_listener(addr: SocketAddr, reuseport: bool) -> TcpListener {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    for _ in 0..16 {
        let s = stream_socket(family);
        if addr.is_ipv6() {
            setsockopt(&s, sockopt::Ipv6V6Only, &false).unwrap();
        }
        let at = resolve_port(addr);
        let listening = bind(s.as_raw_fd(), &SockaddrStorage::from(at))
            .and_then(|()| listen(&s, Backlog::new(128).unwrap()));
        match listening {
            Err(Errno::EADDRINUSE) if addr.port() == 0 => continue,
            r => r.unwrap(),
        }
        if reuseport {
            setsockopt(&s, sockopt::ReusePort, &true).unwrap();
        }
        let l = TcpListener::from(s);
        l.set_nonblocking(true).unwrap();
        return l;
    }
    panic!("no free port for {addr} in 16 tries");
}

/// What systemd binds for `ReusePort=yes`: `SO_REUSEPORT` before the bind, so the listener is
/// a group of one from its `listen`. The port is resolved first as in [`tcp_listener`]; the
/// test that uses this carries no traffic, so a test that resolved the same port meanwhile
/// and joined would not change what it checks.
fn listener_reuseport_before_bind(addr: SocketAddr) -> TcpListener {
    let s = stream_socket(AddressFamily::Inet);
    setsockopt(&s, sockopt::ReusePort, &true).unwrap();
    let at = resolve_port(addr);
    bind(s.as_raw_fd(), &SockaddrStorage::from(at)).unwrap();
    listen(&s, Backlog::new(128).unwrap()).unwrap();
    TcpListener::from(s)
}

fn sibling(anchor: &impl AsFd) -> TcpListener {
    let l = TcpListener::from(listener::sibling(anchor.as_fd(), 128).unwrap());
    l.set_nonblocking(true).unwrap();
    l
}

fn loopback(l: &TcpListener) -> SocketAddr {
    let a = l.local_addr().unwrap();
    if a.ip().is_unspecified() {
        format!("127.0.0.1:{}", a.port()).parse().unwrap()
    } else {
        a
    }
}

/// Close without TIME_WAIT (RST), so tens of thousands of test connections leave nothing.
fn close_hard(s: TcpStream) {
    let _ = setsockopt(
        &s,
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

fn set_int_option(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: i32) {
    // SAFETY: a live fd for the borrow; the value is a c_int on the stack with its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// Wait for any of `listeners` to have a connection and accept it: (index, stream).
fn accept_one(listeners: &[&TcpListener]) -> Option<(usize, TcpStream)> {
    let deadline = Instant::now() + T;
    while Instant::now() < deadline {
        let mut fds: Vec<PollFd> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) == 0 {
            continue;
        }
        let ready: Vec<usize> = fds
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| i)
            .collect();
        for i in ready {
            if let Ok((s, _)) = listeners[i].accept() {
                return Some((i, s));
            }
        }
    }
    None
}

/// `n` sequential connections to `addr`; which listener accepted each one.
fn place_sequential(addr: SocketAddr, listeners: &[&TcpListener], n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| {
            let c = TcpStream::connect(addr).unwrap();
            let (i, s) = accept_one(listeners).expect("a listener got the connection");
            close_hard(c);
            drop(s);
            i
        })
        .collect()
}

fn histogram(placed: &[usize], n: usize) -> Vec<usize> {
    let mut h = vec![0; n];
    for &i in placed {
        h[i] += 1;
    }
    h
}

/// Accept from `listeners` until `expected` connections (or the safety timeout), answering
/// each with one byte `k`; per-listener counts.
fn accept_and_answer(listeners: &[&TcpListener], expected: usize) -> Vec<usize> {
    let mut counts = vec![0; listeners.len()];
    let mut served = Vec::new();
    while counts.iter().sum::<usize>() < expected {
        match accept_one(listeners) {
            Some((i, mut s)) => {
                s.set_nonblocking(false).unwrap();
                let _ = s.write_all(b"k");
                counts[i] += 1;
                served.push(s);
            }
            None => break,
        }
    }
    counts
}

/// Wait for every client's answer byte: (answered, reset or closed).
fn client_outcomes(clients: &mut [TcpStream]) -> (usize, usize) {
    let (mut ok, mut failed) = (0, 0);
    for c in clients.iter_mut() {
        c.set_read_timeout(Some(T)).unwrap();
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(1) if b[0] == b'k' => ok += 1,
            _ => failed += 1,
        }
    }
    (ok, failed)
}

/// Wait until `listener` has `n` connections queued.
fn wait_queued(listener: &impl AsFd, n: u32) -> u32 {
    let deadline = Instant::now() + T;
    loop {
        let q = listener::queue_depth(listener.as_fd()).unwrap().queued;
        if q >= n || Instant::now() > deadline {
            return q;
        }
        std::thread::yield_now();
    }
}

/// Connections from `clients` that the server side holds in `SYN_RECV` on `port`. Only these
/// clients' own (a listener that had the same port number in an earlier test may have left
/// request sockets behind until their timer ends), each once: /proc/net/tcp is read in
/// chunks, and a table that changes between two reads can show an entry twice.
fn syn_recv_count(port: u16, clients: &[TcpStream]) -> usize {
    let local = format!(":{port:04X}");
    let remotes: Vec<String> = clients
        .iter()
        .map(|c| format!(":{:04X}", c.local_addr().unwrap().port()))
        .collect();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_string).collect::<Vec<_>>())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 3
                && f[1].ends_with(&local)
                && remotes.iter().any(|r| f[2].ends_with(r.as_str()))
                && f[3] == "03")
                .then(|| (f[1].to_string(), f[2].to_string()))
        })
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// An anchor (SO_REUSEPORT) and `n` worker listeners beside it, all in the sockarray
/// (anchor at key 0, workers at 1..=n), the program attached on the anchor, all ready.
struct Fleet {
    anchor: TcpListener,
    workers: Vec<TcpListener>,
    group: SteeredGroup,
    addr: SocketAddr,
}

impl Fleet {
    fn new(n: usize, attach: AttachType) -> Fleet {
        let anchor = tcp_listener("127.0.0.1:0".parse().unwrap(), true);
        let workers: Vec<TcpListener> = (0..n).map(|_| sibling(&anchor)).collect();
        let mut group = SteeredGroup::new(CAPACITY, attach).unwrap();
        group.insert(Key::ANCHOR, anchor.as_fd()).unwrap();
        for (i, w) in workers.iter().enumerate() {
            group.insert(key(i + 1), w.as_fd()).unwrap();
        }
        group.attach(anchor.as_fd()).unwrap();
        group.set_ready(&keys(1..=n)).unwrap();
        let addr = loopback(&anchor);
        Fleet {
            anchor,
            workers,
            group,
            addr,
        }
    }

    /// Worker listeners then the anchor (index n).
    fn all(&self) -> Vec<&TcpListener> {
        self.workers.iter().chain([&self.anchor]).collect()
    }
}

fn key(n: usize) -> Key {
    Key::worker(n as u32).unwrap()
}

fn keys(r: std::ops::RangeInclusive<usize>) -> Vec<Key> {
    r.map(key).collect()
}

// ---- 1. exact round robin ----------------------------------------------------------------

#[test]
fn round_robin_is_exact_over_2_and_4_listeners() {
    if !gate("round_robin_is_exact_over_2_and_4_listeners") {
        return;
    }
    for n in [2usize, 4] {
        let f = Fleet::new(n, AttachType::SelectOrMigrate);
        let placed = place_sequential(f.addr, &f.all(), 10_000);
        let h = histogram(&placed, n + 1);
        // Runs of the program beyond one per connection (seen once in 50 parallel runs of
        // the suite under heavy load: the kernel ran it twice for one SYN). Each shifts the
        // rotation by one turn from that connection on.
        let extra = f.group.turns().unwrap() - 10_000;
        eprintln!(
            "MEASURE rr n={n} 10000 sequential: workers={:?} anchor={} extra turns {extra}",
            &h[..n],
            h[n]
        );
        assert!(extra <= 10, "{extra} extra turns");
        assert_eq!(
            h[n], 0,
            "the anchor is never chosen while workers are ready"
        );
        let dispatched: Vec<u64> = (1..=n)
            .map(|i| f.group.counters(key(i)).unwrap().dispatched)
            .collect();
        assert_eq!(dispatched.iter().sum::<u64>(), 10_000 + extra);
        if extra == 0 {
            assert!(h[..n].iter().all(|&c| c == 10_000 / n), "{h:?}");
            // Strict rotation: 0, 1, .., n-1, 0, 1, ..
            assert!(placed.iter().enumerate().all(|(i, &w)| w == i % n));
            assert!(dispatched.iter().all(|&d| d == (10_000 / n) as u64));
        } else {
            assert!(
                h[..n]
                    .iter()
                    .all(|&c| c.abs_diff(10_000 / n) as u64 <= extra),
                "{h:?}"
            );
        }
        assert_eq!(f.group.unselected().unwrap(), 0);
    }
}

#[test]
fn round_robin_covers_only_the_ready_subset() {
    if !gate("round_robin_covers_only_the_ready_subset") {
        return;
    }
    let mut f = Fleet::new(4, AttachType::SelectOrMigrate);
    // Worker 3 (key 3) leaves the ready set.
    f.group.set_ready(&[key(1), key(2), key(4)]).unwrap();
    let h = histogram(&place_sequential(f.addr, &f.all(), 9_999), 5);
    eprintln!("MEASURE rr ready={{1,2,4}} 9999 sequential: {h:?} (last = anchor)");
    assert_eq!(h, vec![3_333, 3_333, 0, 3_333, 0]);
    // Back in: exact again over four.
    f.group.set_ready(&keys(1..=4)).unwrap();
    let h = histogram(&place_sequential(f.addr, &f.all(), 10_000), 5);
    eprintln!("MEASURE rr ready={{1,2,3,4}} again 10000 sequential: {h:?}");
    assert_eq!(h, vec![2_500, 2_500, 2_500, 2_500, 0]);
}

#[test]
fn ready_set_updates_under_load_never_fall_back_to_the_kernel_hash() {
    if !gate("ready_set_updates_under_load_never_fall_back_to_the_kernel_hash") {
        return;
    }
    let f = Fleet::new(4, AttachType::SelectOrMigrate);
    let Fleet {
        anchor,
        workers,
        mut group,
        addr,
    } = f;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let sets = [keys(1..=4), vec![key(1), key(2)], vec![key(3)], keys(2..=4)];
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                group.set_ready(&sets[flips as usize % sets.len()]).unwrap();
                flips += 1;
            }
            (group, flips)
        })
    };
    let all: Vec<&TcpListener> = workers.iter().chain([&anchor]).collect();
    let h = histogram(&place_sequential(addr, &all, 5_000), 5);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (group, flips) = flipper.join().unwrap();
    eprintln!(
        "MEASURE ready-set flips under load: {flips} flips during 5000 connections: {h:?}, \
         unselected={}",
        group.unselected().unwrap()
    );
    assert_eq!(
        h[4], 0,
        "the anchor got a connection while a worker was ready"
    );
    assert_eq!(group.unselected().unwrap(), 0);
}

#[test]
fn weighted_round_robin_gives_exact_shares() {
    if !gate("weighted_round_robin_gives_exact_shares") {
        return;
    }
    let mut f = Fleet::new(2, AttachType::SelectOrMigrate);
    f.group.set_weighted(&[(key(1), 3), (key(2), 1)]).unwrap();
    let placed = place_sequential(f.addr, &f.all(), 4_000);
    let h = histogram(&placed, 3);
    eprintln!(
        "MEASURE weighted 3:1, 4000 sequential: {h:?}, first 8 {:?}",
        &placed[..8]
    );
    assert_eq!(h, vec![3_000, 1_000, 0]);
}

/// A client socket bound to a loopback port of the kernel's choosing, not yet connected:
/// (socket, its port). A health checker pins the port, then connects.
fn bound_client() -> (TcpStream, u16) {
    let s = stream_socket(AddressFamily::Inet);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    bind(s.as_raw_fd(), &SockaddrStorage::from(any)).unwrap();
    let c = TcpStream::from(s);
    let port = c.local_addr().unwrap().port();
    (c, port)
}

#[test]
fn a_probe_reaches_the_pinned_worker_only() {
    if !gate("a_probe_reaches_the_pinned_worker_only") {
        return;
    }
    let mut f = Fleet::new(3, AttachType::SelectOrMigrate);
    f.group.set_ready(&[key(1), key(2)]).unwrap(); // worker 3 is not ready
    let mut landed = Vec::new();
    for _ in 0..10 {
        let (c, port) = bound_client();
        f.group.pin_probe(port, key(3)).unwrap();
        nix::sys::socket::connect(c.as_raw_fd(), &SockaddrStorage::from(f.addr)).unwrap();
        let (i, _s) = accept_one(&f.all()).unwrap();
        landed.push(i);
        f.group.unpin_probe(port).unwrap();
        close_hard(c);
    }
    // A probe for a member without a listener is refused, not served by another worker.
    let (c, port) = bound_client();
    f.group.pin_probe(port, key(7)).unwrap();
    let missing = nix::sys::socket::connect(c.as_raw_fd(), &SockaddrStorage::from(f.addr));
    let h = histogram(&place_sequential(f.addr, &f.all(), 100), 4);
    eprintln!(
        "MEASURE probes pinned to unready worker 3: landed on {landed:?}; probe to an empty \
         member: {missing:?}; 100 ordinary connections meanwhile: {h:?}"
    );
    assert!(landed.iter().all(|&i| i == 2));
    assert_eq!(missing, Err(nix::errno::Errno::ECONNREFUSED));
    assert_eq!(h, vec![50, 50, 0, 0]);
}

// ---- 2. migration ------------------------------------------------------------------------

/// 10 connections queued per worker (4 workers), worker 2's listener closed: how many of the
/// 40 clients are served.
fn close_one_with_queued(attach: AttachType) -> (Vec<usize>, usize, usize) {
    let mut f = Fleet::new(4, attach);
    let mut clients: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(f.addr).unwrap())
        .collect();
    for w in &f.workers {
        assert_eq!(wait_queued(w, 10), 10);
    }
    let victim = f.workers.remove(1);
    f.group.set_ready(&[key(1), key(3), key(4)]).unwrap();
    // Our only fd: the listener closes, once a child that another test forks meanwhile has
    // exec'd (it holds a copy of every fd until then).
    drop(victim);
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.group.cookie(key(2)).unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "the kernel did not empty its slot"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let survivors: Vec<&TcpListener> = f.workers.iter().collect();
    let counts = accept_and_answer(&survivors, 40);
    let (ok, failed) = client_outcomes(&mut clients);
    (counts, ok, failed)
}

#[test]
fn a_closing_listener_s_queue_moves_only_with_select_or_migrate() {
    if !gate("a_closing_listener_s_queue_moves_only_with_select_or_migrate") {
        return;
    }
    let (counts, ok, failed) = close_one_with_queued(AttachType::SelectOrMigrate);
    eprintln!(
        "MEASURE migrate queued, SELECT_OR_MIGRATE: 40 queued (10 each), one closed: \
         accepted by the others {counts:?}, clients answered {ok}, reset {failed}"
    );
    assert_eq!((ok, failed), (40, 0));
    let (counts, ok, failed) = close_one_with_queued(AttachType::Select);
    eprintln!(
        "MEASURE migrate queued, SELECT: 40 queued (10 each), one closed: accepted by the \
         others {counts:?}, clients answered {ok}, reset {failed}"
    );
    assert_eq!((ok, failed), (30, 10));
}

/// 10 half-open connections (TCP_DEFER_ACCEPT holds them in SYN_RECV until data) on one
/// listener, which closes; then the clients send: how many are served elsewhere.
fn close_one_with_half_open(attach: AttachType) -> (usize, Vec<usize>, usize, usize) {
    let mut f = Fleet::new(3, attach);
    let victim = f.workers.remove(0);
    set_int_option(
        victim.as_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_DEFER_ACCEPT,
        30,
    );
    f.group.set_ready(&[key(1)]).unwrap(); // every new connection to the victim
    let mut clients: Vec<TcpStream> = (0..10)
        .map(|_| TcpStream::connect(f.addr).unwrap())
        .collect();
    let half_open = syn_recv_count(f.addr.port(), &clients);
    assert_eq!(listener::queue_depth(victim.as_fd()).unwrap().queued, 0);
    f.group.set_ready(&[key(2), key(3)]).unwrap();
    drop(victim);
    for c in clients.iter_mut() {
        let _ = c.write_all(b"hello");
    }
    let survivors: Vec<&TcpListener> = f.workers.iter().collect();
    let counts = accept_and_answer(&survivors, 10);
    let (ok, failed) = client_outcomes(&mut clients);
    (half_open, counts, ok, failed)
}

#[test]
fn a_scheduled_member_whose_listener_closed_is_skipped() {
    if !gate("a_scheduled_member_whose_listener_closed_is_skipped") {
        return;
    }
    // Worker 2 dies; the schedule still lists it (sockvisor has not reaped it yet).
    let mut f = Fleet::new(4, AttachType::SelectOrMigrate);
    drop(f.workers.remove(1));
    let listeners: Vec<&TcpListener> = f.workers.iter().chain([&f.anchor]).collect();
    let h = histogram(&place_sequential(f.addr, &listeners, 10_000), 4);
    // A SYN the kernel ran the program for more than once (a retransmission, under heavy
    // load) takes more than one turn: each such run may shift one connection to a neighbour.
    let extra = f.group.turns().unwrap() - 10_000;
    eprintln!(
        "MEASURE schedule [1,2,3,4] with 2's listener closed, 10000 sequential: workers 1,3,4 \
         {:?}, anchor {}, unselected {}, turns beyond one per connection {extra}",
        &h[..3],
        h[3],
        f.group.unselected().unwrap()
    );
    // Its turns fall to the next in the schedule until the schedule is updated.
    let expected = [2_500, 5_000, 2_500, 0];
    assert!(extra <= 10, "{extra} extra turns over 10000 connections");
    assert!(
        h.iter()
            .zip(expected)
            .all(|(&got, want)| got.abs_diff(want) as u64 <= extra),
        "{h:?}, expected {expected:?} (exactly, give or take the {extra} extra turns)"
    );
}

#[test]
fn half_open_connections_of_a_closed_listener_complete_elsewhere_with_migrate() {
    if !gate("half_open_connections_of_a_closed_listener_complete_elsewhere_with_migrate") {
        return;
    }
    let (half_open, counts, ok, failed) = close_one_with_half_open(AttachType::SelectOrMigrate);
    eprintln!(
        "MEASURE migrate half-open, SELECT_OR_MIGRATE: {half_open} in SYN_RECV, listener \
         closed, clients send: accepted {counts:?}, answered {ok}, reset {failed}"
    );
    assert_eq!(half_open, 10);
    assert_eq!((ok, failed), (10, 0));
    let (half_open, counts, ok, failed) = close_one_with_half_open(AttachType::Select);
    eprintln!(
        "MEASURE migrate half-open, SELECT: {half_open} in SYN_RECV, listener closed, \
         clients send: accepted {counts:?}, answered {ok}, reset {failed}"
    );
    assert_eq!((ok, failed), (0, 10));
}

#[test]
fn requeue_moves_a_live_listener_s_queue_and_keeps_the_listener() {
    if !gate("requeue_moves_a_live_listener_s_queue_and_keeps_the_listener") {
        return;
    }
    // A wedged worker: its listener has a queue nobody accepts; sockvisor holds a copy.
    let mut f = Fleet::new(3, AttachType::SelectOrMigrate);
    f.group.set_ready(&[key(1)]).unwrap();
    let mut clients: Vec<TcpStream> = (0..12)
        .map(|_| TcpStream::connect(f.addr).unwrap())
        .collect();
    assert_eq!(wait_queued(&f.workers[0], 12), 12);
    f.group.set_ready(&[key(2), key(3)]).unwrap();
    f.group.requeue(key(1), f.workers[0].as_fd(), 128).unwrap();
    let moved = [&f.workers[1], &f.workers[2]];
    let counts = accept_and_answer(&moved, 12);
    let (ok, failed) = client_outcomes(&mut clients);
    let still = listener::is_listening(f.workers[0].as_fd()).unwrap();
    let back = f.group.cookie(key(1)).unwrap().is_some();
    eprintln!(
        "MEASURE requeue of a live listener with 12 queued: moved {counts:?}, answered {ok}, \
         reset {failed}; listening again={still}, back in the sockarray={back}, migrated \
         counters {} / {}",
        f.group.counters(key(2)).unwrap().migrated,
        f.group.counters(key(3)).unwrap().migrated
    );
    assert_eq!((ok, failed), (12, 0));
    assert!(still && back);
    // It takes connections again once scheduled.
    f.group.set_ready(&[key(1)]).unwrap();
    let h = histogram(&place_sequential(f.addr, &f.all(), 3), 4);
    assert_eq!(h[0], 3);
}

// ---- 3. the anchor -----------------------------------------------------------------------

#[test]
fn anchor_with_reuseport_holds_connections_while_nobody_is_ready_then_requeues() {
    if !gate("anchor_with_reuseport_holds_connections_while_nobody_is_ready_then_requeues") {
        return;
    }
    // Alone (before any worker listener): already a group of one, so it can go in the
    // sockarray and take the program at once.
    let lone = listener_reuseport_before_bind("127.0.0.1:0".parse().unwrap());
    let g = SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).unwrap();
    let lone_insert = g.insert(Key::ANCHOR, lone.as_fd()).map_err(|e| e.errno);
    let lone_attach = g.attach(lone.as_fd()).map_err(|e| e.raw_os_error());
    eprintln!(
        "MEASURE anchor(ReusePort=yes) alone: insert {lone_insert:?}, attach {lone_attach:?}"
    );
    assert!(lone_insert.is_ok() && lone_attach.is_ok());

    let mut f = Fleet::new(2, AttachType::SelectOrMigrate);
    let h = histogram(&place_sequential(f.addr, &f.all(), 1_000), 3);
    eprintln!("MEASURE anchor(ReusePort=yes) in sockarray, 2 ready: {h:?} (last = anchor)");
    assert_eq!(h[2], 0);

    // Nobody ready: connections complete their handshake and wait on the anchor.
    f.group.set_ready(&[]).unwrap();
    let mut waiting: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(f.addr).unwrap())
        .collect();
    let on_anchor = wait_queued(&f.anchor, 20);
    let refused = f.group.requeue(Key::ANCHOR, f.anchor.as_fd(), 128).is_err();

    // A worker becomes ready: requeue the anchor, its queue goes to the program's choice.
    f.group.set_ready(&[key(1), key(2)]).unwrap();
    f.group.requeue(Key::ANCHOR, f.anchor.as_fd(), 128).unwrap();
    let workers: Vec<&TcpListener> = f.workers.iter().collect();
    let counts = accept_and_answer(&workers, 20);
    let (ok, failed) = client_outcomes(&mut waiting);
    eprintln!(
        "MEASURE anchor holds while nobody ready: {on_anchor} queued on the anchor \
         (requeue with nobody ready refused={refused}); after ready + requeue: {counts:?}, \
         answered {ok}, reset {failed}"
    );
    assert_eq!(on_anchor, 20);
    assert!(refused);
    assert_eq!((ok, failed), (20, 0));
    assert_eq!(f.group.counters(Key::ANCHOR).unwrap().dispatched, 20);
}

#[test]
fn requeueing_the_anchor_never_closes_the_port() {
    if !gate("requeueing_the_anchor_never_closes_the_port") {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
    use std::sync::Arc;
    let f = Fleet::new(2, AttachType::SelectOrMigrate);
    let addr = f.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicU32::new(0));
    let client = {
        let (stop, attempts) = (stop.clone(), attempts.clone());
        std::thread::spawn(move || {
            let mut refused = 0u32;
            while !stop.load(Relaxed) {
                match TcpStream::connect(addr) {
                    Ok(c) => close_hard(c),
                    Err(_) => refused += 1,
                }
                attempts.fetch_add(1, Relaxed);
            }
            refused
        })
    };
    // Requeue the anchor over and over until the client made 5,000 attempts, draining the
    // workers' queues meanwhile.
    let workers: Vec<&TcpListener> = f.workers.iter().collect();
    let mut requeues = 0u32;
    let start = Instant::now();
    while attempts.load(Relaxed) < 5_000 && start.elapsed() < T * 3 {
        f.group.requeue(Key::ANCHOR, f.anchor.as_fd(), 128).unwrap();
        requeues += 1;
        for w in &workers {
            while w.accept().is_ok() {}
        }
    }
    stop.store(true, Relaxed);
    let refused = client.join().unwrap();
    eprintln!(
        "MEASURE {requeues} anchor requeues (shutdown+listen) during {} connects: {refused} \
         refused",
        attempts.load(Relaxed)
    );
    assert_eq!(refused, 0);
}

/// An anchor bound and listening without SO_REUSEPORT (systemd's default), set afterwards;
/// two siblings; the program attached. Returns what happened at each step.
fn late_reuseport_anchor(bind_addr: &str, connect_to: &[&str]) {
    let anchor = tcp_listener(bind_addr.parse().unwrap(), false);
    let port = anchor.local_addr().unwrap().port();
    let mut group = SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).unwrap();
    let before = group.insert(Key::ANCHOR, anchor.as_fd());
    let sibling_before = listener::sibling(anchor.as_fd(), 128).map(drop);
    listener::enable_reuseport(anchor.as_fd()).unwrap();
    let alone = group.insert(Key::ANCHOR, anchor.as_fd());
    let attach_alone = group.attach(anchor.as_fd());
    let workers = [sibling(&anchor), sibling(&anchor)];
    // Before any program: the kernel's hash over the group (the startup window).
    let all = [&workers[0], &workers[1], &anchor];
    let first: SocketAddr = format!("{}:{port}", connect_to[0]).parse().unwrap();
    let unsteered = histogram(&place_sequential(first, &all, 300), 3);
    eprintln!(
        "MEASURE late-reuseport anchor {bind_addr}, no program yet, 300 to {first}: \
         {unsteered:?} (last = anchor)"
    );
    let after = group.insert(Key::ANCHOR, anchor.as_fd());
    for (i, w) in workers.iter().enumerate() {
        group.insert(key(i + 1), w.as_fd()).unwrap();
    }
    group.attach(workers[0].as_fd()).unwrap();
    group.set_ready(&keys(1..=2)).unwrap();
    eprintln!(
        "MEASURE late-reuseport anchor {bind_addr}: sockarray insert before SO_REUSEPORT: {:?}; \
         sibling bind before SO_REUSEPORT: {:?}; insert after SO_REUSEPORT but alone: {:?}; \
         attach on it alone: {:?}; insert once siblings listen: {:?}",
        before.map_err(|e| e.errno),
        sibling_before.map_err(|e| e.raw_os_error()),
        alone.map_err(|e| e.errno),
        attach_alone.map_err(|e| e.raw_os_error()),
        after.as_ref().map_err(|e| e.errno),
    );
    assert!(after.is_ok());
    for target in connect_to {
        let addr: SocketAddr = format!("{target}:{port}").parse().unwrap();
        let h = histogram(&place_sequential(addr, &all, 1_000), 3);
        eprintln!(
            "MEASURE late-reuseport anchor {bind_addr}, connect {addr}: {h:?} (last = anchor)"
        );
        assert_eq!(h, vec![500, 500, 0]);
    }
    // Nobody ready: the anchor holds; then requeue moves them.
    group.set_ready(&[]).unwrap();
    let addr: SocketAddr = format!("{}:{port}", connect_to[0]).parse().unwrap();
    let mut waiting: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let held = wait_queued(&anchor, 10);
    group.set_ready(&keys(1..=2)).unwrap();
    let requeued = group.requeue(Key::ANCHOR, anchor.as_fd(), 128);
    let counts = accept_and_answer(&[&workers[0], &workers[1]], 10);
    let (ok, failed) = client_outcomes(&mut waiting);
    eprintln!(
        "MEASURE late-reuseport anchor {bind_addr}: nobody ready: {held} held on the anchor; \
         requeue {:?}: {counts:?}, answered {ok}, reset {failed}",
        requeued.as_ref().map_err(|e| e.to_string())
    );
    assert_eq!((held, ok, failed), (10, 10, 0));
}

#[test]
fn anchor_without_reuseport_ipv4() {
    if !gate("anchor_without_reuseport_ipv4") {
        return;
    }
    late_reuseport_anchor("127.0.0.1:0", &["127.0.0.1"]);
}

#[test]
fn anchor_without_reuseport_ipv6_dual_stack() {
    if !gate("anchor_without_reuseport_ipv6_dual_stack") {
        return;
    }
    if TcpListener::bind("[::1]:0").is_err() {
        assert!(!require_all(), "no IPv6 loopback");
        eprintln!("anchor_without_reuseport_ipv6_dual_stack: skipped: no IPv6 loopback");
        return;
    }
    // What `ListenStream=8000` binds: [::] with IPV6_V6ONLY=0, reached over IPv6 and IPv4.
    late_reuseport_anchor("[::]:0", &["[::1]", "127.0.0.1"]);
}

#[test]
fn a_sibling_of_another_uid_is_refused() {
    if !gate("a_sibling_of_another_uid_is_refused") {
        return;
    }
    let anchor = tcp_listener("127.0.0.1:0".parse().unwrap(), true);
    let port = anchor.local_addr().unwrap().port();
    let out = run_child(
        "sibling",
        &["--reuid=65534", "--regid=65534", "--clear-groups"],
        &[("SOCKVISOR_REUSEPORT_PORT", port.to_string())],
    );
    eprintln!("MEASURE sibling bind as uid 65534 beside root's anchor: {out:?}");
    assert_eq!(out.get("bind").map(String::as_str), Some("98")); // EADDRINUSE
}

/// Socket activation: the connection that started the service waits in the anchor's queue,
/// taken before the anchor had `SO_REUSEPORT` (systemd binds without it). That connection
/// holds the port without `SO_REUSEPORT`, so a sibling's bind is refused unless both have
/// `SO_REUSEADDR`, which systemd sets on every listening socket: `sibling` copies it.
#[test]
fn a_sibling_binds_beside_a_connection_taken_before_reuseport() {
    if !gate("a_sibling_binds_beside_a_connection_taken_before_reuseport") {
        return;
    }
    for reuseaddr in [true, false] {
        let s = stream_socket(AddressFamily::Inet);
        setsockopt(&s, sockopt::ReuseAddr, &reuseaddr).unwrap();
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        bind(s.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
        listen(&s, Backlog::new(128).unwrap()).unwrap();
        let anchor = TcpListener::from(s);
        let _client = TcpStream::connect(anchor.local_addr().unwrap()).unwrap();
        let mut fds = [PollFd::new(anchor.as_fd(), PollFlags::POLLIN)];
        let ready = poll(
            &mut fds,
            PollTimeout::try_from(T.as_millis() as i32).unwrap(),
        )
        .unwrap();
        assert_eq!(ready, 1, "the connection waits in the anchor's queue");
        listener::enable_reuseport(anchor.as_fd()).unwrap();
        let r = listener::sibling(anchor.as_fd(), 128);
        eprintln!(
            "MEASURE sibling bind beside a connection queued before SO_REUSEPORT, anchor \
             SO_REUSEADDR={reuseaddr}: {:?}",
            r.as_ref().map(|_| "ok").map_err(|e| e.raw_os_error())
        );
        if reuseaddr {
            r.expect("binds beside it");
        } else {
            assert_eq!(
                r.err().and_then(|e| e.raw_os_error()),
                Some(libc::EADDRINUSE)
            );
        }
    }
}

// ---- 4. what the kernel does with each answer, and a dead holder -------------------------

#[test]
fn kernel_answers_pass_without_selection_drop_and_empty_slot() {
    if !gate("kernel_answers_pass_without_selection_drop_and_empty_slot") {
        return;
    }
    let f = Fleet::new(4, AttachType::Select);
    // Key 5 is an empty slot of the fleet's sockarray.
    let empty_slot = kernel_probe::select_key_then_pass(f.group.sockets_map_fd(), 5);
    let cases: [(&str, Vec<super::insn::Insn>); 3] = [
        (
            "SK_PASS without selection",
            kernel_probe::pass_without_selection(),
        ),
        ("SK_DROP", kernel_probe::drop_everything()),
        ("select an empty slot, then SK_PASS", empty_slot),
    ];
    for (name, insns) in cases {
        let p = Program::load_sk_reuseport(&insns, AttachType::Select, "sv_probe").unwrap();
        bpf::attach_reuseport_program(f.anchor.as_fd(), &p).unwrap();
        let (mut placed, mut refused) = (Vec::new(), 0);
        for _ in 0..400 {
            match TcpStream::connect(f.addr) {
                Ok(c) => {
                    let (i, _s) = accept_one(&f.all()).expect("placed somewhere");
                    placed.push(i);
                    close_hard(c);
                }
                Err(e) => {
                    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
                    refused += 1;
                }
            }
        }
        let h = histogram(&placed, 5);
        eprintln!(
            "MEASURE program answers {name}: 400 connections: placed {h:?} (last = anchor), \
             refused {refused}"
        );
        match name {
            "SK_DROP" => assert_eq!(refused, 400),
            _ => {
                assert_eq!(refused, 0);
                assert!(
                    h.iter().filter(|&&c| c > 0).count() >= 4,
                    "kernel hash spreads: {h:?}"
                );
            }
        }
    }
}

#[test]
fn a_socket_with_a_program_attached_before_listen_cannot_join_a_group() {
    if !gate("a_socket_with_a_program_attached_before_listen_cannot_join_a_group") {
        return;
    }
    // An existing group (an anchor); a new socket bound beside it gets a program attached
    // before listen(), which gives it a provisional group of its own.
    let anchor = tcp_listener("127.0.0.1:0".parse().unwrap(), true);
    let addr = loopback(&anchor);
    let s = stream_socket(AddressFamily::Inet);
    setsockopt(&s, sockopt::ReusePort, &true).unwrap();
    bind(s.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    let refuse = Program::load_sk_reuseport(
        &kernel_probe::drop_everything(),
        AttachType::Select,
        "sv_drop",
    )
    .unwrap();
    bpf::attach_reuseport_program(s.as_fd(), &refuse).unwrap();
    let listened = listen(&s, Backlog::new(128).unwrap());
    eprintln!(
        "MEASURE program attached before listen() beside an existing group: listen {listened:?}"
    );
    assert_eq!(listened, Err(nix::errno::Errno::EADDRINUSE));
}

#[test]
fn a_rejected_program_comes_back_with_the_verifier_log() {
    if !gate("a_rejected_program_comes_back_with_the_verifier_log") {
        return;
    }
    // `exit` with R0 never written: the verifier refuses it.
    let e = Program::load_sk_reuseport(&[super::insn::exit()], AttachType::Select, "sv_bad")
        .unwrap_err();
    eprintln!("MEASURE rejected program: {e}");
    assert_eq!(e.errno, libc::EACCES);
    assert!(
        e.verifier_log.as_deref().unwrap_or("").contains("R0"),
        "{e}"
    );
}

#[test]
fn a_sigkilled_holder_leaves_the_program_and_the_anchor_keeps_every_connection() {
    if !gate("a_sigkilled_holder_leaves_the_program_and_the_anchor_keeps_every_connection") {
        return;
    }
    // The parent plays systemd (it holds only the anchor), then the restarted sockvisor.
    let anchor = tcp_listener("127.0.0.1:0".parse().unwrap(), true);
    let addr = loopback(&anchor);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("anchor.sock");
    let passing = UnixListener::bind(&path).unwrap();
    let mut child = spawn_child(
        "holder",
        &[],
        &[("SOCKVISOR_REUSEPORT_SOCK", path.display().to_string())],
    );
    let (conn, _) = passing.accept().unwrap();
    crate::dispatch::sys::send(conn.as_fd(), b"a", Some(anchor.as_fd()), 0).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("RESULT"));
    assert_eq!(ready.as_deref(), Some("RESULT ready"));

    // 20 connections, queued on the holder's two worker listeners (nobody accepts).
    let mut clients: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let on_anchor_before = listener::queue_depth(anchor.as_fd()).unwrap().queued;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let on_anchor_after = wait_queued(&anchor, 20);

    // A new listener the old maps do not know: with the old program still attached it gets
    // nothing (the program sends everything to the anchor); with no program it would get
    // about half (the kernel's hash).
    let newcomer = sibling(&anchor);
    let mut more: Vec<TcpStream> = (0..10).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let on_anchor_then = wait_queued(&anchor, 30);
    let newcomer_got = listener::queue_depth(newcomer.as_fd()).unwrap().queued;

    // The restarted sockvisor: a new group, a second worker, the new program attached on the
    // anchor (a socket it did not create), then requeue the anchor.
    let second = sibling(&anchor);
    // The anchor is still in the old instance's sockarray (kept alive by the old program),
    // and a socket can be in one sockarray only: EBUSY. Requeueing it (shutdown detaches it
    // from every sockarray) after attaching the new program moves it over.
    let mut group = SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).unwrap();
    let anchor_insert_first = group
        .insert(Key::ANCHOR, anchor.as_fd())
        .map_err(|e| e.errno);
    group.insert(key(1), newcomer.as_fd()).unwrap();
    group.insert(key(2), second.as_fd()).unwrap();
    group.attach(anchor.as_fd()).unwrap();
    group.set_ready(&keys(1..=2)).unwrap();
    let anchor_insert_after_attach = group
        .insert(Key::ANCHOR, anchor.as_fd())
        .map_err(|e| e.errno);
    // The replaced program and its maps are freed after an RCU grace period: the anchor is
    // released from the old sockarray by itself, eventually.
    let waited = Instant::now();
    let mut released = None;
    while waited.elapsed() < Duration::from_secs(3) {
        if group.insert(Key::ANCHOR, anchor.as_fd()).is_ok() {
            released = Some(waited.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(1)); // no readiness signal for an RCU free
    }
    group.requeue(Key::ANCHOR, anchor.as_fd(), 128).unwrap();
    let counts = accept_and_answer(&[&newcomer, &second], 30);
    clients.append(&mut more);
    let (ok, failed) = client_outcomes(&mut clients);
    let h = histogram(
        &place_sequential(addr, &[&newcomer, &second, &anchor], 100),
        3,
    );
    eprintln!(
        "MEASURE holder SIGKILL: anchor insert into the new sockarray before attach: \
         {anchor_insert_first:?}, right after the new attach: {anchor_insert_after_attach:?}, \
         released by the old map after {released:?}; after requeue: ok"
    );
    eprintln!(
        "MEASURE holder SIGKILL: 20 queued on its 2 listeners (anchor had {on_anchor_before}); \
         after SIGKILL the anchor holds {on_anchor_after}; 10 more with the old program still \
         attached: anchor {on_anchor_then}, an unknown new sibling {newcomer_got}; new program \
         + anchor requeue: {counts:?}, answered {ok}, reset {failed}; then 100 new: {h:?}"
    );
    assert_eq!(on_anchor_before, 0);
    assert_eq!(on_anchor_after, 20);
    assert_eq!((on_anchor_then, newcomer_got), (30, 0));
    assert_eq!((ok, failed), (30, 0));
    assert_eq!(h, vec![50, 50, 0]);
}

// ---- 5. UDP by flow -----------------------------------------------------------------------

#[test]
fn udp_flows_spread_by_hash_and_stay_put() {
    if !gate("udp_flows_spread_by_hash_and_stay_put") {
        return;
    }
    let anchor = UdpSocket::from(udp_socket("127.0.0.1:0".parse().unwrap()));
    let addr = anchor.local_addr().unwrap();
    let workers: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::from(listener::sibling(anchor.as_fd(), 0).unwrap()))
        .collect();
    let mut all: Vec<&UdpSocket> = workers.iter().collect();
    all.push(&anchor);
    for s in &all {
        s.set_nonblocking(true).unwrap();
    }

    // The kernel's own hash first (no program), as the reference.
    let flows = 10_000;
    let kernel = histogram(&send_flows(addr, &all, flows), 5);

    let mut group = SteeredGroup::new(CAPACITY, AttachType::Select).unwrap();
    group.insert(Key::ANCHOR, anchor.as_fd()).unwrap();
    for (i, w) in workers.iter().enumerate() {
        group.insert(key(i + 1), w.as_fd()).unwrap();
    }
    group.attach(anchor.as_fd()).unwrap();
    group.set_ready(&keys(1..=4)).unwrap();
    let steered = histogram(&send_flows(addr, &all, flows), 5);
    let ratio = |h: &[usize]| {
        let w = &h[..4];
        *w.iter().max().unwrap() as f64 / (*w.iter().min().unwrap()).max(1) as f64
    };

    // One flow, many datagrams: one socket.
    let mut sticky = Vec::new();
    for _ in 0..20 {
        let c = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut seen = BTreeMap::new();
        for _ in 0..50 {
            c.send_to(b"x", addr).unwrap();
            *seen.entry(recv_one(&all)).or_insert(0) += 1;
        }
        sticky.push(seen.len());
    }
    eprintln!(
        "MEASURE udp {flows} flows (one datagram each) over 4 + anchor: kernel hash {kernel:?} \
         max/min {:.3}; steered {steered:?} max/min {:.3}; 20 flows x 50 datagrams: sockets \
         per flow {sticky:?}",
        ratio(&kernel[..4]),
        ratio(&steered)
    );
    assert_eq!(steered[4], 0);
    assert!(ratio(&steered) <= 1.2, "{steered:?}");
    assert!(sticky.iter().all(|&n| n == 1));
}

fn udp_socket(addr: SocketAddr) -> OwnedFd {
    let s = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    setsockopt(&s, sockopt::ReusePort, &true).unwrap();
    bind(s.as_raw_fd(), &SockaddrStorage::from(addr)).unwrap();
    s
}

/// Receive one datagram from whichever socket has it: its index.
fn recv_one(socks: &[&UdpSocket]) -> usize {
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 16];
    while Instant::now() < deadline {
        let mut fds: Vec<PollFd> = socks
            .iter()
            .map(|s| PollFd::new(s.as_fd(), PollFlags::POLLIN))
            .collect();
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
        for (i, s) in socks.iter().enumerate() {
            if s.recv(&mut buf).is_ok() {
                return i;
            }
        }
    }
    panic!("a datagram was lost");
}

/// One datagram from each of `n` fresh client sockets (a new flow each): where each landed.
fn send_flows(addr: SocketAddr, socks: &[&UdpSocket], n: usize) -> Vec<usize> {
    (0..n)
        .map(|_| {
            let c = UdpSocket::bind("127.0.0.1:0").unwrap();
            c.send_to(b"x", addr).unwrap();
            recv_one(socks)
        })
        .collect()
}

// ---- 6. capabilities -----------------------------------------------------------------------

#[test]
fn loading_needs_cap_bpf_or_cap_sys_admin() {
    if !gate("loading_needs_cap_bpf_or_cap_sys_admin") {
        return;
    }
    let mut results = Vec::new();
    for (what, drop) in [
        ("all capabilities", None),
        ("without CAP_SYS_ADMIN (CAP_BPF kept)", Some("-sys_admin")),
        ("without CAP_BPF (CAP_SYS_ADMIN kept)", Some("-bpf")),
        ("without CAP_BPF and CAP_SYS_ADMIN", Some("-bpf,-sys_admin")),
    ] {
        let bounding = drop.map(|d| format!("--bounding-set={d}"));
        let mut args = vec!["--inh-caps=-all"];
        if let Some(b) = &bounding {
            args.push(b);
        }
        let out = run_child("load", &args, &[]);
        eprintln!("MEASURE load {what}: {out:?}");
        results.push(out.get("load").cloned().unwrap_or_default());
    }
    assert_eq!(results[0], "ok");
    assert_eq!(results[1], "ok");
    assert_eq!(results[2], "ok");
    assert!(results[3].starts_with("1 "), "EPERM: {}", results[3]);
}

// ---- the child process ----------------------------------------------------------------------

fn spawn_child(role: &str, setpriv: &[&str], env: &[(&str, String)]) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("setpriv");
    cmd.args(setpriv)
        .arg("--")
        .arg(exe)
        .args([
            "--exact",
            "dispatch::reuseport::tests::child_helper",
            "--nocapture",
            "--test-threads=1",
            "--quiet",
        ])
        .env(CHILD_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("setpriv (util-linux) runs")
}

/// Run a child role to completion; its `RESULT key=value` lines.
fn run_child(role: &str, setpriv: &[&str], env: &[(&str, String)]) -> BTreeMap<String, String> {
    let child = spawn_child(role, setpriv, env);
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("RESULT "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The other process of a scenario; does nothing unless `SOCKVISOR_REUSEPORT_CHILD` is set.
#[test]
fn child_helper() {
    let Ok(role) = std::env::var(CHILD_ENV) else {
        return;
    };
    match role.as_str() {
        "load" => match SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate) {
            Ok(_) => println!("RESULT load=ok"),
            Err(e) => println!(
                "RESULT load={} {}",
                e.errno,
                e.to_string().replace('\n', " ")
            ),
        },
        "sibling" => {
            let port: u16 = std::env::var("SOCKVISOR_REUSEPORT_PORT")
                .unwrap()
                .parse()
                .unwrap();
            let s = stream_socket(AddressFamily::Inet);
            setsockopt(&s, sockopt::ReusePort, &true).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            match bind(s.as_raw_fd(), &SockaddrStorage::from(addr)) {
                Ok(()) => println!("RESULT bind=ok"),
                Err(e) => println!("RESULT bind={}", e as i32),
            }
        }
        "holder" => {
            // The old sockvisor: receives the anchor, makes two worker listeners that nobody
            // accepts on, steers them, says ready, and waits to be killed.
            let path = std::env::var("SOCKVISOR_REUSEPORT_SOCK").unwrap();
            let conn = UnixStream::connect(path).unwrap();
            let mut buf = [0u8; 1];
            let mut got = crate::dispatch::sys::recv(conn.as_fd(), &mut buf, 0).unwrap();
            let anchor = got.fds.take_first().expect("the anchor fd");
            let workers = [
                listener::sibling(anchor.as_fd(), 128).unwrap(),
                listener::sibling(anchor.as_fd(), 128).unwrap(),
            ];
            let mut group = SteeredGroup::new(CAPACITY, AttachType::SelectOrMigrate).unwrap();
            group.insert(Key::ANCHOR, anchor.as_fd()).unwrap();
            group.insert(key(1), workers[0].as_fd()).unwrap();
            group.insert(key(2), workers[1].as_fd()).unwrap();
            group.attach(anchor.as_fd()).unwrap();
            group.set_ready(&keys(1..=2)).unwrap();
            println!("RESULT ready");
            io::stdout().flush().unwrap();
            let mut rest = Vec::new();
            let _ = io::stdin().read_to_end(&mut rest); // until SIGKILL
        }
        other => panic!("unknown child role {other}"),
    }
}
