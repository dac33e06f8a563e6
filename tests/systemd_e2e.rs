//! End-to-end tests under a real systemd: the .deb is installed into a systemd-nspawn
//! container (tests/systemd/sandbox.sh) and the example unit pair from units/ runs the `hello`
//! example behind sockvisor.
//!
//! Two container flavours, each built once with mmdebstrap and cached: `debian12` (bookworm,
//! systemd 252) and `debian13` (trixie, systemd 257, with lintian). A scenario is one function
//! taking a [`Flavour`]; `flavour_tests!` at the end lists which scenarios run in which
//! flavour, as `debian12::NAME` and `debian13::NAME`. When a flavour's image cannot be built
//! (mirror unreachable, mmdebstrap failure), its tests FAIL with mmdebstrap's reason: nothing
//! is skipped for that.
//!
//! Prerequisites: root, systemd-nspawn (systemd-container), mmdebstrap, nsenter, dpkg-deb and
//! the packaging tools of packaging/build.sh. Without them the tests print `SKIP: ...` and
//! pass, unless `SOCKVISOR_REQUIRE_ALL=1` (CI), where a missing prerequisite fails.
//!
//! Run: `SOCKVISOR_REQUIRE_ALL=1 cargo test --test systemd_e2e -- --test-threads=1`
//! (add `--nocapture` for the measured times and `systemctl show` outputs; `debian13::` as a
//! filter runs the newer flavour only).
//!
//! Environment:
//!   SOCKVISOR_REQUIRE_ALL=1     prerequisites are mandatory (old name, still accepted:
//!                               SOCKVISOR_SYSTEMD_TESTS=1)
//!   SOCKVISOR_DEB=PATH          install this .deb instead of running packaging/build.sh
//!   SOCKVISOR_HELLO=PATH        use this hello binary instead of building the example
//!   SB_DIR=DIR                  sandbox cache and instances (default /var/tmp/sockvisor-sandbox)
//!
//! The containers let their services use bpf(2) with CAP_BPF (`SB_BPF=1`: nspawn's defaults
//! refuse it), so the shipped units run the default dispatch, kernel-steered round robin, as
//! on a host; `scenario_reuseport_in_a_default_container` checks what nspawn's defaults give.
//!
//! One container per test (under a second to boot from the cached base rootfs), torn down by a
//! drop guard even when the test panics, and by `sandbox.sh reap` at the next run when the test
//! process was killed; the tests take a global lock so that they run one at a time (2-core
//! machines; timing-sensitive client loops). Every wait and every command has a timeout; a
//! command that times out is killed with its whole process group.
//!
//! Ports: each container has its own network namespace (`SB_NET=private`, only `lo`), where
//! the units listen on 127.0.0.1:8000. Nothing else lives in that namespace, so the port is
//! free by construction: no port is picked on the host and released (the race issue 12 found
//! with `free_port()`). The test's client threads enter the namespace with setns(2) (see
//! [`Net`]).
//!
//! `harness_self_test` works without a functional sockvisor: it runs the unit pair with
//! tests/systemd/fake-sockvisor.py (forks workers that drop to nobody) and installs/purges the
//! package. The `scenario_*` tests need the real binary and the `hello` example.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// The port of the example units, inside each container's own network namespace.
const PORT: u16 = 8000;

// ------------------------------------------------------------------ flavours

/// Which Debian (and so which systemd) the container runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    /// bookworm, systemd 252
    Debian12,
    /// trixie, systemd 257
    Debian13,
}

impl Flavour {
    /// `SB_FLAVOUR` of tests/systemd/sandbox.sh, and the test module's name.
    fn name(self) -> &'static str {
        match self {
            Flavour::Debian12 => "debian12",
            Flavour::Debian13 => "debian13",
        }
    }

    /// The systemd major version the flavour must boot (checked at each `up`).
    fn systemd(self) -> u32 {
        match self {
            Flavour::Debian12 => 252,
            Flavour::Debian13 => 257,
        }
    }

    /// Short tag for instance names.
    fn tag(self) -> &'static str {
        match self {
            Flavour::Debian12 => "12",
            Flavour::Debian13 => "13",
        }
    }
}

// ------------------------------------------------------------------ gating

/// The global lock: tests run one at a time. Poisoning (a failed test) does not stop the rest.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// "All prerequisites required": a missing one fails the test instead of skipping it.
fn require_all() -> bool {
    ["SOCKVISOR_REQUIRE_ALL", "SOCKVISOR_SYSTEMD_TESTS"]
        .iter()
        .any(|v| std::env::var(v).as_deref() == Ok("1"))
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn missing_prerequisites() -> Vec<String> {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (the sandbox mounts, writes cgroups and uses nsenter)".to_string());
    }
    for tool in ["systemd-nspawn", "mmdebstrap", "nsenter", "dpkg-deb"] {
        if !have(tool) {
            missing.push(format!("{tool} (not on PATH)"));
        }
    }
    missing
}

/// Takes the global lock; `None` (after saying SKIP) when a prerequisite is missing. Panics
/// then instead when all prerequisites are required.
fn start(test: &str, flavour: Flavour) -> Option<MutexGuard<'static, ()>> {
    let lock = serial();
    let missing = missing_prerequisites();
    if missing.is_empty() {
        return Some(lock);
    }
    let msg = format!(
        "{}::{test}: missing prerequisites: {} (apt-get install -y systemd-container mmdebstrap \
         dpkg-dev help2man rpm lintian rpmlint; run as root)",
        flavour.name(),
        missing.join(", ")
    );
    if require_all() {
        panic!("SOCKVISOR_REQUIRE_ALL=1 but {msg}");
    }
    eprintln!("SKIP: {msg}; set SOCKVISOR_REQUIRE_ALL=1 to make this a failure");
    None
}

// ------------------------------------------------------------------ commands with timeouts

