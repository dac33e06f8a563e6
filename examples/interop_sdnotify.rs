//! Interop worker: a plain systemd service written with the `sd-notify` crate, unchanged for
//! sockvisor. It takes its listener with `sd_notify::listen_fds()` (run it with `--dispatch
//! shared`: a real listening socket at fd 3), says `READY=1` and `STATUS=`, and answers every
//! connection with `sd-notify <pid>\n`. Used by tests/health.rs.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::FromRawFd;

fn main() {
    let fd = sd_notify::listen_fds()
        .expect("LISTEN_FDS for this process")
        .next()
        .expect("one listener");
    // SAFETY: fd 3 was passed to us (LISTEN_PID is ours) and nothing else owns it.
    let listener = unsafe { TcpListener::from_raw_fd(fd) };
    sd_notify::notify(&[
        sd_notify::NotifyState::Status("sd-notify worker serving"),
        sd_notify::NotifyState::Ready,
    ])
    .expect("notify");
    let reply = format!("sd-notify {}\n", std::process::id());
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(reply.as_bytes());
    }
}
