"""Measurement machinery for bench/run.sh (Python 3 stdlib only).

Adapted from the team's research harness (shared/research/bench/lib/bench.py):
/proc probes, machine-quietness checks, wrk output parsing, starting a server in
its own session and stopping it by process group, per-worker stats files.

Everything here is loopback-only and bounded in time:
- ports are picked free at run time (bind to port 0, then release);
- wrk runs with -d and a hard subprocess timeout; the UDP client has a deadline;
- a server runs as `bash -c CMD` in a new session (pgid == sid == its pid) and
  is stopped with SIGTERM to that group, then SIGKILL after a grace period.
  Nothing is ever killed by name.
"""
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HZ = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
HERE = os.path.dirname(os.path.abspath(__file__))

WRK_LOADS = {
    # name: extra wrk args
    "keepalive": [],
    "close": ["-H", "Connection: close"],
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- /proc probes

def proc_stat_cpu():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    v += [0] * (8 - len(v))  # user nice system idle iowait irq softirq steal
    return {"user": v[0] + v[1], "system": v[2], "idle": v[3] + v[4],
            "irq": v[5], "softirq": v[6], "steal": v[7]}


def cpu_delta(a, b):
    d = {k: b[k] - a[k] for k in a}
    tot = sum(d.values()) or 1
    return {k: 100.0 * v / tot for k, v in d.items()}


def read_proc(pid):
    """utime+stime (s), reaped children's CPU, session, RSS and VmHWM (MiB)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rp = s.rfind(")")
    comm = s[s.find("(") + 1:rp]
    fields = s[rp + 2:].split()
    info = {"pid": pid, "comm": comm, "ppid": int(fields[1]), "sid": int(fields[3]),
            "cpu": (int(fields[11]) + int(fields[12])) / HZ,
            "ccpu": (int(fields[13]) + int(fields[14])) / HZ,
            "rss_mb": int(fields[21]) * PAGE / 2**20, "hwm_mb": None}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    info["hwm_mb"] = int(line.split()[1]) / 1024
                    break
    except OSError:
        pass
    return info


def all_procs():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p:
                out[p["pid"]] = p
    return out


def session_procs(sid):
    return {pid: p for pid, p in all_procs().items() if p["sid"] == sid}


def foreign_cpu(a, b, exclude_sid=None):
    """CPU-seconds used between snapshots a and b by anything other than the
    server session, this harness and its children (wrk, clients), ksoftirqd
    (which runs the benchmark's own network work). Returns (seconds, top)."""
    me = os.getpid()

    def mine(pid, p):
        return pid == me or p["ppid"] == me or (exclude_sid and p["sid"] == exclude_sid)

    total, use = 0.0, []
    for pid, p in b.items():
        if mine(pid, p) or p["comm"].startswith("ksoftirqd/"):
            continue
        q = a.get(pid)
        d = (p["cpu"] + p["ccpu"]) - ((q["cpu"] + q["ccpu"]) if q else 0.0)
        if d > 0:
            total += d
            use.append((d, f"{p['comm']}[{pid}]"))
    # a process that vanished was reaped into its parent's cutime with its
    # whole lifetime; the part used before the window is not foreign load
    for pid, q in a.items():
        if pid not in b and not mine(pid, q):
            total -= q["cpu"] + q["ccpu"]
    use.sort(reverse=True)
    return max(0.0, total), [f"{n}:{d:.2f}s" for d, n in use[:3] if d >= 0.05]


def background_busy(seconds):
    """(% of all CPUs used by other processes, % stolen by the hypervisor)."""
    a, sa, t0 = all_procs(), proc_stat_cpu(), time.time()
    time.sleep(seconds)
    b, sb, t1 = all_procs(), proc_stat_cpu(), time.time()
    return (100.0 * foreign_cpu(a, b)[0] / ((t1 - t0) * os.cpu_count()),
            cpu_delta(sa, sb)["steal"])


def wait_quiet(a):
    """Wait (bounded by a.quiet_wait) until the box is quiet. Returns a dict."""
    t0 = time.time()
    while True:
        bg, steal = background_busy(a.quiet_sample)
        quiet = bg <= a.quiet_threshold and steal <= a.max_steal
        if quiet or time.time() - t0 >= a.quiet_wait:
            break
    if not quiet:
        log(f"#   WARNING: background CPU {bg:.0f}% (max {a.quiet_threshold}%), steal {steal:.0f}% "
            f"(max {a.max_steal}%) after waiting {a.quiet_wait:.0f}s; measuring anyway")
    return {"bg_busy_pct": bg, "bg_steal_pct": steal, "bg_waited_s": time.time() - t0, "bg_quiet": quiet}


# ---------------------------------------------------------------- helpers

def free_port(host, kind=socket.SOCK_STREAM):
    """A port that is free right now (the kernel's pick for port 0)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=0.2):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(host, port, timeout=0.5):
    """One GET with Connection: close; True on an HTTP 200 status line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def to_ms(tok):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", tok)
    return float(m.group(1)) * UNIT[m.group(2)] if m else None


def parse_wrk(text):
    r = {"rps": None, "requests": None, "p50": None, "p90": None, "p99": None,
         "sock_err": {}, "non2xx": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", text)
    if m:
        r["requests"] = int(m.group(1))
    for pct in ("50", "90", "99"):
        m = re.search(r"^\s+%s%%\s+(\S+)" % pct, text, re.M)
        if m:
            r["p" + pct] = to_ms(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r["sock_err"] = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups())))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        r["non2xx"] = int(m.group(1))
    r["errors"] = sum(r["sock_err"].values()) + r["non2xx"]
    return r


def read_stats_dir(d):
    """{pid: (conns, reqs)} from files '<pid>' holding '<conns> <reqs>'."""
    out = {}
    for name in os.listdir(d):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(d, name)) as f:
                parts = f.read().split()
            out[int(name)] = (int(parts[0]), int(parts[1]) if len(parts) > 1 else int(parts[0]))
        except (OSError, ValueError, IndexError):
            pass
    return out


