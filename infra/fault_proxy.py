"""A fault-injecting HTTP proxy on 127.0.0.1 in front of a real OpenAI-compatible server.

    python -m infra.fault_proxy --upstream http://127.0.0.1:8799 --fault-rate 0.3

A share of chat-completion calls is answered, instead of forwarded, with one of: 429 with
`Retry-After`, 500, a stall past the client's timeout, or a 200 whose JSON body is cut off.
The choice is seeded, so a run's faults repeat. Every request is counted (`requests_seen`), which
is how tests check that a cached run asks the teacher nothing.
"""
from __future__ import annotations

import argparse
import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from urllib.parse import urlparse

from infra.local_server import LocalServer

FAULTS = ("http_429", "http_500", "slow", "malformed")


class FaultProxy(LocalServer):
    def __init__(self, upstream: str, fault_rate: float = 0.0, slow_seconds: float = 5.0, seed: int = 0,
                 port: int = 0, retry_after: float = 1.0):
        parsed = urlparse(upstream)
        self.upstream_host, self.upstream_port = parsed.hostname, parsed.port or 80
        self.fault_rate, self.slow_seconds, self.retry_after = fault_rate, slow_seconds, retry_after
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests_seen, self.forwarded, self.faults = 0, 0, Counter()
        super().__init__(self._handler(), port=port, name="fault-proxy")

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def _pick(self, path: str) -> str | None:
        with self.lock:
            self.requests_seen += 1
            if not path.endswith("/chat/completions") or self.rng.random() >= self.fault_rate:
                self.forwarded += 1
                return None
            fault = self.rng.choice(FAULTS)
            self.faults[fault] += 1
            return fault

    def _forward(self, method: str, path: str, headers, body: bytes | None) -> tuple[int, list, bytes]:
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=600)
        try:
            conn.request(method, path, body=body, headers={k: v for k, v in headers.items() if k.lower() != "host"})
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: tests read counters, not logs
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._pick(self.path)
                try:
                    if fault == "http_429":
                        return self._reply(429, b'{"error": {"message": "rate limited"}}',
                                           {"Retry-After": f"{proxy.retry_after:g}"})
                    if fault == "http_500":
                        return self._reply(500, b'{"error": {"message": "injected server error"}}')
                    if fault == "slow":
                        time.sleep(proxy.slow_seconds)  # the client has given up by now
                        return self._reply(504, b'{"error": {"message": "too slow"}}')
                    status, headers, data = proxy._forward(method, self.path, self.headers, body)
                    if fault == "malformed":
                        return self._reply(200, data[: max(1, len(data) // 2)])  # valid start, cut-off JSON
                    self._reply(status, data, {k: v for k, v in headers
                                               if k.lower() not in ("content-length", "transfer-encoding", "connection",
                                                                    "content-type", "date", "server")})
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

        return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8799 (no /v1)")
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument("--port", type=int, default=8798)
    args = p.parse_args()
    with FaultProxy(args.upstream, args.fault_rate, port=args.port) as proxy:
        print(f"fault proxy at {proxy.base_url} -> {args.upstream} ({args.fault_rate:.0%} faults)", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
