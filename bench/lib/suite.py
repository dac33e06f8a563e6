#!/usr/bin/env python3
"""sockvisor benchmark suite (entry point: bench/run.sh; see docs/benchmarks.md).

Parts, all in one invocation:
  http   every server config (sockvisor with each dispatch policy, the
         kernel-steered one included, the SO_REUSEPORT reference
         `hello --reuseport`, Node cluster rr/none) at each worker count, under
         the `close` and `keepalive` wrk loads, INTERLEAVED: per repetition
         every config runs once per load, and the order rotates between
         repetitions; medians over repetitions.
  udp    echoed datagrams/s and the per-worker balance through sockvisor's
         shared UDP socket and its per-worker reuseport sockets (and Node
         cluster's shared dgram socket for context), bounded python client
         sending from --udp-flows source ports.
  ready  time from exec to READY=1 on $NOTIFY_SOCKET with 8 workers, the
         workers' own start-up (reference: 8 `hello --reuseport` processes,
         exec to first HTTP 200), and the master's peak RSS after a short
         close load with 8 workers.
  long   (--long) balance over >= 100k connections of sockvisor's round robin,
         its kernel-steered round robin and the kernel's own SO_REUSEPORT hash
         (--long-servers), and master RSS sampled over a ~1M-connection run
         with 8 workers.

Results: runs.jsonl (every run, every attempt), config.json, wrk/client
output and server logs, summary.md (report.py) in bench/results/<timestamp>/.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness as H  # noqa: E402
import report  # noqa: E402

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(BENCH)

# Server command templates. The harness runs them with bash -c in their own
# session, with HOST, PORT, UDP_PORT, WORKERS, SOCKVISOR, HELLO, REFSERVER,
# BENCH, BENCH_STATS_DIR and SV_EXTRA (extra sockvisor flags: --sv-args, and
# --control PATH with --status) in the environment.
SV = "$SOCKVISOR --listen web=tcp://$HOST:$PORT --workers $WORKERS $SV_EXTRA"
HTTP_SERVERS = {
    "sv-rr": SV + " --dispatch round-robin -- $HELLO",
    "sv-shared": SV + " --dispatch shared -- $HELLO",
    "sv-iphash": SV + " --dispatch ip-hash -- $HELLO",
    "sv-lc": SV + " --dispatch least-connections -- $HELLO",
    "sv-reuseport": SV + " --dispatch reuseport -- $HELLO",
    "reuseport": "$HELLO --reuseport $HOST:$PORT --processes $WORKERS",
    "node-rr": "NODE_CLUSTER_SCHED_POLICY=rr node $BENCH/node/cluster.js",
    "node-none": "NODE_CLUSTER_SCHED_POLICY=none node $BENCH/node/cluster.js",
}
UDP_SERVERS = {
    "sv-udp-shared": SV + " --dispatch shared --listen dns=udp://$HOST:$UDP_PORT -- $HELLO",
    "sv-udp-reuseport": SV + " --dispatch reuseport --listen dns=udp://$HOST:$UDP_PORT -- $HELLO",
    "node-udp": "node $BENCH/node/cluster.js",
}
# servers whose session leader does not dispatch (kernel balancing): no
# "master CPU per connection" for them
NO_DISPATCHER = {"reuseport"}
READY_SERVER = SV + " -- $HELLO"
STARTUP_REF = "$HELLO --reuseport $HOST:$PORT --processes $WORKERS"
LONG_SERVER = SV + " --dispatch round-robin -- $HELLO"
# the long part's balance runs (--long-servers picks among them); the RSS run is sv-rr's
LONG_BALANCE = {
    "sv-rr": LONG_SERVER,
    "sv-reuseport": HTTP_SERVERS["sv-reuseport"],
    "reuseport": HTTP_SERVERS["reuseport"],
}

# --stand-in REFSERVER: the research C refserver plays sockvisor and the
# reuseport reference, so the plumbing can be checked before sockvisor exists.
# Its figures are NOT sockvisor's.
R = "$REFSERVER -w $WORKERS -p $PORT -H $HOST"
STANDIN_HTTP = {
    "sv-rr": R + " -m a",      # master accept + SCM_RIGHTS round robin
    "sv-shared": R + " -m b",  # shared fd, plain epoll
    "sv-iphash": R + " -m a",
    "sv-lc": R + " -m ab",
    "sv-reuseport": R + " -m c",
    "reuseport": R + " -m c",  # SO_REUSEPORT listener per worker
}
STANDIN_UDP = {"sv-udp-shared": "node $BENCH/node/cluster.js"}
STANDIN_READY = "python3 $BENCH/lib/notify_standin.py -- " + R + " -m a"
STANDIN_STARTUP_REF = R + " -m c"
STANDIN_LONG = R + " -m a"
STANDIN_LONG_BALANCE = {"sv-rr": STANDIN_LONG, "sv-reuseport": R + " -m c", "reuseport": R + " -m c"}

PROFILES = {
    #          reps  secs  workers  ready reps  long: conns for balance, for RSS
    "quick": dict(runs=2, duration=3, workers="2", ready_runs=3, retries=1, quiet_wait=20.0,
                  balance_conns=100_000, rss_conns=1_000_000),
    "full": dict(runs=5, duration=10, workers="2,4", ready_runs=10, retries=2, quiet_wait=120.0,
                 balance_conns=100_000, rss_conns=1_000_000),
}


def log(msg):
    H.log(msg)


class Ctx:
    def __init__(self, a, out):
        self.a = a
        self.out = out
        self.jl = open(os.path.join(out, "runs.jsonl"), "a")
        self.env = {"HOST": a.host, "BENCH": BENCH, "SOCKVISOR": a.sockvisor, "HELLO": a.hello,
                    "REFSERVER": a.stand_in or "", "REF_A": a.ref_a or "", "SV_EXTRA": a.sv_args}

    def write(self, rec):
        self.jl.write(json.dumps(rec) + "\n")
        self.jl.flush()


def contaminated(r, a):
    return r.get("foreign_pct", 0) > a.max_foreign or r.get("steal_pct", 0) > a.max_steal


def with_retries(ctx, fn, label):
    """Run fn() (one measured run -> record); repeat it (at most a.retries
    times) when other processes or the hypervisor took CPU during it; all
    attempts go to runs.jsonl, the report keeps the cleanest."""
    a = ctx.a
    for attempt in range(a.retries + 1):
        try:
            r = fn()
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            log(f"#   {label} FAILED: {e}")
            r = {"ok": False, "error": str(e)}
        r["attempt"] = attempt
        yield r
        time.sleep(a.cooldown)
        if not r.get("ok") or not contaminated(r, a):
            return
        if attempt < a.retries:
            log(f"#   {label}: foreign CPU {r['foreign_pct']:.0f}% "
                f"({', '.join(r.get('foreign_top') or []) or 'short-lived processes'}), "
                f"steal {r.get('steal_pct', 0):.0f}%: repeating")


# ---------------------------------------------------------------- http + udp

def measured_run(ctx, part, name, cmd, workers, load, rep):
    """One run: quiet check, start server on free port(s), wait until it serves,
    measure one bounded load, stop it by process group, read stats files."""
    a = ctx.a
    rec = {"part": part, "server": name, "workers": workers, "load": load, "rep": rep,
           "cmd": cmd, "ok": False}
    rec.update(H.wait_quiet(a))
    port = H.free_port(a.host)
    env = dict(ctx.env, PORT=str(port), WORKERS=str(workers))
    udp_port = None
    if load == "udp":
        udp_port = H.free_port(a.host, socket.SOCK_DGRAM)
        env["UDP_PORT"] = str(udp_port)
    tag = f"{name}.w{workers}.{load}.{rep}"
    control = None
    if a.status and "$SOCKVISOR" in cmd:
        control = os.path.join(tempfile.mkdtemp(prefix="bench-control-"), "control.sock")
        env["SV_EXTRA"] = f"{env['SV_EXTRA']} --control {control}"
    srv = H.Server(cmd, env, ROOT, os.path.join(ctx.out, f"{tag}.server.log"))
    try:
        rec["t_serving_s"] = srv.wait_http(a.host, port, a.ready_timeout)
        if udp_port:
            t0 = time.monotonic()
            while not H.udp_echo_ok(a.host, udp_port):
                if time.monotonic() - t0 > a.ready_timeout:
                    raise RuntimeError(f"no UDP echo on {udp_port} after {a.ready_timeout}s")
        time.sleep(a.settle)
        url = f"http://{a.host}:{port}/"
        if a.warmup > 0 and load != "udp":
            w, _ = H.run_wrk(a, url, load, a.warmup)
            if w["requests"] is None:
                raise RuntimeError("warm-up wrk failed")
        master = srv.master()
        win = H.Window(srv.sid)
        if load == "udp":
            r, ccpu = H.run_udp_client(a, udp_port, a.duration, os.path.join(ctx.out, f"{tag}.client.txt"))
        else:
            r, ccpu = H.run_wrk(a, url, load, a.duration, os.path.join(ctx.out, f"{tag}.wrk.txt"))
        rec.update(r)
        rec.update(win.close(master, ccpu))
        rec["ok"] = r.get("rps") is not None and (r.get("requests") or 0) > 0
        if control:
            rec.update(sv_status(a, control))
    finally:
        rec["clean_stop"], st = srv.stop(a.stop_grace)
        if control:
            shutil.rmtree(os.path.dirname(control), ignore_errors=True)
    rec["worker_stats"] = {str(k): v for k, v in st.items()}
    rec["stats_conns"] = sum(v[0] for v in st.values()) if st else None
    rec["stats_reqs"] = sum(v[1] for v in st.values()) if st else None
    rec["bal_conns"], rec["conn_shares"] = H.balance([v[0] for v in st.values()])
    rec["bal_reqs"], rec["req_shares"] = H.balance([v[1] for v in st.values()])
    if load == "udp":
        udp_balance(rec, workers)
    derive(rec)
    return rec


def udp_balance(rec, workers):
    """Per-worker echoed datagrams and flows (from the echo's worker prefix): max/min over
    `workers` workers, a worker that answered nothing counting as 0."""
    for src, bk, sk in (("per_worker", "bal_dgrams", "dgram_shares"),
                        ("flows_per_worker", "bal_flows", "flow_shares")):
        counts = list((rec.get(src) or {}).values())
        if counts:
            counts += [0] * max(0, workers - len(counts))
            rec[bk], rec[sk] = H.balance(counts)


def sv_status(a, control):
    """Per-worker `dispatched` counts from `sockvisor status --json --control PATH`
    (optional, --status). Best effort: a failure is recorded, not fatal."""
    try:
        res = subprocess.run([a.sockvisor, "status", "--json", "--control", control], capture_output=True,
                             text=True, timeout=5, check=False)
        doc = json.loads(res.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired) as e:
        return {"status_error": str(e)[:200]}
    st = doc.get("status", doc) if isinstance(doc, dict) else {}
    disp = [w.get("dispatched") for w in st.get("workers", []) if isinstance(w, dict)]
    disp = [d for d in disp if isinstance(d, int)]
    bal, shares = H.balance(disp)
    return {"status_dispatched": disp, "bal_dispatched": bal, "dispatched_shares": shares}


def derive(rec):
    """Per-connection master CPU (close load: one connection per request)."""
    req = rec.get("requests")
    if not req:
        return
    rec["server_us_per_req"] = 1e6 * rec["server_cpu_s"] / req
    if rec.get("master_cpu_s") is None or rec.get("n_workers_seen", 0) == 0 or rec["server"] in NO_DISPATCHER:
        return
    rec["master_us_per_req"] = 1e6 * rec["master_cpu_s"] / req
    if rec["load"] == "close":
        conns = rec.get("stats_conns") or req  # stats include the readiness probe(s)
        rec["master_us_per_conn"] = 1e6 * rec["master_cpu_s"] / conns
        rec["master_s_per_100k_conn"] = rec["master_us_per_conn"] * 0.1


def run_line(r):
    # close: per-worker connections; keepalive: requests; udp: echoed datagrams per worker
    # (from the echo's worker prefix)
    bk, sk = {"close": ("bal_conns", "conn_shares"), "keepalive": ("bal_reqs", "req_shares"),
              "udp": ("bal_dgrams", "dgram_shares")}[r["load"]]
    bal, sh = r.get(bk), r.get(sk)
    return (f"#   {r['server']:<10} w={r['workers']} {r['load']:<9} rep={r['rep']} "
            f"rps={H.fmt(r.get('rps'), '.0f')} p50={H.fmt(r.get('p50'), '.2f')} "
            f"p99={H.fmt(r.get('p99'), '.2f')}ms err={r.get('errors')} bal={H.fmt(bal, '.2f')} "
            f"[{'/'.join(f'{s:.0f}' for s in sh or [])}] "
            + (f"bal_dispatched={H.fmt(r.get('bal_dispatched'), '.3f')} " if "bal_dispatched" in r else "") +
            f"mstr_us/conn={H.fmt(r.get('master_us_per_conn'), '.1f')} "
            f"mstr_hwm={H.fmt(r.get('master_hwm_mb'), '.1f')}MB "
            f"srv_us/req={H.fmt(r.get('server_us_per_req'), '.1f')} "
            f"client={r.get('client_cpu_pct', 0):.0f}% fgn={r.get('foreign_pct', 0):.0f}% "
            f"steal={r.get('steal_pct', 0):.0f}%")


def rotated(items, rep, reps):
    """Start each repetition at a different, evenly spread position."""
    k = ((rep - 1) * len(items) // max(1, reps)) % max(1, len(items))
    return items[k:] + items[:k]


def part_matrix(ctx, part, servers, loads):
    a = ctx.a
    configs = [(n, c, w) for w in a.worker_counts for n, c in servers.items()]
    for rep in range(1, a.runs + 1):
        for li, load in enumerate(loads if rep % 2 else loads[::-1]):
            for name, cmd, w in rotated(configs, rep + li, a.runs):
                label = f"{name} w={w} {load} rep={rep}"
                for r in with_retries(ctx, lambda: measured_run(ctx, part, name, cmd, w, load, rep), label):
                    r.update({"part": part, "server": name, "workers": w, "load": load, "rep": rep})
                    ctx.write(r)
                    if r.get("ok"):
                        log(run_line(r))


# ---------------------------------------------------------------- ready

def ready_run(ctx, name, cmd, workers, rep, notify):
    """Time from exec to READY=1 (if notify) and to the first HTTP 200; then a
    short close load and the master's VmHWM."""
    a = ctx.a
    rec = {"part": "ready", "server": name, "workers": workers, "load": "ready", "rep": rep,
           "cmd": cmd, "ok": False}
    rec.update(H.wait_quiet(a))
    port = H.free_port(a.host)
    env = dict(ctx.env, PORT=str(port), WORKERS=str(workers))
    tmp = tempfile.mkdtemp(prefix="bench-notify-")
    sock = None
    if notify:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(os.path.join(tmp, "notify.sock"))
        env["NOTIFY_SOCKET"] = os.path.join(tmp, "notify.sock")
    srv = H.Server(cmd, env, ROOT, os.path.join(ctx.out, f"{name}.w{workers}.ready.{rep}.server.log"))
    try:
        if sock:
            deadline = srv.t_start + a.ready_timeout
            msgs = []
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"no READY=1 within {a.ready_timeout}s (got {msgs!r})")
                sock.settimeout(left)
                try:
                    data = sock.recv(4096)
                except socket.timeout:
                    continue
                msgs.append(data.decode(errors="replace"))
                if b"READY=1" in data.split(b"\n"):
                    rec["t_ready_ms"] = 1e3 * (time.monotonic() - srv.t_start)
                    break
            rec["notify_msgs"] = msgs
        rec["t_serving_ms"] = 1e3 * srv.wait_http(a.host, port, a.ready_timeout)
        master = srv.master()
        rec["n_procs"] = len(H.session_procs(srv.sid))
        p = H.read_proc(master)
        rec["rss_idle_mb"], rec["hwm_idle_mb"] = p["rss_mb"], p["hwm_mb"]
        if a.ready_load > 0:
            r, _ = H.run_wrk(a, f"http://{a.host}:{port}/", "close", a.ready_load)
            rec["load_requests"], rec["load_errors"] = r["requests"], r["errors"]
            p = H.read_proc(master)
        rec["master_rss_mb"], rec["master_hwm_mb"] = p["rss_mb"], p["hwm_mb"]
        rec["ok"] = True
    finally:
        rec["clean_stop"], _ = srv.stop(a.stop_grace)
        if sock:
            sock.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rec


