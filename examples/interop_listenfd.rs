//! Interop worker: a server that takes its listener with the `listenfd` crate (as `systemfd`
//! and `cargo watch` users do), unchanged for sockvisor in `--dispatch shared` mode. listenfd
//! does not speak sd_notify, so readiness is one raw datagram to `NOTIFY_SOCKET`, the way
//! the protocol is documented. Answers every connection with `listenfd <pid>\n`. Used by
//! tests/health.rs.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

fn main() {
    let mut fds = listenfd::ListenFd::from_env();
    let listener = fds
        .take_tcp_listener(0)
        .expect("fd 3 is a TCP listener")
        .expect("LISTEN_FDS for this process");
    if let Some(address) = std::env::var_os("NOTIFY_SOCKET") {
        // A path, or `@name` for an abstract socket (sd_notify(3)); sockvisor outside
        // systemd gives the latter.
        let sock = UnixDatagram::unbound().expect("socket");
        let msg = b"READY=1\nSTATUS=listenfd worker serving\n";
        match address.as_bytes().strip_prefix(b"@") {
            Some(name) => sock.send_to_addr(msg, &SocketAddr::from_abstract_name(name).unwrap()),
            None => sock.send_to(msg, &address),
        }
        .expect("notify");
    }
    let reply = format!("listenfd {}\n", std::process::id());
    for mut conn in listener.incoming().flatten() {
        let mut buf = [0u8; 1024];
        let _ = conn.read(&mut buf);
        let _ = conn.write_all(reply.as_bytes());
    }
}
