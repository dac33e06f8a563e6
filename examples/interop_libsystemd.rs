//! Interop worker: a plain systemd service written with the `libsystemd` crate (0.7), unchanged
//! for sockvisor. It takes its listener with `activation::receive_descriptors` (run it with
//! `--dispatch shared`: a real listening socket at fd 3), says `READY=1` and `STATUS=`, and
//! answers every connection with `libsystemd <pid>\n`. Used by tests/health.rs.

use libsystemd::activation::{receive_descriptors, IsType};
use libsystemd::daemon::{notify, NotifyState};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{FromRawFd, IntoRawFd};

fn main() {
    let fd = receive_descriptors(true)
        .expect("LISTEN_FDS for this process")
        .into_iter()
        .next()
        .expect("one listener");
    assert!(fd.is_inet(), "fd 3 is an inet socket");
    // SAFETY: the descriptor was passed to us and `into_raw_fd` gives up its ownership.
    let listener = unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) };
    let sent = notify(
        false,
        &[
            NotifyState::Status("libsystemd worker serving".to_string()),
            NotifyState::Ready,
        ],
    )
    .expect("notify");
    assert!(sent, "NOTIFY_SOCKET is set");
    let reply = format!("libsystemd {}\n", std::process::id());
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(reply.as_bytes());
    }
}
