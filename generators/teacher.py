"""The teacher client: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp) through `openai`.

    client = TeacherClient(config.teacher, base_url, prompt_version=PROMPT_VERSION)
    results = client.run_all([TeacherRequest(messages, Conversation, seed=7), ...])

One long-lived event loop per client (a background thread) keeps up to `concurrency` requests in flight
across calls: `submit` from several threads (a Ray actor running batches concurrently) and the pipe never
drains between batches. The embedded llama.cpp server works on one request at a time, so against it the
client sends one at a time and queues the rest on our side: a request's timeout then counts from when the
server starts on it, and a retry does not re-send work the server is still doing for this client.
Retries 429 / 5xx / timeouts / malformed responses with exponential backoff and full jitter, honouring
`Retry-After`; structured output from a pydantic model's JSON schema, validated on return and re-asked
(with a new seed) a bounded number of times; every call cached on disk (`TeacherCache`) and its tokens
counted. The API key is read from the environment
variable the config names and is never logged, cached or returned.
"""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import functools
import json
import os
import random
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import openai
from pydantic import BaseModel, ValidationError

from generators.teacher_cache import TeacherCache, cache_key
from schemas.config import TeacherConfig
from schemas.errors import UserError


POOL_CONNECTIONS = 16  # connections per HTTP client; a client holds ceil(concurrency / 16) of them


class TeacherError(Exception):
    """A request that failed for good; `kind` becomes the record's reason (`teacher_error:<kind>`)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


@dataclass
class TeacherUsage:
    requests: int = 0  # HTTP requests sent, retries included
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: Counter = field(default_factory=Counter)  # by cause: http_429, http_500, timeout, malformed, invalid_output
    failed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "cache_hits": self.cache_hits, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "retries": dict(sorted(self.retries.items())),
                "failed": self.failed}

    @staticmethod
    def total(parts: list[dict[str, Any]]) -> dict[str, Any]:
        usage = TeacherUsage()
        for part in parts:
            for name in ("requests", "cache_hits", "prompt_tokens", "completion_tokens", "failed"):
                setattr(usage, name, getattr(usage, name) + int(part.get(name, 0)))
            usage.retries.update(part.get("retries", {}))
        return usage.to_dict()


@dataclass
class TeacherRequest:
    messages: list[dict[str, str]]
    output: type[BaseModel]
    seed: int = 0
    usage: TeacherUsage | None = None  # also counted here (per image), besides the client's total


@functools.lru_cache(maxsize=256)  # per (kind, output model): pydantic builds a schema in about a millisecond
def response_format(kind: str, output: type[BaseModel]) -> dict[str, Any]:
    """The request's `response_format` (shared: callers must not change it)."""
    schema = output.model_json_schema()
    if kind == "json_object":  # llama.cpp's server: grammar-constrained JSON from the schema
        return {"type": "json_object", "schema": schema}
    return {"type": "json_schema", "json_schema": {"name": output.__name__, "schema": schema, "strict": True}}


def retry_after_seconds(err: openai.APIStatusError) -> float | None:
    value = err.response.headers.get("retry-after") if err.response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare for APIs; fall back to our own backoff
        return None


