//! Connection dispatch (issue 3) against the real binary: balance, the python protocol
//! worker, ip-hash, nothing lost when a worker dies, backpressure, least-connections, and
//! mixed listeners.

mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// `hello from worker <id> (pid <pid>)` -> (id, pid)
fn who(body: &str) -> (String, i32) {
    let line = body
        .lines()
        .rev()
        .find(|l| l.starts_with("hello from worker"))
        .unwrap_or_else(|| panic!("not a hello reply: {body:?}"));
    let mut w = line.split_whitespace();
    let id = w.nth(3).unwrap().to_string();
    let pid = w.nth(1).unwrap().trim_end_matches(')').parse().unwrap();
    (id, pid)
}

/// A `hello` fleet under the channel policies this file tests (`--dispatch round-robin`
/// unless the arguments or the config choose; the default, `auto`, is kernel-steered:
/// tests/reuseport.rs).
fn hello_fleet(args: &[&str]) -> (Fleet, NotifySocket) {
    let mut notify = NotifySocket::new();
    let mut all: Vec<String> = vec!["--ready".into(), "notify".into()];
    if !args.iter().any(|a| *a == "--dispatch" || *a == "-c") {
        all.extend(["--dispatch".into(), "round-robin".into()]);
    }
    all.extend(args.iter().map(|s| s.to_string()));
    all.push("--".into());
    all.push(hello_bin().display().to_string());
    let fleet = FleetBuilder::new(&all)
        .env("HELLO_READY", "1")
        .notify(&notify)
        .start();
    notify
        .wait_for("READY=1", T)
        .unwrap_or_else(|| panic!("not ready: {}", fleet.log()));
    (fleet, notify)
}

#[test]
fn round_robin_balances_10000_connections_over_4_workers() {
    let (fleet, _n) = hello_fleet(&["--workers", "4", "--listen", "web=tcp://127.0.0.1:0"]);
    let port = fleet.port("web");
    let mut per_worker: BTreeMap<i32, u32> = BTreeMap::new();
    for _ in 0..10_000 {
        let body = http_get(port).expect("request");
        *per_worker.entry(who(&body).1).or_default() += 1;
    }
    assert_eq!(per_worker.len(), 4, "{per_worker:?}");
    let max = *per_worker.values().max().unwrap() as f64;
    let min = *per_worker.values().min().unwrap() as f64;
    eprintln!(
        "round robin over 10000 connections: {per_worker:?}, max/min {:.3}",
        max / min
    );
    assert!(max / min <= 1.05, "balance {per_worker:?}");
    // The same counts as sockvisor's own.
    let status = fleet.status();
    let dispatched: u64 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["dispatched"].as_u64().unwrap())
        .sum();
    assert_eq!(dispatched, 10_000);
}

