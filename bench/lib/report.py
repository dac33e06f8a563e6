#!/usr/bin/env python3
"""Markdown summary of a bench/run.sh results directory (written as summary.md
by run.sh; re-render any time with `python3 bench/lib/report.py DIR`).

For each (part, server, workers, load, rep) the successful attempt with the
least foreign CPU + steal is used. Runs with steal > 3% or foreign CPU > 5% are
left out of the medians, unless that would leave a config with no run at all:
then they are used and the row is marked with a dagger. Ratios are taken per
repetition (both runs in the same repetition, minutes apart at most), then the
median of those ratios is shown; only repetitions where both runs are clean
count, unless there is none (then all, and the ratio is marked with a dagger).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import fmt, med  # noqa: E402

MAX_STEAL, MAX_FOREIGN = 3.0, 5.0
REF = "reuseport"


def dirty(r):
    return r.get("steal_pct", 0) > MAX_STEAL or r.get("foreign_pct", 0) > MAX_FOREIGN


def load_dir(d):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    groups = {}
    with open(os.path.join(d, "runs.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                key = (r.get("part"), r.get("server"), r.get("workers"), r.get("load"), r.get("rep"), r.get("kind"))
                groups.setdefault(key, []).append(r)
    recs = []
    for att in groups.values():
        ok = [r for r in att if r.get("ok")]
        key = lambda r: r.get("foreign_pct", 0) + r.get("steal_pct", 0)
        recs.append(min(ok, key=key) if ok else att[-1])
    return cfg, recs


class Sel:
    def __init__(self, recs):
        self.recs = recs

    def all_ok(self, part, server, workers, load):
        return [r for r in self.recs if r.get("part") == part and r.get("server") == server
                and r.get("workers") == workers and r.get("load") == load and r.get("ok")]

    def rows(self, part, server, workers, load):
        """(runs used, True if contaminated runs had to be used)."""
        rs = self.all_ok(part, server, workers, load)
        clean = [r for r in rs if not dirty(r)]
        return (clean, False) if clean or not rs else (rs, True)

    def ratio(self, part, x, b, workers, load, key):
        """Median (min, max) of x/b over repetitions where both ran; only pairs
        where both runs are clean, unless there is no such pair (then all
        pairs, flagged). Returns (median, min, max, flagged)."""
        bb = {r["rep"]: r for r in self.all_ok(part, b, workers, load)}
        pairs = [(r, bb[r["rep"]]) for r in self.all_ok(part, x, workers, load)
                 if r["rep"] in bb and r.get(key) and bb[r["rep"]].get(key)]
        clean = [(p, q) for p, q in pairs if not dirty(p) and not dirty(q)]
        use, flagged = (clean, False) if clean else (pairs, bool(pairs))
        vals = [p[key] / q[key] for p, q in use]
        return (med(vals), min(vals), max(vals), flagged) if vals else (None, None, None, False)


def shares_of(rs, bk, sk):
    withsh = sorted([r for r in rs if r.get(sk)], key=lambda r: r[bk] if r[bk] is not None else 0)
    return "/".join(f"{x:.0f}" for x in withsh[len(withsh) // 2][sk]) if withsh else "-"


def render(d):
    cfg, recs = load_dir(d)
    S = Sel(recs)
    a = cfg["args"]
    L = []
    L.append(f"# sockvisor benchmark run {os.path.basename(os.path.normpath(d))}")
    L.append("")
    L.append(f"- profile `{a['profile']}`, parts {', '.join(cfg['parts'])}; {a['runs']} repetitions x "
             f"{a['duration']} s; wrk -t{a['threads']} -c{a['conns']}; workers {a['worker_counts']}; "
             f"started {cfg.get('started', '?')}")
    L.append(f"- machine: {cfg['cpus']} CPUs, `{cfg['uname']}`")
    if cfg.get("stand_in"):
        L.append("- **STAND-IN RUN**: the research C refserver plays sockvisor (`sv-rr`/`sv-iphash`: mode a, "
                 "`sv-shared`: mode b, `sv-lc`: mode ab) and the reuseport reference (mode c); Node cluster "
                 "plays `sv-udp`; a python wrapper sends READY=1. These figures check the harness, they are "
                 "**not** sockvisor's.")
    used = [r for r in recs if r.get("ok")]
    nd = sum(1 for r in used if dirty(r))
    failed = [r for r in recs if not r.get("ok")]
    L.append(f"- {len(used)} successful runs ({nd} contaminated: steal > {MAX_STEAL}% or foreign CPU > "
             f"{MAX_FOREIGN}%; left out where a clean run exists, else used and marked †); "
             f"{len(failed)} failed" + (": " + "; ".join(
                 f"{r.get('server')} w={r.get('workers')} {r.get('load')} rep={r.get('rep')}: "
                 f"{(r.get('error') or 'no result')[:120]}" for r in failed[:8]) if failed else ""))
    L.append("")

    http = cfg.get("http_servers", {})
    wc = a["worker_counts"]
    if "http" in cfg["parts"]:
        L.append("## HTTP (medians over repetitions)")
        L.append("")
        L.append("| server | workers | load | runs | req/s (min-max) | p50 ms | p99 ms | errors (all runs) "
                 "| balance max/min (shares %) | master µs/conn | master CPU s /100k conn | server CPU µs/req "
                 "| master peak RSS MiB | req/s vs reuseport | p99 vs reuseport |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for load in cfg["loads"]:
            for w in wc:
                for name in http:
                    rs, flag = S.rows("http", name, w, load)
                    if not rs:
                        L.append(f"| {name} | {w} | {load} | 0 | (no successful run) |||||||||||")
                        continue
                    bk, sk = ("bal_conns", "conn_shares") if load == "close" else ("bal_reqs", "req_shares")
                    rps = [r["rps"] for r in rs]
                    rr = S.ratio("http", name, REF, w, load, "rps")
                    pr = S.ratio("http", name, REF, w, load, "p99")
                    is_ref = name == REF
                    L.append(
                        f"| {name}{' †' if flag else ''} | {w} | {load} | {len(rs)} | {med(rps):.0f} "
                        f"({min(rps):.0f}-{max(rps):.0f}) | {fmt(med([r.get('p50') for r in rs]), '.2f')} "
                        f"| {fmt(med([r.get('p99') for r in rs]), '.2f')} | {sum(r.get('errors') or 0 for r in rs)} "
                        f"| {fmt(med([r.get(bk) for r in rs]), '.3f')} ({shares_of(rs, bk, sk)})"
                        + (f" [dispatched {fmt(med([r.get('bal_dispatched') for r in rs]), '.3f')}]"
                           if any("bal_dispatched" in r for r in rs) else "") + " "
                        f"| {'-' if is_ref else fmt(med([r.get('master_us_per_conn') for r in rs]), '.2f')} "
                        f"| {'-' if is_ref else fmt(med([r.get('master_s_per_100k_conn') for r in rs]), '.2f')} "
                        f"| {fmt(med([r.get('server_us_per_req') for r in rs]), '.1f')} "
                        f"| {fmt(max((r.get('master_hwm_mb') or 0) for r in rs), '.2f')} "
                        f"| {'1 (ref)' if is_ref else fmt(rr[0], '.3f') + (' †' if rr[3] else '')} "
                        f"| {'1 (ref)' if is_ref else fmt(pr[0], '.2f')} |")
        L.append("")
        L.append("| ratio (per-repetition, median (min-max)) | workers | load | req/s | p99 | server CPU µs/req |")
        L.append("|---|---|---|---|---|---|")
        pairs = [(n, REF) for n in http if n != REF and REF in http]
        if "sv-rr" in http and "node-rr" in http:
            pairs.append(("sv-rr", "node-rr"))
        for load in cfg["loads"]:
            for w in wc:
                for x, b in pairs:
                    rr = S.ratio("http", x, b, w, load, "rps")
                    if rr[0] is None:
                        continue
                    pr = S.ratio("http", x, b, w, load, "p99")
                    cr = S.ratio("http", x, b, w, load, "server_us_per_req")
                    L.append(f"| {x} / {b}{' †' if rr[3] else ''} | {w} | {load} | {rr[0]:.3f} ({rr[1]:.2f}-{rr[2]:.2f}) "
                             f"| {fmt(pr[0], '.2f')} | {fmt(cr[0], '.2f')} |")
        L.append("")

    udp = cfg.get("udp_servers", {})
    if "udp" in cfg["parts"]:
        flows = a.get("udp_flows", 1)
        L.append(f"## UDP echo, {flows} client source ports (flows) (medians)")
        L.append("")
        L.append("| server | workers | runs | datagrams/s (min-max) | RTT p50 ms | RTT p99 ms | lost (all runs) "
                 "| datagrams per worker max/min (shares %) | flows per worker max/min | flows on >1 worker "
                 "| master CPU s | client CPU % | vs node-udp |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for w in wc:
            for name in udp:
                rs, flag = S.rows("udp", name, w, "udp")
                if not rs:
                    L.append(f"| {name} | {w} | 0 | (no successful run) ||||||||||")
                    continue
                rps = [r["rps"] for r in rs]
                rr = S.ratio("udp", name, "node-udp", w, "udp", "rps") if name != "node-udp" else (None,) * 4
                L.append(f"| {name}{' †' if flag else ''} | {w} | {len(rs)} | {med(rps):.0f} ({min(rps):.0f}-{max(rps):.0f}) "
                         f"| {fmt(med([r.get('p50') for r in rs]), '.3f')} | {fmt(med([r.get('p99') for r in rs]), '.3f')} "
                         f"| {sum(r.get('lost') or 0 for r in rs)} "
                         f"| {fmt(med([r.get('bal_dgrams') for r in rs]), '.3f')} ({shares_of(rs, 'bal_dgrams', 'dgram_shares')}) "
                         f"| {fmt(med([r.get('bal_flows') for r in rs]), '.3f')} "
                         f"| {fmt(med([r.get('split_flows') for r in rs]), '.0f')} "
                         f"| {fmt(med([r.get('master_cpu_s') for r in rs]), '.2f')} "
                         f"| {fmt(med([r.get('client_cpu_pct') for r in rs]), '.0f')} "
                         f"| {fmt(rr[0], '.3f')}{' †' if rr[3] else ''} |")
        L.append("")

    if "ready" in cfg["parts"]:
        rw = a["ready_workers"]
        sv = [r for r in recs if r.get("part") == "ready" and r.get("server") == "sv-ready" and r.get("ok")]
        ref = [r for r in recs if r.get("part") == "ready" and r.get("server") == "startup-ref" and r.get("ok")]
        L.append(f"## Start-up and memory with {rw} workers (medians of {len(sv)} / {len(ref)} runs)")
        L.append("")
        L.append("| measure | median | min-max |")
        L.append("|---|---|---|")

        def row(label, rs, k, spec=".1f"):
            v = [r.get(k) for r in rs if r.get(k) is not None]
            L.append(f"| {label} | {fmt(med(v), spec)} | "
                     f"{(fmt(min(v), spec) + '-' + fmt(max(v), spec)) if v else '-'} |")
        row("sockvisor: exec to READY=1, ms", sv, "t_ready_ms")
        row("sockvisor: exec to first HTTP 200, ms", sv, "t_serving_ms")
        row(f"workers' start-up (reference: {rw} `hello --reuseport` processes, exec to first HTTP 200), ms",
            ref, "t_serving_ms")
        row("sockvisor master RSS after READY, MiB", sv, "rss_idle_mb", ".2f")
        row(f"sockvisor master RSS after {a['ready_load']} s close load, MiB", sv, "master_rss_mb", ".2f")
        row("sockvisor master peak RSS (VmHWM), MiB", sv, "master_hwm_mb", ".2f")
        row("processes in the server's session (master + workers)", sv, "n_procs", ".0f")
        L.append("")

    longs = sorted([r for r in recs if r.get("part") == "long"],
                   key=lambda r: (r.get("kind") != "balance", r.get("workers") or 0))
    if longs:
        L.append("## Long runs (balance: sv-rr round robin over channels, sv-reuseport kernel-steered round "
                 "robin, reuseport the kernel's own hash; rss: sv-rr)")
        L.append("")
        L.append("| run | server | workers | connections (wrk / stats) | errors | balance max/min | per-worker connections "
                 "| master µs/conn | master RSS MiB start / middle / end | peak RSS MiB |")
        L.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in longs:
            s = r.get("samples") or []
            per = "/".join(str(v[0]) for v in sorted((r.get("worker_stats") or {}).values(), reverse=True))
            rss = (f"{s[0]['rss_mb']:.2f} / {s[len(s) // 2]['rss_mb']:.2f} / {s[-1]['rss_mb']:.2f}" if s else "-")
            L.append(f"| {r.get('kind')}{'' if r.get('ok') else ' (incomplete: ' + (r.get('error') or 'target not reached') + ')'} "
                     f"| {r.get('server')} | {r.get('workers')} | {r.get('wrk_conns', '-')} / {r.get('stats_conns', '-')} | {r.get('errors', '-')} "
                     f"| {fmt(r.get('bal_conns'), '.4f')} | {per or '-'} "
                     f"| {'-' if r.get('server') == REF else fmt(r.get('master_us_per_conn'), '.2f')} "
                     f"| {rss} | {fmt(s[-1]['hwm_mb'] if s else None, '.2f')} |")
        L.append("")

    L += targets(cfg, S, recs)
    return "\n".join(L) + "\n"


def targets(cfg, S, recs):
    """The DESIGN.md section 8 targets against this run's figures."""
    a = cfg["args"]
    L = ["## Targets (DESIGN.md section 8)", ""]
    if cfg.get("stand_in"):
        L.append("Stand-in run: the verdicts below are about the stand-ins, not sockvisor.")
        L.append("")
    L.append("| target | measured | verdict |")
    L.append("|---|---|---|")

    def verdict(v, ok, flagged=False):
        if v is None:
            return "n/a (not measured)"
        return ("met" if ok(v) else "NOT met") + (" († contaminated runs only)" if flagged else "")

    for w in a["worker_counts"]:
        v, _, _, fl = S.ratio("http", "sv-rr", REF, w, "close", "rps")
        L.append(f"| round robin close req/s ≥ 0.9x reuseport ({w} workers) | {fmt(v, '.3f')} | {verdict(v, lambda x: x >= 0.9, fl)} |")
        v, _, _, fl = S.ratio("http", "sv-rr", "node-rr", w, "close", "rps")
        L.append(f"| round robin close req/s ≥ 4x node rr ({w} workers) | {fmt(v, '.2f')} | {verdict(v, lambda x: x >= 4, fl)} |")
        v, _, _, fl = S.ratio("http", "sv-rr", REF, w, "keepalive", "rps")
        L.append(f"| round robin keep-alive req/s ≥ 0.95x reuseport ({w} workers) | {fmt(v, '.3f')} | {verdict(v, lambda x: x >= 0.95, fl)} |")
        rs, fl = S.rows("http", "sv-rr", w, "close")
        v = med([r.get("master_us_per_conn") for r in rs])
        L.append(f"| sockvisor CPU ≤ 10 µs per dispatched connection ({w} workers) | {fmt(v, '.1f')} | {verdict(v, lambda x: x <= 10, fl)} |")
    bal = [r for r in recs if r.get("part") == "long" and r.get("kind") == "balance" and r.get("ok")]
    for r in [r for r in bal if r.get("server", "sv-rr") == "sv-rr"]:
        v = r.get("bal_conns")
        L.append(f"| balance ≤ 1.02 over ≥ 100k connections, round robin ({r['workers']} workers, "
                 f"{r.get('stats_conns')} conns) | {fmt(v, '.4f')} | {verdict(v, lambda x: x <= 1.02)} |")
    if not bal:
        L.append("| balance ≤ 1.02 over ≥ 100k connections, round robin | - | n/a (run with --long) |")
    L += reuseport_targets(cfg, S, bal, verdict)
    sv = [r for r in recs if r.get("part") == "ready" and r.get("server") == "sv-ready" and r.get("ok")]
    ref = [r for r in recs if r.get("part") == "ready" and r.get("server") == "startup-ref" and r.get("ok")]
    hwm = max((r.get("master_hwm_mb") or 0) for r in sv) if sv else None
    L.append(f"| master peak RSS ≤ 4 MiB with {a['ready_workers']} workers | {fmt(hwm, '.2f')}{' MiB' if hwm else ''} "
             f"| {verdict(hwm, lambda x: x <= 4.0)} |")
    rss = [r for r in recs if r.get("part") == "long" and r.get("kind") == "rss" and r.get("samples")]
    for r in rss:
        s = r["samples"]
        # flat: no growth from the first measured chunk (warm) to the end
        grow = s[-1]["rss_mb"] - s[1]["rss_mb"] if len(s) > 1 else None
        L.append(f"| RSS flat over ~1M connections ({r['wrk_conns']} conns): end - after first chunk "
                 f"≤ 0.25 MiB, peak ≤ 4 MiB | {fmt(grow, '+.2f')} MiB, peak {s[-1]['hwm_mb']:.2f} MiB "
                 f"| {verdict(grow, lambda x: x <= 0.25 and s[-1]['hwm_mb'] <= 4.0)} |")
    if not rss:
        L.append("| RSS flat over ~1M connections | - | n/a (run with --long) |")
    t = med([r.get("t_ready_ms") for r in sv])
    t_ref = med([r.get("t_serving_ms") for r in ref])
    ok = None if t is None or t_ref is None else t - t_ref
    L.append(f"| READY=1 within 50 ms + workers' start-up | READY {fmt(t, '.1f')} ms, workers' start-up "
             f"{fmt(t_ref, '.1f')} ms, difference {fmt(ok, '.1f')} ms | {verdict(ok, lambda x: x <= 50)} |")
    L.append("")
    return L


