//! Chaos under load (issue 8): while client threads keep opening connections (one request
//! per connection, with timeouts), a random worker is SIGKILLed every 200 ms for 20 s,
//! others are SIGSTOPped and SIGCONTed (each continued or killed within 400 ms, far below
//! the client timeout), and the fleet is reloaded twice. Afterwards:
//!
//! * every connection got its answer, or was reset/closed only because its worker was killed
//!   while serving it: no refused connection and no timeout;
//! * sockvisor's fd count is back to its starting value, its RSS too (within `RSS_SLACK_KIB`);
//! * no zombie or orphan: sockvisor's children are exactly its current workers, and the
//!   fleet's process group holds nothing else.
//!
//! About 30 s in all (20 s of chaos are required); loopback only; the fleet's process group
//! is SIGKILLed when the test ends. The counts are printed (`--nocapture` shows them).

mod common;
use common::*;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORKERS: usize = 4;
const CLIENT_THREADS: usize = 4;
const CHAOS: Duration = Duration::from_secs(20);
const KILL_EVERY: Duration = Duration::from_millis(200);
/// A SIGSTOPped worker is continued after this long (unless it was killed first).
const STOPPED_FOR: Duration = Duration::from_millis(400);
/// Connect and read timeouts of the clients: ten times `STOPPED_FOR`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(4);
/// RSS may end this much above its starting value: the allocator keeps freed pages
/// (glibc malloc trims lazily) and a few buffers grow to their high-water mark once.
const RSS_SLACK_KIB: u64 = 1024;

#[derive(Default)]
struct Counts {
    opened: AtomicU64,
    ok: AtomicU64,
    /// ECONNRESET/EPIPE, or end of file with no answer: the worker died while serving.
    reset: AtomicU64,
    refused: AtomicU64,
    timeouts: AtomicU64,
    other: AtomicU64,
}

/// A tiny deterministic PRNG (xorshift64*), so a failing run can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn one_request(addr: SocketAddr, c: &Counts) {
    c.opened.fetch_add(1, Ordering::Relaxed);
    let result = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
        s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(String::from_utf8_lossy(&out).into_owned())
    })();
    let counter = match result {
        Ok(body) if body.contains("hello from worker") => &c.ok,
        Ok(body) if body.is_empty() => &c.reset,
        Ok(_) => &c.other,
        Err(e) => match e.kind() {
            ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
                &c.reset
            }
            ErrorKind::ConnectionRefused => &c.refused,
            ErrorKind::WouldBlock | ErrorKind::TimedOut => &c.timeouts,
            _ => {
                eprintln!("chaos client: unexpected error: {e}");
                &c.other
            }
        },
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

/// sockvisor's open fds: number -> what it points at (socket:[inode] made generic).
fn fds(pid: i32) -> std::collections::BTreeMap<i32, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(d) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for e in d.flatten() {
            let Some(n) = e.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            out.insert(n, target);
        }
    }
    out
}

/// fds, measured once no control client is connected (sockvisor closes its end of a
/// `status` request just made on its next turn).
fn settled_fds(fleet: &Fleet) -> std::collections::BTreeMap<i32, String> {
    fleet.wait_until(
        "no control client connected",
        Duration::from_secs(10),
        || (control_clients(fleet.pid(), &fleet.control) == 0).then_some(()),
    );
    fds(fleet.pid())
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// (pid, state, pgrp) of every process on the machine.
fn processes() -> Vec<(i32, char, i32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let state = f[0].chars().next().unwrap_or('?');
        let pgrp = f[2].parse().unwrap_or(0);
        out.push((pid, state, pgrp));
    }
    out
}

/// Every child of `pid`, zombies included.
fn all_children(pid: i32) -> BTreeSet<i32> {
    processes()
        .into_iter()
        .filter(|&(p, _, _)| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let (_, rest) = s.rsplit_once(") ")?;
                    rest.split_whitespace().nth(1)?.parse::<i32>().ok()
                })
                == Some(pid)
        })
        .map(|(p, _, _)| p)
        .collect()
}

fn status(control: &std::path::Path) -> Option<sockvisor::control::FleetStatus> {
    sockvisor::control::request(
        control,
        &sockvisor::control::Request::Status,
        Duration::from_secs(5),
    )
    .ok()?
    .status
}

