//! Issue 14's defects, one test each (the item number is in the test's doc line). Each test
//! failed on the code before its fix. Timeouts here are safety bounds, not measurements.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn hello() -> String {
    hello_bin().display().to_string()
}

fn behaviours() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/workers/behaviours.py")
        .display()
        .to_string()
}

/// The port sockvisor bound for listener `name` (it was given port 0), from its log line
/// `listening on 127.0.0.1:PORT (name, policy)`.
fn port_of(fleet: &Fleet, name: &str) -> u16 {
    let needle = format!(" ({name}, ");
    let deadline = Instant::now() + T;
    loop {
        let log = fleet.log();
        for line in log.lines() {
            if let Some(rest) = line.split("listening on 127.0.0.1:").nth(1) {
                if rest.contains(&needle) {
                    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                    return digits.parse().unwrap();
                }
            }
        }
        assert!(Instant::now() < deadline, "no listener {name} in: {log}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Wait until `cond` holds on the fleet's `status --json`.
fn wait_status(
    fleet: &Fleet,
    what: &str,
    mut cond: impl FnMut(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        let out = fleet.ctl(&["status", "--json"]);
        if out.status.success() {
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if cond(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: {s:#}\n{}", fleet.log());
        } else {
            assert!(
                Instant::now() < deadline,
                "{what}: no status\n{}",
                fleet.log()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ready_workers(s: &serde_json::Value) -> Vec<(u64, i32)> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| {
            (
                w["slot"].as_u64().unwrap(),
                w["pid"].as_i64().unwrap() as i32,
            )
        })
        .collect()
}

fn start_ready(builder: FleetBuilder, notify: &mut NotifySocket) -> Fleet {
    let fleet = builder.notify(notify).start();
    assert!(
        notify.wait_for("READY=1", T).is_some(),
        "never ready: {}",
        fleet.log()
    );
    fleet
}

/// Item 2: scaling below `min_healthy` is refused, by the control socket and by SIGTTOU.
#[test]
fn scaling_below_min_healthy_is_refused() {
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "3",
            "--min-healthy",
            "2",
            "--dispatch",
            "shared",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            &hello(),
        ]),
        &mut notify,
    );
    let out = fleet.ctl(&["scale", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("min_healthy is 2"), "{err}");
    assert_eq!(fleet.status()["workers_wanted"], 3);
    fleet.signal(libc::SIGTTOU);
    wait_status(&fleet, "scaled to 2", |s| s["workers_wanted"] == 2);
    fleet.signal(libc::SIGTTOU);
    fleet.wait_log(
        "SIGTTOU ignored: cannot scale to 1 workers: min_healthy is 2",
        T,
    );
    assert_eq!(fleet.status()["workers_wanted"], 2);
}

/// Item 4: an OOM-killer storm over a serving fleet (one random worker SIGKILLed every
/// 300 ms) does not make sockvisor give up; nothing is refused.
#[test]
fn a_kill_storm_does_not_take_down_a_serving_fleet() {
    let mut notify = NotifySocket::new();
    let mut fleet = start_ready(
        FleetBuilder::new(["-w", "4", "-l", "web=tcp://127.0.0.1:0", "--", &hello()]),
        &mut notify,
    );
    let port = port_of(&fleet, "web");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The client loop ends when this test does, pass or fail.
    struct StopOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let _stop_client = StopOnDrop(stop.clone());
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut refused, mut other) = (0u64, 0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http_get(port) {
                    Ok(r) if r.contains("hello from worker") => ok += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
                    _ => other += 1,
                }
            }
            (ok, refused, other)
        })
    };
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut kills = 0;
    let started = Instant::now();
    while kills < 30 && fleet.wait(Duration::ZERO).is_none() {
        std::thread::sleep(Duration::from_millis(300));
        let pids = children(fleet.pid());
        if pids.is_empty() {
            continue;
        }
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let victim = pids[(seed % pids.len() as u64) as usize];
        // SAFETY: kill(2) on a child of our child.
        unsafe { libc::kill(victim, libc::SIGKILL) };
        kills += 1;
    }
    assert!(
        fleet.wait(Duration::ZERO).is_none(),
        "sockvisor exited during the storm: {}",
        fleet.log()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused, other) = client.join().unwrap();
    println!(
        "kill storm: {kills} kills in {:.1}s; requests ok {ok}, refused {refused}, failed {other}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(refused, 0);
    assert!(other <= kills, "{other} failed requests for {kills} kills");
    assert!(ok > 0);
    assert!(!fleet.log().contains("giving up"), "{}", fleet.log());
}

/// Item 5: workers get the soft fd limit sockvisor started with, not the one it raised.
#[test]
fn workers_keep_the_soft_fd_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sockvisor = sockvisor_bin().display().to_string();
    let mut notify = NotifySocket::new();
    let _fleet = start_ready(
        FleetBuilder::program(
            "sh",
            [
                "-c",
                "ulimit -Sn 1024 && ulimit -Hn 4096 && exec \"$0\" \"$@\"",
                &sockvisor,
                "-w",
                "2",
                "--dispatch",
                "shared",
                "-l",
                "web=tcp://127.0.0.1:0",
                "--",
                "sh",
                "-c",
                "ulimit -Sn > \"$DIR/nofile.$SOCKVISOR_WORKER_ID\"; ulimit -Hn >> \"$DIR/nofile.$SOCKVISOR_WORKER_ID\"; exec sleep 600",
            ],
        )
        .env("DIR", dir.path()),
        &mut notify,
    );
    for slot in 0..2 {
        let path = dir.path().join(format!("nofile.{slot}"));
        let deadline = Instant::now() + T;
        while std::fs::read_to_string(&path).map_or(true, |s| s.lines().count() < 2) {
            assert!(Instant::now() < deadline, "no {}", path.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = std::fs::read_to_string(&path).unwrap();
        assert_eq!(got, "1024\n4096\n", "worker {slot}: soft and hard limit");
    }
}

/// Item 6: a worker that daemonizes leaves nothing behind: sockvisor stops its orphans,
/// says why, and the port is free once sockvisor has exited.
#[test]
fn a_daemonizing_worker_leaves_no_orphan() {
    let dir = tempfile::tempdir().unwrap();
    let mut fleet = FleetBuilder::new([
        "-w",
        "1",
        "--dispatch",
        "shared",
        "--restart-delay",
        "20ms",
        "-l",
        "web=tcp://127.0.0.1:0",
        "--",
        "sh",
        "-c",
        "setsid sleep 300 & echo $! >> \"$DIR/pids\"; exit 0",
    ])
    .env("DIR", dir.path())
    .start();
    let port = port_of(&fleet, "web");
    let status = fleet.wait(T).expect("sockvisor did not give up");
    assert_eq!(status.code(), Some(69), "{}", fleet.log());
    let log = fleet.log();
    assert!(log.contains("it seems to daemonize"), "{log}");
    let pids: Vec<i32> = std::fs::read_to_string(dir.path().join("pids"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(pids.len() >= 5, "{pids:?}");
    let left: Vec<i32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(left.is_empty(), "still running: {left:?}\n{log}");
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the port is still held");
}

/// Item 7: sockvisor started with fds 0 and 1 closed gives its workers /dev/null there, not
/// one of its own sockets and not nothing. (Rust's runtime opens /dev/null on a closed fd
/// 0-2 before `main`; this test holds sockvisor to it.)
#[test]
fn closed_std_fds_become_dev_null() {
    let dir = tempfile::tempdir().unwrap();
    let sockvisor = sockvisor_bin().display().to_string();
    let mut notify = NotifySocket::new();
    let _fleet = start_ready(
        FleetBuilder::program(
            "sh",
            [
                "-c",
                "exec 0<&- 1>&-; exec \"$0\" \"$@\"",
                &sockvisor,
                "-w",
                "1",
                "-l",
                "web=tcp://127.0.0.1:0",
                "--",
                python(),
                "-c",
                "import os, time\ns = ''.join(f' {i} -> ' + os.readlink(f'/proc/self/fd/{i}') + '\\n' for i in range(4))\nopen(os.environ['DIR'] + '/fds', 'w').write(s)\ntime.sleep(600)",
            ],
        )
        .env("DIR", dir.path()),
        &mut notify,
    );
    let path = dir.path().join("fds");
    let deadline = Instant::now() + T;
    let listing = loop {
        let s = std::fs::read_to_string(&path).unwrap_or_default();
        if s.contains(" 3 -> ") {
            break s;
        }
        assert!(Instant::now() < deadline, "no fd listing: {s}");
        std::thread::sleep(Duration::from_millis(10));
    };
    for fd in 0..2 {
        assert!(
            listing
                .lines()
                .any(|l| l.contains(&format!(" {fd} -> /dev/null"))),
            "fd {fd} of the worker: {listing}"
        );
    }
}

/// Item 8: a reload requested during a reload runs after it, with the configuration as it
/// is then.
#[test]
fn a_reload_during_a_reload_applies_the_newer_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sockvisor.toml");
    let write = |workers: usize| {
        std::fs::write(
            &config,
            format!(
                "workers = {workers}\nready = \"notify\"\ndispatch = \"shared\"\nlisten = [\"web=tcp://127.0.0.1:0\"]\ncommand = [\"{}\"]\n",
                hello()
            ),
        )
        .unwrap()
    };
    write(1);
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new(["-c", &config.display().to_string()])
            .env("HELLO_READY", "1")
            .env("HELLO_READY_DELAY_MS", "1500"),
        &mut notify,
    );
    let control = fleet.control.clone();
    let reload = move || {
        std::process::Command::new(sockvisor_bin())
            .args(["reload", "--control"])
            .arg(&control)
            .output()
            .unwrap()
    };
    let first = std::thread::spawn(reload.clone());
    wait_status(&fleet, "reloading", |s| s["state"] == "reloading");
    write(2);
    let second = std::thread::spawn(reload);
    let (first, second) = (first.join().unwrap(), second.join().unwrap());
    assert!(first.status.success(), "{first:?}");
    assert!(second.status.success(), "{second:?}");
    let s = wait_status(&fleet, "two workers of generation 3", |s| {
        s["generation"] == 3 && ready_workers(s).len() == 2
    });
    assert_eq!(s["workers_wanted"], 2);
}

/// Item 10: `WATCHDOG_USEC=` from a draining worker does not re-arm its watchdog (it used
/// to be killed with SIGABRT mid-drain).
#[test]
fn watchdog_usec_does_not_rearm_a_draining_worker() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "2",
            "--ready",
            "notify",
            "--dispatch",
            "round-robin",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            python(),
            &behaviours(),
        ])
        .env("BEHAVIOUR", "watchdog-on-term")
        .env("DIR", dir.path()),
        &mut notify,
    );
    let s = wait_status(&fleet, "two ready", |s| ready_workers(s).len() == 2);
    let (_, pid) = ready_workers(&s)
        .into_iter()
        .find(|&(slot, _)| slot == 1)
        .unwrap();
    let out = fleet.ctl(&["scale", "1"]);
    assert!(out.status.success(), "{out:?}");
    fleet.wait_log(&format!("worker 1 (pid {pid}) exited with status 0"), T);
    assert!(!fleet.log().contains("watchdog timeout"), "{}", fleet.log());
}

