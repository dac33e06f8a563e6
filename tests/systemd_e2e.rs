//! End-to-end tests under a real systemd: the .deb is installed into a systemd-nspawn
//! container (tests/systemd/sandbox.sh) that shares the host's network namespace, and the
//! example unit pair from units/ runs the `hello` example behind sockvisor.
//!
//! Prerequisites: root, systemd-nspawn (systemd-container), mmdebstrap, nsenter, dpkg-deb and
//! the packaging tools of packaging/build.sh. Without them the tests print `SKIP: ...` and
//! pass, unless `SOCKVISOR_SYSTEMD_TESTS=1` (CI), where a missing prerequisite fails.
//!
//! Environment:
//!   SOCKVISOR_SYSTEMD_TESTS=1   prerequisites are mandatory
//!   SOCKVISOR_DEB=PATH          install this .deb instead of running packaging/build.sh
//!   SOCKVISOR_HELLO=PATH        use this hello binary instead of building the example
//!
//! One container per test (about 1 s to boot from the cached base rootfs), torn down by a
//! drop guard even when the test panics; the tests take a global lock so that they run one at
//! a time (2-core machines; timing-sensitive client loops). Every wait has a timeout, every
//! port is picked free at run time on 127.0.0.1, processes are signalled by pid.
//!
//! `harness_self_test` works without a functional sockvisor: it runs the unit pair with
//! tests/systemd/fake-sockvisor.py (forks workers that drop to nobody) and installs/purges the
//! package. The `scenario_*` tests need the real binary and the `hello` example.

use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

// ------------------------------------------------------------------ gating

/// The global lock: tests run one at a time. Poisoning (a failed test) does not stop the rest.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn mandatory() -> bool {
    std::env::var("SOCKVISOR_SYSTEMD_TESTS").as_deref() == Ok("1")
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn missing_prerequisites(extra: &[&str]) -> Vec<String> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (the sandbox mounts, writes cgroups and uses nsenter)".to_string());
    }
    for tool in ["systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-deb"]
        .iter()
        .chain(extra)
    {
        if !have(tool) {
            missing.push(format!("{tool} (not on PATH)"));
        }
    }
    missing
}

/// `true`: run the test. `false`: skip it (after saying so). Panics when the prerequisites
/// are missing and SOCKVISOR_SYSTEMD_TESTS=1.
fn gate(test: &str, extra: &[&str]) -> bool {
    let missing = missing_prerequisites(extra);
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "{test}: missing prerequisites: {} (apt-get install -y systemd-container mmdebstrap \
         dpkg-dev help2man rpm lintian rpmlint; run as root)",
        missing.join(", ")
    );
    if mandatory() {
        panic!("SOCKVISOR_SYSTEMD_TESTS=1 but {msg}");
    }
    eprintln!("SKIP: {msg}; set SOCKVISOR_SYSTEMD_TESTS=1 to make this a failure");
    false
}

// ------------------------------------------------------------------ commands with timeouts

/// Runs `cmd` with piped output; kills it (by pid, via Child::kill) after `timeout`.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?}: {desc}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

// ------------------------------------------------------------------ build artefacts (once)

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(MANIFEST).join("target"))
}

/// The .deb: $SOCKVISOR_DEB, or the one packaging/build.sh produces (built once per process).
fn deb() -> PathBuf {
    static DEB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DEB.get_or_init(|| {
        if let Some(p) = std::env::var_os("SOCKVISOR_DEB") {
            let p = PathBuf::from(p);
            return if p.is_file() {
                Ok(p)
            } else {
                Err(format!("SOCKVISOR_DEB={} is not a file", p.display()))
            };
        }
        let t = Instant::now();
        let out = run(
            Command::new("bash")
                .arg(Path::new(MANIFEST).join("packaging/build.sh"))
                .arg("--no-check"),
            Duration::from_secs(900),
        );
        if !out.status.success() {
            return Err(format!("packaging/build.sh failed:\n{}", text(&out.stderr)));
        }
        eprintln!(
            "[e2e] packaging/build.sh --no-check: {:.1} s",
            t.elapsed().as_secs_f64()
        );
        let dist = Path::new(MANIFEST).join("dist");
        std::fs::read_dir(&dist)
            .map_err(|e| format!("{}: {e}", dist.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                n.starts_with("sockvisor_") && n.ends_with(".deb")
            })
            .ok_or_else(|| "no dist/sockvisor_*.deb after packaging/build.sh".to_string())
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The demo worker: $SOCKVISOR_HELLO, or `cargo build --release --example hello`.
fn hello() -> PathBuf {
    static HELLO: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    HELLO
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("SOCKVISOR_HELLO") {
                return Ok(PathBuf::from(p));
            }
            let out = run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .current_dir(MANIFEST)
                    .args(["build", "--release", "--example", "hello"]),
                Duration::from_secs(900),
            );
            if !out.status.success() {
                return Err(format!(
                    "cargo build --example hello:\n{}",
                    text(&out.stderr)
                ));
            }
            Ok(target_dir().join("release/examples/hello"))
        })
        .clone()
        .unwrap_or_else(|e| panic!("{e}"))
}