/// The fleet is settled: `WORKERS` workers, all ready, of one generation.
fn wait_settled(fleet: &Fleet, timeout: Duration) -> sockvisor::control::FleetStatus {
    fleet.wait_until(
        &format!("{WORKERS} ready workers of one generation"),
        timeout,
        || {
            let s = status(&fleet.control)?;
            let gens: BTreeSet<u64> = s.workers.iter().map(|w| w.generation).collect();
            (s.state == "running"
                && s.workers.len() == WORKERS
                && s.workers.iter().all(|w| w.state == "ready")
                && gens.len() == 1)
                .then_some(s)
        },
    )
}

fn reload(control: &std::path::Path) -> std::process::Output {
    std::process::Command::new(sockvisor_bin())
        .args(["reload", "--control"])
        .arg(control)
        .output()
        .expect("sockvisor reload")
}

#[test]
fn chaos_kill_stop_reload_under_load() {
    let mut fleet = FleetBuilder::new([
        "--workers".to_string(),
        WORKERS.to_string(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--restart-delay".into(),
        "10ms".into(),
        "--restart-delay-max".into(),
        "100ms".into(),
        "--give-up-after".into(),
        "1000".into(),
        "--stop-timeout".into(),
        "2s".into(),
        "--".into(),
        hello_bin().display().to_string(),
    ])
    .env("SOCKVISOR_LOG", "info")
    .start();
    let sv = fleet.pid();
    let control = fleet.control.clone();
    let addr = fleet.addr("web");
    let port = addr.port();

    // Ready, then warm up (first accepts, status replies, log buffers) before the baseline.
    fleet.wait_until("a first answer", Duration::from_secs(20), || {
        http_get(port).ok()
    });
    wait_settled(&fleet, Duration::from_secs(20));
    for _ in 0..300 {
        http_get(port).expect("warm-up request");
    }
    wait_settled(&fleet, Duration::from_secs(20));
    let fds_before = settled_fds(&fleet);
    let rss_before = rss_kib(sv);

    // Load.
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENT_THREADS)
        .map(|_| {
            let (c, stop) = (counts.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    one_request(addr, &c);
                }
            })
        })
        .collect();

    // Chaos.
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x0005_eedc_4a05_u64);
    eprintln!("chaos: seed {seed} (CHAOS_SEED=... to replay)");
    let mut rng = Rng(seed);
    let start = Instant::now();
    let mut next_kill = start;
    let mut stopped: Vec<(i32, Instant)> = Vec::new();
    let (mut kills, mut stops, mut conts) = (0u64, 0u64, 0u64);
    let mut reloads: Vec<std::thread::JoinHandle<std::process::Output>> = Vec::new();
    let reload_at = [CHAOS / 3, CHAOS * 2 / 3];
    while start.elapsed() < CHAOS {
        let now = Instant::now();
        // Continue the workers stopped long enough (killed ones are simply gone).
        stopped.retain(|&(pid, at)| {
            if now.duration_since(at) >= STOPPED_FOR {
                // SAFETY: kill(2) on a pid read from sockvisor's children just before.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                conts += 1;
                false
            } else {
                true
            }
        });
        if reloads.len() < reload_at.len() && start.elapsed() >= reload_at[reloads.len()] {
            let c = control.clone();
            reloads.push(std::thread::spawn(move || reload(&c)));
        }
        if now >= next_kill {
            next_kill += KILL_EVERY;
            let workers: Vec<i32> = children(sv).into_iter().collect();
            if !workers.is_empty() {
                let victim = workers[rng.below(workers.len())];
                // SAFETY: kill(2) on a child of the sockvisor this test started.
                unsafe { libc::kill(victim, libc::SIGKILL) };
                kills += 1;
                stopped.retain(|&(p, _)| p != victim);
                // Every other tick, also stop another worker for STOPPED_FOR.
                if kills % 2 == 0 && workers.len() > 1 {
                    let other = workers[rng.below(workers.len())];
                    if other != victim && !stopped.iter().any(|&(p, _)| p == other) {
                        // SAFETY: as above.
                        unsafe { libc::kill(other, libc::SIGSTOP) };
                        stopped.push((other, Instant::now()));
                        stops += 1;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for &(pid, _) in &stopped {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        conts += 1;
    }
    // The load goes on a moment after the chaos, then stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let reload_outputs: Vec<_> = reloads.into_iter().map(|r| r.join().unwrap()).collect();

    let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let (opened, ok, reset, refused, timeouts, other) = (
        g(&counts.opened),
        g(&counts.ok),
        g(&counts.reset),
        g(&counts.refused),
        g(&counts.timeouts),
        g(&counts.other),
    );
    eprintln!(
        "chaos: {opened} connections: {ok} ok, {reset} reset, {refused} refused, \
         {timeouts} timeouts, {other} other; {kills} SIGKILL, {stops} SIGSTOP, {conts} SIGCONT, \
         {} reloads",
        reload_outputs.len()
    );
    for (i, out) in reload_outputs.iter().enumerate() {
        eprintln!(
            "chaos: reload {}: {} {}",
            i + 1,
            out.status,
            String::from_utf8_lossy(&out.stdout).trim()
        );
        assert!(
            out.status.success(),
            "reload {} failed: {}{}",
            i + 1,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(ok + reset + refused + timeouts + other, opened);
    assert_eq!(refused, 0, "refused connections");
    assert_eq!(timeouts, 0, "connections that timed out");
    assert_eq!(other, 0, "connections with another outcome");
    // A kill resets at most the connections its worker was serving: one per client thread.
    assert!(
        reset <= kills * CLIENT_THREADS as u64,
        "{reset} resets for {kills} kills"
    );
    assert!(ok > opened / 2, "too few served: {ok} of {opened}");

    // Back to the start: settled fleet, fds, RSS, no zombie, no orphan.
    let settled = wait_settled(&fleet, Duration::from_secs(30));
    http_get(port).expect("served after the chaos");
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut fds_after, mut rss_after);
    loop {
        fds_after = settled_fds(&fleet);
        rss_after = rss_kib(sv);
        if fds_after.len() == fds_before.len() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "chaos: sockvisor fds {} -> {}; RSS {rss_before} KiB -> {rss_after} KiB \
         (slack {RSS_SLACK_KIB} KiB)",
        fds_before.len(),
        fds_after.len()
    );
    assert_eq!(
        fds_after.len(),
        fds_before.len(),
        "fd count changed: {fds_before:#?} -> {fds_after:#?}"
    );
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "RSS grew: {rss_before} -> {rss_after} KiB"
    );
    let workers: BTreeSet<i32> = wait_settled(&fleet, Duration::from_secs(5))
        .workers
        .iter()
        .map(|w| w.pid)
        .collect();
    assert_eq!(workers.len(), WORKERS, "{settled:#?}");
    let kids = all_children(sv);
    assert_eq!(
        kids, workers,
        "sockvisor's children are exactly its workers"
    );
    let procs = processes();
    let zombies: Vec<_> = procs
        .iter()
        .filter(|&&(p, s, _)| s == 'Z' && kids.contains(&p))
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
    // Each worker leads a process group of its own (a terminal's Ctrl-C reaches sockvisor
    // alone); nothing else is in sockvisor's group or in a worker's.
    let group_of = |leader: i32| -> BTreeSet<i32> {
        procs
            .iter()
            .filter(|&&(_, _, g)| g == leader)
            .map(|&(p, _, _)| p)
            .collect()
    };
    assert_eq!(
        group_of(sv),
        BTreeSet::from([sv]),
        "sockvisor's process group: sockvisor only"
    );
    for &w in &workers {
        assert_eq!(
            group_of(w),
            BTreeSet::from([w]),
            "worker {w}'s process group"
        );
    }

    // A clean stop: exit status 0 (SIGTERM), within the stop timeout (2 s) and a margin (the
    // 15 s are a safety timeout).
    fleet.signal(libc::SIGTERM);
    let status = fleet
        .wait(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("still running 15 s after SIGTERM: {}", fleet.log()));
    assert_eq!(
        status.code(),
        Some(0),
        "exit after SIGTERM: {}",
        fleet.log()
    );
    assert!(fleet.log().contains("stopped: "), "{}", fleet.log());
}
