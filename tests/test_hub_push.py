"""The Hub push of a published version: its token never shown, a failed push recorded (push.json) and
retried by the next run or by `python -m pipelines.publish --push`. No network: a local HTTP server stands
in for the Hub; the version is the one tests/test_publish.py publishes from hand-written record shards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.publish import push_to_hub
from schemas.errors import UserError
from tests.conftest import REPO
from tests.test_publish import FAKE_HF, MANIFEST, published, records, write_run  # noqa: F401 - published: a fixture


def test_push_without_token_is_one_sentence(published, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"^Set HF_TOKEN .*\.$"):
        push_to_hub(published[0], "someone/visinstruct", "v-0123456789ab")


def test_push_never_shows_the_token(published, monkeypatch, capsys):
    import huggingface_hub

    def refuse(self, *args, token: str, **kwargs):
        raise ConnectionError(f"401 Unauthorized: bad token {token}\nsecond line")

    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    with pytest.raises(UserError) as err:
        push_to_hub(published[0], "someone/visinstruct", "v-0123456789ab")
    assert "someone/visinstruct" in str(err.value) and "401 Unauthorized" in str(err.value)
    assert FAKE_HF not in str(err.value) and "\n" not in str(err.value)
    assert err.value.__context__ is None and FAKE_HF not in "".join(capsys.readouterr())


# --- a failed Hub push is recorded and retried ---
# No real Hub can run here: a local HTTP server stands in for it, refusing every request with 401 (what the
# Hub answers a bad token) and recording each one, so the test sees how often a push was attempted.

CANARY = "hf_CanaryTokenMustNeverBeWritten42"
REPO_ID = "someone/visinstruct"


@pytest.fixture
def refusing_hub():
    import http.server
    import threading

    requests: list[tuple[str, str, str]] = []

    class Refuse(http.server.BaseHTTPRequestHandler):
        def answer(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            requests.append((self.command, self.path, self.headers.get("Authorization") or ""))
            body = b'{"error": "Invalid credentials in Authorization header"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", requests
    server.shutdown()


def push_attempts(requests) -> list[str]:
    return [auth for method, path, auth in requests if method == "POST" and path == "/api/repos/create"]


def hub_env(endpoint: str, **extra: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": endpoint, **extra}


def test_failed_push_is_recorded_and_the_next_run_retries_it(tmp_path, refusing_hub, monkeypatch, capsys):
    import huggingface_hub

    from pipelines.run import RunDirectory
    from schemas.config import load_config

    endpoint, requests = refusing_hub
    monkeypatch.setenv("HF_TOKEN", CANARY)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)  # read by HfApi() in this process
    monkeypatch.chdir(REPO)  # the config's CLIP paths are relative to the repo, as for the entry point
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [r["url"] for r in records()], "caption": [r["caption"] for r in records()]}), urls)
    overrides = [f"output_root={tmp_path / 'out'}", f"crawl.url_list={urls}", "objects.annotations=[]",
                 "eval_guard.folders=[]", "publish.push_to_hub=true", f"publish.hub_repo={REPO_ID}"]
    run = RunDirectory.open(load_config("configs/sample.yaml", overrides), "beam")
    write_run(run.work, records())  # what the engine would have written

    with pytest.raises(UserError, match=rf"^Pushing to {REPO_ID} failed .*401.*retries the push\)\.$"):
        run.finish(num_rows=15, seconds=1.0)
    assert run.complete  # the data is finished; only the push is owed
    record = json.loads((run.final / "push.json").read_text())
    assert record["status"] == "failed" and record["attempts"] == 1 and "401" in record["error"]
    assert push_attempts(requests) == [f"Bearer {CANARY}"]

    # The next run of the same config finds the version complete but not pushed, and pushes it again.
    proc = subprocess.run([sys.executable, "pipelines/build_instruct_beam.py", "--config", "configs/sample.yaml",
                           *[a for o in overrides for a in ("--set", o)]],
                          cwd=REPO, env=hub_env(endpoint), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "is complete already" in proc.stdout and "is not on the Hub yet" in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: Pushing to {REPO_ID} failed"), proc.stderr
    assert len(push_attempts(requests)) == 2
    record = json.loads((run.final / "push.json").read_text())
    assert record["status"] == "failed" and record["attempts"] == 2

    # A version recorded as pushed is not pushed again.
    (run.final / "push.json").write_text(json.dumps({**record, "status": "pushed"}))
    assert run.existing_manifest()["version"] == run.version
    assert len(push_attempts(requests)) == 2

    printed = "".join(capsys.readouterr()) + proc.stdout + proc.stderr
    assert CANARY not in printed
    for path in run.final.rglob("*"):  # push.json, manifest, card, config, data: the token is in none
        assert not path.is_file() or CANARY.encode() not in path.read_bytes(), path


def test_publish_cli_records_its_push_and_keeps_the_runs_split(tmp_path, published, refusing_hub):
    endpoint, requests = refusing_hub
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    manifest = {**MANIFEST, "config": {"publish": {"validation_fraction": 0.3}}}  # the split `published` made
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    proc = subprocess.run([sys.executable, "-m", "pipelines.publish", str(run_dir), "--push", REPO_ID],
                          cwd=REPO, env=hub_env(endpoint, HF_TOKEN=CANARY), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(push_attempts(requests)) == 1
    record = json.loads((run_dir / "push.json").read_text())
    assert record["status"] == "failed" and record["repo"] == REPO_ID and record["attempts"] == 1
    assert CANARY not in proc.stdout + proc.stderr + (run_dir / "push.json").read_text()
    # The version keeps the split it was published with: the CLI pushes it, it does not re-split it.
    for name in ("train.json", "validation.json"):
        assert (run_dir / "llava" / name).read_bytes() == (published[0] / "llava" / name).read_bytes()


def test_publish_cli_never_resplits_a_published_version(tmp_path, published):
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    (run_dir / "manifest.json").write_text(json.dumps({**MANIFEST, "config": {"publish": {"validation_fraction": 0.3}}}))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}

    def publish_cli(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pipelines.publish", str(run_dir), *flags], cwd=REPO,
                              capture_output=True, text=True, timeout=180)

    again = publish_cli()
    assert again.returncode == 0 and "is published already" in again.stdout, again.stderr
    resplit = publish_cli("--validation-fraction", "0.5")
    errors = [line for line in resplit.stderr.splitlines() if line.startswith("error:")]
    assert resplit.returncode == 2 and "Traceback" not in resplit.stderr and len(errors) == 1, resplit.stderr
    assert "never overwritten" in errors[0] and "publish.validation_fraction=0.5" in errors[0]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing rewritten

    shutil.rmtree(run_dir / "hf"), shutil.rmtree(run_dir / "llava")  # a run that was never published is
    late = publish_cli()
    assert late.returncode == 0 and "published {" in late.stdout, late.stderr
    for name in ("train.json", "validation.json"):  # with the run's own split
        assert (run_dir / "llava" / name).read_bytes() == before[run_dir / "llava" / name]
