"""A hostile image server on 127.0.0.1 for the crawl's safety tests: every trick a stranger's URL list
can play on a crawler that the sample world's fault URLs do not (redirects to refused addresses,
trickling and oversized bodies, lying headers, non-ASCII paths, rate limits, rotated JPEGs).

    with HostileServer() as server:
        server.url("/ok/cat.jpg")
"""
from __future__ import annotations

import io
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler

import numpy as np
from PIL import Image

from infra.local_server import LocalServer

CANARY = b"VISINSTRUCT-CANARY-7f3a9c"  # bytes that must never reach a shard, record, log or export


def picture(seed: int, size: tuple[int, int] = (96, 64), exif_orientation: int | None = None) -> bytes:
    """A JPEG of `size` (width, height): a left half darker than the right, so a rotation shows."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:, : size[0] // 2] //= 4
    buffer = io.BytesIO()
    image = Image.fromarray(pixels)
    if exif_orientation is None:
        image.save(buffer, "JPEG", quality=90)
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.owner.requests[self.path].append(time.monotonic())
        route = self.path.split("?")[0]
        if route.startswith("/ok/") or route in ("/case/caf%C3%A9.jpg", "/with%20space.jpg"):
            return self._send(200, picture(len(route)))
        if route == "/exif6.jpg":
            return self._send(200, picture(7, exif_orientation=6))
        if route == "/canary.jpg":  # what a refused redirect would have fetched
            return self._send(200, CANARY * 100)
        if route.startswith("/redirect/"):  # /redirect/<target url, percent-encoded>
            from urllib.parse import unquote
            return self._send(302, b"", headers={"Location": unquote(route.removeprefix("/redirect/"))})
        if route == "/trickle.jpg":  # a byte a second, forever (the client must give up)
            return self._trickle()
        if route == "/trickle-headers.jpg":  # the status line and headers a byte at a time
            return self._trickle(headers=True)
        if route == "/huge.jpg":  # declares and sends more than the byte limit
            return self._send(200, bytes(self.server.owner.huge_bytes))
        if route == "/huge-undeclared.jpg":  # no Content-Length: the body just keeps coming
            return self._send(200, bytes(self.server.owner.huge_bytes), declare_length=False)
        if route == "/lying-length.jpg":  # declares 10,000 bytes, sends 100 and hangs up
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(b"\xff" * 100)
            self.close_connection = True
            return None
        if route == "/rate-limited.jpg":  # 429 + Retry-After: 1 on the first request, the image after
            if len(self.server.owner.requests[self.path]) == 1:
                return self._send(429, b"slow down", headers={"Retry-After": "1"})
            return self._send(200, picture(429))
        if route.startswith("/flaky/"):  # 503 until the test declares the server recovered
            if not self.server.owner.recovered:
                return self._send(503, b"busy")
            return self._send(200, picture(len(route)))
        return self._send(404, b"not found")

    def _trickle(self, headers: bool = False) -> None:
        try:
            if headers:
                for byte in b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * 1000:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.3)
            self.send_response(200)
            self.send_header("Content-Length", "1000000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"\x00")
                self.wfile.flush()
                time.sleep(0.5)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, code: int, body: bytes, headers: dict | None = None, declare_length: bool = True) -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", "image/jpeg")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if declare_length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class HostileServer(LocalServer):
    def __init__(self, huge_bytes: int = 4 << 20):
        self.requests: dict[str, list[float]] = defaultdict(list)  # path -> the times it was asked for
        self.huge_bytes, self.recovered = huge_bytes, False
        super().__init__(_Handler, name="hostile-server")

    def url(self, path: str) -> str:
        return self.origin + path

    def recover(self) -> None:
        """From now on /flaky/ URLs answer with an image."""
        self.recovered = True
