//! The server and client against real sockets, through the public API only.

use super::table::tests::sample_status;
use super::*;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

/// Whether `as_fd` is readable now.
fn readable(server: &ControlServer) -> bool {
    let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
}

/// Run the server's side until `done` says so, waiting on `as_fd` like the supervisor
/// (bounded: 10 s). `handle` answers each request.
fn serve(
    server: &mut ControlServer,
    mut done: impl FnMut(&mut ControlServer) -> bool,
    mut handle: impl FnMut(&mut ControlServer, RequestId, Request),
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(server) {
        assert!(Instant::now() < deadline, "test server loop timed out");
        let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
        let _ = poll(&mut fds, PollTimeout::from(50u8));
        for (id, r) in server.poll() {
            handle(server, id, r);
        }
    }
}

fn answer(server: &mut ControlServer, id: RequestId, r: Request) {
    let reply = match r {
        Request::Status => Reply::with_status(sample_status()),
        Request::Reload { .. } => Reply::ok(Some("reloaded".into())),
        Request::Scale { workers } => Reply::ok(Some(format!("scaled to {workers}"))),
        Request::Metrics => Reply::with_metrics("sockvisor_generation 1\n".into()),
        other => Reply::error(format!("{other:?}: not in these tests")),
    };
    server.reply(id, &reply);
}

/// A server on `ctl.sock` in a fresh directory (kept while the server lives).
fn bound() -> (tempfile::TempDir, std::path::PathBuf, ControlServer) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let server = ControlServer::bind(&path).unwrap();
    (dir, path, server)
}

/// Serve until `n` requests were handed out, without answering them.
fn take(server: &mut ControlServer, n: usize) -> Vec<(RequestId, Request)> {
    let got = std::cell::RefCell::new(Vec::new());
    serve(
        server,
        |_| got.borrow().len() >= n,
        |_, id, r| got.borrow_mut().push((id, r)),
    );
    got.into_inner()
}

/// Serve until `n` requests were handed out, answering each; returns them.
fn answer_n(server: &mut ControlServer, n: usize) -> Vec<Request> {
    let got = std::cell::RefCell::new(Vec::new());
    serve(
        server,
        |_| got.borrow().len() >= n,
        |s, id, r| {
            got.borrow_mut().push(r.clone());
            answer(s, id, r)
        },
    );
    got.into_inner()
}

fn read_replies(c: &UnixStream, n: usize) -> Vec<Reply> {
    let mut lines = BufReader::new(c).lines();
    (0..n)
        .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
        .collect()
}

#[test]
fn round_trip_with_blocking_client() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run").join("ctl.sock");
    let mut server = ControlServer::bind(&path).unwrap();
    // Parent created 0700, socket 0600.
    let pm = std::fs::metadata(path.parent().unwrap()).unwrap();
    assert_eq!(pm.mode() & 0o7777, 0o700);
    let sm = std::fs::symlink_metadata(&path).unwrap();
    assert!(sm.file_type().is_socket());
    assert_eq!(sm.mode() & 0o777, 0o600);

    let p = path.clone();
    let client = std::thread::spawn(move || {
        let t = Duration::from_secs(5);
        (
            request(&p, &Request::Status, t).unwrap(),
            request(&p, &Request::Scale { workers: 3 }, t).unwrap(),
            request(&p, &Request::RELOAD, t).unwrap(),
        )
    });
    serve(&mut server, |_| client.is_finished(), answer);
    let (status, scale, reload) = client.join().unwrap();
    assert!(status.ok);
    assert_eq!(status.status, Some(sample_status()));
    assert_eq!(scale.message.as_deref(), Some("scaled to 3"));
    assert_eq!(reload.message.as_deref(), Some("reloaded"));
    // Each client closed after its reply and the server let it go: MAX_CLIENTS new ones fit.
    let conns: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    for c in &conns {
        (&*c).write_all(b"{\"cmd\":\"reload\"}\n").unwrap();
    }
    answer_n(&mut server, MAX_CLIENTS);
    for c in &conns {
        assert!(read_replies(c, 1)[0].ok);
    }

    drop(server);
    assert!(!path.exists());
}

