//! Documented promises that no other test covered (issue 12, item 9), one test each, against
//! the real binary. Each test names the document and the sentence it checks. ENFILE/ENOBUFS/
//! ENOMEM on accept are in tests/limits.rs, next to EMFILE.
//!
//! Time bounds here are safety timeouts (`T`: how long a test waits for something that must
//! happen), never assertions about speed. Where a promise is about something *not* happening
//! before a deadline (a disabled watchdog, an extended stop), another worker of the same fleet
//! with the same deadline is the clock: the test waits until that one was handled.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const T: Duration = SAFETY_TIMEOUT;

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn probe() -> Vec<String> {
    vec![python().to_string(), probe_script().display().to_string()]
}

/// `sockvisor OPTIONS -- COMMAND`.
fn sockvisor(options: &[&str], command: Vec<String>) -> FleetBuilder {
    let mut args = s(options);
    args.push("--".into());
    args.extend(command);
    FleetBuilder::new(args)
}

/// `sockvisor --workers N --listen web=tcp://127.0.0.1:0 --ready notify OPTIONS -- COMMAND`.
fn web_fleet(workers: usize, options: &[&str], command: Vec<String>) -> FleetBuilder {
    let mut all = s(&[
        "--workers",
        &workers.to_string(),
        "--listen",
        "web=tcp://127.0.0.1:0",
        "--ready",
        "notify",
    ]);
    all.extend(s(options));
    sockvisor(&all.iter().map(|a| a.as_str()).collect::<Vec<_>>(), command)
}

/// Pids of `worker SLOT started (pid P, ...)` lines, in order.
fn started_pids(log: &str, slot: usize) -> Vec<i32> {
    let prefix = format!("worker {slot} started (pid ");
    log.lines()
        .filter_map(|l| l.split_once(&prefix))
        .filter_map(|(_, rest)| rest.split([',', ')']).next()?.parse().ok())
        .collect()
}

/// Wait until slot `slot` has had `n` workers, the last of them ready; returns their pids.
fn wait_slot_ready(fleet: &Fleet, slot: usize, n: usize) -> Vec<i32> {
    fleet.wait_until(&format!("worker {n} of slot {slot} ready"), T, || {
        let log = fleet.log();
        let pids = started_pids(&log, slot);
        (pids.len() >= n && log.contains(&format!("worker {slot} ready (pid {},", pids[n - 1])))
            .then_some(pids)
    })
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a worker of a fleet this test started.
    unsafe { libc::kill(pid, sig) };
}

fn worker_status(status: &serde_json::Value, pid: i32) -> Option<serde_json::Value> {
    status["workers"]
        .as_array()?
        .iter()
        .find(|w| w["pid"] == pid)
        .cloned()
}

// ------------------------------------------------------------------------------ stopping

/// README: "Stop it with Ctrl-C (SIGINT): `STOPPING=1`, workers get SIGTERM, stragglers
/// SIGKILL after the stop timeout, exit status 0." (Stragglers after SIGTERM: tests/core.rs.)
#[test]
fn sigint_stops_the_fleet_like_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = web_fleet(2, &["--stop-timeout", "1s"], probe())
        .env("PROBE_DIR", dir.path())
        .notify(&notify)
        .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let pids: Vec<i32> = probe_reports(dir.path())
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2);
    fleet.signal(libc::SIGINT);
    notify.wait_for("STOPPING=1", T).expect("STOPPING=1");
    let status = fleet.wait(T).expect("sockvisor exits after SIGINT");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    let log = fleet.log();
    assert!(log.contains("stopping: received SIGINT"), "{log}");
    for pid in pids {
        assert!(
            log.contains(&format!("(pid {pid}) killed by SIGTERM")),
            "worker {pid} got SIGTERM: {log}"
        );
        assert!(!alive(pid), "worker {pid} left behind");
    }
}