def balance(values):
    """(max/min, shares % sorted descending); None with fewer than 2 values."""
    vals = list(values)
    if len(vals) < 2:
        return None, []
    tot = sum(vals) or 1
    shares = [100.0 * v / tot for v in sorted(vals, reverse=True)]
    mn = min(vals)
    return (max(vals) / mn if mn > 0 else float("inf")), shares


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, spec, none="-"):
    if v is None:
        return none
    if v == float("inf"):
        return "inf"
    return format(v, spec)


def exec_form(cmd):
    """'A=1 prog args' -> 'A=1 exec prog args', so the server's master is the
    session leader itself (its CPU and RSS are then measured as the master).
    Compound commands are left alone; a shell leader with one child is then
    treated as a wrapper and the child as the master."""
    if re.search(r"[;&|\n()`]|\$\(", cmd) or re.match(r"\s*exec\s", cmd):
        return cmd
    m = re.match(r"\s*((?:[A-Za-z_][A-Za-z0-9_]*=(?:'[^']*'|\"[^\"]*\"|[^\s'\"])*\s+)*)(.*)$", cmd, re.S)
    return f"{m.group(1)}exec {m.group(2)}"


# ---------------------------------------------------------------- a server

# never hand the harness's own systemd context (if any) to a server under test:
# sockvisor would notify or take sockets from the wrong place
SCRUB_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID")


