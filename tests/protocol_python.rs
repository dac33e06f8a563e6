//! The channel protocol, end to end with real workers: examples/worker.py (python3),
//! examples/worker.c (cc) and examples/hello.rs, each given a channel made here with
//! `Channel` (the supervisor's side) at fd 3, exactly as sockvisor places it.

#[path = "common/prereq.rs"]
mod prereq;
use prereq::{have_program, require};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sockvisor::dispatch::Channel;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(10);

/// A started worker; killed (by pid) and reaped if the test ends early.
struct Worker {
    child: Child,
}

impl Worker {
    /// `argv` with the channel's worker end at fd 3 and the LISTEN_* environment.
    fn spawn(ch: &Channel, argv: &[&str], envs: &[(&str, &str)]) -> Worker {
        Worker::spawn_fd(ch.worker_end(), argv, envs)
    }

    /// `argv` with `fd` at fd 3.
    fn spawn_fd(fd: BorrowedFd<'_>, argv: &[&str], envs: &[(&str, &str)]) -> Worker {
        let raw = fd.as_raw_fd();
        let mut cmd = Command::new("sh");
        // LISTEN_PID must be the worker's own pid: sh knows it ($$) and exec keeps it.
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$@\"")
            .arg("sh")
            .args(argv)
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "web")
            .env("SOCKVISOR_WORKER_ID", "7")
            .env_remove("LISTEN_PID")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        // SAFETY: runs in the child between fork and exec and only makes the
        // async-signal-safe dup2/fcntl calls on an fd that is open in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if raw == 3 {
                    // dup2(3, 3) would keep FD_CLOEXEC: clear it instead
                    if libc::fcntl(3, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Worker {
            child: cmd.spawn().expect("spawn worker"),
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Accept one loopback connection: (client, server side to dispatch).
fn connect(l: &TcpListener) -> (TcpStream, OwnedFd) {
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, OwnedFd::from(s))
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n";

fn response(c: &mut TcpStream) -> String {
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the reply");
    out
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Serve a few connections (with close reports), then SIGTERM with connections still queued:
/// every one of them must be served, and the worker must exit 0.
fn exercise(argv: &[&str], envs: &[(&str, &str)], body: &str) -> Worker {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ch = Channel::new().unwrap();
    let mut w = Worker::spawn(&ch, argv, envs);

    for _ in 0..3 {
        let (mut c, s) = connect(&l);
        ch.send(s, true).unwrap();
        c.write_all(REQUEST).unwrap();
        let r = response(&mut c);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r:?}");
        assert!(r.contains(body), "{r:?} does not contain {body:?}");
    }
    let mut reports = 0;
    wait_until("3 close reports", || {
        reports += ch.read_reports().closed;
        reports >= 3
    });
    assert_eq!(reports, 3);

    // A: received, the worker waits for its request. B and C: queued, requests sent.
    let (mut a, s) = connect(&l);
    ch.send(s, false).unwrap();
    let mut queued = Vec::new();
    for _ in 0..2 {
        let (mut c, s) = connect(&l);
        c.write_all(REQUEST).unwrap();
        ch.send(s, false).unwrap();
        queued.push(c);
    }
    wait_until("the worker to take a connection", || ch.queued() < 3);
    kill(w.pid(), Signal::SIGTERM).unwrap();
    a.write_all(REQUEST).unwrap();
    for c in std::iter::once(&mut a).chain(&mut queued) {
        let r = response(c);
        assert!(
            r.contains(body),
            "a connection was not served during the drain: {r:?}"
        );
    }
    assert!(w.wait().success());
    assert_eq!(ch.queued(), 0);
    assert!(ch.reclaim().is_empty());
    w
}

fn manifest_path(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

#[test]
fn python_worker() {
    if !require(
        have_program("python3"),
        "no python3 (apt-get install python3)",
    ) {
        return;
    }
    exercise(
        &["python3", &manifest_path("examples/worker.py")],
        &[],
        "hello from python worker 7\n",
    );
}

#[test]
fn c_worker() {
    if !require(have_program("cc"), "no C compiler cc (apt-get install gcc)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("worker");
    let st = Command::new("cc")
        .args(["-O2", "-Wall", "-o"])
        .arg(&exe)
        .arg(manifest_path("examples/worker.c"))
        .status()
        .unwrap();
    assert!(st.success(), "cc failed");
    exercise(&[exe.to_str().unwrap()], &[], "hello from c worker 7\n");
}

/// target/<profile>/examples/hello, next to this test's target/<profile>/deps/ (cargo test
/// builds examples); built with cargo if it is not there.
fn hello_exe() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let hello = profile_dir.join("examples").join("hello");
    if !hello.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--example", "hello", "--manifest-path"])
            .arg(manifest_path("Cargo.toml"))
            .status()
            .unwrap();
        assert!(st.success());
    }
    assert!(hello.exists(), "{} not found", hello.display());
    hello
}

#[test]
fn hello_worker_channel_mode() {
    let hello = hello_exe();
    let stats = tempfile::tempdir().unwrap();
    let w = exercise(
        &[hello.to_str().unwrap()],
        &[("HELLO_STATS_DIR", stats.path().to_str().unwrap())],
        "hello from worker 7 (pid ",
    );
    // 3 served + 3 drained connections, one request each
    let pid = w.child.id().to_string();
    let got = std::fs::read_to_string(stats.path().join(pid)).unwrap();
    assert_eq!(got, "6 6\n");
}

#[test]
fn hello_writes_stats_and_serves_keep_alive_and_raw() {
    let hello = hello_exe();
    let stats = tempfile::tempdir().unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ch = Channel::new().unwrap();
    let mut w = Worker::spawn(
        &ch,
        &[hello.to_str().unwrap()],
        &[("HELLO_STATS_DIR", stats.path().to_str().unwrap())],
    );
    let pid = w.child.id();
    // keep-alive with two pipelined requests, then /pid
    let (mut c, s) = connect(&l);
    ch.send(s, false).unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    c.write_all(b"GET /pid HTTP/1.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = response(&mut c);
    assert_eq!(r.matches("HTTP/1.1 200 OK").count(), 3, "{r:?}");
    assert_eq!(r.matches("Connection: keep-alive").count(), 2, "{r:?}");
    assert!(r.ends_with(&format!("\r\n\r\n{pid}\n")), "{r:?}");
    // a plain line client gets the body raw
    let (mut c, s) = connect(&l);
    ch.send(s, false).unwrap();
    c.write_all(b"x\n").unwrap();
    assert_eq!(
        response(&mut c),
        format!("hello from worker 7 (pid {pid})\n")
    );
    // sockvisor gone (its end closed): the worker exits 0 and writes its stats
    drop(ch);
    assert!(w.wait().success());
    let got = std::fs::read_to_string(stats.path().join(pid.to_string())).unwrap();
    assert_eq!(got, "2 4\n");
}

/// The C and Python examples in docs/protocol.md are the files in examples/.
#[test]
fn protocol_doc_embeds_the_examples() {
    let doc = std::fs::read_to_string(manifest_path("docs/protocol.md")).unwrap();
    for f in ["examples/worker.py", "examples/worker.c"] {
        let src = std::fs::read_to_string(manifest_path(f)).unwrap();
        assert!(
            doc.contains(&src),
            "docs/protocol.md does not contain {f} verbatim"
        );
    }
}

/// Connections still queued when SIGTERM arrives are received and served (hello is stopped
/// while they are queued, so it finds both the signal and the queue when it resumes).
#[test]
fn hello_drains_its_channel_on_sigterm() {
    let hello = hello_exe();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ch = Channel::new().unwrap();
    let mut w = Worker::spawn(&ch, &[hello.to_str().unwrap()], &[]);
    // wait until it runs: one served connection
    let (mut c, s) = connect(&l);
    ch.send(s, false).unwrap();
    c.write_all(REQUEST).unwrap();
    assert!(response(&mut c).contains("hello from worker 7"));

    kill(w.pid(), Signal::SIGSTOP).unwrap();
    let mut clients = Vec::new();
    for _ in 0..5 {
        let (mut c, s) = connect(&l);
        c.write_all(REQUEST).unwrap();
        ch.send(s, false).unwrap();
        clients.push(c);
    }
    assert_eq!(ch.queued(), 5);
    kill(w.pid(), Signal::SIGTERM).unwrap();
    kill(w.pid(), Signal::SIGCONT).unwrap();
    for c in &mut clients {
        assert!(response(c).contains("hello from worker 7"));
    }
    assert!(w.wait().success());
    assert_eq!(ch.queued(), 0);
}

/// Shared mode: the same hello accepts on a listening socket at fd 3 itself.
#[test]
fn hello_worker_shared_mode() {
    let hello = hello_exe();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let mut w = Worker::spawn_fd(l.as_fd(), &[hello.to_str().unwrap()], &[]);
    for _ in 0..3 {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.write_all(REQUEST).unwrap();
        assert!(response(&mut c).contains("hello from worker 7"));
    }
    kill(w.pid(), Signal::SIGTERM).unwrap();
    assert!(w.wait().success());
}

/// docs/protocol.md, lifetime rules: hello takes a connection out of its epoll set before it
/// closes it. Here the test keeps its own reference to the server side, as sockvisor does for
/// a moment after a hand-over; a stale epoll entry left behind (the file outlives hello's
/// close) could otherwise be the last holder inside epoll_wait, delaying the FIN until hello's
/// next event (seen in CI as a client waiting 10 s for the end of a served request).
#[test]
fn hello_takes_a_connection_out_of_epoll_before_closing_it() {
    use std::os::unix::fs::MetadataExt;
    let hello = hello_exe();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut ch = Channel::new().unwrap();
    let w = Worker::spawn(&ch, &[hello.to_str().unwrap()], &[]);
    let (mut c, s) = connect(&l);
    let held = s.try_clone().unwrap();
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", held.as_raw_fd()))
        .unwrap()
        .ino();
    ch.send(s, false).unwrap();
    c.write_all(REQUEST).unwrap();
    // The whole answer arrives; the end of file cannot (the test holds the socket).
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !String::from_utf8_lossy(&got).ends_with(")\n") {
        let n = c.read(&mut buf).expect("read the answer");
        assert!(n > 0, "end of file while the test holds the socket");
        got.extend_from_slice(&buf[..n]);
    }
    let proc_dir = format!("/proc/{}", w.pid());
    let socket = format!("socket:[{inode}]");
    let fds = |what: &str| -> Vec<(String, String)> {
        std::fs::read_dir(format!("{proc_dir}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                let target = target.to_string_lossy().into_owned();
                (target == what).then(|| (e.file_name().to_string_lossy().into_owned(), target))
            })
            .collect()
    };
    wait_until("hello to close its connection", || fds(&socket).is_empty());
    let epolls = fds("anon_inode:[eventpoll]");
    assert!(!epolls.is_empty(), "hello has no epoll fd");
    let stale = format!("ino:{inode:x} ");
    for (fd, _) in epolls {
        let info = std::fs::read_to_string(format!("{proc_dir}/fdinfo/{fd}")).unwrap();
        assert!(
            !info.lines().any(|l| l.contains(&stale)),
            "hello's epoll (fd {fd}) still watches the connection it closed:\n{info}"
        );
    }
    drop(held);
    let mut rest = String::new();
    c.read_to_string(&mut rest).expect("the end of file");
    assert!(String::from_utf8_lossy(&got).contains("hello from worker 7"));
}