#[test]
fn pipelined_garbage_and_over_long_lines() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut msg = b"garbage\n\n{\"cmd\":\"scale\",\"workers\":2}\n".to_vec();
            msg.extend(std::iter::repeat_n(b'x', 3 * MAX_LINE));
            msg.extend(b"\n{\"cmd\":\"nope\"}\n{\"cmd\":\"status\"}\n");
            c.write_all(&msg).unwrap();
        })
    };
    // Bad lines are answered by the server itself; only requests reach the supervisor.
    let got = answer_n(&mut server, 2);
    writer.join().unwrap();
    assert_eq!(got, [Request::Scale { workers: 2 }, Request::Status]);

    let replies = read_replies(&c, 5);
    let oks: Vec<bool> = replies.iter().map(|r| r.ok).collect();
    assert_eq!(oks, [false, true, false, false, true]);
    let err = |i: usize| replies[i].error.clone().unwrap();
    assert!(err(0).starts_with("bad request") && err(0).contains(r#"{"cmd":"status"}"#));
    assert_eq!(replies[1].message.as_deref(), Some("scaled to 2"));
    assert!(err(2).contains("longer than"), "{}", err(2));
    assert!(err(3).starts_with("bad request"));
    assert_eq!(replies[4].status, Some(sample_status()));
}

/// Issue 14, item 9: a pipelined `reload` then `status` gets its replies in that order,
/// although the status is answered first.
#[test]
fn replies_come_in_request_order() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&c).write_all(
        b"{\"cmd\":\"reload\"}\n{\"cmd\":\"status\"}\nbad\n{\"cmd\":\"scale\",\"workers\":1}\n",
    )
    .unwrap();
    let got = take(&mut server, 3);
    assert_eq!(got[0].1, Request::RELOAD);
    assert_eq!(got[1].1, Request::Status);
    // Answer the later ones first, the reload last (as a real reload ends later).
    assert!(server.reply(got[2].0, &Reply::ok(Some("scaled".into()))));
    assert!(server.reply(got[1].0, &Reply::with_status(sample_status())));
    // Nothing is written before the reload's reply.
    let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&c), PollFlags::POLLIN)];
    assert_eq!(poll(&mut fds, PollTimeout::from(100u8)).unwrap(), 0);
    assert!(server.wants_reply(got[0].0));
    assert!(server.reply(got[0].0, &Reply::ok(Some("reloaded".into()))));
    let r = read_replies(&c, 4);
    assert_eq!(r[0].message.as_deref(), Some("reloaded"));
    assert_eq!(r[1].status, Some(sample_status()));
    assert!(!r[2].ok && r[2].error.as_deref().unwrap().starts_with("bad request"));
    assert_eq!(r[3].message.as_deref(), Some("scaled"));
    // Each request is answered once: a second reply is a no-op.
    assert!(!server.reply(got[0].0, &Reply::ok(None)));
}