/// docs/health.md (upstream watchdog): sockvisor pings "not once sockvisor is stopping
/// (systemd stops the watchdog then too)".
#[test]
fn watchdog_pings_stop_while_sockvisor_stops() {
    let mut notify = NotifySocket::new();
    let mut fleet = sockvisor(
        &[
            "--workers",
            "1",
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--ready",
            "notify",
            "--stop-timeout",
            "1s",
            // Health alone would not withhold pings while the workers stop.
            "--min-healthy",
            "0",
        ],
        probe(),
    )
    // The worker ignores SIGTERM: the stop lasts the whole stop timeout, 20 ping periods.
    .env("PROBE_IGNORE_TERM", "1")
    .env("WATCHDOG_USEC", "100000")
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    notify
        .wait_for_new("WATCHDOG=1", T)
        .expect("pings while running");
    fleet.signal(libc::SIGTERM);
    let status = fleet.wait(T).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    assert!(fleet.log().contains("sending SIGKILL"), "{}", fleet.log());
    let all = notify.drained();
    let stopping = all
        .iter()
        .position(|m| m.lines().any(|l| l == "STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1: {all:?}"));
    let late: Vec<&String> = all[stopping..]
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
        .collect();
    assert!(
        late.is_empty(),
        "WATCHDOG=1 after STOPPING=1: {late:?}\n{all:?}"
    );
}

// ------------------------------------------------------------------------------- reloads

fn write_config(path: &Path, body: &str) {
    std::fs::write(path, body).unwrap();
}

/// README: "A reload re-reads the configuration (file, ...)": a changed worker count and
/// command are applied by the new generation.
#[test]
fn a_reload_applies_a_changed_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    let listen = "[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\n";
    write_config(
        &config,
        &format!(
            "workers = 2\nready = \"notify\"\ncommand = [{:?}]\n{listen}",
            hello_bin().display().to_string()
        ),
    );
    let mut notify = NotifySocket::new();
    let fleet = FleetBuilder::new(["-c", config.to_str().unwrap()])
        .env("HELLO_READY", "1")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    notify.wait_for("READY=1", T).expect("READY=1");
    assert!(http_get(port).unwrap().contains("hello from worker"));
    // Three python probes instead of two hello workers.
    let cmd: Vec<String> = probe().iter().map(|c| format!("{c:?}")).collect();
    write_config(
        &config,
        &format!(
            "workers = 3\nready = \"notify\"\ncommand = [{}]\n{listen}",
            cmd.join(", ")
        ),
    );
    let out = fleet.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fleet.log()
    );
    let status = fleet.wait_status("3 ready workers of generation 2", |s| {
        let w = s["workers"].as_array().unwrap();
        w.len() == 3
            && w.iter()
                .all(|w| w["state"] == "ready" && w["generation"] == 2)
    });
    assert_eq!(status["workers_wanted"], 3, "{status:#}");
    let mut slots = BTreeSet::new();
    for _ in 0..6 {
        let reply = tcp_request(port, b"hi\n").unwrap();
        assert!(
            reply.starts_with("probe "),
            "the new command answers: {reply:?}"
        );
        slots.insert(reply.split_whitespace().nth(1).unwrap().to_string());
    }
    assert_eq!(slots.len(), 3, "round robin over the three new workers");
}

/// docs/config.md: `reload_surge`: "extra workers a reload may run at once"; README: "starts
/// the new generation `reload_surge` workers at a time".
#[test]
fn reload_surge_starts_that_many_new_workers_at_a_time() {
    let mut notify = NotifySocket::new();
    let fleet = web_fleet(
        4,
        &["--reload-surge", "2"],
        vec![hello_bin().display().to_string()],
    )
    .env("HELLO_READY", "1")
    .env("HELLO_READY_DELAY_MS", "200")
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let out = fleet.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Replay the log from the reload on: new workers started and not ready yet, at most.
    let log = fleet.log();
    let from = log
        .find("reload: starting generation 2 (4 workers, surge 2)")
        .unwrap_or_else(|| panic!("{log}"));
    let mut starting = BTreeSet::new();
    let (mut most, mut started) = (0, 0);
    for line in log[from..].lines() {
        if let Some((_, rest)) = line.split_once(" started (pid ") {
            if rest.contains("generation 2") {
                starting.insert(rest.split(',').next().unwrap().to_string());
                started += 1;
                most = most.max(starting.len());
            }
        } else if let Some((_, rest)) = line.split_once(" ready (pid ") {
            starting.remove(rest.split(',').next().unwrap());
        }
    }
    assert_eq!(started, 4, "four new workers: {log}");
    assert_eq!(
        most, 2,
        "two new workers at a time (reload_surge = 2), never more: {log}"
    );
}

// ------------------------------------------------------------------------------ exit codes

