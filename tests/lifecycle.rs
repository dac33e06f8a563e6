//! Reload, scaling and the control socket (issue 5) against the real binary.

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
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

#[test]
fn five_reloads_under_load_fail_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("app.toml");
    write_config(&config, 3, &hello_cmd());
    let (fleet, mut notify) = start(&config);
    let port = fleet.port("web");
    let load = ClientLoop::start(port, "hello from worker");
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
    let LoadSummary {
        ok,
        failed,
        retried,
        failures,
    } = load.finish();
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
    let load = ClientLoop::start(port, "hello from worker");
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
    let LoadSummary {
        ok,
        failed,
        retried,
        failures,
    } = load.finish();
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