/// Item 12: a worker that says `STOPPING=1` gives back the connections queued to it at once.
#[test]
fn stopping_gives_back_queued_connections() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "2",
            "--stop-timeout",
            "60s",
            "--ready",
            "notify",
            "--dispatch",
            "round-robin",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            python(),
            &behaviours(),
        ])
        .env("BEHAVIOUR", "stopping-on-usr1")
        .env("DIR", dir.path()),
        &mut notify,
    );
    let port = port_of(&fleet, "web");
    let s = wait_status(&fleet, "two ready", |s| ready_workers(s).len() == 2);
    let (_, lingering) = ready_workers(&s)
        .into_iter()
        .find(|&(slot, _)| slot == 1)
        .unwrap();
    let clients: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || http_get(port)))
        .collect();
    wait_status(&fleet, "connections queued to worker 1", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["slot"] == 1 && w["queued"].as_u64().unwrap() > 0)
    });
    // SAFETY: kill(2) on a worker of our child.
    unsafe { libc::kill(lingering, libc::SIGUSR1) };
    for c in clients {
        let r = c.join().unwrap().expect("a request failed");
        assert!(r.contains("hello from worker 0"), "{r}");
    }
}

/// Item 13: connections accepted but not handed to any worker are closed at stop at once,
/// not after the stop timeout.
#[test]
fn pending_connections_are_closed_at_stop() {
    let fleet = FleetBuilder::new([
        "-w",
        "1",
        "--dispatch",
        "round-robin",
        "--window",
        "1",
        "--stop-timeout",
        "60s",
        "-l",
        "web=tcp://127.0.0.1:0",
        "--",
        "sh",
        "-c",
        "trap '' TERM; exec sleep 600",
    ])
    .start();
    let port = port_of(&fleet, "web");
    let clients: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // One connection waits in the worker's channel (window 1), one in sockvisor (pending),
    // the rest in the kernel's backlog (the listener is paused).
    wait_status(&fleet, "a pending connection", |s| {
        s["listeners"][0]["pending"].as_u64().unwrap() >= 1
    });
    let stopped_at = Instant::now();
    fleet.signal(libc::SIGTERM);
    let mut closed = 0;
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 1];
        match c.read(&mut b) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    // The worker ignores SIGTERM: sockvisor itself runs until the 60 s stop timeout.
    assert!(
        closed >= 1,
        "the pending connection was not closed: {}",
        fleet.log()
    );
    assert!(stopped_at.elapsed() < Duration::from_secs(30));
    assert!(fleet
        .log()
        .contains("closed 1 accepted connections at stop"));
}

