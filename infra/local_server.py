"""A threaded HTTP server on a daemon thread, started and stopped as a context manager: the base of every
server the demo and the tests run on 127.0.0.1 (the sample world, the fault proxy, the fake teacher).

    class MyServer(LocalServer): ...
    with MyServer(handler) as server:      # handler reads its owner as self.server.owner
        urllib.request.urlopen(server.origin + "/x")
"""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # img2dataset and the teacher client open hundreds of connections at once
    owner: "LocalServer"


class LocalServer:
    def __init__(self, handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0,
                 name: str = "local-server"):
        self.httpd = _Server((host, port), handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, name=name, daemon=True)

    @property
    def origin(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
