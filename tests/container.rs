//! Issue 15: sockvisor as a container's entrypoint and under cgroup limits: PID 1 in a pid
//! namespace (orphans reaped, SIGTERM exits 0 with nothing left), the worker count from a
//! cgroup CPU quota and from the affinity mask, workers recycled past `worker_memory_max`
//! without a failed request, OOM kills reported as such, and `sockvisor status NAME`.
//!
//! `cargo test --test container`. The namespace and cgroup tests need root (they skip
//! elsewhere, and fail with SOCKVISOR_REQUIRE_ALL=1).

mod common;

use common::*;
use std::ffi::CString;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The pid namespace of `pid` (`pid:[4026531836]`), if it is alive.
fn pid_ns(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/pid"))
        .ok()
        .map(|p| p.display().to_string())
}

/// Every process in the pid namespace `ns`: (pid, state letter, command name).
fn processes_in(ns: &str) -> Vec<(i32, char, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid_ns(pid).as_deref() != Some(ns) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let state = stat[close + 1..].trim_start().chars().next().unwrap_or('?');
        let comm = stat[..close]
            .split_once('(')
            .map_or("", |(_, c)| c)
            .to_string();
        out.push((pid, state, comm));
    }
    out
}

/// `program ARGS` as an operator's shell runs it: none of sockvisor's or systemd's variables.
fn from_a_shell<S: AsRef<std::ffi::OsStr>>(program: S, args: &[S]) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).env_remove("RUNTIME_DIRECTORY");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SOCKVISOR_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// sockvisor as PID 1 of a new pid namespace (`unshare --pid --fork --mount-proc`, as a
/// container runtime starts its entrypoint), no NOTIFY_SOCKET: a worker leaves an orphaned
/// grandchild behind, which sockvisor reaps (no zombie stays); SIGTERM stops the fleet,
/// exit 0, nothing left in the namespace; nothing in the log complains.
#[test]
fn pid1_reaps_orphans_and_stops_clean() {
    if !require(
        is_root() && have_program("unshare"),
        "needs root and unshare (util-linux) for a pid namespace",
    ) {
        return;
    }
    // The worker: a child that backgrounds `sleep 0.3` and exits (the sleep is orphaned and
    // reparents to PID 1, sockvisor), then the worker itself waits.
    let mut fleet = FleetBuilder::program(
        "unshare",
        [
            "--pid",
            "--fork",
            "--mount-proc",
            // A /run of its own, as in a container (then exec: sockvisor is PID 1).
            "/bin/sh",
            "-c",
            "mount -t tmpfs tmpfs /run && exec \"$0\" \"$@\"",
            sockvisor_bin().to_str().unwrap(),
            "--workers",
            "1",
            "--dispatch",
            "shared",
            "--listen",
            "web=tcp://127.0.0.1:0",
            "--stop-timeout",
            "5s",
            "--",
            "/bin/sh",
            "-c",
            "sh -c 'sleep 0.3 &'; exec sleep 600",
        ],
    )
    .start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    let sockvisor = fleet.wait_until("sockvisor under unshare", SAFETY_TIMEOUT, || {
        children(fleet.pid()).first().copied()
    });
    let ns = pid_ns(sockvisor).unwrap();
    assert_ne!(pid_ns(std::process::id() as i32).unwrap(), ns);
    assert_eq!(
        fleet.status()["pid"],
        1,
        "sockvisor is PID 1 in its namespace"
    );
    // The orphan exits after 0.3 s; then only sockvisor and its worker are left, no zombie.
    let left = fleet.wait_until("the orphan reaped", SAFETY_TIMEOUT, || {
        let p = processes_in(&ns);
        (p.len() == 2 && p.iter().all(|(_, s, _)| *s != 'Z')).then_some(p)
    });
    let names: Vec<&str> = left.iter().map(|(_, _, c)| c.as_str()).collect();
    assert!(
        names.contains(&"sockvisor") && names.contains(&"sleep"),
        "{left:?}"
    );
    // `sockvisor status` with nothing named, run in the container (`docker exec`): the
    // default path (/run/sockvisor/sockvisor.sock) is not there, the one running fleet is
    // found.
    if require(
        have_program("nsenter"),
        "nsenter (util-linux) is not installed",
    ) {
        let target = sockvisor.to_string();
        let bin = sockvisor_bin().display().to_string();
        let mut cmd = from_a_shell(
            "nsenter",
            &[
                "--target", &target, "--pid", "--mount", "--", &bin, "status",
            ],
        );
        let out = cmd.output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.contains("(pid 1, generation 1)"), "{stdout}");
        assert!(stderr.contains("the running fleet: pid 1 ("), "{stderr}");
    }
    // SAFETY: kill(2) on sockvisor, our grandchild.
    unsafe { libc::kill(sockvisor, libc::SIGTERM) };
    let status = fleet
        .wait(SAFETY_TIMEOUT)
        .expect("stops within the stop timeout");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    assert!(processes_in(&ns).is_empty(), "{:?}", processes_in(&ns));
    let log = fleet.log();
    assert!(log.contains("stopping: received SIGTERM"), "{log}");
    // Within the stop timeout: nothing needed the SIGKILL that follows it.
    assert!(!log.contains("sending SIGKILL"), "{log}");
    assert!(warnings_and_errors(&log).is_empty(), "{log}");
}

