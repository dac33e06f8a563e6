//! Issue 16 items 3-5 against the real binary: smooth weighted round robin (per-generation
//! `weight`) under a channel policy and under reuseport, canary reloads (share, rollback on a
//! crash or a failed health check with no failed request, promotion, `RELOADING=1` ...
//! `READY=1` around the whole rollout), and active health checks (a worker that starts
//! answering 500 or stops answering leaves the rotation and is replaced).
//!
//! The figures (shares, time to leave the rotation) are printed as `MEASURE` lines:
//! `cargo test --test canary -- --nocapture --test-threads=1 2>&1 | grep MEASURE`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// A config file for `hello` workers on one listener `web` (port 0), rewritten for reloads.
struct Conf {
    _dir: tempfile::TempDir,
    path: PathBuf,
    dispatch: &'static str,
}

impl Conf {
    fn new(dispatch: &'static str) -> Conf {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.toml");
        Conf {
            _dir: dir,
            path,
            dispatch,
        }
    }

    /// Write the file: `workers`, `extra` TOML lines, and the command (`env` settings in
    /// front of hello, so that a generation can be given its own behaviour).
    fn write(&self, workers: usize, extra: &str, hello_env: &[&str]) {
        let mut command: Vec<String> = Vec::new();
        if !hello_env.is_empty() {
            command.push("/usr/bin/env".into());
            command.extend(hello_env.iter().map(|s| s.to_string()));
        }
        command.push(hello_bin().display().to_string());
        let command: Vec<String> = command.iter().map(|c| format!("{c:?}")).collect();
        let text = format!(
            "workers = {workers}\ndispatch = \"{}\"\nready = \"notify\"\ncommand = [{}]\n{extra}\n\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\n",
            self.dispatch,
            command.join(", ")
        );
        std::fs::write(&self.path, text).unwrap();
    }

    fn start(&self, notify: &NotifySocket) -> Fleet {
        let fleet = FleetBuilder::new(["-c", self.path.to_str().unwrap()])
            .env("HELLO_READY", "1")
            .notify(notify)
            .start();
        fleet
    }
}

/// Whether the kernel-steered policy can run here (root: CAP_BPF).
fn reuseport_possible() -> bool {
    require(
        is_root(),
        "dispatch reuseport needs root (CAP_BPF) to load its program",
    )
}

/// `GET /pid`: the status code and the pid that answered (`None` for an error answer).
fn get_pid(port: u16, timeout: Duration) -> std::io::Result<(u16, Option<i32>)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code: u16 = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {out:?}")))?;
    let pid = out
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| b.trim().parse().ok());
    Ok((code, pid.filter(|_| code == 200)))
}

/// `n` sequential requests: answers per pid; panics on a failed one.
fn count_by_pid(port: u16, n: usize) -> BTreeMap<i32, usize> {
    let mut per: BTreeMap<i32, usize> = BTreeMap::new();
    for i in 0..n {
        match get_pid(port, Duration::from_secs(10)) {
            Ok((200, Some(pid))) => *per.entry(pid).or_default() += 1,
            other => panic!("request {i} failed: {other:?}"),
        }
    }
    per
}

fn workers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["workers"].as_array().cloned().unwrap_or_default()
}

