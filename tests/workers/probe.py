#!/usr/bin/env python3
"""A test worker written the plain systemd way (socket.socket(fileno=3), stdlib only).

It inspects what sockvisor gave it before touching anything (fds via fstat, never by
opening /proc/self/fd, environment), writes that to $PROBE_DIR/<pid>.json, then serves:
TCP (a listening socket, or a sockvisor channel: SOCK_SEQPACKET) answers
"probe <worker id> <pid>\n" and closes; UDP echoes "probe <id> <pid>: <data>".
Knobs: PROBE_EXIT=N exits at once with N; PROBE_IGNORE_TERM=1 ignores SIGTERM;
PROBE_NO_READY=1 never sends READY=1; PROBE_READY_DELAY=seconds, or a comma-separated list
indexed by worker id (the last entry for higher ids).
Health knobs (tests/health.rs): PROBE_NOTIFY_AT_START=<datagram> is sent before the ready
delay; PROBE_NOTIFY_AFTER_READY=<datagram> is sent once READY=1 is
(raw bytes, any content); with PROBE_NOTIFY_ONCE=1 only by the first worker of the fleet to get
there (a flag file in $PROBE_DIR); PROBE_BIG=1 then sends a 64 KiB datagram
("STATUS=big\n" + padding) and "STATUS=after big"; PROBE_WATCHDOG=1 sends WATCHDOG=1 every
WATCHDOG_USEC/2, PROBE_WATCHDOG_PINGS=N only N times (the count sent so far in
$PROBE_DIR/pings-<pid>). Core dumps are off (RLIMIT_CORE 0), so a
SIGABRT leaves no core file behind.
Per slot (tests/promises.rs): PROBE_NOTIFY_AFTER_READY_<id>=<datagram> is sent after READY=1 by
the first worker of slot <id> only (a flag file in $PROBE_DIR). On demand: on SIGUSR1 the probe
sends PROBE_ON_USR1=<datagram>, then exits with PROBE_USR1_EXIT=N if set.
"""
import array, json, os, resource, selectors, signal, socket, stat, sys, time

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

if "PROBE_EXIT" in os.environ:
    sys.exit(int(os.environ["PROBE_EXIT"]))

open_fds = []
for fd in range(0, 256):
    try:
        os.fstat(fd)
        open_fds.append(fd)
    except OSError:
        pass

wid = os.environ.get("SOCKVISOR_WORKER_ID", "?")
pid = os.getpid()
n = int(os.environ.get("LISTEN_FDS", "0"))
names = os.environ.get("LISTEN_FDNAMES", "").split(":")
socks, info = [], {}
for i in range(n):
    fd = 3 + i
    s = socket.socket(fileno=fd)
    info[str(fd)] = {
        "name": names[i] if i < len(names) else None,
        "family": s.family.name,
        "type": s.type.name,
        "listening": bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)),
        "inheritable": os.get_inheritable(fd),
    }
    socks.append(s)

