//! Health and readiness (issue 4) against the real binary: sockvisor is its workers' systemd
//! (readiness, worker watchdog, STOPPING=1, strangers and garbage on their notify socket) and
//! reports honestly upstream (READY=1 after the fleet, WATCHDOG=1 only while healthy,
//! WATCHDOG=trigger after the grace). Interop: workers written with the sd-notify,
//! libsystemd and listenfd crates and with python work unchanged.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `sockvisor --workers N --listen web=tcp://127.0.0.1:0 OPTIONS -- COMMAND` (the port:
/// `fleet.port("web")`).
fn fleet(workers: usize, options: &[&str], command: Vec<String>) -> FleetBuilder {
    let mut args = s(&[
        "--workers",
        &workers.to_string(),
        "--listen",
        "web=tcp://127.0.0.1:0",
    ]);
    args.extend(s(options));
    args.push("--".into());
    args.extend(command);
    FleetBuilder::new(args)
}

fn probe() -> Vec<String> {
    vec![python().to_string(), probe_script().display().to_string()]
}

/// Pids of `worker SLOT started (pid P, ...)` lines, in order.
fn started_pids(log: &str, slot: usize) -> Vec<i32> {
    let prefix = format!("worker {slot} started (pid ");
    log.lines()
        .filter_map(|l| l.split_once(&prefix))
        .filter_map(|(_, rest)| rest.split([',', ')']).next()?.parse().ok())
        .collect()
}

/// The pid a `tcp_request` reply names (`probe <id> <pid>`, `<lib> <pid>`).
fn reply_pid(reply: &str) -> i32 {
    reply
        .split_whitespace()
        .last()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in reply {reply:?}"))
}

/// `{"cmd":"status"}` on the fleet's control socket.
fn control_status(fleet: &Fleet) -> serde_json::Value {
    let mut c = UnixStream::connect(&fleet.control).expect("control socket");
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    let mut line = String::new();
    BufReader::new(c).read_line(&mut line).unwrap();
    let reply: serde_json::Value = serde_json::from_str(&line).expect("a JSON reply");
    assert_eq!(reply["ok"], true, "{reply}");
    reply["status"].clone()
}

/// Poll the control socket until `pred` holds (no other signal exists for "sockvisor has read
/// this datagram").
fn wait_status(fleet: &Fleet, what: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    fleet.wait_until(&format!("status showing {what}"), T, || {
        pred(&control_status(fleet)).then_some(())
    })
}

/// Wait until slot 0 got ready a second time (its first worker was replaced).
fn wait_replaced(fleet: &Fleet) {
    fleet.wait_until("a ready replacement in slot 0", T, || {
        (fleet.log().matches("worker 0 ready").count() >= 2).then_some(())
    });
}

/// Stopped processes are continued when the test ends, pass or fail.
struct Stopped(Vec<i32>);

impl Stopped {
    fn new(pids: Vec<i32>) -> Stopped {
        for &p in &pids {
            // SAFETY: kill(2) on a worker of the fleet this test started.
            unsafe { libc::kill(p, libc::SIGSTOP) };
        }
        Stopped(pids)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for &p in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(p, libc::SIGCONT) };
        }
    }
}

#[test]
fn ready_upstream_only_after_every_worker_said_ready() {
    let mut notify = NotifySocket::new();
    let fleet = fleet(3, &["--ready", "notify"], probe())
        .env("PROBE_READY_DELAY", "0,0.6,1.2")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    // While workers get ready, sockvisor asks systemd for more start time.
    notify
        .wait_for("EXTEND_TIMEOUT_USEC=", T)
        .unwrap_or_else(|| panic!("no EXTEND_TIMEOUT_USEC: {}", fleet.log()));
    fleet.wait_log("worker 0 ready", T);
    assert!(
        !notify
            .all()
            .iter()
            .any(|m| m.lines().any(|l| l == "READY=1")),
        "READY=1 after one worker of three: {:?}\n{}",
        notify.seen,
        fleet.log()
    );
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    let log = fleet.log();
    for slot in 0..3 {
        assert!(
            log.contains(&format!("worker {slot} ready (pid")),
            "READY=1 upstream before worker {slot} was ready:\n{log}"
        );
    }
    assert!(log.find("worker 2 ready").unwrap() < log.find("fleet ready").unwrap());
    assert!(tcp_request(port, b"hi\n").unwrap().starts_with("probe "));
}

