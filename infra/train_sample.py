r"""The small CPU profile of the VLM trainer on the sample world: both LLaVA stages and the evaluation,
end to end, in at most 20 minutes on 2 CPU cores.

    python -m infra.train_sample --dataset outputs/sample/<version> [--out outputs/train_sample] \
        [--align-steps 200] [--finetune-steps 50] [--eval-images 100] [--lora false]

1. Stage 1 `align`: writes a LLaVA `plain` caption file from data/world's captions_train.json (one
   caption per image) and trains the projector on it, with the shipped sample CLIP and the embedded
   SmolLM2-135M-Instruct;
2. Stage 2 `finetune`: from the align checkpoint, on the published dataset version's train split;
3. `evals.vlm_eval` on the held-out val images (never trained on): POPE, QA accuracy, descriptions.
Prints the Stage-1 loss at the start and end, the POPE table and the wall time; writes
`<out>/profile.json` (steps, losses, seconds per stage, results, load average). Each run starts afresh
(resume=false), so the seconds it reports are always a whole profile's.

Measured on 2 shared CPU cores with the 20-record dev version (v-36e9fcd9da80): align 333 s, finetune
263 s, eval 198 s (100 held-out images, 520 POPE questions per split), 794 s in all at load average ~2;
1192 s when other jobs held the load near 4 for the first ten minutes.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from evals.vlm_eval import EvalConfig, config_from_flags, run_eval
from schemas.errors import UserError

BUDGET_SECONDS = 20 * 60  # the target for this profile on 2 CPU cores
LOSS_WINDOW = 5  # steps averaged for the first and last loss: one step's loss is one batch's noise


class ProfileConfig(BaseModel):
    """Every field is a flag of the same name (`--align-steps 200`)."""

    model_config = ConfigDict(extra="forbid")

    dataset: str = Field(description="published dataset version for Stage 2 (outputs/<name>/<version>)")
    out: str = Field(default="outputs/train_sample", description="folder for data, both runs, eval, profile.json")
    world: str = Field(default="data/world", description="sample world: annotations/ and images/{train,val}")
    # ~1.5 s per step of 8 captions (25 patches + ~15 tokens each) on 2 cores: 200 steps, 1.6 epochs
    # of the 1000 training images, take ~5 minutes and bring the caption loss from ~5 to ~2.
    align_steps: int = Field(default=200, ge=1)
    align_batch_size: int = Field(default=8, ge=1)
    # ~5 s per step of 4 chat-rendered records on 2 cores, full or LoRA alike: 50 steps take ~4 minutes.
    finetune_steps: int = Field(default=50, ge=1)
    finetune_batch_size: int = Field(default=4, ge=1)
    # Full finetuning, as LLaVA-1.5's main recipe: on a 135M LM a LoRA step costs as much CPU time (the
    # backward pass through the frozen weights dominates: ~4.5 s per step either way), and on the same
    # batches the full run's loss fell faster (6 steps: 1.69 -> 1.38 vs LoRA 1.74 -> 1.55). The price is
    # disk (LM + AdamW state, ~1.6 GB per checkpoint), so one checkpoint is kept.
    lora: bool = Field(default=False, description="finetune the LM through LoRA adapters instead of fully")
    eval_images: int | None = Field(default=None, ge=1, description="POPE images of the 100 held-out ones "
                                                                    "(default: all; ~5 answers/s on 2 cores)")
    seed: int = 0


def write_plain_captions(captions: Path, out: Path) -> int:
    """LLaVA pretraining data (blip_laion_cc_sbu_558k style) from COCO captions: one caption per image, the
    first by annotation id; the human turn is only `<image>` (the `plain` rendering drops its text anyway)."""
    try:
        data = json.loads(captions.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) else f"not JSON: {err.msg}"
        raise UserError(f"Cannot read COCO captions {captions} ({why}); pass --world the sample world folder "
                        f"(python -m infra.sample_world --out data/world renders it).") from None
    first: dict[int, str] = {}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        first.setdefault(ann["image_id"], ann["caption"])
    rows = [{"id": str(img["id"]), "image": img["file_name"],
             "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": first[img["id"]]}]}
            for img in sorted(data["images"], key=lambda img: img["id"]) if img["id"] in first]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=0), encoding="utf-8")
    return len(rows)


def mean_loss(history: list[dict], which: slice) -> float:
    losses = [r["loss"] for r in history][which]
    return sum(losses) / len(losses)


def run_stage(config) -> dict:
    """Trains one stage from scratch in this process; returns its step count, losses and seconds."""
    from trainer.train import Trainer

    started = time.perf_counter()
    trainer = Trainer(config)
    loaded = time.perf_counter()
    history = trainer.run()
    window = max(1, min(LOSS_WINDOW, len(history) // 4))
    summary = {"steps": len(history), "batch_size": config.batch_size, "samples": len(trainer.samples),
               "lr": trainer.lr, "lora": config.lora, "loss_window": window,
               "loss_first": mean_loss(history, slice(None, window)), "loss_last": mean_loss(history, slice(-window, None)),
               "median_step_seconds": statistics.median(r["seconds"] for r in history),
               "load_seconds": loaded - started, "train_seconds": time.perf_counter() - loaded,
               "seconds": time.perf_counter() - started, "checkpoint": str(trainer.out)}
    del trainer
    gc.collect()  # the next stage loads its own VLM
    return summary


def run_profile(config: ProfileConfig, model=None) -> dict:
    """Align, finetune, evaluate; `model` (a trainer ModelConfig) replaces the sample CLIP + SmolLM2 in tests."""
    import torch

    from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME
    from schemas.config import ClipConfig
    from trainer.config import ModelConfig, TrainConfig
    from trainer.data import published_dataset

    started, load_before = time.perf_counter(), os.getloadavg()
    out, world, dataset = Path(config.out), Path(config.world), Path(config.dataset)
    published_dataset(dataset.parent, dataset.name)  # a wrong version fails now, not after Stage 1
    model = model or ModelConfig(vision=ClipConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH),
                                                   config_path=str(CONFIG_PATH)))
    captions = out / "data" / "align_captions.json"
    write_plain_captions(world / "annotations" / "captions_train.json", captions)
    common = {"model": model, "device": "cpu", "resume": False, "seed": config.seed, "keep_checkpoints": 1}
    align = run_stage(TrainConfig(stage="align", data=str(captions), image_folder=str(world / "images" / "train"),
                                  out=str(out / "align"), max_steps=config.align_steps,
                                  batch_size=config.align_batch_size, save_every=config.align_steps, **common))
    finetune = run_stage(TrainConfig(stage="finetune", init=str(out / "align"), dataset=str(dataset.parent),
                                     version=dataset.name, out=str(out / "finetune"), lora=config.lora,
                                     max_steps=config.finetune_steps, batch_size=config.finetune_batch_size,
                                     save_every=config.finetune_steps, **common))
    eval_started = time.perf_counter()
    results = run_eval(EvalConfig(checkpoint=str(out / "finetune"), images=str(world / "images" / "val"),
                                  instances=str(world / "annotations" / "instances_val.json"), dataset=str(dataset),
                                  out=str(out / "eval"), num_images=config.eval_images, seed=config.seed, device="cpu"))
    total = time.perf_counter() - started
    profile = {"config": config.model_dump(), "align": align, "finetune": finetune,
               "eval": {"seconds": time.perf_counter() - eval_started, "pope": results["pope"], "qa": results["qa"],
                        "files": str(out / "eval")},
               "total_seconds": total, "budget_seconds": BUDGET_SECONDS, "within_budget": total <= BUDGET_SECONDS,
               "align_loss_fell": align["loss_last"] < align["loss_first"],
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "loadavg_start": load_before, "loadavg_end": os.getloadavg()}
    (out / "profile.json").write_text(json.dumps(profile, indent=1))
    return profile


def format_profile(profile: dict, results_md: str) -> str:
    align, finetune = profile["align"], profile["finetune"]
    mode = "LoRA" if finetune["lora"] else "full"
    window = f"mean of the first / last {align['loss_window']} steps"
    return "\n".join([
        f"Stage 1 align: loss {align['loss_first']:.3f} -> {align['loss_last']:.3f} ({window}; {align['steps']} steps of "
        f"{align['batch_size']}) {'fell' if profile['align_loss_fell'] else 'DID NOT FALL'}, {align['seconds']:.0f} s "
        f"({align['median_step_seconds']:.2f} s/step)",
        f"Stage 2 finetune ({mode}): loss {finetune['loss_first']:.3f} -> {finetune['loss_last']:.3f} "
        f"({finetune['steps']} steps of {finetune['batch_size']}), {finetune['seconds']:.0f} s "
        f"({finetune['median_step_seconds']:.2f} s/step)",
        f"Eval: {profile['eval']['seconds']:.0f} s", "", results_md,
        f"Total wall time {profile['total_seconds']:.0f} s (budget {profile['budget_seconds']} s: "
        f"{'within' if profile['within_budget'] else 'OVER'}); load average "
        f"{' '.join(f'{x:.2f}' for x in profile['loadavg_start'])} at the start, "
        f"{' '.join(f'{x:.2f}' for x in profile['loadavg_end'])} at the end, on {profile['cpu_count']} CPUs",
    ])


def main(argv: list[str] | None = None) -> None:
    config = config_from_flags(ProfileConfig, argv, "The small CPU profile: align, finetune, evaluate.")
    profile = run_profile(config)
    print(format_profile(profile, (Path(config.out) / "eval" / "results.md").read_text()))
    print(f"profile: {Path(config.out) / 'profile.json'}")


if __name__ == "__main__":
    from pipelines.cli import exit_on_user_error

    exit_on_user_error(main)
