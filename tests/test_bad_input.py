"""Bad URL lists, bad config values, unreachable hosts, unusable output directories and a full disk: one
clear sentence, exit 2, nothing that looks complete."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas.errors import disk_full_error
from pipelines.crawl import classify_download_error
from pipelines.url_list import read_url_list, with_uids
from schemas.errors import UserError
from tests.conftest import REPO, free_port

RAY_JOB, BEAM_JOB = "pipelines/build_instruct.py", "pipelines/build_instruct_beam.py"


def run_job(tmp_path, *overrides: str, entry: str = RAY_JOB,
            config: str = "configs/sample.yaml") -> subprocess.CompletedProcess:
    """The real entry point as a subprocess (the Beam one needs no Ray head and imports faster). A URL list of
    our own and no annotation files come first, so that no test depends on a rendered sample world (a clean
    clone has none); a test's own overrides come later and win."""
    world_free = [f"crawl.url_list={url_list(tmp_path)}", "objects.annotations=[]", "eval_guard.folders=[]"]
    command = [sys.executable, entry, "--config", config, "--set", f"output_root={tmp_path / 'out'}",
               *[a for o in world_free + list(overrides) for a in ("--set", o)]]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)


def run_beam(tmp_path, *overrides: str, config: str = "configs/sample.yaml") -> subprocess.CompletedProcess:
    return run_job(tmp_path, *overrides, entry=BEAM_JOB, config=config)


def url_list(tmp_path) -> Path:
    """A one-row URL list of our own, so the test does not depend on a rendered sample world (a name no test
    writes its own list to)."""
    path = tmp_path / "own-urls.parquet"
    if not path.exists():  # written once: its bytes name the run's version directory
        pq.write_table(pa.table({"url": [f"http://127.0.0.1:{free_port()}/a.jpg"], "caption": ["a cat"]}), path)
    return path


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A small tmpfs mounted at `path` (root only: the test is skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root (and mount rights in this container)")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


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
    assert_one_sentence_failure(run_job(tmp_path, f"crawl.url_list={tmp_path / 'missing.parquet'}"),
                                 "does not exist; set crawl.url_list", tmp_path)


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


# --- config and input files (a, b, e, g of "safe on untrusted input") ---

def test_config_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    assert_one_sentence_failure(run_beam(tmp_path, config=str(bad)), "is not UTF-8 text", tmp_path)


def test_override_that_is_not_yaml(tmp_path):
    assert_one_sentence_failure(run_beam(tmp_path, "crawl.timeout=[1,"), "the value is not valid YAML", tmp_path)


@pytest.mark.parametrize(
    "setting, content, fragment",
    [
        ("objects.annotations", "this is not json", "is not COCO instances JSON"),
        ("evaluate.ground_truth", json.dumps({"images": [], "annotations": []}), "is not COCO instances JSON"),
        ("objects.annotations", None, "is a directory"),
    ],
)
def test_annotation_file_that_is_not_coco_fails_before_crawling(tmp_path, setting, content, fragment):
    annotations = tmp_path / "instances.json"
    if content is None:
        annotations.mkdir()
    else:
        annotations.write_text(content)
    proc = run_beam(tmp_path, f"crawl.url_list={url_list(tmp_path)}", "objects.annotations=[]",
                    f"{setting}=[{annotations}]")
    assert_one_sentence_failure(proc, fragment, tmp_path)
    assert not list((tmp_path / "out").rglob("shards"))  # checked before the crawl (and before the work directory)


def test_url_list_that_is_a_directory(tmp_path):
    (tmp_path / "lists").mkdir()
    proc = run_beam(tmp_path, f"crawl.url_list={tmp_path / 'lists'}", "objects.annotations=[]")
    assert_one_sentence_failure(proc, f"URL list {tmp_path / 'lists'} is a directory", tmp_path)


# --- where the run writes (c, d, f) ---

def test_output_root_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    proc = run_beam(tmp_path, f"output_root={tmp_path / 'taken'}")
    assert_one_sentence_failure(proc, f"output_root {tmp_path / 'taken'} is a file", tmp_path)


def test_output_root_that_is_read_only(tmp_path):
    # Root writes through a chmod 555 directory, so as root the read-only directory is a read-only tmpfs.
    target = tmp_path / "readonly"
    with contextlib.ExitStack() as stack:
        if os.geteuid() == 0:
            stack.enter_context(tmpfs(target, "ro,size=64k"))
        else:
            target.mkdir()
            target.chmod(0o555)
            stack.callback(target.chmod, 0o755)
        proc = run_beam(tmp_path, f"output_root={target / 'outputs'}")
    assert_one_sentence_failure(proc, f"output_root {target / 'outputs'} is not writable", tmp_path)


@pytest.mark.parametrize("name", ["..", "."])
def test_run_name_cannot_leave_output_root(tmp_path, name):
    assert_one_sentence_failure(run_beam(tmp_path, f"name={name}"), f"Bad config value name='{name}'", tmp_path)


def test_run_directory_behind_a_symlink_outside_output_root(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out" / "escape").symlink_to(tmp_path / "elsewhere")
    proc = run_beam(tmp_path, "name=escape")
    assert_one_sentence_failure(proc, f"outside output_root {tmp_path / 'out'}", tmp_path)
    assert not list((tmp_path / "elsewhere").iterdir())


def test_full_disk_is_reported_before_anything_starts(tmp_path):
    """A real full file system: a 64 KiB tmpfs filled up. Before, the embedded teacher's log could not be
    written and the run blamed a 120 s health timeout after a few seconds."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        with open(disk / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 4096)
        proc = run_beam(tmp_path, f"output_root={disk / 'outputs'}")
    assert_one_sentence_failure(proc, f"No space left on device writing {tmp_path / 'disk'}", tmp_path)
    assert "teacher" not in proc.stdout + proc.stderr  # nothing was started


def test_full_disk_during_the_run_names_the_run_directory(tmp_path, monkeypatch):
    """Stand-in for a disk that fills up after the checks: the run's config.yaml is a link to /dev/full, where
    every write fails with ENOSPC (a tmpfs sized to fill mid-crawl would be flaky)."""
    from pipelines.run import RunDirectory
    from schemas.config import load_config

    monkeypatch.chdir(REPO)  # the CLIP weights' paths in the config are relative to the repo, as in the subprocess
    # Nothing serves the list's host, so the host probe (a check, run before anything is written) is off.
    overrides = [f"crawl.url_list={url_list(tmp_path)}", "objects.annotations=[]", "eval_guard.folders=[]",
                 "crawl.preflight_hosts=0"]
    run = RunDirectory.open(load_config("configs/sample.yaml", [f"output_root={tmp_path / 'out'}", *overrides]), "beam")
    run.work.mkdir(parents=True)
    (run.work / "config.yaml").symlink_to("/dev/full")
    proc = run_beam(tmp_path, *overrides)
    assert_one_sentence_failure(proc, f"No space left on device writing {run.work}", tmp_path)


@pytest.mark.parametrize(
    "err, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError("[Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"), True),  # Arrow
        (OSError(errno.EACCES, "Permission denied"), False),
        (ValueError("no"), False),
    ],
)
def test_disk_full_is_found_behind_engine_wrappers(err, full):
    try:
        try:
            raise err
        except Exception as inner:
            raise RuntimeError(f"{inner} [while running 'WriteRecords']") from inner  # as Beam re-raises it
    except RuntimeError as wrapped:
        assert (disk_full_error(wrapped) is err) == full