// ------------------------------------------------------------------ the sandbox

/// One booted container; `Drop` always runs `sandbox.sh down`.
struct Sandbox {
    name: String,
    root: PathBuf,
}

impl Sandbox {
    fn script() -> PathBuf {
        Path::new(MANIFEST).join("tests/systemd/sandbox.sh")
    }

    fn cmd(name: &str) -> Command {
        let mut c = Command::new("bash");
        c.arg(Self::script())
            .env("SB_NAME", name)
            .env("SB_NO_APT", "1");
        c
    }

    fn up(test: &str) -> Sandbox {
        let name = format!("sv-{}-{}", test, std::process::id() % 100_000);
        let name: String = name.chars().take(31).collect();
        let t = Instant::now();
        // the guard exists before `up` so that a failed or timed-out boot is torn down too
        let mut sb = Sandbox {
            name: name.clone(),
            root: PathBuf::new(),
        };
        let out = run(Self::cmd(&name).arg("up"), Duration::from_secs(600));
        assert!(
            out.status.success(),
            "sandbox up failed:\n{}",
            text(&out.stderr)
        );
        eprintln!("[e2e] {name}: up in {:.1} s", t.elapsed().as_secs_f64());
        let out = run(Self::cmd(&name).arg("root"), Duration::from_secs(10));
        sb.root = PathBuf::from(text(&out.stdout).trim());
        assert!(sb.root.is_dir(), "no container root");
        sb
    }

    /// Runs a command inside the container (all its namespaces); returns the output.
    fn exec_out(&self, args: &[&str], timeout: Duration) -> Output {
        run(Self::cmd(&self.name).arg("exec").args(args), timeout)
    }

    /// Runs a command inside; panics unless it succeeds; returns stdout.
    fn exec(&self, args: &[&str]) -> String {
        let out = self.exec_out(args, Duration::from_secs(60));
        assert!(
            out.status.success(),
            "in container: {args:?} failed ({}):\n{}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    fn sh(&self, script: &str) -> String {
        self.exec(&["/bin/sh", "-c", script])
    }

    /// Writes a file into the container's root from the host.
    fn write(&self, path: &str, content: &str) {
        let p = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    fn push(&self, src: &Path, dst: &str) {
        let out = run(
            Self::cmd(&self.name).arg("push").arg(src).arg(dst),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "push failed: {}", text(&out.stderr));
    }

    fn install_deb(&self, deb: &Path) {
        let out = run(
            Self::cmd(&self.name).arg("install-deb").arg(deb),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "dpkg -i failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    /// `systemctl show -p A,B UNIT` as a map.
    fn show(&self, unit: &str, props: &str) -> HashMap<String, String> {
        self.exec(&["systemctl", "show", "-p", props, unit])
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn prop(&self, unit: &str, prop: &str) -> String {
        self.show(unit, prop).remove(prop).unwrap_or_default()
    }

    fn main_pid(&self) -> u32 {
        self.prop("myapp.service", "MainPID").parse().unwrap_or(0)
    }

    /// Direct children of `pid` (container pid namespace).
    fn children(&self, pid: u32) -> BTreeSet<u32> {
        let out = self.exec_out(&["pgrep", "-P", &pid.to_string()], Duration::from_secs(30));
        text(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    fn alive(&self, pid: u32) -> bool {
        // a zombie does not count: state field of /proc/PID/stat
        let out = self.exec_out(
            &[
                "/bin/sh",
                "-c",
                &format!("awk '{{print $3}}' /proc/{pid}/stat"),
            ],
            Duration::from_secs(30),
        );
        let state = text(&out.stdout);
        out.status.success() && !state.trim().is_empty() && state.trim() != "Z"
    }

    fn journal(&self, unit: &str) -> String {
        text(
            &self
                .exec_out(
                    &[
                        "journalctl",
                        "--no-pager",
                        "-o",
                        "short-monotonic",
                        "-u",
                        unit,
                    ],
                    Duration::from_secs(30),
                )
                .stdout,
        )
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let t = Instant::now();
        let ok = Self::cmd(&self.name)
            .arg("down")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        eprintln!(
            "[e2e] {}: down in {:.1} s{}",
            self.name,
            t.elapsed().as_secs_f64(),
            if ok { "" } else { " (FAILED)" }
        );
    }
}

// ------------------------------------------------------------------ host-side clients

/// A port free for both TCP and UDP on 127.0.0.1 right now (then released).
fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().expect("addr").port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both TCP and UDP");
}

/// One HTTP/1.0 GET; returns the body.
fn http_get(port: u16) -> std::io::Result<String> {
    let addr = ("127.0.0.1", port);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&addr)?
        .next()
        .expect("addr");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let _ = s.shutdown(Shutdown::Write);
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let resp = text(&buf);
    match resp.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200") => {
            Ok(body.to_string())
        }
        _ => Err(std::io::Error::other(format!("bad response {resp:?}"))),
    }
}

/// The worker pid in `hello from worker <id> (pid <pid>)`.
fn body_pid(body: &str) -> Option<u32> {
    let rest = body.split("(pid ").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn udp_echo(port: u16, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut last = None;
    for _ in 0..3 {
        s.send_to(payload, ("127.0.0.1", port))?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("error"))
}

/// hello echoes a datagram as `worker <id> (pid <pid>): <payload>`.
fn assert_udp_echo(port: u16, payload: &[u8]) {
    let reply = udp_echo(port, payload).expect("udp echo");
    let (head, echoed) = reply.split_at(reply.len().saturating_sub(payload.len()));
    assert!(
        echoed == payload && text(head).starts_with("worker "),
        "bad UDP echo: {:?}",
        text(&reply)
    );
}

#[derive(Debug, Default, Clone)]
struct LoopStats {
    ok: u64,
    refused: u64,
    other_errors: u64,
    first_errors: Vec<String>,
    pids: BTreeSet<u32>,
}

/// A client hammering the service from the host until stopped.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoopStats>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(port: u16) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let (st, sa) = (stop.clone(), stats.clone());
        let handle = thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let r = http_get(port);
                let mut s = sa.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(body) => {
                        s.ok += 1;
                        if let Some(p) = body_pid(&body) {
                            s.pids.insert(p);
                        }
                    }
                    Err(e) => {
                        if e.kind() == ErrorKind::ConnectionRefused {
                            s.refused += 1;
                        } else {
                            s.other_errors += 1;
                        }
                        if s.first_errors.len() < 5 {
                            s.first_errors.push(e.to_string());
                        }
                    }
                }
                drop(s);
                thread::sleep(Duration::from_millis(5));
            }
        });
        ClientLoop {
            stop,
            stats,
            handle: Some(handle),
        }
    }

    fn snapshot(&self) -> LoopStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn finish(mut self) -> LoopStats {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.snapshot()
    }
}