/// Runs `cmd` in a process group of its own with piped output. After `timeout` the whole group
/// gets SIGTERM, then SIGKILL 5 s later (nsenter and the command it runs in the container,
/// packaging/build.sh and its cargo, a booting systemd-nspawn: not only the bash wrapper), and
/// the result is an error. Output is read until the pipes close, within the same deadline.
fn try_run(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("spawn {desc}: {e}"))?;
    let group = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    let (tx, rx) = mpsc::channel();
    let pipes: [Box<dyn Read + Send>; 2] = [
        Box::new(child.stdout.take().expect("stdout")),
        Box::new(child.stderr.take().expect("stderr")),
    ];
    for (i, mut pipe) in pipes.into_iter().enumerate() {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut v = Vec::new();
            let _ = pipe.read_to_end(&mut v);
            let _ = tx.send((i, v));
        });
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let kill_group = |child: &mut std::process::Child| {
        let _ = killpg(group, Signal::SIGTERM);
        let grace = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < grace {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = killpg(group, Signal::SIGKILL);
        let _ = child.wait();
    };
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("wait {desc}: {e}"))? {
            break st;
        }
        if Instant::now() > deadline {
            kill_group(&mut child);
            return Err(format!(
                "timed out after {timeout:?}, killed process group {group}: {desc}"
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut out = [Vec::new(), Vec::new()];
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.max(Duration::from_secs(1))) {
            Ok((i, v)) => out[i] = v,
            Err(_) => {
                kill_group(&mut child);
                return Err(format!(
                    "{desc} exited ({status}) but processes kept its output open; \
                     killed process group {group}"
                ));
            }
        }
    }
    let [stdout, stderr] = out;
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

/// [`try_run`], panicking on a timeout.
fn run(cmd: &mut Command, timeout: Duration) -> Output {
    try_run(cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
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
        let out = try_run(
            Command::new("bash")
                .arg(Path::new(MANIFEST).join("packaging/build.sh"))
                .arg("--no-check"),
            Duration::from_secs(900),
        )?;
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
            let out = try_run(
                Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                    .current_dir(MANIFEST)
                    .args(["build", "--release", "--example", "hello"]),
                Duration::from_secs(900),
            )?;
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

/// One booted container; `Drop` always runs `sandbox.sh down` (with a timeout).
struct Sandbox {
    name: String,
    flavour: Flavour,
    root: PathBuf,
    net: Net,
}

impl Sandbox {
    fn script() -> PathBuf {
        Path::new(MANIFEST).join("tests/systemd/sandbox.sh")
    }

    fn cmd(name: &str, flavour: Flavour) -> Command {
        let mut c = Command::new("bash");
        c.arg(Self::script())
            .env("SB_NAME", name)
            .env("SB_FLAVOUR", flavour.name())
            .env("SB_NET", "private")
            .env("SB_OWNER_PID", std::process::id().to_string())
            .env("SB_NO_APT", "1");
        c
    }

    /// Builds the flavour's base rootfs unless cached; returns how long that took and
    /// whether it was built now. Errors carry mmdebstrap's reason.
    fn setup(flavour: Flavour) -> Result<(Duration, bool), String> {
        let t = Instant::now();
        let out = try_run(
            Self::cmd("setup", flavour).arg("setup"),
            Duration::from_secs(900),
        )?;
        let log = text(&out.stderr);
        if !out.status.success() {
            return Err(format!(
                "cannot build the {} image (systemd {}): {log}",
                flavour.name(),
                flavour.systemd()
            ));
        }
        Ok((t.elapsed(), log.contains("base rootfs built")))
    }

    /// Boots a container whose services may use bpf(2) with CAP_BPF, as on a host
    /// (`SB_BPF=1`): the shipped units keep CAP_BPF for the kernel-steered dispatch (`auto`).
    fn up(test: &str, flavour: Flavour) -> Sandbox {
        Sandbox::up_with(test, flavour, true)
    }

    /// `bpf = false`: nspawn's defaults, under which no service of the container can use
    /// bpf(2) (no CAP_BPF in the container's set, and its seccomp filter refuses the call).
    fn up_with(test: &str, flavour: Flavour, bpf: bool) -> Sandbox {
        // instances left by an earlier run that was killed (no drop guard ran)
        static REAP: Once = Once::new();
        REAP.call_once(|| {
            let _ = try_run(
                Self::cmd("reap", flavour).arg("reap"),
                Duration::from_secs(300),
            );
        });
        let name = format!(
            "sv{}-{}-{}",
            flavour.tag(),
            test,
            std::process::id() % 100_000
        );
        let name: String = name.chars().take(31).collect();
        let t = Instant::now();
        // the guard exists before `up` so that a failed or timed-out boot is torn down too
        let mut sb = Sandbox {
            name: name.clone(),
            flavour,
            root: PathBuf::new(),
            net: Net(None),
        };
        let out = run(
            Self::cmd(&name, flavour)
                .env("SB_BPF", if bpf { "1" } else { "" })
                .arg("up"),
            Duration::from_secs(900),
        );
        let log = text(&out.stderr);
        assert!(
            out.status.success(),
            "sandbox up ({}, systemd {}) failed:\n{log}",
            flavour.name(),
            flavour.systemd()
        );
        for line in log.lines().filter(|l| l.contains("base rootfs built")) {
            eprintln!("[e2e] {line}");
        }
        eprintln!("[e2e] {name}: up in {:.1} s", t.elapsed().as_secs_f64());
        let out = run(
            Self::cmd(&name, flavour).arg("root"),
            Duration::from_secs(10),
        );
        sb.root = PathBuf::from(text(&out.stdout).trim());
        assert!(sb.root.is_dir(), "no container root");
        let out = run(
            Self::cmd(&name, flavour).arg("leader"),
            Duration::from_secs(10),
        );
        let leader = text(&out.stdout).trim().to_string();
        sb.net = Net::of_process(&leader);
        let version = sb.exec(&["systemctl", "--version"]);
        let major: u32 = version
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        assert_eq!(
            major,
            flavour.systemd(),
            "{} booted another systemd: {version}",
            flavour.name()
        );
        sb
    }

    /// Runs a command inside the container (all its namespaces); returns the output.
    fn exec_out(&self, args: &[&str], timeout: Duration) -> Output {
        run(
            Self::cmd(&self.name, self.flavour).arg("exec").args(args),
            timeout,
        )
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
            Self::cmd(&self.name, self.flavour)
                .arg("push")
                .arg(src)
                .arg(dst),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "push failed: {}", text(&out.stderr));
    }

    fn install_deb(&self, deb: &Path) {
        let out = run(
            Self::cmd(&self.name, self.flavour)
                .arg("install-deb")
                .arg(deb),
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
    /// Bounded: `down` gives the container SB_STOP_TIMEOUT (30 s) to power off, then kills
    /// it; past 120 s its process group is killed and the global lock released anyway.
    fn drop(&mut self) {
        let t = Instant::now();
        let result = try_run(
            Self::cmd(&self.name, self.flavour).arg("down"),
            Duration::from_secs(120),
        );
        let outcome = match result {
            Ok(out) if out.status.success() => String::new(),
            Ok(out) => format!(" (FAILED: {})", text(&out.stderr).trim()),
            Err(e) => format!(" (FAILED: {e})"),
        };
        eprintln!(
            "[e2e] {}: down in {:.1} s{outcome}",
            self.name,
            t.elapsed().as_secs_f64()
        );
    }
}

// ------------------------------------------------------------------ the container's network

/// The container's network namespace (/proc/LEADER/ns/net, kept open). Test code reaches
/// the units' 127.0.0.1:8000 from threads that entered it: [`Net::run`] for one call, and
/// the [`ClientLoop`] thread for its whole life. setns(2) with CLONE_NEWNET moves only the
/// calling thread, so the rest of the test process stays in the host's namespace.
#[derive(Clone)]
struct Net(Option<Arc<File>>);

impl Net {
    fn of_process(pid: &str) -> Net {
        let path = format!("/proc/{pid}/ns/net");
        let f = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Net(Some(Arc::new(f)))
    }

    /// Moves the calling thread into the namespace. Only for threads this file spawns.
    fn enter(&self) {
        let f = self.0.as_ref().expect("container network namespace");
        // SAFETY: setns(2) on a file descriptor that `f` owns and keeps open for the call;
        // it changes the namespace of the calling thread only (a thread of our own, see the
        // type's doc) and touches no memory.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(
            rc,
            0,
            "setns into the container's network namespace: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Runs `f` on a new thread inside the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|s| {
            s.spawn(|| {
                self.enter();
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// GETs until one succeeds (the service may be starting).
    fn retry_get(&self, timeout: Duration) -> String {
        self.run(|| {
            let deadline = Instant::now() + timeout;
            loop {
                match http_get() {
                    Ok(b) => return b,
                    Err(e) if Instant::now() > deadline => {
                        panic!("GET :{PORT} kept failing for {timeout:?}: {e}")
                    }
                    Err(_) => thread::sleep(Duration::from_millis(100)),
                }
            }
        })
    }

    /// hello echoes a datagram as `worker <id> (pid <pid>): <payload>`.
    fn assert_udp_echo(&self, payload: &[u8]) {
        let reply = self.run(|| udp_echo(payload)).expect("udp echo");
        let (head, echoed) = reply.split_at(reply.len().saturating_sub(payload.len()));
        assert!(
            echoed == payload && text(head).starts_with("worker "),
            "bad UDP echo: {:?}",
            text(&reply)
        );
    }
}

// ------------------------------------------------------------------ clients (inside the netns)

/// The units' address over IPv4.
const V4: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), PORT);
/// The units' address over IPv6 (the stock units listen on `[::]:8000`, dual-stack).
const V6: SocketAddr = SocketAddr::new(std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), PORT);

/// One HTTP/1.0 GET of 127.0.0.1:8000 from the calling thread's namespace; returns the body.
fn http_get() -> std::io::Result<String> {
    http_get_from(V4, Duration::from_secs(3))
}

/// One HTTP/1.0 GET of `addr`, waiting up to `read_timeout` for the answer; returns the body.
fn http_get_from(addr: SocketAddr, read_timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(read_timeout))?;
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

fn udp_echo(payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 2048];
    let mut last = None;
    for _ in 0..3 {
        s.send_to(payload, ("127.0.0.1", PORT))?;
        match s.recv(&mut buf) {
            Ok(n) => return Ok(buf[..n].to_vec()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("error"))
}

#[derive(Debug, Default, Clone)]
struct LoopStats {
    ok: u64,
    refused: u64,
    /// Connections reset (ECONNRESET), by a closed listener's queue or a killed worker.
    reset: u64,
    /// Any other failure: a timeout, an end of file without an answer, a bad answer.
    other_errors: u64,
    first_errors: Vec<String>,
    pids: BTreeSet<u32>,
}

/// A client hammering the service (from inside the container's network namespace) until
/// stopped.
struct ClientLoop {
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<LoopStats>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl ClientLoop {
    fn start(net: &Net) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(LoopStats::default()));
        let (st, sa, net) = (stop.clone(), stats.clone(), net.clone());
        let handle = thread::spawn(move || {
            net.enter();
            while !st.load(Ordering::Relaxed) {
                let r = http_get();
                let mut s = sa.lock().unwrap_or_else(|e| e.into_inner());
                match r {
                    Ok(body) => {
                        s.ok += 1;
                        if let Some(p) = body_pid(&body) {
                            s.pids.insert(p);
                        }
                    }
                    Err(e) => {
                        match e.kind() {
                            ErrorKind::ConnectionRefused => s.refused += 1,
                            ErrorKind::ConnectionReset => s.reset += 1,
                            _ => s.other_errors += 1,
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

    /// Polls the loop's counters until `cond` holds.
    fn wait_for(&self, what: &str, cond: impl Fn(&LoopStats) -> bool) -> LoopStats {
        let mut last = LoopStats::default();
        wait_until(
            &format!("the client loop: {what}"),
            Duration::from_secs(30),
            || {
                last = self.snapshot();
                cond(&last)
            },
        );
        last
    }

    /// Waits for `n` more answers than now (the loop is going).
    fn wait_for_answers(&self, n: u64) -> LoopStats {
        let base = self.snapshot().ok;
        self.wait_for(&format!("{n} more answers"), |s| s.ok >= base + n)
    }

    /// Waits until one of `workers` answered.
    fn wait_for_answer_from(&self, workers: &BTreeSet<u32>) -> LoopStats {
        self.wait_for(&format!("an answer from one of {workers:?}"), |s| {
            !s.pids.is_disjoint(workers)
        })
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

/// The example socket units, listening on 127.0.0.1 only (the container's `lo`).
fn socket_units() -> (String, String) {
    let web = unit_file("myapp.socket").replace(
        "\nListenStream=8000\n",
        &format!("\nListenStream=127.0.0.1:{PORT}\n"),
    );
    let dns = unit_file("myapp-dns.socket").replace(
        "\nListenDatagram=8000\n",
        &format!("\nListenDatagram=127.0.0.1:{PORT}\n"),
    );
    assert!(web.contains(&format!("ListenStream=127.0.0.1:{PORT}")));
    assert!(dns.contains(&format!("ListenDatagram=127.0.0.1:{PORT}")));
    (web, dns)
}

/// The hello worker as a config `command`.
const HELLO: &str = r#"["/usr/local/bin/hello"]"#;

/// The hello worker with environment variables (HELLO_READY=1, HELLO_READY_DELAY_MS=N, ...).
fn hello_with(env: &[&str]) -> String {
    let env: String = env.iter().map(|e| format!("\"{e}\", ")).collect();
    format!("[\"/usr/bin/env\", {env}\"/usr/local/bin/hello\"]")
}

/// The fleet's config: `extra` lines go before the listeners (and may set `stop_timeout`).
fn sockvisor_config(command: &str, workers: usize, extra: &str) -> String {
    let stop = if extra.contains("stop_timeout") {
        ""
    } else {
        "stop_timeout = \"5s\"\n"
    };
    format!(
        "command = {command}\n\
         workers = {workers}\n\
         {stop}\
         {extra}\n\
         [[listen]]\nname = \"web\"\nurl = \"tcp://127.0.0.1:{PORT}\"\n\n\
         [[listen]]\nname = \"dns\"\nurl = \"udp://127.0.0.1:{PORT}\"\n"
    )
}

/// How [`Fleet::build`] sets up the container and the units.
struct Setup {
    /// The container lets its services use bpf(2) ([`Sandbox::up_with`]).
    bpf: bool,
    /// The socket units exactly as shipped (`ListenStream=8000`: `[::]:8000`, dual-stack)
    /// instead of 127.0.0.1 only.
    stock_sockets: bool,
    /// Drop-ins for socket units: (unit, content).
    socket_dropins: Vec<(&'static str, &'static str)>,
    /// Workers in the config (2 unless set).
    workers: Option<usize>,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            bpf: true,
            stock_sockets: false,
            socket_dropins: Vec::new(),
            workers: None,
        }
    }
}

struct Fleet {
    sb: Sandbox,
    test: String,
    t0: Instant,
}

impl Fleet {
    /// Boots a container, installs the .deb and the hello worker, writes the unit pair and
    /// the config, starts myapp.socket. The service itself is not started.
    fn new(test: &str, flavour: Flavour) -> Fleet {
        Fleet::build(test, flavour, &Setup::default())
    }

    /// [`Fleet::new`] with the choices of `setup`.
    fn build(test: &str, flavour: Flavour, setup: &Setup) -> Fleet {
        let t0 = Instant::now();
        let (deb, hello) = (deb(), hello());
        let sb = Sandbox::up_with(test, flavour, setup.bpf);
        sb.install_deb(&deb);
        sb.push(&hello, "/usr/local/bin/hello");
        let (web, dns) = if setup.stock_sockets {
            (unit_file("myapp.socket"), unit_file("myapp-dns.socket"))
        } else {
            socket_units()
        };
        sb.write("/etc/systemd/system/myapp.socket", &web);
        sb.write("/etc/systemd/system/myapp-dns.socket", &dns);
        for (unit, content) in &setup.socket_dropins {
            sb.write(&format!("/etc/systemd/system/{unit}.d/test.conf"), content);
        }
        sb.write(
            "/etc/systemd/system/myapp.service",
            &unit_file("myapp.service"),
        );
        sb.write(
            "/etc/myapp/sockvisor.toml",
            &sockvisor_config(HELLO, setup.workers.unwrap_or(2), ""),
        );
        sb.exec(&["systemctl", "daemon-reload"]);
        sb.exec(&["systemctl", "start", "myapp.socket"]);
        let test = format!("{}::{test}", flavour.name());
        eprintln!(
            "[e2e] {test}: fleet set up in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        Fleet { sb, test, t0 }
    }

    fn net(&self) -> &Net {
        &self.sb.net
    }

    fn configure(&self, config: &str) {
        self.sb.write("/etc/myapp/sockvisor.toml", config);
    }

    /// Writes a drop-in for myapp.service (run daemon-reload afterwards).
    fn dropin(&self, name: &str, content: &str) {
        self.sb.write(
            &format!("/etc/systemd/system/myapp.service.d/{name}"),
            content,
        );
    }

    /// Activates the service with a first request; waits until it is active with workers.
    fn activate(&self) -> u32 {
        let body = self.net().retry_get(Duration::from_secs(20));
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

    /// `sockvisor status --json` through the unit's control socket, as an admin runs it.
    fn status(&self) -> serde_json::Value {
        self.status_by(&[])
    }

    /// [`Fleet::status`] run through `prefix` (e.g. setpriv to another user: the client
    /// talks only to a sockvisor of root or of its own uid).
    fn status_by(&self, prefix: &[&str]) -> serde_json::Value {
        let cmd = [
            "sockvisor",
            "status",
            "--json",
            "--control",
            "/run/myapp/control.sock",
        ];
        let out = self.sb.exec(&[prefix, &cmd[..]].concat());
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("sockvisor status --json: {e}: {out:?}"))
    }

    /// `systemctl reload myapp.service`: its output and how long it took (from the host).
    fn reload(&self) -> (Output, Duration) {
        let t = Instant::now();
        let out = self.sb.exec_out(
            &["systemctl", "reload", "myapp.service"],
            Duration::from_secs(120),
        );
        (out, t.elapsed())
    }

    fn done(&self) {
        eprintln!(
            "[e2e] {}: passed in {:.1} s",
            self.test,
            self.t0.elapsed().as_secs_f64()
        );
    }
}

/// Pids of the workers of `generation` in `state` in a `sockvisor status --json` answer.
fn workers_in(status: &serde_json::Value, generation: u64, state: &str) -> BTreeSet<u32> {
    status["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .filter(|w| w["generation"].as_u64() == Some(generation) && w["state"] == state)
        .filter_map(|w| w["pid"].as_u64().and_then(|p| u32::try_from(p).ok()))
        .collect()
}

/// sockvisor's own "reloaded: generation N serving (X.Ys)" from the journal.
fn reload_took(journal: &str, generation: u64) -> Option<String> {
    let key = format!("reloaded: generation {generation} serving (");
    let line = journal.lines().find(|l| l.contains(&key))?;
    let rest = &line[line.find(&key)? + key.len()..];
    Some(rest.split(')').next()?.to_string())
}

/// The lines of `systemctl show` output worth a look in the report.
fn print_show(test: &str, when: &str, show: &HashMap<String, String>) {
    let mut keys: Vec<_> = show.keys().collect();
    keys.sort();
    let line: Vec<String> = keys.iter().map(|k| format!("{k}={}", show[*k])).collect();
    eprintln!(
        "[e2e] {test}: systemctl show ({when}): {}",
        line.join(" | ")
    );
}

// ------------------------------------------------------------------ the harness itself

/// The flavour's base rootfs builds (or is cached): when it cannot be built, this fails with
/// mmdebstrap's reason, and so does every other test of the flavour.
fn image_builds(flavour: Flavour) {
    let Some(_lock) = start("image_builds", flavour) else {
        return;
    };
    let (took, built) = Sandbox::setup(flavour).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "[e2e] {} image (systemd {}): {} in {:.1} s",
        flavour.name(),
        flavour.systemd(),
        if built {
            "built now (cold cache)"
        } else {
            "cached"
        },
        took.as_secs_f64()
    );
}

/// Boot, write units, push, exec, install and purge the package, down: everything the
/// scenarios rely on, with a Python stand-in for sockvisor. Also checks the unit pair's
/// design (two socket units -> LISTEN_FDNAMES=web:dns) and that the hardening of
/// units/myapp.service lets a supervisor fork workers that drop to another user.
fn harness_self_test(flavour: Flavour) {
    let Some(_lock) = start("harness_self_test", flavour) else {
        return;
    };
    let t0 = Instant::now();
    let deb = deb();
    let sb = Sandbox::up("harness", flavour);
    assert_eq!(
        sb.exec(&["systemctl", "is-system-running"]).trim(),
        "running"
    );

    // the fake supervisor behind the real unit pair, hardening included
    sb.push(
        &Path::new(MANIFEST).join("tests/systemd/fake-sockvisor.py"),
        "/usr/local/bin/fake-sockvisor",
    );
    let (web, dns) = socket_units();
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

    let body = sb.net.retry_get(Duration::from_secs(20));
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
    assert_eq!(sb.net.run(|| udp_echo(b"ping")).expect("udp echo"), b"ping");
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
        "/usr/share/doc/sockvisor/examples/notify-reload.conf",
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
    assert!(sb.net.retry_get(Duration::from_secs(5)).contains("hello"));

    // stop: nothing left in the cgroup
    sb.exec(&["systemctl", "stop", "myapp.service"]);
    assert!(!sb.alive(main));
    drop(sb);
    eprintln!(
        "[e2e] {}::harness_self_test: {:.1} s",
        flavour.name(),
        t0.elapsed().as_secs_f64()
    );
}

/// The package as the flavour's own tools see it: units/verify.sh (systemd-analyze verify of
/// every unit and drop-in, notify-reload.conf included from systemd 253 on) with the installed
/// binary, and, where the image has it (debian13), that distribution's lintian on the .deb
/// built on the host: no error, no warning besides `initial-upload-closes-no-bugs`
/// (docs/packaging.md explains it and the info tags).
fn scenario_package_checks(flavour: Flavour) {
    let Some(_lock) = start("scenario_package_checks", flavour) else {
        return;
    };
    let deb = deb();
    let sb = Sandbox::up("pkgcheck", flavour);
    sb.install_deb(&deb);
    sb.push(&Path::new(MANIFEST).join("units"), "/root/units");
    let out = sb.exec_out(
        &["bash", "/root/units/verify.sh", "/usr/bin/sockvisor"],
        Duration::from_secs(120),
    );
    let report = text(&out.stdout);
    eprintln!(
        "[e2e] {}: units/verify.sh under systemd {}:\n{report}{}",
        flavour.name(),
        flavour.systemd(),
        text(&out.stderr)
    );
    assert!(out.status.success(), "units/verify.sh failed");
    if flavour.systemd() >= 253 {
        assert!(
            report.contains("ok   myapp.service + examples/notify-reload.conf"),
            "notify-reload.conf not verified: {report}"
        );
    }
    if sb
        .exec_out(&["test", "-x", "/usr/bin/lintian"], Duration::from_secs(10))
        .status
        .success()
    {
        sb.push(&deb, "/var/cache/sockvisor.deb");
        let version = sb.exec(&["lintian", "--version"]);
        let out = sb.exec_out(
            &[
                "lintian",
                "--allow-root",
                "--fail-on",
                "error,warning",
                "--display-info",
                "--tag-display-limit",
                "0",
                "--suppress-tags",
                "initial-upload-closes-no-bugs",
                "/var/cache/sockvisor.deb",
            ],
            Duration::from_secs(300),
        );
        let tags = text(&out.stdout);
        eprintln!(
            "[e2e] {}: {} on {}:\n{tags}{}",
            flavour.name(),
            version.trim(),
            deb.display(),
            text(&out.stderr)
        );
        assert!(out.status.success(), "lintian failed: {tags}");
        let bad: Vec<&str> = tags
            .lines()
            .filter(|l| l.starts_with("E:") || l.starts_with("W:"))
            .collect();
        assert!(bad.is_empty(), "lintian errors or warnings: {bad:?}");
    } else {
        assert_ne!(
            flavour,
            Flavour::Debian13,
            "the debian13 image has no lintian"
        );
    }
}

// ------------------------------------------------------------------ scenarios (real sockvisor)

/// Socket activation: nothing runs until the first TCP connection; several workers answer;
/// UDP is echoed; systemd shows sockvisor's status and pid.
fn scenario_socket_activation(flavour: Flavour) {
    let Some(_lock) = start("scenario_socket_activation", flavour) else {
        return;
    };
    let f = Fleet::new("activation", flavour);
    assert_eq!(f.sb.prop("myapp.service", "ActiveState"), "inactive");
    assert_eq!(f.sb.prop("myapp.socket", "SubState"), "listening");
    let main = f.activate();
    let bodies: Vec<String> = f.net().run(|| {
        (0..40)
            .map(|_| http_get().expect("GET"))
            .collect::<Vec<_>>()
    });
    let pids: BTreeSet<u32> = bodies
        .iter()
        .map(|b| body_pid(b).unwrap_or_else(|| panic!("no pid in {b:?}")))
        .collect();
    assert!(pids.len() >= 2, "answers from one worker only: {pids:?}");
    let workers = f.sb.children(main);
    assert!(
        pids.is_subset(&workers),
        "answers not from sockvisor's workers"
    );
    f.net().assert_udp_echo(b"sockvisor-udp");
    let show = f.sb.show(
        "myapp.service",
        "StatusText,StatusErrno,MainPID,ActiveState",
    );
    print_show(&f.test, "serving", &show);
    assert_eq!(show["ActiveState"], "active");
    // (the default dispatch: the workers accept, so no accepted/queued counts follow)
    assert_eq!(
        show["StatusText"], "2/2 workers ready, 0 restarts",
        "STATUS= from sockvisor: {show:?}"
    );
    assert_eq!(show["StatusErrno"], "0");
    assert_eq!(
        f.sb.exec(&["cat", &format!("/proc/{main}/comm")]).trim(),
        "sockvisor"
    );
    // the control socket in $RUNTIME_DIRECTORY, as `sockvisor status --json` sees it
    f.sb.exec(&["test", "-S", "/run/myapp/control.sock"]);
    let v = f.status();
    assert_eq!(v["pid"].as_u64(), Some(u64::from(main)), "{v}");
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(workers_in(&v, 1, "ready"), workers, "{v}");
    let listeners: BTreeSet<&str> = v["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(listeners, BTreeSet::from(["dns", "web"]), "{v}");
    for name in ["web", "dns"] {
        assert_eq!(
            listener_policy(&v, name),
            ("reuseport".to_string(), None),
            "the default dispatch under the shipped units: {v}"
        );
    }
    f.done();
}

/// How `systemctl reload` reaches sockvisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReloadBy {
    /// The units' default: `ExecReload=/usr/bin/sockvisor reload` (waits for the outcome).
    Command,
    /// units/examples/notify-reload.conf: `Type=notify-reload`, no `ExecReload=` (systemd
    /// sends SIGHUP and waits for RELOADING=1 + MONOTONIC_USEC=, then READY=1).
    NotifyReload,
}

/// `systemctl reload` under a client loop, three times: a changed config whose workers take
/// 1 s each to get ready (`systemctl reload` returns only when the new generation serves,
/// checked with `sockvisor status` right after it returns; the durations are printed), a
/// broken config (refused) and workers that never get ready (rolled back after 3 s). The old
/// generation keeps serving through both failures; no request fails; MainPID stays.
///
/// With `ExecReload=/usr/bin/sockvisor reload` the two failed reloads make `systemctl reload`
/// fail. With `Type=notify-reload` they cannot: systemd (252..257) ends a signal-initiated
/// reload successfully at READY=1, and has no notification that fails it (service.c in 257:
/// only a timeout or a failing ExecReload= sets the reload result). The test asserts that, so
/// that a systemd that learns it shows up here and in the docs.
fn reload_scenario(test: &str, flavour: Flavour, by: ReloadBy) {
    let Some(_lock) = start(test, flavour) else {
        return;
    };
    let f = Fleet::new(
        match by {
            ReloadBy::Command => "reload",
            ReloadBy::NotifyReload => "notifyreload",
        },
        flavour,
    );
    let extra = "ready = \"notify\"\nreload_timeout = \"3s\"\n";
    let ready_now = sockvisor_config(&hello_with(&["HELLO_READY=1"]), 2, extra);
    f.configure(&ready_now);
    if by == ReloadBy::NotifyReload {
        f.dropin(
            "notify-reload.conf",
            &unit_file("examples/notify-reload.conf"),
        );
    }
    f.sb.exec(&["systemctl", "daemon-reload"]);
    let show = f.sb.show("myapp.service", "Type,ExecReload");
    match by {
        ReloadBy::Command => {
            assert_eq!(show["Type"], "notify", "{show:?}");
            assert!(
                show["ExecReload"].contains("argv[]=/usr/bin/sockvisor reload "),
                "{show:?}"
            );
        }
        ReloadBy::NotifyReload => {
            assert_eq!(show["Type"], "notify-reload", "{show:?}");
            // (an empty ExecReload= is not listed at all)
            assert_eq!(
                show.get("ExecReload").map_or("", String::as_str),
                "",
                "{show:?}"
            );
        }
    }
    let main = f.activate();
    let client = ClientLoop::start(f.net());
    client.wait_for_answers(10);
    let first = f.status()["generation"].as_u64().expect("generation");
    let old = workers_in(&f.status(), first, "ready");
    assert_eq!(old.len(), 2);

    // 1. a changed config, slow to get ready
    let slow = hello_with(&["HELLO_READY=1", "HELLO_READY_DELAY_MS=1000"]);
    let slow_config = sockvisor_config(&slow, 2, extra);
    f.configure(&slow_config);
    let (out, took) = f.reload();
    assert!(
        out.status.success(),
        "systemctl reload failed: {}",
        text(&out.stderr)
    );
    let s = f.status();
    let second = first + 1;
    assert_eq!(
        (s["generation"].as_u64(), s["state"].as_str()),
        (Some(second), Some("running")),
        "systemctl reload returned before the reload ended: {s}"
    );
    let new = workers_in(&s, second, "ready");
    assert_eq!(
        new.len(),
        2,
        "systemctl reload returned before the new generation was ready: {s}"
    );
    assert!(old.is_disjoint(&new));
    let sockvisor_took = reload_took(&f.sb.journal("myapp.service"), second);
    eprintln!(
        "[e2e] {}: systemctl reload ({by:?}) of a generation of 2 workers ready after 1 s \
         each: returned after {:.2} s (measured from the host); sockvisor: generation {second} \
         serving after {}",
        f.test,
        took.as_secs_f64(),
        sockvisor_took.as_deref().unwrap_or("?")
    );
    assert!(
        sockvisor_took.is_some(),
        "no 'reloaded: generation {second}'"
    );
    client.wait_for_answer_from(&new);

    // 2. refused: a broken config
    f.configure(&slow_config.replace("workers = 2", "workers = \"many\""));
    let (out, took) = f.reload();
    eprintln!(
        "[e2e] {}: refused reload ({by:?}): systemctl reload {} after {:.2} s: {}",
        f.test,
        out.status,
        took.as_secs_f64(),
        text(&out.stderr).trim()
    );
    let journal = f.sb.journal("myapp.service");
    assert!(journal.contains("refused"), "{journal}");
    // 3. rolled back: workers that never say READY=1
    f.configure(&sockvisor_config(&hello_with(&[]), 2, extra));
    let (out3, took3) = f.reload();
    eprintln!(
        "[e2e] {}: rolled-back reload ({by:?}, reload_timeout 3s): systemctl reload {} after \
         {:.2} s: {}",
        f.test,
        out3.status,
        took3.as_secs_f64(),
        text(&out3.stderr).trim()
    );
    let journal = f.sb.journal("myapp.service");
    assert!(
        journal.contains(&format!("rolling back to generation {second}")),
        "{journal}"
    );
    match by {
        ReloadBy::Command => {
            assert!(!out.status.success(), "a refused reload succeeded");
            assert!(!out3.status.success(), "a rolled-back reload succeeded");
        }
        ReloadBy::NotifyReload => {
            assert!(
                out.status.success() && out3.status.success(),
                "systemd {} now fails a notify-reload reload: update units/examples/\
                 notify-reload.conf and docs/systemd.md",
                flavour.systemd()
            );
        }
    }
    // in both cases: the second generation, untouched, still serving
    let s = f.status();
    assert_eq!(s["generation"].as_u64(), Some(second), "{s}");
    assert_eq!(workers_in(&s, second, "ready"), new, "{s}");
    assert_eq!(f.sb.main_pid(), main, "reload replaced sockvisor itself");
    assert_eq!(f.sb.prop("myapp.service", "ActiveState"), "active");
    client.wait_for_answers(10);
    let stats = client.finish();
    eprintln!(
        "[e2e] {}: client loop across the three reloads: {stats:?}",
        f.test
    );
    assert_eq!(
        stats.refused + stats.reset + stats.other_errors,
        0,
        "failed requests: {stats:?}"
    );
    let served: BTreeSet<u32> = old.union(&new).copied().collect();
    assert!(
        stats.pids.is_subset(&served),
        "answers from workers of neither generation: {stats:?}"
    );
    f.done();
}

fn scenario_reload_under_load(flavour: Flavour) {
    reload_scenario("scenario_reload_under_load", flavour, ReloadBy::Command);
}

fn scenario_notify_reload(flavour: Flavour) {
    reload_scenario("scenario_notify_reload", flavour, ReloadBy::NotifyReload);
}

/// A drop-in `Environment=SOCKVISOR_WORKERS=3` + daemon-reload + restart: three workers.
fn scenario_workers_dropin(flavour: Flavour) {
    let Some(_lock) = start("scenario_workers_dropin", flavour) else {
        return;
    };
    let f = Fleet::new("dropin", flavour);
    f.activate();
    let dropin =
        unit_file("examples/workers.conf").replace("SOCKVISOR_WORKERS=8", "SOCKVISOR_WORKERS=3");
    assert!(dropin.contains("SOCKVISOR_WORKERS=3"));
    f.dropin("workers.conf", &dropin);
    f.sb.exec(&["systemctl", "daemon-reload"]);
    f.sb.exec(&["systemctl", "restart", "myapp.service"]);
    f.wait_active_workers(3);
    assert!(f
        .net()
        .retry_get(Duration::from_secs(10))
        .contains("hello from worker"));
    f.done();
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
fn scenario_fleet_watchdog(flavour: Flavour) {
    fleet_watchdog("scenario_fleet_watchdog", flavour, "1s", "Watchdog request");
}

fn scenario_fleet_watchdog_no_trigger(flavour: Flavour) {
    fleet_watchdog(
        "scenario_fleet_watchdog_no_trigger",
        flavour,
        "60s",
        "Watchdog timeout",
    );
}

fn fleet_watchdog(test: &str, flavour: Flavour, grace: &str, systemd_says: &str) {
    let Some(_lock) = start(test, flavour) else {
        return;
    };
    let f = Fleet::new(
        if grace == "1s" {
            "watchdog"
        } else {
            "wdtimeout"
        },
        flavour,
    );
    f.dropin(
        "watchdog.conf",
        &format!(
            "{}Environment=HELLO_WATCHDOG=1\n",
            unit_file("examples/watchdog.conf").replace("WatchdogSec=5", "WatchdogSec=3")
        ),
    );
    f.configure(&sockvisor_config(
        HELLO,
        2,
        &format!(
            "worker_watchdog = \"1s\"\nmin_healthy = 2\nunhealthy_grace = \"{grace}\"\n\
             stop_timeout = \"20s\"\n"
        ),
    ));
    f.sb.exec(&["systemctl", "daemon-reload"]);
    let main = f.activate();
    assert_eq!(f.sb.prop("myapp.service", "WatchdogUSec"), "3s");
    // the workers ping sockvisor: still all there after several worker watchdog periods (an
    // observation window, not a wait for a signal)
    let old = f.workers();
    thread::sleep(Duration::from_secs(3));
    assert_eq!(f.workers(), old, "workers restarted although they ping");
    assert_eq!(f.sb.prop("myapp.service", "NRestarts"), "0");
    for pid in &old {
        f.sb.exec(&["kill", "-STOP", &pid.to_string()]);
    }
    let client = ClientLoop::start(f.net());
    wait_until("a watchdog restart", Duration::from_secs(40), || {
        f.sb.prop("myapp.service", "NRestarts") == "1"
    });
    let new_main = f.wait_active_workers(2);
    assert_ne!(new_main, main);
    client.wait_for_answer_from(&f.workers());
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
        eprintln!("[e2e] {}: {line}", f.test);
    }
    for pid in &old {
        assert!(!f.sb.alive(*pid), "hung worker {pid} survived the restart");
    }
    assert_eq!(f.sb.prop("myapp.service", "NRestarts"), "1");
    f.done();
}

/// `systemctl restart` under a client loop: no request fails, refused or otherwise (the
/// socket keeps queueing while sockvisor is away; the old workers finish what they took).
fn scenario_restart_under_load(flavour: Flavour) {
    let Some(_lock) = start("scenario_restart_under_load", flavour) else {
        return;
    };
    let f = Fleet::new("restart", flavour);
    let main = f.activate();
    let client = ClientLoop::start(f.net());
    client.wait_for_answers(10);
    let t = Instant::now();
    f.sb.exec(&["systemctl", "restart", "myapp.service"]);
    let new_main = f.wait_active_workers(2);
    assert_ne!(new_main, main);
    client.wait_for_answer_from(&f.workers());
    let back = t.elapsed();
    let stats = client.finish();
    eprintln!(
        "[e2e] {}: client loop across `systemctl restart` (answers from the new workers {:.2} s \
         after it began): {stats:?}",
        f.test,
        back.as_secs_f64()
    );
    assert_eq!(
        stats.refused, 0,
        "connections refused during restart: {stats:?}"
    );
    assert_eq!(
        stats.reset + stats.other_errors,
        0,
        "requests failed (not refused) during restart: {stats:?}"
    );
    assert!(stats.ok > 0);
    f.done();
}

/// sockvisor's notifications as `systemctl show` reports them:
/// - `EXTEND_TIMEOUT_USEC=`: with TimeoutStartSec=2 and workers that get ready after 4 s,
///   the start succeeds (sockvisor extends the start timeout while waiting for READY=1s);
/// - `STATUS=`: StatusText is sockvisor's summary;
/// - `STOPPING=1`: sockvisor stopping on its own (SIGTERM to it alone, one worker SIGSTOPped
///   so that draining takes `stop_timeout` = 3 s) puts the unit in deactivating/stop-sigterm
///   with StatusText "stopping: ...", then inactive with Result=success and no restart;
/// - `ERRNO=`: a fleet that gives up (every worker exits at once) ends with exit 69 and
///   StatusErrno=10 (ECHILD); StatusText keeps the last summary ("stopping: 0/2 workers
///   ready, ..."), the reason is in the journal.
fn scenario_notifications(flavour: Flavour) {
    let Some(_lock) = start("scenario_notifications", flavour) else {
        return;
    };
    let f = Fleet::new("notify", flavour);
    let props = "ActiveState,SubState,Result,StatusText,StatusErrno,ExecMainStatus,NRestarts,\
                 TimeoutStartUSec,ExecMainStartTimestampMonotonic,ActiveEnterTimestampMonotonic";

    // EXTEND_TIMEOUT_USEC= and STATUS= while starting
    f.dropin("timeout.conf", "[Service]\nTimeoutStartSec=2\n");
    f.configure(&sockvisor_config(
        &hello_with(&["HELLO_READY=1", "HELLO_READY_DELAY_MS=4000"]),
        2,
        "ready = \"notify\"\nstop_timeout = \"3s\"\n",
    ));
    f.sb.exec(&["systemctl", "daemon-reload"]);
    f.sb.exec(&["systemctl", "start", "--no-block", "myapp.service"]);
    let mut starting = HashMap::new();
    wait_until("myapp.service active", Duration::from_secs(30), || {
        let s = f.sb.show("myapp.service", props);
        let active = s["ActiveState"] == "active";
        if s["ActiveState"] == "activating" {
            starting = s;
        }
        active
    });
    print_show(&f.test, "starting", &starting);
    let active = f.sb.show("myapp.service", props);
    print_show(&f.test, "active", &active);
    assert_eq!(active["TimeoutStartUSec"], "2s");
    let micros = |k: &str| -> u64 { active[k].parse().unwrap_or(0) };
    let start_took = micros("ActiveEnterTimestampMonotonic")
        .saturating_sub(micros("ExecMainStartTimestampMonotonic"));
    assert!(
        start_took > 2_000_000,
        "READY=1 came {start_took} µs after the start, not after TimeoutStartSec=2: \
         the scenario does not test EXTEND_TIMEOUT_USEC"
    );
    assert_eq!(active["NRestarts"], "0", "{active:?}");
    assert!(
        active["StatusText"].starts_with("2/2 workers ready, 0 restarts"),
        "{active:?}"
    );
    if let Some(text) = starting.get("StatusText").filter(|t| !t.is_empty()) {
        assert!(text.contains("/2 workers ready"), "{starting:?}");
    }
    assert_eq!(active["StatusErrno"], "0");

    // STOPPING=1: sockvisor stops on its own
    let main = f.sb.main_pid();
    let workers = f.sb.children(main);
    let one = workers.iter().next().expect("a worker").to_string();
    f.sb.exec(&["kill", "-STOP", &one]);
    f.sb.exec(&[
        "systemctl",
        "kill",
        "-s",
        "TERM",
        "--kill-whom=main",
        "myapp.service",
    ]);
    let mut stopping = HashMap::new();
    wait_until(
        "myapp.service deactivating after sockvisor's STOPPING=1",
        Duration::from_secs(10),
        || {
            stopping = f.sb.show("myapp.service", props);
            stopping["ActiveState"] != "active"
        },
    );
    print_show(&f.test, "sockvisor stopping on SIGTERM", &stopping);
    assert_eq!(
        (
            stopping["ActiveState"].as_str(),
            stopping["SubState"].as_str()
        ),
        ("deactivating", "stop-sigterm"),
        "{stopping:?}"
    );
    assert!(
        stopping["StatusText"].starts_with("stopping: "),
        "{stopping:?}"
    );
    let mut stopped = HashMap::new();
    wait_until("myapp.service inactive", Duration::from_secs(30), || {
        stopped = f.sb.show("myapp.service", props);
        stopped["ActiveState"] == "inactive"
    });
    print_show(&f.test, "stopped", &stopped);
    assert_eq!(stopped["Result"], "success", "{stopped:?}");
    assert_eq!(stopped["ExecMainStatus"], "0", "{stopped:?}");
    assert_eq!(stopped["NRestarts"], "0", "{stopped:?}");

    // ERRNO=: the fleet gives up
    f.dropin("timeout.conf", "[Service]\nRestart=no\n");
    f.configure(&sockvisor_config(
        r#"["/bin/false"]"#,
        2,
        "ready = \"notify\"\ngive_up_after = 2\nrestart_delay = \"50ms\"\n",
    ));
    f.sb.exec(&["systemctl", "daemon-reload"]);
    let out = f.sb.exec_out(
        &["systemctl", "start", "myapp.service"],
        Duration::from_secs(60),
    );
    assert!(!out.status.success(), "a fleet that gives up started");
    let failed = f.sb.show("myapp.service", props);
    print_show(&f.test, "gave up", &failed);
    assert_eq!(failed["ActiveState"], "failed", "{failed:?}");
    assert_eq!(failed["ExecMainStatus"], "69", "{failed:?}");
    assert_eq!(
        failed["StatusErrno"],
        libc::ECHILD.to_string(),
        "{failed:?}"
    );
    // the last STATUS= is the summary while stopping; the reason is in the journal
    assert!(
        failed["StatusText"].starts_with("stopping: 0/2 workers ready"),
        "{failed:?}"
    );
    let journal = f.sb.journal("myapp.service");
    assert!(
        journal.contains("giving up: every worker slot failed 2 times in a row"),
        "{journal}"
    );
    f.done();
}

/// A broken config: exit 78, no restart loop.
fn scenario_broken_config(flavour: Flavour) {
    let Some(_lock) = start("scenario_broken_config", flavour) else {
        return;
    };
    let f = Fleet::new("badconfig", flavour);
    f.configure("workers = \"many\"\n[[listen\n");
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
    // several RestartSec=1 periods (an observation window: nothing would signal a restart)
    thread::sleep(Duration::from_secs(3));
    let show = f.sb.show("myapp.service", "ActiveState,NRestarts");
    assert_eq!(
        show["NRestarts"], "0",
        "restarted despite exit 78: {show:?}"
    );
    assert_eq!(show["ActiveState"], "failed");
    f.done();
}

/// `systemctl stop`: clean exit, nothing of the fleet left in the unit's cgroup.
fn scenario_stop_leaves_nothing(flavour: Flavour) {
    let Some(_lock) = start("scenario_stop_leaves_nothing", flavour) else {
        return;
    };
    let f = Fleet::new("stop", flavour);
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
    f.done();
}

/// SIGKILL of sockvisor under load, under the default dispatch (`auto`, here the kernel-steered
/// `reuseport`): systemd restarts it, and no connection is refused or reset. The program
/// sockvisor attached outlives it (systemd's socket holds the group, the group the program),
/// and sends every connection to systemd's socket while no sockvisor runs: the connections
/// queued on the killed workers' listeners move there when the listeners close, and the ones
/// arriving meanwhile wait there. The restarted sockvisor replaces the program once its
/// first worker is ready ("took over steering") and moves the waiting connections to its
/// workers. (Requests a killed worker had already accepted die with it, as with any policy;
/// the client loop is sequential with 5 ms pauses, so it rarely has one in flight: counted as
/// `other_errors` and printed, not asserted.)
fn scenario_sigkill_main(flavour: Flavour) {
    let Some(_lock) = start("scenario_sigkill_main", flavour) else {
        return;
    };
    let f = Fleet::new("sigkill", flavour);
    let main = f.activate();
    assert_eq!(
        listener_policy(&f.status(), "web"),
        ("reuseport".to_string(), None),
        "the default dispatch under the shipped unit"
    );
    let old = f.workers();
    let client = ClientLoop::start(f.net());
    client.wait_for_answers(10);
    let killed = Instant::now();
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
    let new = f.workers();
    client.wait_for_answer_from(&new);
    let back = killed.elapsed();
    client.wait_for_answers(20);
    let stats = client.finish();
    eprintln!(
        "[e2e] {}: client loop across the SIGKILL (answers from the new workers {:.2} s after \
         the kill): {stats:?}",
        f.test,
        back.as_secs_f64()
    );
    assert_eq!(
        (stats.refused, stats.reset),
        (0, 0),
        "connections refused or reset after SIGKILL: {stats:?}"
    );
    let journal = f.sb.journal("myapp.service");
    assert!(
        journal.contains("web: took over steering from the previous instance"),
        "the restarted sockvisor did not replace the program: {journal}"
    );
    for line in journal
        .lines()
        .filter(|l| l.contains("steer") || l.contains("reuseport"))
    {
        eprintln!("[e2e] {}: {line}", f.test);
    }
    assert_eq!(
        listener_policy(&f.status(), "web").0,
        "reuseport",
        "after the restart"
    );
    assert!(
        stats.pids.is_subset(&old.union(&new).copied().collect()),
        "answers from strangers: {stats:?}"
    );
    for pid in old {
        assert!(!f.sb.alive(pid), "old worker {pid} outlived its sockvisor");
    }
    f.done();
}

// ------------------------------------------------------------------ the kernel-steered dispatch

/// A listener's policy in a `sockvisor status --json` answer, and the note saying why it is
/// not the one asked for.
fn listener_policy(status: &serde_json::Value, name: &str) -> (String, Option<String>) {
    let l = status["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name:?}: {status}"));
    (
        l["policy"].as_str().unwrap_or_default().to_string(),
        l["policy_note"].as_str().map(str::to_string),
    )
}

/// Exact round robin: the answers cycle through all `workers` in one fixed order.
fn assert_round_robin(pids: &[u32], workers: &BTreeSet<u32>) {
    let n = workers.len();
    let seen: BTreeSet<u32> = pids.iter().copied().collect();
    assert_eq!(
        &seen, workers,
        "answers not from exactly the workers: {pids:?}"
    );
    for (i, pid) in pids.iter().enumerate().skip(n) {
        assert_eq!(*pid, pids[i - n], "not round robin at answer {i}: {pids:?}");
    }
}

/// `flows` UDP sockets (one source port each) send `per_flow` datagrams each to the units'
/// port; per flow, the pids of the workers that echoed it.
fn udp_flows(flows: usize, per_flow: usize) -> Vec<BTreeSet<u32>> {
    let socks: Vec<UdpSocket> = (0..flows)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_read_timeout(Some(Duration::from_secs(3)))
                .expect("timeout");
            s
        })
        .collect();
    let mut buf = [0u8; 2048];
    socks
        .iter()
        .map(|s| {
            (0..per_flow)
                .map(|i| {
                    let payload = format!("flow datagram {i}");
                    s.send_to(payload.as_bytes(), ("127.0.0.1", PORT))
                        .expect("send");
                    let n = s.recv(&mut buf).expect("an echo within 3 s");
                    body_pid(&text(&buf[..n]))
                        .unwrap_or_else(|| panic!("no pid in {:?}", text(&buf[..n])))
                })
                .collect()
        })
        .collect()
}

/// Issue 13 item 5 under the real systemd: the shipped socket units (`ListenStream=8000`:
/// `[::]:8000` dual-stack, bound by systemd as root) and the shipped service (root, CAP_BPF)
/// with 4 hello workers and the default dispatch.
/// - The connection that activates the service waits on systemd's socket while sockvisor and
///   its workers start, and is answered (one connect, no retry).
/// - Then exact round robin: 40 sequential connections, alternately over IPv4 (127.0.0.1,
///   v4-mapped on the `[::]` socket) and IPv6 (::1), cycle through the 4 workers in one order.
/// - `sockvisor status`: policy `reuseport` with no fallback note; the workers' `dispatched`
///   counters (the program's) add up to the 41 connections.
///
/// `reuseport_yes = false`: myapp.socket as shipped, without `ReusePort=yes`: sockvisor sets
/// SO_REUSEPORT on systemd's listening socket itself, and the socket joins its workers'
/// group when the first worker listener listens. The UDP socket (myapp-dns.socket ships
/// `ReusePort=yes`) is steered by flow: 64 client ports, each on one worker, all 4 used.
///
/// `reuseport_yes = true`: a drop-in `ReusePort=yes` on myapp.socket, and `ReusePort=no` on
/// myapp-dns.socket: the same results. sockvisor sets SO_REUSEPORT on the UDP socket too, and
/// the first worker socket bound beside it makes a group of both.
fn reuseport_scenario(test: &str, flavour: Flavour, reuseport_yes: bool) {
    let Some(_lock) = start(test, flavour) else {
        return;
    };
    let setup = Setup {
        stock_sockets: true,
        socket_dropins: if reuseport_yes {
            vec![
                ("myapp.socket", "[Socket]\nReusePort=yes\n"),
                ("myapp-dns.socket", "[Socket]\nReusePort=no\n"),
            ]
        } else {
            Vec::new()
        },
        workers: Some(4),
        ..Setup::default()
    };
    let f = Fleet::build(
        if reuseport_yes { "rpyes" } else { "rpstock" },
        flavour,
        &setup,
    );
    let sockets = f.sb.show("myapp.socket", "Listen,ReusePort,SubState");
    eprintln!("[e2e] {}: myapp.socket: {sockets:?}", f.test);
    assert_eq!(
        sockets["ReusePort"],
        if reuseport_yes { "yes" } else { "no" }
    );
    assert_eq!(f.sb.prop("myapp.service", "ActiveState"), "inactive");

    // the activating connection: one connect, answered once the fleet serves
    let t = Instant::now();
    let first = f
        .net()
        .run(|| http_get_from(V4, Duration::from_secs(30)))
        .expect("the connection that activated the service was not answered");
    let took = t.elapsed();
    let main = f.wait_active_workers(4);
    let workers = f.sb.children(main);
    let first_pid = body_pid(&first).unwrap_or_else(|| panic!("no pid in {first:?}"));
    assert!(
        workers.contains(&first_pid),
        "{first:?} not from {workers:?}"
    );
    eprintln!(
        "[e2e] {}: the activating connection answered after {:.2} s by worker pid {first_pid}",
        f.test,
        took.as_secs_f64()
    );

    // exact round robin, both address families
    let pids: Vec<u32> = f.net().run(|| {
        (0..40)
            .map(|i| {
                let addr = if i % 2 == 0 { V4 } else { V6 };
                let body = http_get_from(addr, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("GET {addr}: {e}"));
                body_pid(&body).unwrap_or_else(|| panic!("no pid in {body:?}"))
            })
            .collect()
    });
    eprintln!("[e2e] {}: 40 connections answered by {pids:?}", f.test);
    assert_round_robin(&pids, &workers);

    // what sockvisor says
    let v = f.status();
    assert_eq!(
        listener_policy(&v, "web"),
        ("reuseport".to_string(), None),
        "{v}"
    );
    let dispatched: u64 = v["workers"]
        .as_array()
        .expect("workers")
        .iter()
        .map(|w| w["dispatched"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(dispatched, 41, "the program's counters: {v}");
    let journal = f.sb.journal("myapp.service");
    assert!(
        journal.contains("(web, reuseport, from systemd)"),
        "{journal}"
    );
    assert!(!journal.contains("web: dispatch shared"), "{journal}");
    let table = f.sb.exec(&[
        "sockvisor",
        "status",
        "--control",
        "/run/myapp/control.sock",
    ]);
    eprintln!("[e2e] {}: sockvisor status:\n{table}", f.test);

    // UDP (bound with SO_REUSEPORT or not: the same)
    let (policy, note) = listener_policy(&v, "dns");
    assert_eq!((policy.as_str(), note), ("reuseport", None), "{v}");
    let flows = f.net().run(|| udp_flows(64, 3));
    let split = flows.iter().filter(|p| p.len() != 1).count();
    let used: BTreeSet<u32> = flows.iter().flatten().copied().collect();
    eprintln!(
        "[e2e] {}: UDP: 64 flows x 3 datagrams: {split} flows on more than one worker, \
             workers used {used:?}",
        f.test
    );
    assert_eq!(split, 0, "a flow moved between workers: {flows:?}");
    assert_eq!(used, workers, "flows not spread over every worker");
    f.done();
}

fn scenario_reuseport_stock_socket(flavour: Flavour) {
    reuseport_scenario("scenario_reuseport_stock_socket", flavour, false);
}

fn scenario_reuseport_socket_reuseport_yes(flavour: Flavour) {
    reuseport_scenario("scenario_reuseport_socket_reuseport_yes", flavour, true);
}

/// A service running as another user than the socket's (`User=nobody`; systemd creates its
/// sockets as root): the kernel lets only one user's sockets into a SO_REUSEPORT group, so
/// both listeners fall back to `shared`; the journal and `sockvisor status` name both uids
/// and the fix; the fleet serves.
fn scenario_reuseport_other_uid(flavour: Flavour) {
    let Some(_lock) = start("scenario_reuseport_other_uid", flavour) else {
        return;
    };
    let f = Fleet::new("rpuid", flavour);
    f.dropin("user.conf", "[Service]\nUser=nobody\n");
    f.sb.exec(&["systemctl", "daemon-reload"]);
    let main = f.activate();
    let uid =
        f.sb.sh(&format!("awk '/^Uid:/{{print $2}}' /proc/{main}/status"));
    assert_eq!(uid.trim(), "65534", "sockvisor's uid");
    let v = f.status_by(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    for name in ["web", "dns"] {
        let (policy, note) = listener_policy(&v, name);
        assert_eq!(policy, "shared", "{name}: {v}");
        let note = note.unwrap_or_default();
        assert!(
            note.contains("sockvisor runs as uid 65534 but the socket was bound by uid 0"),
            "{name}: {note}"
        );
        assert!(
            note.contains("no User= in the service unit"),
            "{name}: {note}"
        );
    }
    let journal = f.sb.journal("myapp.service");
    let line = journal
        .lines()
        .find(|l| l.contains("web: dispatch shared, not reuseport: "))
        .unwrap_or_else(|| panic!("no fallback line: {journal}"));
    eprintln!("[e2e] {}: {line}", f.test);
    let pids: BTreeSet<u32> = f.net().run(|| {
        (0..20)
            .map(|_| body_pid(&http_get().expect("GET")).expect("pid"))
            .collect()
    });
    assert!(pids.is_subset(&f.workers()), "{pids:?}");
    f.net().assert_udp_echo(b"uid-udp");
    f.done();
}

/// A container as systemd-nspawn makes it by default: no CAP_BPF in its capability set, and a
/// seccomp filter that refuses bpf(2) to every process its systemd starts. The shipped unit
/// cannot load the program there: sockvisor serves with `shared` and says why, naming
/// CAP_BPF, in the journal and in `sockvisor status`. (The fix is the container's:
/// `--capability=CAP_BPF --system-call-filter=bpf`, what the other scenarios boot with.)
fn scenario_reuseport_in_a_default_container(flavour: Flavour) {
    let Some(_lock) = start("scenario_reuseport_in_a_default_container", flavour) else {
        return;
    };
    let f = Fleet::build(
        "rpnobpf",
        flavour,
        &Setup {
            bpf: false,
            ..Setup::default()
        },
    );
    let caps = f.sb.sh("awk '/^CapBnd:/{print $2}' /proc/1/status");
    f.activate();
    let (policy, note) = listener_policy(&f.status(), "web");
    let note = note.unwrap_or_default();
    eprintln!(
        "[e2e] {}: container bounding set {}; web: {policy}, {note}",
        f.test,
        caps.trim()
    );
    assert_eq!(policy, "shared");
    assert!(
        note.contains("bpf map create: Operation not permitted") && note.contains("CAP_BPF"),
        "{note}"
    );
    let journal = f.sb.journal("myapp.service");
    assert!(
        journal.contains("web: dispatch shared, not reuseport: bpf map create"),
        "{journal}"
    );
    assert!(f.net().retry_get(Duration::from_secs(5)).contains("hello"));
    f.done();
}

/// Removing and purging the package leaves nothing of it, and the user's sockets untouched.
fn scenario_purge_keeps_user_sockets(flavour: Flavour) {
    let Some(_lock) = start("scenario_purge_keeps_user_sockets", flavour) else {
        return;
    };
    let f = Fleet::new("purge", flavour);
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
    assert!(f
        .net()
        .retry_get(Duration::from_secs(5))
        .contains("hello from worker"));
    f.done();
}

/// The packaged template: a user's own socket units with `Service=sockvisor@demo.service` and
/// /etc/sockvisor/demo.toml; the control socket in /run/sockvisor/demo; `sockvisor scale`;
/// `sockvisor status` shows the fleet that is there.
fn scenario_template_instance(flavour: Flavour) {
    let Some(_lock) = start("scenario_template_instance", flavour) else {
        return;
    };
    let (deb, hello) = (deb(), hello());
    let sb = Sandbox::up("template", flavour);
    sb.install_deb(&deb);
    sb.push(&hello, "/usr/local/bin/hello");
    sb.write("/etc/sockvisor/demo.toml", &sockvisor_config(HELLO, 2, ""));
    for (unit, listen, name) in [
        ("demo-web.socket", "ListenStream", "web"),
        ("demo-dns.socket", "ListenDatagram", "dns"),
    ] {
        sb.write(
            &format!("/etc/systemd/system/{unit}"),
            &format!(
                "[Socket]\n{listen}=127.0.0.1:{PORT}\nFileDescriptorName={name}\n\
                 Service=sockvisor@demo.service\n"
            ),
        );
    }
    sb.exec(&["systemctl", "daemon-reload"]);
    sb.exec(&["systemctl", "start", "demo-web.socket", "demo-dns.socket"]);
    assert!(sb
        .net
        .retry_get(Duration::from_secs(20))
        .contains("hello from worker"));
    sb.net.assert_udp_echo(b"tmpl");
    let unit = "sockvisor@demo.service";
    assert_eq!(sb.prop(unit, "ActiveState"), "active");
    sb.exec(&["test", "-S", "/run/sockvisor/demo/control.sock"]);
    let ctl = ["--control", "/run/sockvisor/demo/control.sock"];
    sb.exec(&[&["sockvisor", "scale", "3"][..], &ctl[..]].concat());
    let main: u32 = sb.prop(unit, "MainPID").parse().unwrap_or(0);
    let mut workers = BTreeSet::new();
    wait_until(
        "3 ready workers after `sockvisor scale 3`",
        Duration::from_secs(20),
        || {
            workers = sb.children(main);
            workers.len() == 3 && sb.prop(unit, "StatusText").starts_with("3/3 workers ready")
        },
    );
    // the human table: the header names sockvisor's pid and the summary, a row per worker
    let status = sb.exec(&[&["sockvisor", "status"][..], &ctl[..]].concat());
    eprintln!(
        "[e2e] {}::template: sockvisor status:\n{status}",
        flavour.name()
    );
    let header = status.lines().next().unwrap_or_default();
    assert!(
        header.starts_with(&format!(
            "sockvisor running (pid {main}, generation 1): 3/3 workers ready"
        )),
        "{status}"
    );
    let rows: BTreeSet<u32> = status
        .lines()
        .filter(|l| l.split_whitespace().nth(3) == Some("ready"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(rows, workers, "worker rows of `sockvisor status`: {status}");
    for listener in ["web", "dns"] {
        assert!(
            status
                .lines()
                .any(|l| l.starts_with(listener) && l.contains(&format!("127.0.0.1:{PORT}"))),
            "no {listener} row: {status}"
        );
    }
    // ExecReload= of the template: `systemctl reload` waits for the new generation
    sb.exec(&["systemctl", "reload", unit]);
    let status = sb.exec(&[&["sockvisor", "status"][..], &ctl[..]].concat());
    assert!(
        status.starts_with(&format!("sockvisor running (pid {main}, generation 2)")),
        "{status}"
    );
    // Issue 15: a shell finds the fleet by its unit, without --control.
    for name in ["demo", unit] {
        let by_name = sb.exec(&["sockvisor", "status", name]);
        assert!(
            by_name.starts_with(&format!("sockvisor running (pid {main}, generation 2)")),
            "sockvisor status {name}: {by_name}"
        );
    }
    let metrics = sb.exec(&["sockvisor", "metrics", "demo"]);
    assert!(metrics.contains("\nsockvisor_generation 2\n"), "{metrics}");
    sb.exec(&["systemctl", "stop", unit]);
    sb.exec(&["test", "!", "-e", "/run/sockvisor/demo"]);
}

// ------------------------------------------------------------------ the harness's own helpers

/// `try_run` on timeout kills the whole process group it started, not only its direct child:
/// here a background `sleep` of the bash it runs (as nsenter, cargo or systemd-nspawn would
/// be). Needs nothing special: runs everywhere.
#[test]
fn run_timeout_kills_the_whole_process_group() {
    let dir = std::env::temp_dir().join(format!("sv-e2e-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let pidfile = dir.join("grandchild.pid");
    let script = format!("sleep 300 & echo $! >{}; wait", pidfile.display());
    let err = try_run(
        Command::new("bash").args(["-c", &script]),
        Duration::from_millis(500),
    )
    .expect_err("the command outlived its timeout");
    assert!(err.contains("timed out"), "{err}");
    let pid = std::fs::read_to_string(&pidfile).expect("pid file");
    let _ = std::fs::remove_dir_all(&dir);
    let stat = format!("/proc/{}/stat", pid.trim());
    // gone, or a zombie waiting for its new parent to reap it
    let dead = || {
        std::fs::read_to_string(&stat)
            .map(|s| s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
            .unwrap_or(true)
    };
    wait_until("the grandchild to die", Duration::from_secs(5), dead);
}

// ------------------------------------------------------------------ which scenario runs where

/// `flavour_tests!(module, Flavour, [scenario, ...])`: a `#[test]` per scenario, named
/// `module::scenario`, calling the scenario with that flavour.
macro_rules! flavour_tests {
    ($module:ident, $flavour:ident, [$($test:ident),* $(,)?]) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    super::$test(super::Flavour::$flavour)
                }
            )*
        }
    };
}

flavour_tests!(
    debian12,
    Debian12,
    [
        image_builds,
        harness_self_test,
        scenario_package_checks,
        scenario_socket_activation,
        scenario_reload_under_load,
        scenario_workers_dropin,
        scenario_fleet_watchdog,
        scenario_fleet_watchdog_no_trigger,
        scenario_restart_under_load,
        scenario_notifications,
        scenario_broken_config,
        scenario_stop_leaves_nothing,
        scenario_sigkill_main,
        scenario_reuseport_stock_socket,
        scenario_reuseport_socket_reuseport_yes,
        scenario_reuseport_other_uid,
        scenario_reuseport_in_a_default_container,
        scenario_purge_keeps_user_sockets,
        scenario_template_instance,
    ]
);

// systemd 257: what a newer manager may do differently (notify-reload, the watchdog,
// notifications, socket passing and the kernel-steered dispatch on its sockets, restarts and
// crashes) and the package on Debian 13.
flavour_tests!(
    debian13,
    Debian13,
    [
        image_builds,
        harness_self_test,
        scenario_package_checks,
        scenario_socket_activation,
        scenario_reload_under_load,
        scenario_notify_reload,
        scenario_fleet_watchdog,
        scenario_fleet_watchdog_no_trigger,
        scenario_restart_under_load,
        scenario_notifications,
        scenario_sigkill_main,
        scenario_reuseport_stock_socket,
        scenario_reuseport_socket_reuseport_yes,
        scenario_reuseport_other_uid,
        scenario_reuseport_in_a_default_container,
        scenario_purge_keeps_user_sockets,
        scenario_template_instance,
    ]
);
