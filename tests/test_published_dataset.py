"""What the README's main command ends with: a versioned HF dataset, a LLaVA export and a card,
built by the embedded teacher from the sample world, with grounding figures in the manifest."""
from __future__ import annotations

import json

import datasets


def test_the_demo_publishes_a_loadable_dataset_with_llava_records(demo_run):
    final = demo_run["final"]
    dd = datasets.load_from_disk(str(final / "hf"))
    assert set(dd) == {"train", "validation"}
    rows = [r for split in dd.values() for r in split]
    published = demo_run["manifest"]["counts"]["published"]
    assert len(rows) == published["train"]["records"] + published["validation"]["records"] > 0
    for row in rows:
        assert row["image"].size[0] >= 32  # decodes to PIL
        turns = row["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        provenance = json.loads(row["provenance"])
        assert provenance["prompt_version"] and provenance["teacher_model"] == "SmolLM2-135M-Instruct"
    llava = json.loads((final / "llava" / "train.json").read_text())
    assert len(llava) == published["train"]["records"]
    assert all((final / "llava" / r["image"]).is_file() for r in llava)
    card = (final / "README.md").read_text()
    assert "clip_score_below" in card and (final / "examples.png").read_bytes()[:4] == b"\x89PNG"


def test_the_manifest_reports_grounding_yield_and_teacher_usage(demo_run):
    manifest = demo_run["manifest"]
    grounding = manifest["counts"]["grounding_eval"]
    assert grounding["answers"] > 0 and grounding["probe_turns"] > 0
    assert grounding["absent_object_rate"] <= 0.005
    assert grounding["negative_label_error_rate"] == 0.0
    assert 0 < grounding["yield"]["records_per_input_url"] < 1
    usage = manifest["teacher"]["usage"]
    assert usage["requests"] > 0 and usage["completion_tokens"] > 0
    assert manifest["teacher"]["prompt_version"] and "api_key" not in json.dumps(manifest["config"]["teacher"]).replace("api_key_env", "")


def test_what_the_demo_wrote_follows_the_record_models(demo_run):
    """records/ and hf/ are written in the shapes declared once, by `ImageRecord` and `PublishedRow`: every
    parquet file of the run has the schema derived from ImageRecord, every record reads back as one, and
    every published row (its image as the stored bytes) validates as a PublishedRow."""
    import pyarrow.parquet as pq

    from pipelines.batches import RECORD_SCHEMA, records_to_table
    from schemas.records import ImageRecord, PublishedRow

    final = demo_run["final"]
    files = sorted((final / "records").glob("*.parquet"))
    assert files and all(pq.read_schema(f).remove_metadata().equals(RECORD_SCHEMA) for f in files)
    rows = pq.read_table(files[0]).to_pylist()
    assert any(row["objects"] and row["probes"] for row in rows)  # the typed columns hold structs, not text
    for row in rows:  # a row reads back as an ImageRecord and writes back as the same row
        assert records_to_table([ImageRecord.model_validate(row)]).to_pylist() == [row]
    dd = datasets.load_from_disk(str(final / "hf")).cast_column("image", datasets.Image(decode=False))
    rows = [r for split in dd.values() for r in split]
    assert rows and set(rows[0]) == {f.alias or n for n, f in PublishedRow.model_fields.items()}
    for row in rows:
        PublishedRow.model_validate({**row, "image": row["image"]["bytes"]})