/// README and docs/config.md: exit code 70, "internal error (EX_SOFTWARE)". Provoked for
/// real: sockvisor started with too few file descriptors for what it cannot run without
/// (the workers' notify socket, epoll, signalfd, timerfd). Every limit ends in a documented
/// exit code with a message, never a panic.
#[test]
fn exit_code_70_when_sockvisor_cannot_get_what_it_runs_on() {
    let mut codes = BTreeMap::new();
    // 4: fd 3 is the listener; below that the dynamic loader itself fails.
    for n in 4..=32u64 {
        let mut notify = NotifySocket::new();
        let mut fleet = sockvisor(
            &[
                "--workers",
                "1",
                "--listen",
                "web=tcp://127.0.0.1:0",
                "--give-up-after",
                "1",
                "--restart-delay",
                "10ms",
            ],
            vec![hello_bin().display().to_string()],
        )
        .no_inherited_fds()
        .fd_limit(n)
        .notify(&notify)
        .start();
        // Either it runs (READY=1: enough fds, the search is over) or it exits.
        let ran = fleet.wait_until("READY=1 or an exit", T, || {
            if fleet.gone().is_some() {
                Some(false)
            } else {
                notify.wait_for("READY=1", Duration::ZERO).map(|_| true)
            }
        });
        if ran {
            break;
        }
        let status = fleet.wait(T).unwrap();
        let log = fleet.log();
        assert!(!log.contains("panicked"), "RLIMIT_NOFILE {n}: {log}");
        let code = status.code().unwrap_or(-1);
        assert!(
            [69, 70, 78].contains(&code),
            "RLIMIT_NOFILE {n}: exit {status}: {log}"
        );
        if code == 70 {
            assert!(
                log.contains("Too many open files")
                    && ["notify socket", "epoll", "signalfd", "timerfd"]
                        .iter()
                        .any(|what| log.contains(what)),
                "RLIMIT_NOFILE {n}: exit 70 names what failed: {log}"
            );
        }
        codes.insert(n, (code, log.lines().last().unwrap_or("").to_string()));
    }
    eprintln!("exit codes by RLIMIT_NOFILE: {codes:#?}");
    assert!(
        codes.values().any(|(c, _)| *c == 70),
        "no limit gave exit 70: {codes:#?}"
    );
}

/// docs/health.md (readiness): a worker never ready "is sent SIGTERM ..., and its slot counts
/// a failure: ... a fleet whose every slot keeps failing gives up (exit 69), even when the
/// worker handles SIGTERM cleanly (`STOPPING=1`, exit 0)". hello without HELLO_READY never
/// says READY=1, and on SIGTERM says STOPPING=1 and exits 0.
#[test]
fn a_fleet_that_never_gets_ready_gives_up_with_exit_69() {
    let mut notify = NotifySocket::new();
    let mut fleet = web_fleet(
        2,
        &[
            "--ready-timeout",
            "200ms",
            "--restart-delay",
            "10ms",
            "--give-up-after",
            "2",
        ],
        vec![hello_bin().display().to_string()],
    )
    .notify(&notify)
    .start();
    let status = fleet.wait(T).expect("sockvisor gives up");
    let log = fleet.log();
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("not ready within the ready timeout"), "{log}");
    // hello says STOPPING=1 as it drains (sockvisor, already stopping it, logs nothing more)
    // and exits 0: a clean exit, counted as a failure all the same.
    assert!(
        log.contains("exited with status 0 after"),
        "the workers stopped cleanly: {log}"
    );
    assert!(log.contains("giving up"), "{log}");
    let all = notify.drained();
    assert!(
        !all.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 from a fleet that never got ready: {all:?}"
    );
}

/// docs/config.md, `ready = "exec"`: a worker is ready once it has been exec'd, as systemd's
/// `Type=exec`. A program the kernel refuses to exec (a script whose interpreter is missing)
/// is never ready: no READY=1 upstream, the log says why exec failed, the fleet gives up.
/// (It used to count as ready at fork: READY=1 went out for a fleet that could not run.)
#[test]
fn a_worker_whose_exec_fails_is_never_ready_and_the_log_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("server");
    std::fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = sockvisor(
        &[
            "--workers",
            "2",
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--ready",
            "exec",
            "--restart-delay",
            "10ms",
            "--give-up-after",
            "2",
        ],
        vec![script.display().to_string()],
    )
    .notify(&notify)
    .start();
    let status = fleet.wait(T).expect("sockvisor gives up");
    let log = fleet.log();
    assert_eq!(status.code(), Some(69), "{log}");
    let why = format!(
        "could not be started: exec {}: No such file or directory",
        script.display()
    );
    assert!(log.contains(&why), "{log}");
    assert!(!log.contains(" ready (pid "), "{log}");
    let all = notify.drained();
    assert!(
        !all.iter().any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 from a fleet whose workers could not be exec'd: {all:?}"
    );
}

