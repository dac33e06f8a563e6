//! Issue 16, items 1 and 2, against the real binary: `sockvisor signal`, and messages
//! between the operator and the workers (`messages = true`, docs/messages.md).
//!
//! The workers are `examples/messenger.rs` (the Rust API, `sockvisor::worker::Messages`):
//! they record what they get in `$MESSENGER_DIR/<slot>-<pid>.log` and obey the operator's
//! commands; and `examples/messages.py`, the Python example of docs/messages.md.
//!
//! Message order is what makes "exactly once" and "only that one" checkable without
//! sleeping: messages from one sender to one receiver arrive in the order sent, so once a
//! later marker has arrived, an earlier duplicate would have too.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// `--workers N --messages --ready notify --dispatch round-robin` messenger workers on
/// listener `web`, recording into a fresh directory.
fn messenger_fleet(workers: usize, env: &[(&str, &str)]) -> (Fleet, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut b = FleetBuilder::new([
        "--workers",
        &workers.to_string(),
        "--messages",
        "--ready",
        "notify",
        "--dispatch",
        "round-robin",
        "-l",
        "web=tcp://127.0.0.1:0",
        "--",
        example_bin("messenger").to_str().unwrap(),
    ])
    .env("MESSENGER_DIR", dir.path());
    for (k, v) in env {
        b = b.env(k, v);
    }
    let fleet = b.start();
    wait_ready(&fleet, workers);
    (fleet, dir)
}

/// Wait until the control socket answers and `workers` workers are ready.
fn wait_ready(fleet: &Fleet, workers: usize) -> serde_json::Value {
    fleet.wait_until(&format!("{workers} workers ready"), T, || {
        let out = fleet.ctl(&["status", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let w = s["workers"].as_array()?;
        (s["state"] == "running" && w.len() == workers && w.iter().all(|w| w["state"] == "ready"))
            .then_some(s)
    })
}

/// Each slot's record lines (one worker per slot in these tests).
fn records(dir: &Path) -> BTreeMap<usize, Vec<String>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(slot) = name.strip_suffix(".log").and_then(|n| n.split('-').next()) else {
            continue;
        };
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.insert(
            slot.parse().unwrap(),
            text.lines().map(str::to_string).collect(),
        );
    }
    out
}

fn count(lines: &[String], line: &str) -> usize {
    lines.iter().filter(|l| *l == line).count()
}

/// Wait until every slot in `slots` recorded `line` at least once.
fn wait_recorded(
    fleet: &Fleet,
    dir: &Path,
    slots: &[usize],
    line: &str,
) -> BTreeMap<usize, Vec<String>> {
    fleet.wait_until(&format!("{line:?} recorded by slots {slots:?}"), T, || {
        let r = records(dir);
        slots
            .iter()
            .all(|s| r.get(s).is_some_and(|l| count(l, line) > 0))
            .then_some(r)
    })
}

