//! Shared helpers for the integration tests: the real `sockvisor` binary in its own process
//! group (killed as a group when the test ends, pass or fail), a NOTIFY_SOCKET the test
//! listens on, free loopback ports, and small TCP/UDP clients.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

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
pub fn hello_args(workers: usize, port: u16) -> Vec<String> {
    vec![
        "--workers".to_string(),
        workers.to_string(),
        "--listen".into(),
        format!("tcp://127.0.0.1:{port}"),
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

/// A port free for both TCP and UDP on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    for _ in 0..50 {
        let tcp = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = tcp.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port");
}

/// A unix datagram socket standing in for systemd's notify socket. A thread drains it as
/// systemd would (so sockvisor never finds it full) and keeps every datagram.
pub struct NotifySocket {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
    received: std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// A snapshot of what was received, refreshed by every `wait_for*`.
    pub seen: Vec<String>,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let received =
            std::sync::Arc::new((std::sync::Mutex::new(Vec::new()), std::sync::Condvar::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (r, st) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(n) = sock.recv(&mut buf) {
                    let (lock, cv) = &*r;
                    lock.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                    cv.notify_all();
                }
            }
        });
        NotifySocket {
            path,
            _dir: dir,
            received,
            stop,
            seen: Vec::new(),
        }
    }

    fn wait_from(&mut self, from: usize, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.received;
        let mut all = lock.lock().unwrap();
        loop {
            if let Some(m) = all[from.min(all.len())..]
                .iter()
                .find(|m| m.lines().any(|l| l.starts_with(needle)))
            {
                let m = m.clone();
                self.seen = all.clone();
                return Some(m);
            }
            let left = deadline.checked_duration_since(Instant::now());
            let Some(left) = left else {
                self.seen = all.clone();
                return None;
            };
            all = cv.wait_timeout(all, left).unwrap().0;
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
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A running `sockvisor` (or any command) in its own process group.
pub struct Fleet {
    pub child: Child,
    /// The control socket this fleet was given (in its private temp dir).
    pub control: PathBuf,
    pub log_path: PathBuf,
    _log_dir: tempfile::TempDir,
    status: Option<ExitStatus>,
}

pub struct FleetBuilder {
    cmd: Command,
}

impl FleetBuilder {
    /// `sockvisor ARGS`, with systemd's variables removed from the environment.
    pub fn new<I, S>(args: I) -> FleetBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        Self::program(sockvisor_bin(), args)
    }

    pub fn program<I, S>(program: impl AsRef<std::ffi::OsStr>, args: I) -> FleetBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(program);
        cmd.args(args);
        for k in [
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
        ] {
            cmd.env_remove(k);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("SOCKVISOR_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("SOCKVISOR_LOG", "debug");
        FleetBuilder { cmd }
    }

    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.cmd.current_dir(dir);
        self
    }

    /// Mark every fd above 2 the test process holds close-on-exec in the child, so sockvisor
    /// starts with only 0-2 (what systemd gives it), whatever the test runner leaked.
    pub fn no_inherited_fds(mut self) -> Self {
        // SAFETY: close_range(2) is async-signal-safe; setting CLOEXEC on the child's own fds
        // only affects what survives exec (std's own error pipe is CLOEXEC already).
        unsafe {
            self.cmd.pre_exec(|| {
                libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                Ok(())
            });
        }
        self
    }

    pub fn notify(self, n: &NotifySocket) -> Self {
        self.env("NOTIFY_SOCKET", &n.path)
    }

    pub fn start(mut self) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("stderr.log");
        let control = dir.path().join("control.sock");
        self.cmd.env("SOCKVISOR_CONTROL_SOCKET", &control);
        let log = std::fs::File::create(&log_path).unwrap();
        self.cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = self.cmd.spawn().expect("spawn");
        Fleet {
            child,
            control,
            log_path,
            _log_dir: dir,
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

    /// Wait until the log contains `needle` (for programs whose only readiness signal is a
    /// log line, like systemd-socket-activate's "Listening on").
    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Run `sockvisor ARGS --control <this fleet's socket>`.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(sockvisor_bin())
            .args(args)
            .arg("--control")
            .arg(&self.control)
            .output()
            .unwrap()
    }

    /// `sockvisor status --json`.
    pub fn status(&self) -> serde_json::Value {
        let out = self.ctl(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
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
        // The whole process group: sockvisor and every worker it forked.
        // SAFETY: killpg(2) on the group this test created for its child.
        unsafe { libc::killpg(self.pid(), libc::SIGKILL) };
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- sockvisor log ---\n{}\n--- end ---", self.log());
        }
    }
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
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = probe_reports(dir);
        if r.len() >= n {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "{} probe reports of {n}: {}",
            r.len(),
            fleet.log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
