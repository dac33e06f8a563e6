//! Privileges and isolation (issue 8) against the real binary:
//!
//! * the control socket refuses a parent directory that is a symlink, or world-writable and
//!   not a root-owned sticky directory, with a clear error (exit 78);
//! * the workers' notify socket acts only on datagrams from its own live workers' pids;
//! * nothing of sockvisor's reaches a worker: fds, variables, its runtime directory (the
//!   worker's cwd is sockvisor's own, never the notify directory);
//! * as root: workers run as `nobody`, and a `nobody` process (what another fleet's worker
//!   is) can neither use this fleet's control socket nor make its notify socket act.
//!
//! Root-only tests print why they skip when not root.

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

/// One datagram to a unix datagram socket from this (root or not) process.
fn send_datagram(path: &str, msg: &[u8]) -> std::io::Result<usize> {
    std::os::unix::net::UnixDatagram::unbound()?.send_to(msg, path)
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
    let mut notify_path = String::new();
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
        // cwd: sockvisor's own (what systemd's WorkingDirectory= set), never its runtime dir.
        notify_path = env["NOTIFY_SOCKET"].as_str().unwrap().to_string();
        let notify_dir = Path::new(&notify_path).parent().unwrap();
        let worker_cwd = Path::new(r["cwd"].as_str().unwrap());
        assert_eq!(worker_cwd, cwd_real, "the worker's cwd is sockvisor's cwd");
        assert!(
            !worker_cwd.starts_with(notify_dir),
            "the worker's cwd is not the notify directory"
        );
    }
    // The notify directory is private (0700: sockvisor and workers of its own uid).
    let notify_dir = Path::new(&notify_path).parent().unwrap();
    let mode = std::fs::metadata(notify_dir).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700, "notify directory mode");

    // A process that is not a worker (this test) is heard but ignored.
    send_datagram(&notify_path, b"STATUS=intruder\nSTOPPING=1\nREADY=1").unwrap();
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
    d.sendto(b"STATUS=intruder\nSTOPPING=1\nREADY=1", sys.argv[2])
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
    let notify = res["notify"].as_str().unwrap();
    if notify == "sent" {
        // The directory lets nobody's group in (B's workers are nobody): the pid check
        // must drop it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !fleet_b.log().contains("ignored a notification from pid") {
            assert!(Instant::now() < deadline, "not ignored: {}", fleet_b.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    } else {
        assert!(notify.contains("Permission denied"), "{notify}");
    }
    let s = status(&fleet_b.control);
    assert_eq!(s.generation, 1, "no reload happened: {s:#?}");
    for w in &s.workers {
        assert_ne!(w.status.as_deref(), Some("intruder"), "{s:#?}");
        assert_eq!(w.state, "ready", "{s:#?}");
    }
    http_get(port_b).expect("fleet B still serving");
    http_get(port_a).expect("fleet A still serving");
}
