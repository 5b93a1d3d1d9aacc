"""Read and check a user's URL list before anything is crawled.

A URL list is a parquet (or csv/tsv) file with `url` and `caption` columns, as LAION, CC3M
and COCO publish them. We add a stable `uid` per row and write a normalized copy into the
run directory: that copy is what img2dataset crawls and what every later count refers to.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from schemas.errors import UserError

REQUIRED_COLUMNS = ("url", "caption")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_url_list(path: str | Path) -> pa.Table:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"URL list {path} is a directory; set crawl.url_list to one parquet (or csv/tsv) file "
                        f"with url and caption columns.")
    if not path.is_file():
        raise UserError(f"URL list {path} does not exist; set crawl.url_list to a parquet file with url and caption columns.")
    try:
        if path.suffix in (".csv", ".tsv"):
            table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter="\t" if path.suffix == ".tsv" else ","))
        else:
            table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise UserError(f"URL list {path} cannot be read as {path.suffix.lstrip('.') or 'parquet'} ({str(err).splitlines()[0]}).") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"URL list {path} has no {', '.join(repr(c) for c in missing)} column (it has: {', '.join(table.column_names) or 'none'}).")
    for column in REQUIRED_COLUMNS:
        kind = table.schema.field(column).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
            raise UserError(f"URL list {path}: column {column!r} must hold strings, but holds {kind}.")
    if table.num_rows == 0:
        raise UserError(f"URL list {path} has no rows; there is nothing to crawl.")
    return table.select(list(REQUIRED_COLUMNS))


def with_uids(table: pa.Table) -> pa.Table:
    """uid = first 16 hex of sha1(url); a repeated URL gets `-2`, `-3`... so every row keeps its own uid."""
    seen: Counter[str] = Counter()
    uids = []
    for url in table.column("url").to_pylist():
        base = hashlib.sha1((url or "").encode()).hexdigest()[:16]
        seen[base] += 1
        uids.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    urls = [u or "" for u in table.column("url").to_pylist()]
    return pa.table({"uid": uids, "url": urls, "caption": table.column("caption").cast(pa.string())})


def check_hosts_reachable(urls: list[str], max_hosts: int, allow: frozenset[str] = frozenset(),
                          timeout: float = 2.0) -> list[str]:
    """Try a TCP connection to up to `max_hosts` distinct hosts the URL policy allows (pipelines/fetch.py: a
    refused address is never connected to); raise if none answers, or if every host is refused.

    Returns the hosts that did not answer (their rows still get per-record reasons from the crawl).
    """
    from pipelines.url_policy import FetchError, guarded_connection, normalize_url

    hosts: list[tuple[str, int]] = []
    for url in urls:
        try:
            parts = urlsplit(normalize_url(url))
        except FetchError:
            continue
        port = parts.port or (443 if parts.scheme == "https" else 80)
        if (parts.hostname, port) not in hosts:
            hosts.append((parts.hostname, port))
        if len(hosts) >= max_hosts:
            break
    if not hosts:
        raise UserError("URL list holds no http(s) URL with a host name; check the url column.")
    unreachable, refused = [], []
    for host, port in hosts:
        try:
            guarded_connection(allow, (host, port), timeout).close()
        except FetchError as err:
            (refused if err.kind == "blocked_address" else unreachable).append(f"{host}:{port} ({err})")
        except OSError as err:
            unreachable.append(f"{host}:{port} ({err.strerror or err})")
    if len(refused) == len(hosts):
        raise UserError(f"Every URL host tried is a non-public address the crawl refuses ({refused[0]}); to crawl "
                        f"a server of your own, allow its class, e.g. --set crawl.allow_private_networks=[loopback].")
    if len(unreachable) + len(refused) == len(hosts):
        raise UserError(
            f"No URL host is reachable (tried {', '.join(unreachable[:3])}); start the image server or check the network."
        )
    return unreachable + refused


def warn_unreachable_hosts(table: pa.Table, max_hosts: int, allow: frozenset[str] = frozenset()) -> None:
    """Probes up to `max_hosts` of the list's hosts (none when 0); warns about each that did not answer."""
    if max_hosts:
        for host in check_hosts_reachable(table.column("url").to_pylist(), max_hosts, allow):
            print(f"warning: URL host {host} did not answer or is refused; its rows will be dropped with download errors")


def write_url_list(table: pa.Table, destination: Path, shard_size: int) -> int:
    """Writes the uid'ed copy, one row group per crawl shard; returns the row count."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, destination, row_group_size=shard_size)
    return table.num_rows


def prepare_url_list(source: str | Path, destination: Path, max_hosts: int, shard_size: int,
                     allow: frozenset[str] = frozenset()) -> int:
    """Checks the list, probes its hosts, writes the uid'ed copy (one row group per crawl shard); returns the row count."""
    table = with_uids(read_url_list(source))
    warn_unreachable_hosts(table, max_hosts, allow)
    return write_url_list(table, destination, shard_size)


def shard_count_for(num_rows: int, shard_size: int) -> int:
    return -(-num_rows // shard_size)
