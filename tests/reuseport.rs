//! The kernel-steered policy (issue 13) with real, unmodified third-party programs: uvicorn
//! (`--fd 3`), gunicorn (LISTEN_FDS), Node's http server (`listen({fd: 3})`) and Python's
//! stdlib `http.server` (`socket.fromfd(3)`), each run as it would run under systemd, under
//! sockvisor's default policy.
//!
//! What is proven here: round robin over every worker under the default (`auto`) policy;
//! nothing lost when a stopped worker is killed with connections queued on its listener, on
//! reload and on scale-down; socket activation (the connection that started the service is
//! answered); `--ready notify` (a worker gets nothing before its READY=1); the fallback to
//! `shared` without CAP_BPF or as another uid than the socket's, said in the log and in
//! `status`; UDP by flow; the diagnosis of a program run under a channel policy. The
//! measurement behind docs/reuseport.md's table is the ignored test `issue_13_table`.
//!
//! Prerequisites (`require`): root (the program needs CAP_BPF or CAP_SYS_ADMIN), the
//! virtualenv with uvicorn and gunicorn that .ci/run makes (`target/test-venv`, or
//! SOCKVISOR_TEST_VENV), `node`, `setpriv`, `systemd-socket-activate`.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
/// Sequential requests of the balance tests (issue 13: 2,000 each).
const REQUESTS: usize = 2000;

// ---- the programs ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    /// `uvicorn --fd 3 whoami:app` (ASGI).
    Uvicorn,
    /// `gunicorn -w 1 whoami:wsgi`: takes the socket from LISTEN_FDS; one gunicorn worker
    /// (a child of the gunicorn arbiter, which is the sockvisor worker) per sockvisor worker.
    Gunicorn,
    /// `node whoami.js`: `http.createServer(...).listen({fd: 3})`.
    Node,
    /// `python3 whoami_stdlib.py`: `http.server` on `socket.fromfd(3, ...)`.
    Stdlib,
}

const PROGRAMS: [Program; 4] = [
    Program::Uvicorn,
    Program::Gunicorn,
    Program::Node,
    Program::Stdlib,
];

fn workers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers")
}

/// The virtualenv with the Python servers: $SOCKVISOR_TEST_VENV, else `target/test-venv`
/// (where .ci/run makes it).
fn venv() -> PathBuf {
    if let Some(v) = std::env::var_os("SOCKVISOR_TEST_VENV") {
        return PathBuf::from(v);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test binary>
    let target = exe.ancestors().nth(3).expect("target directory");
    target.join("test-venv")
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Program::Uvicorn => "uvicorn",
            Program::Gunicorn => "gunicorn",
            Program::Node => "node",
            Program::Stdlib => "stdlib http.server",
        }
    }

    /// The worker command, as a user would write it after `--`.
    fn command(self) -> Vec<String> {
        let dir = workers_dir().display().to_string();
        let bin = |b: &str| venv().join("bin").join(b).display().to_string();
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        match self {
            Program::Uvicorn => {
                let mut c = vec![bin("uvicorn")];
                c.extend(v(&["--fd", "3", "--app-dir", &dir, "whoami:app"]));
                c.extend(v(&["--no-access-log", "--log-level", "warning"]));
                c
            }
            Program::Gunicorn => {
                let mut c = vec![bin("gunicorn")];
                c.extend(v(&["-w", "1", "--chdir", &dir, "whoami:wsgi"]));
                c.extend(v(&["--log-level", "warning"]));
                c
            }
            Program::Node => vec!["node".into(), format!("{dir}/whoami.js")],
            Program::Stdlib => vec![python().into(), format!("{dir}/whoami_stdlib.py")],
        }
    }

    /// Whether the program is installed; false (and a `SKIP:` line) if not.
    fn require(self) -> bool {
        let venv = venv();
        let install = format!(
            "{python} -m venv {v} && {v}/bin/pip install -r tests/workers/requirements.txt \
             (.ci/run does)",
            python = python(),
            v = venv.display()
        );
        match self {
            Program::Uvicorn | Program::Gunicorn => require(
                python_imports(&venv.join("bin/python").display().to_string(), self.name()),
                &format!(
                    "{} is not installed in {}: {install}",
                    self.name(),
                    venv.display()
                ),
            ),
            Program::Node => require(
                have_program("node"),
                "node is not installed (apt-get install nodejs)",
            ),
            Program::Stdlib => true,
        }
    }
}

/// The kernel-steered policy needs CAP_BPF or CAP_SYS_ADMIN: root here.
fn require_root() -> bool {
    require(
        is_root(),
        "the kernel-steered policy needs CAP_BPF or CAP_SYS_ADMIN (run the tests as root)",
    )
}