/// `sockvisor ARGS`, which must succeed; its stdout.
fn ctl_ok(fleet: &Fleet, args: &[&str]) -> String {
    let out = fleet.ctl(args);
    assert!(
        out.status.success(),
        "sockvisor {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn pids_by_slot(status: &serde_json::Value) -> BTreeMap<usize, i64> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["slot"].as_u64().unwrap() as usize,
                w["pid"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn request(fleet: &Fleet, json: &str) -> sockvisor::control::Reply {
    let req: sockvisor::control::Request = serde_json::from_str(json).unwrap();
    sockvisor::control::request(&fleet.control, &req, T).unwrap()
}

#[test]
fn signal_reaches_every_worker_or_one_slot() {
    let (fleet, dir) = messenger_fleet(3, &[]);
    wait_recorded(&fleet, dir.path(), &[0, 1, 2], "started");
    let pids = pids_by_slot(&fleet.status());

    let out = ctl_ok(&fleet, &["signal", "SIGUSR1"]);
    let mut all: Vec<String> = pids.values().map(|p| p.to_string()).collect();
    all.sort();
    assert_eq!(
        out.trim(),
        format!("SIGUSR1 sent to 3 worker(s): pids {}", all.join(", ")),
    );
    wait_recorded(&fleet, dir.path(), &[0, 1, 2], "signal SIGUSR1");

    // --slot: that worker only. The reply names it.
    let reply = request(&fleet, r#"{"cmd":"signal","signal":"usr1","slot":1}"#);
    assert!(reply.ok, "{reply:?}");
    let reached = reply.workers.unwrap();
    assert_eq!(reached.len(), 1);
    assert_eq!((reached[0].slot, i64::from(reached[0].pid)), (1, pids[&1]));
    // SIGUSR2 to all after it: signalfd hands out the lower-numbered SIGUSR1 first, so once
    // every worker recorded SIGUSR2, any SIGUSR1 sent before it was recorded too.
    ctl_ok(&fleet, &["signal", "12", "--generation", "1"]);
    let r = wait_recorded(&fleet, dir.path(), &[0, 1, 2], "signal SIGUSR2");
    for (slot, want) in [(0, 1), (1, 2), (2, 1)] {
        assert_eq!(
            count(&r[&slot], "signal SIGUSR1"),
            want,
            "slot {slot}: {:?}",
            r[&slot]
        );
    }

    // Refusals: by the client before it connects (a usage error), and by the server.
    let out = fleet.ctl(&["signal", "SIGKILL"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGKILL is refused"));
    let out = fleet.ctl(&["signal", "SIGBOGUS"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown signal \"SIGBOGUS\""));
    for (json, want) in [
        (
            r#"{"cmd":"signal","signal":"SIGSTOP"}"#,
            "SIGSTOP is refused",
        ),
        (r#"{"cmd":"signal","signal":"0"}"#, "not a signal"),
        (
            r#"{"cmd":"signal","signal":"usr1","slot":7}"#,
            "no worker in slot 7",
        ),
        (
            r#"{"cmd":"signal","signal":"usr1","generation":2}"#,
            "no worker of generation 2",
        ),
    ] {
        let reply = request(&fleet, json);
        assert!(
            !reply.ok && reply.error.as_deref().unwrap().contains(want),
            "{json}: {reply:?}"
        );
    }
    // Nobody died of it.
    assert_eq!(pids_by_slot(&fleet.status()), pids);
}

#[test]
fn operator_messages_to_one_worker_and_to_all() {
    let (fleet, dir) = messenger_fleet(3, &[]);
    let pids = pids_by_slot(&fleet.status());
    let out = ctl_ok(&fleet, &["send", "--slot", "2", "note for two"]);
    assert_eq!(out.trim(), "sent to 1 worker(s): slot 2");
    let reply = request(&fleet, r#"{"cmd":"send","payload_base64":"ZXZlcnlvbmU="}"#);
    assert!(reply.ok, "{reply:?}");
    let to: Vec<(usize, i64)> = reply
        .workers
        .unwrap()
        .iter()
        .map(|w| (w.slot, i64::from(w.pid)))
        .collect();
    assert_eq!(to, pids.clone().into_iter().collect::<Vec<_>>());
    // "everyone" arrived everywhere after "note for two": the note went to slot 2 only.
    let r = wait_recorded(
        &fleet,
        dir.path(),
        &[0, 1, 2],
        "message from=operator to=all everyone",
    );
    let note = "message from=operator to=2 note for two";
    assert_eq!(count(&r[&2], note), 1, "{:?}", r[&2]);
    assert_eq!(count(&r[&0], note) + count(&r[&1], note), 0);
    for lines in r.values() {
        assert_eq!(count(lines, "message from=operator to=all everyone"), 1);
    }
    // Errors are clear.
    let out = fleet.ctl(&["send", "--slot", "9", "x"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("no slot 9 (slots 0 to 2)"), "{e}");
    let big = "x".repeat(64 * 1024 + 1);
    let out = fleet.ctl(&["send", &big]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("larger than the 65536 bytes"));
    let s = fleet.status();
    assert_eq!(s["workers"][2]["messages"]["received"], 2, "{s}");
    assert_eq!(s["messages"]["delivered"], 4, "{s}");
}

#[test]
fn a_worker_broadcast_reaches_every_other_worker_exactly_once() {
    let (fleet, dir) = messenger_fleet(4, &[]);
    ctl_ok(
        &fleet,
        &["send", "--slot", "0", "broadcast hello from zero"],
    );
    ctl_ok(&fleet, &["send", "--slot", "0", "broadcast marker"]);
    ctl_ok(&fleet, &["send", "--slot", "1", "to 3 direct from one"]);
    ctl_ok(&fleet, &["send", "--slot", "1", "to 3 marker"]);
    let r = wait_recorded(
        &fleet,
        dir.path(),
        &[1, 2, 3],
        "message from=0 to=all marker",
    );
    for slot in [1, 2, 3] {
        assert_eq!(
            count(&r[&slot], "message from=0 to=all hello from zero"),
            1,
            "slot {slot}: {:?}",
            r[&slot]
        );
    }
    assert!(
        !r[&0].iter().any(|l| l.starts_with("message from=0")),
        "a broadcast skips its sender: {:?}",
        r[&0]
    );
    let r = wait_recorded(&fleet, dir.path(), &[3], "message from=1 to=3 marker");
    assert_eq!(count(&r[&3], "message from=1 to=3 direct from one"), 1);
    for slot in [0, 1, 2] {
        assert!(
            !r[&slot].iter().any(|l| l.starts_with("message from=1 ")),
            "slot {slot}"
        );
    }
}

/// `sockvisor messages --follow` in the background; its stdout lines on a channel.
struct Follower {
    child: KillOnDrop,
    lines: mpsc::Receiver<String>,
}

impl Follower {
    /// Start one and wait until the fleet counts `followers` of them.
    fn start(fleet: &Fleet, json: bool, followers: u64) -> Follower {
        let mut cmd = Command::new(sockvisor_bin());
        cmd.args(["messages", "--follow"]);
        if json {
            cmd.arg("--json");
        }
        cmd.arg("--control").arg(&fleet.control);
        let mut child = KillOnDrop(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Subscribed once the fleet counts it.
        fleet.wait_status("messages --follow clients", |s| {
            s["messages"]["followers"] == followers
        });
        Follower { child, lines }
    }

    /// Its exit status, once it exited (within the safety timeout).
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + T;
        loop {
            if let Some(s) = self.child.0.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "messages --follow did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines until each of `needles` was in one; returns the lines that had one.
    fn wait_all(&self, needles: &[&str]) -> Vec<String> {
        let mut left: Vec<&str> = needles.to_vec();
        let mut found = Vec::new();
        while !left.is_empty() {
            let line = self.wait_for("");
            if let Some(i) = left.iter().position(|n| line.contains(n)) {
                left.remove(i);
                found.push(line);
            }
        }
        found
    }

    /// The next line that contains `needle` (earlier ones are skipped).
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no line with {needle:?} from messages --follow: {e}"),
            }
        }
    }
}

#[test]
fn messages_follow_prints_what_workers_send_to_the_operator() {
    let (mut fleet, _dir) = messenger_fleet(2, &[]);
    let pids = pids_by_slot(&fleet.status());
    // Nobody follows yet: counted as unheard.
    ctl_ok(&fleet, &["send", "--slot", "0", "operator into the void"]);
    fleet.wait_status("an unheard message", |s| s["messages"]["unheard"] == 1);

    let mut follower = Follower::start(&fleet, false, 1);
    ctl_ok(&fleet, &["send", "--slot", "1", "operator hello operator"]);
    let line = follower.wait_for("hello operator");
    assert_eq!(
        line,
        format!("slot 1 (pid {}, generation 1): hello operator", pids[&1])
    );
    let json = Follower::start(&fleet, true, 2);
    ctl_ok(&fleet, &["send", "--slot", "0", "operator \u{1b}[2Jsecond"]);
    // The terminal gets no control character; --json gets the payload as it was.
    assert!(follower.wait_for("second").ends_with(":  [2Jsecond"));
    let event: serde_json::Value = serde_json::from_str(&json.wait_for("second")).unwrap();
    assert_eq!(event["event"], "message");
    assert_eq!(event["from"]["slot"], 0);
    assert_eq!(event["payload"], "\u{1b}[2Jsecond");
    // When sockvisor stops, the followers end, with status 0.
    fleet.signal(libc::SIGTERM);
    assert_eq!(fleet.wait(T).and_then(|s| s.code()), Some(0));
    assert!(follower.wait_exit().success());
}

/// HTTP request latencies, sorted.
struct Latencies(Vec<Duration>);

impl Latencies {
    fn worst(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    fn quantile(&self, q: f64) -> Duration {
        let i = ((self.0.len() as f64 * q) as usize).min(self.0.len().saturating_sub(1));
        self.0.get(i).copied().unwrap_or_default()
    }
}

impl std::fmt::Display for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        write!(
            f,
            "{} HTTP requests, latency p50 {:.1} ms, p99 {:.1} ms, worst {:.1} ms",
            self.0.len(),
            ms(self.quantile(0.5)),
            ms(self.quantile(0.99)),
            ms(self.worst())
        )
    }
}

/// HTTP latency through sockvisor (round-robin: sockvisor accepts and hands over every
/// connection, so a stalled loop shows) while `busy(requests so far)` is true.
fn measure_http(port: u16, mut busy: impl FnMut(u64) -> bool) -> Latencies {
    let mut all = Vec::new();
    while busy(all.len() as u64) {
        let t = Instant::now();
        let reply = http_get(port).expect("an HTTP request during the flood");
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        all.push(t.elapsed());
    }
    all.sort();
    Latencies(all)
}

/// A worker that never reads its messages: flooded by another worker's broadcasts, then by
/// the operator, it does not stall the loop (the fleet's HTTP latency stays low; the bound
/// is a generous safety bound, not a benchmark), and what it cannot take is counted.
#[test]
fn a_worker_that_never_reads_does_not_stall_the_loop() {
    const FLOOD: u64 = 100_000;
    const OPERATOR_FLOOD: usize = 2_000;
    let (fleet, _dir) = messenger_fleet(4, &[("MESSENGER_DEAF_SLOT", "3")]);
    let port = fleet.port("web");
    http_get(port).expect("serving");
    let deaf_pid = pids_by_slot(&fleet.status())[&3];
    // For comparison: the same measurement (with the same status polling) at rest.
    let idle = measure_http(port, |n| {
        if n % 20 == 0 {
            fleet.status();
        }
        n < 300
    });
    eprintln!("at rest: {idle}");

    // 1. Slot 0 broadcasts FLOOD messages as fast as it can; slot 3 never reads.
    let started = Instant::now();
    ctl_ok(
        &fleet,
        &["send", "--slot", "0", &format!("flood-broadcast {FLOOD}")],
    );
    let mut last = serde_json::Value::Null;
    let flooded = measure_http(port, |n| {
        if n % 20 != 0 {
            return true;
        }
        last = fleet.status();
        assert!(started.elapsed() < T, "the flood did not end: {last}");
        last["workers"][0]["messages"]["sent"].as_u64().unwrap() < FLOOD
    });
    let flood_time = started.elapsed();
    let deaf = &last["workers"][3]["messages"];
    let dropped = deaf["dropped"].as_u64().unwrap();
    eprintln!(
        "broadcast flood: {FLOOD} messages from slot 0 in {:.2}s; meanwhile {flooded}; the deaf worker took {} into its socket, {} queued, {} dropped",
        flood_time.as_secs_f64(),
        deaf["received"],
        deaf["queued"],
        dropped
    );
    assert!(
        flooded.worst() < Duration::from_secs(1),
        "an HTTP request waited {:?}",
        flooded.worst()
    );
    assert_eq!(deaf["queued"], 128, "its queue is full: {last}");
    assert!(dropped > 0, "{last}");
    let received = deaf["received"].as_u64().unwrap();
    // Whatever is not in its socket or its queue yet is counted, nothing vanishes (the
    // flood may still be in sockvisor's socket buffer from slot 0 when `sent` was read).
    assert!(received + 128 + dropped <= FLOOD, "{last}");

    // 2. The operator floods it too, pipelined on one control connection.
    let c = UnixStream::connect(&fleet.control).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let line = b"{\"cmd\":\"send\",\"slot\":3,\"payload\":\"from the operator\"}\n";
            for _ in 0..OPERATOR_FLOOD {
                c.write_all(line).unwrap();
            }
        })
    };
    let reader = std::thread::spawn(move || {
        let mut refused = 0;
        for line in BufReader::new(c).lines().take(OPERATOR_FLOOD) {
            let reply: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            if reply["ok"] == false {
                assert!(
                    reply["error"]
                        .as_str()
                        .unwrap()
                        .contains("queue of slot 3 is full"),
                    "{reply}"
                );
                refused += 1;
            }
        }
        refused
    });
    let flooded = measure_http(port, |_| !reader.is_finished());
    writer.join().unwrap();
    let refused = reader.join().unwrap();
    let s = fleet.status();
    eprintln!(
        "operator flood: {OPERATOR_FLOOD} sends to the deaf worker, {refused} refused (queue full); meanwhile {flooded}; dropped for it in all: {}",
        s["workers"][3]["messages"]["dropped"]
    );
    assert_eq!(refused, OPERATOR_FLOOD, "its queue was full all along");
    assert!(
        flooded.worst() < Duration::from_secs(1),
        "an HTTP request waited {:?}",
        flooded.worst()
    );
    assert!(
        s["workers"][3]["messages"]["dropped"].as_u64().unwrap() >= dropped + OPERATOR_FLOOD as u64
    );
    assert_eq!(
        s["workers"][3]["pid"], deaf_pid,
        "the deaf worker is not killed for it"
    );
    // Visible to humans too, and in the log.
    let table = ctl_ok(&fleet, &["status"]);
    assert!(table.contains("messages: "), "{table}");
    fleet.wait_log("does not read its messages: its queue is full", T);
}

/// Unmodified programs see no extra fd; with messages on, the socket is at the fd after
/// the listeners, announced by SOCKVISOR_MESSAGES_FD and not counted in LISTEN_FDS.
#[test]
fn the_message_socket_is_opt_in_and_outside_listen_fds() {
    for messages in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut args = vec![
            "--workers",
            "1",
            "--dispatch",
            "shared",
            "-l",
            "web=tcp://127.0.0.1:0",
        ];
        if messages {
            args.push("--messages");
        }
        let probe = probe_script();
        args.extend(["--", python(), probe.to_str().unwrap()]);
        let fleet = FleetBuilder::new(args).env("PROBE_DIR", dir.path()).start();
        let report = wait_probe_reports(dir.path(), 1, &fleet).remove(0);
        assert_eq!(report["listen_fds"], "1", "{report}");
        if messages {
            assert_eq!(
                report["open_fds"],
                serde_json::json!([0, 1, 2, 3, 4]),
                "{report}"
            );
            assert_eq!(report["env"]["SOCKVISOR_MESSAGES_FD"], "4", "{report}");
        } else {
            assert_eq!(
                report["open_fds"],
                serde_json::json!([0, 1, 2, 3]),
                "{report}"
            );
            assert!(
                report["env"].get("SOCKVISOR_MESSAGES_FD").is_none(),
                "{report}"
            );
            let out = fleet.ctl(&["send", "x"]);
            assert!(String::from_utf8_lossy(&out.stderr).contains("messages are off"));
            assert!(fleet.status().get("messages").is_none());
        }
    }
}

fn manifest_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// docs/messages.md's Python worker is examples/messages.py, and it works: it answers the
/// operator and relays what another worker broadcasts.
#[test]
fn the_python_example_of_the_docs() {
    let example = std::fs::read_to_string(manifest_path("examples/messages.py")).unwrap();
    let doc = std::fs::read_to_string(manifest_path("docs/messages.md")).unwrap();
    assert!(
        doc.contains(&example),
        "docs/messages.md does not contain examples/messages.py verbatim"
    );
    let script = manifest_path("examples/messages.py");
    let fleet = FleetBuilder::new([
        "--workers",
        "2",
        "--messages",
        "--dispatch",
        "shared",
        "-l",
        "web=tcp://127.0.0.1:0",
        "--",
        python(),
        script.to_str().unwrap(),
    ])
    .start();
    wait_ready(&fleet, 2);
    let follower = Follower::start(&fleet, false, 1);
    // A ping sent before the interpreter reads its socket just waits there.
    ctl_ok(&fleet, &["send", "ping"]);
    follower.wait_all(&["pong from slot 0", "pong from slot 1"]);
    ctl_ok(&fleet, &["send", "--slot", "0", "tell hello, workers"]);
    let line = follower.wait_for("heard");
    assert!(
        line.ends_with("slot 1 heard slot 0: hello, workers"),
        "{line}"
    );
}
