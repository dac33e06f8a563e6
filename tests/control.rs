//! The control socket against the real binary (issue 14): replies in request order, a
//! flood of requests that does not stall the fleet, and a status table that no field can
//! use to drive the terminal.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

fn hello_fleet(workers: usize) -> Fleet {
    FleetBuilder::new(hello_args(workers)).start()
}

/// Wait until the fleet says it is running with every worker ready.
fn wait_running(fleet: &Fleet) {
    let deadline = Instant::now() + T;
    loop {
        if let Ok(r) = sockvisor::control::request(
            &fleet.control,
            &sockvisor::control::Request::Status,
            Duration::from_secs(5),
        ) {
            // An error reply (right after a flood: "too many clients" until the flood's
            // clients are gone) means not yet.
            if let Some(s) = r.status {
                if s.state == "running" && s.workers.iter().all(|w| w.state == "ready") {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "not running: {}", fleet.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Issue 14, item 9: a pipelined `reload` then `status` gets the reload's reply first (it
/// comes when the reload is over), then the status, as docs/control.md promises.
#[test]
fn pipelined_reload_then_status_are_answered_in_order() {
    let fleet = hello_fleet(2);
    wait_running(&fleet);
    let port = fleet.port("web");
    let mut c = UnixStream::connect(&fleet.control).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(b"{\"cmd\":\"reload\"}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    let mut lines = BufReader::new(&c).lines();
    let mut next = || -> serde_json::Value {
        serde_json::from_str(&lines.next().expect("a reply").expect("read")).unwrap()
    };
    let (first, second) = (next(), next());
    assert_eq!(first["ok"], true, "{first}");
    assert!(
        first["status"].is_null() && first["message"].as_str().unwrap().contains("reloaded"),
        "the reload's reply comes first: {first}"
    );
    assert_eq!(second["ok"], true, "{second}");
    // Answered when it was read, during the reload.
    assert_eq!(second["status"]["state"], "reloading", "{second}");
    http_get(port).expect("serving after the reload");
}

/// Issue 14, item 3: 16 clients flood the control socket with `status` requests (256 KiB
/// of them each, replies read as they come) while a client measures HTTP latency against
/// the fleet. The supervisor takes a few requests per client per wake-up, so accepts go on.
/// The worst latency is printed; the bound is generous (a safety bound, not a benchmark).
#[test]
fn a_flood_of_control_requests_does_not_stall_the_fleet() {
    const CLIENTS: usize = 16;
    const FLOOD_BYTES: usize = 256 * 1024;
    const WINDOW: Duration = Duration::from_secs(5);
    let fleet = hello_fleet(4);
    wait_running(&fleet);
    let port = fleet.port("web");
    http_get(port).expect("serving");

    let line = b"{\"cmd\":\"status\"}\n";
    let flood: Vec<u8> = line.repeat(FLOOD_BYTES / line.len());
    let mut streams = Vec::new();
    let mut threads = Vec::new();
    for _ in 0..CLIENTS {
        let c = UnixStream::connect(&fleet.control).unwrap();
        let mut writer = c.try_clone().unwrap();
        let reader = c.try_clone().unwrap();
        let flood = flood.clone();
        threads.push(std::thread::spawn(move || {
            let _ = writer.write_all(&flood); // fails once the test shuts the socket down
        }));
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut reader = reader;
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
            }
        }));
        streams.push(c);
    }

    let start = Instant::now();
    let (mut worst, mut requests) = (Duration::ZERO, 0);
    while start.elapsed() < WINDOW {
        let t = Instant::now();
        let reply = http_get(port).expect("an HTTP request during the flood");
        assert!(reply.contains("200 OK"), "{reply}");
        worst = worst.max(t.elapsed());
        requests += 1;
    }
    // The flood was still going: the control socket keeps answering (here, one more status
    // on a 17th connection is refused as "too many", which is an answer too).
    let busy = sockvisor::control::request(
        &fleet.control,
        &sockvisor::control::Request::Status,
        Duration::from_secs(5),
    );
    for c in &streams {
        let _ = c.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        t.join().unwrap();
    }
    eprintln!(
        "control flood ({CLIENTS} clients x {} KiB of status lines): {requests} HTTP requests in {:.1}s, worst latency {:.1} ms",
        FLOOD_BYTES / 1024,
        WINDOW.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );
    assert!(
        matches!(&busy, Ok(r) if !r.ok && r.error.as_deref().is_some_and(|e| e.contains("too many"))),
        "{busy:?}"
    );
    assert!(
        worst < Duration::from_secs(1),
        "an HTTP request waited {worst:?} behind the control flood"
    );
    http_get(port).expect("serving after the flood");
    // The flood clients are gone and the socket serves again.
    wait_running(&fleet);
}

/// Issue 14, item 17: every text field of a status reply reaches the terminal without its
/// control characters (escape sequences, newlines), not only the workers' STATUS=; so do
/// error and message lines.
#[test]
fn status_output_carries_no_control_characters() {
    let evil = "x\u{1b}]0;owned\u{7}y\u{1b}[2J\r\nz\u{9b}31m\u{7f}";
    let status = serde_json::json!({
        "ok": true,
        "status": {
            "pid": 1, "generation": 1, "state": evil, "workers_wanted": 1, "summary": evil,
            "workers": [{"slot": 0, "pid": 2, "generation": 1, "state": evil,
                         "uptime_secs": 1.0, "restarts": 0, "dispatched": 0, "queued": 0,
                         "open": null, "status": evil}],
            "listeners": [{"name": evil, "address": evil, "policy": evil,
                           "accepted": 0, "pending": 0}]
        }
    });
    let error = serde_json::json!({"ok": false, "error": evil});
    let message = serde_json::json!({"ok": true, "message": evil});
    for (cmd, reply) in [("status", status), ("reload", error), ("reload", message)] {
        let t = tempfile::tempdir().unwrap();
        let socket = t.path().join("control.sock");
        // Run as this test's own user: a server the client trusts.
        let server = fake_control_server(
            std::process::Command::new(python()),
            &socket,
            &reply.to_string(),
            None,
        );
        let out = std::process::Command::new(sockvisor_bin())
            .args([cmd, "--control"])
            .arg(&socket)
            .output()
            .unwrap();
        drop(server);
        for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            let text = String::from_utf8_lossy(text);
            assert!(
                !text.chars().any(|c| c.is_control() && c != '\n'),
                "{cmd} {reply}: {name} {text:?}"
            );
            assert!(
                !text.contains("x ]0;owned y [2J\n"),
                "a newline got through: {text:?}"
            );
        }
        let all = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        assert!(all.contains("x ]0;owned y [2J  z 31m "), "{cmd}: {all:?}");
    }
}
