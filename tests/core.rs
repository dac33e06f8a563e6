//! The core fleet (issue 2) against the real binary: activation or self-bind, the worker
//! environment, restarts with backoff, giving up, stop, parent death, bad input.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// A probe fleet on a TCP listener `web` and a UDP listener `dns`, both on port 0 (read them
/// with `fleet.port("web")`).
fn probe_fleet(workers: usize, probe_dir: &std::path::Path) -> FleetBuilder {
    FleetBuilder::new([
        "--workers".to_string(),
        workers.to_string(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--listen".into(),
        "dns=udp://127.0.0.1:0".into(),
        "--dispatch".into(),
        "shared".into(),
        "--ready".into(),
        "notify".into(),
        "--".into(),
        python().into(),
        probe_script().display().to_string(),
    ])
    .env("PROBE_DIR", probe_dir)
}

/// What every worker of a `web` (tcp) + `dns` (udp) fleet must see.
fn check_worker_reports(
    reports: &[serde_json::Value],
    workers: usize,
    systemd_notify: &std::path::Path,
) {
    assert_eq!(
        reports.len(),
        workers,
        "one report per worker: {reports:#?}"
    );
    let mut ids = BTreeSet::new();
    for r in reports {
        let pid = r["pid"].as_i64().unwrap();
        assert_eq!(
            r["listen_pid"],
            pid.to_string(),
            "LISTEN_PID is the worker's own pid"
        );
        assert_eq!(r["listen_fds"], "2");
        assert_eq!(r["listen_fdnames"], "web:dns");
        assert_eq!(
            r["open_fds"],
            serde_json::json!([0, 1, 2, 3, 4]),
            "no other fd above 2"
        );
        assert_eq!(r["fds"]["3"]["type"], "SOCK_STREAM");
        assert_eq!(r["fds"]["3"]["listening"], true);
        assert_eq!(r["fds"]["3"]["family"], "AF_INET");
        assert_eq!(r["fds"]["4"]["type"], "SOCK_DGRAM");
        assert_eq!(r["fds"]["3"]["inheritable"], true);
        let env = r["env"].as_object().unwrap();
        let keys: BTreeSet<&str> = env.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "LISTEN_FDNAMES",
                "LISTEN_FDS",
                "LISTEN_PID",
                "NOTIFY_SOCKET",
                "SOCKVISOR_WORKER_ID"
            ]),
            "no systemd or sockvisor variable leaks"
        );
        assert_ne!(
            env["NOTIFY_SOCKET"].as_str().unwrap(),
            systemd_notify.to_str().unwrap(),
            "workers get sockvisor's notify socket, not systemd's"
        );
        assert_eq!(r["sigmask"], "0000000000000000", "signal mask reset");
        ids.insert(r["worker_id"].as_str().unwrap().to_string());
    }
    let expected: BTreeSet<String> = (0..workers).map(|i| i.to_string()).collect();
    assert_eq!(ids, expected, "SOCKVISOR_WORKER_ID covers the slots");
}

fn answers_from_several_workers(port: u16) -> BTreeSet<String> {
    use std::io::{Read, Write};
    // The probe serves one connection at a time and waits for its request: while the first
    // connection says nothing, its worker is busy, so the second must be answered by another.
    let mut first = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut second = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut pids = BTreeSet::new();
    for s in [&mut second, &mut first] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"hi\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        pids.insert(
            reply
                .split_whitespace()
                .nth(2)
                .unwrap_or_default()
                .to_string(),
        );
    }
    pids
}

#[test]
fn self_bound_tcp_and_udp_with_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = probe_fleet(3, dir.path()).notify(&notify).start();
    let (port, udp_port) = (fleet.port("web"), fleet.port("dns"));
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
    check_worker_reports(&probe_reports(dir.path()), 3, &notify.path);
    assert!(
        answers_from_several_workers(port).len() > 1,
        "TCP answers come from more than one worker"
    );
    let echo = udp_request(udp_port, b"ping").unwrap();
    assert!(
        echo.starts_with("probe ") && echo.ends_with(": ping"),
        "{echo}"
    );
}

