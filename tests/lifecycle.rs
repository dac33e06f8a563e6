//! Reload, scaling and the control socket (issue 5) against the real binary.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// A config with one listener `web` on port 0 (sockvisor logs the port it got:
/// `fleet.port("web")`; a reload keeps the listener).
fn write_config(path: &Path, workers: usize, command: &[String]) {
    let cmd: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
    std::fs::write(
        path,
        format!(
            "workers = {workers}\nready = \"notify\"\nready_timeout = \"5s\"\nreload_timeout = \"5s\"\nstop_timeout = \"5s\"\n\
             command = [{}]\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\n",
            cmd.join(", ")
        ),
    )
    .unwrap();
}

fn hello_cmd() -> Vec<String> {
    vec![hello_bin().display().to_string()]
}

fn start(config: &Path) -> (Fleet, NotifySocket) {
    let mut notify = NotifySocket::new();
    let fleet = FleetBuilder::new(["-c", config.to_str().unwrap()])
        .env("HELLO_READY", "1")
        .notify(&notify)
        .start();
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("not ready: {}", fleet.log()));
    (fleet, notify)
}

fn pids(fleet: &Fleet) -> BTreeSet<i64> {
    fleet.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect()
}

/// Wait until `sockvisor status` shows `n` ready workers and nothing else.
fn wait_workers(fleet: &Fleet, n: usize) {
    fleet.wait_status(&format!("{n} ready workers and nothing else"), |s| {
        let w = s["workers"].as_array().unwrap();
        w.len() == n && w.iter().all(|w| w["state"] == "ready")
    });
}

/// How reading one HTTP response ended.
enum Response {
    Complete(String),
    /// The server closed the connection (end of file) before the first byte of the answer:
    /// on a reused keep-alive connection, the one outcome an HTTP client retries (the server
    /// closed it as idle; the request never reached the application).
    ClosedBeforeAnyByte,
    /// Anything else: an error or a timeout, or end of file in the middle of the answer.
    Failed(String),
}

/// Read one HTTP response (headers + Content-Length body).
fn read_response(r: &mut BufReader<TcpStream>) -> Response {
    let mut head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) if head.is_empty() => return Response::ClosedBeforeAnyByte,
            Ok(0) => return Response::Failed(format!("end of file after {head:?}")),
            Ok(_) => {}
            Err(e) => return Response::Failed(format!("{e} after {head:?}{line:?}")),
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; len];
    if let Err(e) = r.read_exact(&mut body) {
        return Response::Failed(format!("{e} in the body after {head:?}"));
    }
    Response::Complete(head + &String::from_utf8_lossy(&body))
}

/// What the client threads saw. Every request is counted once: answered, retried (the one
/// allowed case, see `Response::ClosedBeforeAnyByte`), or failed.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    failed: AtomicU64,
    /// Requests retried on a new connection because a reused keep-alive connection was
    /// closed cleanly before any byte of their answer (a draining worker closing it as idle).
    retried: AtomicU64,
    /// The first failures, for the assertion message.
    failures: std::sync::Mutex<Vec<String>>,
}

impl Load {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(what);
        }
    }

    fn summary(&self) -> (u64, u64, u64, Vec<String>) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