class Server:
    """A server command running in its own session; stop() signals only that
    process group (which this object created)."""

    def __init__(self, cmd, env, cwd, logpath):
        self.statsdir = tempfile.mkdtemp(prefix="bench-stats-")
        base = {k: v for k, v in os.environ.items() if k not in SCRUB_ENV}
        self.env = dict(base, BENCH_STATS_DIR=self.statsdir, **env)
        self.logpath = logpath
        self.logf = open(logpath, "w")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(["bash", "-c", exec_form(cmd)], stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=cwd, start_new_session=True)
        self.sid = self.proc.pid
        self.stopped = False

    def master(self):
        """The session leader, unless it is a shell wrapper with one child."""
        procs = session_procs(self.sid)
        if procs.get(self.sid, {}).get("comm") in ("bash", "sh", "dash"):
            kids = [p for p in procs.values() if p["ppid"] == self.sid]
            if len(kids) == 1:
                return kids[0]["pid"]
        return self.sid

    def wait_http(self, host, port, timeout):
        t0 = time.monotonic()
        while not http_ok(host, port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before serving "
                                   f"(see {self.logpath})")
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"server not serving HTTP after {timeout}s (see {self.logpath})")
            time.sleep(0.02)
        return time.monotonic() - self.t_start

    def stop(self, grace):
        """SIGTERM the process group, SIGKILL stragglers after `grace` s.
        Returns (clean, {pid: (conns, reqs)} from the stats files)."""
        if self.stopped:
            return True, {}
        self.stopped = True
        clean = True
        try:
            os.killpg(self.sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + grace
        while time.time() < deadline:
            if self.proc.poll() is not None and not session_procs(self.sid):
                break
            time.sleep(0.05)
        else:
            left = session_procs(self.sid)
            if left or self.proc.poll() is None:
                log(f"#   server session {self.sid} still has {sorted(left)} after {grace}s: SIGKILL")
                clean = False
                try:
                    os.killpg(self.sid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        self.logf.close()
        st = read_stats_dir(self.statsdir)
        shutil.rmtree(self.statsdir, ignore_errors=True)
        return clean, st


class Window:
    """Per-process CPU, foreign CPU and steal over a measured window."""

    def __init__(self, sid):
        self.sid = sid
        self.procs0 = session_procs(sid)
        self.all0 = all_procs()
        self.cpu0 = proc_stat_cpu()
        self.t0 = time.time()

    def close(self, master, client_cpu_s):
        wall = time.time() - self.t0
        cpu1 = proc_stat_cpu()
        procs1 = session_procs(self.sid)
        all1 = all_procs()
        rec = {"wall_s": wall, "client_cpu_s": client_cpu_s,
               "client_cpu_pct": 100.0 * client_cpu_s / wall}
        stat = cpu_delta(self.cpu0, cpu1)
        rec["steal_pct"] = stat["steal"]
        per = {}
        for pid, p1 in procs1.items():
            p0 = self.procs0.get(pid)
            per[pid] = {"comm": p1["comm"], "cpu_s": p1["cpu"] - (p0["cpu"] if p0 else 0.0),
                        "rss_mb": p1["rss_mb"], "hwm_mb": p1["hwm_mb"],
                        "role": "master" if pid == master else ("wrapper" if pid == self.sid else "worker")}
        rec["procs"] = {str(k): v for k, v in per.items()}
        m = per.get(master, {})
        rec["master_cpu_s"] = m.get("cpu_s")
        rec["master_rss_mb"] = m.get("rss_mb")
        rec["master_hwm_mb"] = m.get("hwm_mb")
        rec["server_cpu_s"] = sum(p["cpu_s"] for p in per.values())
        foreign, rec["foreign_top"] = foreign_cpu(self.all0, all1, self.sid)
        ksoft = sum(p["cpu"] - self.all0[pid]["cpu"] for pid, p in all1.items()
                    if p["comm"].startswith("ksoftirqd/") and pid in self.all0)
        cap = wall * os.cpu_count()
        rec["foreign_pct"] = 100.0 * foreign / cap
        rec["idle_pct"] = max(0.0, 100.0 * (1 - (rec["server_cpu_s"] + client_cpu_s + ksoft + foreign) / cap))
        workers = [p for p in per.values() if p["role"] == "worker"]
        rec["n_workers_seen"] = len(workers)
        rec["bal_cpu"], rec["cpu_shares"] = balance([p["cpu_s"] for p in workers])
        return rec


def children_cpu():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(a, url, load, duration, outpath=None):
    """One bounded wrk run; returns (parsed dict, client CPU seconds)."""
    cmd = ["wrk", "-t", str(a.threads), "-c", str(a.conns), "--timeout", a.wrk_timeout,
           "--latency", "-d", f"{duration}s"] + WRK_LOADS[load] + [url]
    ru0 = children_cpu()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 20, check=False)
    cpu = children_cpu() - ru0
    if outpath:
        with open(outpath, "w") as f:
            f.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    r = parse_wrk(res.stdout)
    r["wrk_rc"] = res.returncode
    return r, cpu


def run_udp_client(a, port, duration, outpath=None):
    """The bounded UDP echo client (udp_client.py) as a child; returns (dict, CPU s)."""
    cmd = [sys.executable, os.path.join(HERE, "udp_client.py"), "--host", a.host, "--port", str(port),
           "--duration", str(duration), "--window", str(a.udp_window), "--size", str(a.udp_size),
           "--flows", str(a.udp_flows)]
    ru0 = children_cpu()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 20, check=False)
    cpu = children_cpu() - ru0
    if outpath:
        with open(outpath, "w") as f:
            f.write(" ".join(cmd) + "\n" + res.stdout + res.stderr)
    try:
        r = json.loads(res.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        r = {"rps": None, "errors": None}
    r["client_rc"] = res.returncode
    return r, cpu


def strip_echo_prefix(data):
    """hello prefixes its UDP echo with `worker <id> (pid <pid>): `; the payload follows."""
    if data.startswith(b"worker "):
        i = data.find(b"): ")
        if i >= 0:
            return data[i + 3:]
    return data


def udp_echo_ok(host, port, timeout=0.3):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(b"probe", (host, port))
            return strip_echo_prefix(s.recvfrom(2048)[0]) == b"probe"
        except OSError:
            return False
