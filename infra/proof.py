r"""The proof that the data works: Stage 1, then Stage 2 with and without the negatives at equal compute,
then evals of both arms on held-out images, then a report. `make demo` runs it after the data pipeline.

    python -m infra.proof --config configs/sample.yaml --version outputs/sample/<version> [--set proof.finetune_steps=200]

Phases, each written under the version's folder and reused when a re-run finds it finished with the same
settings (a stopped training phase continues from its newest checkpoint):

  arms/{with_negatives,without_negatives}/train.json   LLaVA JSON of each arm (images: ../../llava/images).
        with: the version's train split as published; without: the same records with every turn whose
        program label is "no" removed (absent objects, wrong counts, wrong sides).
  train/align                 Stage 1: the projector on the sample world's captions (LLaVA `plain`).
  train/<arm>                 Stage 2 from train/align: same steps, batch size, learning rate and seed.
  eval/<arm>/                 POPE files + answers, image dependence, held-out QA, descriptions, results.json.
  report.md, report.png, loss.png, proof.json
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from evals.ab_report import ARMS
from schemas.config import PipelineConfig, ProofConfig
from schemas.errors import UserError
from schemas.records import IMAGE_TOKEN, neutralize_placeholders


def say(message: str) -> None:
    print(f"[proof] {message}", flush=True)


def write_plain_captions(captions: Path, out: Path) -> int:
    """LLaVA pretraining data (blip_laion_cc_sbu_558k style) from COCO captions: one caption per image, the
    first by annotation id (in the sample world, the one that names the scene and all its objects); the human
    turn is only `<image>` (the `plain` rendering drops its text anyway)."""
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"not JSON: {err.msg}"
        raise UserError(f"Cannot read COCO captions {captions} ({why}); pass the sample world folder "
                        f"(python -m infra.world_noise renders it).") from None
    first: dict[int, str] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(ann["image_id"], ann["caption"])
    rows = [{"id": str(img["id"]), "image": img["file_name"],
             "conversations": [{"from": "human", "value": IMAGE_TOKEN},
                               {"from": "gpt", "value": neutralize_placeholders(first[img["id"]])}]}
            for img in sorted(data["images"], key=lambda img: img["id"]) if img["id"] in first]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=0), encoding="utf-8")
    return len(rows)


def without_no_turns(record: dict) -> dict | None:
    """The record with every turn whose program label is "no" removed (None when no turn is left); records
    without program labels (the teacher's) are kept as they are."""
    provenance = json.loads(record.get("provenance") or "{}")
    labels = provenance.get("probe_labels")
    if not labels:
        return record
    turns = record["conversations"]
    if len(labels) * 2 != len(turns):
        raise UserError(f"record {record['id']} has {len(turns) // 2} turns but {len(labels)} probe labels; "
                        f"publish the version again with this code.")
    keep = [i for i, label in enumerate(labels) if label != "no"]
    if not keep:
        return None
    kept_turns = []
    for n, i in enumerate(keep):
        question = turns[2 * i]["value"].replace("<image>\n", "")
        kept_turns += [{"from": "human", "value": ("<image>\n" if n == 0 else "") + question}, turns[2 * i + 1]]
    kinds = provenance.get("probe_kinds") or [None] * len(labels)
    provenance.update(probe_labels=[labels[i] for i in keep], probe_kinds=[kinds[i] for i in keep])
    return {**record, "conversations": kept_turns, "provenance": json.dumps(provenance, sort_keys=True)}


def write_arms(version: Path, out: Path) -> dict:
    """The two arms' training files; returns records, turns and "no" turns per arm."""
    source = version / "llava" / "train.json"
    if not source.is_file():
        raise UserError(f"{source} does not exist; pass --version a published dataset version (outputs/<name>/<v>).")
    records = json.loads(source.read_text(encoding="utf-8"))
    arms = {"with_negatives": records,
            "without_negatives": [r for r in map(without_no_turns, records) if r is not None]}
    counts = {}
    for arm, rows in arms.items():
        folder = out / arm
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "train.json").write_text(json.dumps(rows, ensure_ascii=False) + "\n", encoding="utf-8")
        labels = [label for r in rows for label in json.loads(r.get("provenance") or "{}").get("probe_labels", [])]
        counts[arm] = {"records": len(rows), "turns": sum(len(r["conversations"]) // 2 for r in rows),
                       "no_turns": labels.count("no"), "yes_turns": labels.count("yes"),
                       "file": str(folder / "train.json")}
    return counts


class Phases:
    """Finished phases, each marked by `<folder>/done.json` with the hash of the settings it ran with."""

    def __init__(self):
        self.seconds = {}

    def run(self, name: str, folder: Path, settings: dict, work) -> dict:
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        done, started_with = folder / "done.json", folder / "settings.sha256"
        if done.is_file() and json.loads(done.read_text())["settings"] == key:
            finished = json.loads(done.read_text())
            say(f"{name}: reusing {folder} (finished earlier in {finished['seconds']:.0f} s)")
            self.seconds[name] = 0.0
            return finished["summary"]
        if started_with.is_file() and started_with.read_text() != key:
            say(f"{name}: settings changed since {folder} was made; starting it again")
            shutil.rmtree(folder)
        elif started_with.is_file():
            say(f"{name}: continuing the run stopped half-way in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        started_with.write_text(key)
        started = time.perf_counter()
        say(f"{name}: starting")
        summary = work()
        self.seconds[name] = time.perf_counter() - started
        done.write_text(json.dumps({"settings": key, "seconds": self.seconds[name], "summary": summary}, indent=1))
        say(f"{name}: done in {self.seconds[name]:.0f} s")
        return summary


def train(config, progress_name: str) -> dict:
    """One training stage (resuming its own --out when stopped half-way); returns steps, losses, seconds."""
    from trainer.train import Trainer

    trainer = Trainer(config)
    history = trainer.run()
    metrics = [json.loads(line) for line in (trainer.out / "metrics.jsonl").read_text().splitlines() if line]
    losses = [m["loss"] for m in metrics]
    window = max(1, min(10, len(losses) // 4))
    return {"stage": progress_name, "steps": len(metrics), "batch_size": config.batch_size, "lr": trainer.lr,
            "samples": len(trainer.samples), "loss_first": sum(losses[:window]) / window,
            "loss_last": sum(losses[-window:]) / window, "steps_this_run": len(history),
            "checkpoint": str(trainer.out)}


def run_proof(config: PipelineConfig, version: Path, world: Path, model=None, out: Path | None = None) -> dict:
    """Every phase of the module docstring, written under `out` (default: the version's folder); returns
    proof.json's content. `model` (a trainer ModelConfig) replaces the sample CLIP + SmolLM2 in tests."""
    from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME
    from schemas.config import ClipConfig
    from trainer.config import ModelConfig, TrainConfig

    proof: ProofConfig = config.proof
    version, world = version.resolve(), world.resolve()
    out = (out or version).resolve()
    if not (version / "hf").is_dir():
        raise UserError(f"{version} is not a published dataset version (it has no hf/); run the data pipeline first.")
    for needed in (world / "annotations" / "instances_val.json", world / "images" / "val"):
        if not needed.exists():
            raise UserError(f"{needed} does not exist; the proof evaluates on the sample world's held-out images "
                            f"(python -m infra.world_noise renders them).")
    phases, started = Phases(), time.perf_counter()
    model = model or ModelConfig(vision=ClipConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH),
                                                   config_path=str(CONFIG_PATH)))
    common = {"model": model, "device": proof.device, "seed": proof.seed, "precision": proof.precision,
              "keep_checkpoints": 1}
    arms = phases.run("arms", out / "arms", {"version": str(version)}, lambda: write_arms(version, out / "arms"))

    captions = out / "train" / "align_captions.json"
    align = TrainConfig(stage="align", data=str(captions), image_folder=str(world / "images" / "train"),
                        out=str(out / "train" / "align"), max_steps=proof.align_steps,
                        batch_size=proof.align_batch_size, save_every=max(1, proof.align_steps // 2), **common)

    def stage1() -> dict:
        write_plain_captions(world / "annotations" / "captions_train.json", captions)
        return train(align, "align")

    summaries = {"align": phases.run("Stage 1 align", Path(align.out), align.to_dict(), stage1)}
    for arm in ARMS:
        finetune = TrainConfig(stage="finetune", init=align.out, data=arms[arm]["file"],
                               image_folder=str(version / "llava"), out=str(out / "train" / arm),
                               max_steps=proof.finetune_steps, batch_size=proof.finetune_batch_size,
                               lr=proof.finetune_lr, projector_lr=proof.finetune_projector_lr,
                               lm_layers=proof.lm_layers, lora=proof.lora,
                               freeze=["projector"] if proof.freeze_projector else [],
                               save_every=max(1, proof.finetune_steps // 2), **common)
        # Keyed by what it starts from and reads, not only by paths: a new Stage 1 or new data retrains the arm.
        settings = {"config": finetune.to_dict(), "stage1": summaries["align"],
                    "data": hashlib.sha256(Path(arms[arm]["file"]).read_bytes()).hexdigest()}
        summaries[arm] = phases.run(f"Stage 2 {arm}", Path(finetune.out), settings,
                                    lambda finetune=finetune, arm=arm: train(finetune, arm))
    results = {}
    for arm in ARMS:
        results[arm] = phases.run(f"eval {arm}", out / "eval" / arm,
                                  {"checkpoint": summaries[arm], "proof": proof.model_dump(), "version": str(version),
                                   "world": str(world)},
                                  lambda arm=arm: evaluate(proof, version, world, out, arm))
    report = {"version": str(version), "out": str(out), "arms": arms, "training": summaries, "results": results,
              "phase_seconds": phases.seconds, "total_seconds": time.perf_counter() - started,
              "proof_config": proof.model_dump()}
    (out / "proof.json").write_text(json.dumps(report, indent=1))
    from evals.ab_report import write_report

    paths = write_report(report, out)
    say(f"report: {paths['report']}  (plots: {paths['plot']}, {paths['loss_plot']})")
    return report


def evaluate(proof: ProofConfig, version: Path, world: Path, out: Path, arm: str) -> dict:
    from evals.vlm_eval import EvalConfig, run_eval

    return run_eval(EvalConfig(checkpoint=str(out / "train" / arm), images=str(world / "images" / "val"),
                               instances=str(world / "annotations" / "instances_val.json"), dataset=str(version),
                               out=str(out / "eval" / arm), num_images=proof.eval_images, seed=proof.seed, device=proof.device,
                               precision=proof.precision, max_new_tokens=proof.max_new_tokens))


def main() -> None:
    from schemas.errors import exit_on_user_error
    from pipelines.cli import parse_config, parser

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--version", required=True, help="published dataset version: outputs/<name>/<version>")
    args = p.parse_args()

    def go() -> None:
        config = parse_config(args)
        report = run_proof(config, Path(args.version), Path(config.world.dir))
        from evals.ab_report import summary_lines

        print("\n".join(summary_lines(report)))

    exit_on_user_error(go)


if __name__ == "__main__":
    sys.exit(main())