/// A child cgroup of this process's cgroup on the v1 hierarchy of `controller`, removed
/// when dropped (its processes must be gone by then).
struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    fn v1(controller: &str) -> Option<Cgroup> {
        Cgroup::v1_named(
            controller,
            &format!("sockvisor-test-{}-{controller}", std::process::id()),
        )
    }

    fn v1_named(controller: &str, name: &str) -> Option<Cgroup> {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = cgroup.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctl, path) = (p.next()?, p.next()?, p.next()?);
            ctl.split(',')
                .any(|c| c == controller)
                .then(|| path.to_string())
        })?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let right: Vec<&str> = right.split(' ').collect();
            let left: Vec<&str> = left.split(' ').collect();
            (right.first() == Some(&"cgroup")
                && right.get(2)?.split(',').any(|o| o == controller)
                && left.get(3) == Some(&"/"))
            .then(|| PathBuf::from(left[4]))
        })?;
        let dir = mount.join(path.trim_start_matches('/')).join(name);
        std::fs::create_dir(&dir).ok()?;
        Some(Cgroup { dir })
    }

    fn set(&self, file: &str, value: &str) {
        std::fs::write(self.dir.join(file), value)
            .unwrap_or_else(|e| panic!("{}/{file} = {value}: {e}", self.dir.display()));
    }

    /// Make the started program join this cgroup (written between fork and exec).
    fn join(&self, builder: FleetBuilder) -> FleetBuilder {
        let procs = CString::new(
            self.dir
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        // SAFETY: open/write/close only, on a path allocated before fork.
        unsafe {
            builder.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + SAFETY_TIMEOUT;
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn auto_fleet(builder: FleetBuilder) -> Fleet {
    let fleet = builder.start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    fleet
}

fn auto_args() -> Vec<String> {
    vec![
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--".into(),
        hello_bin().display().to_string(),
    ]
}

/// In a cgroup with a quota of 1 CPU (v1 `cpu.cfs_quota_us`, this machine's layout), the
/// default worker count on this 2-CPU machine is 1, and the log says why.
#[test]
fn a_one_cpu_quota_gives_one_worker() {
    let cgroup = Cgroup::v1("cpu");
    if !require(
        is_root() && cgroup.is_some() && cpus() >= 2,
        "needs root, a writable v1 cpu cgroup hierarchy and 2 CPUs",
    ) {
        return;
    }
    let cgroup = cgroup.unwrap();
    cgroup.set("cpu.cfs_period_us", "100000");
    cgroup.set("cpu.cfs_quota_us", "100000");
    let mut fleet = auto_fleet(cgroup.join(FleetBuilder::new(auto_args())));
    let log = fleet.log();
    let line = log
        .lines()
        .find(|l| l.contains("workers: "))
        .unwrap_or_default();
    assert!(line.contains("workers: 1 (auto: "), "{log}");
    assert!(
        line.contains("cgroup CPU quota 1.00 (") && line.contains("cpu.cfs_quota_us = 100000"),
        "{line}"
    );
    assert_eq!(fleet.status()["workers_wanted"], 1);
    fleet.signal(libc::SIGTERM);
    assert_eq!(fleet.wait(SAFETY_TIMEOUT).and_then(|s| s.code()), Some(0));
}

/// Under `taskset -c 0` (an affinity mask of one CPU), the default is 1 worker.
#[test]
fn one_cpu_of_affinity_gives_one_worker() {
    if !require(
        have_program("taskset") && cpus() >= 2,
        "needs taskset (util-linux) and 2 CPUs",
    ) {
        return;
    }
    let mut args = vec![
        "-c".to_string(),
        "0".into(),
        sockvisor_bin().display().to_string(),
    ];
    args.extend(auto_args());
    let fleet = auto_fleet(FleetBuilder::program("taskset", args));
    let log = fleet.log();
    assert!(
        log.contains("workers: 1 (auto: 1 CPU in the affinity mask"),
        "{log}"
    );
    assert_eq!(fleet.status()["workers_wanted"], 1);
    // Without either, the machine's CPUs.
    let fleet = auto_fleet(FleetBuilder::new(auto_args()));
    let all = format!(
        "workers: {} (auto: {} CPUs in the affinity mask",
        cpus(),
        cpus()
    );
    assert!(fleet.log().contains(&all), "{}", fleet.log());
}

/// A client that requests `/` in a loop until told to stop, counting answers and failures
/// (every failure: a refused or reset connection, a timeout, a wrong answer).
struct ClientLoop {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<Vec<String>>,
}

impl ClientLoop {
    fn start(port: u16) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match http_get(port) {
                    Ok(a) if a.contains("hello from worker") => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(a) => failures.push(format!("bad answer {a:?}")),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        });
        ClientLoop { stop, ok, thread }
    }

    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let failures = self.thread.join().unwrap();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

/// GET `path` on `port` (a hello worker): true when answered.
fn request(port: u16, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut out = String::new();
    s.read_to_string(&mut out).is_ok() && out.contains("hello from worker")
}

/// GET /grow on `port` until the log says `needle` (within the safety timeout). Returns how
/// many of those requests failed.
fn grow_until(fleet: &Fleet, port: u16, needle: &str, pause: Duration) -> usize {
    let mut failed = 0;
    let deadline = Instant::now() + SAFETY_TIMEOUT;
    while !fleet.log().contains(needle) {
        assert!(
            fleet.gone().is_none(),
            "sockvisor is gone:\n{}",
            fleet.log()
        );
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            fleet.log()
        );
        failed += usize::from(!request(port, "/grow"));
        std::thread::sleep(pause);
    }
    failed
}

/// A worker whose RSS passes `worker_memory_max` is replaced (its replacement started, then
/// it drains) while a client loop runs: no request fails, and the metrics count a
/// `memory` restart.
#[test]
fn a_worker_over_its_memory_limit_is_recycled_without_a_failed_request() {
    let mut args: Vec<String> = vec!["--worker-memory-max".into(), "24M".into()];
    args.extend(hello_args(2));
    let fleet = FleetBuilder::new(args).env("HELLO_GROW_KB", "4096").start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    let port = fleet.port("web");
    let before: Vec<i64> = fleet.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap())
        .collect();
    let clients = ClientLoop::start(port);
    // Grow the workers (4 MiB per /grow) until one is recycled.
    let grow_failed = grow_until(&fleet, port, "recycled (RSS", Duration::from_millis(50));
    assert_eq!(grow_failed, 0, "/grow requests failed");
    // The old worker gone, its replacement serving, then a little more of the loop.
    fleet.wait_status("the recycled worker gone", |s| {
        let w = s["workers"].as_array().unwrap();
        w.len() == 2
            && w.iter().all(|w| w["state"] == "ready")
            && w.iter()
                .any(|w| !before.contains(&w["pid"].as_i64().unwrap()))
    });
    let more = clients.ok.load(Ordering::Relaxed) + 50;
    fleet.wait_until("50 more answers", SAFETY_TIMEOUT, || {
        (clients.ok.load(Ordering::Relaxed) >= more).then_some(())
    });
    let (ok, failures) = clients.finish();
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        ok + failures.len() as u64
    );
    let metrics = String::from_utf8(fleet.ctl(&["metrics"]).stdout).unwrap();
    let memory: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sockvisor_worker_restarts_total{") && l.contains("reason=\"memory\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(memory >= 1.0, "{metrics}");
    eprintln!("requests answered while a worker was recycled: {ok}, failed: 0");
}

