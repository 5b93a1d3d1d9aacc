"""The crawl's URL policy: which URLs are fetched and which addresses a download may connect to.

- `normalize_url`: a browser's reading of a URL as typed (IRI -> percent-encoded URI: `café.jpg`, raw
  spaces); only `http`/`https` pass (`blocked_scheme`; `file://`, `data:`, `ftp://` are never opened).
- `guarded_connection`: resolves, checks and connects to the checked address, so DNS names and
  redirects cannot reach loopback, private, link-local (cloud metadata), unique-local, multicast or
  reserved addresses (`blocked_address`) unless `crawl.allow_private_networks` names that class.
`pipelines/fetch.py` downloads through these; `pipelines/url_list.py` checks hosts before any crawl.
"""
from __future__ import annotations

import contextlib
import ipaddress
import socket
from urllib.parse import quote, urlsplit, urlunsplit

_SHARED = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT
_UNIQUE_LOCAL = ipaddress.ip_network("fc00::/7")
_PRIVATE_V4 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))  # RFC 1918


class FetchError(Exception):
    """A failed download: `kind` is the reason's class (`blocked_address`, `http_404`, ...)."""

    def __init__(self, kind: str, detail: str = "", retry_after: float | None = None):
        super().__init__(f"{kind}:{detail}" if detail else kind)
        self.kind, self.retry_after = kind, retry_after


def address_class(address: str) -> str | None:
    """None for a public address; else the class that refuses it ('loopback', 'link_local', ...)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 scope id is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"  # 169.254.169.254 is the cloud metadata service
    if ip.is_multicast:
        return "multicast"
    if ip in _SHARED:
        return "shared"
    if ip.version == 6 and ip in _UNIQUE_LOCAL:
        return "unique_local"
    if ip.version == 4 and any(ip in network for network in _PRIVATE_V4):
        return "private"
    if not ip.is_global:
        return "reserved"  # unspecified, documentation, benchmarking, 240/4 ...
    return None


def allowed_addresses(host: str, port: int, allow: frozenset[str]) -> list[tuple]:
    """getaddrinfo's entries for host whose address the policy allows; FetchError('blocked_address') when none is."""
    with contextlib.suppress(ValueError):  # an address literal is judged as written, even where its family has no route
        if (why := address_class(host)) is not None and why not in allow:
            raise FetchError("blocked_address", _refusal(why, host))
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise FetchError("dns", f"{host}: {err.strerror or err}") from None
    refused = []
    allowed = []
    for info in infos:
        why = address_class(info[4][0])
        if why is None or why in allow:
            allowed.append(info)
        else:
            refused.append(_refusal(why, info[4][0]))
    if not allowed:
        raise FetchError("blocked_address", refused[0])
    return allowed


def _refusal(why: str, address: str) -> str:
    return f"{why} {address}" + (" (cloud metadata)" if address == "169.254.169.254" else "")


def guarded_connection(allow: frozenset[str], address: tuple[str, int], timeout: float, source_address=None) -> socket.socket:
    """socket.create_connection that resolves, checks and connects to the checked address (no second lookup)."""
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in allowed_addresses(host, port, allow):
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as err:
            sock.close()
            last = err
    raise last or OSError(f"no address for {host}")


def normalize_url(url: str) -> str:
    """A browser's reading of a URL as typed: IDNA host, UTF-8 percent-encoded path and query (existing
    escapes kept), no fragment. FetchError('bad_url' / 'blocked_scheme') for what cannot be fetched."""
    text = (url or "").strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as err:
        raise FetchError("bad_url", str(err)) from None
    scheme = parts.scheme.lower()
    if not scheme:
        raise FetchError("bad_url", "no scheme")
    if scheme not in ("http", "https"):
        raise FetchError("blocked_scheme", scheme)
    if not parts.hostname:
        raise FetchError("bad_url", "no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii") if not parts.hostname.isascii() else parts.hostname
    except UnicodeError:
        raise FetchError("bad_url", f"host {parts.hostname!r} is not a valid name") from None
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port is not None else "")
    path = quote(parts.path, safe="/%:@!$&'()*+,;=-._~") or "/"
    query = quote(parts.query, safe="/?%:@!$&'()*+,;=-._~")
    return urlunsplit((scheme, netloc, path, query, ""))
