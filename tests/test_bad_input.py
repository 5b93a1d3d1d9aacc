"""Bad URL lists, bad config values and unreachable hosts: one clear sentence, exit 2, nothing that looks complete."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.crawl import classify_download_error
from pipelines.url_list import read_url_list, with_uids
from schemas.errors import UserError
from tests.conftest import REPO, free_port


def run_job(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "pipelines/build_instruct.py", "--config", "configs/sample.yaml",
               "--set", f"output_root={tmp_path / 'out'}", *[a for o in overrides for a in ("--set", o)]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def assert_one_sentence_failure(proc: subprocess.CompletedProcess, fragment: str, tmp_path) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    assert not list((tmp_path / "out").rglob("manifest.json"))  # nothing looks complete


@pytest.mark.parametrize(
    "table, fragment",
    [
        (pa.table({"link": ["http://a/b.jpg"], "caption": ["x"]}), "has no 'url' column"),
        (pa.table({"url": [1, 2], "caption": ["x", "y"]}), "column 'url' must hold strings"),
        (pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), "has no rows"),
    ],
)
def test_malformed_url_lists(tmp_path, table, fragment):
    path = tmp_path / "urls.parquet"
    pq.write_table(table, path)
    assert_one_sentence_failure(run_job(tmp_path, f"crawl.url_list={path}"), fragment, tmp_path)


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="cannot be read"):
        read_url_list(empty)
    assert_one_sentence_failure(run_job(tmp_path, f"crawl.url_list={tmp_path / 'missing.parquet'}"), "does not exist", tmp_path)


def test_bad_config_value(tmp_path):
    assert_one_sentence_failure(run_job(tmp_path, "crawl.processes=0"), "crawl.processes", tmp_path)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["clip.pretrained=/nowhere/model.pt"], "CLIP checkpoint /nowhere/model.pt does not exist"),
        (["clip.model=ViT-Nope", "clip.config_path=null"], "Unknown open_clip model 'ViT-Nope'"),
    ],
)
def test_bad_clip_settings_fail_before_crawling(tmp_path, overrides, fragment):
    proc = run_job(tmp_path, *overrides)
    assert_one_sentence_failure(proc, fragment, tmp_path)
    assert not list((tmp_path / "out").rglob("*.tar"))


def test_unreachable_host_is_reported_before_crawling(tmp_path):
    path = tmp_path / "urls.parquet"
    port = free_port()  # nothing listens there
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:{port}/a.jpg"], "caption": ["a cat"]}), path)
    proc = run_job(tmp_path, f"crawl.url_list={path}")
    assert_one_sentence_failure(proc, "No URL host is reachable", tmp_path)
    assert not list((tmp_path / "out").rglob("*.tar"))  # no crawl started


def test_repeated_urls_keep_one_row_each():
    table = with_uids(pa.table({"url": ["http://a/x.jpg", "http://a/x.jpg", "http://a/y.jpg"], "caption": ["1", "2", "3"]}))
    uids = table.column("uid").to_pylist()
    assert len(set(uids)) == 3 and uids[1] == uids[0] + "-2"


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "download_error:http_404"),
        ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.", "download_error:redirect_loop"),
        ("The read operation timed out", "download_error:timeout"),
        ("<urlopen error [Errno 111] Connection refused>", "download_error:connection_refused"),
        ("something odd", "download_error:other:something odd"),
        (None, "download_error:other:no error message"),
    ],
)
def test_download_errors_are_classified(message, reason):
    assert classify_download_error(message) == reason
