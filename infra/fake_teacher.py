"""A stand-in for a served model (vLLM, OpenAI) for tests and benchmarks: an OpenAI-compatible chat server
on 127.0.0.1 that answers every request with a valid instance of the request's JSON schema (or what an
`answer` function says) after a fixed latency, with no limit on concurrent requests, and counts requests and the peak number in flight.

    python -m infra.fake_teacher --latency 0.5 --port 8790     # serve until Ctrl-C

    with FakeTeacher(latency=0.2) as teacher:                 # in a test or a benchmark
        ...teacher.base_url ... teacher.requests, teacher.peak_in_flight

What it is not: a model. The answers are schema-valid and deterministic (the same request gets the same
answer), so the pipeline's speed and plumbing can be measured without the cost of generating text.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable

from infra.local_server import LocalServer


def schema_instance(schema: dict[str, Any], defs: dict[str, Any] | None = None, seed: str = "") -> Any:
    """A small valid instance of a JSON schema as pydantic writes them (objects, arrays, strings, numbers,
    booleans, enums, anyOf, $ref); strings carry `seed` so different requests get different text."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return schema_instance(defs[schema["$ref"].rsplit("/", 1)[-1]], defs, seed)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            return schema_instance(schema[key][0], defs, seed)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: schema_instance(sub, defs, f"{seed}.{name}") for name, sub in properties.items()}
    if kind == "array":
        return [schema_instance(schema.get("items", {}), defs, f"{seed}[{i}]") for i in range(max(1, schema.get("minItems", 1)))]
    if kind == "string":
        text = f"Yes, answer {hashlib.sha1(seed.encode()).hexdigest()[:8]}."
        return text[: schema.get("maxLength", len(text))].ljust(schema.get("minLength", 0), ".")
    if kind == "integer":
        return int(schema.get("minimum", 1))
    if kind == "number":
        return float(schema.get("minimum", 0.5))
    if kind == "boolean":
        return True
    return None


def schema_answer(request: dict, seed: str) -> Any:
    """A valid instance of the schema in the request's response_format (json_schema or llama.cpp's json_object)."""
    fmt = request.get("response_format") or {}
    schema = fmt.get("schema") or fmt.get("json_schema", {}).get("schema") or {"type": "object"}
    return schema_instance(schema, seed=seed)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.rstrip("/").endswith("/stats"):  # the counters, for a benchmark running the server apart
            self._send(200, self.server.owner.stats())
            return
        body = {"object": "list", "data": [{"id": "fake-teacher", "object": "model", "owned_by": "visinstruct"}]}
        self._send(200, body)

    def do_POST(self) -> None:  # noqa: N802
        arrived = time.monotonic()  # the answer leaves `latency` after this, whatever building it took
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        fake = self.server.owner
        fake.started()
        try:
            seed = hashlib.sha1(json.dumps(request, sort_keys=True).encode()).hexdigest()
            content = json.dumps(fake.answer(request, seed))
            time.sleep(max(0.0, fake.latency - (time.monotonic() - arrived)))
            self._send(200, {"id": f"chatcmpl-{seed[:12]}", "object": "chat.completion", "created": 0,
                             "model": request.get("model", "fake-teacher"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": content}}],
                             "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}})
        finally:
            fake.finished()

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


class FakeTeacher(LocalServer):
    """The server and its counters (requests, in_flight, peak_in_flight), started and stopped as a context."""

    def __init__(self, latency: float = 0.5, port: int = 0, answer: Callable[[dict, str], Any] | None = None):
        """`answer(request, seed)`: the JSON-able answer to a chat request; default a valid instance of its schema."""
        self.latency, self.lock = latency, threading.Lock()
        self.answer = answer or schema_answer
        self.requests = self.in_flight = self.peak_in_flight = 0
        self.first_started = self.last_finished = None  # time.monotonic() of the first request in, the last out
        super().__init__(_Handler, port=port, name="fake-teacher")

    def stats(self) -> dict[str, Any]:
        """The counters; `busy_seconds` spans the first request's arrival to the last answer's departure."""
        with self.lock:
            busy = (self.last_finished - self.first_started) if self.last_finished is not None else 0.0
            return {"requests": self.requests, "in_flight": self.in_flight, "peak_in_flight": self.peak_in_flight,
                    "busy_seconds": busy}

    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    def started(self) -> None:
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            if self.first_started is None:
                self.first_started = time.monotonic()
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def finished(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.last_finished = time.monotonic()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.5)
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    with FakeTeacher(args.latency, args.port) as teacher:
        print(f"fake teacher at {teacher.base_url} (latency {args.latency} s; Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print(f"{teacher.requests} requests, peak {teacher.peak_in_flight} in flight")


if __name__ == "__main__":
    main()