/// `worker <id> pid <pid>` -> (id, pid)
fn who(body: &str) -> (usize, i32) {
    let line = body
        .lines()
        .rev()
        .find(|l| l.starts_with("worker "))
        .unwrap_or_else(|| panic!("not a whoami answer: {body:?}"));
    let w: Vec<&str> = line.split_whitespace().collect();
    (
        w[1].parse().unwrap_or_else(|_| panic!("{line:?}")),
        w[3].parse().unwrap_or_else(|_| panic!("{line:?}")),
    )
}

/// `sockvisor ARGS --workers N --listen web=tcp://127.0.0.1:0 -- PROGRAM`: the default
/// policy unless `args` say otherwise.
fn fleet_args(program: Program, workers: usize, args: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    all.extend([
        "--workers".into(),
        workers.to_string(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--".into(),
    ]);
    all.extend(program.command());
    all
}

/// Wait until `status` shows `n` ready workers and nothing else; returns that status.
fn wait_ready(fleet: &Fleet, n: usize) -> serde_json::Value {
    fleet.wait_status(&format!("{n} ready workers and nothing else"), |s| {
        let w = s["workers"].as_array().unwrap();
        w.len() == n && w.iter().all(|w| w["state"] == "ready")
    })
}

fn workers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["workers"].as_array().unwrap().clone()
}

fn slot_pid(status: &serde_json::Value, slot: usize) -> i32 {
    workers(status)
        .iter()
        .find(|w| w["slot"] == slot)
        .unwrap_or_else(|| panic!("no worker in slot {slot}: {status:#}"))["pid"]
        .as_i64()
        .unwrap() as i32
}

fn listener_status(status: &serde_json::Value) -> serde_json::Value {
    status["listeners"][0].clone()
}

/// max/min of the counts (infinite if a worker got nothing).
fn ratio(counts: &BTreeMap<usize, u64>, workers: usize) -> f64 {
    if counts.len() < workers {
        return f64::INFINITY;
    }
    let max = *counts.values().max().unwrap() as f64;
    let min = *counts.values().min().unwrap() as f64;
    if min == 0.0 {
        f64::INFINITY
    } else {
        max / min
    }
}

/// One `Connection: close` request; the answer, or why there is none.
fn get(port: u16, timeout: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .map_err(|e| format!("read: {e} after {out:?}"))?;
    if out.starts_with("HTTP/1.1 200") && out.contains("\nworker ") {
        Ok(out)
    } else {
        Err(format!("bad answer {out:?}"))
    }
}

/// `n` sequential requests: answers per worker id, and the failures.
fn sequential(port: u16, n: usize) -> (BTreeMap<usize, u64>, Vec<String>) {
    let mut counts = BTreeMap::new();
    let mut failures = Vec::new();
    for _ in 0..n {
        match get(port, T) {
            Ok(body) => *counts.entry(who(&body).0).or_default() += 1,
            Err(e) => failures.push(e),
        }
    }
    (counts, failures)
}

/// Send `sig` to a worker's process group (workers lead their own; gunicorn's worker is in
/// its arbiter's).
fn signal_group(pid: i32, sig: i32) {
    // SAFETY: killpg(2) on the group of a worker of a sockvisor this test started.
    unsafe { libc::killpg(pid, sig) };
}

// ---- 1. round robin under the default policy, each program ---------------------------

fn balance_under_the_default_policy(program: Program) {
    if !require_root() || !program.require() {
        return;
    }
    let fleet = FleetBuilder::new(fleet_args(program, 4, &[])).start();
    let port = fleet.port("web");
    let status = wait_ready(&fleet, 4);
    let l = listener_status(&status);
    assert_eq!(l["policy"], "reuseport", "the default steers: {l:#}");
    assert!(l.get("policy_note").is_none(), "{l:#}");
    let (counts, failures) = sequential(port, REQUESTS);
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let r = ratio(&counts, 4);
    eprintln!(
        "{}: {REQUESTS} sequential requests over 4 workers (default policy): {counts:?}, \
         max/min {r:.3}",
        program.name()
    );
    assert_eq!(counts.len(), 4, "answers from all 4 workers: {counts:?}");
    assert!(r <= 1.05, "max/min {r:.3} > 1.05: {counts:?}");
    // status counts the program's decisions for each worker: at least what each answered.
    // A decision is made per SYN, so a SYN the kernel drops after it (seen once in ~10 runs
    // of the whole file on a busy machine: 2,001 decisions, 501/500/500/500) and the
    // client's retransmission make two; never fewer than the connections.
    let status = fleet.status();
    let mut decisions = 0;
    for w in workers(&status) {
        let slot = w["slot"].as_u64().unwrap() as usize;
        let dispatched = w["dispatched"].as_u64().unwrap();
        decisions += dispatched;
        assert!(
            dispatched >= counts.get(&slot).copied().unwrap_or(0),
            "status's dispatched for worker {slot} is below its answers {counts:?}: {status:#}"
        );
    }
    assert!(
        decisions <= REQUESTS as u64 + REQUESTS as u64 / 100,
        "{decisions} decisions for {REQUESTS} connections: {status:#}"
    );
    let log = fleet.log();
    assert!(
        log.contains("(web, reuseport)"),
        "the log says which policy: {log}"
    );
}