/// Client threads until `stop`: new-connection-per-request and keep-alive.
fn run_load(port: u16, stop: Arc<AtomicBool>, load: Arc<Load>) -> Vec<std::thread::JoinHandle<()>> {
    let mut threads = Vec::new();
    for _ in 0..2 {
        let (stop, load) = (stop.clone(), load.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match http_get(port) {
                    Ok(b) if b.contains("hello from worker") => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(b) => load.fail(format!("new connection: bad answer {b:?}")),
                    Err(e) => load.fail(format!("new connection: {e}")),
                }
            }
        }));
    }
    for _ in 0..2 {
        let (stop, load) = (stop.clone(), load.clone());
        threads.push(std::thread::spawn(move || {
            let connect = || -> std::io::Result<BufReader<TcpStream>> {
                let s = TcpStream::connect(("127.0.0.1", port))?;
                s.set_read_timeout(Some(T))?;
                Ok(BufReader::new(s))
            };
            // The connection, and whether it already carried an answer (reused).
            let mut conn: Option<(BufReader<TcpStream>, bool)> = None;
            while !stop.load(Ordering::Relaxed) {
                let (c, reused) = match conn.take() {
                    Some(c) => c,
                    None => match connect() {
                        Ok(c) => (c, false),
                        Err(e) => {
                            load.fail(format!("keep-alive connect: {e}"));
                            continue;
                        }
                    },
                };
                let mut c = c;
                if let Err(e) = c.get_mut().write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") {
                    load.fail(format!("keep-alive write (reused: {reused}): {e}"));
                    continue;
                }
                match read_response(&mut c) {
                    Response::Complete(r) if r.contains("hello from worker") => {
                        load.ok.fetch_add(1, Ordering::Relaxed);
                        if !r.to_ascii_lowercase().contains("connection: close") {
                            conn = Some((c, true));
                        }
                    }
                    Response::Complete(r) => load.fail(format!("keep-alive: bad answer {r:?}")),
                    // Closed as idle by a draining worker: the request is sent again on a new
                    // connection (the next turn), as HTTP clients do.
                    Response::ClosedBeforeAnyByte if reused => {
                        load.retried.fetch_add(1, Ordering::Relaxed);
                    }
                    Response::ClosedBeforeAnyByte => {
                        load.fail("keep-alive: a new connection closed without an answer".into())
                    }
                    Response::Failed(e) => load.fail(format!("keep-alive (reused: {reused}): {e}")),
                }
            }
        }));
    }
    threads
}

#[test]
fn five_reloads_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 3, &hello_cmd());
    let (fleet, mut notify) = start(&config);
    let port = fleet.port("web");
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let threads = run_load(port, stop.clone(), load.clone());
    let mut seen_pids = pids(&fleet);
    for round in 1..=5 {
        let before = pids(&fleet);
        let out = fleet.ctl(&["reload"]);
        assert!(
            out.status.success(),
            "reload {round}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fleet.log()
        );
        assert!(String::from_utf8_lossy(&out.stdout)
            .contains(&format!("generation {} serving", round + 1)));
        wait_workers(&fleet, 3);
        let s = fleet.status();
        assert_eq!(s["generation"], round + 1);
        let after = pids(&fleet);
        assert!(
            before.is_disjoint(&after),
            "every worker replaced: {before:?} -> {after:?}"
        );
        assert!(s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["generation"] == round + 1));
        seen_pids.extend(after);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (ok, failed, retried, failures) = load.summary();
    eprintln!("5 reloads under load: {ok} requests ok, {failed} failed, {retried} retried after a keep-alive close, {} worker pids", seen_pids.len());
    assert_eq!(failed, 0, "failed requests: {failures:#?}\n{}", fleet.log());
    assert!(ok > 100, "the load ran ({ok})");
    assert_eq!(seen_pids.len(), 18);
    // RELOADING=1 with MONOTONIC_USEC, then READY=1, for each reload.
    let all = notify.all();
    let reloading = all
        .iter()
        .filter(|m| m.contains("RELOADING=1") && m.contains("MONOTONIC_USEC="))
        .count();
    assert_eq!(reloading, 5, "{all:?}");
    assert_eq!(
        all.iter()
            .filter(|m| m.lines().any(|l| l == "READY=1"))
            .count(),
        6
    );
}

#[test]
fn a_broken_config_is_refused_and_the_fleet_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 2, &hello_cmd());
    let (fleet, mut notify) = start(&config);
    let port = fleet.port("web");
    let before = pids(&fleet);
    std::fs::write(&config, "workers = \"many\"\n").unwrap();
    let out = fleet.ctl(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload refused") && err.contains("workers"),
        "{err}"
    );
    notify
        .wait_for("STATUS=reload refused", T)
        .expect("the refusal is in STATUS=");
    assert_eq!(pids(&fleet), before, "old workers unchanged");
    assert!(http_get(port).unwrap().contains("hello from worker"));
    // SIGHUP takes the same path.
    fleet.signal(libc::SIGHUP);
    fleet.wait_log("reload (SIGHUP) refused", T);
    assert_eq!(pids(&fleet), before);
}

#[test]
fn a_generation_that_never_gets_ready_is_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 2, &hello_cmd());
    let (fleet, _notify) = start(&config);
    let port = fleet.port("web");
    let before = pids(&fleet);
    // The new command never says READY=1.
    write_config(&config, 2, &["/bin/sleep".to_string(), "60".to_string()]);
    let out = fleet.ctl(&["reload"]);
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload failed") && err.contains("generation 1 kept"),
        "{err}"
    );
    // The new generation's worker may still be on its way out (draining): the ones that
    // serve are the old ones.
    let serving: BTreeSet<i64> = fleet.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["state"] == "ready")
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(serving, before, "the old generation still serves");
    assert_eq!(fleet.status()["generation"], 1);
    assert!(http_get(port).unwrap().contains("hello from worker"));
    fleet.wait_log("rolling back to generation 1", T);
}