fn pids_of_generation(status: &serde_json::Value, generation: u64) -> Vec<i32> {
    workers(status)
        .iter()
        .filter(|w| w["generation"] == generation && w["state"] == "ready")
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

/// Wait until the canary is being observed; returns the status then.
fn wait_observing(fleet: &Fleet) -> serde_json::Value {
    fleet.wait_status("the canary to be observed", |s| {
        s["canary"]["phase"] == "observing"
    })
}

/// Old fleet of `old` workers of weight `w_old`; SIGHUP to a config with one canary of
/// weight `w_new` (no share: the weights decide) observed for 10 minutes; 4,000 connections.
fn weights_3_to_1(dispatch: &'static str) {
    let conf = Conf::new(dispatch);
    conf.write(1, "weight = 3", &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    conf.write(
        1,
        "weight = 1\ncanary_workers = 1\ncanary_observe = \"10min\"",
        &[],
    );
    fleet.signal(libc::SIGHUP);
    let status = wait_observing(&fleet);
    let old = pids_of_generation(&status, 1);
    let canary = pids_of_generation(&status, 2);
    assert_eq!((old.len(), canary.len()), (1, 1), "{status}");
    let per = count_by_pid(fleet.port("web"), 4_000);
    let (o, c) = (
        per.get(&old[0]).copied().unwrap_or(0),
        per.get(&canary[0]).copied().unwrap_or(0),
    );
    eprintln!("MEASURE weights 3:1 under {dispatch}, 4000 connections: old {o}, new {c}");
    assert_eq!(o + c, 4_000, "{per:?}");
    assert!(
        o.abs_diff(3_000) <= 40 && c.abs_diff(1_000) <= 40,
        "{per:?}"
    );
    let w: Vec<u64> = workers(&fleet.status())
        .iter()
        .map(|w| w["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(w, [3, 1]);
}

#[test]
fn weights_3_to_1_under_round_robin() {
    weights_3_to_1("round-robin");
}

#[test]
fn weights_3_to_1_under_reuseport() {
    if !reuseport_possible() {
        return;
    }
    weights_3_to_1("reuseport");
}

/// Three old workers; a canary of one at 10%; 2,000 connections.
fn canary_at_10_percent(dispatch: &'static str) {
    let conf = Conf::new(dispatch);
    conf.write(3, "", &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    conf.write(3, "canary_share = \"10%\"\ncanary_observe = \"10min\"", &[]);
    let reload = std::process::Command::new(sockvisor_bin())
        .args(["reload", "--canary", "1", "--control"])
        .arg(&fleet.control)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut reload = KillOnDrop(reload);
    let status = wait_observing(&fleet);
    assert_eq!(status["canary"]["share"], "10% by weight", "{status}");
    let old = pids_of_generation(&status, 1);
    let canary = pids_of_generation(&status, 2);
    assert_eq!((old.len(), canary.len()), (3, 1), "{status}");
    let per = count_by_pid(fleet.port("web"), 2_000);
    let c = per.get(&canary[0]).copied().unwrap_or(0);
    let o: usize = old.iter().map(|p| per.get(p).copied().unwrap_or(0)).sum();
    eprintln!("MEASURE canary 10% under {dispatch}, 2000 connections: canary {c}, old fleet {o} ({per:?})");
    assert_eq!(c + o, 2_000, "{per:?}");
    assert!(c.abs_diff(200) <= 20, "canary got {c} of 2000: {per:?}");
    // The human status shows it too.
    let table = String::from_utf8(fleet.ctl(&["status"]).stdout).unwrap();
    assert!(
        table.contains("canary: generation 2 (1 workers), 10% by weight, observing"),
        "{table}"
    );
    assert!(
        reload.0.try_wait().unwrap().is_none(),
        "the reload waits for the rollout"
    );
}

#[test]
fn a_canary_at_10_percent_gets_10_percent_under_round_robin() {
    canary_at_10_percent("round-robin");
}

#[test]
fn a_canary_at_10_percent_gets_10_percent_under_reuseport() {
    if !reuseport_possible() {
        return;
    }
    canary_at_10_percent("reuseport");
}

/// When a request ended, and its status and pid or its error.
type Outcome = (Instant, Result<(u16, Option<i32>), String>);

/// A client sending requests one after another until stopped; every outcome is kept.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Outcome>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let thread = std::thread::spawn({
            let (stop, results) = (stop.clone(), results.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = get_pid(port, Duration::from_secs(5)).map_err(|e| e.to_string());
                    results.lock().unwrap().push((Instant::now(), r));
                }
            }
        });
        Load {
            stop,
            results,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.results.lock().unwrap())
    }
}

fn failures(results: &[Outcome]) -> Vec<String> {
    results
        .iter()
        .filter(|(_, r)| !matches!(r, Ok((200, Some(_)))))
        .map(|(_, r)| format!("{r:?}"))
        .collect()
}

