#!/usr/bin/python3
# A stand-in for sockvisor used by the harness self-test (tests/systemd_e2e.rs,
# `harness_self_test`): it checks the unit pair and its hardening in a real systemd while
# the real binary is not there yet. Like sockvisor it takes LISTEN_FDS by name, forks
# workers that drop privileges (setuid nobody) and serve HTTP on the "web" fd and echo UDP
# on the "dns" fd, and reports READY=1/STATUS=/WATCHDOG=1 to systemd.
import os, signal, socket, sys, time

def notify(msg):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(msg.encode(), path)
    s.close()

names = os.environ.get("LISTEN_FDNAMES", "").split(":")
nfds = int(os.environ.get("LISTEN_FDS", "0"))
assert os.environ.get("LISTEN_PID") == str(os.getpid()), "LISTEN_PID mismatch"
fds = {names[i]: 3 + i for i in range(nfds)}
workers = int(os.environ.get("SOCKVISOR_WORKERS", "2"))
rundir = os.environ.get("RUNTIME_DIRECTORY", "")

def worker(wid):
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    web = socket.socket(fileno=os.dup(fds["web"]))
    dns = socket.socket(fileno=os.dup(fds["dns"]))
    web.setblocking(False); dns.setblocking(False)
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(web, selectors.EVENT_READ); sel.register(dns, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is web:
                try:
                    c, _ = web.accept()
                except BlockingIOError:
                    continue
                c.setblocking(True)
                c.settimeout(2)
                try:
                    c.recv(4096)  # read the request: closing with unread data would send RST
                except OSError:
                    pass
                body = "hello from worker %d (pid %d) uid %d fdnames %s\n" % (wid, os.getpid(), os.getuid(), ":".join(names))
                c.sendall(("HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)).encode())
                c.close()
            else:
                try:
                    data, addr = dns.recvfrom(2048)
                except BlockingIOError:
                    continue
                dns.sendto(data, addr)

pids = []
for w in range(workers):
    pid = os.fork()
    if pid == 0:
        try:
            worker(w)
        finally:
            os._exit(1)
    pids.append(pid)

def term(*_):
    notify("STOPPING=1")
    for p in pids:
        os.kill(p, signal.SIGTERM)
    sys.exit(0)

signal.signal(signal.SIGTERM, term)
if rundir:  # a listening unix socket where sockvisor's control socket would be
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ctl.bind(os.path.join(rundir, "control.sock"))
    ctl.listen(1)
notify("READY=1\nSTATUS=fake sockvisor: %d workers, fds %s, rundir %s" % (workers, ":".join(names), rundir))
while True:
    notify("WATCHDOG=1")
    time.sleep(1)