def reuseport_targets(cfg, S, bal, verdict):
    """Issue 13's targets for the kernel-steered policy (`sv-reuseport`, `sv-udp-reuseport`), each
    next to the figure it is compared with from the same run."""
    a = cfg["args"]
    L = []
    if "sv-reuseport" in cfg.get("http_servers", {}):
        for w in a["worker_counts"]:
            v, _, _, fl = S.ratio("http", "sv-reuseport", REF, w, "close", "rps")
            L.append(f"| reuseport policy close req/s ≥ 0.98x the SO_REUSEPORT reference ({w} workers) "
                     f"| {fmt(v, '.3f')} | {verdict(v, lambda x: x >= 0.98, fl)} |")
            rs, fl = S.rows("http", "sv-reuseport", w, "close")
            v = med([r.get("master_us_per_conn") for r in rs])
            rr, _ = S.rows("http", "sv-rr", w, "close")
            ch = med([r.get("master_us_per_conn") for r in rr])
            L.append(f"| reuseport policy: sockvisor CPU per connection about 0 (≤ 0.5 µs; round robin over "
                     f"channels: {fmt(ch, '.1f')}) ({w} workers) | {fmt(v, '.3f')} µs "
                     f"| {verdict(v, lambda x: x <= 0.5, fl)} |")
    kernel = {r["workers"]: r for r in bal if r.get("server") == REF}
    for r in [r for r in bal if r.get("server") == "sv-reuseport"]:
        v = r.get("bal_conns")
        k = kernel.get(r["workers"])
        kv = f"{fmt(k.get('bal_conns'), '.4f')} over {k.get('stats_conns')}" if k else "not run"
        L.append(f"| reuseport policy balance ≤ 1.01 over ≥ 100k connections ({r['workers']} workers, "
                 f"{r.get('stats_conns')} conns; the kernel's hash in the same run: {kv}) "
                 f"| {fmt(v, '.4f')} | {verdict(v, lambda x: x <= 1.01)} |")
    if "sv-udp-reuseport" in cfg.get("udp_servers", {}) and "udp" in cfg["parts"]:
        for w in a["worker_counts"]:
            rs, fl = S.rows("udp", "sv-udp-reuseport", w, "udp")
            v = med([r.get("bal_dgrams") for r in rs])
            sh, _ = S.rows("udp", "sv-udp-shared", w, "udp")
            shv = med([r.get("bal_dgrams") for r in sh])
            L.append(f"| UDP reuseport policy: datagrams per worker max/min ≤ 1.2 with {a.get('udp_flows', 1)} "
                     f"flows ({w} workers; the shared socket in the same run: {fmt(shv, '.2f')}) "
                     f"| {fmt(v, '.3f')} | {verdict(v, lambda x: x <= 1.2, fl)} |")
    return L


def main():
    global MAX_STEAL, MAX_FOREIGN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir")
    ap.add_argument("--max-steal", type=float, default=MAX_STEAL)
    ap.add_argument("--max-foreign", type=float, default=MAX_FOREIGN)
    x = ap.parse_args()
    MAX_STEAL, MAX_FOREIGN = x.max_steal, x.max_foreign
    sys.stdout.write(render(x.dir))


if __name__ == "__main__":
    main()