/// Item 14: listener indexes past 255 get epoll tokens of their own: close reports from
/// listener 299's channels reach the right worker.
#[test]
fn three_hundred_listeners_keep_their_own_channels() {
    let mut args: Vec<String> = vec!["-w".into(), "2".into()];
    args.extend(["--dispatch".into(), "least-connections".into()]);
    for i in 0..300 {
        args.push("-l".into());
        args.push(format!("l{i}=tcp://127.0.0.1:0"));
    }
    args.extend(["--".into(), hello()]);
    let mut notify = NotifySocket::new();
    let fleet = start_ready(FleetBuilder::new(&args), &mut notify);
    let port = port_of(&fleet, "l299");
    for _ in 0..10 {
        assert!(http_get(port).unwrap().contains("hello from worker"));
    }
    let s = wait_status(&fleet, "every connection reported closed", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["open"] == 0)
    });
    let dispatched: u64 = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["dispatched"].as_u64().unwrap())
        .sum();
    assert_eq!(dispatched, 10);
}

/// Item 18: Ctrl-C (SIGINT to the terminal's foreground process group) reaches sockvisor
/// alone; the workers are stopped its way (SIGTERM, drain).
#[test]
fn ctrl_c_reaches_sockvisor_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "2",
            "--ready",
            "notify",
            "--dispatch",
            "round-robin",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            python(),
            &behaviours(),
        ])
        .env("BEHAVIOUR", "record-signals")
        .env("DIR", dir.path()),
        &mut notify,
    );
    wait_status(&fleet, "two ready", |s| ready_workers(s).len() == 2);
    // SAFETY: killpg(2) on the group this test created for its child, as a terminal does.
    unsafe { libc::killpg(fleet.pid(), libc::SIGINT) };
    let status = fleet.wait(T).expect("no stop");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    for slot in 0..2 {
        let got =
            std::fs::read_to_string(dir.path().join(format!("signals.{slot}"))).unwrap_or_default();
        assert_eq!(got, "SIGTERM\n", "worker {slot}");
    }
}