#[test]
fn a_worker_never_ready_is_killed_after_the_ready_timeout_and_never_served() {
    let stats = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = fleet(
        1,
        &["--ready", "notify", "--ready-timeout", "500ms"],
        vec![hello_bin().display().to_string()],
    )
    .env("BENCH_STATS_DIR", stats.path())
    .notify(&notify)
    .start();
    let port = fleet.port("web");
    fleet.wait_log("worker 0 started (pid", T);
    // A client waits: no worker may get its connection while none is ready.
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    fleet.wait_log("not ready within the ready timeout; sending SIGTERM", T);
    let first = started_pids(&fleet.log(), 0)[0];
    // hello writes "<conns> <reqs>" when SIGTERM made it exit.
    let stats_file = stats.path().join(first.to_string());
    fleet.wait_until(&format!("stats from pid {first}"), T, || {
        stats_file.exists().then_some(())
    });
    assert_eq!(
        std::fs::read_to_string(&stats_file).unwrap().trim(),
        "0 0",
        "the never-ready worker received a connection"
    );
    // Its exit is a failure of its slot: restarted with backoff.
    fleet.wait_log(&format!("(pid {first}) exited with status 0 after"), T);
    fleet.wait_until("the slot's restart", T, || {
        (started_pids(&fleet.log(), 0).len() >= 2).then_some(())
    });
    assert!(notify.wait_for("READY=1", Duration::ZERO).is_none());
    client.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(client.read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client was answered by a worker that was never ready"
    );
}

#[test]
fn a_worker_that_stops_pinging_is_killed_with_sigabrt_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(
        1,
        &["--ready", "notify", "--worker-watchdog", "1s"],
        probe(),
    )
    // Four pings, 500 ms apart, then silent.
    .env("PROBE_WATCHDOG", "1")
    .env("PROBE_WATCHDOG_PINGS", "4")
    .env("PROBE_DIR", dir.path())
    .start();
    let port = fleet.port("web");
    fleet.wait_log("watchdog timeout; sending SIGABRT", T);
    fleet.wait_log("killed by SIGABRT after", T);
    let first = started_pids(&fleet.log(), 0)[0];
    // The fourth ping goes 1.5 s after the first, past the 1 s watchdog that started at
    // exec: it was sent only if the pings before it re-armed the watchdog. (A count, not a
    // clock: a slow machine only delays the pings and the kill.)
    let pings =
        std::fs::read_to_string(dir.path().join(format!("pings-{first}"))).unwrap_or_default();
    assert_eq!(
        pings,
        "4",
        "its pings kept it alive past one watchdog period: {}",
        fleet.log()
    );
    // Replaced, and the replacement serves.
    fleet.wait_until("a ready replacement", T, || {
        let log = fleet.log();
        (started_pids(&log, 0).len() >= 2 && log.matches("worker 0 ready").count() >= 2)
            .then_some(())
    });
    let second = started_pids(&fleet.log(), 0)[1];
    let reply = tcp_request(port, b"hi\n").unwrap();
    assert_eq!(reply_pid(&reply), second, "{reply}");
}

#[test]
fn watchdog_trigger_from_a_worker_kills_it_with_sigabrt_and_replaces_it() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(1, &["--ready", "notify"], probe())
        .env("PROBE_DIR", dir.path())
        .env("PROBE_NOTIFY_AFTER_READY", "WATCHDOG=trigger")
        .env("PROBE_NOTIFY_ONCE", "1")
        .start();
    let port = fleet.port("web");
    fleet.wait_log("asked for it (WATCHDOG=trigger); sending SIGABRT", T);
    fleet.wait_log("killed by SIGABRT after", T);
    wait_replaced(&fleet);
    let pids = started_pids(&fleet.log(), 0);
    assert_eq!(pids.len(), 2, "{}", fleet.log());
    assert!(!alive(pids[0]));
    assert_eq!(reply_pid(&tcp_request(port, b"hi\n").unwrap()), pids[1]);
}