class TeacherClient:
    def __init__(self, config: TeacherConfig, base_url: str, prompt_version: str, cache: TeacherCache | None = None):
        self.config, self.base_url, self.prompt_version, self.cache = config, base_url, prompt_version, cache
        self.format_kind = "json_object" if config.kind == "embedded" else config.response_format
        self.concurrency = serving_concurrency(config)
        self.usage = TeacherUsage()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[openai.AsyncOpenAI] = []
        self._slots: asyncio.Queue | None = None  # one entry per request allowed in flight: the client to send it on

    def _count(self, request: TeacherRequest, name: str, n: int = 1) -> None:
        for usage in (self.usage, request.usage):
            if usage is not None:
                if name.startswith("retry:"):
                    usage.retries[name[len("retry:"):]] += n
                else:
                    setattr(usage, name, getattr(usage, name) + n)

    def _api_key(self) -> str:
        # Local servers (llama.cpp, vLLM without --api-key) accept any key; the openai package needs one set.
        return os.environ.get(self.config.api_key_env) or "no-key-set"

    def _sampling(self, seed: int) -> dict[str, Any]:
        return {"temperature": self.config.temperature, "max_tokens": self.config.max_tokens, "seed": seed}

    def _started_loop(self) -> asyncio.AbstractEventLoop:
        """The client's event loop, started on first use in a daemon thread; the HTTP client and the
        concurrency limit live on it, so requests from every `submit` share one pool and one limit."""
        with self._start_lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="teacher-client", daemon=True).start()

                async def open_client():
                    # aiohttp under the SDK (its `aiohttp` extra): 0.87 ms of CPU a request against 1.36 with
                    # httpx's transport (bench/teacher.py), which at 256 in flight is what one actor can send.
                    # Several small connection pools rather than one wide one: a pool's bookkeeping per request
                    # grows with its connections, so the CPU a request costs would grow with the concurrency
                    sizes = [min(POOL_CONNECTIONS, self.concurrency - start)
                             for start in range(0, self.concurrency, POOL_CONNECTIONS)]
                    self._clients = [openai.AsyncOpenAI(base_url=self.base_url, api_key=self._api_key(), max_retries=0,
                                                        timeout=self.config.timeout,
                                                        http_client=openai.DefaultAioHttpClient(limits=pool_limits(size)))
                                     for size in sizes]
                    self._slots = asyncio.Queue()
                    for index, size in enumerate(sizes):
                        for _ in range(size):
                            self._slots.put_nowait(index)
                asyncio.run_coroutine_threadsafe(open_client(), loop).result()
                self._loop = loop
                atexit.register(self.close)
            return self._loop

    def close(self) -> None:
        """Closes the HTTP clients and stops the loop (at exit, or earlier); a later call starts them again."""
        with self._start_lock:
            loop, self._loop = self._loop, None
        if loop is None or not loop.is_running():
            return

        async def close_clients():
            for client in self._clients:
                await client.close()

        try:
            asyncio.run_coroutine_threadsafe(close_clients(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)

    def submit(self, requests: list[TeacherRequest]) -> concurrent.futures.Future:
        """Starts the requests on the client's loop at once; the future's result is `run_all`'s list. Call it
        from any thread: requests of several calls share the `concurrency` slots."""
        return asyncio.run_coroutine_threadsafe(self._run_all(requests), self._started_loop())

    def run_all(self, requests: list[TeacherRequest]) -> list[BaseModel | TeacherError]:
        """Answers in request order; a request that failed for good comes back as its TeacherError."""
        return self.submit(requests).result()

    async def _run_all(self, requests: list[TeacherRequest]) -> list[BaseModel | TeacherError]:
        async def one(request: TeacherRequest):
            try:
                return await self.complete(request)
            except TeacherError as err:
                self._count(request, "failed")
                return err
        return await asyncio.gather(*(one(r) for r in requests))

    async def complete(self, request: TeacherRequest) -> BaseModel:
        fmt = response_format(self.format_kind, request.output)
        key = None if self.cache is None else cache_key(self.config.model, self.prompt_version, request.messages,
                                                        self._sampling(request.seed), fmt)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            self._count(request, "cache_hits")
            return request.output.model_validate_json(hit["content"])
        sampling = self._sampling(request.seed)
        for invalid in range(self.config.max_invalid_retries + 1):
            content = await self._call(request, fmt, sampling)
            try:
                answer = request.output.model_validate_json(content)
            except ValidationError:
                self._count(request, "retry:invalid_output")
                # The same sampling would give the same broken answer back: sample (seeded) instead.
                sampling = {**sampling, "seed": sampling["seed"] + 1_000_003 * (invalid + 1),
                            "temperature": max(self.config.temperature, 0.7)}
                continue
            if self.cache is not None:
                self.cache.put(key, {"content": content, "model": self.config.model,
                                     "prompt_version": self.prompt_version})
            return answer
        raise TeacherError("invalid_output")

    async def _call(self, request: TeacherRequest, fmt: dict, sampling: dict) -> str:
        """One answer's text, retrying transient failures; TeacherError once retries are spent."""
        last, wait = "unknown", None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._delay(attempt, wait))
            wait = None
            self._count(request, "requests")
            try:
                slot = await self._slots.get()  # held while the server works, not during backoff
                try:
                    # chat.completions.create's own POST, without its per-request walk over the (long, already
                    # plain-JSON) messages and its typed response: about half the client's CPU per request
                    text = await self._clients[slot].post("/chat/completions", cast_to=str, body={
                        "model": self.config.model, "messages": request.messages, "response_format": fmt, **sampling})
                finally:
                    self._slots.put_nowait(slot)
                answer = json.loads(text)
                content = answer["choices"][0]["message"]["content"]
                if not isinstance(content, str):
                    raise TypeError("no message content")
                usage = answer.get("usage") or {}
                self._count(request, "prompt_tokens", usage.get("prompt_tokens") or 0)
                self._count(request, "completion_tokens", usage.get("completion_tokens") or 0)
                return content
            except openai.RateLimitError as err:
                last, wait = "http_429", retry_after_seconds(err)
            except openai.APITimeoutError:
                last = "timeout"
            except openai.APIConnectionError:
                last = "connection"
            except openai.APIStatusError as err:
                if err.status_code < 500 and err.status_code not in (408, 409):
                    raise TeacherError(f"http_{err.status_code}") from None  # our request is wrong: no retry helps
                last, wait = f"http_{err.status_code}", retry_after_seconds(err)
            except (openai.APIResponseValidationError, json.JSONDecodeError, TypeError, AttributeError,
                    IndexError, KeyError, ValueError):
                last = "malformed"
            self._count(request, f"retry:{last}")
        raise TeacherError(f"retries_exhausted:{last}")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:  # the server said when; a little jitter keeps workers from returning together
            return min(retry_after, self.config.max_backoff_seconds) + random.uniform(0, 0.1)
        cap = min(self.config.max_backoff_seconds, self.config.backoff_seconds * 2 ** (attempt - 1))
        return random.uniform(0, cap)  # full jitter (AWS architecture blog's recommendation)


