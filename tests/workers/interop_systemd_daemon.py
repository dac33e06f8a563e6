#!/usr/bin/env python3
"""Interop worker: a plain systemd service using python3-systemd's systemd.daemon, unchanged
for sockvisor (--dispatch shared): listen_fds() for its listener, notify() for READY=1 and
STATUS=. Answers every connection with "systemd.daemon <pid>\\n". Used by tests/health.rs."""
import os, socket
from systemd import daemon

fds = daemon.listen_fds()
assert fds == [3], fds
listener = socket.socket(fileno=fds[0])
assert daemon.notify("READY=1\nSTATUS=systemd.daemon worker serving")
reply = f"systemd.daemon {os.getpid()}\n".encode()
while True:
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(5)
        conn.recv(1024)
        conn.sendall(reply)