/// A worker killed by the kernel's OOM killer (its cgroup's memory.limit_in_bytes) is
/// reported as such: reason `oom` in the metrics and in `status`.
#[test]
fn an_oom_kill_is_reported_as_such() {
    let cgroup = Cgroup::v1("memory");
    if !require(
        is_root() && cgroup.is_some(),
        "needs root and a writable v1 memory cgroup hierarchy",
    ) {
        return;
    }
    let cgroup = cgroup.unwrap();
    cgroup.set("memory.limit_in_bytes", &(48u64 << 20).to_string());
    let fleet = cgroup
        .join(FleetBuilder::new(hello_args(1)))
        .env("HELLO_GROW_KB", "8192")
        .start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    let port = fleet.port("web");
    grow_until(&fleet, port, "(OOM kill", Duration::from_millis(20));
    let status = fleet.wait_status("the slot refilled", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["state"] == "ready")
    });
    assert_eq!(
        status["workers"][0]["last_exit"], "oom (killed by SIGKILL)",
        "{status}"
    );
    let metrics = String::from_utf8(fleet.ctl(&["metrics"]).stdout).unwrap();
    assert!(
        metrics.contains("sockvisor_worker_restarts_total{slot=\"0\",reason=\"oom\"} 1"),
        "{metrics}"
    );
}