/// Item 19: `status` lists workers by slot, also after a restart gave slot 0 the newest pid.
#[test]
fn status_lists_workers_by_slot() {
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "3",
            "--dispatch",
            "shared",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            &hello(),
        ]),
        &mut notify,
    );
    let s = wait_status(&fleet, "three ready", |s| ready_workers(s).len() == 3);
    let (_, first) = ready_workers(&s)[0];
    // SAFETY: kill(2) on a worker of our child.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let s = wait_status(&fleet, "slot 0 restarted", |s| {
        let r = ready_workers(s);
        r.len() == 3 && !r.iter().any(|&(_, p)| p == first)
    });
    let slots: Vec<u64> = ready_workers(&s).iter().map(|&(slot, _)| slot).collect();
    assert_eq!(slots, [0, 1, 2]);
    let pids: BTreeSet<i32> = ready_workers(&s).iter().map(|&(_, p)| p).collect();
    assert_eq!(pids.len(), 3);
    // The workers accept on a shared listener: sockvisor counts nothing, and says so.
    assert_eq!(s["listeners"][0]["accepted"], serde_json::Value::Null);
    let table = String::from_utf8(fleet.ctl(&["status"]).stdout).unwrap();
    let row = table.lines().find(|l| l.starts_with("web ")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>()[2..4],
        ["shared", "-"],
        "{table}"
    );
}