// --------------------------------------------------------------------- worker health

/// docs/config.md: `wedged_after`: "a worker whose queue does not move for this long is
/// unhealthy"; docs/systemd.md: "sockvisor only notices a hung worker when its connection
/// queue stops moving (`wedged_after`)". A SIGSTOPped worker with connections queued is
/// replaced (SIGABRT, then SIGKILL after the stop timeout), and its queue is served by the
/// other worker.
#[test]
fn a_wedged_worker_is_replaced_and_its_queue_served_by_another() {
    let mut notify = NotifySocket::new();
    let fleet = web_fleet(
        2,
        &["--wedged-after", "1s", "--stop-timeout", "1s"],
        vec![hello_bin().display().to_string()],
    )
    .env("HELLO_READY", "1")
    .notify(&notify)
    .start();
    let port = fleet.port("web");
    notify.wait_for("READY=1", T).expect("READY=1");
    let victim = fleet.status()["workers"][0]["pid"].as_i64().unwrap() as i32;
    signal(victim, libc::SIGSTOP);
    let pending: Vec<TcpStream> = (0..10)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    fleet.wait_log(&format!("(pid {victim}): wedged: "), T);
    fleet.wait_log(
        &format!("pid {victim} did not stop within the stop timeout; sending SIGKILL"),
        T,
    );
    for mut s in pending {
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("no answer (safety timeout {T:?}): {e}"));
        assert!(out.contains("hello from worker"), "{out:?}");
        assert!(
            !out.contains(&format!("(pid {victim})")),
            "answered by the wedged worker: {out}"
        );
    }
    let log = fleet.log();
    assert!(
        log.contains(&format!("(pid {victim}): wedged: ")) && log.contains("sending SIGABRT"),
        "{log}"
    );
    // Replaced in its slot.
    fleet.wait_status("two ready workers again", |s| {
        let w = s["workers"].as_array().unwrap();
        w.len() == 2
            && w.iter()
                .all(|w| w["state"] == "ready" && w["pid"] != victim)
    });
}

/// docs/health.md: "`WATCHDOG_USEC=N` sets that worker's watchdog timeout (0 disables it)".
/// Worker 0 says WATCHDOG_USEC=0; worker 1 does not: both have the same 3 s watchdog from
/// exec and neither pings. Worker 1 is aborted (the clock); worker 0 lives on.
#[test]
fn watchdog_usec_0_disables_a_workers_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = web_fleet(2, &["--worker-watchdog", "3s"], probe())
        .env("PROBE_DIR", dir.path())
        .env("PROBE_NOTIFY_AFTER_READY_0", "WATCHDOG_USEC=0")
        .start();
    let first = wait_slot_ready(&fleet, 0, 1)[0];
    let control = wait_slot_ready(&fleet, 1, 1)[0];
    // The worker without the 0 is aborted at its deadline, and replaced: by then worker 0's
    // deadline (the same, from its exec) is past too.
    fleet.wait_log(&format!("(pid {control}) killed by SIGABRT"), T);
    wait_slot_ready(&fleet, 1, 2);
    let log = fleet.log();
    assert!(
        !log.contains(&format!("worker 0 (pid {first}): watchdog timeout")),
        "the disabled watchdog fired: {log}"
    );
    assert!(alive(first), "worker 0 lives on: {log}");
    assert_eq!(started_pids(&log, 0), [first], "{log}");
}