def part_ready(ctx, cmd, ref_cmd):
    a = ctx.a
    pairs = [("sv-ready", cmd, True), ("startup-ref", ref_cmd, False)]
    for rep in range(1, a.ready_runs + 1):
        for name, c, notify in (pairs if rep % 2 else pairs[::-1]):
            try:
                r = ready_run(ctx, name, c, a.ready_workers, rep, notify)
            except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                log(f"#   {name} ready rep={rep} FAILED: {e}")
                r = {"part": "ready", "server": name, "workers": a.ready_workers, "load": "ready",
                     "rep": rep, "ok": False, "error": str(e)}
            r["attempt"] = 0
            ctx.write(r)
            if r.get("ok"):
                log(f"#   {name:<11} w={a.ready_workers} ready rep={rep} "
                    f"t_ready={H.fmt(r.get('t_ready_ms'), '.1f')}ms t_serving={r['t_serving_ms']:.1f}ms "
                    f"procs={r['n_procs']} master_rss={r['master_rss_mb']:.2f}MB hwm={r['master_hwm_mb']:.2f}MB")
            time.sleep(a.cooldown)


# ---------------------------------------------------------------- long

def long_run(ctx, name, cmd, workers, target, kind):
    """Repeated bounded wrk close chunks against one server instance until
    `target` connections (or --long-max-s); master RSS sampled per chunk."""
    a = ctx.a
    rec = {"part": "long", "kind": kind, "server": name, "workers": workers, "load": "close",
           "rep": 1, "cmd": cmd, "target_conns": target, "ok": False}
    rec.update(H.wait_quiet(a))
    port = H.free_port(a.host)
    env = dict(ctx.env, PORT=str(port), WORKERS=str(workers))
    srv = H.Server(cmd, env, ROOT, os.path.join(ctx.out, f"{name}.w{workers}.long-{kind}.server.log"))
    samples, total, errors, t0 = [], 0, 0, time.monotonic()
    try:
        srv.wait_http(a.host, port, a.ready_timeout)
        time.sleep(a.settle)
        master = srv.master()
        p0 = H.read_proc(master)
        samples.append({"conns": 0, "t_s": 0.0, "rss_mb": p0["rss_mb"], "hwm_mb": p0["hwm_mb"], "cpu_s": p0["cpu"]})
        url = f"http://{a.host}:{port}/"
        while total < target and time.monotonic() - t0 < a.long_max_s:
            r, _ = H.run_wrk(a, url, "close", a.long_chunk)
            if r["requests"] is None:
                raise RuntimeError("wrk failed during the long run")
            total += r["requests"]
            errors += r["errors"]
            p = H.read_proc(master)
            samples.append({"conns": total, "t_s": time.monotonic() - t0, "rss_mb": p["rss_mb"],
                            "hwm_mb": p["hwm_mb"], "cpu_s": p["cpu"], "rps": r["rps"]})
        rec["ok"] = total >= target
        if not rec["ok"]:
            log(f"#   {name} long-{kind}: only {total} of {target} connections within {a.long_max_s}s")
    finally:
        rec["clean_stop"], st = srv.stop(a.stop_grace)
    rec.update({"wrk_conns": total, "errors": errors, "samples": samples, "wall_s": time.monotonic() - t0})
    rec["stats_conns"] = sum(v[0] for v in st.values()) if st else None
    rec["bal_conns"], rec["conn_shares"] = H.balance([v[0] for v in st.values()])
    rec["worker_stats"] = {str(k): v for k, v in st.items()}
    if len(samples) > 1 and total:
        rec["master_us_per_conn"] = 1e6 * (samples[-1]["cpu_s"] - samples[0]["cpu_s"]) / total
    return rec


