"""A tiny web app that says which worker answered, for the third-party servers of
tests/reuseport.rs: `app` for ASGI servers (uvicorn), `wsgi` for WSGI servers (gunicorn).

Every answer is `worker <SOCKVISOR_WORKER_ID> pid <pid>`: the pid of the process that
answered (gunicorn's worker is a child of the sockvisor worker, its arbiter).
"""

import os


def _body():
    return "worker {} pid {}\n".format(os.environ.get("SOCKVISOR_WORKER_ID", "?"), os.getpid()).encode()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = _body()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def wsgi(environ, start_response):
    body = _body()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