#[test]
fn the_python_worker_from_the_protocol_doc_serves_under_round_robin() {
    let mut notify = NotifySocket::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/worker.py");
    let fleet = FleetBuilder::new([
        "--workers".to_string(),
        "2".into(),
        "--dispatch".into(),
        "round-robin".into(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--".into(),
        python().into(),
        script.display().to_string(),
    ])
    .notify(&notify)
    .start();
    notify.wait_for("READY=1", T).expect("ready");
    let port = fleet.port("web");
    let mut bodies = BTreeSet::new();
    for _ in 0..10 {
        let reply = http_get(port).unwrap_or_else(|e| panic!("{e}: {}", fleet.log()));
        assert!(
            reply.starts_with("HTTP/1.") && reply.contains("python"),
            "{reply}"
        );
        bodies.insert(reply.lines().last().unwrap_or_default().to_string());
    }
    assert_eq!(bodies.len(), 2, "both python workers answered: {bodies:?}");
}

/// A GET from a given loopback source address.
fn get_from(source: &str, port: u16) -> String {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .unwrap();
    let src: SocketAddr = format!("{source}:0").parse().unwrap();
    nix::sys::socket::bind(
        std::os::fd::AsRawFd::as_raw_fd(&sock),
        &nix::sys::socket::SockaddrIn::from(match src {
            SocketAddr::V4(a) => a,
            _ => unreachable!(),
        }),
    )
    .unwrap();
    let mut s = TcpStream::from(sock);
    let dst: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let dst4 = match dst {
        SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    nix::sys::socket::connect(
        std::os::fd::AsRawFd::as_raw_fd(&s),
        &nix::sys::socket::SockaddrIn::from(dst4),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("{source}: no answer within 10 s (safety timeout): {e}"));
    out
}

#[test]
fn ip_hash_is_sticky_and_moves_only_a_dead_slots_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        // A killed worker's slot stays empty for the rest of the test (restart in 5 minutes).
        "workers = 3\nrestart_delay = \"300s\"\nrestart_delay_max = \"300s\"\n\
         [[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\ndispatch = \"ip-hash\"\n",
    )
    .unwrap();
    let (fleet, _n) = hello_fleet(&["-c", config.to_str().unwrap()]);
    let port = fleet.port("web");
    let sources: Vec<String> = (2..14).map(|i| format!("127.0.0.{i}")).collect();
    let mut home: BTreeMap<String, (String, i32)> = BTreeMap::new();
    for s in &sources {
        let first = who(&get_from(s, port));
        for _ in 0..4 {
            assert_eq!(who(&get_from(s, port)), first, "{s} is sticky");
        }
        home.insert(s.clone(), first);
    }
    let slots: BTreeSet<&String> = home.values().map(|(id, _)| id).collect();
    assert!(slots.len() >= 2, "addresses spread over slots: {home:?}");
    // Kill the worker of the first address's slot; the slot stays empty (restart delay).
    let (victim_slot, victim_pid) = home[&sources[0]].clone();
    // SAFETY: kill(2) on a worker of our fleet.
    unsafe { libc::kill(victim_pid, libc::SIGKILL) };
    assert!(wait_gone(victim_pid, T));
    fleet.wait_log(&format!("pid {victim_pid}) killed by SIGKILL"), T);
    // The dead slot's addresses are served at once by the live slots (get_from fails after
    // 10 s, a safety timeout, if sockvisor held them for their empty slot); the others stay.
    for s in &sources {
        let now = who(&get_from(s, port));
        if home[s].0 == victim_slot {
            assert_ne!(
                now.0, victim_slot,
                "{s}: answered by slot {victim_slot}, which has no worker"
            );
        } else {
            assert_eq!(
                now, home[s],
                "{s} did not move: only the dead slot's addresses move"
            );
        }
    }
    let slots: Vec<String> = worker_pids(&fleet).into_iter().map(|(s, _)| s).collect();
    assert!(
        !slots.contains(&victim_slot),
        "slot {victim_slot} was still empty while its addresses were served: {slots:?}"
    );
}

/// Connect and send a request without waiting for the answer.
fn start_request(port: u16) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    s
}

fn finish_request(mut s: TcpStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out)
        .unwrap_or_else(|e| panic!("no complete answer (safety timeout {T:?}): {e}"));
    out
}

fn worker_pids(fleet: &Fleet) -> Vec<(String, i32)> {
    fleet.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["slot"].to_string(), w["pid"].as_i64().unwrap() as i32))
        .collect()
}

#[test]
fn connections_queued_to_a_dead_worker_are_served_by_another() {
    let (fleet, _n) = hello_fleet(&["--workers", "2", "--listen", "web=tcp://127.0.0.1:0"]);
    let port = fleet.port("web");
    let pids = worker_pids(&fleet);
    let stopped = pids[0].1;
    // SAFETY: kill(2) on a worker of our fleet.
    unsafe { libc::kill(stopped, libc::SIGSTOP) };
    let pending: Vec<TcpStream> = (0..20).map(|_| start_request(port)).collect();
    // Every connection handed out; round robin gave the stopped worker its share, which
    // waits in its channel (a stopped worker receives nothing, so this count stays).
    let dispatched = |s: &serde_json::Value| -> u64 {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["dispatched"].as_u64().unwrap())
            .sum()
    };
    let status = fleet.wait_status("the 20 connections dispatched", |s| dispatched(s) == 20);
    let queued = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == stopped)
        .map(|w| w["queued"].as_u64().unwrap())
        .unwrap();
    assert!(
        queued > 0,
        "connections wait in the stopped worker's channel: {status:#}"
    );
    // SAFETY: as above.
    unsafe { libc::kill(stopped, libc::SIGKILL) };
    // Its queue is read back and dispatched again: every connection is answered, and the
    // log says exactly how many were handed over.
    let mut answered_by = BTreeMap::<i32, u32>::new();
    for s in pending {
        let body = finish_request(s);
        *answered_by.entry(who(&body).1).or_default() += 1;
    }
    eprintln!(
        "{queued} connections were queued to the stopped worker; answers by pid: {answered_by:?}"
    );
    assert_eq!(
        answered_by.values().sum::<u32>(),
        20,
        "every connection answered"
    );
    fleet.wait_log(
        &format!("(pid {stopped}): {queued} queued connections handed to other workers"),
        T,
    );
}