report = {
    "pid": pid,
    "listen_pid": os.environ.get("LISTEN_PID"),
    "listen_fds": os.environ.get("LISTEN_FDS"),
    "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
    "worker_id": wid,
    "open_fds": open_fds,
    "fds": info,
    "env": {k: v for k, v in os.environ.items()
            if k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "SOCKVISOR_", "INVOCATION_"))},
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": os.getgroups(),
    "cwd": os.getcwd(),
    "umask": (lambda m: (os.umask(m), m)[1])(os.umask(0)),
    "sigmask": open("/proc/self/status").read().split("SigBlk:")[1].split()[0],
    "sigign": open("/proc/self/status").read().split("SigIgn:")[1].split()[0],
}
d = os.environ.get("PROBE_DIR")
if d:
    tmp = os.path.join(d, f".{pid}.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.rename(tmp, os.path.join(d, f"{pid}.json"))

if os.environ.get("PROBE_IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.sendto(msg if isinstance(msg, bytes) else msg.encode(), path)

def first_in_fleet():
    """True for the first worker of the fleet to ask (PROBE_NOTIFY_ONCE)."""
    if os.environ.get("PROBE_NOTIFY_ONCE") != "1" or not d:
        return True
    try:
        os.close(os.open(os.path.join(d, "notified.flag"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

def first_in_slot():
    """True for the first worker of this slot to ask (PROBE_NOTIFY_AFTER_READY_<id>)."""
    if not d:
        return True
    try:
        os.close(os.open(os.path.join(d, f"notified-{wid}.flag"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False

def on_usr1(signum, frame):
    notify(os.environb.get(b"PROBE_ON_USR1", b""))
    if "PROBE_USR1_EXIT" in os.environ:
        os._exit(int(os.environ["PROBE_USR1_EXIT"]))

signal.signal(signal.SIGUSR1, on_usr1)

def answer(conn):
    try:
        # Read the request first: closing with unread data would reset the connection.
        conn.settimeout(5)
        conn.recv(65536)
        conn.sendall(f"probe {wid} {pid}\n".encode())
    finally:
        conn.close()

sel = selectors.DefaultSelector()
for s in socks:
    sel.register(s, selectors.EVENT_READ)
if os.environb.get(b"PROBE_NOTIFY_AT_START") is not None:
    notify(os.environb[b"PROBE_NOTIFY_AT_START"])
if os.environ.get("PROBE_NO_READY") != "1":
    delays = os.environ.get("PROBE_READY_DELAY", "0").split(",")
    delay = delays[min(int(wid), len(delays) - 1)] if wid.isdigit() else delays[-1]
    time.sleep(float(delay))
    notify("READY=1\nSTATUS=probe serving")
    after = os.environb.get(b"PROBE_NOTIFY_AFTER_READY")
    if after is not None and first_in_fleet():
        notify(after)
    for_slot = os.environb.get(b"PROBE_NOTIFY_AFTER_READY_" + wid.encode())
    if for_slot is not None and first_in_slot():
        notify(for_slot)
    if os.environ.get("PROBE_BIG") == "1":
        notify(b"STATUS=big\n" + b"x" * (64 * 1024 - len(b"STATUS=big\n")))
        notify("STATUS=after big")

watchdog_every = None
pings_left = int(os.environ.get("PROBE_WATCHDOG_PINGS", "-1"))
if os.environ.get("PROBE_WATCHDOG") == "1" and os.environ.get("WATCHDOG_USEC"):
    watchdog_every = int(os.environ["WATCHDOG_USEC"]) / 2e6
next_ping = time.monotonic()
pings_sent = 0

while True:
    timeout = None
    if watchdog_every is not None and pings_left != 0:
        now = time.monotonic()
        if now >= next_ping:
            notify("WATCHDOG=1")
            pings_left -= 1
            pings_sent += 1
            if d:
                with open(os.path.join(d, f"pings-{pid}"), "w") as f:
                    f.write(str(pings_sent))
            next_ping = now + watchdog_every
        timeout = max(0.0, next_ping - time.monotonic()) if pings_left != 0 else None
    for key, _ in sel.select(timeout):
        s = key.fileobj
        if s.type == socket.SOCK_SEQPACKET:
            fds = array.array("i")
            msg, anc, flags, _ = s.recvmsg(8, socket.CMSG_SPACE(fds.itemsize), socket.MSG_CMSG_CLOEXEC)
            if not msg:
                sys.exit(0)  # sockvisor is gone
            for level, typ, data in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
            for fd in fds:
                answer(socket.socket(fileno=fd))
        elif s.type == socket.SOCK_STREAM:
            conn, _ = s.accept()
            answer(conn)
        else:
            data, addr = s.recvfrom(65535)
            s.sendto(f"probe {wid} {pid}: ".encode() + data, addr)
