"""lmms-eval runs our checkpoints: the real `lmms-eval` CLI, our model registered by the package's entry point,
our POPE task folder (evals/lmms_task.py) on a COCO-format held-out world, offline. The checkpoint is
test_vlm_eval's tiny model, which answers "Yes" on one image and "No" on another."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from evals.lmms_task import GROUP, build_task_folder
from evals.pope import STRATEGIES
from evals.vlm_eval import run_eval
from schemas.errors import UserError
from tests.tiny_vlm import tiny  # noqa: F401 - the tiny model parts, used by `world`
from tests.test_vlm_eval import eval_config, world  # noqa: F401 - the tiny checkpoint and its 3-image world

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "NO_ALBUMENTATIONS_UPDATE": "1"}


def lmms_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("lmms-eval")), *args]
    return subprocess.run(command, cwd=cwd, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=900)


def test_task_folder_holds_our_questions_in_pope_layout(world, tmp_path):
    folder = build_task_folder(world["world"] / "annotations" / "instances_val.json", world["world"] / "images" / "val",
                               tmp_path)
    data = datasets.load_from_disk(str(folder / "data"))
    assert set(data) == set(STRATEGIES)
    row = data["random"][0]
    assert set(row) == {"question_id", "question", "answer", "image", "image_source", "category"}
    assert row["answer"] in ("yes", "no") and row["question"].startswith("Is there a") and row["image"].size == (40, 36)
    assert sorted(p.name for p in folder.glob("*.yaml")) == sorted([f"{GROUP}.yaml"] + [f"{GROUP}_{s}.yaml" for s in STRATEGIES])
    with pytest.raises(UserError, match="is not in"):
        build_task_folder(world["world"] / "annotations" / "instances_val.json", tmp_path, tmp_path / "other")


def test_lmms_eval_scores_our_checkpoint_as_our_lmms_eval_rule_does(world, tmp_path):
    build_task_folder(world["world"] / "annotations" / "instances_val.json", world["world"] / "images" / "val",
                      tmp_path / "tasks")
    proc = lmms_eval("--model", "visinstruct", "--model_args", f"checkpoint={world['run']},max_new_tokens=1",
                     "--batch_size", "5", "--device", "cpu", "--tasks", GROUP, "--include_path", str(tmp_path / "tasks"), "--output_path", str(tmp_path / "out"),
                     "--log_samples", cwd=tmp_path)
    # lmms-eval exits 0 after an error too: the results file is the proof it ran
    results_files = list((tmp_path / "out").rglob("*results*.json"))
    assert proc.returncode == 0 and len(results_files) == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    [results_file] = results_files
    figures = json.loads(results_file.read_text())["results"]

    # Our own eval of the same checkpoint, with LLaVA-1.5's post-prompt as lmms-eval's POPE asks it, scored
    # under our copy of lmms-eval's rule: the same answers must give the same figures.
    ours = run_eval(eval_config(world, tmp_path / "ours", post_prompt="llava", max_new_tokens=1), progress=False)
    for split in STRATEGIES:
        theirs, mine = figures[f"{GROUP}_{split}"], ours["pope_rules"][split]["lmms_eval"]
        assert theirs["pope_accuracy,none"] == pytest.approx(mine["accuracy"]), (split, theirs, mine)
        assert theirs["pope_precision,none"] == pytest.approx(mine["precision"] or 0.0), (split, theirs, mine)
        assert theirs["pope_recall,none"] == pytest.approx(mine["recall"] or 0.0), (split, theirs, mine)
    samples = [json.loads(line) for p in (tmp_path / "out").rglob(f"*{GROUP}_random*.jsonl") for line in p.open()]
    theirs = {s["pope_accuracy"]["question_id"]: s["filtered_resps"] for s in samples}
    mine = {str(a["question_id"]): a["text"] for a in map(json.loads, (tmp_path / "ours" / "answers_random.jsonl").open())}
    assert theirs == mine  # question by question, the same answers
    assert {a.lower() for a in mine.values()} == {"yes", "no"}  # the tiny model tells the two images apart