#[test]
fn upstream_watchdog_pauses_while_every_worker_hangs_then_triggers_and_resumes() {
    let mut notify = NotifySocket::new();
    let fleet = fleet(
        2,
        &[
            "--ready",
            "notify",
            "--worker-watchdog",
            "1s",
            "--unhealthy-grace",
            "1s",
            "--stop-timeout",
            "30s",
        ],
        probe(),
    )
    .env("PROBE_WATCHDOG", "1")
    // systemd's watchdog for sockvisor: a ping every 150 ms. No WATCHDOG_PID (sockvisor's
    // pid is unknown before spawn; unset means "this process").
    .env("WATCHDOG_USEC", "300000")
    .notify(&notify)
    .start();
    let port = fleet.port("web");
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    assert!(notify.wait_for_new("WATCHDOG=1", T).is_some(), "no pings");
    assert!(notify.wait_for_new("WATCHDOG=1", T).is_some(), "no pings");

    // The live workers, whatever restarts a slow start may have caused.
    let workers: Vec<i32> = control_status(&fleet)["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(workers.len(), 2);
    let stopped = Stopped::new(workers.clone());
    fleet.wait_log("withholding watchdog pings", T);
    let from = notify.all().len();
    notify
        .wait_for_new("WATCHDOG=trigger", T)
        .unwrap_or_else(|| panic!("no WATCHDOG=trigger: {}", fleet.log()));
    fleet.wait_log("fleet unhealthy for 1s", T);
    let during: Vec<String> = notify.all()[from..].to_vec();
    assert!(
        !during.iter().any(|m| m.lines().any(|l| l == "WATCHDOG=1")),
        "WATCHDOG=1 while no worker was healthy: {during:?}"
    );
    assert!(
        notify
            .wait_for_new("WATCHDOG=1", Duration::from_millis(600))
            .is_none(),
        "pings resumed while every worker still hangs"
    );
    let triggers = notify
        .all()
        .iter()
        .filter(|m| m.lines().any(|l| l == "WATCHDOG=trigger"))
        .count();
    assert_eq!(triggers, 1, "one trigger per unhealthy period");
    assert!(fleet.log().contains("watchdog timeout; sending SIGABRT"));

    // Continued, the hung workers take their SIGABRT; their replacements bring pings back.
    drop(stopped);
    notify
        .wait_for_new("WATCHDOG=1", T)
        .unwrap_or_else(|| panic!("pings never resumed: {}", fleet.log()));
    fleet.wait_log("fleet healthy again", T);
    let log = fleet.log();
    for pid in workers {
        assert!(
            log.contains(&format!("(pid {pid}) killed by SIGABRT")),
            "pid {pid}:\n{log}"
        );
    }
    assert!(tcp_request(port, b"hi\n").unwrap().starts_with("probe "));
}

#[test]
fn a_stranger_cannot_make_the_fleet_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = fleet(1, &["--ready", "notify"], probe())
        .env("PROBE_DIR", dir.path())
        .env("PROBE_NO_READY", "1")
        .notify(&notify)
        .start();
    let report = wait_probe_reports(dir.path(), 1, &fleet).remove(0);
    let workers_socket = report["env"]["NOTIFY_SOCKET"].as_str().unwrap().to_string();
    assert_ne!(Path::new(&workers_socket), notify.path);
    // The test process is not a worker: its READY=1 (and STOPPING=1) change nothing.
    send_notify(&workers_socket, b"READY=1\nSTATUS=forged\n").unwrap();
    fleet.wait_log(
        &format!(
            "ignored a notification from pid {} (not a live worker",
            std::process::id()
        ),
        T,
    );
    assert!(
        notify
            .wait_for("READY=1", Duration::from_millis(500))
            .is_none(),
        "a stranger's READY=1 made the fleet ready: {}",
        fleet.log()
    );
    let st = control_status(&fleet);
    assert_eq!(st["state"], "starting", "{st:#}");
    assert_eq!(st["workers"][0]["state"], "starting", "{st:#}");
    assert!(st["workers"][0]["status"].is_null(), "{st:#}");
}

#[test]
fn stopping_from_a_worker_is_not_forwarded_and_ends_its_dispatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = fleet(2, &["--ready", "notify"], probe())
        .env("PROBE_DIR", dir.path())
        .env("PROBE_NOTIFY_AFTER_READY", "STOPPING=1")
        .env("PROBE_NOTIFY_ONCE", "1")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    fleet.wait_log("is stopping (STOPPING=1)", T);
    fleet.wait_log("worker 0 ready", T);
    fleet.wait_log("worker 1 ready", T);
    let log = fleet.log();
    let stopping: i32 = log
        .lines()
        .find(|l| l.contains("is stopping (STOPPING=1)"))
        .and_then(|l| l.split("(pid ").nth(1))
        .and_then(|r| r.split(')').next())
        .and_then(|p| p.parse().ok())
        .unwrap();
    for _ in 0..10 {
        let reply = tcp_request(port, b"hi\n").unwrap();
        assert_ne!(
            reply_pid(&reply),
            stopping,
            "a connection went to the worker that said STOPPING=1"
        );
    }
    assert!(alive(stopping), "it stops when it likes");
    assert!(
        !notify
            .all()
            .iter()
            .any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "a worker's STOPPING=1 reached systemd: {:?}",
        notify.seen
    );
    let st = control_status(&fleet);
    let w = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == stopping)
        .cloned()
        .unwrap();
    assert_eq!(w["state"], "stopping", "{st:#}");
    // sockvisor's own STOPPING=1 still goes up when it stops.
    fleet.signal(libc::SIGTERM);
    notify
        .wait_for("STOPPING=1", T)
        .unwrap_or_else(|| panic!("no STOPPING=1 at stop: {}", fleet.log()));
    assert_eq!(fleet.wait(T).and_then(|s| s.code()), Some(0));
}

