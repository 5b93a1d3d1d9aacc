r"""Quick recipe probes for the with-negatives arm alone (what bench/recipe.py runs whole, in a third of the
time): Stage 2 variants from one Stage-1 checkpoint, on yes/no probe records made straight from the
sample world's training annotations by the pipeline's own AbsentObjectSampler (8 probes per image, as
configs/sample.yaml), then POPE (+ image dependence) on 50 of the held-out images. Saves each run's
figures to bench/results/recipe_quick.json under its name.

    python -m bench.recipe_quick probes                       # writes outputs/recipe_quick/probes8.json
    python -m bench.recipe_quick align NAME max_steps=200 batch_size=8
    python -m bench.recipe_quick finetune NAME init=outputs/recipe_quick/align200 max_steps=100 lr=1e-4 \
        projector_lr=1e-3 [lm_layers=8 freeze=projector]
    python -m bench.recipe_quick eval NAME [num_images=50]

Every run is bf16 autocast on the CPU, seed 0, batch 8 unless given (TrainConfig fields as key=value).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from generators.absent_objects import AbsentObjectSampler, fit_object_statistics
from schemas.coco import load_coco_instances
from schemas.config import GenerateConfig, ObjectsConfig
from schemas.records import llava_conversation

WORLD = Path("data/world")
OUT = Path("outputs/recipe_quick")
RESULTS = Path(__file__).parent / "results" / "recipe_quick.json"


def probe_records(instances_path: Path, per_image: int) -> list[dict]:
    """One `negatives` record per training image, the program's answers, as the pipeline writes them."""
    data = json.loads(instances_path.read_text())
    objects = load_coco_instances([str(instances_path)])  # file name -> objects, as the pipeline's objects stage reads them
    stats = fit_object_statistics([[o.category for o in objects[img["file_name"]]] for img in data["images"]])
    sampler = AbsentObjectSampler({"statistics": stats, "selected": None}, GenerateConfig(probes_per_image=per_image),
                                  ObjectsConfig())
    rows = []
    for img in sorted(data["images"], key=lambda i: i["id"]):
        probes = sampler.probes_for(str(img["id"]), objects[img["file_name"]])
        if probes:
            rows.append({"id": str(img["id"]), "image": img["file_name"], "type": "negatives",
                         "conversations": llava_conversation([(p.question, p.answer) for p in probes])})
    return rows


def value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text, text)


def train(stage: str, name: str, fields: dict) -> dict:
    from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME
    from infra.proof import train as run_stage
    from infra.proof import write_plain_captions
    from schemas.config import ClipConfig
    from trainer.config import ModelConfig, TrainConfig

    model = ModelConfig(vision=ClipConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH), config_path=str(CONFIG_PATH)))
    if "freeze" in fields:
        fields["freeze"] = [fields["freeze"]]
    if stage == "align":
        data = OUT / "align_captions.json"
        write_plain_captions(WORLD / "annotations" / "captions_train.json", data)
    else:
        data = OUT / "probes8.json"
    config = TrainConfig(stage=stage, data=str(data), image_folder=str(WORLD / "images" / "train"), out=str(OUT / name),
                         model=model, device="cpu", resume=False, seed=0, keep_checkpoints=1, precision="bf16",
                         save_every=10**6, **{"batch_size": 8, **fields})
    started = time.perf_counter()
    summary = run_stage(config, name)
    return {**summary, "seconds": time.perf_counter() - started}


def evaluate(name: str, fields: dict) -> dict:
    from evals.ab_report import overall_image_dependence
    from evals.vlm_eval import EvalConfig, run_eval

    started = time.perf_counter()
    r = run_eval(EvalConfig(checkpoint=str(OUT / name), images=str(WORLD / "images" / "val"),
                            instances=str(WORLD / "annotations" / "instances_val.json"), out=str(OUT / name / "eval"),
                            device="cpu", descriptions=0, precision="bf16", max_new_tokens=8,
                            **{"num_images": 50, **fields}), progress=False)
    figures = {split: {k: round(v, 3) for k, v in m.items() if isinstance(v, float)} for split, m in r["pope"].items()}
    return {"pope": figures, "image_dependence": overall_image_dependence(r), "seconds": time.perf_counter() - started}


def main(argv: list[str]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if argv[0] == "probes":
        rows = probe_records(WORLD / "annotations" / "instances_train.json", 8)
        (OUT / "probes8.json").write_text(json.dumps(rows))
        print(f"{len(rows)} records -> {OUT / 'probes8.json'}")
        return
    what, name = argv[0], argv[1]
    fields = {k: value(v) for k, v in (a.split("=", 1) for a in argv[2:])}
    result = evaluate(name, fields) if what == "eval" else train(what, name, fields)
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved.setdefault(name, {})[what] = {"command": "python -m bench.recipe_quick " + " ".join(argv), **result}
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