fn rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn backpressure_keeps_memory_flat_and_serves_everything_later() {
    let (fleet, _n) = hello_fleet(&[
        "--workers",
        "2",
        "--window",
        "16",
        "--listen",
        "web=tcp://127.0.0.1:0",
    ]);
    let port = fleet.port("web");
    let pids: Vec<i32> = worker_pids(&fleet).into_iter().map(|(_, p)| p).collect();
    for &p in &pids {
        // SAFETY: kill(2) on workers of our fleet.
        unsafe { libc::kill(p, libc::SIGSTOP) };
    }
    let before = rss_kib(fleet.pid());
    let flood: Vec<TcpStream> = (0..600).map(|_| start_request(port)).collect();
    // sockvisor took what fits in the windows (2 x 16), the kernel backlog holds the rest.
    let accepted_now = |s: &serde_json::Value| s["listeners"][0]["accepted"].as_u64().unwrap();
    fleet.wait_status("the windows full and one connection pending", |s| {
        accepted_now(s) > 2 * 16
    });
    // Two more requests to sockvisor, two more turns of its loop: a listener still polled
    // would accept more of the 600 waiting in the backlog meanwhile.
    fleet.status();
    let accepted = accepted_now(&fleet.status());
    let after = rss_kib(fleet.pid());
    eprintln!("flood of 600 with every worker stopped: sockvisor accepted {accepted}, RSS {before} -> {after} KiB");
    assert!(
        accepted <= 2 * 16 + 1,
        "sockvisor stopped accepting once the windows were full ({accepted})"
    );
    assert!(
        after < before + 1024,
        "RSS grew from {before} to {after} KiB"
    );
    for &p in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    for s in flood {
        assert!(finish_request(s).contains("hello from worker"));
    }
}

#[test]
fn least_connections_skips_a_worker_holding_long_connections() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "workers = 1\n[[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:0\"\ndispatch = \"least-connections\"\n",
    )
    .unwrap();
    let (fleet, _n) = hello_fleet(&["-c", config.to_str().unwrap()]);
    let port = fleet.port("web");
    // Ten long-lived keep-alive connections, all on worker 0.
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 512];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("worker 0"));
        held.push(s);
    }
    let out = fleet.ctl(&["scale", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_ready_count("the second worker ready", 2);
    for _ in 0..20 {
        let (id, _) = who(&http_get(port).unwrap());
        assert_eq!(
            id, "1",
            "new connections go to the idle worker while worker 0 holds 10"
        );
    }
    let status = fleet.status();
    let w0 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == 0)
        .unwrap()
        .clone();
    assert_eq!(
        w0["open"], 10,
        "close reports count worker 0's open connections: {w0}"
    );
    drop(held);
}

#[test]
fn shared_round_robin_and_unix_listeners_side_by_side() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("app.sock");
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "workers = 2\ndispatch = \"round-robin\"\n\
             [[listen]]\nname = \"rr\"\nurl = \"tcp://127.0.0.1:0\"\n\
             [[listen]]\nname = \"shared\"\nurl = \"tcp://127.0.0.1:0\"\ndispatch = \"shared\"\n\
             [[listen]]\nname = \"local\"\nurl = \"unix:{}\"\n",
            sock.display()
        ),
    )
    .unwrap();
    let (fleet, _n) = hello_fleet(&["-c", config.to_str().unwrap()]);
    let (a, b) = (fleet.port("rr"), fleet.port("shared"));
    let status = fleet.status();
    let policies: Vec<&str> = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["policy"].as_str().unwrap())
        .collect();
    assert_eq!(policies, ["round-robin", "shared", "round-robin"]);
    let mut rr = BTreeSet::new();
    for _ in 0..4 {
        rr.insert(who(&http_get(a).unwrap()).1);
        assert!(http_get(b).unwrap().contains("hello from worker"));
        let mut u = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        u.write_all(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        u.read_to_string(&mut out).unwrap();
        assert!(out.contains("hello from worker"), "{out}");
    }
    assert_eq!(rr.len(), 2, "round robin alternates");
    let accepted: Vec<Option<u64>> = fleet.status()["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["accepted"].as_u64())
        .collect();
    assert_eq!(
        accepted,
        [Some(4), None, Some(4)],
        "shared connections are accepted by the workers themselves (not counted: null)"
    );
}
