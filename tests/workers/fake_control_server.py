#!/usr/bin/env python3
"""A stand-in for a sockvisor control socket: anyone's server, for the client's checks.

Usage: fake_control_server.py SOCKET_PATH REPLY_LINE [LOG]
Binds SOCKET_PATH (mode 0777), prints "listening" once it listens, then answers every
connection's first line with REPLY_LINE and closes it. Each request line received is
appended to LOG when given, so a test can tell whether a client sent anything.
"""
import os, socket, sys

path, reply = sys.argv[1], sys.argv[2].encode() + b"\n"
log = sys.argv[3] if len(sys.argv) > 3 else None
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
os.chmod(path, 0o777)
s.listen(16)
print("listening", flush=True)
while True:
    conn, _ = s.accept()
    with conn:
        line = conn.makefile("rb").readline()
        if log and line:
            with open(log, "ab") as f:
                f.write(line)
        try:
            conn.sendall(reply)
        except OSError:
            pass