#[test]
fn scaling_by_signal_and_command_without_failing_requests() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 2, &hello_cmd());
    let (fleet, _notify) = start(&config);
    let port = fleet.port("web");
    let stop = Arc::new(AtomicBool::new(false));
    let load = Arc::new(Load::default());
    let threads = run_load(port, stop.clone(), load.clone());
    fleet.signal(libc::SIGTTIN);
    wait_workers(&fleet, 3);
    fleet.signal(libc::SIGTTOU);
    wait_workers(&fleet, 2);
    let out = fleet.ctl(&["scale", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_workers(&fleet, 4);
    let out = fleet.ctl(&["scale", "1"]);
    assert!(out.status.success());
    wait_workers(&fleet, 1);
    let slots: Vec<u64> = fleet.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots, [0]);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (ok, failed, retried, failures) = load.summary();
    eprintln!("scaling under load: {ok} requests ok, {failed} failed, {retried} retried after a keep-alive close");
    assert_eq!(failed, 0, "failed requests: {failures:#?}\n{}", fleet.log());
    assert!(ok > 0, "the load ran");
    assert!(
        !fleet.ctl(&["scale", "0"]).status.success(),
        "scale 0 is refused"
    );
}

#[test]
fn status_matches_the_fleet() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 3, &hello_cmd());
    let (fleet, _notify) = start(&config);
    let s = fleet.status();
    assert_eq!(s["pid"], fleet.pid());
    assert_eq!(s["state"], "running");
    assert_eq!(s["workers_wanted"], 3);
    let workers = s["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 3);
    let children: BTreeSet<i64> = children(fleet.pid()).into_iter().map(i64::from).collect();
    for w in workers {
        assert_eq!(w["state"], "ready");
        assert!(
            children.contains(&w["pid"].as_i64().unwrap()),
            "{w} is a live child of sockvisor"
        );
    }
    let table = String::from_utf8_lossy(&fleet.ctl(&["status"]).stdout).into_owned();
    assert!(table.contains("SLOT") && table.contains("ready"), "{table}");
}

#[test]
fn another_user_is_refused_by_the_control_socket() {
    if !require(
        is_root(),
        "needs root to run the client as another user (nobody)",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 1, &hello_cmd());
    let (fleet, _notify) = start(&config);
    let out = Command::new(sockvisor_bin())
        .args(["status", "--control"])
        .arg(&fleet.control)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("permission denied"), "{err}");
}

use std::os::unix::process::CommandExt;

#[test]
fn a_reload_before_the_fleet_is_ready_sends_no_early_ready() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 2, &hello_cmd());
    let mut notify = NotifySocket::new();
    let fleet = FleetBuilder::new(["-c", config.to_str().unwrap()])
        .env("HELLO_READY", "1")
        .env("HELLO_READY_DELAY_MS", "1500")
        .notify(&notify)
        .start();
    let port = fleet.port("web");
    fleet.wait_log("worker 1 started", T);
    let out = fleet.ctl(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    notify
        .wait_for("READY=1", T)
        .expect("READY=1 once the fleet is ready");
    let log = fleet.log();
    // The test means something only if the reload began while the fleet was starting.
    let reload_began = log
        .find("reload: starting generation 2")
        .unwrap_or_else(|| panic!("no reload: {log}"));
    let fleet_ready = log
        .find("fleet ready")
        .unwrap_or_else(|| panic!("no fleet ready: {log}"));
    assert!(
        reload_began < fleet_ready,
        "the reload began after the fleet was ready: {log}"
    );
    let all = notify.all();
    let first_ready = all
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap();
    assert!(
        !all[first_ready].contains("STATUS=reload"),
        "the first READY=1 is the fleet's, not the end of a reload: {all:?}\n{log}"
    );
    assert!(
        !all[..first_ready].iter().any(|m| m.contains("RELOADING=1")),
        "no RELOADING=1 before the first READY=1: {all:?}"
    );
    assert!(http_get(port).unwrap().contains("hello from worker"));
}
