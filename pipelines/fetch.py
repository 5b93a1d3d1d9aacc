"""Fetching one image URL from an untrusted list: the crawl's downloader, put in img2dataset's place.

URL lists come from strangers and crawls run on cloud machines, so every download here:
- goes through the URL policy of `pipelines/url_policy.py`: the URL normalized the way a browser does,
  only `http`/`https` (`blocked_scheme`), and only connections to addresses the policy allows,
  checked on the *resolved* address at connect time, for every redirect hop too (`blocked_address`);
- has a whole-download deadline (`deadline`) besides the per-read timeout, and a byte limit
  (`too_large`, from Content-Length before reading or while reading);
- is retried on transient failures (timeouts, resets, 429, 5xx) with exponential backoff and full
  jitter, honouring `Retry-After` up to `crawl.max_retry_after`.
Failures are `<kind>:<detail>` messages that `pipelines.crawl.classify_download_error` keeps as
`download_error:<kind>:<detail>`; nothing from a refused URL is read, so nothing of it is written.

`pipelines/crawl_workers.py` puts `fetch` in img2dataset's place.
"""
from __future__ import annotations

import contextlib
import email.utils
import heapq
import http.client
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit, urlunsplit

from pipelines.url_policy import FetchError, guarded_connection, normalize_url
from schemas.config import CrawlConfig

# img2dataset's user agent, so sites see the same crawler they see from the plain CLI.
USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"
REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 10  # urllib's and browsers' (20) order of magnitude
TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
# Retried within the crawl (crawl.retries), with backoff: failures a second try soon may not meet.
RETRIED_KINDS = ("timeout", "connection_reset", "connection_refused", "incomplete_body",
                 *(f"http_{code}" for code in TRANSIENT_STATUS))
# Re-crawled when a run resumes (crawl.recrawl_transient): those, and a download that ran out of time,
# which a slow server may finish later but a retry a second later would only repeat.
TRANSIENT_KINDS = (*RETRIED_KINDS, "deadline")
CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchSettings:
    timeout: float  # per connect and per read
    deadline: float  # the whole download, redirects included
    max_bytes: int
    retries: int
    backoff_seconds: float
    max_retry_after: float
    allow: frozenset[str] = field(default_factory=frozenset)  # address classes allowed despite being non-public
    user_agent: str = USER_AGENT
    user_agent_token: str | None = None
    disallowed_header_directives: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_config(cls, config: CrawlConfig) -> "FetchSettings":
        return cls(config.timeout, config.download_deadline, config.max_bytes, config.retries, config.backoff_seconds,
                   config.max_retry_after, frozenset(config.allow_private_networks))


class _Watchdog:
    """One thread per process that shuts down the socket of a download still running at its deadline. Timeouts
    bound each recv only: a server sending a byte every second (headers included) never trips them."""

    def __init__(self):
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.heap: list[list] = []  # [deadline, sequence, socket, active]
        self.sequence, self.thread = 0, None

    def watch(self, sock: socket.socket, deadline: float) -> list:
        with self.lock:
            self.sequence += 1
            entry = [deadline, self.sequence, sock, True]
            heapq.heappush(self.heap, entry)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="download-deadlines", daemon=True)
                self.thread.start()
            earliest = self.heap[0] is entry
        if earliest:  # the thread sleeps until the earliest deadline; only a new earliest one needs to wake it
            self.wake.set()
        return entry

    def _run(self) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                while self.heap and self.heap[0][0] <= now:
                    _, _, sock, active = heapq.heappop(self.heap)
                    if active:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)  # the blocked recv returns; fetch_once says "deadline"
                wait = self.heap[0][0] - now if self.heap else None
            self.wake.wait(wait)
            self.wake.clear()


_WATCHDOG = _Watchdog()


def _request(url: str, settings: FetchSettings, deadline: float, watched: list) -> tuple[http.client.HTTPResponse, socket.socket]:
    """One GET on a guarded connection; returns the open response (the caller reads and closes it) and its socket."""
    parts = urlsplit(url)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    port = parts.port or (443 if parts.scheme == "https" else 80)  # explicit: http.client misreads a bare IPv6 host
    connection = kind(parts.hostname, port, timeout=max(0.01, min(settings.timeout, deadline - time.monotonic())))
    sockets = []

    def connect(address, timeout, source_address=None):
        sockets.append(guarded_connection(settings.allow, address, timeout, source_address))
        watched.append(_WATCHDOG.watch(sockets[-1], deadline))
        return sockets[-1]

    connection._create_connection = connect  # noqa: SLF001 - http.client's hook for opening the socket
    target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
    connection.request("GET", target, headers={"User-Agent": settings.user_agent, "Accept": "image/*,*/*;q=0.8",
                                               "Connection": "close"})
    return connection.getresponse(), sockets[0]