#[test]
fn under_systemd_socket_activate() {
    if !require(
        have_file("/usr/bin/systemd-socket-activate"),
        "systemd-socket-activate not installed (apt-get install systemd)",
    ) {
        return;
    }
    on_a_free_port(|port| {
        let dir = tempfile::tempdir().unwrap();
        let mut notify = NotifySocket::new();
        // Nested activation: the outer passes the TCP socket, the inner adds the UDP one; the
        // inner --fdname names both. -E passes NOTIFY_SOCKET through (it drops it otherwise).
        let sockvisor = sockvisor_bin().display().to_string();
        let fleet = FleetBuilder::program(
            "/usr/bin/systemd-socket-activate",
            [
                "-l".to_string(),
                format!("127.0.0.1:{port}"),
                "--fdname=web".into(),
                "-E".into(),
                "NOTIFY_SOCKET".into(),
                "-E".into(),
                "PROBE_DIR".into(),
                "-E".into(),
                "SOCKVISOR_LOG".into(),
                "--".into(),
                "/usr/bin/systemd-socket-activate".into(),
                "--datagram".into(),
                "-l".into(),
                format!("127.0.0.1:{port}"),
                "--fdname=web:dns".into(),
                "-E".into(),
                "NOTIFY_SOCKET".into(),
                "-E".into(),
                "PROBE_DIR".into(),
                "-E".into(),
                "SOCKVISOR_LOG".into(),
                "--".into(),
                sockvisor,
                "--workers".into(),
                "3".into(),
                "--listen".into(),
                "web".into(),
                "--listen".into(),
                "dns".into(),
                "--dispatch".into(),
                "shared".into(),
                "--ready".into(),
                "notify".into(),
                "--".into(),
                python().into(),
                probe_script().display().to_string(),
            ],
        )
        .env("PROBE_DIR", dir.path())
        .notify(&notify)
        .start();
        fleet.try_wait_log("Listening on", T)?;
        // systemd-socket-activate execs the inner one at the first connection, which binds
        // the UDP port and execs sockvisor.
        let first = match tcp_request(port, b"hi\n") {
            Ok(reply) => reply,
            Err(e) => {
                // The inner one could not bind the UDP port: it exits, and the connection
                // with it.
                fleet.wait_until("systemd-socket-activate to exit", T, || fleet.gone());
                return Err(format!("first connection: {e}; {}", fleet.log()));
            }
        };
        assert!(first.starts_with("probe "), "{first}");
        notify
            .wait_for("READY=1", T)
            .unwrap_or_else(|| panic!("no READY=1: {}", fleet.log()));
        check_worker_reports(&probe_reports(dir.path()), 3, &notify.path);
        assert!(answers_from_several_workers(port).len() > 1);
        let echo = udp_request(port, b"ping").unwrap();
        assert!(echo.ends_with(": ping"), "{echo}");
        Ok(())
    });
}

#[test]
fn notifies_ready_status_stopping_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = probe_fleet(2, dir.path()).notify(&notify).start();
    notify.wait_for("READY=1", T).expect("READY=1");
    fleet.signal(libc::SIGTERM);
    notify.wait_for("STOPPING=1", T).expect("STOPPING=1");
    assert!(fleet.wait(T).expect("exits").success());
    let pos = |needle: &str| {
        notify
            .seen
            .iter()
            .position(|m| m.lines().any(|l| l.starts_with(needle)))
            .unwrap()
    };
    let ready = pos("READY=1");
    let status = pos("STATUS=");
    let stopping = pos("STOPPING=1");
    assert!(status <= ready && ready < stopping, "{:?}", notify.seen);
    assert!(
        notify.seen[ready].contains("STATUS=2/2 workers ready, 0 restarts"),
        "{:?}",
        notify.seen
    );
}

