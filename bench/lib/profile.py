#!/usr/bin/env python3
"""Instructions per dispatched connection of sockvisor's master (bench/profile.sh).

callgrind (default; works in VMs without hardware counters):
  runs sockvisor under `valgrind --tool=callgrind` (workers are exec'd
  natively: --trace-children=no) twice, serving exactly BASE and BASE+CONNS
  connections from a bounded client (conn_client.py), and reports
      Ir per connection = (Ir(BASE+CONNS) - Ir(BASE)) / CONNS
  so start-up and shutdown cancel out. Readiness is read from /proc/net/tcp
  (LISTEN state), so no probe connection is made. Deterministic up to the
  number of epoll wake-ups, i.e. reproducible to about 1%.
perf (--tool perf; needs a PMU: bare metal, or a VM that exposes one):
  `perf stat -e instructions,cycles,task-clock -p MASTER` around CONNS
  connections of the native binary.

Outputs (in --out): callgrind.<n>.<pid> files, annotate.txt (top functions of
the larger run, from callgrind_annotate), result.json, server logs.
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def listening(port):
    """True when something LISTENs on 127.0.0.1:port (from /proc/net/tcp, no connection made)."""
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            return any(l.split()[1] == want and l.split()[3] == "0A" for l in f)
    except OSError:
        return False


def server_cmd(a, port):
    if a.stand_in:
        return f"{a.stand_in} -m a -w {a.workers} -p {port} -H 127.0.0.1"
    return (f"{a.sockvisor} --listen web=tcp://127.0.0.1:{port} --workers {a.workers} "
            f"--dispatch {a.dispatch} -- {a.hello}")


def client(a, port, n):
    cmd = [sys.executable, os.path.join(HERE, "conn_client.py"), "--port", str(port), "--conns", str(n),
           "--concurrency", str(a.concurrency), "--timeout", str(a.client_timeout)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=a.client_timeout + 30, check=False)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"client failed: {res.stdout[-300:]} {res.stderr[-300:]}")


def start(a, cmd, port, tag):
    srv = H.Server(cmd, {"PORT": str(port), "HOST": "127.0.0.1"}, ROOT, os.path.join(a.out, f"{tag}.server.log"))
    t0 = time.monotonic()
    while not listening(port):
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode} (see {srv.logpath})")
        if time.monotonic() - t0 > a.ready_timeout:
            srv.stop(a.stop_grace)
            raise RuntimeError(f"not listening after {a.ready_timeout}s (see {srv.logpath})")
        time.sleep(0.05)
    time.sleep(a.settle)  # let the workers start
    return srv


def callgrind_totals(path):
    """{event: total} from a callgrind out file (events: Ir sysCount sysTime ...)."""
    events, totals = None, None
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            m = re.match(r"(?:summary|totals):\s+(.*)", line)
            if m:
                totals = [int(x) for x in m.group(1).split()]
    if not events or not totals:
        raise RuntimeError(f"no totals in {path}")
    return dict(zip(events, totals))


def run_callgrind(a):
    res = {"tool": "callgrind", "conns": a.conns, "base": a.base, "runs": []}
    for n in (a.base, a.base + a.conns):
        port = H.free_port("127.0.0.1")
        cmd = (f"valgrind --tool=callgrind --trace-children=no --collect-systime=usec --callgrind-out-file={a.out}/callgrind.{n}.%p "
               + server_cmd(a, port))
        H.log(f"# callgrind: {n} connections: {cmd}")
        srv = start(a, cmd, port, f"callgrind.{n}")
        try:
            c = client(a, port, n)
        finally:
            clean, _ = srv.stop(a.stop_grace)
        path = os.path.join(a.out, f"callgrind.{n}.{srv.sid}")
        if not os.path.exists(path):
            raise RuntimeError(f"{path} was not written (clean stop: {clean}; see the server log)")
        tot = callgrind_totals(path)
        ir = tot["Ir"]
        res["runs"].append({"conns": n, "ir": ir, "syscalls": tot.get("sysCount"), "client": c,
                            "file": path, "clean_stop": clean})
        H.log(f"#   Ir={ir} syscalls={tot.get('sysCount')} client={c}")
        if c["ok"] != n:
            H.log(f"#   WARNING: {n - c['ok']} connections failed; the per-connection figure is off")
    r0, r1 = res["runs"]
    res["ir_per_conn"] = (r1["ir"] - r0["ir"]) / a.conns
    if r0["syscalls"] is not None and r1["syscalls"] is not None:
        res["syscalls_per_conn"] = (r1["syscalls"] - r0["syscalls"]) / a.conns
    ann = subprocess.run(["callgrind_annotate", "--inclusive=no", "--show=Ir", "--sort=Ir", r1["file"]], capture_output=True,
                         text=True, timeout=120, check=False)
    with open(os.path.join(a.out, "annotate.txt"), "w") as f:
        f.write(ann.stdout + ann.stderr)
    top = [l for l in ann.stdout.splitlines() if re.match(r"\s*[\d,]+ \(", l)][:12]
    res["top"] = top
    return res


def run_perf(a):
    port = H.free_port("127.0.0.1")
    srv = start(a, server_cmd(a, port), port, "perf")
    outf = os.path.join(a.out, "perf.txt")
    try:
        master = srv.master()
        p0 = H.read_proc(master)
        perf = subprocess.Popen(["perf", "stat", "-x,", "-o", outf, "-e", "instructions,cycles,task-clock",
                                 "-p", str(master)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        c = client(a, port, a.conns)
        p1 = H.read_proc(master)
        perf.send_signal(signal.SIGINT)  # our own child, by pid
        perf.wait(timeout=10)
    finally:
        srv.stop(a.stop_grace)
    res = {"tool": "perf", "conns": a.conns, "client": c,
           "master_cpu_us_per_conn": 1e6 * (p1["cpu"] - p0["cpu"]) / max(1, c["ok"])}
    with open(outf) as f:
        for line in f:
            parts = line.strip().split(",")  # value,unit,event,...
            if len(parts) < 3 or not parts[2].startswith(("instructions", "cycles", "task-clock")):
                continue
            ev = parts[2]
            try:
                val = float(parts[0])
            except ValueError:
                res[ev] = parts[0]  # "<not supported>" in most VMs
                continue
            res[ev] = val
            if ev == "task-clock" and parts[1] == "msec":
                res["task_clock_us_per_conn"] = 1e3 * val / a.conns
            else:
                res[ev + "_per_conn"] = val / a.conns
    return res


def main():
    ap = argparse.ArgumentParser(prog="profile.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", choices=("callgrind", "perf"), default="callgrind")
    ap.add_argument("--sockvisor", default=os.path.join(ROOT, "target/profile/release/sockvisor"))
    ap.add_argument("--hello", default=os.path.join(ROOT, "target/profile/release/examples/hello"))
    ap.add_argument("--stand-in", metavar="REFSERVER", help="profile the research refserver (mode a) instead")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--dispatch", default="round-robin")
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--base", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--ready-timeout", type=float, default=120.0)
    ap.add_argument("--client-timeout", type=float, default=600.0)
    ap.add_argument("--stop-grace", type=float, default=60.0, help="valgrind needs time to write its dump")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    a.out = os.path.abspath(a.out or os.path.join(ROOT, "bench", "results", "profile-" + time.strftime("%Y%m%d-%H%M%S")))
    os.makedirs(a.out, exist_ok=True)
    res = run_callgrind(a) if a.tool == "callgrind" else run_perf(a)
    res["server"] = server_cmd(a, 0).replace(":0 ", ":PORT ").replace("-p 0 ", "-p PORT ")
    res["stand_in"] = bool(a.stand_in)
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump(res, f, indent=1)
    if a.tool == "callgrind":
        print(f"{'STAND-IN (refserver -m a) ' if a.stand_in else ''}master instructions (Ir) per connection: "
              f"{res['ir_per_conn']:.0f}  [({res['runs'][1]['ir']} - {res['runs'][0]['ir']}) / {a.conns}; "
              f"{a.workers} workers, {a.concurrency} concurrent]")
        if "syscalls_per_conn" in res:
            print(f"master system calls per connection: {res['syscalls_per_conn']:.2f}  "
                  f"(callgrind counts user-space instructions only; the kernel work is behind these calls)")
        print("top functions of the larger run (self Ir; full list in annotate.txt):")
        print("\n".join(res["top"]))
    else:
        print(json.dumps(res, indent=1))
    print(f"# {a.out}/result.json")


if __name__ == "__main__":
    main()