/// A canary that goes wrong under load: rolled back, the old fleet kept, no request failed.
fn canary_rolled_back(dispatch: &'static str, extra: &str, hello_env: &[&str], why: &str) {
    let conf = Conf::new(dispatch);
    let checks = "health_check = \"http\"\nhealth_check_request = \"GET /pid HTTP/1.1\"\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"1s\"";
    conf.write(2, checks, &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    let before = fleet.wait_status("the fleet in the rotation", |s| {
        workers(s).len() == 2 && workers(s).iter().all(|w| w["out_of_rotation"] == false)
    });
    let old = pids_of_generation(&before, 1);
    let load = Load::start(fleet.port("web"));
    conf.write(
        2,
        &format!("{checks}\ncanary_share = \"50%\"\ncanary_observe = \"30s\"\n{extra}"),
        hello_env,
    );
    let out = fleet.ctl(&["reload", "--canary", "1"]);
    let results = load.finish();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the reload must fail: {stderr}");
    assert!(
        stderr.contains("canary rolled back") && stderr.contains(why),
        "{stderr}"
    );
    let failed = failures(&results);
    let served_by_old = results
        .iter()
        .filter(|(_, r)| matches!(r, Ok((200, Some(p))) if old.contains(p)))
        .count();
    eprintln!(
        "MEASURE canary rolled back under {dispatch} ({why}): {} requests during the rollout, {} failed, {served_by_old} served by the old fleet",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(served_by_old > 0);
    // The old fleet still serves, and the generation did not change.
    let after = fleet.wait_status("the canary gone", |s| {
        workers(s).len() == 2 && s["canary"].is_null()
    });
    assert_eq!(after["generation"], 1);
    assert_eq!(pids_of_generation(&after, 1), old);
    notify.wait_for("RELOADING=1", T).expect("RELOADING=1");
    let reloading = notify.position("RELOADING=1").unwrap();
    let ready = notify.wait_from(reloading + 1, "READY=1", T);
    assert!(
        ready.is_some(),
        "READY=1 after RELOADING=1: {:?}",
        notify.all()
    );
}

#[test]
fn a_crashing_canary_is_rolled_back_with_no_failed_request() {
    canary_rolled_back("round-robin", "", &["HELLO_EXIT_AFTER_MS=1500"], "exited");
}

#[test]
fn a_crashing_canary_is_rolled_back_with_no_failed_request_under_reuseport() {
    if !reuseport_possible() {
        return;
    }
    canary_rolled_back("reuseport", "", &["HELLO_EXIT_AFTER_MS=1500"], "exited");
}

#[test]
fn a_canary_failing_its_health_check_is_rolled_back_with_no_failed_request() {
    canary_rolled_back(
        "round-robin",
        "",
        &["HELLO_STATUS=500"],
        "failed its health check (failed: HTTP 500",
    );
}

#[test]
fn a_canary_failing_its_health_check_is_rolled_back_under_reuseport() {
    if !reuseport_possible() {
        return;
    }
    canary_rolled_back(
        "reuseport",
        "",
        &["HELLO_STATUS=500"],
        "failed its health check (failed: HTTP 500",
    );
}

#[test]
fn a_healthy_canary_is_promoted() {
    let conf = Conf::new("round-robin");
    let checks =
        "health_check = \"http\"\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"1s\"";
    conf.write(2, checks, &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    let load = Load::start(fleet.port("web"));
    conf.write(
        2,
        &format!("{checks}\ncanary_share = \"25%\"\ncanary_observe = \"1s\""),
        &[],
    );
    let started = Instant::now();
    let out = fleet.ctl(&["reload", "--canary", "1"]);
    let took = started.elapsed();
    let results = load.finish();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("reloaded: generation 2 serving"),
        "{stdout}"
    );
    assert!(
        took >= Duration::from_secs(1),
        "observed for canary_observe"
    );
    assert!(failures(&results).is_empty(), "{:?}", failures(&results));
    let s = fleet.wait_status("generation 2 alone", |s| {
        workers(s).len() == 2 && workers(s).iter().all(|w| w["generation"] == 2)
    });
    assert_eq!(s["generation"], 2);
    let log = fleet.log();
    assert!(
        log.contains("passed its observation; promoting it"),
        "{log}"
    );
    notify.wait_for("RELOADING=1", T).expect("RELOADING=1");
    let reloading = notify.position("RELOADING=1").unwrap();
    let ready = notify
        .wait_from(reloading + 1, "READY=1", T)
        .expect("READY=1 after RELOADING=1");
    assert!(ready.contains("reloaded: generation 2"), "{ready:?}");
}

/// A worker of a 3-worker fleet turns bad (answers 500, or stops answering) while a client
/// sends requests: it leaves the rotation at its first failed check, is replaced after
/// `health_check_fails`, and only requests already in its hands fail.
fn a_worker_turning_bad(dispatch: &'static str, how: &str) {
    let conf = Conf::new(dispatch);
    let break_dir = tempfile::tempdir().unwrap();
    conf.write(
        3,
        "health_check = \"http\"\nhealth_check_request = \"GET /pid HTTP/1.1\"\nhealth_check_interval = \"200ms\"\nhealth_check_timeout = \"300ms\"\nhealth_check_fails = 3\nhealth_check_passes = 2",
        &[&format!("HELLO_BREAK_DIR={}", break_dir.path().display())],
    );
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    let status = fleet.wait_status("every worker in the rotation", |s| {
        workers(s).len() == 3 && workers(s).iter().all(|w| w["out_of_rotation"] == false)
    });
    let bad = workers(&status)
        .iter()
        .find(|w| w["slot"] == 1)
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .unwrap();
    let port = fleet.port("web");
    let load = Load::start(port);
    std::thread::sleep(Duration::from_millis(300)); // traffic before
    let turned_bad = Instant::now();
    // Written beside, then renamed: the worker never reads half of it.
    std::fs::write(break_dir.path().join("next"), how).unwrap();
    std::fs::rename(break_dir.path().join("next"), break_dir.path().join("1")).unwrap();
    fleet.wait_until("the bad worker out of the rotation", T, || {
        workers(&fleet.status())
            .iter()
            .any(|w| w["pid"] == bad && w["out_of_rotation"] == true)
            .then_some(())
    });
    let out_after = turned_bad.elapsed();
    fleet.wait_log(&format!("(pid {bad}): failed 3 health checks in a row"), T);
    let replaced_after = turned_bad.elapsed();
    // The replacement answers again once the file is gone.
    std::fs::remove_file(break_dir.path().join("1")).unwrap();
    fleet.wait_status("slot 1 replaced and back", |s| {
        workers(s).iter().any(|w| {
            w["slot"] == 1
                && w["pid"] != bad
                && w["state"] == "ready"
                && w["out_of_rotation"] == false
        })
    });
    std::thread::sleep(Duration::from_millis(300)); // traffic after
    let results = load.finish();
    // When the worker left the rotation, per the log line: after it, nothing reached it.
    let log = fleet.log();
    assert!(
        log.contains(&format!("(pid {bad}) failed its health check"))
            && log.contains("out of the rotation"),
        "{log}"
    );
    let failed: Vec<&Outcome> = results
        .iter()
        .filter(|(_, r)| !matches!(r, Ok((200, Some(_)))))
        .collect();
    let out_at = turned_bad + out_after;
    // Requests the bad worker had in its hands when it left fail (a 500, or for a hung
    // worker the client's timeout: 5 s at most after it left); none that started after.
    let late: Vec<_> = failed
        .iter()
        .filter(|(at, r)| match r {
            Ok((500, _)) => *at > out_at + Duration::from_millis(100),
            _ => *at > out_at + Duration::from_secs(6),
        })
        .collect();
    eprintln!(
        "MEASURE health check ({how}) under {dispatch}: out of the rotation {:.0} ms after turning bad (interval 200ms, timeout 300ms), replaced after {:.0} ms; {} requests, {} failed (in its hands)",
        out_after.as_secs_f64() * 1000.0,
        replaced_after.as_secs_f64() * 1000.0,
        results.len(),
        failed.len()
    );
    assert!(
        late.is_empty(),
        "requests failed after it left the rotation: {late:?}"
    );
    // Every failure is the bad worker's: its error answer, or (hung) no answer.
    for (_, r) in &failed {
        let ok = matches!((how, r), ("500", Ok((500, None))) | ("hang", Err(_)));
        assert!(ok, "a failure that is not the bad worker's: {r:?}");
    }
    let served_by_bad_after = results
        .iter()
        .filter(|(at, r)| {
            *at > out_at + Duration::from_millis(100) && matches!(r, Ok((_, Some(p))) if *p == bad)
        })
        .count();
    assert_eq!(served_by_bad_after, 0);
}

#[test]
fn a_worker_answering_500_leaves_the_rotation_and_is_replaced() {
    a_worker_turning_bad("round-robin", "500");
}

#[test]
fn a_worker_that_stops_answering_leaves_the_rotation_and_is_replaced() {
    a_worker_turning_bad("round-robin", "hang");
}

#[test]
fn a_worker_answering_500_leaves_the_rotation_under_reuseport() {
    if !reuseport_possible() {
        return;
    }
    a_worker_turning_bad("reuseport", "500");
}

#[test]
fn canary_by_client_is_refused_under_reuseport_with_a_reason() {
    if !reuseport_possible() {
        return;
    }
    let conf = Conf::new("reuseport");
    conf.write(2, "", &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    conf.write(2, "canary_share = \"10%\"\ncanary_by = \"client\"", &[]);
    let out = fleet.ctl(&["reload", "--canary", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("canary_by = \"client\" needs a channel policy"),
        "{stderr}"
    );
}

/// `GET /pid` from a given loopback source address.
fn get_pid_from(source: std::net::Ipv4Addr, port: u16) -> (u16, Option<i32>) {
    use std::net::{Ipv4Addr, SocketAddr};
    let sock = socket2_like_connect(
        SocketAddr::from((source, 0)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
    );
    let mut s = sock;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /pid HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code: u16 = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    let pid = out
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|b| b.trim().parse().ok());
    (code, pid)
}

/// A TCP connection from `source` (bound first) to `target`.
fn socket2_like_connect(source: std::net::SocketAddr, target: std::net::SocketAddr) -> TcpStream {
    use nix::sys::socket::{bind, connect, socket, AddressFamily, SockFlag, SockType, SockaddrIn};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let (std::net::SocketAddr::V4(s), std::net::SocketAddr::V4(t)) = (source, target) else {
        panic!("IPv4 only");
    };
    bind(fd.as_raw_fd(), &SockaddrIn::from(s)).unwrap();
    connect(fd.as_raw_fd(), &SockaddrIn::from(t)).unwrap();
    // SAFETY: a connected socket we own, handed to TcpStream which then owns it.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}

#[test]
fn a_canary_by_client_address_is_sticky_and_gets_its_share() {
    let conf = Conf::new("round-robin");
    conf.write(2, "", &[]);
    let mut notify = NotifySocket::new();
    let fleet = conf.start(&notify);
    notify.wait_for("READY=1", T).expect("ready");
    conf.write(
        2,
        "canary_workers = 1\ncanary_share = \"10%\"\ncanary_by = \"client\"\ncanary_observe = \"10min\"",
        &[],
    );
    fleet.signal(libc::SIGHUP);
    let status = wait_observing(&fleet);
    assert_eq!(
        status["canary"]["share"], "10% by client address",
        "{status}"
    );
    let canary = pids_of_generation(&status, 2);
    let port = fleet.port("web");
    let (mut canary_clients, clients) = (0, 1000u32);
    for i in 0..clients {
        let source = std::net::Ipv4Addr::from(0x7f00_0000u32 + 0x100 + i * 7);
        let first = get_pid_from(source, port);
        let second = get_pid_from(source, port);
        assert_eq!(first.0, 200);
        let on_canary = |p: Option<i32>| canary.contains(&p.unwrap());
        assert_eq!(
            on_canary(first.1),
            on_canary(second.1),
            "client {source} moved"
        );
        canary_clients += u32::from(on_canary(first.1));
    }
    eprintln!("MEASURE canary 10% by client address: {canary_clients} of {clients} client addresses on the canary");
    assert!(canary_clients.abs_diff(100) <= 35, "{canary_clients}");
}