#[test]
fn a_killed_worker_is_restarted_in_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let fleet = probe_fleet(2, dir.path()).notify(&notify).start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let reports = probe_reports(dir.path());
    let victim = reports.iter().find(|r| r["worker_id"] == "1").unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    // SAFETY: kill(2) on a worker of our fleet.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    notify
        .wait_for_new("STATUS=2/2 workers ready, 1 restarts", T)
        .unwrap_or_else(|| panic!("no restart: {:?}\n{}", notify.seen, fleet.log()));
    let reports = probe_reports(dir.path());
    let slot1: Vec<i64> = reports
        .iter()
        .filter(|r| r["worker_id"] == "1")
        .map(|r| r["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(slot1.len(), 2, "a new worker in slot 1: {reports:?}");
    assert!(slot1.iter().any(|&p| p as i32 != victim));
    assert!(!alive(victim));
}

#[test]
fn a_crash_looping_fleet_backs_off_then_gives_up() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "workers = 2\nrestart_delay = \"50ms\"\nrestart_delay_max = \"1s\"\ngive_up_after = 4\n\
         [[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\ndispatch = \"shared\"\n",
    )
    .unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = FleetBuilder::new([
        "-c".to_string(),
        config.path().display().to_string(),
        "--".into(),
        "/bin/false".into(),
    ])
    .notify(&notify)
    .start();
    let status = fleet.wait(T).expect("sockvisor gives up in bounded time");
    assert_eq!(
        status.code(),
        Some(69),
        "documented exit code: {}",
        fleet.log()
    );
    let log = fleet.log();
    for delay in [
        "restarting in 50ms",
        "restarting in 100ms",
        "restarting in 200ms",
        "restarting in 400ms",
    ] {
        assert!(log.contains(delay), "backoff grows ({delay}): {log}");
    }
    assert!(
        log.contains("giving up: every worker slot failed 4 times in a row"),
        "{log}"
    );
    notify
        .wait_for("ERRNO=", Duration::from_secs(1))
        .expect("ERRNO= sent upstream");
    assert!(
        notify
            .seen
            .iter()
            .any(|m| m.contains("STATUS=failed: every worker slot failed")),
        "{:?}",
        notify.seen
    );
    // The last STATUS= (what `systemctl status` keeps after the exit) still says why.
    let all = notify.all();
    let last = all
        .iter()
        .rev()
        .find_map(|m| m.lines().find_map(|l| l.strip_prefix("STATUS=")))
        .expect("a STATUS=");
    assert!(
        last.starts_with("stopping: ") && last.contains("every worker slot failed 4 times"),
        "{last}"
    );
}

#[test]
fn a_fatal_exit_code_is_not_restarted() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "workers = 1\nfatal_exit_codes = [78]\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\n",
    )
    .unwrap();
    let mut fleet = FleetBuilder::new([
        "-c".to_string(),
        config.path().display().to_string(),
        "--".into(),
        python().into(),
        probe_script().display().to_string(),
    ])
    .env("PROBE_EXIT", "78")
    .start();
    let status = fleet.wait(T).expect("exits");
    assert_eq!(status.code(), Some(69), "{}", fleet.log());
    let log = fleet.log();
    assert!(log.contains("declared fatal"), "{log}");
    assert!(!log.contains("restarting in"), "{log}");
}

#[test]
fn sigterm_stops_within_the_stop_timeout_even_if_a_worker_ignores_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = probe_fleet(2, dir.path())
        .env("PROBE_IGNORE_TERM", "1")
        .env("SOCKVISOR_STOP_TIMEOUT", "1s")
        .notify(&notify)
        .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let pids: Vec<i32> = probe_reports(dir.path())
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    fleet.signal(libc::SIGTERM);
    // The worker that ignores SIGTERM is SIGKILLed after the stop timeout (T is a safety
    // timeout, not the bound under test: the log line is).
    let status = fleet.wait(T).expect("exits after the stop timeout");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    for pid in pids {
        assert!(!alive(pid), "worker {pid} left behind");
    }
    assert!(fleet.log().contains("sending SIGKILL"), "{}", fleet.log());
}

#[test]
fn workers_die_with_sockvisor() {
    let dir = tempfile::tempdir().unwrap();
    let mut notify = NotifySocket::new();
    let mut fleet = probe_fleet(2, dir.path()).notify(&notify).start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let pids: Vec<i32> = probe_reports(dir.path())
        .iter()
        .map(|r| r["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2);
    fleet.signal(libc::SIGKILL);
    fleet.wait(T).expect("sockvisor dies");
    for pid in pids {
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "worker {pid} outlived sockvisor"
        );
    }
}

/// Bad input exits 78 with a message naming the problem, never a panic.
fn expect_config_error(args: &[&str], env: &[(&str, &str)], needle: &str) {
    let mut b = FleetBuilder::new(args);
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut fleet = b.start();
    let status = fleet.wait(T).expect("exits");
    let log = fleet.log();
    assert_eq!(status.code(), Some(78), "{args:?}: {log}");
    assert!(
        log.contains(needle),
        "{args:?}: expected {needle:?} in: {log}"
    );
    assert!(
        !log.contains("panicked") && !log.contains("RUST_BACKTRACE"),
        "{log}"
    );
}

#[test]
fn bad_input_is_a_clear_config_error() {
    let bad_toml = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad_toml.path(), "workers = 2\ncommand = [\"x\"\n").unwrap();
    let path = bad_toml.path().display().to_string();
    expect_config_error(&["-c", &path], &[], &format!("{path}:"));
    let unknown = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(unknown.path(), "wrkers = 2\n").unwrap();
    expect_config_error(
        &["-c", &unknown.path().display().to_string()],
        &[],
        "did you mean `workers`",
    );
    expect_config_error(
        &["--listen", "web=tcp://nowhere", "--", "/bin/true"],
        &[],
        "tcp://nowhere",
    );
    expect_config_error(
        &[
            "--workers",
            "0",
            "--listen",
            "tcp://127.0.0.1:0",
            "--",
            "/bin/true",
        ],
        &[],
        "workers",
    );
    expect_config_error(&["--listen", "tcp://127.0.0.1:0"], &[], "command");
    expect_config_error(
        &["--listen", "tcp://127.0.0.1:0", "--", "/no/such/program"],
        &[],
        "/no/such/program",
    );
}