#[test]
fn uvicorn_round_robin_under_the_default_policy() {
    balance_under_the_default_policy(Program::Uvicorn);
}

#[test]
fn gunicorn_round_robin_under_the_default_policy() {
    balance_under_the_default_policy(Program::Gunicorn);
}

#[test]
fn node_round_robin_under_the_default_policy() {
    balance_under_the_default_policy(Program::Node);
}

#[test]
fn stdlib_http_server_round_robin_under_the_default_policy() {
    balance_under_the_default_policy(Program::Stdlib);
}

// ---- 2. nothing lost ------------------------------------------------------------------

/// A worker stopped with SIGSTOP keeps its turns: of 20 concurrent connections, 5 wait on its
/// listener (status shows them queued). Killed, its queue moves to the others: all 20 are
/// answered, none reset.
fn nothing_lost_when_a_stopped_worker_is_killed(program: Program) {
    if !require_root() || !program.require() {
        return;
    }
    let fleet = FleetBuilder::new(fleet_args(program, 4, &[])).start();
    let port = fleet.port("web");
    let status = wait_ready(&fleet, 4);
    // Every worker serves before one is stopped (a program still starting would look the same
    // as a stopped one).
    let (counts, failures) = sequential(port, 8);
    assert!(
        failures.is_empty() && counts.len() == 4,
        "{counts:?} {failures:?}"
    );
    let stopped = slot_pid(&status, 1);
    signal_group(stopped, libc::SIGSTOP);
    let clients: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || get(port, T)))
        .collect();
    let queued = |s: &serde_json::Value| {
        workers(s)
            .iter()
            .find(|w| w["pid"] == stopped)
            .map_or(0, |w| w["queued"].as_u64().unwrap())
    };
    // Round robin gives it 5 of the 20 (one more or less if a SYN is decided twice): they
    // wait on its listener while the others are answered.
    let waiting = fleet.wait_until("the others answered, the rest queued on it", T, || {
        let waiting = queued(&fleet.status());
        let answered = clients.iter().filter(|c| c.is_finished()).count() as u64;
        (waiting > 0 && answered + waiting == 20).then_some(waiting)
    });
    eprintln!(
        "{}: worker 1 (pid {stopped}) stopped, 20 concurrent connections: {waiting} queued on \
         it",
        program.name()
    );
    assert!(
        (4..=6).contains(&waiting),
        "about a quarter of 20: {waiting}"
    );
    signal_group(stopped, libc::SIGKILL);
    let results: Vec<Result<String, String>> =
        clients.into_iter().map(|c| c.join().unwrap()).collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of 20 failed: {failed:?}\n{}",
        failed.len(),
        fleet.log()
    );
    let by: Vec<(usize, i32)> = results.iter().map(|r| who(r.as_ref().unwrap())).collect();
    assert!(
        by.iter().all(|&(_, pid)| pid != stopped),
        "the killed worker answered nothing: {by:?}"
    );
    fleet.wait_log(
        &format!("{waiting} queued connections handed to other workers"),
        T,
    );
}

#[test]
fn uvicorn_loses_nothing_when_a_stopped_worker_is_killed() {
    nothing_lost_when_a_stopped_worker_is_killed(Program::Uvicorn);
}

#[test]
fn gunicorn_loses_nothing_when_a_stopped_worker_is_killed() {
    nothing_lost_when_a_stopped_worker_is_killed(Program::Gunicorn);
}

#[test]
fn node_loses_nothing_when_a_stopped_worker_is_killed() {
    nothing_lost_when_a_stopped_worker_is_killed(Program::Node);
}

#[test]
fn stdlib_http_server_loses_nothing_when_a_stopped_worker_is_killed() {
    nothing_lost_when_a_stopped_worker_is_killed(Program::Stdlib);
}

/// A config with the program's command and one listener `web` on port 0.
fn write_config(path: &Path, program: Program, workers: usize) {
    let cmd: Vec<String> = program.command().iter().map(|c| format!("{c:?}")).collect();
    std::fs::write(
        path,
        format!(
            "workers = {workers}\nstop_timeout = \"20s\"\nreload_timeout = \"20s\"\n\
             command = [{}]\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\n",
            cmd.join(", ")
        ),
    )
    .unwrap();
}