/// docs/health.md: "`EXTEND_TIMEOUT_USEC=N` pushes ... its SIGKILL deadline while it stops,
/// to at least now + N µs ...; applied after `STOPPING=1` in the same datagram". Both workers
/// say STOPPING=1 and linger; worker 0 adds EXTEND_TIMEOUT_USEC=4 s. Worker 1 is the clock:
/// killed after the 1 s stop timeout (and replaced), while worker 0 still runs; worker 0 is
/// killed later.
#[test]
fn extend_timeout_usec_while_stopping_pushes_the_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = web_fleet(2, &["--stop-timeout", "1s"], probe())
        .env("PROBE_DIR", dir.path())
        .env(
            "PROBE_NOTIFY_AFTER_READY_0",
            "STOPPING=1\nEXTEND_TIMEOUT_USEC=4000000",
        )
        .env("PROBE_NOTIFY_AFTER_READY_1", "STOPPING=1")
        .start();
    let extended = wait_slot_ready(&fleet, 0, 1)[0];
    let clock = wait_slot_ready(&fleet, 1, 1)[0];
    fleet.wait_log(&format!("(pid {extended}) is stopping (STOPPING=1)"), T);
    fleet.wait_log(
        &format!("pid {clock} did not stop within the stop timeout; sending SIGKILL"),
        T,
    );
    wait_slot_ready(&fleet, 1, 2);
    let log = fleet.log();
    assert!(
        !log.contains(&format!("pid {extended} did not stop")),
        "the extension was ignored: {log}"
    );
    assert!(alive(extended), "{log}");
    // The extension ends too: SIGKILL, and the slot is refilled.
    fleet.wait_log(
        &format!("pid {extended} did not stop within the stop timeout; sending SIGKILL"),
        T,
    );
    wait_slot_ready(&fleet, 0, 2);
}

/// docs/health.md (`STOPPING=1`): "An exit with status 0 ... is expected and the slot is
/// refilled" without counting a failure, once the worker had stayed up `restart_reset`; a
/// clean exit sooner is restarted after the backoff (a crash loop too).
#[test]
fn stopping_then_exit_0_refills_the_slot_without_a_failure() {
    // Stayed up: restart_reset 1 s, and the worker is told to go once its uptime passed it.
    let fleet_up = web_fleet(1, &["--restart-reset", "1s"], probe())
        .env("PROBE_ON_USR1", "STOPPING=1")
        .env("PROBE_USR1_EXIT", "0")
        .start();
    let first = wait_slot_ready(&fleet_up, 0, 1)[0];
    fleet_up.wait_status("worker 0 up for more than restart_reset", |s| {
        worker_status(s, first).is_some_and(|w| w["uptime_secs"].as_f64().unwrap() > 1.2)
    });
    signal(first, libc::SIGUSR1);
    let pids = wait_slot_ready(&fleet_up, 0, 2);
    let log = fleet_up.log();
    assert!(
        log.contains(&format!("worker 0 (pid {first}) exited with status 0")),
        "{log}"
    );
    assert!(
        !log.contains("restarting in") && !log.contains("stayed up only"),
        "refilled at once, no failure counted: {log}"
    );
    assert_eq!(warnings_and_errors(&log), Vec::<&str>::new(), "{log}");
    assert!(!alive(first) && alive(pids[1]));

    // Right after start (uptime below restart_reset = 1 h): backoff.
    let fleet_quick = web_fleet(1, &["--restart-reset", "1h"], probe())
        .env("PROBE_ON_USR1", "STOPPING=1")
        .env("PROBE_USR1_EXIT", "0")
        .start();
    let first = wait_slot_ready(&fleet_quick, 0, 1)[0];
    signal(first, libc::SIGUSR1);
    fleet_quick.wait_log(&format!("worker 0 (pid {first}) exited with status 0"), T);
    fleet_quick.wait_log("worker 0 stayed up only", T);
    wait_slot_ready(&fleet_quick, 0, 2);
}

/// docs/health.md: a datagram from a process that is not a live worker "is dropped and logged
/// (`ignored a notification from pid N (not a live worker; K ignored so far)`, at most once
/// per 10 s)". 100 datagrams from the test: one line.
#[test]
fn ignored_notifications_are_logged_at_most_once_per_10_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = web_fleet(1, &[], probe())
        .env("PROBE_DIR", dir.path())
        .env("PROBE_ON_USR1", "STATUS=poked")
        .start();
    let report = wait_probe_reports(dir.path(), 1, &fleet).remove(0);
    let worker = report["pid"].as_i64().unwrap() as i32;
    let socket = report["env"]["NOTIFY_SOCKET"].as_str().unwrap().to_string();
    wait_slot_ready(&fleet, 0, 1);
    for i in 0..100 {
        send_notification(&socket, format!("STATUS=stranger {i}").as_bytes()).unwrap();
    }
    // The worker speaks after the 100 (one socket, one queue): once sockvisor shows its
    // status, it has read all of them.
    signal(worker, libc::SIGUSR1);
    fleet.wait_status("the worker's STATUS=poked", |s| {
        worker_status(s, worker).is_some_and(|w| w["status"] == "poked")
    });
    let log = fleet.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains(&format!(
                "ignored a notification from pid {}",
                std::process::id()
            ))
        })
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert!(lines[0].contains("1 ignored so far"), "{lines:?}");
}