/// Item 21: one format for every error line, without repeated phrases.
#[test]
fn error_lines_have_one_format() {
    let out = std::process::Command::new(sockvisor_bin())
        .args(["--workers", "zero", "--", "/bin/true"])
        .env_remove("SOCKVISOR_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("sockvisor: error "), "{err}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = std::process::Command::new(sockvisor_bin())
        .args([
            "-l",
            &format!("web=tcp://127.0.0.1:{port}"),
            "--",
            "/bin/true",
        ])
        .env("SOCKVISOR_CONTROL_SOCKET", "none")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("bind")).unwrap_or(&err);
    assert!(line.starts_with("sockvisor: error "), "{err}");
    assert_eq!(line.matches("in use").count(), 1, "{line}");
}

/// Item 1: the worker count is bounded wherever it enters: a huge `scale` (through the
/// client, or raw on the control socket where it used to panic in `resize_with`) and
/// SIGTTIN past the maximum are refused and leave the fleet as it was.
#[test]
fn scaling_past_the_maximum_is_refused() {
    use std::io::{BufRead, BufReader, Write};
    let mut notify = NotifySocket::new();
    let fleet = start_ready(
        FleetBuilder::new([
            "-w",
            "2",
            "--dispatch",
            "shared",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            &hello(),
        ]),
        &mut notify,
    );
    let out = fleet.ctl(&["scale", "100000"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("1024"), "{err}");
    for workers in ["100000", "18446744073709551615"] {
        let mut s = std::os::unix::net::UnixStream::connect(&fleet.control).unwrap();
        writeln!(s, "{{\"cmd\":\"scale\",\"workers\":{workers}}}").unwrap();
        let mut reply = String::new();
        BufReader::new(&s).read_line(&mut reply).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(
            reply["error"].as_str().unwrap().contains("maximum of 1024"),
            "{reply}"
        );
    }
    let s = fleet.status();
    assert_eq!(s["workers_wanted"], 2);
    assert_eq!(ready_workers(&s).len(), 2);
}

/// Item 15: `ETOOMANYREFS` (more fds in flight than the fd limit allows a user without
/// CAP_SYS_RESOURCE) on every send, retried every 2 ms while connections are pending, is
/// logged at most once per 10 s, not once per connection per worker per retry.
#[test]
fn transient_send_failures_are_logged_now_and_then() {
    if !require(
        have_program("setpriv"),
        "setpriv not installed (util-linux)",
    ) {
        return;
    }
    let sockvisor = sockvisor_bin().display().to_string();
    // No capability (root's CAP_SYS_ADMIN/CAP_SYS_RESOURCE would lift the in-flight limit),
    // 600 fds, 4 workers that never read their channels: the 601st fd in flight fails.
    let fleet = FleetBuilder::program(
        "setpriv",
        [
            "--bounding-set",
            "-all",
            "--inh-caps",
            "-all",
            "sh",
            "-c",
            "ulimit -n 600 && exec \"$0\" \"$@\"",
            &sockvisor,
            "-w",
            "4",
            "--dispatch",
            "round-robin",
            "--window",
            "1000",
            "-l",
            "web=tcp://127.0.0.1:0",
            "--",
            "sh",
            "-c",
            "exec sleep 600",
        ],
    )
    .start();
    let port = fleet.port("web");
    let clients: Vec<TcpStream> = (0..900)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    fleet.wait_log("ETOOMANYREFS", T);
    // Pending connections are retried every 2 ms: give it a few hundred retries.
    let s = wait_status(&fleet, "connections pending", |s| {
        s["listeners"][0]["pending"].as_u64().unwrap() >= 1
    });
    std::thread::sleep(Duration::from_secs(2));
    let log = fleet.log();
    let lines = log.matches("send failed").count();
    println!(
        "ETOOMANYREFS: {lines} log line(s) in 2 s with {} pending",
        s["listeners"][0]["pending"]
    );
    assert_eq!(lines, 1, "{lines} send-failure lines in 2 s");
    drop(clients);
}
