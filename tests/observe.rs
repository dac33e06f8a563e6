//! Issue 15: Prometheus metrics and health probes (`metrics_listen`, `sockvisor metrics`,
//! `status --check`, `drain_delay`), checked with real programs: promtool, a real
//! Prometheus server, hello workers, hostile clients.
//!
//! `cargo test --test observe`. promtool and prometheus come from Debian's `prometheus`
//! package (.ci/run installs it); without them those tests skip (fail with
//! SOCKVISOR_REQUIRE_ALL=1).

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The metrics listener's address, from sockvisor's `metrics listening on ADDR (` line.
fn metrics_addr(fleet: &Fleet) -> SocketAddr {
    fleet.wait_until("the metrics listener", SAFETY_TIMEOUT, || {
        fleet
            .log()
            .lines()
            .find_map(|l| l.split_once("metrics listening on ")?.1.split_once(' '))
            .map(|(a, _)| a.parse().unwrap())
    })
}

/// Wait until `pid` catches or blocks `sig` (/proc/PID/status `SigCgt`, `SigBlk`): a signal
/// sent earlier would take its default action.
fn wait_handles(fleet: &Fleet, pid: i32, sig: i32) {
    fleet.wait_until(
        &format!("pid {pid} handling signal {sig}"),
        SAFETY_TIMEOUT,
        || {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let mask = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                    .unwrap_or(0)
            };
            ((mask("SigCgt:") | mask("SigBlk:")) & (1 << (sig - 1)) != 0).then_some(())
        },
    );
}

