#!/usr/bin/env python3
"""Bounded HTTP client doing EXACTLY --conns connections (one
`GET / HTTP/1.1` + `Connection: close` each), --concurrency at a time, then
exits. A fixed connection count (not a fixed duration) makes instruction
counts per connection reproducible (bench/profile.sh). Prints one JSON line:
{"conns", "ok", "errors", "elapsed_s", "conns_per_s"}. Python stdlib only.
"""
import argparse
import errno
import json
import selectors
import socket
import sys
import time

REQ = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=600.0, help="hard bound on the whole run (s)")
    ap.add_argument("--io-timeout", type=float, default=30.0, help="bound on one connection (s)")
    a = ap.parse_args()
    if not a.host.startswith("127.") and a.host != "::1":
        ap.error("loopback only")
    sel = selectors.DefaultSelector()
    started = ok = errors = 0
    t0 = time.monotonic()
    deadline = t0 + a.timeout

    def start():
        nonlocal started, errors
        started += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((a.host, a.port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            errors += 1
            return
        sel.register(s, selectors.EVENT_WRITE, {"state": "connect", "buf": b"", "t": time.monotonic()})

    while (started < a.conns or sel.get_map()) and time.monotonic() < deadline:
        while started < a.conns and len(sel.get_map()) < a.concurrency:
            start()
        for key, _ in sel.select(timeout=0.5):
            s, st = key.fileobj, key.data
            try:
                if st["state"] == "connect":
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise OSError(err, "connect")
                    s.sendall(REQ)
                    st["state"] = "read"
                    sel.modify(s, selectors.EVENT_READ, st)
                    continue
                data = s.recv(4096)
                if data:
                    st["buf"] += data
                    continue
                sel.unregister(s)
                s.close()
                if st["buf"].startswith(b"HTTP/1.1 200"):
                    ok += 1
                else:
                    errors += 1
            except OSError:
                sel.unregister(s)
                s.close()
                errors += 1
        now = time.monotonic()
        for key in list(sel.get_map().values()):
            if now - key.data["t"] > a.io_timeout:
                sel.unregister(key.fileobj)
                key.fileobj.close()
                errors += 1
    unfinished = len(sel.get_map()) + (a.conns - started)
    el = time.monotonic() - t0
    print(json.dumps({"conns": a.conns, "ok": ok, "errors": errors + unfinished, "elapsed_s": el,
                      "conns_per_s": ok / el if el > 0 else None}))
    return 0 if ok == a.conns else 1


if __name__ == "__main__":
    sys.exit(main())