/// Reloads, then scale-downs, under a client loop: no failed request.
fn reload_and_scale_down_under_load(program: Program) {
    if !require_root() || !program.require() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, program, 4);
    let fleet = FleetBuilder::new(["-c", config.to_str().unwrap()]).start();
    let port = fleet.port("web");
    wait_ready(&fleet, 4);
    let load = if program == Program::Uvicorn {
        // uvicorn's graceful shutdown close()s its idle keep-alive connections: a request
        // already on its way to one is reset (uvicorn/protocols/http/h11_impl.py, shutdown;
        // 2 runs in 8 had one such reset). That is uvicorn's own, under systemd alone too;
        // sockvisor's part (no new connection lost) is what this test proves for it.
        ClientLoop::new_connections_only(port, "\nworker ")
    } else {
        ClientLoop::start(port, "\nworker ")
    };
    let progress = |what: &str| {
        let before = load.answered();
        fleet.wait_until(what, T, || (load.answered() > before + 50).then_some(()));
    };
    progress("answers before the first reload");
    for round in 1..=3 {
        let out = fleet.ctl(&["reload"]);
        assert!(
            out.status.success(),
            "reload {round}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fleet.log()
        );
        let s = wait_ready(&fleet, 4);
        assert!(
            workers(&s).iter().all(|w| w["generation"] == round + 1),
            "{s:#}"
        );
        progress(&format!("answers after reload {round}"));
    }
    for n in [2, 1] {
        let out = fleet.ctl(&["scale", &n.to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_ready(&fleet, n);
        progress(&format!("answers after the scale-down to {n}"));
    }
    let summary = load.finish();
    eprintln!(
        "{}: 3 reloads and 2 scale-downs under load: {} answered, {} failed, {} retried \
         after a keep-alive close",
        program.name(),
        summary.ok,
        summary.failed,
        summary.retried
    );
    eprintln!("{}: failures: {:#?}", program.name(), summary.failures);
    assert_eq!(
        summary.failed,
        0,
        "failed requests: {:#?}\n{}",
        summary.failures,
        log_tail(&fleet.log(), 80)
    );
}

#[test]
fn uvicorn_reload_and_scale_down_under_load_fail_no_request() {
    reload_and_scale_down_under_load(Program::Uvicorn);
}

#[test]
fn gunicorn_reload_and_scale_down_under_load_fail_no_request() {
    reload_and_scale_down_under_load(Program::Gunicorn);
}

#[test]
fn node_reload_and_scale_down_under_load_fail_no_request() {
    reload_and_scale_down_under_load(Program::Node);
}

#[test]
fn stdlib_http_server_reload_and_scale_down_under_load_fail_no_request() {
    reload_and_scale_down_under_load(Program::Stdlib);
}

// ---- 3. socket activation -------------------------------------------------------------

/// Under `systemd-socket-activate` (a socket bound without SO_REUSEPORT, as systemd binds
/// by default): the connection that started the service waits on that socket while nobody is
/// ready and is answered; then round robin over the 4 workers.
#[test]
fn socket_activation_answers_the_first_connection_then_round_robin() {
    if !require_root()
        || !Program::Uvicorn.require()
        || !require(
            have_file("/usr/bin/systemd-socket-activate"),
            "systemd-socket-activate not installed (apt-get install systemd)",
        )
    {
        return;
    }
    on_a_free_port(|port| {
        let mut args: Vec<String> = [
            "-l",
            &format!("127.0.0.1:{port}"),
            "--fdname=web",
            "-E",
            "SOCKVISOR_LOG",
            "-E",
            "SOCKVISOR_CONTROL_SOCKET",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(sockvisor_bin().display().to_string());
        args.extend(["--workers", "4", "--listen", "web", "--"].map(String::from));
        args.extend(Program::Uvicorn.command());
        let fleet = FleetBuilder::program("/usr/bin/systemd-socket-activate", args).start();
        fleet.try_wait_log("Listening on", T)?;
        // This connection makes systemd-socket-activate start sockvisor.
        let first =
            get(port, T).map_err(|e| format!("the first connection: {e}; {}", fleet.log()))?;
        let (first_by, _) = who(&first);
        let status = wait_ready(&fleet, 4);
        let l = listener_status(&status);
        assert_eq!(l["policy"], "reuseport", "{l:#}\n{}", fleet.log());
        assert!(
            fleet.log().contains("(web, reuseport, from systemd)"),
            "{}",
            fleet.log()
        );
        let (counts, failures) = sequential(port, 400);
        assert!(failures.is_empty(), "{failures:?}");
        let r = ratio(&counts, 4);
        eprintln!(
            "socket activation: the first connection answered by worker {first_by}; then 400 \
             requests: {counts:?}, max/min {r:.3}"
        );
        assert!(r <= 1.05, "{counts:?}");
        Ok(())
    });
}

// ---- 4. readiness -----------------------------------------------------------------------

/// `--ready notify`: a worker that serves at once but says READY=1 late gets no connection
/// before it does (none answered by it, status dispatched 0), and its share after.
#[test]
fn a_worker_gets_nothing_before_its_ready() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gate = dir.path().join("gate");
    let fleet = FleetBuilder::new(fleet_args(Program::Stdlib, 4, &["--ready", "notify"]))
        .env("WHOAMI_READY_GATE", &gate)
        .env("WHOAMI_SLOW_WORKER", "2")
        .start();
    let port = fleet.port("web");
    let status = fleet.wait_status("3 ready workers, slot 2 starting", |s| {
        let w = workers(s);
        w.len() == 4
            && w.iter()
                .all(|w| (w["state"] == "ready") == (w["slot"] != 2))
    });
    let slow = slot_pid(&status, 2);
    let (counts, failures) = sequential(port, 300);
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("worker 2 (pid {slow}) not ready: 300 requests: {counts:?}");
    assert!(
        !counts.contains_key(&2),
        "worker 2 answered before its READY=1: {counts:?}"
    );
    // Round robin over the 3 ready workers (100 each; a SYN decided twice, see
    // `balance_under_the_default_policy`, may shift one).
    assert!(ratio(&counts, 3) <= 1.05, "{counts:?}");
    let s = fleet.status();
    let w2 = workers(&s).into_iter().find(|w| w["slot"] == 2).unwrap();
    assert_eq!(w2["state"], "starting", "{w2:#}");
    assert_eq!(w2["dispatched"], 0, "{w2:#}");
    assert_eq!(w2["queued"], 0, "{w2:#}");
    std::fs::write(&gate, "").unwrap();
    wait_ready(&fleet, 4);
    let (counts, failures) = sequential(port, 400);
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("worker 2 ready: 400 requests: {counts:?}");
    assert!(ratio(&counts, 4) <= 1.05, "{counts:?}");
}

// ---- 5. the fallback ---------------------------------------------------------------------

/// `setpriv` that starts sockvisor as root with no capability at all (none effective,
/// permitted, inheritable or in the bounding set).
fn without_capabilities(sockvisor_args: Vec<String>) -> FleetBuilder {
    let mut args: Vec<String> = vec![
        "--inh-caps=-all".into(),
        "--bounding-set=-all".into(),
        sockvisor_bin().display().to_string(),
    ];
    args.extend(sockvisor_args);
    FleetBuilder::program("/usr/bin/setpriv", args)
}

fn require_setpriv() -> bool {
    require(
        have_file("/usr/bin/setpriv"),
        "setpriv not installed (apt-get install util-linux)",
    )
}

/// The effective capabilities of a process (`CapEff` in /proc/PID/status).
fn effective_caps(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = s
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn without_cap_bpf_the_default_serves_shared_and_says_why() {
    if !require_root() || !require_setpriv() {
        return;
    }
    let fleet = without_capabilities(fleet_args(Program::Stdlib, 4, &[])).start();
    let port = fleet.port("web");
    let status = wait_ready(&fleet, 4);
    assert_eq!(
        effective_caps(fleet.pid()),
        0,
        "sockvisor runs without capabilities"
    );
    let l = listener_status(&status);
    assert_eq!(l["policy"], "shared", "{l:#}");
    let note = l["policy_note"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("not reuseport: ") && note.contains("CAP_BPF"),
        "status says why: {l:#}"
    );
    let log = fleet.log();
    assert!(
        log.lines().any(|l| l
            .starts_with("sockvisor: warn  web: dispatch shared, not reuseport: ")
            && l.contains("CAP_BPF")),
        "the log says why: {log}"
    );
    assert!(log.contains("(web, shared)"), "{log}");
    let text = fleet.ctl(&["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("web: shared, not reuseport: ") && text.contains("CAP_BPF"),
        "{text}"
    );
    let (counts, failures) = sequential(port, 200);
    eprintln!(
        "without CAP_BPF (shared): 200 requests: {counts:?}, {} failed",
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:?}");
}

#[test]
fn without_cap_bpf_an_explicit_reuseport_exits_78_and_says_why() {
    if !require_root() || !require_setpriv() {
        return;
    }
    let mut fleet =
        without_capabilities(fleet_args(Program::Stdlib, 2, &["--dispatch", "reuseport"])).start();
    let status = fleet.wait(T).expect("sockvisor exits");
    let log = fleet.log();
    assert_eq!(status.code(), Some(78), "{log}");
    assert!(
        log.contains("dispatch reuseport cannot run: ") && log.contains("CAP_BPF"),
        "{log}"
    );
    assert!(
        !log.contains("worker 0 started"),
        "no worker started: {log}"
    );
}

/// sockvisor as uid 65534 under `setpriv` with `setpriv_caps` (e.g. `--inh-caps=+bpf`), its
/// control socket in a directory of that uid: `--workers 2 --listen LISTEN -- stdlib`.
fn as_nobody(setpriv_caps: &[&str], listen: &str, control_dir: &Path) -> FleetBuilder {
    std::os::unix::fs::chown(control_dir, Some(65534), Some(65534)).unwrap();
    let mut args: Vec<String> = ["--reuid=65534", "--regid=65534", "--clear-groups"]
        .iter()
        .chain(setpriv_caps)
        .map(|s| s.to_string())
        .collect();
    args.push(sockvisor_bin().display().to_string());
    args.extend(["--workers", "2", "--listen", listen, "--"].map(String::from));
    args.extend(Program::Stdlib.command());
    FleetBuilder::program("/usr/bin/setpriv", args)
        .env("SOCKVISOR_CONTROL_SOCKET", control_dir.join("control.sock"))
}

/// `sockvisor status --json` as uid 65534 (the client refuses a server of another uid), once
/// both workers are ready.
fn status_as_nobody(fleet: &Fleet, control_dir: &Path) -> serde_json::Value {
    fleet.wait_until("status as uid 65534", T, || {
        let out = Command::new(sockvisor_bin())
            .args(["status", "--json", "--control"])
            .arg(control_dir.join("control.sock"))
            .env_remove("SOCKVISOR_CONTROL_SOCKET")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let w = workers(&s);
        (w.len() == 2 && w.iter().all(|w| w["state"] == "ready")).then_some(s)
    })
}

/// A socket unit's socket (bound by root) and a service running as another user: the kernel
/// refuses that user's worker listeners in the socket's group, so the default serves shared
/// and says which uids differ (before it would say that CAP_BPF is missing: with it, the uid
/// would still be wrong).
#[test]
fn another_uid_than_the_socket_s_serves_shared_and_names_the_uid() {
    if !require_root() || !require_setpriv() {
        return;
    }
    let socket = tcp_listener();
    let port = socket.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let fleet = as_nobody(&[], "web", dir.path())
        .pass(socket, "web")
        .start();
    let status = status_as_nobody(&fleet, dir.path());
    let l = listener_status(&status);
    assert_eq!(l["policy"], "shared", "{l:#}");
    let why = "sockvisor runs as uid 65534 but the socket was bound by uid 0";
    assert!(
        l["policy_note"].as_str().unwrap_or_default().contains(why),
        "status says why: {l:#}"
    );
    let log = fleet.log();
    assert!(
        log.contains(&format!("web: dispatch shared, not reuseport: {why}")),
        "the log says why: {log}"
    );
    let (counts, failures) = sequential(port, 100);
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("as uid 65534 with root's socket (shared): 100 requests: {counts:?}");
}

/// `CAP_BPF` in linux/capability.h.
const CAP_BPF: u32 = 39;

/// A non-root sockvisor with CAP_BPF alone (`AmbientCapabilities=CAP_BPF`), binding its own
/// socket: the default steers (the program loads without CAP_PERFMON or CAP_SYS_ADMIN).
#[test]
fn a_non_root_sockvisor_with_cap_bpf_alone_steers() {
    if !require_root() || !require_setpriv() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fleet = as_nobody(
        &["--inh-caps=+bpf", "--ambient-caps=+bpf"],
        "web=tcp://127.0.0.1:0",
        dir.path(),
    )
    .start();
    let port = fleet.port("web");
    let status = status_as_nobody(&fleet, dir.path());
    assert_eq!(
        effective_caps(fleet.pid()),
        1u64 << CAP_BPF,
        "sockvisor has CAP_BPF and nothing else"
    );
    let l = listener_status(&status);
    assert_eq!(l["policy"], "reuseport", "{l:#}\n{}", fleet.log());
    let (counts, failures) = sequential(port, 100);
    assert!(failures.is_empty(), "{failures:?}");
    eprintln!("as uid 65534 with CAP_BPF alone: 100 requests: {counts:?}");
    assert!(ratio(&counts, 2) <= 1.05, "{counts:?}");
}

// ---- 6. UDP by flow ------------------------------------------------------------------------

/// `probe <id> <pid>: <data>` -> id
fn udp_worker(reply: &str) -> usize {
    reply
        .split_whitespace()
        .nth(1)
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not a probe reply: {reply:?}"))
}

fn udp_round_trip(sock: &UdpSocket, port: u16) -> usize {
    sock.send_to(b"x", ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("an answer within the timeout");
    udp_worker(&String::from_utf8_lossy(&buf[..n]))
}

/// `workers` probe workers (they echo datagrams with their id) on one UDP listener.
fn udp_probe_fleet(workers: usize, listen: &str) -> Fleet {
    FleetBuilder::new([
        "--workers",
        &workers.to_string(),
        "--listen",
        listen,
        "--",
        python(),
        probe_script().to_str().unwrap(),
    ])
    .start()
}

#[test]
fn udp_flows_spread_over_the_workers_and_one_flow_stays_on_one() {
    if !require_root() {
        return;
    }
    let fleet = udp_probe_fleet(4, "dns=udp://127.0.0.1:0");
    let port = fleet.port("dns");
    let status = wait_ready(&fleet, 4);
    assert_eq!(
        listener_status(&status)["policy"],
        "reuseport",
        "{status:#}"
    );
    // Many flows: one datagram from each of 10,000 source ports.
    let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..10_000 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        *counts.entry(udp_round_trip(&sock, port)).or_default() += 1;
    }
    let r = ratio(&counts, 4);
    eprintln!("UDP, 10,000 flows over 4 workers: {counts:?}, max/min {r:.3}");
    assert!(r <= 1.2, "max/min {r:.3} > 1.2: {counts:?}");
    // One flow stays on one worker: 20 flows of 50 datagrams.
    for flow in 0..20 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        let seen: std::collections::BTreeSet<usize> =
            (0..50).map(|_| udp_round_trip(&sock, port)).collect();
        assert_eq!(seen.len(), 1, "flow {flow} went to workers {seen:?}");
    }
}

/// A UDP socket passed as systemd binds it without `ReusePort=yes` (no SO_REUSEPORT at bind):
/// sockvisor sets it, and the workers' sockets make a group with it, steered by flow.
#[test]
fn a_passed_udp_socket_bound_without_so_reuseport_is_steered() {
    if !require_root() {
        return;
    }
    let passed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = passed.local_addr().unwrap().port();
    let fleet = FleetBuilder::new([
        "--workers",
        "4",
        "--listen",
        "dns",
        "--",
        python(),
        probe_script().to_str().unwrap(),
    ])
    .pass(passed, "dns")
    .start();
    let status = wait_ready(&fleet, 4);
    let l = listener_status(&status);
    assert_eq!(l["policy"], "reuseport", "{l:#}\n{}", fleet.log());
    let mut counts: BTreeMap<usize, u64> = BTreeMap::new();
    for _ in 0..2_000 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        *counts.entry(udp_round_trip(&sock, port)).or_default() += 1;
    }
    let r = ratio(&counts, 4);
    eprintln!(
        "UDP passed without SO_REUSEPORT, 2,000 flows over 4 workers: {counts:?}, max/min {r:.3}"
    );
    assert!(r <= 1.3, "max/min {r:.3}: {counts:?}");
}

/// A second fleet started on the UDP port of a running one (same user) fails with "address in
/// use", as it would on a TCP port: sockvisor binds without SO_REUSEPORT and sets it only
/// afterwards. (Bound with it, the second fleet silently joined the first one's group and
/// took some of its datagrams.)
#[test]
fn a_second_fleet_on_a_served_udp_port_is_refused_not_merged() {
    if !require_root() {
        return;
    }
    let first = udp_probe_fleet(2, "dns=udp://127.0.0.1:0");
    let port = first.port("dns");
    let status = wait_ready(&first, 2);
    assert_eq!(
        listener_status(&status)["policy"],
        "reuseport",
        "{status:#}"
    );
    let url = format!("dns=udp://127.0.0.1:{port}");
    let mut second = udp_probe_fleet(2, &url);
    let exit = second.wait(T).expect("the second fleet exits");
    let log = second.log();
    assert!(!exit.success(), "{log}");
    assert!(log.contains("Address already in use"), "{log}");
    // The first one still answers every flow.
    for _ in 0..50 {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        udp_round_trip(&sock, port);
    }
}

// ---- 7. the wrong mode ------------------------------------------------------------------

/// What sockvisor says of a program that accepts on fd 3 under a channel policy.
const DIAGNOSIS: &str = "it never took a connection from fd 3 (web), a sockvisor channel under \
     dispatch round-robin: a program that calls accept() or listen() on its socket needs \
     --dispatch reuseport (or shared)";

/// The stdlib server under a channel policy: fd 3 is a channel, its accept() fails, it spins
/// without taking the connection: found wedged, with the diagnosis in the log and STATUS=.
#[test]
fn a_program_that_accepts_on_a_channel_is_told_to_use_reuseport_or_shared() {
    let mut notify = NotifySocket::new();
    let fleet = FleetBuilder::new(fleet_args(
        Program::Stdlib,
        1,
        &["--dispatch", "round-robin", "--wedged-after", "1s"],
    ))
    .notify(&notify)
    .start();
    let port = fleet.port("web");
    notify.wait_for("READY=1", T).expect("READY=1");
    // The connection waits in the worker's channel, never received.
    let client = std::thread::spawn(move || get(port, Duration::from_secs(5)));
    fleet.wait_log(DIAGNOSIS, T);
    let status = notify
        .wait_for("STATUS=worker 0 failed: it never took a connection", T)
        .unwrap_or_else(|| {
            panic!(
                "no STATUS= with the diagnosis: {:?}\n{}",
                notify.all(),
                fleet.log()
            )
        });
    assert!(status.contains(DIAGNOSIS), "{status}");
    let log = fleet.log();
    assert!(
        log.lines()
            .any(|l| l.starts_with("sockvisor: warn  worker 0 (pid ") && l.contains(DIAGNOSIS)),
        "a warning names the worker: {log}"
    );
    assert!(log.contains("wedged: "), "{log}");
    let _ = client.join();
}

/// A program that fails at once on accept(fd 3) under a channel policy: every restart fails,
/// and the give-up message repeats the diagnosis.
#[test]
fn the_give_up_message_repeats_the_diagnosis() {
    let mut notify = NotifySocket::new();
    let mut fleet = FleetBuilder::new([
        "--workers",
        "2",
        "--dispatch",
        "round-robin",
        "--listen",
        "web=tcp://127.0.0.1:0",
        "--",
        python(),
        "-c",
        "import socket; socket.socket(fileno=3).accept()",
    ])
    .notify(&notify)
    .start();
    let status = fleet.wait(T).expect("sockvisor gives up");
    let log = fleet.log();
    assert_eq!(status.code(), Some(69), "{log}");
    let give_up = log
        .lines()
        .find(|l| l.starts_with("sockvisor: error giving up: "))
        .unwrap_or_else(|| panic!("no give-up line: {log}"));
    assert!(give_up.contains(DIAGNOSIS), "{give_up}");
    let sent = notify.drained();
    assert!(
        sent.iter().any(|m| m
            .lines()
            .any(|l| l.starts_with("STATUS=failed: ") && l.contains(DIAGNOSIS))),
        "the last STATUS= repeats it: {sent:?}"
    );
}

// ---- 8. the table of issue 13, measured again ----------------------------------------------

/// Issue 13's table again: each program under `shared`, `reuseport` and the channel's
/// `round-robin`, with 2 and 4 workers: 2,000 sequential `Connection: close` requests (after
/// 100 not counted, for programs still starting: `--ready exec` says nothing about them),
/// the share of each worker, max/min and the failed requests. Under round-robin the programs
/// cannot serve (fd 3 is a channel): requests time out after 2 s, the run ends after 10
/// failures in a row or when sockvisor gives up.
///
/// `cargo test --test reuseport issue_13_table -- --ignored --nocapture`
#[test]
#[ignore = "a measurement (a few minutes): run it with --ignored --nocapture"]
fn issue_13_table() {
    if !require_root() {
        return;
    }
    let mut rows = Vec::new();
    for program in PROGRAMS {
        if !program.require() {
            continue;
        }
        for policy in ["shared", "reuseport", "round-robin"] {
            for n in [2, 4] {
                rows.push(measure(program, policy, n));
                eprintln!("{}", rows.last().unwrap());
            }
        }
    }
    println!("\n| program | policy | workers | answered | shares (%) | max/min | failed | notes |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}

fn measure(program: Program, policy: &str, workers: usize) -> String {
    let mut fleet =
        FleetBuilder::new(fleet_args(program, workers, &["--dispatch", policy])).start();
    let port = fleet.port("web");
    let row = |answered: usize, counts: &BTreeMap<usize, u64>, failed: usize, notes: &str| {
        let total: u64 = counts.values().sum::<u64>().max(1);
        let shares: Vec<String> = (0..workers)
            .map(|w| {
                format!(
                    "{:.0}",
                    100.0 * *counts.get(&w).unwrap_or(&0) as f64 / total as f64
                )
            })
            .collect();
        let r = ratio(counts, workers);
        let r = if r.is_finite() {
            format!("{r:.3}")
        } else {
            "-".into()
        };
        format!(
            "| {} | {policy} | {workers} | {answered}/{REQUESTS} | {} | {r} | {failed} | {notes} |",
            program.name(),
            shares.join("/")
        )
    };
    if policy == "round-robin" {
        let started = std::time::Instant::now();
        let (mut counts, mut failed, mut in_a_row) = (BTreeMap::new(), 0, 0);
        let mut attempts = 0;
        while attempts < REQUESTS && in_a_row < 10 && fleet.gone().is_none() {
            attempts += 1;
            match get(port, Duration::from_secs(2)) {
                Ok(body) => {
                    *counts.entry(who(&body).0).or_default() += 1;
                    in_a_row = 0;
                }
                Err(_) => {
                    failed += 1;
                    in_a_row += 1;
                }
            }
        }
        let answered: u64 = counts.values().sum();
        // A program that spins instead of failing is found wedged after `wedged_after` (30 s).
        let deadline = std::time::Instant::now() + Duration::from_secs(45);
        while fleet.gone().is_none()
            && !fleet.log().contains("it never took a connection from fd 3")
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let exit = match fleet.wait(Duration::from_secs(5)) {
            Some(s) => format!("sockvisor exited ({s})"),
            None => "sockvisor still running".to_string(),
        };
        let log = fleet.log();
        let diagnosed = log.contains("it never took a connection from fd 3");
        let notes = format!(
            "{attempts} tried, {:.0} s; {exit}; diagnosis in the log: {}; wedged kills: {}; \
             restarts: {}",
            started.elapsed().as_secs_f64(),
            if diagnosed { "yes" } else { "no" },
            log.matches(": wedged: ").count(),
            log.matches("; restarting in ").count()
        );
        return row(answered as usize, &counts, failed, &notes);
    }
    wait_ready(&fleet, workers);
    let (_, warm_failures) = sequential(port, 100);
    let (counts, failures) = sequential(port, REQUESTS);
    let note = listener_status(&fleet.status())["policy"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let answered = counts.values().sum::<u64>() as usize;
    row(
        answered,
        &counts,
        failures.len() + warm_failures.len(),
        &format!("policy in status: {note}"),
    )
}
