"""Serve the sample world over HTTP on loopback, faults included.

    python -m infra.world_server --dir data/world --port 8731

Paths: `/images/<split>/<file>` and `/noise/<file>` serve files; `/fault/<kind>/<n>...` produce
the faults a crawler meets on the web: 404, 500, a response slower than the crawl timeout,
HTML served as an image, a truncated JPEG, a decompression bomb and a redirect loop.
"""
from __future__ import annotations

import argparse
import mimetypes
import time
from functools import partial
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from infra.local_server import LocalServer

HTML_PAGE = b"<!doctype html><html><head><title>Not found</title></head><body><h1>Oops</h1></body></html>"


class WorldRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, root: Path, slow_seconds: float, **kwargs):
        self.root, self.slow_seconds = root, slow_seconds
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:  # one line per request would drown the job's log
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[0] in ("images", "noise") and len(parts) >= 2:
            return self._send_file(self.root.joinpath(*parts))
        if parts[0] == "fault" and len(parts) == 3:
            return self._fault(parts[1], parts[2])
        self._send(404, b"not found", "text/plain")

    def _fault(self, kind: str, name: str) -> None:
        if kind in ("404", "500"):
            return self._send(int(kind), b"error", "text/plain")
        if kind == "slow":
            time.sleep(self.slow_seconds)
            return self._send_file(self.root / "faults" / "slow.jpg")
        if kind == "html":
            return self._send(200, HTML_PAGE, "image/jpeg")  # lies about its type, as some CDNs do
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", self.path)  # to itself, forever
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if kind in ("truncated", "bomb"):
            return self._send_file(self.root / "faults" / name)
        self._send(404, b"not found", "text/plain")

    def _send_file(self, path: Path) -> None:
        resolved = path.resolve()
        if self.root not in resolved.parents or not resolved.is_file():
            return self._send(404, b"not found", "text/plain")
        self._send(200, resolved.read_bytes(), mimetypes.guess_type(resolved.name)[0] or "application/octet-stream")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the crawler gave up (timeouts do that)
            pass


class WorldServer(LocalServer):
    """The world's files and faults over HTTP, in a background thread; a context manager that stops it on exit."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 6.0):
        super().__init__(partial(WorldRequestHandler, root=Path(root).resolve(), slow_seconds=slow_seconds),
                         host, port, name="world-server")

    @property
    def base_url(self) -> str:
        return self.origin


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", type=Path, default=Path("data/world"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--slow-seconds", type=float, default=6.0)
    args = p.parse_args()
    with WorldServer(args.dir, args.host, args.port, args.slow_seconds) as server:
        print(f"serving {args.dir} at {server.base_url} (Ctrl-C stops)", flush=True)
        try:
            server.thread.join()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