def part_long(ctx, cmd, balance_servers):
    """Balance runs: every server of `balance_servers` at every worker count, one after the
    other per worker count (the same minutes of the same run); then sv-rr's RSS run."""
    a = ctx.a
    jobs = [("balance", name, bcmd, w, a.balance_conns) for w in a.worker_counts
            for name, bcmd in balance_servers.items()]
    if a.rss_conns > 0:
        jobs.append(("rss", "sv-rr", cmd, a.ready_workers, a.rss_conns))
    for kind, name, c, w, target in jobs:
        log(f"# long: {kind}, {name}, {w} workers, {target} connections (at most {a.long_max_s:.0f}s)")
        try:
            r = long_run(ctx, name, c, w, target, kind)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            log(f"#   long {kind} FAILED: {e}")
            r = {"part": "long", "kind": kind, "server": name, "workers": w, "load": "close",
                 "rep": 1, "ok": False, "error": str(e)}
        r["attempt"] = 0
        ctx.write(r)
        s = r.get("samples") or []
        if s:
            log(f"#   long-{kind} {name} w={w}: {r['wrk_conns']} conns, stats {r.get('stats_conns')}, "
                f"bal={H.fmt(r.get('bal_conns'), '.4f')}, errors={r['errors']}, "
                f"rss {s[0]['rss_mb']:.2f} -> {s[len(s) // 2]['rss_mb']:.2f} -> {s[-1]['rss_mb']:.2f} MB, "
                f"hwm {s[-1]['hwm_mb']:.2f} MB")