def _read_body(response: http.client.HTTPResponse, sock: socket.socket, settings: FetchSettings, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.strip().isdigit() and int(declared) > settings.max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} over {settings.max_bytes} bytes")
    chunks, total = [], 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("deadline", f"body not complete after {settings.deadline:g} s ({total} bytes read)")
        sock.settimeout(min(settings.timeout, remaining))  # each read waits at most this; the loop bounds the total
        try:  # read1: one recv, so a trickle cannot keep one call busy past the deadline
            chunk = response.read1(min(CHUNK, settings.max_bytes + 1 - total))
        except http.client.IncompleteRead:  # a chunked body cut short
            raise FetchError("incomplete_body", f"{total} bytes of a chunked body") from None
        if not chunk:
            if response.length:  # the connection closed before Content-Length bytes came
                raise FetchError("incomplete_body", f"{total} bytes of {declared}")
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > settings.max_bytes:
            raise FetchError("too_large", f"body over {settings.max_bytes} bytes")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def fetch_once(url: str, settings: FetchSettings) -> bytes:
    """The body of url after redirects, or FetchError with the failure's kind."""
    deadline = time.monotonic() + settings.deadline
    watched: list[list] = []
    try:
        return _follow(normalize_url(url), settings, deadline, watched)
    except FetchError as err:
        if time.monotonic() >= deadline and err.kind in ("timeout", "connection_reset", "incomplete_body", "connection"):
            raise FetchError("deadline", f"not complete after {settings.deadline:g} s") from None
        raise
    finally:
        for entry in watched:
            entry[3] = False  # done: the watchdog leaves this socket alone


def _follow(current: str, settings: FetchSettings, deadline: float, watched: list) -> bytes:
    seen = set()
    for _ in range(MAX_REDIRECTS + 1):
        seen.add(current)
        try:
            response, sock = _request(current, settings, deadline, watched)
            try:
                if response.status in REDIRECTS and response.getheader("Location"):
                    target = normalize_url(urljoin(current, response.getheader("Location")))
                    if target in seen:
                        raise FetchError("redirect_loop", f"{response.status} back to {target}")
                    current = target
                    continue
                if response.status != 200:
                    raise FetchError(f"http_{response.status}", response.reason or "",
                                     _retry_after(response.getheader("Retry-After")))
                if settings.disallowed_header_directives and _disallowed(response, settings):
                    raise FetchError("disallowed", "X-Robots-Tag forbids use")
                return _read_body(response, sock, settings, deadline)
            finally:
                response.close()
        except FetchError:
            raise
        except (TimeoutError, socket.timeout):
            kind = "deadline" if time.monotonic() >= deadline else "timeout"
            raise FetchError(kind, f"no answer within {settings.timeout:g} s") from None
        except ConnectionRefusedError:
            raise FetchError("connection_refused") from None
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as err:
            raise FetchError("connection_reset", type(err).__name__) from None
        except http.client.InvalidURL as err:
            raise FetchError("bad_url", str(err)) from None
        except (http.client.HTTPException, OSError) as err:
            kind = "tls" if "SSL" in type(err).__name__ else "connection"
            raise FetchError(kind, str(err).splitlines()[0][:200] if str(err) else type(err).__name__) from None
    raise FetchError("too_many_redirects", f"more than {MAX_REDIRECTS}")


def _disallowed(response: http.client.HTTPResponse, settings: FetchSettings) -> bool:
    from img2dataset.downloader import is_disallowed

    return is_disallowed(response.headers, settings.user_agent_token, settings.disallowed_header_directives)


def fetch(url: str, settings: FetchSettings, sleep=time.sleep) -> bytes:
    """fetch_once with retries of transient failures: Retry-After when given (up to the cap), else backoff."""
    for attempt in range(settings.retries + 1):
        try:
            return fetch_once(url, settings)
        except FetchError as err:
            if err.kind not in RETRIED_KINDS or attempt == settings.retries:
                raise
            if err.retry_after is not None and err.retry_after > settings.max_retry_after:
                raise FetchError(err.kind, f"Retry-After {err.retry_after:g} s is over crawl.max_retry_after") from None
            wait = err.retry_after if err.retry_after is not None else \
                random.uniform(0, settings.backoff_seconds * 2 ** attempt)
            sleep(wait)
    raise AssertionError("unreachable")