/// Issue 14, item 3: a client pipelining many requests costs each `poll` a bounded number
/// of them; the rest wait (the fd stays readable) and all are answered, in order.
#[test]
fn a_flood_is_taken_a_few_requests_per_poll() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    const N: usize = 1000;
    let writer = {
        let mut c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let lines: Vec<u8> = (0..N)
                .flat_map(|i| format!("{{\"cmd\":\"scale\",\"workers\":{i}}}\n").into_bytes())
                .collect();
            c.write_all(&lines).unwrap();
        })
    };
    let reader = {
        let c = c.try_clone().unwrap();
        std::thread::spawn(move || read_replies(&c, N))
    };
    let mut seen = 0;
    let mut polls = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen < N {
        assert!(
            Instant::now() < deadline,
            "{seen} of {N} after {polls} polls"
        );
        let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(1000u16)).unwrap();
        let batch = server.poll();
        polls += 1;
        assert!(
            batch.len() <= server::REQUESTS_PER_POLL,
            "{} requests in one poll",
            batch.len()
        );
        for (id, r) in batch {
            let Request::Scale { workers } = r else {
                panic!("{r:?}")
            };
            assert_eq!(workers, seen, "in order");
            seen += 1;
            assert!(server.reply(id, &Reply::ok(Some(workers.to_string()))));
        }
    }
    // Keep writing replies out until the client has read them all.
    while !reader.is_finished() {
        assert!(Instant::now() < deadline, "replies not delivered");
        let mut fds = [PollFd::new(server.as_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::from(100u16)).unwrap();
        assert!(server.poll().is_empty());
    }
    writer.join().unwrap();
    let replies = reader.join().unwrap();
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.message.as_deref(), Some(i.to_string().as_str()));
    }
    assert!(polls >= N / server::REQUESTS_PER_POLL);
    // Done: the fd is quiet.
    server.poll();
    assert!(!readable(&server));
}

/// Issue 14, item 3: a client that hangs up is dropped with what it had queued: no more of
/// its requests are handed out, and its pending ones want no reply.
#[test]
fn a_client_that_hangs_up_is_dropped_with_its_requests() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    (&c).write_all(&b"{\"cmd\":\"status\"}\n".repeat(100))
        .unwrap();
    let first: Vec<RequestId> = take(&mut server, 1).into_iter().map(|(id, _)| id).collect();
    assert!(first.len() <= server::REQUESTS_PER_POLL);
    drop(c);
    let mut more = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while first.iter().any(|&id| server.wants_reply(id)) {
        assert!(
            Instant::now() < deadline,
            "the hung-up client was not dropped"
        );
        more += server.poll().len();
    }
    assert_eq!(more, 0, "requests of a client that hung up were handed out");
    assert!(!server.reply(first[0], &Reply::ok(None)));
    assert!(!readable(&server));
}

#[test]
fn half_closed_client_gets_late_reply() {
    // `echo '{"cmd":"reload"}' | socat - UNIX-CONNECT:...`: request, then EOF, then the
    // reply comes when the reload is over.
    let (_dir, path, mut server) = bound();
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(br#"{"cmd":"reload"}"#).unwrap(); // no newline: EOF ends it
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let pending = std::cell::Cell::new(None);
    serve(
        &mut server,
        |_| pending.get().is_some(),
        |_, id, r| {
            assert_eq!(r, Request::RELOAD);
            pending.set(Some(id));
        },
    );
    let id = pending.get().unwrap();
    // Half-closed and waiting: the server's fd is quiet (no busy loop), the client is kept.
    for _ in 0..3 {
        assert!(server.poll().is_empty());
    }
    assert!(!readable(&server));
    assert!(server.wants_reply(id));
    assert!(server.reply(id, &Reply::ok(Some("done".into()))));
    // Replied and at EOF: closed.
    assert!(!server.wants_reply(id));
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    assert_eq!(s, "{\"ok\":true,\"message\":\"done\"}\n");
    // Replying to a gone client is a no-op.
    assert!(!server.reply(id, &Reply::ok(None)));
}

#[test]
fn slow_reader_is_buffered_then_bounded() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    (&c).write_all(&b"{\"cmd\":\"status\"}\n".repeat(3))
        .unwrap();
    let ids: Vec<RequestId> = take(&mut server, 3).into_iter().map(|(id, _)| id).collect();
    // 1 MiB does not fit a socket buffer: buffered, and written as the client reads.
    let big = |mib: usize| Reply::ok(Some("x".repeat(mib << 20)));
    assert!(server.reply(ids[0], &big(1)));
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        (line.len(), c)
    });
    serve(
        &mut server,
        |_| reader.is_finished(),
        |_, _, r| panic!("{r:?}"),
    );
    let (len, c) = reader.join().unwrap();
    assert_eq!(len, (1 << 20) + r#"{"ok":true,"message":""}"#.len() + 1);
    // A client that does not read is dropped once too much waits for it.
    assert!(server.reply(ids[1], &big(3)));
    assert!(!server.reply(ids[2], &big(3)));
    assert!(!server.wants_reply(ids[2]));
    drop(c);
}