/// One HTTP request: (status, body). `extra` headers end with CRLF each.
fn get(addr: SocketAddr, path: &str, extra: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

fn metrics(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics", "").unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series `line_start` (name and labels as exposed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `promtool check metrics` on `text`: its complaints, empty when it accepts it.
fn promtool(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        said.trim().to_string()
    } else {
        format!("exit {}: {said}", out.status)
    }
}

fn web_fleet(workers: usize, dispatch: &str, extra: &[&str]) -> Fleet {
    let mut args: Vec<String> = vec![
        "--metrics-listen".into(),
        "tcp://127.0.0.1:0".into(),
        "--dispatch".into(),
        dispatch.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(hello_args(workers));
    FleetBuilder::new(args).start()
}

fn wait_ready(fleet: &Fleet) {
    fleet.wait_log("fleet ready", SAFETY_TIMEOUT);
}

/// promtool accepts `/metrics` and `sockvisor metrics` of a running fleet; the fixed series
/// are there and move: accepted connections, restarts by reason (a SIGKILL from outside is
/// `signal`), dispatched per slot; OpenMetrics when asked for.
#[test]
fn metrics_pass_promtool_and_counters_move() {
    let have = have_program("promtool");
    let fleet = web_fleet(2, "round-robin", &[]);
    wait_ready(&fleet);
    let addr = metrics_addr(&fleet);
    let web = fleet.port("web");
    let before = metrics(addr);
    let accepted = "sockvisor_connections_accepted_total{listener=\"web\"}";
    assert_eq!(value(&before, accepted), Some(0.0), "{before}");
    for _ in 0..10 {
        assert!(http_get(web).unwrap().contains("hello from worker"));
    }
    let after = metrics(addr);
    assert_eq!(value(&after, accepted), Some(10.0), "{after}");
    let dispatched: f64 = (0..2)
        .map(|s| {
            value(
                &after,
                &format!("sockvisor_worker_connections_dispatched_total{{slot=\"{s}\"}}"),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(dispatched, 10.0);

    // A worker killed from outside: restarts_total{slot, reason="signal"} moves.
    let status = fleet.status();
    let victim = &status["workers"][1];
    let (slot, pid) = (
        victim["slot"].as_u64().unwrap(),
        victim["pid"].as_i64().unwrap(),
    );
    // SAFETY: kill(2) on a worker of our fleet.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let series = format!("sockvisor_worker_restarts_total{{slot=\"{slot}\",reason=\"signal\"}}");
    fleet.wait_until("the restart counted", SAFETY_TIMEOUT, || {
        (value(&metrics(addr), &series) == Some(1.0)).then_some(())
    });
    let status = fleet.wait_ready_count("the slot refilled", 2);
    let row = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"].as_u64() == Some(slot))
        .unwrap();
    assert_eq!(row["last_exit"], "signal (killed by SIGKILL)", "{status}");
    // Dispatched per slot survives the worker: the gone worker's connections still count.
    let text = metrics(addr);
    let total: f64 = (0..2)
        .map(|s| {
            value(
                &text,
                &format!("sockvisor_worker_connections_dispatched_total{{slot=\"{s}\"}}"),
            )
            .unwrap()
        })
        .sum();
    assert_eq!(total, 10.0, "{text}");

    // The control socket's copy is the same exposition.
    let out = fleet.ctl(&["metrics"]);
    assert!(out.status.success(), "{out:?}");
    let via_control = String::from_utf8(out.stdout).unwrap();
    assert!(
        via_control.contains(&format!("{series} 1")),
        "{via_control}"
    );
    // OpenMetrics on request.
    let (code, om) = get(
        addr,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE sockvisor_connections_accepted counter"));

    if !require(
        have,
        "promtool (Debian package prometheus) is not installed",
    ) {
        return;
    }
    for (what, t) in [("/metrics", &text), ("sockvisor metrics", &via_control)] {
        let complaints = promtool(t);
        assert!(
            complaints.is_empty(),
            "promtool on {what}: {complaints}\n{t}"
        );
    }
    // Every series docs/metrics.md lists is exposed, and every exposed one is listed.
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/metrics.md")).unwrap();
    for name in text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        assert!(
            doc.contains(&format!("`{name}`")),
            "docs/metrics.md lacks `{name}`"
        );
    }
}

/// Under reuseport (sockvisor does not accept), `connections_accepted_total` is what the
/// group's eBPF program steered: it moves with the connections too.
#[test]
fn reuseport_counts_steered_connections() {
    let fleet = web_fleet(2, "auto", &[]);
    wait_ready(&fleet);
    let status = fleet.status();
    if status["listeners"][0]["policy"] != "reuseport" {
        // auto fell back to shared (no CAP_BPF): nothing counts, and no series says 0.
        let text = metrics(metrics_addr(&fleet));
        assert!(
            !text.contains("sockvisor_connections_accepted_total"),
            "{text}"
        );
        require(false, "reuseport cannot run here (needs root or CAP_BPF)");
        return;
    }
    let addr = metrics_addr(&fleet);
    let web = fleet.port("web");
    for _ in 0..6 {
        assert!(http_get(web).unwrap().contains("hello from worker"));
    }
    let text = metrics(addr);
    assert_eq!(
        value(
            &text,
            "sockvisor_connections_accepted_total{listener=\"web\"}"
        ),
        Some(6.0),
        "{text}"
    );
}

/// A Prometheus listening on a port of its own: (child, port).
struct Prometheus {
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus server scrapes the fleet's `/metrics`: its `/api/v1/targets` shows the
/// target up (bounded: the safety timeout).
#[test]
fn a_prometheus_server_scrapes_the_fleet() {
    if !require(
        have_file("/usr/bin/prometheus"),
        "prometheus (Debian package prometheus) is not installed",
    ) {
        return;
    }
    let fleet = web_fleet(1, "round-robin", &[]);
    wait_ready(&fleet);
    let target = metrics_addr(&fleet);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: sockvisor\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let child = Command::new("/usr/bin/prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg("--web.listen-address=127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let prom = Prometheus { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    let plog =
        || std::fs::read_to_string(prom._dir.path().join("prometheus.log")).unwrap_or_default();
    let mut last = String::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "prometheus never showed the target up; last answer: {last}\nits log:\n{}",
            log_tail(&plog(), 30)
        );
        std::thread::sleep(Duration::from_millis(200));
        // It binds port 0 and logs the port it got.
        let log = plog();
        let Some(api) = log
            .lines()
            .filter(|l| l.contains("msg=\"Listening on\""))
            .find_map(|l| l.split_once("address=")?.1.split_whitespace().next())
            .and_then(|a| a.parse::<SocketAddr>().ok())
        else {
            continue;
        };
        let Ok((200, body)) = get(api, "/api/v1/targets", "") else {
            continue;
        };
        last = body.clone();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let up = v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["health"] == "up" && t["scrapeUrl"] == format!("http://{target}/metrics"));
        if up {
            break;
        }
    }
    // It scraped through the metrics listener.
    let text = metrics(target);
    // (this scrape is counted once answered: the ones before it are the server's)
    assert!(
        value(&text, "sockvisor_http_requests_total").unwrap() >= 1.0,
        "{text}"
    );
}

/// `/readyz`: 503 before the fleet is ready, 200 once it is, 503 during `drain_delay`, while
/// the fleet goes on answering requests; `/livez` 200 throughout; `status --check` exits 1,
/// 0, 1, then 2 once it is gone; the SIGTERM stop exits 0.
#[test]
fn readiness_through_start_and_drain() {
    // probe.py workers that say READY=1 only when told (SIGUSR1): no race with a clock.
    let probe_dir = tempfile::tempdir().unwrap();
    let mut fleet = FleetBuilder::new([
        "--metrics-listen",
        "tcp://127.0.0.1:0",
        "--drain-delay",
        "3s",
        "--ready",
        "notify",
        "--workers",
        "2",
        "--listen",
        "web=tcp://127.0.0.1:0",
        "--",
        python(),
        probe_script().to_str().unwrap(),
    ])
    .env("PROBE_DIR", probe_dir.path())
    .env("PROBE_NO_READY", "1")
    .env("PROBE_ON_USR1", "READY=1")
    .start();
    let addr = metrics_addr(&fleet);
    let check = |fleet: &Fleet| {
        let out = fleet.ctl(&["status", "--check"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )
    };
    // Before READY=1 from the workers (they wait 1.5 s).
    let (code, body) = get(addr, "/readyz", "").unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.starts_with("not ready: starting: 0 workers ready, 2 needed"),
        "{body}"
    );
    assert_eq!(get(addr, "/livez", "").unwrap(), (200, "ok\n".to_string()));
    let (c, said) = check(&fleet);
    assert_eq!(c, Some(1), "{said}");
    assert!(said.starts_with("not ready: starting"), "{said}");
    let workers = fleet.wait_status("two workers started", |s| {
        s["workers"].as_array().unwrap().len() == 2
    });
    for w in workers["workers"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap() as i32;
        // Once its SIGUSR1 handler is in place, else the signal would kill it.
        wait_handles(&fleet, pid, libc::SIGUSR1);
        // SAFETY: kill(2) on a worker of our fleet.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
    }
    fleet.wait_until("/readyz 200", SAFETY_TIMEOUT, || {
        (get(addr, "/readyz", "").unwrap().0 == 200).then_some(())
    });
    assert_eq!(check(&fleet), (Some(0), "ready".to_string()));
    let web = fleet.port("web");
    let ask = || tcp_request(web, b"GET / HTTP/1.0\r\n\r\n");
    assert!(ask().unwrap().starts_with("probe "));

    fleet.signal(libc::SIGTERM);
    let (code, body) = fleet.wait_until("/readyz 503 after SIGTERM", SAFETY_TIMEOUT, || {
        let r = get(addr, "/readyz", "").unwrap();
        (r.0 == 503).then_some(r)
    });
    assert!(
        body.contains("draining before stop (drain_delay)"),
        "{code} {body}"
    );
    let (c, said) = check(&fleet);
    assert_eq!(c, Some(1), "{said}");
    let text = metrics(addr);
    assert_eq!(
        value(&text, "sockvisor_state{state=\"draining\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value(&text, "sockvisor_ready"), Some(0.0), "{text}");
    let out = fleet.ctl(&["scale", "3"]);
    assert!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("draining before it stops"),
        "{out:?}"
    );
    // During the drain: requests are served, /livez answers, until the stop begins.
    let mut served = 0;
    while !fleet
        .log()
        .contains("stopping: received SIGTERM (drain_delay over)")
    {
        let answer = ask();
        if fleet.log().contains("stopping: received SIGTERM") {
            break; // the stop began meanwhile: this one may meet a closed listener
        }
        assert!(answer.unwrap().starts_with("probe "));
        assert_eq!(get(addr, "/livez", "").unwrap().0, 200);
        served += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(served > 0, "no request answered during drain_delay");
    let status = fleet.wait(SAFETY_TIMEOUT).expect("sockvisor stops");
    assert_eq!(status.code(), Some(0), "{}", fleet.log());
    let (c, _) = check(&fleet);
    assert_eq!(c, Some(2));
    eprintln!("requests answered during drain_delay: {served}");
}

/// A second SIGTERM, SIGINT or SIGQUIT during `drain_delay` stops at once; SIGQUIT alone
/// stops without the delay. Both exit 0.
#[test]
fn fast_stops_skip_the_drain() {
    for (first, second) in [(libc::SIGTERM, Some(libc::SIGQUIT)), (libc::SIGQUIT, None)] {
        let mut fleet = web_fleet(1, "round-robin", &["--drain-delay", "300s"]);
        wait_ready(&fleet);
        fleet.signal(first);
        if let Some(s) = second {
            fleet.wait_log("draining for 300.0s", SAFETY_TIMEOUT);
            fleet.signal(s);
        }
        let status = fleet
            .wait(SAFETY_TIMEOUT)
            .expect("stopped well before drain_delay");
        assert_eq!(status.code(), Some(0), "{}", fleet.log());
        let want = if second.is_some() {
            "stopping: received SIGQUIT while draining"
        } else {
            "stopping: received SIGQUIT"
        };
        assert!(fleet.log().contains(want), "{}", fleet.log());
    }
}

/// Latencies of `n` sequential requests to the web port, sorted.
fn latencies(port: u16, n: usize) -> Vec<Duration> {
    let mut v: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            let answer = http_get(port).expect("request");
            assert!(answer.contains("hello from worker"), "{answer}");
            t.elapsed()
        })
        .collect();
    v.sort();
    v
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Raise this process's soft fd limit to its hard one (1,000 idle connections).
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid struct we own.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// 1,000 connections to the metrics listener that never send, and one that sends a 10 MiB
/// request line, while requests go to the fleet (sockvisor accepts and hands them over,
/// round-robin): dispatch goes on (each request within the safety timeout; latencies
/// printed), a scrape still gets through, and the limits show in the metrics.
#[test]
fn hostile_scrapers_do_not_stall_dispatch() {
    raise_fd_limit();
    let fleet = web_fleet(2, "round-robin", &[]);
    wait_ready(&fleet);
    let addr = metrics_addr(&fleet);
    let web = fleet.port("web");
    let quiet = latencies(web, 300);

    // The flood opens its connections while the requests are measured, and keeps them.
    let flood = std::thread::spawn(move || {
        let mut idle = Vec::new();
        for _ in 0..1000 {
            if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                idle.push(s);
            }
        }
        idle
    });
    let huge = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut line = b"GET /".to_vec();
        line.resize(10 << 20, b'a');
        let started = Instant::now();
        // sockvisor answers 431 after 8 KiB and closes: the write fails early.
        let written = s.write_all(&line);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        (written.is_err(), started.elapsed(), answer)
    });
    let mut loaded = latencies(web, 300);
    let idle = flood.join().unwrap();
    // And with all of them open.
    loaded.extend(latencies(web, 300));
    loaded.sort();
    let (write_failed, huge_took, answer) = huge.join().unwrap();
    // A scrape gets through the flood (the oldest idle connection makes room).
    let text = metrics(addr);
    drop(idle);
    let over = |t: &str, reason: &str| {
        value(
            t,
            &format!("sockvisor_http_connections_dropped_total{{reason=\"{reason}\"}}"),
        )
        .unwrap()
    };
    let dropped = over(&text, "over_limit") + over(&text, "timeout");
    // The long line again, alone (in the flood it may have been closed to make room before
    // it was read): answered 431 after MAX_HEAD bytes.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut line = b"GET /".to_vec();
    line.resize(10 << 20, b'a');
    let _ = s.write_all(&line);
    drop(s);
    let bad = fleet.wait_until("the long request line refused", SAFETY_TIMEOUT, || {
        let b = over(&metrics(addr), "bad_request");
        (b >= 1.0).then_some(b)
    });
    eprintln!(
        "dispatch latency: 300 requests alone: p50 {:?} p99 {:?} max {:?}; 600 requests while 1000 connections to the metrics listener were opened (and kept, idle) and a 10 MiB request line was sent: p50 {:?} p99 {:?} max {:?}; the 10 MiB writer was cut off after {:?} (write failed: {write_failed}, answer: {:?}); metrics connections dropped over the limit: {dropped}",
        pct(&quiet, 0.5),
        pct(&quiet, 0.99),
        quiet[quiet.len() - 1],
        pct(&loaded, 0.5),
        pct(&loaded, 0.99),
        loaded[loaded.len() - 1],
        huge_took,
        answer.lines().next().unwrap_or("")
    );
    assert!(dropped >= 900.0, "{text}");
    assert!(bad >= 1.0, "{text}");
    // Generous: a stalled loop would take seconds per request, not milliseconds.
    assert!(loaded[loaded.len() - 1] < Duration::from_secs(5));
    assert!(
        warnings_and_errors(&fleet.log()).is_empty(),
        "{}",
        fleet.log()
    );
}

/// Why a worker ended, told apart: a missed watchdog is `watchdog`, a worker never ready is
/// `ready_timeout`, failed active health checks `health_check`, a worker that exits on its own (SIGTERM from someone else: hello exits
/// 0) is `exit`.
#[test]
fn restart_reasons_are_told_apart() {
    let reason = |text: &str, r: &str| {
        value(
            text,
            &format!("sockvisor_worker_restarts_total{{slot=\"0\",reason=\"{r}\"}}"),
        )
        .unwrap_or(0.0)
    };
    // hello never pings: the 300 ms worker watchdog fires.
    let fleet = web_fleet(1, "round-robin", &["--worker-watchdog", "300ms"]);
    let addr = metrics_addr(&fleet);
    fleet.wait_until("a watchdog restart", SAFETY_TIMEOUT, || {
        (reason(&metrics(addr), "watchdog") >= 1.0).then_some(())
    });
    drop(fleet);
    // hello never says READY=1.
    let fleet = web_fleet(
        1,
        "round-robin",
        &["--ready", "notify", "--ready-timeout", "300ms"],
    );
    let addr = metrics_addr(&fleet);
    fleet.wait_until("a ready_timeout restart", SAFETY_TIMEOUT, || {
        (reason(&metrics(addr), "ready_timeout") >= 1.0).then_some(())
    });
    drop(fleet);
    // hello answers 500: the active health check fails and replaces it.
    let mut args: Vec<String> = [
        "--metrics-listen",
        "tcp://127.0.0.1:0",
        "--dispatch",
        "round-robin",
        "--health-check",
        "http",
        "--health-check-interval",
        "100ms",
        "--health-check-fails",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(hello_args(1));
    let fleet = FleetBuilder::new(args).env("HELLO_STATUS", "500").start();
    let addr = metrics_addr(&fleet);
    // Never in the rotation: never ready for a balancer either.
    let (code, body) = get(addr, "/readyz", "").unwrap();
    assert_eq!(code, 503, "{body}");
    fleet.wait_until("a health_check restart", SAFETY_TIMEOUT, || {
        (reason(&metrics(addr), "health_check") >= 1.0).then_some(())
    });
    drop(fleet);
    let fleet = web_fleet(1, "round-robin", &[]);
    wait_ready(&fleet);
    let addr = metrics_addr(&fleet);
    let pid = fleet.status()["workers"][0]["pid"].as_i64().unwrap() as i32;
    wait_handles(&fleet, pid, libc::SIGTERM);
    // SAFETY: kill(2) on a worker of our fleet.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    fleet.wait_until("an exit restart", SAFETY_TIMEOUT, || {
        let t = metrics(addr);
        (reason(&t, "exit") == 1.0 && reason(&t, "signal") == 0.0).then_some(())
    });
}