def serving_concurrency(config: TeacherConfig) -> int:
    """Requests in flight per client: `teacher.concurrency`, but 1 against the embedded server, which answers
    one request at a time (more would only wait in its queue with their timeouts running)."""
    return 1 if config.kind == "embedded" else config.concurrency


def pool_limits(concurrency: int):
    """httpx's pool sized to the concurrency (its default of 100 connections would cap a 256-wide pipe)."""
    import httpx

    return httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)


def check_reachable(config: TeacherConfig, base_url: str) -> None:
    """One GET /models before any crawling; an unreachable or refusing teacher is one sentence."""
    import httpx

    headers = {"Authorization": f"Bearer {os.environ[config.api_key_env]}"} if os.environ.get(config.api_key_env) else {}
    try:
        response = httpx.get(base_url.rstrip("/") + "/models", headers=headers, timeout=30)  # a busy server is slow
    except httpx.HTTPError as err:
        raise UserError(f"The teacher at {base_url} is unreachable ({type(err).__name__}); start the server or "
                        f"set teacher.base_url to a running OpenAI-compatible endpoint.") from None
    if response.status_code in (401, 403):
        raise UserError(f"The teacher at {base_url} refused the API key (HTTP {response.status_code}); "
                        f"put a valid key in the environment variable {config.api_key_env}.")
    if response.status_code >= 400 and response.status_code != 404:  # some proxies do not serve /models
        raise UserError(f"The teacher at {base_url} answered HTTP {response.status_code} to GET /models; "
                        f"check teacher.base_url (it usually ends in /v1).")
