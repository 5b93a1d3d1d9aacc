"""Publishing: the HF dataset and LLaVA export from hand-written record shards, and the dataset card with no
secret in it (the Hub push: tests/test_hub_push.py)."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dataset_card import write_dataset_card
from pipelines.publish import publish_dataset, split_of
from pipelines.batches import RECORD_SCHEMA
from schemas.errors import UserError

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
            "objects": [{"category": "cup", "box": [0.1, 0.1, 0.5, 0.5], "score": 1.0, "source": "annotation"}],
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
    """Other shard cut and row order, and the scratch folders a killed publish leaves behind: the same bytes,
    and no scratch folder left in the version."""
    other = write_run(tmp_path / "again", list(reversed(records())), shards=3)
    for scratch in (".publish-killed", ".hf-build-killed", ".trl_dpo-build-killed"):
        (other / scratch).mkdir()
        (other / scratch / "rows.arrow").write_bytes(b"half written")
    publish_dataset(other, validation_fraction=0.3, seed=0)
    assert sorted(p.name for p in other.iterdir() if p.name.startswith(".")) == []
    first = published[0]
    files = sorted(p.relative_to(first) for p in [*(first / "hf").rglob("*"), *(first / "llava").rglob("*"),
                                                  *(first / "trl_sft").rglob("*"), *(first / "trl_dpo").rglob("*"),
                                                  *(first / "llamafactory").rglob("*")] if p.is_file())
    assert any(f.suffix == ".arrow" for f in files)
    for f in files:  # state.json too: datasets fingerprints in-memory data by content, not at random
        assert (first / f).read_bytes() == (other / f).read_bytes(), f


def test_a_split_larger_than_a_shard_is_written_in_shards_with_each_rows_own_image(tmp_path, monkeypatch):
    """Publishing writes datasets in bounded shards (bench/publish.py measures the memory that saves): with the
    shard size made smaller than one split, the split spans several files and still loads in id order, every
    row with its own record's image bytes, and the same files come out however the records were cut."""
    import datasets

    from pipelines import exports

    monkeypatch.setattr(exports, "SHARD_BYTES", 4_000)
    run_dir = write_run(tmp_path / "run", records())
    publish_dataset(run_dir, validation_fraction=0.0)
    assert len(list((run_dir / "hf" / "train").glob("*.arrow"))) > 2
    assert len(list((run_dir / "trl_sft" / "train").glob("*.arrow"))) > 2
    train = datasets.load_from_disk(str(run_dir / "hf"))["train"].cast_column("image", datasets.Image(decode=False))
    originals = {r["uid"]: r["image"] for r in records()}
    assert train["id"] == sorted(train["id"]) and len(train) == 30
    assert all(row["image"]["bytes"] == originals[row["uid"]] for row in train)
    sft = datasets.load_from_disk(str(run_dir / "trl_sft"))["train"].cast_column(
        "images", datasets.Sequence(datasets.Image(decode=False)))
    assert [row["images"][0]["bytes"] for row in sft] == [row["image"]["bytes"] for row in train]
    other = write_run(tmp_path / "again", list(reversed(records())), shards=3)
    publish_dataset(other, validation_fraction=0.0)
    for f in sorted(p.relative_to(run_dir) for p in (run_dir / "hf").rglob("*") if p.is_file()):
        assert (run_dir / f).read_bytes() == (other / f).read_bytes(), f


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


def test_the_card_reads_a_llava_json_list_an_item_at_a_time_whatever_the_window(tmp_path):
    """The card reads llava/*.json through `iter_json_list` (never the whole list at once): the items of what
    publishing writes (`write_json_list`), whatever the window cuts, including strings that hold the list's own
    punctuation; an empty list; and a list cut short is an error, not a shorter list."""
    from pipelines.dataset_card import iter_json_list
    from pipelines.exports import write_json_list

    entries = [{"id": f"{i:04d}-negatives", "conversations": [{"from": "gpt", "value": 'No, ], [ { "' + str(i) + '" é'}],
                "n": i * 1.5} for i in range(40)]
    path = tmp_path / "train.json"
    write_json_list(path, iter(entries))
    assert path.read_text() == json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
    for window in (1, 7, 64, 1 << 20):
        assert list(iter_json_list(path, chunk=window)) == entries, window
    write_json_list(tmp_path / "empty.json", iter([]))
    assert (tmp_path / "empty.json").read_text() == "[]\n" and list(iter_json_list(tmp_path / "empty.json", 1)) == []
    (tmp_path / "cut.json").write_text(path.read_text()[:-200])
    with pytest.raises(ValueError):
        list(iter_json_list(tmp_path / "cut.json", chunk=64))
