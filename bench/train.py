"""Training throughput of our loop vs a bare forward + backward + optimizer step, in one run.

    python -m bench.train                 # embedded defaults: sample CLIP + SmolLM2-135M (GGUF), align, batch 8
    python -m bench.train --stage finetune --steps 2 --reps 4

"Ours" is `Trainer.run` for `--steps` optimizer steps: DataLoader (image decode, preprocess, conversation
encoding, collation), bf16 autocast on CUDA, supervised-token check, grad clipping, LR schedule, tqdm
(off), metrics.jsonl. "Bare" is `vlm(**batch).loss.backward(); AdamW.step()` on the very batches that
step position yields, already collated. Reps alternate ours/bare one step at a time by default, so both
sides see the same background load; tokens are non-pad positions (image patches included). The ratio
is the median of per-rep ratios; `best_ratio` compares the fastest rep of each side (the least
disturbed on a shared machine), and `median_cpu_time_ratio` the process CPU seconds of each side, which
other processes' load disturbs far less than wall time. Saves bench/results/train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench import medians, save_results
from infra.sample_world import captions_for, plan_scene, render_scene
from trainer.config import TrainConfig
from trainer.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train.json"


def write_llava_json(folder: Path, n: int) -> Path:
    """n rendered sample-world scenes with their first caption, as a LLaVA JSON + image folder."""
    rows = []
    for i in range(n):
        layout = plan_scene(i + 1, seed=3)
        render_scene(layout).save(folder / f"{i}.jpg", quality=90)
        rows.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": captions_for(layout, i)[0]}]})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


def measure(trainer: Trainer, steps: int, reps: int) -> list[dict]:
    accum = trainer.config.grad_accum
    bare_optimizer = torch.optim.AdamW([p for p in trainer.vlm.parameters() if p.requires_grad], lr=trainer.lr)

    def bare(batches: list[dict]) -> None:
        trainer.vlm.train()
        for i, batch in enumerate(batches):
            batch = {k: v.to(trainer.device) for k, v in batch.items()}
            with trainer.autocast():
                loss = trainer.vlm(**batch).loss
            (loss / accum).backward()
            if (i + 1) % accum == 0:
                bare_optimizer.step()
                bare_optimizer.zero_grad(set_to_none=True)
        if trainer.device.startswith("cuda"):
            torch.cuda.synchronize()

    per_rep = []
    for rep in range(reps + 1):  # rep 0 warms both up and is not counted
        source = trainer.batches()  # the data order from where the trainer stands
        batches = [next(source) for _ in range(steps * accum)]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.run(until_step=trainer.step + steps)
        if trainer.device.startswith("cuda"):
            torch.cuda.synchronize()
        t1, c1 = time.perf_counter(), time.process_time()
        bare(batches)
        t2, c2 = time.perf_counter(), time.process_time()
        if rep:
            per_rep.append({"ours_tokens_per_s": tokens / (t1 - t0), "bare_tokens_per_s": tokens / (t2 - t1),
                            "ours_s_per_step": (t1 - t0) / steps, "bare_s_per_step": (t2 - t1) / steps,
                            "ratio": (t2 - t1) / (t1 - t0), "cpu_ratio": (c2 - c1) / (c1 - c0), "tokens": tokens})
        print(f"rep {rep}{' (warm-up)' if not rep else ''}: ours {(t1 - t0) / steps:.2f} s/step, "
              f"bare {(t2 - t1) / steps:.2f} s/step", flush=True)
    return per_rep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", default="align", choices=["align", "finetune"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="optimizer steps per rep and side")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="model.FIELD=V")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_llava_json(Path(tmp), args.batch_size * args.steps * (args.reps + 1) * 2)
        tree = {"stage": args.stage, "data": str(data), "out": str(Path(tmp) / "run"), "batch_size": args.batch_size,
                "max_steps": 10_000, "save_every": 10_000, "resume": False}  # no checkpoint inside the timed steps
        from schemas.flags import apply_override

        for assignment in args.model_overrides:
            apply_override(tree, assignment)
        started = time.perf_counter()
        trainer = Trainer(TrainConfig.model_validate(tree), progress=False)
        load_s = time.perf_counter() - started
        loadavg_before = os.getloadavg()
        per_rep = measure(trainer, args.steps, args.reps)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stage": args.stage,
               "vision": trainer.config.model.vision.model, "lm": trainer.config.model.lm,
               "device": trainer.device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "batch_size": args.batch_size, "steps_per_rep": args.steps, "model_load_s": load_s,
               "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(), "target_ratio": 0.9,
               "per_rep": per_rep,
               **medians(per_rep, "ours_tokens_per_s", "bare_tokens_per_s", "ours_s_per_step", "ratio"),
               "median_cpu_time_ratio": statistics.median(r["cpu_ratio"] for r in per_rep),
               "best_ratio": min(r["bare_s_per_step"] for r in per_rep) / min(r["ours_s_per_step"] for r in per_rep)}
    results["target_met"] = results["median_ratio"] >= 0.9
    print(f"{args.stage} {results['device']}: ours {results['median_ours_tokens_per_s']:.1f} tok/s, "
          f"bare {results['median_bare_tokens_per_s']:.1f} tok/s, ratio {results['median_ratio']:.3f} "
          f"(best-rep ratio {results['best_ratio']:.3f}, CPU-time ratio {results['median_cpu_time_ratio']:.3f}) "
          f"(model load {load_s:.1f} s)")
    save_results(RESULTS, results)


if __name__ == "__main__":
    main()