#[test]
fn stale_socket_replaced_live_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    drop(UnixListener::bind(&path).unwrap()); // leaves a dead socket file
    let server = ControlServer::bind(&path).unwrap();
    let e = ControlServer::bind(&path).err().unwrap();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    assert!(
        e.to_string()
            .contains("another sockvisor is already running"),
        "{e}"
    );
    // The failed second bind did not remove the first one's socket.
    assert!(path.exists());
    drop(server);
    assert!(!path.exists());

    std::fs::write(&path, b"not a socket").unwrap();
    assert!(ControlServer::bind(&path).is_err());
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &path).unwrap();
    assert!(ControlServer::bind(&path).is_err());
}

#[test]
fn unsafe_parents_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = ControlServer::bind(&link.join("c.sock")).err().unwrap();
    assert!(e.to_string().contains("symlink"), "{e}");

    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o777)).unwrap();
    let e = ControlServer::bind(&real.join("c.sock")).err().unwrap();
    assert!(e.to_string().contains("writable by other users"), "{e}");
    // Sticky and ours (not root's, unless running as root) is still refused unless root.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let r = ControlServer::bind(&real.join("c.sock"));
    assert_eq!(r.is_ok(), nix::unistd::geteuid().is_root());
}

#[test]
fn client_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ctl.sock");
    let e = request(&path, &Request::Status, Duration::from_secs(1)).unwrap_err();
    assert!(matches!(e, ClientError::NotRunning { .. }));
    assert!(
        e.to_string().starts_with("no sockvisor is running at"),
        "{e}"
    );

    // A server that never answers: timeout.
    let _server = ControlServer::bind(&path).unwrap();
    let t = Instant::now();
    let e = request(&path, &Request::RELOAD, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn too_many_clients_refused() {
    let (_dir, path, mut server) = bound();
    let conns: Vec<UnixStream> = (0..MAX_CLIENTS + 1)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    assert!(server.poll().is_empty());
    let mut line = String::new();
    BufReader::new(&conns[MAX_CLIENTS])
        .read_line(&mut line)
        .unwrap();
    let r: Reply = serde_json::from_str(&line).unwrap();
    assert!(!r.ok && r.error.unwrap().contains("too many"));
    // The first MAX_CLIENTS are served.
    for c in &conns[..MAX_CLIENTS] {
        (&*c).write_all(b"{\"cmd\":\"reload\"}\n").unwrap();
    }
    answer_n(&mut server, MAX_CLIENTS);
}

#[test]
fn other_uid_refused_by_peer_credentials() {
    if !crate::prereq::require(crate::prereq::is_root(), "needs root to act as uid 65534") {
        return;
    }
    let python = Path::new("/usr/bin/python3");
    if !crate::prereq::require(python.exists(), "/usr/bin/python3 not found") {
        return;
    }
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let path = dir.path().join("ctl.sock");
    let mut server = ControlServer::bind(&path).unwrap();

    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_UNIX)\n\
        try:\n s.connect(sys.argv[1])\n\
        except PermissionError:\n print('EACCES'); sys.exit(0)\n\
        try:\n s.sendall(b'{\"cmd\":\"status\"}\\n')\n\
        except OSError:\n pass\n\
        print(s.makefile().readline().strip())\n";
    let run = || {
        std::process::Command::new(python)
            .args(["-c", script])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Mode 0600: the kernel refuses the connection itself.
    let out = run().wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "EACCES");

    // Even with the mode opened up, peer credentials refuse it.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut child = run();
    serve(
        &mut server,
        |_| child.try_wait().unwrap().is_some(),
        |_, _, r| panic!("a refused client got through: {r:?}"),
    );
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let r: Reply = serde_json::from_str(out.trim()).unwrap();
    assert!(!r.ok);
    assert!(r.error.unwrap().starts_with("permission denied: uid 65534"));
}

