//! Privileges and isolation (issue 8) against the real binary:
//!
//! * the control socket refuses a parent directory that is a symlink, or world-writable and
//!   not a root-owned sticky directory, with a clear error (exit 78);
//! * the workers' notify socket acts only on datagrams from its own live workers' pids;
//!   outside systemd it is an abstract socket, so a SIGKILLed sockvisor leaves no file;
//! * nothing of sockvisor's reaches a worker: fds, variables, its runtime directory (the
//!   worker's cwd is sockvisor's own);
//! * as root: workers run as `nobody`, and a `nobody` process (what another fleet's worker
//!   is) can neither use this fleet's control socket nor make its notify socket act, even
//!   with the socket's file mode opened: the server-side credential checks refuse it;
//! * as root: `sockvisor status` refuses a control socket served by another user.
//!
//! Root-only tests say why they skip when not root, and fail instead with
//! `SOCKVISOR_REQUIRE_ALL=1`.

mod common;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// True when the test can run as root (tests/common/prereq.rs decides skip or fail).
fn root_or_skip(_test: &str) -> bool {
    require(is_root(), "needs root (setuid to nobody)")
}

/// `command` as uid/gid 65534 (nobody), with no supplementary group (std's `uid` drops
/// them).
fn as_nobody(command: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    command.uid(65534).gid(65534).current_dir("/")
}

/// A `hello` fleet whose control socket is at `control` (given on the command line).
fn run_with_control(control: &Path) -> (Option<i32>, String) {
    let mut fleet = FleetBuilder::new([
        "--workers".to_string(),
        "1".into(),
        "--listen".into(),
        "tcp://127.0.0.1:0".into(),
        "--control".into(),
        control.display().to_string(),
        "--".into(),
        hello_bin().display().to_string(),
    ])
    .start();
    let status = fleet.wait(T);
    (status.and_then(|s| s.code()), fleet.log())
}

#[test]
fn control_socket_in_a_symlinked_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let real = t.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = t.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (code, log) = run_with_control(&link.join("control.sock"));
    assert_eq!(code, Some(78), "exit 78 (config error): {log}");
    assert!(log.contains("is a symlink"), "clear error: {log}");
    assert!(
        std::fs::read_dir(&real).unwrap().next().is_none(),
        "nothing was created through the symlink"
    );
}

#[test]
fn control_socket_in_a_world_writable_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let ww = t.path().join("ww");
    std::fs::create_dir(&ww).unwrap();
    // World-writable, no sticky bit: anyone could replace the socket.
    std::fs::set_permissions(&ww, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (code, log) = run_with_control(&ww.join("control.sock"));
    assert_eq!(code, Some(78), "exit 78 (config error): {log}");
    assert!(
        log.contains("writable by other users"),
        "clear error: {log}"
    );
    // A symlink planted where the socket goes is not followed or replaced either.
    let ok = t.path().join("ok");
    std::fs::create_dir(&ok).unwrap();
    std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o700)).unwrap();
    let target = t.path().join("target-file");
    std::fs::write(&target, "keep me").unwrap();
    std::os::unix::fs::symlink(&target, ok.join("control.sock")).unwrap();
    let (code, log) = run_with_control(&ok.join("control.sock"));
    assert_eq!(code, Some(78), "exit 78: {log}");
    assert!(log.contains("not a socket"), "clear error: {log}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
}

fn status(control: &Path) -> sockvisor::control::FleetStatus {
    sockvisor::control::request(
        control,
        &sockvisor::control::Request::Status,
        Duration::from_secs(5),
    )
    .expect("status")
    .status
    .expect("status reply")
}

