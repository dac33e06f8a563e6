//! Shared helpers for the integration tests: the real `sockvisor` binary in its own process
//! group (killed as a group when the test ends, pass or fail), a NOTIFY_SOCKET the test
//! listens on, the ports sockvisor bound (it binds port 0 and logs what it got), sockets
//! handed to it as systemd would, small TCP/UDP clients, and the prerequisite rule
//! (`prereq.rs`).
//!
//! Every wait here is bounded by a safety timeout and returns at once, with sockvisor's exit
//! status and the tail of its log, when sockvisor is gone.
#![allow(dead_code)]

mod load;
mod prereq;
#[allow(unused_imports)]
pub use load::*;
#[allow(unused_imports)]
pub use prereq::*;

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The safety timeout of the waits here: how long a test waits for something that must
/// happen before it fails (a slow machine makes it wait longer, never fail sooner).
pub const SAFETY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn sockvisor_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sockvisor"))
}

/// `target/<profile>/examples/<name>`: cargo test builds the examples.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let p = profile_dir.join("examples").join(name);
    assert!(
        p.exists(),
        "{} not built: run `cargo build --examples` first (scripts/test.sh does)",
        p.display()
    );
    p
}

pub fn hello_bin() -> PathBuf {
    example_bin("hello")
}

/// `--workers N --listen tcp://127.0.0.1:PORT -- hello`.
/// `hello` workers on one listener `web` on a port the kernel picks (`Fleet::port("web")`).
pub fn hello_args(workers: usize) -> Vec<String> {
    vec![
        "--workers".to_string(),
        workers.to_string(),
        "--listen".into(),
        "web=tcp://127.0.0.1:0".into(),
        "--".into(),
        hello_bin().display().to_string(),
    ]
}

pub fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

pub fn probe_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/probe.py")
}

/// The process a [`NotifySocket`] or a wait is about: while it waits, a test checks that
/// this process still runs, and fails at once with its exit status and the tail of its log
/// when it is gone (instead of waiting out its whole timeout).
#[derive(Clone, Default)]
pub struct Watch(Arc<Mutex<Option<Watched>>>);

struct Watched {
    pid: i32,
    log_path: PathBuf,
    /// Set once the test reaped it (`Fleet::wait`).
    status: Option<ExitStatus>,
}

impl Watch {
    fn set(&self, pid: i32, log_path: PathBuf) {
        *self.0.lock().unwrap() = Some(Watched {
            pid,
            log_path,
            status: None,
        });
    }

    fn reaped(&self, status: ExitStatus) {
        if let Some(w) = self.0.lock().unwrap().as_mut() {
            w.status = Some(status);
        }
    }

    /// `Some(how it ended)` once the watched process has exited (without reaping it).
    pub fn gone(&self) -> Option<String> {
        let guard = self.0.lock().unwrap();
        let w = guard.as_ref()?;
        if let Some(s) = w.status {
            return Some(s.to_string());
        }
        exit_status_without_reaping(w.pid)
    }

    /// Panic with how the process ended and its log tail if it is gone.
    pub fn fail_if_gone(&self, waiting_for: &str) {
        if let Some(how) = self.gone() {
            let (pid, log) = {
                let guard = self.0.lock().unwrap();
                let w = guard.as_ref().unwrap();
                (
                    w.pid,
                    std::fs::read_to_string(&w.log_path).unwrap_or_default(),
                )
            };
            panic!(
                "sockvisor (pid {pid}) is gone ({how}) while waiting for {waiting_for}; its log ends:\n{}",
                log_tail(&log, 40)
            );
        }
    }
}

/// How `pid` (a child of this process) ended, if it did; leaves it waitable (WNOWAIT), so the
/// [`Fleet`] that owns it still reaps it.
fn exit_status_without_reaping(pid: i32) -> Option<String> {
    // SAFETY: waitid(2) with WNOHANG|WNOWAIT on our own child only reads its state into a
    // zeroed siginfo_t we own.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        // ECHILD: reaped already (by Fleet::wait, which records the status) or not ours.
        return (!alive(pid)).then(|| "exited".to_string());
    }
    // SAFETY: waitid filled in a SIGCHLD siginfo_t (or left si_pid 0: still running).
    let (child, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if child == 0 {
        return None;
    }
    Some(match code {
        libc::CLD_EXITED => format!("exit status: {status}"),
        _ => format!("killed by signal {status}"),
    })
}

