#!/usr/bin/env python3
"""Bounded UDP echo client: keeps --window datagrams in flight against an echo
server for --duration seconds and prints one JSON line:
  {"rps": echoed datagrams/s, "sent", "received", "lost", "late", "p50", "p99" (ms RTT), "errors",
   "flows", "per_worker": {pid: datagrams}, "flows_per_worker": {pid: flows}, "split_flows"}

--flows N (many-source-ports mode): N sockets, each bound to its own source port
(a flow: one 4-tuple), and the datagrams go out through them in turn. A
kernel-steered server (sockvisor --dispatch reuseport) places each flow on one
worker by the packet's hash, so balance over workers needs many flows; with
--flows 1 every datagram is one flow. The echo's `worker <id> (pid <pid>): `
prefix (examples/hello) says which worker answered: "per_worker" counts echoed
datagrams per worker pid, "flows_per_worker" the flows each worker answered at
least once, and "split_flows" the flows answered by more than one worker
(0 when the server keeps a flow on one worker).

A datagram not answered within --loss-timeout counts as lost and its slot is
reused, so a server that drops datagrams slows the client but never stalls it.
Each datagram carries an 8-byte sequence number; the echo must return it
unchanged (sockvisor's hello worker and bench/node/cluster.js echo the payload).
Python stdlib only; one thread, epoll: on a 2-CPU box the client itself is
usually the bottleneck, so compare servers measured in the same invocation.
"""
import argparse
import json
import resource
import select
import socket
import struct
import sys
import time


def worker_of(data):
    """(worker pid or None, payload) from hello's `worker <id> (pid <pid>): ` prefix."""
    if not data.startswith(b"worker "):
        return None, data
    i = data.find(b"): ")
    if i < 0:
        return None, data
    head = data[:i]
    j = head.find(b"(pid ")
    return (head[j + 5:].decode(errors="replace") if j >= 0 else None), data[i + 3:]


def open_flows(host, n):
    """n non-blocking sockets, each on its own source port."""
    need = n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            sys.exit(f"udp_client: --flows {n} needs {need} fds; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
        if n == 1:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind((host, 0))
        s.setblocking(False)
        socks.append(s)
    return socks


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--window", type=int, default=32, help="datagrams in flight")
    ap.add_argument("--size", type=int, default=64, help="payload bytes (>= 8)")
    ap.add_argument("--flows", type=int, default=1, help="source ports (sockets), used in turn")
    ap.add_argument("--loss-timeout", type=float, default=0.1, help="seconds without any reply")
    a = ap.parse_args()
    if not a.host.startswith("127.") and a.host != "::1":
        ap.error("loopback only")
    if a.flows < 1:
        ap.error("--flows must be at least 1")
    pad = b"x" * max(0, a.size - 8)
    dst = (a.host, a.port)
    socks = open_flows(a.host, a.flows)
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    ep = select.epoll()
    for s in socks:
        ep.register(s.fileno(), select.EPOLLIN)
    inflight = {}
    rtts = []
    per_worker = {}
    flow_worker = {}   # flow index -> set of worker pids that answered it
    seq = sent = received = lost = late = send_err = 0
    turn = 0
    t0 = time.monotonic()
    end = t0 + a.duration
    now = t0
    while now < end:
        while len(inflight) < a.window:
            try:
                socks[turn].sendto(struct.pack("!Q", seq) + pad, dst)
            except (BlockingIOError, ConnectionRefusedError, OSError):
                send_err += 1
                break
            turn = (turn + 1) % a.flows
            inflight[seq] = time.monotonic()
            seq += 1
            sent += 1
        events = ep.poll(a.loss_timeout)
        now = time.monotonic()
        if not events:
            lost += len(inflight)
            inflight.clear()
            continue
        for fd, _ in events:
            flow = by_fd[fd]
            s = socks[flow]
            while True:
                try:
                    data = s.recv(65536)
                except (BlockingIOError, ConnectionRefusedError):
                    break
                now = time.monotonic()
                pid, data = worker_of(data)
                ts = inflight.pop(struct.unpack("!Q", data[:8])[0], None) if len(data) >= 8 else None
                if ts is None:
                    late += 1
                    continue
                if now <= end:
                    received += 1
                    rtts.append(now - ts)
                    if pid is not None:
                        per_worker[pid] = per_worker.get(pid, 0) + 1
                        flow_worker.setdefault(flow, set()).add(pid)
    elapsed = min(time.monotonic(), end) - t0
    rtts.sort()

    def pct(p):
        return 1e3 * rtts[min(len(rtts) - 1, int(p / 100.0 * len(rtts)))] if rtts else None

    flows_per_worker = {}
    for pids in flow_worker.values():
        for pid in pids:
            flows_per_worker[pid] = flows_per_worker.get(pid, 0) + 1
    out = {"rps": received / elapsed if elapsed > 0 else None, "requests": received, "sent": sent,
           "received": received, "lost": lost, "late": late, "send_errors": send_err,
           "in_flight_at_end": len(inflight), "p50": pct(50), "p99": pct(99),
           "errors": lost + send_err, "duration_s": elapsed, "flows": a.flows,
           "flows_answered": len(flow_worker), "per_worker": per_worker,
           "flows_per_worker": flows_per_worker,
           "split_flows": sum(1 for p in flow_worker.values() if len(p) > 1)}
    print(json.dumps(out))
    return 0 if received else 1


if __name__ == "__main__":
    sys.exit(main())
