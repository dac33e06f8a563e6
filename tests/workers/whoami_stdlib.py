"""Python's standard library HTTP server on the socket at fd 3 (`socket.fromfd`), as a
program written for socket activation does (tests/reuseport.rs). Every answer is
`worker <SOCKVISOR_WORKER_ID> pid <pid>`.

With NOTIFY_SOCKET set it sends READY=1 once it serves, except the worker whose id is
WHOAMI_SLOW_WORKER: that one serves at once too, but sends READY=1 only once the file
WHOAMI_READY_GATE exists (a slow starter that accepts before it says it is ready).

On SIGTERM it drains: every request still answered says `Connection: close`, and it exits
once the connection it serves ends (the default action, dying at once, would reset a
request already on its way on a keep-alive connection).
"""

import http.server
import os
import signal
import socket
import threading
import time

WORKER = os.environ.get("SOCKVISOR_WORKER_ID", "?")
draining = False


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = "worker {} pid {}\n".format(WORKER, os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.HTTPServer):
    def server_bind(self):
        pass  # the socket is bound and listening already

    def server_activate(self):
        pass


def notify(message):
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), address)


def ready():
    gate = os.environ.get("WHOAMI_READY_GATE")
    if gate and WORKER == os.environ.get("WHOAMI_SLOW_WORKER"):
        while not os.path.exists(gate):
            time.sleep(0.01)
    notify("READY=1")


server = Server(("", 0), Handler, bind_and_activate=False)
server.socket.close()
server.socket = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
threading.Thread(target=ready, daemon=True).start()


def drain(signum, frame):
    global draining
    draining = True
    # shutdown() waits for serve_forever to return: not from the thread that runs it.
    threading.Thread(target=server.shutdown, daemon=True).start()


signal.signal(signal.SIGTERM, drain)
server.serve_forever()