/// Issue 14 item 21: a config error is one line in the format of every other error line,
/// `sockvisor: error WHERE: KEY: WHAT (FIX)`, and exits 78.
#[test]
fn config_errors_are_one_error_line() {
    let unknown = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(unknown.path(), "wrkers = 2\n").unwrap();
    let unknown = unknown.path().display().to_string();
    for args in [
        &["-c", unknown.as_str()][..],
        &["--json", "app"],
        &["--wrokers", "2", "app"],
        &["--listen", "web=tcp://nowhere", "--", "/bin/true"],
        &["--workers", "0", "--", "/bin/true"],
    ] {
        let mut fleet = FleetBuilder::new(args).start();
        let status = fleet.wait(T).expect("exits");
        let log = fleet.log();
        assert_eq!(status.code(), Some(78), "{args:?}: {log}");
        assert_eq!(log.lines().count(), 1, "{args:?}: {log}");
        assert!(log.starts_with("sockvisor: error "), "{args:?}: {log}");
        // `--json: --json only applies`: the key is not said twice.
        let words: Vec<&str> = log
            .split_whitespace()
            .map(|w| w.trim_matches(|c: char| ":,;()\"'`".contains(c)))
            .collect();
        assert!(
            words.windows(2).all(|w| w[0] != w[1]),
            "{args:?}: a word twice: {log}"
        );
    }
}

/// Issue 14 item 1: the worker count has a documented maximum, lower under a low fd limit;
/// more is a config error that names the limit.
#[test]
fn worker_count_is_bounded_by_a_ceiling_and_the_fd_limit() {
    expect_config_error(
        &["--workers", "100000", "--", "/bin/true"],
        &[],
        "--workers: 100000 is more than the maximum of 1024 workers",
    );
    expect_config_error(
        &["--", "/bin/true"],
        &[("SOCKVISOR_WORKERS", "18446744073709551615")],
        "SOCKVISOR_WORKERS: 18446744073709551615 is more than the maximum",
    );
    expect_config_error(&["scale", "100000"], &[], "scale: \"100000\" is too large");
    // Under a hard fd limit of 512: 256 fds kept for sockvisor itself, 4 per worker (the two
    // ends of its channel, twice during a reload) leave 64 workers.
    let sockvisor = sockvisor_bin().display().to_string();
    let limited = |workers: &str| {
        FleetBuilder::program(
            "/bin/sh",
            [
                "-c",
                "ulimit -n 512 && exec \"$0\" \"$@\"",
                &sockvisor,
                "--workers",
                workers,
                "--listen",
                "tcp://127.0.0.1:0",
                "--",
                "/bin/sleep",
                "30",
            ],
        )
        .start()
    };
    let mut fleet = limited("65");
    let status = fleet.wait(T).expect("exits");
    let log = fleet.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("65 is more than the 64 workers the fd limit of 512 allows")
            && log.contains("LimitNOFILE="),
        "{log}"
    );
    // Past the config check (which comes first): 64 workers are allowed.
    limited("64").wait_log("listening on", T);
}