/// Issue 16: a `messages --follow` client gets its reply, then every published line; lines
/// after its request are not read as requests; a follower that does not read gets at most
/// FOLLOW_OUTPUT_LIMIT bytes, the rest counted and announced once it reads again.
#[test]
fn a_follower_gets_published_lines_within_its_bound() {
    use crate::control::{Event, FOLLOW_OUTPUT_LIMIT};
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (&c).write_all(b"{\"cmd\":\"messages\",\"follow\":true}\n{\"cmd\":\"status\"}\n")
        .unwrap();
    let got = take(&mut server, 1);
    assert_eq!(got[0].1, Request::Messages { follow: true });
    assert_eq!(server.followers(), 1);
    // Published before its reply is out: counted as dropped for it, not interleaved.
    let line = |n: usize| {
        Event::Message {
            from: crate::control::WorkerTarget {
                slot: n,
                pid: 1,
                generation: 1,
            },
            payload: Some("x".repeat(100 * 1024)),
            payload_base64: None,
        }
        .to_line()
    };
    assert_eq!(server.publish(&line(0)), 0);
    assert!(server.reply(got[0].0, &Reply::ok(Some("following".into()))));
    // The status line after the follow request is never handed out.
    for _ in 0..5 {
        assert!(server.poll().is_empty());
    }
    // Nobody reads: the output stops at the bound; the rest is counted.
    let published = 3 * FOLLOW_OUTPUT_LIMIT / (100 * 1024);
    let took: usize = (1..=published).map(|n| server.publish(&line(n))).sum();
    assert!(took < published, "{took} of {published}");
    // A reader thread reads, the server writes as the socket takes it.
    let reader = {
        let c = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(c).lines();
            let reply: Reply = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert!(reply.ok);
            // The line published before its reply was out is announced first.
            let e: Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
            assert_eq!(e, Event::Dropped { count: 1 });
            let mut seen = 0;
            while seen < took {
                let e: Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
                assert!(matches!(e, Event::Message { .. }), "{e:?}");
                seen += 1;
            }
            lines
        })
    };
    while !reader.is_finished() {
        server.poll();
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut lines = reader.join().unwrap();
    // Once it read, the next line is preceded by the count of what it missed.
    assert_eq!(server.publish(&line(999)), 1);
    let dropped: Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let missed = (published - took) as u64;
    assert_eq!(dropped, Event::Dropped { count: missed });
    let last: Event = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(matches!(last, Event::Message { from, .. } if from.slot == 999));
    drop(lines);
    drop(c);
    // Gone: it stops counting as a follower once the server notices.
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.followers() > 0 {
        server.poll();
        server.publish(b"{}\n");
        assert!(Instant::now() < deadline);
    }
}

/// A refused follow (messages off) gets its error, and the connection is closed.
#[test]
fn a_refused_follow_is_closed_after_its_error() {
    let (_dir, path, mut server) = bound();
    let c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (&c).write_all(b"{\"cmd\":\"messages\",\"follow\":true}\n")
        .unwrap();
    let got = take(&mut server, 1);
    assert!(server.reply(got[0].0, &Reply::error("messages are off")));
    assert_eq!(server.followers(), 0);
    let mut all = String::new();
    std::io::Read::read_to_string(&mut &c, &mut all).unwrap();
    assert_eq!(all, "{\"ok\":false,\"error\":\"messages are off\"}\n");
}