// ------------------------------------------------------------------------------ listeners

/// docs/config.md (URL forms): `tcp://[::1]:8000` (and UDP): IPv6 listeners.
#[test]
fn ipv6_listeners() {
    if !require(
        std::net::TcpListener::bind("[::1]:0").is_ok(),
        "no IPv6 loopback (::1)",
    ) {
        return;
    }
    let mut notify = NotifySocket::new();
    let fleet = sockvisor(
        &[
            "--workers",
            "2",
            "--listen",
            "web=tcp://[::1]:0",
            "--listen",
            "dns=udp://[::1]:0",
            "--ready",
            "notify",
        ],
        probe(),
    )
    .notify(&notify)
    .start();
    let (web, dns) = (fleet.addr("web"), fleet.addr("dns"));
    assert!(web.is_ipv6() && dns.is_ipv6(), "{web} {dns}");
    notify.wait_for("READY=1", T).expect("READY=1");
    let mut c = TcpStream::connect(web).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"hi\n").unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("probe "), "{reply:?}");
    let u = std::net::UdpSocket::bind("[::1]:0").unwrap();
    u.set_read_timeout(Some(T)).unwrap();
    u.send_to(b"ping", dns).unwrap();
    let mut buf = [0u8; 512];
    let n = u.recv(&mut buf).unwrap();
    let echo = String::from_utf8_lossy(&buf[..n]);
    assert!(echo.ends_with(": ping"), "{echo}");
    let listeners = fleet.status()["listeners"].clone();
    assert!(
        listeners.to_string().contains("[::1]:"),
        "status shows the IPv6 addresses: {listeners}"
    );
}

/// docs/config.md (socket activation): "If several passed sockets share a name, the listener
/// takes them all."
#[test]
fn several_passed_sockets_with_one_name_all_serve() {
    let (a, b) = (tcp_listener(), tcp_listener());
    let (pa, pb) = (a.local_addr().unwrap(), b.local_addr().unwrap());
    let mut notify = NotifySocket::new();
    let fleet = sockvisor(
        &["--workers", "2", "--listen", "web", "--ready", "notify"],
        vec![hello_bin().display().to_string()],
    )
    .env("HELLO_READY", "1")
    .pass(a, "web")
    .pass(b, "web")
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let addrs: BTreeSet<_> = fleet.addrs("web").into_iter().collect();
    assert_eq!(addrs, BTreeSet::from([pa, pb]), "{}", fleet.log());
    for addr in [pa, pb] {
        for _ in 0..3 {
            let reply = http_get(addr.port()).unwrap();
            assert!(reply.contains("hello from worker"), "{addr}: {reply:?}");
        }
    }
    assert!(fleet.log().contains("from systemd"), "{}", fleet.log());
}

/// The fds of another process, duplicated into this one with pidfd_getfd(2), that are
/// listening TCP sockets bound to `addr`.
fn listening_socket_of(pid: i32, addr: std::net::SocketAddr) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) on a child of ours; the result is a new fd we own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return None;
    }
    // SAFETY: as above.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        let Some(n) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: pidfd_getfd(2) returns a new fd (a copy of the target's fd n) we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
        if fd < 0 {
            continue;
        }
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let listening = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
            .unwrap_or(false);
        let local =
            nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
                .ok()
                .and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|a| std::net::SocketAddr::V4((*a).into()))
                });
        if listening && local == Some(addr) {
            return Some(fd);
        }
    }
    None
}