# ---------------------------------------------------------------- main

def pick(ap, servers, names, what):
    """`servers` restricted to the comma list `names`; an unknown name is a usage error."""
    want = [x for x in names.split(",") if x]
    unknown = [x for x in want if x not in servers]
    if unknown:
        ap.error(f"unknown {what} {unknown}; known: {', '.join(servers)}")
    return {k: v for k, v in servers.items() if k in want}


def main():
    ap = argparse.ArgumentParser(prog="run.sh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=PROFILES, default="full")
    ap.add_argument("--long", action="store_true", help="add the long part (balance 100k, RSS over ~1M)")
    ap.add_argument("--parts", default=None, help="comma list of http,udp,ready,long (default: http,udp,ready "
                                                   "plus long with --long)")
    ap.add_argument("--ref-a", metavar="REFSERVER", default=None,
                    help="also run the research C reference dispatcher (refserver -m a: blocking accept + "
                         "SCM_RIGHTS round robin) as server `ref-a`, for a same-run dispatcher CPU baseline")
    ap.add_argument("--stand-in", metavar="REFSERVER", default=None,
                    help="path to the research refserver binary: it plays sockvisor and the reuseport "
                         "reference (harness validation only; figures are not sockvisor's)")
    ap.add_argument("--sockvisor", default=os.path.join(ROOT, "target/release/sockvisor"))
    ap.add_argument("--hello", default=os.path.join(ROOT, "target/release/examples/hello"))
    ap.add_argument("--sv-args", default="", help="extra flags for every sockvisor command (word-split)")
    ap.add_argument("--status", action="store_true",
                    help="also read per-worker `dispatched` counts with `sockvisor status --json --control PATH`")
    ap.add_argument("--servers", default=None, help="comma list of http server names to run (default all)")
    ap.add_argument("--udp-servers", default=None, help="comma list of udp server names to run (default all)")
    ap.add_argument("--loads", default="close,keepalive")
    ap.add_argument("-n", "--runs", type=int, help="repetitions")
    ap.add_argument("-d", "--duration", type=int, help="seconds per measured run")
    ap.add_argument("--workers", dest="workers", help="worker counts, comma list")
    ap.add_argument("--ready-runs", type=int)
    ap.add_argument("--ready-workers", type=int, default=8)
    ap.add_argument("--ready-load", type=int, default=2, help="seconds of close load before reading VmHWM")
    ap.add_argument("--balance-conns", type=int)
    ap.add_argument("--rss-conns", type=int)
    ap.add_argument("--long-chunk", type=int, default=5, help="seconds per wrk chunk in the long part")
    ap.add_argument("--long-max-s", type=float, default=300.0, help="bound on each long run")
    ap.add_argument("--long-servers", default=",".join(LONG_BALANCE),
                    help=f"servers of the long balance runs (comma list of {', '.join(LONG_BALANCE)}); "
                         "--rss-conns 0 leaves out the RSS run")
    ap.add_argument("-c", "--conns", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("-w", "--warmup", type=int, default=0)
    ap.add_argument("--udp-window", type=int, default=32)
    ap.add_argument("--udp-size", type=int, default=64)
    ap.add_argument("--udp-flows", type=int, default=4096,
                    help="source ports of the UDP client (flows; the reuseport policy keeps a flow on one "
                         "worker, so its balance needs many); 1 = one socket")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--settle", type=float, default=0.5)
    ap.add_argument("--cooldown", type=float, default=1.0)
    ap.add_argument("--quiet-sample", type=float, default=0.5)
    ap.add_argument("--quiet-threshold", type=float, default=10.0)
    ap.add_argument("--quiet-wait", type=float)
    ap.add_argument("--max-foreign", type=float, default=5.0)
    ap.add_argument("--max-steal", type=float, default=3.0)
    ap.add_argument("--retries", type=int)
    ap.add_argument("--ready-timeout", type=float, default=15.0)
    ap.add_argument("--stop-grace", type=float, default=5.0)
    ap.add_argument("--wrk-timeout", default="2s")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    for k, v in PROFILES[a.profile].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.worker_counts = [int(x) for x in str(a.workers).split(",") if x]
    if not (a.host.startswith("127.") or a.host == "::1"):
        ap.error("--host must be a loopback address")
    parts = (a.parts or "http,udp,ready" + (",long" if a.long else "")).split(",")
    loads = [l for l in a.loads.split(",") if l]
    for l in loads:
        if l not in H.WRK_LOADS:
            ap.error(f"unknown load {l}")

    http_servers = dict(HTTP_SERVERS)
    udp_servers = dict(UDP_SERVERS)
    ready_cmd, startup_ref, long_cmd = READY_SERVER, STARTUP_REF, LONG_SERVER
    long_balance = dict(LONG_BALANCE)
    if a.stand_in:
        a.stand_in = os.path.abspath(a.stand_in)
        http_servers.update(STANDIN_HTTP)
        udp_servers = dict(STANDIN_UDP, **{k: v for k, v in udp_servers.items() if k == "node-udp"})
        ready_cmd, startup_ref, long_cmd = STANDIN_READY, STANDIN_STARTUP_REF, STANDIN_LONG
        long_balance = dict(STANDIN_LONG_BALANCE)
    long_balance = pick(ap, long_balance, a.long_servers, "--long-servers")
    if a.ref_a:
        a.ref_a = os.path.abspath(a.ref_a)
        http_servers["ref-a"] = "$REF_A -w $WORKERS -p $PORT -H $HOST -m a"
    if a.udp_servers:
        udp_servers = pick(ap, udp_servers, a.udp_servers, "UDP server(s)")
    if a.servers:
        http_servers = pick(ap, http_servers, a.servers, "server(s)")

    used = list(http_servers.values()) * ("http" in parts) + list(udp_servers.values()) * ("udp" in parts) \
        + [ready_cmd, startup_ref] * ("ready" in parts) + ([long_cmd] + list(long_balance.values())) * ("long" in parts)
    for var, path in (("$SOCKVISOR", a.sockvisor), ("$HELLO", a.hello)):
        if any(var in c for c in used) and not os.access(path, os.X_OK):
            ap.error(f"{path} is missing or not executable (build it, or check the harness with --stand-in)")
    out = a.out or os.path.join(BENCH, "results", time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    ctx = Ctx(a, out)
    per = a.duration + a.settle + a.cooldown + a.quiet_sample + 1.5
    est = 0.0
    if "http" in parts:
        est += per * a.runs * len(loads) * len(http_servers) * len(a.worker_counts)
    if "udp" in parts:
        est += per * a.runs * len(udp_servers) * len(a.worker_counts)
    if "ready" in parts:
        est += 2 * a.ready_runs * (a.ready_load + 3)
    log(f"# profile {a.profile}{' (STAND-INS: refserver plays sockvisor)' if a.stand_in else ''}: parts "
        f"{','.join(parts)}; {a.runs} reps x {a.duration}s; workers {a.worker_counts}; "
        f"~{est / 60:.0f} min{' + long part' if 'long' in parts else ''}; results in {out}")
    log(f"# {os.cpu_count()} CPUs shared by the client and the servers: compare ratios within one invocation")
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"args": {k: v for k, v in vars(a).items()}, "parts": parts, "loads": loads,
                   "http_servers": http_servers, "udp_servers": udp_servers, "ready_cmd": ready_cmd,
                   "startup_ref": startup_ref, "long_cmd": long_cmd, "long_balance": long_balance,
                   "stand_in": bool(a.stand_in),
                   "uname": " ".join(os.uname()), "cpus": os.cpu_count(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)  # servers are stopped in finally blocks
    interrupted = False
    try:
        if "http" in parts:
            part_matrix(ctx, "http", http_servers, loads)
        if "udp" in parts:
            part_matrix(ctx, "udp", udp_servers, ["udp"])
        if "ready" in parts:
            part_ready(ctx, ready_cmd, startup_ref)
        if "long" in parts:
            part_long(ctx, long_cmd, long_balance)
    except KeyboardInterrupt:
        interrupted = True
        log("# interrupted: the running server was stopped; partial summary follows")
    ctx.jl.close()
    text = report.render(out)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    log(f"# results: {out}/summary.md, {out}/runs.jsonl")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
