//! Issue 17, item 3: `notify_access = "all"` (systemd's `NotifyAccess=all`): a worker's
//! notifications also count when a process descended from it sends them (a shell-script
//! worker calling the real `systemd-notify --ready`, a Python worker's forked child). The
//! default, `main`, ignores them (logged); a process outside the worker's tree never counts.

mod common;
use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// A worker whose forked child sends `READY=1` and lives on (the worker waits for it).
const PYTHON_CHILD_READY: &str = r#"
import os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
addr = "\0" + addr[1:] if addr.startswith("@") else addr
if os.fork() == 0:
    socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b"READY=1", addr)
    time.sleep(600)
    os._exit(0)
os.wait()
"#;

fn fleet_with(access: &str, command: &[&str]) -> Fleet {
    let mut args = vec![
        "--workers",
        "1",
        "--ready",
        "notify",
        "--notify-access",
        access,
        "--dispatch",
        "shared",
        "-l",
        "web=tcp://127.0.0.1:0",
        "--",
    ];
    args.extend_from_slice(command);
    FleetBuilder::new(args).start()
}

/// `status --json`, once the control socket answers.
fn status(fleet: &Fleet) -> serde_json::Value {
    fleet.wait_until("sockvisor status", T, || {
        let out = fleet.ctl(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    })
}

fn ready(fleet: &Fleet) -> bool {
    status(fleet)["workers"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w["state"] == "ready"))
}

#[test]
fn systemd_notify_from_a_shell_script_worker() {
    if !require(
        have_program("systemd-notify"),
        "systemd-notify not installed (Debian package systemd)",
    ) {
        return;
    }
    // `systemd-notify` exits right after sending; the shell then reaps it. sockvisor reads
    // the datagram at once, while the sender is still in the process tree (alive or a
    // zombie); `exec sleep` keeps the worker.
    let fleet = fleet_with(
        "all",
        &["sh", "-c", "systemd-notify --ready; exec sleep 600"],
    );
    fleet.wait_until("the worker ready", T, || ready(&fleet).then_some(()));
    fleet.wait_log("worker 0 ready", T);
}

#[test]
fn a_forked_child_of_a_python_worker() {
    let fleet = fleet_with("all", &[python(), "-c", PYTHON_CHILD_READY]);
    fleet.wait_until("the worker ready", T, || ready(&fleet).then_some(()));
}

#[test]
fn without_the_option_a_childs_ready_is_ignored_and_logged() {
    let fleet = fleet_with("main", &[python(), "-c", PYTHON_CHILD_READY]);
    fleet.wait_log("ignored a notification from pid", T);
    assert!(!ready(&fleet), "{}", fleet.log());
    assert_eq!(
        fleet.log().matches("ignored a notification").count(),
        1,
        "logged once: {}",
        fleet.log()
    );
}

#[test]
fn a_process_outside_the_workers_tree_never_counts() {
    for access in ["main", "all"] {
        let fleet = fleet_with(access, &["sh", "-c", "exec sleep 600"]);
        let pid = fleet.wait_until("a worker", T, || {
            status(&fleet)["workers"][0]["pid"].as_i64()
        });
        // Once exec'd (before, /proc shows sockvisor's own environment).
        let address = fleet.wait_until("the worker's NOTIFY_SOCKET", T, || {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            environ
                .split(|&b| b == 0)
                .find_map(|kv| kv.strip_prefix(b"NOTIFY_SOCKET="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
        });
        send_notify(&address, b"READY=1").unwrap();
        fleet.wait_log("ignored a notification from pid", T);
        assert!(!ready(&fleet), "{access}: {}", fleet.log());
    }
}