/// sockvisor's log lines at warning or error level (`sockvisor: warn  ...`,
/// `sockvisor: error ...`; the level is written in lower case).
pub fn warnings_and_errors(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.starts_with("sockvisor: warn ") || l.starts_with("sockvisor: error "))
        .collect()
}

/// The last `n` lines of `log`.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A unix datagram socket standing in for systemd's notify socket. A thread drains it as
/// systemd would (so sockvisor never finds it full) and keeps every datagram.
pub struct NotifySocket {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    received: Arc<(Mutex<Vec<String>>, Condvar)>,
    /// Counts the reader's reads that found the socket empty: once it moves after sockvisor
    /// exited, everything sockvisor sent has been read.
    empty_reads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    /// The sockvisor that sends here (set by `FleetBuilder::notify` + `start`).
    watch: Watch,
    /// A snapshot of what was received, refreshed by every `wait_for*`.
    pub seen: Vec<String>,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let received = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let empty_reads = Arc::new(AtomicU64::new(0));
        let (r, st, empty) = (received.clone(), stop.clone(), empty_reads.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(Ordering::Relaxed) {
                let (lock, cv) = &*r;
                match sock.recv(&mut buf) {
                    Ok(n) => lock
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                    Err(_) => {
                        empty.fetch_add(1, Ordering::SeqCst);
                    }
                }
                cv.notify_all();
            }
        });
        NotifySocket {
            path,
            _dir: dir,
            received,
            empty_reads,
            stop,
            watch: Watch::default(),
            seen: Vec::new(),
        }
    }

    /// Wait for a datagram (from index `from` on) with a line starting with `needle`. `None`
    /// after `timeout`; a panic, with sockvisor's exit status and log tail, when sockvisor
    /// is gone and did not send it.
    pub fn wait_from(&mut self, from: usize, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.received;
        let mut all = lock.lock().unwrap();
        // Empty reads counted after sockvisor was seen gone.
        let mut gone_at: Option<u64> = None;
        loop {
            if let Some(m) = all[from.min(all.len())..]
                .iter()
                .find(|m| m.lines().any(|l| l.starts_with(needle)))
            {
                let m = m.clone();
                self.seen = all.clone();
                return Some(m);
            }
            match gone_at {
                // Gone, and the socket was found empty since: it will not come.
                Some(mark) if self.empty_reads.load(Ordering::SeqCst) > mark => {
                    self.seen = all.clone();
                    drop(all);
                    self.watch
                        .fail_if_gone(&format!("{needle:?} on the notify socket"));
                    unreachable!("gone");
                }
                Some(_) => {}
                None => {
                    if self.watch.gone().is_some() {
                        gone_at = Some(self.empty_reads.load(Ordering::SeqCst));
                    }
                }
            }
            let left = deadline.checked_duration_since(Instant::now());
            let Some(left) = left else {
                self.seen = all.clone();
                return None;
            };
            all = cv
                .wait_timeout(all, left.min(Duration::from_millis(20)))
                .unwrap()
                .0;
        }
    }

    /// Wait for a datagram with a line starting with `needle`, up to `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_from(0, needle, timeout)
    }

    /// Like `wait_for`, but only datagrams that arrive from now on count.
    pub fn wait_for_new(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let from = self.received.0.lock().unwrap().len();
        self.wait_from(from, needle, timeout)
    }

    /// Every datagram received so far.
    pub fn all(&mut self) -> Vec<String> {
        self.seen = self.received.0.lock().unwrap().clone();
        self.seen.clone()
    }

    /// Every datagram sockvisor sent, once it is gone: waits until the reader found the socket
    /// empty after sockvisor exited (call after `Fleet::wait`).
    pub fn drained(&mut self) -> Vec<String> {
        let mark = self.empty_reads.load(Ordering::SeqCst);
        let deadline = Instant::now() + SAFETY_TIMEOUT;
        while self.empty_reads.load(Ordering::SeqCst) <= mark {
            assert!(
                Instant::now() < deadline,
                "the notify socket reader is stuck"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.all()
    }

    /// Index of the first datagram with a line equal to or starting with `line`.
    pub fn position(&mut self, line: &str) -> Option<usize> {
        self.all()
            .iter()
            .position(|m| m.lines().any(|l| l.starts_with(line)))
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A running `sockvisor` (or any command) in its own process group.
pub struct Fleet {
    pub child: Child,
    /// The control socket this fleet was given (in its private temp dir).
    pub control: PathBuf,
    pub log_path: PathBuf,
    _log_dir: tempfile::TempDir,
    watch: Watch,
    status: Option<ExitStatus>,
}

type PreExec = Box<dyn FnMut() -> std::io::Result<()> + Send + Sync>;

pub struct FleetBuilder {
    program: OsString,
    args: Vec<OsString>,
    envs: Vec<(OsString, Option<OsString>)>,
    cwd: Option<PathBuf>,
    no_inherited_fds: bool,
    /// Sockets handed over as systemd does: fd 3.. with LISTEN_FDS, LISTEN_FDNAMES and
    /// LISTEN_PID.
    passed: Vec<(OwnedFd, String)>,
    pre_exec: Vec<PreExec>,
    watches: Vec<Watch>,
}

impl FleetBuilder {
    /// `sockvisor ARGS`, with systemd's variables removed from the environment.
    pub fn new<I, S>(args: I) -> FleetBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::program(sockvisor_bin(), args)
    }

    pub fn program<I, S>(program: impl AsRef<OsStr>, args: I) -> FleetBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut envs: Vec<(OsString, Option<OsString>)> = [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "RUNTIME_DIRECTORY",
        ]
        .iter()
        .map(|k| (OsString::from(k), None))
        .collect();
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SOCKVISOR_") {
                envs.push((k, None));
            }
        }
        envs.push(("SOCKVISOR_LOG".into(), Some("debug".into())));
        FleetBuilder {
            program: program.as_ref().to_owned(),
            args: args.into_iter().map(|a| a.as_ref().to_owned()).collect(),
            envs,
            cwd: None,
            no_inherited_fds: false,
            passed: Vec::new(),
            pre_exec: Vec::new(),
            watches: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: impl AsRef<OsStr>) -> Self {
        self.envs.push((k.into(), Some(v.as_ref().to_owned())));
        self
    }

    pub fn env_remove(mut self, k: &str) -> Self {
        self.envs.push((k.into(), None));
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Start with only fds 0-2 (and the passed sockets): what systemd gives a service,
    /// whatever the test runner leaked.
    pub fn no_inherited_fds(mut self) -> Self {
        self.no_inherited_fds = true;
        self
    }

    /// Hand `socket` over as systemd does, under `name` (repeatable: fd 3, 4, ... in order).
    /// The program is then started through `sh -c 'LISTEN_PID=$$ ...; exec ...'`, so that
    /// LISTEN_PID is its own pid, and inherits no other fd above 2.
    pub fn pass(mut self, socket: impl Into<OwnedFd>, name: &str) -> Self {
        self.passed.push((socket.into(), name.to_string()));
        self.no_inherited_fds = true;
        self
    }

    /// Lower RLIMIT_NOFILE (soft and hard) to `n` before exec.
    pub fn fd_limit(mut self, n: u64) -> Self {
        self.pre_exec.push(Box::new(move || {
            let lim = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            // SAFETY: setrlimit(2) with a valid struct; async-signal-safe.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        }));
        self
    }

    /// Run `f` in the child between fork and exec (after the fds are in place).
    ///
    /// # Safety
    /// `f` must only make async-signal-safe calls (no allocation, no locks).
    pub unsafe fn pre_exec(
        mut self,
        f: impl FnMut() -> std::io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.pre_exec.push(Box::new(f));
        self
    }

    pub fn notify(mut self, n: &NotifySocket) -> Self {
        self.watches.push(n.watch.clone());
        self.env("NOTIFY_SOCKET", &n.path)
    }

    pub fn start(self) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stderr.log");
        let control = dir.path().join("control.sock");
        let mut cmd = if self.passed.is_empty() {
            let mut c = Command::new(&self.program);
            c.args(&self.args);
            c
        } else {
            // LISTEN_PID must be the program's own pid: sh knows it ($$) and exec keeps it.
            let mut c = Command::new("/bin/sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$@\"")
                .arg("sh")
                .arg(&self.program)
                .args(&self.args);
            c
        };
        for (k, v) in &self.envs {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if !self.passed.is_empty() {
            let names: Vec<&str> = self.passed.iter().map(|(_, n)| n.as_str()).collect();
            cmd.env("LISTEN_FDS", self.passed.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"))
                .env_remove("LISTEN_PID");
        }
        if !self
            .envs
            .iter()
            .any(|(k, _)| k == "SOCKVISOR_CONTROL_SOCKET")
        {
            cmd.env("SOCKVISOR_CONTROL_SOCKET", &control);
        }
        if let Some(d) = &self.cwd {
            cmd.current_dir(d);
        }
        let log = std::fs::File::create(&log_path).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let no_inherited = self.no_inherited_fds;
        let sources: Vec<i32> = self.passed.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        let mut moved = vec![-1i32; sources.len()];
        // SAFETY: only async-signal-safe syscalls (close_range, fcntl, dup2) on fds that are
        // open in the parent; `moved` was allocated before fork.
        unsafe {
            cmd.pre_exec(move || {
                if no_inherited {
                    // Every fd above 2 close-on-exec: only what is placed below survives.
                    libc::syscall(
                        libc::SYS_close_range,
                        3u32,
                        u32::MAX,
                        libc::CLOSE_RANGE_CLOEXEC,
                    );
                }
                // Out of the way first (a source may sit where another one goes), then to
                // 3.. (dup2 clears close-on-exec on the copy).
                let above = 3 + sources.len() as i32;
                for (i, &fd) in sources.iter().enumerate() {
                    moved[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above);
                    if moved[i] < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &fd) in moved.iter().enumerate() {
                    if libc::dup2(fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        for f in self.pre_exec {
            // SAFETY: the caller of `FleetBuilder::pre_exec` promised async-signal safety.
            unsafe { cmd.pre_exec(f) };
        }
        let child = cmd.spawn().expect("spawn");
        // The child has its copies; ours close now.
        drop(self.passed);
        let watch = Watch::default();
        watch.set(child.id() as i32, log_path.clone());
        for w in &self.watches {
            w.set(child.id() as i32, log_path.clone());
        }
        Fleet {
            child,
            control,
            log_path,
            _log_dir: dir,
            watch,
            status: None,
        }
    }
}

impl Fleet {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// How sockvisor ended, once it has (`None` while it runs).
    pub fn gone(&self) -> Option<String> {
        self.watch.gone()
    }

    /// Poll `f` until it gives a value. Fails after `timeout` (a safety timeout), or at once
    /// with sockvisor's exit status and log tail when sockvisor is gone.
    pub fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = f() {
                return v;
            }
            self.watch.fail_if_gone(what);
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; the log ends:\n{}",
                log_tail(&self.log(), 60)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait until the log contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        self.wait_until(&format!("{needle:?} in the log"), timeout, || {
            self.log().contains(needle).then_some(())
        })
    }

    /// Wait until the log contains `needle`; `Err(log)` if the program exits without it
    /// (for programs that may fail to start, like systemd-socket-activate on a taken port).
    pub fn try_wait_log(&self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains(needle) {
                return Ok(());
            }
            if let Some(how) = self.gone() {
                return Err(format!("{how}: {log}"));
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log: {log}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every address listener `name` listens on, from sockvisor's `listening on ADDRESS
    /// (NAME, ...)` lines (sockvisor binds port 0 and logs the port it got); waits for them.
    pub fn addrs(&self, name: &str) -> Vec<SocketAddr> {
        let tag = format!(" ({name}, ");
        self.wait_until(
            &format!("listener {name}'s \"listening on\" line"),
            SAFETY_TIMEOUT,
            || {
                let found: Vec<SocketAddr> = self
                    .log()
                    .lines()
                    .filter(|l| l.contains(&tag))
                    .filter_map(|l| l.split_once("listening on ")?.1.split_once(&tag))
                    .map(|(addr, _)| {
                        addr.parse()
                            .unwrap_or_else(|e| panic!("listener {name}: address {addr:?}: {e}"))
                    })
                    .collect();
                (!found.is_empty()).then_some(found)
            },
        )
    }

    /// The address listener `name` listens on (see `addrs`).
    pub fn addr(&self, name: &str) -> SocketAddr {
        let all = self.addrs(name);
        assert_eq!(all.len(), 1, "listener {name} has one address: {all:?}");
        all[0]
    }

    /// The port listener `name` listens on (see `addrs`).
    pub fn port(&self, name: &str) -> u16 {
        self.addr(name).port()
    }

    /// Run `sockvisor ARGS --control <this fleet's socket>`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(sockvisor_bin());
        cmd.args(args).arg("--control").arg(&self.control);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("SOCKVISOR_") {
                cmd.env_remove(k);
            }
        }
        cmd.output().unwrap()
    }

    /// `sockvisor status --json`.
    pub fn status(&self) -> serde_json::Value {
        self.try_status("sockvisor status")
            .unwrap_or_else(|e| panic!("sockvisor status: {e}"))
    }

    /// `sockvisor status --json`, or what `status` said on stderr if it got no answer; fails
    /// with the log if sockvisor is gone (`waiting_for` names the wait).
    fn try_status(&self, waiting_for: &str) -> Result<serde_json::Value, String> {
        let out = self.ctl(&["status", "--json"]);
        if !out.status.success() {
            self.watch.fail_if_gone(waiting_for);
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    }

    /// Wait until `n` workers are ready (others may be starting or stopping).
    pub fn wait_ready_count(&self, what: &str, n: usize) -> serde_json::Value {
        self.wait_status(what, |s| {
            s["workers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["state"] == "ready")
                .count()
                == n
        })
    }

    /// Wait until `sockvisor status --json` satisfies `pred`; returns that status.
    pub fn wait_status(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_until(what, SAFETY_TIMEOUT, || {
            // Not answering yet (a fleet just started may not have made its control socket):
            // wait; gone: fail with its log.
            let s = self.try_status(what).ok()?;
            pred(&s).then_some(s)
        })
    }

    /// Wait for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                self.status = Some(s);
                self.watch.reaped(s);
                return self.status;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        // Every worker leads a process group of its own (with what it forked): those groups
        // first, while they are still sockvisor's children, then sockvisor's group (workers
        // forked meanwhile die with sockvisor, by their parent-death signal).
        for worker in children(self.pid()) {
            // SAFETY: killpg(2) on the group of a live child of our child.
            unsafe { libc::killpg(worker, libc::SIGKILL) };
        }
        // SAFETY: killpg(2) on the group this test created for its child.
        unsafe { libc::killpg(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sockvisor log ---\n{}\n--- end ---", self.log());
        }
    }
}

/// Send one datagram to a notify socket given as `NOTIFY_SOCKET` gives it: a path, or
/// `@name` for the abstract namespace.
pub fn send_notification(notify_socket: &str, msg: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let sock = UnixDatagram::unbound()?;
    match notify_socket.strip_prefix('@') {
        Some(name) => sock.send_to_addr(
            msg,
            &std::os::unix::net::SocketAddr::from_abstract_name(name)?,
        ),
        None => sock.send_to(msg, notify_socket),
    }
}

/// A loopback TCP listener on a port the kernel picks, to hand to sockvisor with
/// `FleetBuilder::pass` (what a socket unit's `ListenStream=` gives).
pub fn tcp_listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// A port the kernel just gave out for both TCP and UDP on 127.0.0.1, closed again: only for
/// systemd-socket-activate, which cannot bind port 0 itself (`on_a_free_port`).
fn unused_port() -> u16 {
    loop {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Run `scenario` on a port for systemd-socket-activate (which refuses port 0). Another
/// process may take the port between `unused_port` and the bind: systemd-socket-activate then
/// exits with "Address already in use", the scenario returns `Err(its log)`, and it starts
/// over on another port (a few times), so a taken port is never a failure of the test.
pub fn on_a_free_port(mut scenario: impl FnMut(u16) -> Result<(), String>) {
    for attempt in 1..=5 {
        let port = unused_port();
        match scenario(port) {
            Ok(()) => return,
            Err(log) if log.contains("Address already in use") => {
                eprintln!("port {port} was taken meanwhile (attempt {attempt}): {log}")
            }
            Err(log) => panic!("{log}"),
        }
    }
    panic!("five ports in a row were taken before systemd-socket-activate could bind them");
}

/// The control clients `pid` (a sockvisor) holds a connection to: its fds that are unix
/// sockets accepted on `control` (an accepted unix socket carries its listener's path in
/// /proc/net/unix, and is connected, where the listener is not).
pub fn control_clients(pid: i32, control: &Path) -> usize {
    let path = control.display().to_string();
    let unix = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    // Num RefCount Protocol Flags Type St Inode Path; St 03 = connected.
    let accepted: std::collections::BTreeSet<String> = unix
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 8 && f[5] == "03" && f[7] == path).then(|| f[6].to_string())
        })
        .collect();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|t| {
                    let t = t.display().to_string();
                    Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .filter(|inode| accepted.contains(inode))
                .count()
        })
        .unwrap_or(0)
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Wait until `pid` is gone, up to `timeout`.
pub fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Children of `pid` (from /proc/<pid>/task/*/children).
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out.retain(|&p| alive(p));
    out
}

/// Connect, send `request`, read until EOF.
pub fn tcp_request(port: u16, request: &[u8]) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub fn http_get(port: u16) -> std::io::Result<String> {
    tcp_request(
        port,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
}

/// Send one datagram and wait for the reply.
pub fn udp_request(port: u16, data: &[u8]) -> std::io::Result<String> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.send_to(data, ("127.0.0.1", port))?;
    let mut buf = [0u8; 65536];
    let n = s.recv(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// Read the probe workers' reports in `dir`.
pub fn probe_reports(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "json") {
            out.push(serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap());
        }
    }
    out
}

/// Wait until `dir` holds `n` probe reports (the probe writes its report before it serves).
pub fn wait_probe_reports(dir: &Path, n: usize, fleet: &Fleet) -> Vec<serde_json::Value> {
    fleet.wait_until(&format!("{n} probe reports"), SAFETY_TIMEOUT, || {
        let r = probe_reports(dir);
        (r.len() >= n).then_some(r)
    })
}

/// Send one datagram to a `NOTIFY_SOCKET` value: a path, or `@name` for an abstract socket
/// (what sockvisor gives its workers outside systemd).
pub fn send_notify(address: &str, msg: &[u8]) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let sock = UnixDatagram::unbound()?;
    match address.strip_prefix('@') {
        Some(name) => sock.send_to_addr(
            msg,
            &std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?,
        ),
        None => sock.send_to(msg, address),
    }
}

/// A helper process killed (by pid) and reaped when the test ends, pass or fail.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Start `tests/workers/fake_control_server.py SOCKET REPLY [LOG]` with `command` (python,
/// maybe set up to run as another user) and wait until it listens.
pub fn fake_control_server(
    mut command: Command,
    socket: &Path,
    reply: &str,
    log: Option<&Path>,
) -> KillOnDrop {
    use std::io::BufRead;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/fake_control_server.py");
    command.arg(script).arg(socket).arg(reply);
    if let Some(log) = log {
        command.arg(log);
    }
    let mut server = KillOnDrop(
        command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the fake control server"),
    );
    let mut line = String::new();
    std::io::BufReader::new(server.0.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "listening", "fake control server");
    server
}