impl Drop for ClientLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ------------------------------------------------------------------ the fleet under test

fn unit_file(name: &str) -> String {
    let p = Path::new(MANIFEST).join("units").join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The example socket units with their port replaced by 127.0.0.1:`port`.
fn socket_units(port: u16) -> (String, String) {
    let web = unit_file("myapp.socket").replace(
        "\nListenStream=8000\n",
        &format!("\nListenStream=127.0.0.1:{port}\n"),
    );
    let dns = unit_file("myapp-dns.socket").replace(
        "\nListenDatagram=8000\n",
        &format!("\nListenDatagram=127.0.0.1:{port}\n"),
    );
    assert!(web.contains(&format!("ListenStream=127.0.0.1:{port}")));
    assert!(dns.contains(&format!("ListenDatagram=127.0.0.1:{port}")));
    (web, dns)
}

/// The fleet's config: `extra` lines go before the listeners (and may set `stop_timeout`).
fn sockvisor_config(port: u16, workers: usize, extra: &str) -> String {
    let stop = if extra.contains("stop_timeout") {
        ""
    } else {
        "stop_timeout = \"5s\"\n"
    };
    format!(
        "command = [\"/usr/local/bin/hello\"]\n\
         workers = {workers}\n\
         {stop}\
         {extra}\n\
         [[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:{port}\"\n\n\
         [[listen]]\nname = \"dns\"\nurl = \"udp://127.0.0.1:{port}\"\n"
    )
}

struct Fleet {
    sb: Sandbox,
    port: u16,
    t0: Instant,
}

impl Fleet {
    /// Boots a container, installs the .deb and the hello worker, writes the unit pair and
    /// the config, starts myapp.socket. The service itself is not started.
    fn new(test: &str) -> Fleet {
        let t0 = Instant::now();
        let (deb, hello) = (deb(), hello());
        let sb = Sandbox::up(test);
        sb.install_deb(&deb);
        sb.push(&hello, "/usr/local/bin/hello");
        let port = free_port();
        let (web, dns) = socket_units(port);
        sb.write("/etc/systemd/system/myapp.socket", &web);
        sb.write("/etc/systemd/system/myapp-dns.socket", &dns);
        sb.write(
            "/etc/systemd/system/myapp.service",
            &unit_file("myapp.service"),
        );
        sb.write("/etc/myapp/sockvisor.toml", &sockvisor_config(port, 2, ""));
        sb.exec(&["systemctl", "daemon-reload"]);
        sb.exec(&["systemctl", "start", "myapp.socket"]);
        eprintln!(
            "[e2e] {test}: fleet set up in {:.1} s (port {port})",
            t0.elapsed().as_secs_f64()
        );
        Fleet { sb, port, t0 }
    }

    /// Activates the service with a first request; waits until it is active with workers.
    fn activate(&self) -> u32 {
        let body = retry_get(self.port, Duration::from_secs(20));
        assert!(
            body.contains("hello from worker"),
            "unexpected body {body:?}"
        );
        self.wait_active_workers(2)
    }

    /// Waits for ActiveState=active and `n` children of MainPID; returns MainPID.
    fn wait_active_workers(&self, n: usize) -> u32 {
        let mut pid = 0;
        wait_until(
            &format!("myapp.service active with {n} workers"),
            Duration::from_secs(20),
            || {
                pid = self.sb.main_pid();
                pid != 0
                    && self.sb.prop("myapp.service", "ActiveState") == "active"
                    && self.sb.children(pid).len() == n
            },
        );
        pid
    }

    fn workers(&self) -> BTreeSet<u32> {
        self.sb.children(self.sb.main_pid())
    }

    fn done(&self, test: &str) {
        eprintln!(
            "[e2e] {test}: passed in {:.1} s",
            self.t0.elapsed().as_secs_f64()
        );
    }
}

fn retry_get(port: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        match http_get(port) {
            Ok(b) => return b,
            Err(e) if Instant::now() > deadline => panic!("GET :{port} kept failing: {e}"),
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ------------------------------------------------------------------ the harness itself

/// Boot, write units, push, exec, install and purge the package, down: everything the
/// scenarios rely on, with a Python stand-in for sockvisor. Also checks the unit pair's
/// design (two socket units -> LISTEN_FDNAMES=web:dns) and that the hardening of
/// units/myapp.service lets a supervisor fork workers that drop to another user.
#[test]
fn harness_self_test() {
    let _lock = serial();
    if !gate("harness_self_test", &[]) {
        return;
    }
    let t0 = Instant::now();
    let deb = deb();
    let sb = Sandbox::up("harness");
    assert_eq!(
        sb.exec(&["systemctl", "is-system-running"]).trim(),
        "running"
    );

    // the fake supervisor behind the real unit pair, hardening included
    sb.push(
        &Path::new(MANIFEST).join("tests/systemd/fake-sockvisor.py"),
        "/usr/local/bin/fake-sockvisor",
    );
    let port = free_port();
    let (web, dns) = socket_units(port);
    sb.write("/etc/systemd/system/myapp.socket", &web);
    sb.write("/etc/systemd/system/myapp-dns.socket", &dns);
    sb.write(
        "/etc/systemd/system/myapp.service",
        &unit_file("myapp.service"),
    );
    sb.write(
        "/etc/systemd/system/myapp.service.d/fake.conf",
        "[Service]\nExecStart=\nExecStart=/usr/local/bin/fake-sockvisor\n",
    );
    sb.exec(&["systemctl", "daemon-reload"]);
    sb.exec(&["systemctl", "start", "myapp.socket"]);
    assert_eq!(sb.prop("myapp-dns.socket", "ActiveState"), "active");
    assert_eq!(sb.prop("myapp.service", "ActiveState"), "inactive");

    let body = retry_get(port, Duration::from_secs(20));
    // both names, in either order: systemd does not promise an order across socket units
    let names: BTreeSet<&str> = body
        .split("fdnames ")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .split(':')
        .collect();
    assert_eq!(
        names,
        BTreeSet::from(["dns", "web"]),
        "LISTEN_FDNAMES: {body:?}"
    );
    assert!(
        body.contains("uid 65534"),
        "worker did not drop privileges: {body:?}"
    );
    assert_eq!(udp_echo(port, b"ping").expect("udp echo"), b"ping");
    let show = sb.show("myapp.service", "StatusText,MainPID,ActiveState");
    assert_eq!(show["ActiveState"], "active");
    assert!(show["StatusText"].contains("rundir /run/myapp"), "{show:?}");
    let main: u32 = show["MainPID"].parse().expect("MainPID");
    assert_eq!(sb.children(main).len(), 2, "two forked workers");
    sb.exec(&["test", "-S", "/run/myapp/control.sock"]);

    // the package: installed files, the template visible to systemd, nothing enabled
    sb.install_deb(&deb);
    let files = sb.exec(&["dpkg", "-L", "sockvisor"]);
    for f in [
        "/usr/bin/sockvisor",
        "/usr/lib/systemd/system/sockvisor@.service",
        "/etc/sockvisor/example.toml",
        "/usr/share/man/man8/sockvisor.8.gz",
    ] {
        assert!(files.lines().any(|l| l == f), "{f} not in dpkg -L");
    }
    let tmpl = sb.show(
        "sockvisor@demo.service",
        "LoadState,UnitFileState,ActiveState",
    );
    assert_eq!(tmpl["LoadState"], "loaded", "{tmpl:?}");
    assert_eq!(tmpl["ActiveState"], "inactive", "{tmpl:?}");
    let enabled = sb.sh("ls /etc/systemd/system/*.wants/ 2>/dev/null || true");
    assert!(
        !enabled.contains("sockvisor"),
        "package enabled something: {enabled}"
    );

    // purge: nothing left, the user's sockets and service untouched
    sb.exec(&["dpkg", "--purge", "sockvisor"]);
    assert!(!sb
        .exec_out(&["dpkg", "-L", "sockvisor"], Duration::from_secs(30))
        .status
        .success());
    sb.exec(&["test", "!", "-e", "/etc/sockvisor"]);
    sb.exec(&[
        "test",
        "!",
        "-e",
        "/usr/lib/systemd/system/sockvisor@.service",
    ]);
    assert_eq!(sb.prop("sockvisor@demo.service", "LoadState"), "not-found");
    let sock = sb.show("myapp.socket", "ActiveState,SubState");
    assert_eq!(
        (sock["ActiveState"].as_str(), sock["SubState"].as_str()),
        ("active", "running")
    );
    assert_eq!(sb.main_pid(), main, "purge touched the user's service");
    assert!(retry_get(port, Duration::from_secs(5)).contains("hello"));

    // stop: nothing left in the cgroup
    sb.exec(&["systemctl", "stop", "myapp.service"]);
    assert!(!sb.alive(main));
    drop(sb);
    eprintln!(
        "[e2e] harness_self_test: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

// ------------------------------------------------------------------ scenarios (real sockvisor)

/// Socket activation: nothing runs until the first TCP connection; several workers answer;
/// UDP is echoed; systemd shows sockvisor's status and pid.
#[test]
fn scenario_socket_activation() {
    let _lock = serial();
    if !gate("scenario_socket_activation", &[]) {
        return;
    }
    let f = Fleet::new("activation");
    assert_eq!(f.sb.prop("myapp.service", "ActiveState"), "inactive");
    assert_eq!(f.sb.prop("myapp.socket", "SubState"), "listening");
    let main = f.activate();
    let mut pids = BTreeSet::new();
    for _ in 0..40 {
        let body = http_get(f.port).expect("GET");
        pids.insert(body_pid(&body).unwrap_or_else(|| panic!("no pid in {body:?}")));
    }
    assert!(pids.len() >= 2, "answers from one worker only: {pids:?}");
    assert!(
        pids.is_subset(&f.sb.children(main)),
        "answers not from sockvisor's workers"
    );
    assert_udp_echo(f.port, b"sockvisor-udp");
    let show = f.sb.show("myapp.service", "StatusText,MainPID,ActiveState");
    assert_eq!(show["ActiveState"], "active");
    assert!(
        !show["StatusText"].is_empty(),
        "no STATUS= from sockvisor: {show:?}"
    );
    assert_eq!(
        f.sb.exec(&["cat", &format!("/proc/{main}/comm")]).trim(),
        "sockvisor"
    );
    // the control socket in $RUNTIME_DIRECTORY, as `sockvisor status --json` sees it
    f.sb.exec(&["test", "-S", "/run/myapp/control.sock"]);
    // (a shell has no $RUNTIME_DIRECTORY: name the socket with --control)
    let status = f.sb.exec(&[
        "sockvisor",
        "status",
        "--json",
        "--control",
        "/run/myapp/control.sock",
    ]);
    let v: serde_json::Value = serde_json::from_str(&status)
        .unwrap_or_else(|e| panic!("sockvisor status --json: {e}: {status:?}"));
    assert_eq!(v["pid"].as_u64(), Some(u64::from(main)), "{status}");
    f.done("scenario_socket_activation");
}

/// `systemctl reload` under a client loop: zero failed requests, workers replaced, MainPID kept.
#[test]
fn scenario_reload_under_load() {
    let _lock = serial();
    if !gate("scenario_reload_under_load", &[]) {
        return;
    }
    let f = Fleet::new("reload");
    let main = f.activate();
    let old = f.workers();
    let client = ClientLoop::start(f.port);
    thread::sleep(Duration::from_millis(500));
    f.sb.exec(&["systemctl", "reload", "myapp.service"]);
    wait_until(
        "a new generation of workers",
        Duration::from_secs(30),
        || {
            let now = f.workers();
            now.len() == 2 && now.is_disjoint(&old)
        },
    );
    thread::sleep(Duration::from_millis(500));
    let stats = client.finish();
    assert_eq!(f.sb.main_pid(), main, "reload replaced sockvisor itself");
    assert_eq!(
        stats.refused + stats.other_errors,
        0,
        "failed requests: {stats:?}"
    );
    assert!(stats.ok > 0);
    assert!(
        !stats.pids.is_disjoint(&f.workers()),
        "no answer from the new workers: {stats:?}"
    );
    assert_eq!(f.sb.prop("myapp.service", "ActiveState"), "active");
    f.done("scenario_reload_under_load");
}

/// A drop-in `Environment=SOCKVISOR_WORKERS=3` + daemon-reload + restart: three workers.
#[test]
fn scenario_workers_dropin() {
    let _lock = serial();
    if !gate("scenario_workers_dropin", &[]) {
        return;
    }
    let f = Fleet::new("dropin");
    f.activate();
    let dropin =
        unit_file("examples/workers.conf").replace("SOCKVISOR_WORKERS=8", "SOCKVISOR_WORKERS=3");
    assert!(dropin.contains("SOCKVISOR_WORKERS=3"));
    f.sb.write("/etc/systemd/system/myapp.service.d/workers.conf", &dropin);
    f.sb.exec(&["systemctl", "daemon-reload"]);
    f.sb.exec(&["systemctl", "restart", "myapp.service"]);
    f.wait_active_workers(3);
    assert!(retry_get(f.port, Duration::from_secs(10)).contains("hello from worker"));
    f.done("scenario_workers_dropin");
}

/// All workers hang (SIGSTOP): sockvisor's worker watchdog notices, the fleet stays below
/// `min_healthy`, sockvisor withholds its WATCHDOG=1 pings (and sends WATCHDOG=trigger after
/// `unhealthy_grace`), systemd kills and restarts the service (NRestarts=1); the socket keeps
/// accepting meanwhile (no connection refused) and the hung workers are gone.
///
/// Why the fleet stays unhealthy long enough: a SIGSTOPped worker misses its worker watchdog
/// (1 s) and gets SIGABRT, which stays pending while it is stopped; it is Draining (not
/// healthy) until the SIGKILL at `stop_timeout` (20 s), long after systemd's WatchdogSec=3.
/// So only systemd can end this, which is what the scenario checks.
///
/// Two variants: `unhealthy_grace = "1s"` ends in sockvisor's `WATCHDOG=trigger` ("Watchdog
/// request"); `unhealthy_grace = "60s"` leaves it to the withheld pings ("Watchdog timeout").
#[test]
fn scenario_fleet_watchdog() {
    fleet_watchdog("scenario_fleet_watchdog", "1s", "Watchdog request");
}

#[test]
fn scenario_fleet_watchdog_no_trigger() {
    fleet_watchdog(
        "scenario_fleet_watchdog_no_trigger",
        "60s",
        "Watchdog timeout",
    );
}

fn fleet_watchdog(test: &str, grace: &str, systemd_says: &str) {
    let _lock = serial();
    if !gate(test, &[]) {
        return;
    }
    let f = Fleet::new(if grace == "1s" {
        "watchdog"
    } else {
        "wdtimeout"
    });
    f.sb.write(
        "/etc/systemd/system/myapp.service.d/watchdog.conf",
        &format!(
            "{}Environment=HELLO_WATCHDOG=1\n",
            unit_file("examples/watchdog.conf").replace("WatchdogSec=5", "WatchdogSec=3")
        ),
    );
    f.sb.write(
        "/etc/myapp/sockvisor.toml",
        &sockvisor_config(
            f.port,
            2,
            &format!(
                "worker_watchdog = \"1s\"\nmin_healthy = 2\nunhealthy_grace = \"{grace}\"\n\
                 stop_timeout = \"20s\"\n"
            ),
        ),
    );
    f.sb.exec(&["systemctl", "daemon-reload"]);
    let main = f.activate();
    assert_eq!(f.sb.prop("myapp.service", "WatchdogUSec"), "3s");
    // the workers ping sockvisor: still all there after several worker watchdog periods
    let old = f.workers();
    thread::sleep(Duration::from_secs(3));
    assert_eq!(f.workers(), old, "workers restarted although they ping");
    assert_eq!(f.sb.prop("myapp.service", "NRestarts"), "0");
    for pid in &old {
        f.sb.exec(&["kill", "-STOP", &pid.to_string()]);
    }
    let client = ClientLoop::start(f.port);
    wait_until("a watchdog restart", Duration::from_secs(40), || {
        f.sb.prop("myapp.service", "NRestarts") == "1"
    });
    let new_main = f.wait_active_workers(2);
    assert_ne!(new_main, main);
    retry_get(f.port, Duration::from_secs(10));
    let stats = client.finish();
    assert_eq!(
        stats.refused, 0,
        "connections refused during the watchdog restart: {stats:?}"
    );
    let journal = f.sb.journal("myapp.service");
    // sockvisor's side: the worker watchdog fired and the fleet was reported unhealthy
    assert!(
        journal.contains("watchdog timeout; sending SIGABRT"),
        "{journal}"
    );
    assert!(journal.contains("withholding watchdog pings"), "{journal}");
    // systemd's side: sockvisor's WATCHDOG=trigger ("Watchdog request") or the missed pings
    // ("Watchdog timeout")
    assert!(journal.contains(systemd_says), "{journal}");
    for line in journal.lines().filter(|l| {
        l.contains("Watchdog") || l.contains("fleet unhealthy") || l.contains("WATCHDOG=trigger")
    }) {
        eprintln!("[e2e] watchdog: {line}");
    }
    for pid in &old {
        assert!(!f.sb.alive(*pid), "hung worker {pid} survived the restart");
    }
    assert_eq!(f.sb.prop("myapp.service", "NRestarts"), "1");
    f.done(test);
}

/// `systemctl restart` under a client loop: no connection refused.
#[test]
fn scenario_restart_under_load() {
    let _lock = serial();
    if !gate("scenario_restart_under_load", &[]) {
        return;
    }
    let f = Fleet::new("restart");
    let main = f.activate();
    let client = ClientLoop::start(f.port);
    thread::sleep(Duration::from_millis(500));
    f.sb.exec(&["systemctl", "restart", "myapp.service"]);
    let new_main = f.wait_active_workers(2);
    assert_ne!(new_main, main);
    thread::sleep(Duration::from_millis(500));
    let stats = client.finish();
    assert_eq!(
        stats.refused, 0,
        "connections refused during restart: {stats:?}"
    );
    assert!(stats.ok > 0);
    if stats.other_errors > 0 {
        eprintln!(
            "[e2e] note: {} non-refused errors during restart: {stats:?}",
            stats.other_errors
        );
    }
    f.done("scenario_restart_under_load");
}

/// A broken config: exit 78, no restart loop.
#[test]
fn scenario_broken_config() {
    let _lock = serial();
    if !gate("scenario_broken_config", &[]) {
        return;
    }
    let f = Fleet::new("badconfig");
    f.sb.write(
        "/etc/myapp/sockvisor.toml",
        "workers = \"many\"\n[[listen\n",
    );
    // start fails (systemctl reports it); the unit must end failed with status 78
    let _ = f.sb.exec_out(
        &["systemctl", "start", "myapp.service"],
        Duration::from_secs(60),
    );
    wait_until("myapp.service failed", Duration::from_secs(20), || {
        f.sb.prop("myapp.service", "ActiveState") == "failed"
    });
    let show =
        f.sb.show("myapp.service", "ExecMainStatus,NRestarts,Result");
    assert_eq!(show["ExecMainStatus"], "78", "{show:?}");
    thread::sleep(Duration::from_secs(3)); // several RestartSec=1 periods
    let show = f.sb.show("myapp.service", "ActiveState,NRestarts");
    assert_eq!(
        show["NRestarts"], "0",
        "restarted despite exit 78: {show:?}"
    );
    assert_eq!(show["ActiveState"], "failed");
    f.done("scenario_broken_config");
}

/// `systemctl stop`: clean exit, nothing of the fleet left in the unit's cgroup.
#[test]
fn scenario_stop_leaves_nothing() {
    let _lock = serial();
    if !gate("scenario_stop_leaves_nothing", &[]) {
        return;
    }
    let f = Fleet::new("stop");
    let main = f.activate();
    let cg = f.sb.prop("myapp.service", "ControlGroup");
    assert!(!cg.is_empty());
    let mut fleet = f.workers();
    fleet.insert(main);
    f.sb.exec(&["systemctl", "stop", "myapp.service"]);
    let show =
        f.sb.show("myapp.service", "ActiveState,Result,ExecMainStatus");
    assert_eq!(show["ActiveState"], "inactive", "{show:?}");
    assert_eq!(show["Result"], "success", "{show:?}");
    assert_eq!(show["ExecMainStatus"], "0", "{show:?}");
    let procs = f.sb.sh(&format!(
        "cat /sys/fs/cgroup{cg}/cgroup.procs 2>/dev/null || true"
    ));
    assert!(procs.trim().is_empty(), "left in {cg}: {procs}");
    for pid in fleet {
        assert!(!f.sb.alive(pid), "pid {pid} of the fleet survived the stop");
    }
    f.done("scenario_stop_leaves_nothing");
}

/// SIGKILL of sockvisor under load: systemd restarts it, no refused connection, old workers gone.
#[test]
fn scenario_sigkill_main() {
    let _lock = serial();
    if !gate("scenario_sigkill_main", &[]) {
        return;
    }
    let f = Fleet::new("sigkill");
    let main = f.activate();
    let old = f.workers();
    let client = ClientLoop::start(f.port);
    thread::sleep(Duration::from_millis(500));
    f.sb.exec(&[
        "systemctl",
        "kill",
        "-s",
        "KILL",
        "--kill-whom=main",
        "myapp.service",
    ]);
    wait_until("a restart after SIGKILL", Duration::from_secs(20), || {
        f.sb.prop("myapp.service", "NRestarts") == "1"
    });
    let new_main = f.wait_active_workers(2);
    assert_ne!(new_main, main);
    thread::sleep(Duration::from_millis(500));
    let stats = client.finish();
    assert_eq!(
        stats.refused, 0,
        "connections refused after SIGKILL: {stats:?}"
    );
    for pid in old {
        assert!(!f.sb.alive(pid), "old worker {pid} outlived its sockvisor");
    }
    f.done("scenario_sigkill_main");
}

/// Removing and purging the package leaves nothing of it, and the user's sockets untouched.
#[test]
fn scenario_purge_keeps_user_sockets() {
    let _lock = serial();
    if !gate("scenario_purge_keeps_user_sockets", &[]) {
        return;
    }
    let f = Fleet::new("purge");
    let main = f.activate();
    f.sb.exec(&["dpkg", "--remove", "sockvisor"]);
    f.sb.exec(&["test", "-e", "/etc/sockvisor/example.toml"]); // conffile kept until purge
    f.sb.exec(&["dpkg", "--purge", "sockvisor"]);
    let listed =
        f.sb.exec_out(&["dpkg", "-L", "sockvisor"], Duration::from_secs(30));
    assert!(
        !listed.status.success(),
        "dpkg -L still lists: {}",
        text(&listed.stdout)
    );
    f.sb.exec(&["test", "!", "-e", "/etc/sockvisor"]);
    f.sb.exec(&["test", "!", "-e", "/usr/bin/sockvisor"]);
    f.sb.exec(&["test", "!", "-e", "/usr/share/man/man8/sockvisor.8.gz"]);
    f.sb.exec(&["test", "!", "-e", "/usr/share/doc/sockvisor"]);
    assert_eq!(f.sb.prop("sockvisor@x.service", "LoadState"), "not-found");
    for unit in ["myapp.socket", "myapp-dns.socket"] {
        let s = f.sb.show(unit, "ActiveState,SubState");
        assert_eq!(s["ActiveState"], "active", "{unit}: {s:?}");
    }
    assert_eq!(
        f.sb.main_pid(),
        main,
        "the package stopped the user's fleet"
    );
    assert!(retry_get(f.port, Duration::from_secs(5)).contains("hello from worker"));
    f.done("scenario_purge_keeps_user_sockets");
}

/// The packaged template: a user's own socket units with `Service=sockvisor@demo.service` and
/// /etc/sockvisor/demo.toml; the control socket in /run/sockvisor/demo; `sockvisor scale`.
#[test]
fn scenario_template_instance() {
    let _lock = serial();
    if !gate("scenario_template_instance", &[]) {
        return;
    }
    let (deb, hello) = (deb(), hello());
    let sb = Sandbox::up("template");
    sb.install_deb(&deb);
    sb.push(&hello, "/usr/local/bin/hello");
    let port = free_port();
    sb.write("/etc/sockvisor/demo.toml", &sockvisor_config(port, 2, ""));
    for (unit, listen, name) in [
        ("demo-web.socket", "ListenStream", "web"),
        ("demo-dns.socket", "ListenDatagram", "dns"),
    ] {
        sb.write(
            &format!("/etc/systemd/system/{unit}"),
            &format!(
                "[Socket]\n{listen}=127.0.0.1:{port}\nFileDescriptorName={name}\n\
                 Service=sockvisor@demo.service\n"
            ),
        );
    }
    sb.exec(&["systemctl", "daemon-reload"]);
    sb.exec(&["systemctl", "start", "demo-web.socket", "demo-dns.socket"]);
    assert!(retry_get(port, Duration::from_secs(20)).contains("hello from worker"));
    assert_udp_echo(port, b"tmpl");
    let unit = "sockvisor@demo.service";
    assert_eq!(sb.prop(unit, "ActiveState"), "active");
    sb.exec(&["test", "-S", "/run/sockvisor/demo/control.sock"]);
    let ctl = ["--control", "/run/sockvisor/demo/control.sock"];
    sb.exec(&[&["sockvisor", "scale", "3"][..], &ctl[..]].concat());
    let main: u32 = sb.prop(unit, "MainPID").parse().unwrap_or(0);
    wait_until(
        "3 workers after `sockvisor scale 3`",
        Duration::from_secs(20),
        || sb.children(main).len() == 3,
    );
    let status = sb.exec(&[&["sockvisor", "status"][..], &ctl[..]].concat());
    assert!(!status.trim().is_empty());
    sb.exec(&["systemctl", "stop", unit]);
    sb.exec(&["test", "!", "-e", "/run/sockvisor/demo"]);
}
