#!/usr/bin/env python3
"""Stand-in for sockvisor's READY=1, used only by `run.sh --stand-in` to check
the harness's time-to-READY plumbing before sockvisor exists:

    notify_standin.py -- CMD ARGS...

Runs CMD as a child, polls http://$HOST:$PORT/ until it answers 200, then sends
READY=1 to $NOTIFY_SOCKET, and waits for the child (it is in the same process
group, so the harness's SIGTERM reaches it). Its figures measure this script,
not a supervisor.
"""
import os
import signal
import socket
import subprocess
import sys
import time


def http_ok(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    notify = os.environ.pop("NOTIFY_SOCKET", None)
    child = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: None)  # the group's SIGTERM reaches the child too
    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ["PORT"])
    deadline = time.monotonic() + 15
    while not http_ok(host, port):
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            return 1
        time.sleep(0.005)
    if notify:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1\nSTATUS=stand-in ready", notify)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
