#!/usr/bin/env python3
"""Bounded UDP echo client: keeps --window datagrams in flight against an echo
server for --duration seconds and prints one JSON line:
  {"rps": echoed datagrams/s, "sent", "received", "lost", "late", "p50", "p99" (ms RTT), "errors"}

A datagram not answered within --loss-timeout counts as lost and its slot is
reused, so a server that drops datagrams slows the client but never stalls it.
Each datagram carries an 8-byte sequence number; the echo must return it
unchanged (sockvisor's hello worker and bench/node/cluster.js echo the payload).
Python stdlib only; one socket, one thread: on a 2-CPU box the client itself
is usually the bottleneck, so compare servers measured in the same invocation.
"""
import argparse
import json
import select
import socket
import struct
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=32, help="datagrams in flight")
    ap.add_argument("--size", type=int, default=64, help="payload bytes (>= 8)")
    ap.add_argument("--loss-timeout", type=float, default=0.1, help="seconds without any reply")
    a = ap.parse_args()
    if not a.host.startswith("127.") and a.host != "::1":
        ap.error("loopback only")
    pad = b"x" * max(0, a.size - 8)
    dst = (a.host, a.port)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setblocking(False)
    inflight = {}
    rtts = []
    seq = sent = received = lost = late = send_err = 0
    t0 = time.monotonic()
    end = t0 + a.duration
    now = t0
    while now < end:
        while len(inflight) < a.window:
            try:
                s.sendto(struct.pack("!Q", seq) + pad, dst)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                send_err += 1
                break
            inflight[seq] = time.monotonic()
            seq += 1
            sent += 1
        r, _, _ = select.select([s], [], [], a.loss_timeout)
        now = time.monotonic()
        if not r:
            lost += len(inflight)
            inflight.clear()
            continue
        while True:
            try:
                data = s.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                break
            now = time.monotonic()
            if data.startswith(b"worker "):  # hello's echo prefix: `worker <id> (pid <pid>): `
                i = data.find(b"): ")
                data = data[i + 3:] if i >= 0 else data
            ts = inflight.pop(struct.unpack("!Q", data[:8])[0], None) if len(data) >= 8 else None
            if ts is None:
                late += 1
                continue
            if now <= end:
                received += 1
                rtts.append(now - ts)
    elapsed = min(time.monotonic(), end) - t0
    rtts.sort()

    def pct(p):
        return 1e3 * rtts[min(len(rtts) - 1, int(p / 100.0 * len(rtts)))] if rtts else None

    out = {"rps": received / elapsed if elapsed > 0 else None, "requests": received, "sent": sent,
           "received": received, "lost": lost, "late": late, "send_errors": send_err,
           "in_flight_at_end": len(inflight), "p50": pct(50), "p99": pct(99),
           "errors": lost + send_err, "duration_s": elapsed}
    print(json.dumps(out))
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
