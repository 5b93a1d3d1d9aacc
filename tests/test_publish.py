"""Publishing: the HF dataset and LLaVA export from hand-written record shards, the dataset card, the Hub push's
token handling and its record (push.json), retried by the next run. No network: a local HTTP server stands in
for the Hub; no crawl: the pipeline's entry point only finds the version complete."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dataset_card import write_dataset_card
from pipelines.publish import publish_dataset, push_to_hub, split_of
from pipelines.batches import RECORD_SCHEMA
from schemas.errors import UserError
from tests.conftest import REPO

NEW_COLUMNS = ("objects", "instructions", "rejected_turns")
# RECORD_SCHEMA with the generation columns (added here if the pipeline's schema does not carry them yet).
SCHEMA = pa.schema([*RECORD_SCHEMA, *(pa.field(c, pa.string()) for c in NEW_COLUMNS if c not in RECORD_SCHEMA.names)])
CRAWL_SCHEMA = pa.schema([f for f in SCHEMA if f.name not in NEW_COLUMNS])
TYPES = ("conversation", "detail", "reasoning", "negatives")
FAKE_KEY = "sk-test-THISisNOTaREALkey1234567890"
FAKE_HF = "hf_FakeTokenValue0123456789"


def encoded(size: tuple[int, int], color: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format=fmt)
    return out.getvalue()


def record(i: int, types=TYPES) -> dict:
    uid = f"{i:016x}"
    url = f"http://127.0.0.1/img/{i}.jpg"
    llava = [{"id": f"{uid}-{t}", "type": t,
              "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i} ({t})?"},
                                {"from": "gpt", "value": f"A red square number {i}."},
                                {"from": "human", "value": "Is there a cup?"}, {"from": "gpt", "value": "No."}],
              "provenance": {"prompt_version": "p3", "teacher_model": "SmolLM2-135M-Instruct", "uid": uid,
                             "source_url": url}} for t in types]
    return {"uid": uid, "url": url, "caption": f"a red square {i}", "key": str(i), "sha256": "0" * 64,
            "width": 40 + i, "height": 30 + i, "status": "kept", "reason": None, "stage": None,
            "image": encoded((40 + i, 30 + i), (200, 10 * i, 10), "PNG" if i == 3 else "JPEG"),
            "clip_score": 0.2 + 0.01 * i, "embedding": [0.1, 0.2],
            "objects": json.dumps([{"category": "cup", "box": [0.1, 0.1, 0.5, 0.5], "score": 1.0, "source": "annotation"}]),
            "instructions": json.dumps(llava),
            "rejected_turns": json.dumps([{"type": "detail", "reason": "absent:dog", "question": "q", "answer": "a"}])}


def records() -> list[dict]:
    rows = [record(i, TYPES[: 1 + i % 4]) for i in range(12)]
    rows.append(record(12, types=()))  # every turn rejected: no record, not exported
    return rows


def write_run(run_dir: Path, rows: list[dict], shards: int = 2) -> Path:
    for sub in ("records", "dropped"):
        (run_dir / sub).mkdir(parents=True)
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[k::shards], schema=SCHEMA), run_dir / "records" / f"part-{k}.parquet")
    dropped = [{**record(100 + j, ()), "status": "dropped", "stage": "validate", "reason": "too_small"} for j in range(2)]
    pq.write_table(pa.Table.from_pylist(dropped, schema=SCHEMA), run_dir / "dropped" / "part-0.parquet")
    return run_dir


MANIFEST = {
    "name": "sample", "version": "v-0123456789ab",
    "config": {"teacher": {"model": "SmolLM2-135M-Instruct", "api_key_env": "OPENAI_API_KEY", "api_key": FAKE_KEY,
                           "max_tokens": 256},
               "publish": {"token_env": "HF_TOKEN", "hub_token": FAKE_HF},
               "crawl": {"url_list": "https://user:hunter2pass@example.com/urls.parquet"}},
    "counts": {"input_urls": 20, "kept": 13, "dropped": 7, "stages": {
        "crawl": {"in": 20, "kept": 17, "dropped": 3, "reasons": {"download_error:http_404": 3}},
        "validate": {"in": 17, "kept": 13, "dropped": 4, "reasons": {"too_small": 3, "decode_error": 1}}},
        "grounding_eval": {"pope": {"accuracy": 0.8125, "f1": 0.79}}},  # under counts, as pipelines/run.py writes it
    "teacher": {"model": "SmolLM2-135M-Instruct", "prompt_version": "p3",
                "usage": {"requests": 40, "cache_hits": 5, "prompt_tokens": 12345, "completion_tokens": 6789, "retries": 2}},
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    run_dir = write_run(tmp_path_factory.mktemp("run"), records())
    return run_dir, publish_dataset(run_dir, validation_fraction=0.3, seed=0)


def test_hf_dataset_loads_with_splits_features_and_images(published):
    import datasets

    run_dir, counts = published
    ds = datasets.load_from_disk(str(run_dir / "hf"))
    assert set(ds) == {"train", "validation"} and len(ds["train"]) and len(ds["validation"])
    assert ds["train"].features["image"] == datasets.Image()
    assert ds["train"].features["clip_score"].dtype == "float32"
    assert set(ds["train"].column_names) == {"id", "image", "conversations", "type", "uid", "caption",
                                             "clip_score", "objects", "provenance"}
    assert counts["by_type"] == {"conversation": 12, "detail": 9, "reasoning": 6, "negatives": 3}
    assert sum(counts[s]["records"] for s in ("train", "validation")) == 30
    assert sum(counts[s]["images"] for s in ("train", "validation")) == 12
    originals = {r["uid"]: r for r in records()}
    row = ds["train"][0]
    assert row["image"].size == (originals[row["uid"]]["width"], originals[row["uid"]]["height"])
    assert row["conversations"][0]["from"] == "human" and row["conversations"][0]["value"].startswith("<image>")
    assert json.loads(row["provenance"])["uid"] == row["uid"] and json.loads(row["objects"])[0]["category"] == "cup"
    raw = ds["validation"].cast_column("image", datasets.Image(decode=False))[0]
    assert raw["image"]["bytes"] == originals[raw["uid"]]["image"]  # stored as crawled, not re-encoded
    assert originals[f"{12:016x}"]["uid"] not in set(ds["train"]["uid"]) | set(ds["validation"]["uid"])


def test_split_keeps_each_image_in_one_split(published):
    import datasets

    ds = datasets.load_from_disk(str(published[0] / "hf"))
    for split in ("train", "validation"):
        assert ds[split]["id"] == sorted(ds[split]["id"])
        assert {split_of(uid, 0, 0.3) for uid in ds[split]["uid"]} == {split}


def test_llava_export(published):
    run_dir, counts = published
    exported = set()
    for split in ("train", "validation"):
        entries = json.loads((run_dir / "llava" / f"{split}.json").read_text())
        assert len(entries) == counts[split]["records"]
        for e in entries:
            assert set(e) == {"id", "image", "conversations", "provenance"}
            assert json.loads(e["provenance"])["uid"] == Path(e["image"]).stem  # JSON text, as in hf/
            assert e["conversations"][0]["from"] == "human" and e["conversations"][0]["value"].startswith("<image>\n")
            assert "<image>" not in "".join(t["value"] for t in e["conversations"][1:])
            assert (run_dir / "llava" / e["image"]).is_file()
            exported.add(e["image"])
    images = sorted(p.name for p in (run_dir / "llava" / "images").iterdir())
    assert images == sorted(Path(p).name for p in exported) and len(images) == 12  # once each, no empty image
    assert f"{3:016x}.png" in images and f"{4:016x}.jpg" in images


def test_republish_is_byte_identical(tmp_path, published):
    other = write_run(tmp_path / "again", list(reversed(records())), shards=3)  # other shard cut and order
    publish_dataset(other, validation_fraction=0.3, seed=0)
    first = published[0]
    files = sorted(p.relative_to(first) for p in [*(first / "hf").rglob("*"), *(first / "llava").rglob("*")] if p.is_file())
    assert any(f.suffix == ".arrow" for f in files)
    for f in files:  # state.json too: datasets fingerprints in-memory data by content, not at random
        assert (first / f).read_bytes() == (other / f).read_bytes(), f


def test_empty_validation_split_still_loads(tmp_path):
    import datasets

    run_dir = write_run(tmp_path / "run", records()[:3])
    counts = publish_dataset(run_dir, validation_fraction=0.0)
    assert counts["validation"] == {"records": 0, "images": 0}
    assert len(datasets.load_from_disk(str(run_dir / "hf"))["validation"]) == 0


def test_records_without_instructions_are_a_user_error(tmp_path):
    (tmp_path / "records").mkdir()
    pq.write_table(pa.Table.from_pylist([record(0)], schema=CRAWL_SCHEMA), tmp_path / "records" / "p.parquet")
    with pytest.raises(UserError, match="run the generate stage"):
        publish_dataset(tmp_path)


def test_dataset_card(tmp_path, published):
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    card = write_dataset_card(run_dir, MANIFEST, published[1]).read_text()
    assert card.startswith("---\npretty_name: sample v-0123456789ab\n")
    assert "- visual-question-answering" in card and "- n<1K" in card
    assert "| validate | 17 | 13 | 4 | too_small: 3, decode_error: 1 |" in card
    assert "| conversation | 12 |" in card and f"| train | {published[1]['train']['records']} |" in card
    assert card.count("█") > 0 and card.count(" | ") > 10
    bars = [line for line in card.splitlines() if " – " in line and line.rstrip()[-1].isdigit()]
    assert len(bars) == 10 and sum(int(b.split()[-1]) for b in bars) == 13  # every kept image's score
    assert "SmolLM2-135M-Instruct" in card and "| prompt version | p3 |" in card and "| usage.prompt_tokens | 12345 |" in card
    assert "| pope.accuracy | 0.8125 |" in card
    assert "| detail | absent | 13 |" in card and "1 of 13 kept images have no record" in card
    assert "![examples](examples.png)" in card and card.count("```text\nhuman: <image>") == 3
    png = (run_dir / "examples.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(run_dir / "examples.png") as grid:
        assert grid.size == (600, 3 * 296)


def test_card_holds_no_secret(tmp_path, published, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", FAKE_HF + "env")
    run_dir = tmp_path / "run"
    shutil.copytree(published[0], run_dir)
    manifest = {**MANIFEST, "note": f"leaked {FAKE_HF}env and {FAKE_KEY}"}  # values outside config are scrubbed too
    card = write_dataset_card(run_dir, manifest, published[1]).read_text()
    for secret in (FAKE_KEY, FAKE_HF, "hunter2pass", "sk-test"):
        assert secret not in card
    assert "api_key_env: OPENAI_API_KEY" in card and "max_tokens: 256" in card  # names of variables are fine


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