#[test]
fn garbage_and_64k_datagrams_are_survived() {
    use std::os::unix::ffi::OsStrExt;
    let mut notify = NotifySocket::new();
    let garbage = std::ffi::OsStr::from_bytes(
        b"\xff\xfe\x01garbage\n==\n=1\nREADY\nREADY=yes\nWATCHDOG=maybe\nWATCHDOG_USEC=-5\n\
          EXTEND_TIMEOUT_USEC=99999999999999999999999\nERRNO=x\nSTATUS=\x1b[31mred\xc3\n",
    );
    let fleet = fleet(2, &["--ready", "notify"], probe())
        .env("PROBE_NOTIFY_AFTER_READY", garbage)
        .env("PROBE_BIG", "1")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    // "STATUS=after big" comes after the garbage and the 64 KiB datagram: once sockvisor shows
    // it, it has read both.
    wait_status(&fleet, "\"after big\" for both workers", |st| {
        st["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["status"] == "after big"))
    });
    let st = control_status(&fleet);
    assert_eq!(st["state"], "running", "{st:#}");
    for _ in 0..4 {
        assert!(tcp_request(port, b"hi\n").unwrap().starts_with("probe "));
    }
    let log = fleet.log();
    assert_eq!(
        warnings_and_errors(&log),
        Vec::<&str>::new(),
        "garbage is ignored silently, as systemd does: {log}"
    );
    assert!(!log.contains("restarting in"), "{log}");
    assert_eq!(
        fleet.log().matches(" started (pid ").count(),
        2,
        "no worker was replaced"
    );
}

/// Run COMMAND under `--dispatch shared --ready notify` (a plain listening socket at fd 3, as
/// systemd gives it): it must get ready, and serve a reply starting with `prefix`.
fn interop(command: Vec<String>, prefix: &str) {
    interop_in(command, prefix, None)
}

/// `interop`, with `RUNTIME_DIRECTORY` set as systemd's `RuntimeDirectory=` does.
fn interop_in(command: Vec<String>, prefix: &str, runtime_directory: Option<&Path>) {
    let mut notify = NotifySocket::new();
    let mut builder =
        fleet(2, &["--dispatch", "shared", "--ready", "notify"], command).notify(&notify);
    if let Some(rd) = runtime_directory {
        builder = builder.env("RUNTIME_DIRECTORY", rd);
    }
    let fleet = builder.start();
    let port = fleet.port("web");
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("{prefix}: no READY=1: {}", fleet.log()));
    let log = fleet.log();
    assert!(log.contains("worker 0 ready") && log.contains("worker 1 ready"));
    let pids: Vec<i32> = (0..2).map(|slot| started_pids(&log, slot)[0]).collect();
    for _ in 0..4 {
        let reply = tcp_request(port, b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(reply.starts_with(prefix), "{prefix}: {reply:?}");
        assert!(pids.contains(&reply_pid(&reply)), "{reply} from {pids:?}");
    }
    let st = control_status(&fleet);
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["state"], "ready", "{st:#}");
        assert!(
            w["status"].as_str().is_some_and(|s| s.contains("serving")),
            "STATUS= from the worker: {st:#}"
        );
    }
}

/// The `sd-notify` crate (0.5) only speaks paths, not the abstract `@name` sockvisor gives
/// workers outside systemd: it works under `RuntimeDirectory=`, where workers get
/// `$RUNTIME_DIRECTORY/workers/notify.sock` (docs/health.md).
#[test]
fn interop_sd_notify_crate() {
    let rd = tempfile::tempdir().unwrap();
    interop_in(
        vec![example_bin("interop_sdnotify").display().to_string()],
        "sd-notify ",
        Some(rd.path()),
    );
}

