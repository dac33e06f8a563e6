//! Bounded resources (issue 8): out of file descriptors, sockvisor pauses accepting instead
//! of spinning, and serves everything once fds are free again.
//!
//! sockvisor raises its soft RLIMIT_NOFILE to the hard one at start, so the limit is lowered
//! (soft and hard) on the running process with prlimit(2), to a few fds above what it holds.
//! Control clients (up to 16) then take the last fds, and new TCP connections find accept
//! failing with EMFILE. One more control client is refused with a reason.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let (_, rest) = s.rsplit_once(") ").unwrap();
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

fn set_nofile(pid: i32, n: u64) {
    let lim = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit(2) on our own child, with a valid rlimit and no old-value pointer.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn emfile_on_accept_pauses_instead_of_spinning() {
    let fleet = FleetBuilder::new([
        "--workers".to_string(),
        "1".into(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--".into(),
        hello_bin().display().to_string(),
    ])
    .no_inherited_fds()
    .start();
    let sv = fleet.pid();
    let port = fleet.port("web");
    fleet.wait_until("a first answer", Duration::from_secs(20), || {
        http_get(port).ok()
    });
    // At rest: the answered connection was handed over (sockvisor closed its copy at once)
    // and no control client is connected.
    fleet.wait_status("the worker ready, nothing pending", |s| {
        s["workers"][0]["state"] == "ready" && s["listeners"][0]["pending"] == 0
    });
    fleet.wait_until(
        "no control client connected",
        Duration::from_secs(10),
        || (control_clients(sv, &fleet.control) == 0).then_some(()),
    );
    let base = fd_count(sv);
    // RLIMIT_NOFILE bounds fd *numbers*: the limit must lie above the highest open fd.
    let highest = std::fs::read_dir(format!("/proc/{sv}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<usize>().ok())
        .max()
        .unwrap();
    let limit = (highest + 1).max(base + 4);
    eprintln!("limits: sockvisor holds {base} fds (highest {highest}); RLIMIT_NOFILE -> {limit}");
    assert!(
        limit - base <= 16,
        "too many free fds to fill with control clients"
    );
    set_nofile(sv, limit as u64);

    // Take sockvisor's last fds with idle control clients.
    let mut clients = Vec::new();
    while fd_count(sv) < limit && clients.len() < 16 {
        clients.push(UnixStream::connect(&fleet.control).expect("control connect"));
        fleet.wait_until(
            "sockvisor to accept the control client",
            Duration::from_secs(10),
            || (control_clients(sv, &fleet.control) == clients.len()).then_some(()),
        );
    }
    assert_eq!(
        fd_count(sv),
        limit,
        "sockvisor at its fd limit ({} control clients)",
        clients.len()
    );

    // Connections now: the kernel completes the handshakes (backlog), accept fails.
    let conns: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    fleet.wait_log("pausing accepts", Duration::from_secs(5));
    let log = fleet.log();
    assert!(
        log.contains("Too many open files") || log.contains("EMFILE"),
        "EMFILE named in the log: {log}"
    );

    // Two seconds out of fds: sockvisor must mostly sleep.
    let (t0, c0) = (Instant::now(), cpu_ticks(sv));
    std::thread::sleep(Duration::from_secs(2));
    let (secs, ticks) = (t0.elapsed().as_secs_f64(), cpu_ticks(sv) - c0);
    let cpu = ticks as f64 / clock_ticks_per_sec() as f64;
    let pauses = fleet.log().matches("pausing accepts").count();
    eprintln!(
        "limits: EMFILE for {secs:.1}s: sockvisor used {cpu:.2}s of CPU, {pauses} pause messages"
    );
    assert!(
        cpu < 0.2 * secs,
        "sockvisor spun while out of fds: {cpu:.2}s CPU in {secs:.1}s"
    );

    // One more control client while out of fds: refused with a reason, and the loop goes
    // on (regression: ControlServer::accept retried EMFILE forever once at the limit, as
    // accept4 fails with EMFILE before it looks for a pending connection).
    let mut extra = UnixStream::connect(&fleet.control).expect("control connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut reply = String::new();
    let _ = extra.read_to_string(&mut reply);
    assert!(
        reply.contains("out of file descriptors"),
        "refused with a reason: {reply:?}"
    );
    let c1 = cpu_ticks(sv);
    std::thread::sleep(Duration::from_millis(500));
    let cpu = (cpu_ticks(sv) - c1) as f64 / clock_ticks_per_sec() as f64;
    assert!(
        cpu < 0.1,
        "sockvisor spins after refusing a control client: {cpu:.2}s in 0.5s"
    );

    // Free the fds: every connection is served.
    drop(clients);
    let mut served = 0;
    for mut s in conns {
        let mut out = String::new();
        s.read_to_string(&mut out).expect("answer after the pause");
        assert!(out.contains("hello from worker"), "{out:?}");
        served += 1;
    }
    eprintln!("limits: {served} connections served once fds were free");
    http_get(port).expect("still serving");
}
