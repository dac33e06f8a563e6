#!/usr/bin/env python3
"""A sockvisor worker in stdlib Python: HTTP hello on connections from the channel at fd 3."""
import array, os, select, signal, socket, struct, sys

if os.environ.get("LISTEN_PID") != str(os.getpid()) or not os.environ.get("LISTEN_FDS"):
    sys.exit("worker.py: no LISTEN_FDS for this process")
chan = socket.socket(fileno=3)  # first LISTEN_FDS socket; detects family and type
if chan.type != socket.SOCK_SEQPACKET:
    sys.exit("worker.py: fd 3 is not a sockvisor channel (shared mode: accept() on it)")
body = f"hello from python worker {os.environ.get('SOCKVISOR_WORKER_ID', '-')}\n".encode()
reply = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
FD = array.array("i").itemsize
wake_r, wake_w = socket.socketpair()  # SIGTERM wakes select() through this pair
wake_w.setblocking(False)
signal.set_wakeup_fd(wake_w.fileno())
signal.signal(signal.SIGTERM, lambda *_: None)
stopping = False
while True:
    if not stopping and wake_r in select.select([chan, wake_r], [], [])[0]:
        stopping = True  # SIGTERM: serve what is already queued, then exit
    try:  # recv_fds() ignores flags in 3.11: use recvmsg for MSG_CMSG_CLOEXEC
        msg, anc, flags, _ = chan.recvmsg(
            8, socket.CMSG_SPACE(FD), socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
    except BlockingIOError:
        if stopping:
            break
        continue
    if not msg and not anc:
        break  # end of file: sockvisor is gone
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD])
    version, kind, mflags, _, seq = struct.unpack("<BBBBI", msg) if len(msg) == 8 else (0,) * 5
    if flags & socket.MSG_CTRUNC or (version, kind) != (1, 1) or len(fds) != 1:
        for fd in fds:  # not a connection message we understand: skip it
            os.close(fd)
        continue
    with socket.socket(fileno=fds[0]) as conn:  # a connection: always serve it
        try:
            conn.recv(65536)  # the request (a demo: one read)
            conn.sendall(reply)
        except OSError:
            pass  # the client went away
    if mflags & 1:  # sockvisor asked for a close report (best effort)
        try:
            chan.send(struct.pack("<BBBBI", 1, 2, 0, 0, 1), socket.MSG_DONTWAIT)
        except OSError:
            pass