/// docs/config.md (binding): "sockvisor binds every listener itself (TCP with `SO_REUSEADDR`
/// and a backlog of max(4096, somaxconn))". The kernel caps a backlog at somaxconn, so the
/// listening socket's accept queue limit (`ss`'s Send-Q) must be somaxconn exactly: less
/// means sockvisor asked for less than the promise.
#[test]
fn a_self_bound_tcp_listener_has_the_documented_backlog_and_reuseaddr() {
    if !require(
        have_program("ss"),
        "ss not installed (apt-get install iproute2)",
    ) {
        return;
    }
    let fleet = sockvisor(
        &["--workers", "1", "--listen", "web=tcp://127.0.0.1:0"],
        vec![hello_bin().display().to_string()],
    )
    .start();
    let addr = fleet.addr("web");
    let somaxconn: u64 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let out = std::process::Command::new("ss")
        .args(["-Hltn", &format!("sport = :{}", addr.port())])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // State Recv-Q Send-Q Local Peer; for a listening socket Send-Q is the backlog.
    let backlog: u64 = text
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("ss: {text:?} {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(
        backlog,
        somaxconn.max(4096).min(somaxconn),
        "backlog of the listener at {addr} (somaxconn {somaxconn}): {text}"
    );
    let fd = listening_socket_of(fleet.pid(), addr);
    if require(
        fd.is_some(),
        "pidfd_getfd(2) on sockvisor's listener not permitted",
    ) {
        let fd = fd.unwrap();
        assert!(
            nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::ReuseAddr).unwrap(),
            "SO_REUSEADDR on the listener"
        );
    }
}

/// docs/config.md: "Unknown `SOCKVISOR_*` variables are ignored with a warning (with a
/// suggestion when one is close to a key)".
#[test]
fn unknown_sockvisor_variables_are_ignored_with_a_warning() {
    let mut notify = NotifySocket::new();
    let fleet = sockvisor(
        &["--workers", "1", "--listen", "web=tcp://127.0.0.1:0"],
        vec![hello_bin().display().to_string()],
    )
    .env("SOCKVISOR_WROKERS", "3")
    .env("SOCKVISOR_ZQXJ", "1")
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("the fleet runs");
    let log = fleet.log();
    let warnings = warnings_and_errors(&log);
    assert!(
        warnings.iter().any(|l| l.contains(
            "ignoring unknown variable SOCKVISOR_WROKERS (did you mean SOCKVISOR_WORKERS?)"
        )),
        "{log}"
    );
    assert!(
        warnings
            .iter()
            .any(|l| l.ends_with("ignoring unknown variable SOCKVISOR_ZQXJ")),
        "{log}"
    );
    assert_eq!(
        fleet.status()["workers_wanted"],
        1,
        "the variable was ignored"
    );
}

// ------------------------------------------------------------------------------ privileges

/// docs/config.md: `group`: "run workers with this group" (with `user`; alone it is refused).
#[test]
fn workers_run_with_the_configured_group() {
    if !require(is_root(), "needs root to start workers as another user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let users = nix::unistd::Group::from_name("users")
        .unwrap()
        .expect("group users")
        .gid
        .as_raw();
    let mut notify = NotifySocket::new();
    let fleet = web_fleet(1, &["--user", "nobody", "--group", "users"], probe())
        .env("PROBE_DIR", dir.path())
        .notify(&notify)
        .start();
    let report = wait_probe_reports(dir.path(), 1, &fleet).remove(0);
    assert_eq!(report["uid"], 65534, "{report}");
    assert_eq!(report["gid"], users, "{report}");
    let groups: Vec<u64> = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g.as_u64().unwrap())
        .collect();
    assert!(!groups.contains(&0), "no root group: {groups:?}");
    notify.wait_for("READY=1", T).expect("READY=1");

    // group without user: a configuration error naming the fix.
    let mut alone = sockvisor(
        &[
            "--workers",
            "1",
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--group",
            "users",
        ],
        vec![hello_bin().display().to_string()],
    )
    .start();
    let status = alone.wait(T).expect("exits");
    assert_eq!(status.code(), Some(78), "{}", alone.log());
    assert!(
        alone.log().contains("needs user as well"),
        "{}",
        alone.log()
    );
}

/// docs/control.md: "An existing directory is refused if it ... is owned by a user other than
/// root or sockvisor's own"; docs/reliability.md: "Refused with exit 78 and a message saying
/// why".
#[test]
fn a_control_directory_owned_by_another_user_is_refused() {
    if !require(
        is_root(),
        "needs root to make a directory owned by another user",
    ) {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("theirs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    nix::unistd::chown(&dir, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let control = dir.join("control.sock");
    let mut fleet = sockvisor(
        &[
            "--workers",
            "1",
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--control",
            control.to_str().unwrap(),
        ],
        vec![hello_bin().display().to_string()],
    )
    .start();
    let status = fleet.wait(T).expect("exits");
    let log = fleet.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(log.contains("owned by uid 65534"), "says why: {log}");
    assert!(!control.exists(), "nothing created in it");
}
