"""The proof (infra/proof.py): the two arms' data, made from what the real stages and the publisher write,
and the whole loop (Stage 1 -> both Stage-2 arms -> evals -> report) on tiny in-process models
(tests/test_trainer.py's 1-block Llama and 32 px CLIP). No downloads, CPU only."""
from __future__ import annotations

import io
import json
import random

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from evals.pope import STRATEGIES
from filters.grounding import GroundingVerifier
from generators.absent_objects import AbsentObjectSampler, fit_object_statistics
from generators.instructions import InstructionGenerator
from infra.proof import ARMS, run_proof, write_arms
from pipelines.publish import publish_dataset
from pipelines.batches import records_to_table
from schemas.config import GenerateConfig, ObjectsConfig, PipelineConfig, ProofConfig, TeacherConfig
from schemas.errors import UserError
from schemas.records import ImageRecord, ObjectAnnotation
from tests.tiny_vlm import tiny  # noqa: F401 - tiny: the tiny model parts fixture
from tests.test_vlm_eval import write_coco

NAMES = ["person", "dog", "cat", "cup", "car", "chair", "bus", "bowl"]


def jpeg(i: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (48, 40), (30 * i % 256, 90, 200 - 10 * i % 200)).save(out, format="JPEG")
    return out.getvalue()


def published_version(run_dir, images: int = 24):
    """Records through the real probes, generate (no teacher: nothing selected) and verify stages, written as
    the Ray job writes records/, then published by pipelines.publish."""
    rng = random.Random(0)
    records = []
    for i in range(images):
        objects = [ObjectAnnotation(category=name, box=(0.1 + 0.1 * k, 0.2, 0.15 + 0.1 * k, 0.5))
                   for k, name in enumerate(rng.sample(NAMES, rng.randint(1, 4)))]
        records.append(ImageRecord(uid=f"{i:016x}", url=f"http://127.0.0.1/{i}.jpg", caption=f"picture {i}",
                                   image=jpeg(i), width=48, height=40,
                                   objects=objects))
    fitted = {"statistics": fit_object_statistics([[o.category for o in r.objects] for r in records]),
              "selected": []}
    probed = AbsentObjectSampler(fitted, GenerateConfig(probes_per_image=8), ObjectsConfig())(records).kept
    generated = InstructionGenerator(TeacherConfig(), GenerateConfig(), "http://127.0.0.1:9/v1", None)(probed).kept
    verified = GroundingVerifier()(generated).kept
    (run_dir / "records").mkdir(parents=True)
    (run_dir / "dropped").mkdir()
    pq.write_table(records_to_table(verified), run_dir / "records" / "part-0.parquet")
    publish_dataset(run_dir, validation_fraction=0.2, seed=0)
    return run_dir


def labels_of(record: dict) -> list[str]:
    return json.loads(record["provenance"])["probe_labels"]


def test_without_arm_is_the_same_records_less_every_turn_labelled_no(tmp_path):
    version = published_version(tmp_path / "v")
    counts = write_arms(version, tmp_path / "arms")
    with_ = json.loads((tmp_path / "arms" / "with_negatives" / "train.json").read_text())
    without = json.loads((tmp_path / "arms" / "without_negatives" / "train.json").read_text())
    assert with_ == json.loads((version / "llava" / "train.json").read_text())  # the version as published
    assert counts["with_negatives"]["no_turns"] > 0 and counts["without_negatives"]["no_turns"] == 0
    by_id = {r["id"]: r for r in with_}
    for record in without:
        assert set(labels_of(record)) == {"yes"} and all(not t["value"].startswith("No") for t in record["conversations"][1::2])
        source = by_id[record["id"]]
        kept = [(q["value"].replace("<image>\n", ""), a["value"])
                for q, a, label in zip(source["conversations"][::2], source["conversations"][1::2], labels_of(source))
                if label == "yes"]
        assert [(q["value"].replace("<image>\n", ""), a["value"])
                for q, a in zip(record["conversations"][::2], record["conversations"][1::2])] == kept
        assert record["conversations"][0]["value"].startswith("<image>\n") and record["image"] == source["image"]
    # A record loses nothing but its "no" turns; one with only "no" turns is gone.
    assert {r["id"] for r in without} == {r["id"] for r in with_ if "yes" in labels_of(r)}


def test_a_missing_version_is_one_sentence(tmp_path):
    with pytest.raises(UserError, match="is not a published dataset version"):
        run_proof(PipelineConfig(), tmp_path / "nope", tmp_path)


@pytest.fixture(scope="module")
def proved(tiny, tmp_path_factory):  # noqa: F811 - the fixture by name
    base = tmp_path_factory.mktemp("proof")
    version = published_version(base / "outputs" / "sample" / "v-1")
    write_coco(base / "world", [1, 2], "train")
    write_coco(base / "world", [1, 2, 3], "val")
    proof = ProofConfig(align_steps=2, align_batch_size=2, finetune_steps=3, finetune_batch_size=2, precision="fp32",
                        device="cpu", max_new_tokens=2)
    config = PipelineConfig(proof=proof)
    return {"version": version, "world": base / "world", "config": config, "model": tiny["model"],
            "report": run_proof(config, version, base / "world", model=tiny["model"])}


def test_both_arms_train_from_one_stage1_checkpoint_at_equal_compute(proved):
    version, report = proved["version"], proved["report"]
    saved = {arm: yaml.safe_load((version / "train" / arm / "config.yaml").read_text()) for arm in ARMS}
    same = ("init", "max_steps", "batch_size", "lr", "seed", "grad_accum", "lm_layers", "freeze", "lora", "precision")
    assert {k: saved["with_negatives"][k] for k in same} == {k: saved["without_negatives"][k] for k in same}
    assert saved["with_negatives"]["init"] == str(version / "train" / "align")
    assert [report["training"][arm]["steps"] for arm in ARMS] == [3, 3]
    assert [saved[arm]["data"] for arm in ARMS] == [report["arms"][arm]["file"] for arm in ARMS]


def test_each_arm_leaves_official_pope_files_answers_and_results(proved):
    version = proved["version"]
    for arm in ARMS:
        folder = version / "eval" / arm
        results = json.loads((folder / "results.json").read_text())
        for split in STRATEGIES:
            questions = [json.loads(line) for line in (folder / f"coco_pope_{split}.json").read_text().splitlines()]
            answers = [json.loads(line) for line in (folder / f"answers_{split}.jsonl").read_text().splitlines()]
            assert set(questions[0]) == {"question_id", "image", "text", "label"}
            assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
            assert results["pope"][split]["n"] == len(questions)
            assert results["image_dependence"][split]["pairs"] > 0
    report = (version / "report.md").read_text()
    assert "with minus without" in report.lower() and str(version / "train" / "without_negatives") in report
    for plot in ("report.png", "loss.png"):
        assert Image.open(version / plot).size[0] > 300


def test_a_rerun_reuses_every_finished_phase_and_says_so(proved, capsys):
    again = run_proof(proved["config"], proved["version"], proved["world"], model=proved["model"])
    said = capsys.readouterr().out
    assert set(again["phase_seconds"].values()) == {0.0}
    assert said.count("reusing") == len(again["phase_seconds"])
    assert again["results"] == proved["report"]["results"]
