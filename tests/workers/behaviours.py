#!/usr/bin/env python3
"""A sockvisor channel worker (stdlib only) with one odd behaviour, for tests/hardening.rs.

BEHAVIOUR (environment), per slot (SOCKVISOR_WORKER_ID):
  serve              serve HTTP hello on the channel at fd 3; exit 0 on SIGTERM after draining
  record-signals     serve; write every SIGINT/SIGTERM received to $DIR/signals.<slot>, one per line;
                     SIGINT exits at once with status 130 (as many programs do), SIGTERM drains
  stopping-on-usr1   slot 0 serves; slot 1 never reads its channel and, on SIGUSR1, sends
                     STOPPING=1 and then sleeps (a worker that announced its stop and lingers)
  watchdog-on-term   serve; on SIGTERM send WATCHDOG_USEC=100000 and keep running 2 s, then exit 0
Every behaviour sends READY=1 once its signal handlers are in place: run it with --ready notify.
"""
import array, os, select, signal, socket, struct, sys, time

slot = os.environ.get("SOCKVISOR_WORKER_ID", "-")
behaviour = os.environ.get("BEHAVIOUR", "serve")
out_dir = os.environ.get("DIR", "/tmp")
chan = socket.socket(fileno=3)
body = f"hello from worker {slot} (pid {os.getpid()})\n".encode()
reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
FD = array.array("i").itemsize


def notify(message):
    addr = os.environ["NOTIFY_SOCKET"]
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), addr)


def record(name):
    with open(os.path.join(out_dir, f"signals.{slot}"), "a") as f:
        f.write(name + "\n")


def serve_one():
    """Receive one connection from the channel and answer it. False at end of file."""
    try:
        msg, anc, flags, _ = chan.recvmsg(8, socket.CMSG_SPACE(FD), socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    if not msg and not anc:
        return False
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD])
    for fd in fds:
        with socket.socket(fileno=fd) as conn:
            try:
                conn.recv(65536)
                conn.sendall(reply)
            except OSError:
                pass
    return True


wake_r, wake_w = socket.socketpair()
wake_w.setblocking(False)
signal.set_wakeup_fd(wake_w.fileno())
stopping = []


def on_term(*_):
    if behaviour == "record-signals":
        record("SIGTERM")
    if behaviour == "watchdog-on-term":
        notify("WATCHDOG_USEC=100000")
        stopping.append(time.monotonic() + 2.0)
    else:
        stopping.append(time.monotonic())


def on_int(*_):
    if behaviour == "record-signals":
        record("SIGINT")
    os._exit(130)


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_int)

if behaviour == "stopping-on-usr1" and slot == "1":
    def on_usr1(*_):
        notify("STOPPING=1")
    signal.signal(signal.SIGUSR1, on_usr1)
    notify("READY=1")
    while True:
        time.sleep(3600)

notify("READY=1")  # the handlers are in place (run it with --ready notify)
while True:
    if stopping and time.monotonic() >= stopping[0]:
        while serve_one() and select.select([chan], [], [], 0)[0]:
            pass
        sys.exit(0)
    ready = select.select([chan, wake_r], [], [], 0.1)[0]
    if wake_r in ready:
        try:
            wake_r.recv(64)
        except OSError:
            pass
    if chan in ready and not serve_one():
        sys.exit(0)