/// Issue 14 item 20: `--listen web=PORT` is TCP on all addresses (dual-stack `[::]` where the
/// host has IPv6, as systemd's `ListenStream=PORT`); the test talks to it over loopback.
#[test]
fn a_bare_port_listens_on_all_addresses() {
    let mut notify = NotifySocket::new();
    let fleet = FleetBuilder::new([
        "--workers".to_string(),
        "1".into(),
        "--ready".into(),
        "notify".into(),
        "--listen".into(),
        "web=0".into(),
        "--".into(),
        hello_bin().display().to_string(),
    ])
    .env("HELLO_READY", "1")
    .notify(&notify)
    .start();
    let port = fleet.port("web");
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("not ready: {}", fleet.log()));
    let ipv6 = std::path::Path::new("/proc/net/if_inet6").exists();
    let all = if ipv6 { "[::]" } else { "0.0.0.0" };
    let log = fleet.log();
    assert!(
        log.contains(&format!("listening on {all}:{port} (web,")),
        "{log}"
    );
    let body = http_get(port).expect("IPv4 loopback reaches the listener");
    assert!(body.contains("hello from worker"), "{body}");
    if ipv6 {
        if let Ok(mut s) = std::net::TcpStream::connect(("::1", port)) {
            use std::io::{Read, Write};
            s.set_read_timeout(Some(T)).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            assert!(body.contains("hello from worker"), "{body}");
        }
    }
}

#[test]
fn wrong_sockets_from_systemd_are_named() {
    if !require(
        have_file("/usr/bin/systemd-socket-activate"),
        "systemd-socket-activate not installed (apt-get install systemd)",
    ) {
        return;
    }
    let sockvisor = sockvisor_bin().display().to_string();
    // systemd passes a datagram socket where a TCP listener is configured.
    on_a_free_port(|port| {
        let mut fleet = FleetBuilder::program(
            "/usr/bin/systemd-socket-activate",
            [
                "--datagram".to_string(),
                "-l".into(),
                format!("127.0.0.1:{port}"),
                "--fdname=web".into(),
                "-E".into(),
                "SOCKVISOR_LOG".into(),
                "--".into(),
                sockvisor.clone(),
                "--listen".into(),
                "web=tcp://127.0.0.1:0".into(),
                "--".into(),
                "/bin/true".into(),
            ],
        )
        .start();
        fleet.try_wait_log("Listening on", T)?;
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"x", ("127.0.0.1", port))
            .unwrap();
        let status = fleet.wait(T).expect("exits");
        let log = fleet.log();
        assert_eq!(status.code(), Some(78), "{log}");
        assert!(
            log.contains("fd 3") && log.contains("web"),
            "names the fd and its name: {log}"
        );
        Ok(())
    });
    // systemd passes "http" but the config wants "web".
    on_a_free_port(|port| {
        let mut fleet = FleetBuilder::program(
            "/usr/bin/systemd-socket-activate",
            [
                "-l".to_string(),
                format!("127.0.0.1:{port}"),
                "--fdname=http".into(),
                "-E".into(),
                "SOCKVISOR_LOG".into(),
                "--".into(),
                sockvisor.clone(),
                "--listen".into(),
                "web".into(),
                "--".into(),
                "/bin/true".into(),
            ],
        )
        .start();
        fleet.try_wait_log("Listening on", T)?;
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
        let status = fleet.wait(T).expect("exits");
        let log = fleet.log();
        assert_eq!(status.code(), Some(78), "{log}");
        assert!(
            log.contains("FileDescriptorName=web") && log.contains("http"),
            "says what was passed and the fix: {log}"
        );
        Ok(())
    });
}

#[test]
fn workers_start_with_default_signal_state() {
    // The shell only sets up the redirection and execs grep, which reads its own status: what
    // a program exec'd by sockvisor starts with (a shell's own state while it waits for a
    // child would be the shell's, not sockvisor's).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sig");
    let mut notify = NotifySocket::new();
    let script = format!(
        "exec grep -E '^Sig(Blk|Ign)' /proc/self/status > {}",
        out.display()
    );
    let fleet = FleetBuilder::new([
        "--workers",
        "1",
        "--listen",
        "tcp://127.0.0.1:0",
        "--dispatch",
        "shared",
        "--",
        "/bin/sh",
        "-c",
        &script,
    ])
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("READY=1");
    let sig = fleet.wait_until("the worker's signal state", T, || {
        let sig = std::fs::read_to_string(&out).unwrap_or_default();
        sig.contains("SigIgn").then_some(sig)
    });
    assert!(sig.contains("SigBlk:\t0000000000000000"), "{sig}");
    assert!(sig.contains("SigIgn:\t0000000000000000"), "{sig}");
}