#[test]
fn interop_libsystemd_crate() {
    interop(
        vec![example_bin("interop_libsystemd").display().to_string()],
        "libsystemd ",
    );
}

#[test]
fn interop_listenfd_crate() {
    interop(
        vec![example_bin("interop_listenfd").display().to_string()],
        "listenfd ",
    );
}

#[test]
fn interop_python_plain_socket() {
    interop(probe(), "probe ");
}

#[test]
fn interop_python_systemd_daemon() {
    if !require(
        python_imports(python(), "systemd.daemon"),
        &format!(
            "{} cannot import systemd.daemon (apt-get install python3-systemd)",
            python()
        ),
    ) {
        return;
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/interop_systemd_daemon.py");
    interop(
        vec![python().to_string(), script.display().to_string()],
        "systemd.daemon ",
    );
}

#[test]
fn extend_timeout_usec_gives_a_slow_worker_more_time_to_get_ready() {
    let mut notify = NotifySocket::new();
    // The worker must say EXTEND_TIMEOUT_USEC= within the ready timeout: 2 s leaves room for
    // Python's start on a loaded machine (400 ms did not, under a parallel stress run).
    let fleet = fleet(1, &["--ready", "notify", "--ready-timeout", "2s"], probe())
        .env("PROBE_NOTIFY_AT_START", "EXTEND_TIMEOUT_USEC=10000000")
        .env("PROBE_READY_DELAY", "2.5")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    let log = fleet.log();
    assert!(!log.contains("not ready within"), "{log}");
    assert_eq!(started_pids(&log, 0).len(), 1, "{log}");
    assert!(tcp_request(port, b"hi\n").unwrap().starts_with("probe "));
}

#[test]
fn a_worker_that_says_stopping_but_lingers_is_killed_after_the_stop_timeout() {
    // systemd treats STOPPING=1 as if it had sent SIGTERM: the stop timeout runs, then SIGKILL.
    let dir = tempfile::tempdir().unwrap();
    let fleet = fleet(
        1,
        &["--ready", "notify", "--stop-timeout", "500ms"],
        probe(),
    )
    .env("PROBE_DIR", dir.path())
    .env("PROBE_NOTIFY_AFTER_READY", "STOPPING=1")
    .env("PROBE_NOTIFY_ONCE", "1")
    .start();
    let port = fleet.port("web");
    fleet.wait_log("is stopping (STOPPING=1)", T);
    fleet.wait_log("did not stop within the stop timeout; sending SIGKILL", T);
    fleet.wait_log("killed by SIGKILL", T);
    wait_replaced(&fleet);
    let pids = started_pids(&fleet.log(), 0);
    assert_eq!(pids.len(), 2, "{}", fleet.log());
    assert!(!alive(pids[0]));
    assert_eq!(reply_pid(&tcp_request(port, b"hi\n").unwrap()), pids[1]);
}

#[test]
fn min_ready_lets_the_fleet_report_ready_before_a_slow_worker() {
    let mut notify = NotifySocket::new();
    // Worker 2 needs 30 s; with min_ready = 2 the fleet is ready once 0 and 1 are.
    let fleet = fleet(3, &["--ready", "notify", "--min-ready", "2"], probe())
        .env("PROBE_READY_DELAY", "0,0,30")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    let ready = notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    assert!(ready.contains("STATUS=2/3 workers ready"), "{ready}");
    let log = fleet.log();
    assert!(!log.contains("worker 2 ready"), "{log}");
    // The slow worker gets no connection while it starts.
    for _ in 0..6 {
        let reply = tcp_request(port, b"hi\n").unwrap();
        assert!(!reply.starts_with("probe 2 "), "{reply}");
    }
}

#[test]
fn a_worker_can_set_its_own_watchdog_timeout() {
    // No worker_watchdog in the config: the worker asks for 700 ms itself and pings once
    // (WATCHDOG_USEC is not in its environment, so the probe's periodic pinging is off), then
    // goes silent: it is aborted like any watchdog miss.
    let fleet = fleet(1, &["--ready", "notify"], probe())
        .env(
            "PROBE_NOTIFY_AFTER_READY",
            "WATCHDOG_USEC=700000\nWATCHDOG=1",
        )
        .start();
    fleet.wait_log("watchdog timeout; sending SIGABRT", T);
    fleet.wait_log("killed by SIGABRT", T);
}