/// A probe fleet (python workers that report what they got), started in `cwd`.
fn probe_fleet(probe_dir: &Path, cwd: &Path, user: Option<&str>) -> Fleet {
    let mut args = vec![
        "--workers".to_string(),
        "2".into(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--ready".into(),
        "notify".into(),
    ];
    if let Some(u) = user {
        args.extend(["--user".into(), u.into()]);
    }
    args.extend([
        "--".into(),
        python().into(),
        probe_script().display().to_string(),
    ]);
    FleetBuilder::new(args)
        .env("PROBE_DIR", probe_dir)
        .env("SOCKVISOR_SECRET_TEST_VAR", "must not leak")
        .env("TMPDIR", std::env::temp_dir())
        .current_dir(cwd)
        .start()
}

fn wait_ready(control: &Path, n: usize, fleet: &Fleet) {
    let deadline = Instant::now() + T;
    loop {
        if fleet.control.exists() {
            if let Ok(r) = sockvisor::control::request(
                control,
                &sockvisor::control::Request::Status,
                Duration::from_secs(2),
            ) {
                if let Some(s) = r.status {
                    if s.workers.iter().filter(|w| w.state == "ready").count() == n {
                        return;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "fleet not ready: {}",
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn notify_socket_acts_only_on_its_own_workers_and_nothing_leaks() {
    let probe_dir = tempfile::tempdir().unwrap();
    let cwd = tempfile::tempdir().unwrap();
    let fleet = probe_fleet(probe_dir.path(), cwd.path(), None);
    let port = fleet.port("web");
    let reports = wait_probe_reports(probe_dir.path(), 2, &fleet);
    wait_ready(&fleet.control, 2, &fleet);

    let cwd_real = std::fs::canonicalize(cwd.path()).unwrap();
    let mut notify_address = String::new();
    for r in &reports {
        // No fd beyond 0-2 and the one listener; no variable of sockvisor's.
        assert_eq!(r["open_fds"], serde_json::json!([0, 1, 2, 3]), "{r:#}");
        let env = r["env"].as_object().unwrap();
        assert!(
            !env.contains_key("SOCKVISOR_SECRET_TEST_VAR"),
            "SOCKVISOR_* leaked: {env:?}"
        );
        assert!(
            !env.contains_key("SOCKVISOR_CONTROL_SOCKET"),
            "SOCKVISOR_CONTROL_SOCKET leaked: {env:?}"
        );
        // cwd: sockvisor's own (what systemd's WorkingDirectory= set).
        let worker_cwd = Path::new(r["cwd"].as_str().unwrap());
        assert_eq!(worker_cwd, cwd_real, "the worker's cwd is sockvisor's cwd");
        // Outside systemd: an abstract socket named for this sockvisor, no file anywhere.
        notify_address = env["NOTIFY_SOCKET"].as_str().unwrap().to_string();
        let prefix = format!("@sockvisor/{}/", fleet.pid());
        assert!(notify_address.starts_with(&prefix), "{notify_address}");
    }

    // A process that is not a worker (this test) is heard but ignored.
    send_notify(&notify_address, b"STATUS=intruder\nSTOPPING=1\nREADY=1").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fleet.log().contains("ignored a notification from pid") {
        assert!(Instant::now() < deadline, "not ignored: {}", fleet.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = status(&fleet.control);
    assert_eq!(s.workers.len(), 2);
    for w in &s.workers {
        assert_ne!(w.status.as_deref(), Some("intruder"), "{s:#?}");
        assert_eq!(w.state, "ready");
    }
    http_get(port).expect("still serving");
}

#[test]
fn nobody_cannot_reach_another_fleets_control_or_notify_socket() {
    if !require(is_root(), "needs root (workers as nobody, setuid)") {
        return;
    }
    // Two fleets whose workers run as nobody; the probe writes its report as nobody.
    let mk = || {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        d
    };
    let (dir_a, dir_b) = (mk(), mk());
    let cwd = tempfile::tempdir().unwrap();
    let fleet_a = probe_fleet(dir_a.path(), cwd.path(), Some("nobody"));
    let fleet_b = probe_fleet(dir_b.path(), cwd.path(), Some("nobody"));
    let (port_a, port_b) = (fleet_a.port("web"), fleet_b.port("web"));
    let reports_a = wait_probe_reports(dir_a.path(), 2, &fleet_a);
    let reports_b = wait_probe_reports(dir_b.path(), 2, &fleet_b);
    wait_ready(&fleet_a.control, 2, &fleet_a);
    wait_ready(&fleet_b.control, 2, &fleet_b);
    for r in reports_a.iter().chain(&reports_b) {
        assert_eq!(r["uid"], 65534, "worker runs as nobody: {r:#}");
        assert_eq!(r["gid"], 65534, "worker's group is nobody's: {r:#}");
        assert!(
            r["groups"].as_array().unwrap().iter().all(|g| g != 0),
            "no root supplementary group: {r:#}"
        );
        assert_eq!(r["open_fds"], serde_json::json!([0, 1, 2, 3]), "{r:#}");
    }
    let notify_b = reports_b[0]["env"]["NOTIFY_SOCKET"]
        .as_str()
        .unwrap()
        .to_string();

    // What a worker of fleet A (uid/gid 65534) could try against fleet B.
    let script = r#"
import json, socket, sys
out = {}
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(sys.argv[1])
    s.sendall(b'{"cmd":"reload"}\n')
    out["control"] = "connected: " + s.recv(4096).decode(errors="replace")
except OSError as e:
    out["control"] = "error: " + (e.strerror or str(e))
try:
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    to = sys.argv[2]
    d.sendto(b"STATUS=intruder\nSTOPPING=1\nREADY=1", "\0" + to[1:] if to.startswith("@") else to)
    out["notify"] = "sent"
except OSError as e:
    out["notify"] = "error: " + (e.strerror or str(e))
print(json.dumps(out))
"#;
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .arg(&fleet_b.control)
        .arg(&notify_b)
        .uid(65534)
        .gid(65534)
        .current_dir("/")
        .output()
        .expect("run as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("as nobody against fleet B: {}", stdout.trim());
    let res: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    let control = res["control"].as_str().unwrap();
    assert!(
        control.starts_with("error: Permission denied") || control.contains("permission denied"),
        "the control socket refuses nobody: {control}"
    );
    // The abstract socket has no file mode: the datagram arrives, and the pid check drops it.
    assert_eq!(res["notify"], "sent", "{res}");
    fleet_b.wait_log("ignored a notification from pid", Duration::from_secs(5));
    let s = status(&fleet_b.control);
    assert_eq!(s.generation, 1, "no reload happened: {s:#?}");
    for w in &s.workers {
        assert_ne!(w.status.as_deref(), Some("intruder"), "{s:#?}");
        assert_eq!(w.state, "ready", "{s:#?}");
    }
    http_get(port_b).expect("fleet B still serving");
    http_get(port_a).expect("fleet A still serving");
}

/// The status of the fleet's workers, once `n` are ready.
fn ready_worker_pids(fleet: &Fleet, n: usize) -> Vec<i32> {
    wait_ready(&fleet.control, n, fleet);
    status(&fleet.control)
        .workers
        .iter()
        .map(|w| w.pid)
        .collect()
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Issue 12, item 8: sockvisor SIGKILLed (no chance to clean up) leaves nothing in the
/// filesystem: outside systemd the workers' notify socket is abstract (it used to be a
/// `$TMPDIR/sockvisor.XXXXXX` directory, one more left behind per SIGKILL).
#[test]
fn a_sigkilled_sockvisor_leaves_nothing_behind() {
    let tmpdir = tempfile::tempdir().unwrap();
    let mut fleet = FleetBuilder::new(hello_args(2))
        .env("TMPDIR", tmpdir.path())
        .env("RUNTIME_DIRECTORY", "") // not under systemd
        .start();
    let port = fleet.port("web");
    let workers = ready_worker_pids(&fleet, 2);
    http_get(port).expect("serving");
    for &pid in &workers {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let notify = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let prefix = format!("@sockvisor/{}/", fleet.pid());
        assert!(
            notify.as_deref().is_some_and(|n| n.starts_with(&prefix)),
            "worker {pid}: NOTIFY_SOCKET={notify:?}"
        );
    }
    assert_eq!(
        entries(tmpdir.path()),
        Vec::<String>::new(),
        "while running"
    );

    fleet.signal(libc::SIGKILL);
    assert!(fleet.wait(T).is_some(), "sockvisor survived SIGKILL");
    for pid in workers {
        assert!(wait_gone(pid, T), "worker {pid} outlived sockvisor");
    }
    assert_eq!(
        entries(tmpdir.path()),
        Vec::<String>::new(),
        "after SIGKILL"
    );
}

/// Issue 12, item 5: with the control socket's mode opened to everyone, the kernel lets a
/// stranger connect, and sockvisor's own `SO_PEERCRED` check is what refuses it.
#[test]
fn an_opened_control_socket_still_refuses_a_stranger() {
    if !root_or_skip("an_opened_control_socket_still_refuses_a_stranger") {
        return;
    }
    let fleet = FleetBuilder::new(hello_args(1)).start();
    let port = fleet.port("web");
    wait_ready(&fleet.control, 1, &fleet);
    let chmod = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod(fleet.control.parent().unwrap(), 0o711);
    chmod(&fleet.control, 0o666);
    for cmd in ["status", "reload"] {
        let out = as_nobody(&mut std::process::Command::new(sockvisor_bin()))
            .args([cmd, "--control"])
            .arg(&fleet.control)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        // The server's words, not the client's EACCES ("permission denied on PATH").
        assert!(
            stderr.contains(
                "permission denied: uid 65534 may not control this sockvisor (only root and uid 0)"
            ),
            "{cmd}: {stderr}"
        );
    }
    fleet.wait_log("control socket: refused pid", T);
    assert_eq!(status(&fleet.control).generation, 1, "no reload happened");
    http_get(port).expect("still serving");
}

/// Issue 12, item 5: a stranger can reach the workers' notify socket (abstract: no file
/// mode at all; under `RuntimeDirectory=`: with the mode opened for the test), and its
/// `READY=1` is dropped by the pid check.
#[test]
fn a_strangers_ready_is_dropped_by_the_pid_check() {
    if !root_or_skip("a_strangers_ready_is_dropped_by_the_pid_check") {
        return;
    }
    for under_systemd in [false, true] {
        let probe_dir = tempfile::tempdir().unwrap();
        let rd = tempfile::tempdir().unwrap();
        let mut builder = FleetBuilder::new([
            "--workers".to_string(),
            "1".into(),
            "--listen".into(),
            "web=tcp://127.0.0.1:0".into(),
            "--ready".into(),
            "notify".into(),
            "--".into(),
            python().into(),
            probe_script().display().to_string(),
        ])
        .env("PROBE_DIR", probe_dir.path())
        .env("PROBE_NO_READY", "1");
        builder = match under_systemd {
            true => builder.env("RUNTIME_DIRECTORY", rd.path()),
            false => builder.env("RUNTIME_DIRECTORY", ""),
        };
        let fleet = builder.start();
        let report = wait_probe_reports(probe_dir.path(), 1, &fleet).remove(0);
        let address = report["env"]["NOTIFY_SOCKET"].as_str().unwrap().to_string();
        if under_systemd {
            let socket = rd.path().join("workers/notify.sock");
            assert_eq!(Path::new(&address), socket);
            for (p, mode) in [
                (rd.path(), 0o711),
                (socket.parent().unwrap(), 0o711),
                (&*socket, 0o666),
            ] {
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
            }
        } else {
            assert!(address.starts_with("@sockvisor/"), "{address}");
        }
        let script = "import socket,sys\n\
            to=sys.argv[1]\n\
            s=socket.socket(socket.AF_UNIX,socket.SOCK_DGRAM)\n\
            s.sendto(b'READY=1\\nSTATUS=forged\\n','\\0'+to[1:] if to.startswith('@') else to)\n\
            print('sent')\n";
        let out = as_nobody(&mut std::process::Command::new(python()))
            .args(["-c", script, &address])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "sent",
            "{address}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fleet.wait_log("ignored a notification from pid", T);
        let s = status(&fleet.control);
        assert_eq!(s.state, "starting", "{address}: {s:#?}");
        assert_eq!(s.workers[0].state, "starting", "{s:#?}");
        assert_eq!(s.workers[0].status, None, "{s:#?}");
    }
}

/// Issue 14, item 17: `sockvisor status` checks who answers on the control socket. A
/// socket served by another user (who took the path first) is refused before anything is
/// sent to it or believed from it.
#[test]
fn the_client_refuses_a_control_socket_served_by_another_user() {
    if !root_or_skip("the_client_refuses_a_control_socket_served_by_another_user") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(t.path(), Some(65534), Some(65534)).unwrap();
    let socket = t.path().join("control.sock");
    let log = t.path().join("requests.log");
    let fake = r#"{"ok":true,"message":"all is fine, trust me"}"#;
    let mut python_as_nobody = std::process::Command::new(python());
    as_nobody(&mut python_as_nobody);
    let server = fake_control_server(python_as_nobody, &socket, fake, Some(&log));
    for cmd in ["status", "reload"] {
        let out = std::process::Command::new(sockvisor_bin())
            .args([cmd, "--control"])
            .arg(&socket)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd}: {stderr}");
        assert!(
            stderr.contains("refusing to talk to") && stderr.contains("running as uid 65534"),
            "{cmd}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{cmd} believed it");
    }
    drop(server);
    assert!(
        std::fs::read(&log).unwrap_or_default().is_empty(),
        "a request reached the stranger's socket"
    );
}