/// `sockvisor status NAME` finds a running fleet by its socket's directory (what a unit's
/// RuntimeDirectory= gives), with no --control and none of the daemon's environment;
/// `status --check` does too; an unknown NAME is a clear error.
#[test]
fn status_finds_a_fleet_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let name = format!("svtest{}", std::process::id());
    let control = dir.path().join(&name).join("control.sock");
    std::fs::create_dir(control.parent().unwrap()).unwrap();
    let fleet = FleetBuilder::new(hello_args(1))
        .env("SOCKVISOR_CONTROL_SOCKET", &control)
        .start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    let bin = sockvisor_bin().display().to_string();
    let run = |args: &[&str]| from_a_shell(bin.as_str(), args).output().unwrap();
    let out = run(&["status", &name]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&format!("(pid {}, generation 1)", fleet.pid())),
        "{text}"
    );
    let out = run(&["status", &name, "--check"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = run(&["status", "no-such-fleet-at-all"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no fleet named \"no-such-fleet-at-all\"")
            && err.contains("/run/no-such-fleet-at-all/control.sock"),
        "{err}"
    );
    let out = run(&["status", "no-such-fleet-at-all", "--check"]);
    assert_eq!(out.status.code(), Some(2));

    // By unit: a fleet in a systemd unit's cgroup (here made by hand on the name=systemd
    // hierarchy, as systemd makes it), whose socket's path says nothing of the unit.
    let unit = format!("svunit{}", std::process::id());
    let cgroup = Cgroup::v1_named("name=systemd", &format!("{unit}.service"));
    if !require(
        is_root() && cgroup.is_some(),
        "needs root and a writable name=systemd cgroup hierarchy",
    ) {
        return;
    }
    let cgroup = cgroup.unwrap();
    let mut fleet = cgroup.join(FleetBuilder::new(hello_args(1))).start();
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
    for name in [unit.clone(), format!("{unit}.service")] {
        let out = run(&["status", &name]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{name}: {out:?}");
        assert!(
            text.contains(&format!("(pid {}, generation 1)", fleet.pid())),
            "{text}"
        );
    }
    fleet.signal(libc::SIGTERM);
    assert_eq!(fleet.wait(SAFETY_TIMEOUT).and_then(|s| s.code()), Some(0));
}
