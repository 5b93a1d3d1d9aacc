"""The crawl on untrusted URL lists: a hostile server on 127.0.0.1 and refused addresses that are
checked without sending them any traffic (resolved and refused before connecting)."""
from __future__ import annotations

import base64
import socket
from urllib.parse import quote

import pytest

from filters.validate import ImageValidator
from pipelines.crawl import crawl, crawl_passes, read_shard
from pipelines.fetch import FetchSettings, fetch, fetch_once
from pipelines.url_policy import FetchError, normalize_url
from pipelines.batches import apply_stage
from pipelines.url_list import prepare_url_list
from schemas.config import CrawlConfig, ValidateConfig
from schemas.errors import UserError
from schemas.records import KEEP, reason_kind
from tests.hostile_server import CANARY, HostileServer

REFUSED_HOSTS = {  # host -> the class that refuses it
    "10.0.0.1": "private", "192.168.1.1": "private", "172.16.0.1": "private", "[fd00::1]": "unique_local",
    "169.254.169.254": "link_local", "127.0.0.2": "loopback", "localhost": "loopback", "[::1]": "loopback",
    "100.64.0.1": "shared", "0.0.0.0": "reserved",
}


@pytest.fixture
def no_traffic(monkeypatch):
    """Every socket connect fails the test: a refused address must be refused before any packet is sent."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


def settings(**changes) -> FetchSettings:
    return FetchSettings.from_config(CrawlConfig(**{"timeout": 1.0, "download_deadline": 3.0, "max_bytes": 1 << 20,
                                                    "retries": 1, "backoff_seconds": 0.1, **changes}))


@pytest.mark.parametrize("host, why", REFUSED_HOSTS.items())
def test_non_public_addresses_are_refused_without_traffic(no_traffic, host, why):
    with pytest.raises(FetchError) as err:
        fetch_once(f"http://{host}/latest/meta-data/x.jpg", settings())
    assert err.value.kind == "blocked_address" and str(err.value).startswith(f"blocked_address:{why} ")
    assert no_traffic == []


def test_allowing_loopback_by_name_allows_only_loopback(no_traffic):
    allowed = settings(allow_private_networks=["loopback"])
    with pytest.raises(AssertionError, match="connected to"):  # allowed: it would connect
        fetch_once("http://localhost:9/x.jpg", allowed)
    for host in ("10.0.0.1", "169.254.169.254"):
        with pytest.raises(FetchError, match="blocked_address"):
            fetch_once(f"http://{host}/x.jpg", allowed)


@pytest.mark.parametrize("url, kind", [("file:///etc/passwd", "blocked_scheme"), ("data:image/png;base64,AAAA", "blocked_scheme"),
                                       ("ftp://example.com/x.jpg", "blocked_scheme"), ("//example.com/x.jpg", "bad_url"),
                                       ("http:///x.jpg", "bad_url"), ("http://example.com:99999/x.jpg", "bad_url")])
def test_what_cannot_be_fetched_is_refused_before_any_lookup(no_traffic, url, kind):
    with pytest.raises(FetchError) as err:
        fetch_once(url, settings())
    assert err.value.kind == kind and no_traffic == []


@pytest.mark.parametrize("raw, normalized", [
    ("http://img.example.com/case/café.jpg", "http://img.example.com/case/caf%C3%A9.jpg"),
    ("http://img.example.com/with space.jpg?q=a b", "http://img.example.com/with%20space.jpg?q=a%20b"),
    ("http://img.example.com/already%20escaped.jpg", "http://img.example.com/already%20escaped.jpg"),
    ("http://bücher.example/x.jpg#frag", "http://xn--bcher-kva.example/x.jpg"),
    ("HTTPS://Example.COM", "https://example.com/"),
])
def test_urls_are_normalized_as_browsers_do(raw, normalized):
    assert normalize_url(raw) == normalized


def test_retry_after_is_honoured_up_to_the_cap():
    with HostileServer() as server:
        waits = []
        assert fetch(server.url("/rate-limited.jpg"), settings(allow_private_networks=["loopback"]), sleep=waits.append).startswith(b"\xff\xd8")
        assert waits == [1.0]
    with HostileServer() as server:  # a Retry-After longer than the cap is a failure, not a long stall
        with pytest.raises(FetchError, match="http_429:Retry-After 1 s is over"):
            fetch(server.url("/rate-limited.jpg"), settings(allow_private_networks=["loopback"], max_retry_after=0.5), sleep=waits.append)


def test_every_hostile_row_ends_as_one_row_with_its_reason_and_nothing_refused_is_stored(tmp_path, capfd):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(CANARY * 100)
    with HostileServer() as server:
        cases = {  # url -> expected reason kind (None: kept through validate)
            server.url("/ok/cat.jpg"): None,
            server.url("/case/café.jpg"): None,
            server.url("/with space.jpg"): None,
            server.url("/rate-limited.jpg"): None,
            server.url("/exif6.jpg"): None,
            secret.as_uri(): "download_error:blocked_scheme",
            "data:image/jpeg;base64," + base64.b64encode(CANARY).decode(): "download_error:blocked_scheme",
            "ftp://127.0.0.1/canary.jpg": "download_error:blocked_scheme",
            server.url("/redirect/" + quote(secret.as_uri(), safe="")): "download_error:blocked_scheme",
            server.url("/redirect/" + quote("http://169.254.169.254/canary.jpg", safe="")): "download_error:blocked_address",
            server.url("/redirect/" + quote("http://10.0.0.1/canary.jpg", safe="")): "download_error:blocked_address",
            server.url("/trickle.jpg"): "download_error:deadline",
            server.url("/trickle-headers.jpg"): "download_error:deadline",
            server.url("/huge.jpg"): "download_error:too_large",
            server.url("/huge-undeclared.jpg"): "download_error:too_large",
            server.url("/lying-length.jpg"): "download_error:incomplete_body",
            server.url("/missing.jpg"): "download_error:http_404",
            # loopback is allowed here (the server is on it); refusing it is tested above
            **{f"http://{host}/canary.jpg": "download_error:blocked_address" for host, why in REFUSED_HOSTS.items()
               if why != "loopback"},
        }
        urls = tmp_path / "urls.csv"
        urls.write_text("url,caption\n" + "".join(f'"{u}",a photo of a scene\n' for u in cases))
        config = CrawlConfig(url_list=str(urls), timeout=1.0, download_deadline=3.0, max_bytes=1 << 20, retries=1,
                             backoff_seconds=0.1, allow_private_networks=["loopback"], processes=1, threads=16,
                             shard_size=100)
        prepared = tmp_path / "run" / "urls.parquet"
        assert prepare_url_list(urls, prepared, 4, config.shard_size, frozenset(config.allow_private_networks)) == len(cases)
        crawl(config, prepared, tmp_path / "run" / "shards")
        rate_limited = server.requests["/rate-limited.jpg"]
    records = apply_stage(ImageValidator(ValidateConfig(min_side=16)), read_shard(tmp_path / "run" / "shards", 0, prepared))
    by_url = {r.url: r for r in records}
    assert len(records) == len(by_url) == len(cases)
    got = {url: None if r.status == KEEP else reason_kind(r.reason) for url, r in by_url.items()}
    assert got == cases
    assert len(rate_limited) == 2 and rate_limited[1] - rate_limited[0] >= 1.0  # waited for Retry-After
    rotated = by_url[server.url("/exif6.jpg")]
    assert (rotated.width, rotated.height) == (64, 96)  # as displayed: the 96x64 pixels turned by orientation 6
    stored = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".tar" for p in stored)
    assert not [p for p in stored if CANARY in p.read_bytes()]
    out, err = capfd.readouterr()
    assert CANARY.decode() not in out + err
    assert crawl_passes(tmp_path / "run" / "shards")[0]["urls"] == len(cases)


def test_a_list_of_only_refused_hosts_is_one_sentence_before_crawling(tmp_path):
    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://169.254.169.254/x.jpg,a cat\nhttp://10.1.2.3/y.jpg,a dog\n")
    with pytest.raises(UserError, match=r"non-public address the crawl refuses \(169.254.169.254:80 \(blocked_address:link_local"):
        prepare_url_list(urls, tmp_path / "out" / "urls.parquet", 4, 10)


def test_a_resumed_run_recrawls_transient_failures_and_counts_every_attempt(tmp_path):
    with HostileServer() as server:
        urls = tmp_path / "urls.csv"
        urls.write_text("url,caption\n" + "".join(f"{server.url(p)},a scene\n" for p in
                                                   ("/ok/1.jpg", "/flaky/2.jpg", "/flaky/3.jpg", "/missing.jpg")))
        config = CrawlConfig(url_list=str(urls), retries=0, allow_private_networks=["loopback"], processes=1,
                             threads=4, shard_size=2)
        prepared, shards = tmp_path / "urls.parquet", tmp_path / "shards"
        prepare_url_list(urls, prepared, 1, config.shard_size, frozenset(config.allow_private_networks))
        crawl(config, prepared, shards)
        first = [r for shard in (0, 1) for r in read_shard(shards, shard, prepared)]
        assert [r.reason and reason_kind(r.reason) for r in first] == [
            None, "download_error:http_503", "download_error:http_503", "download_error:http_404"]
        server.recover()
        crawl(config, prepared, shards)  # the resumed run: the 503s are tried again, the 404 is not
        crawl(config, prepared, shards)  # nothing transient left: no third pass
        flaky_requests = {path: len(times) for path, times in server.requests.items()}
    again = [r for shard in (0, 1) for r in read_shard(shards, shard, prepared)]
    assert [r.uid for r in again] == [r.uid for r in first]  # still one row per input row, in input order
    assert [r.reason and reason_kind(r.reason) for r in again] == [None, None, None, "download_error:http_404"]
    assert all(r.image for r in again[:3])
    assert flaky_requests["/flaky/2.jpg"] == flaky_requests["/flaky/3.jpg"] == 2 and flaky_requests["/missing.jpg"] == 1
    assert crawl_passes(shards) == [
        {"pass": "crawl", "urls": 4, "success": 1,
         "reasons": {"download_error:http_404": 1, "download_error:http_503": 2}},
        {"pass": "recrawl-1", "urls": 2, "success": 2, "reasons": {}},
    ]


MAIN_THAT_COUNTS_ITS_IMPORTS = '''
import sys
from pathlib import Path
with open(sys.argv[1], "a") as log:  # every import of this file as a main module adds a line
    log.write(__name__ + "\\n")
if __name__ == "__main__":
    sys.path.insert(0, sys.argv[2])
    from pipelines.crawl import crawl, read_shard
    from schemas.config import CrawlConfig
    config = CrawlConfig(url_list=sys.argv[3], retries=0, allow_private_networks=["loopback"], processes=2,
                         threads=2, shard_size=1)
    crawl(config, Path(sys.argv[4]), Path(sys.argv[5]), distributor="multiprocessing")
    print(sum(bool(read_shard(Path(sys.argv[5]), i, Path(sys.argv[4]))[0].image) for i in range(4)))
    print(__spec__, Path(__file__).name)  # restored after the crawl
'''


def test_spawned_crawl_workers_do_not_import_the_pipelines_main_module(tmp_path):
    """img2dataset's multiprocessing distributor spawns its workers; each would first re-import the caller's
    main script (for the Beam entry point: Apache Beam and every stage). The crawl tells them not to."""
    import subprocess
    import sys
    from pathlib import Path

    script, log = tmp_path / "main_script.py", tmp_path / "imports.log"
    script.write_text(MAIN_THAT_COUNTS_ITS_IMPORTS)
    with HostileServer() as server:
        urls = tmp_path / "urls.csv"
        urls.write_text("url,caption\n" + "".join(f"{server.url(f'/ok/{i}.jpg')},a scene\n" for i in range(4)))
        prepared = tmp_path / "urls.parquet"
        prepare_url_list(urls, prepared, 1, 1, frozenset({"loopback"}))
        done = subprocess.run([sys.executable, str(script), str(log), str(Path(__file__).resolve().parents[1]),
                               str(urls), str(prepared), str(tmp_path / "shards")],
                              capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["4", "None", "main_script.py"]  # 4 images crawled, __file__ back
    assert log.read_text().splitlines() == ["__main__"]  # imported once: by the run itself, by no worker
