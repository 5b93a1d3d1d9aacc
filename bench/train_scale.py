r"""Trainer batches and workers on the demo world's data (issue 16), in one run:

    python -m bench.train_scale --version outputs/sample/<version> [--steps 12] [--batch-size 8]
    python -m bench.train_scale --version outputs/sample/<version> --steps 100 --arms one,ddp \
        --out bench/results/train_scale_stage2.json   # the demo's whole Stage 2 (100 steps of 8), ~45 min here

1. Length grouping: the padding share of one epoch of the with-negatives arm (the proof's Stage-2 data) with
   and without `group_by_length`, and the tokens/s (real, non-pad tokens) of Stage-2 steps of each, run
   alternately one step at a time so both see the same background load.
2. Workers: `--steps` Stage-2 steps from the proof's Stage-1 checkpoint as one process with batch 2b, as
   2 Ray Train workers (DDP, gloo) with batch b each, and as 2 workers fully sharded (FSDP, `shard: full`),
   on a local Ray head: wall time, tokens/s, the scaling ratio (2 workers' tokens/s over 1 process's) and
   the loss curves (the same global batches, so the curves should agree within bf16 noise).

Saves bench/results/train_scale.json (or --out); `--arms` picks among grouping, one, ddp, fsdp (default: all).
On 2 cores, 2 workers (1 CPU each) compete with each other for the same cores that one process uses with
2 threads; the ratio says what DDP costs, not what more machines give.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os

from bench import save_results
from infra.local_cluster import LOOPBACK_ONLY_ENV

os.environ.update(LOOPBACK_ONLY_ENV)  # the driver attaches to the 127.0.0.1-only head (infra/local_cluster.py)
import statistics
import tempfile
import time
from pathlib import Path

import torch

from trainer.config import TrainConfig
from trainer.sampling import EpochOrder, LengthGroupedOrder, padding_share
from trainer.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train_scale.json"
ARMS = ("grouping", "one", "ddp", "fsdp")


def finetune_config(version: Path, out: Path, **fields) -> TrainConfig:
    arm = version / "arms" / "with_negatives" / "train.json"
    align = version / "train" / "align"
    for needed in (arm, align):
        if not needed.exists():
            raise SystemExit(f"{needed} does not exist; run `make demo` (the proof writes it) and pass its version.")
    from trainer.checkpoint import find_checkpoint, saved_config

    model = saved_config(find_checkpoint(align)).model
    return TrainConfig(stage="finetune", init=str(align), data=str(arm), image_folder=str(version / "llava"), out=str(out),
                       model=model, lr=1e-4, projector_lr=1e-3, precision="bf16", device="cpu", resume=False,
                       save_every=10**6, seed=0, **fields)


def grouping(version: Path, tmp: Path, batch_size: int, steps: int) -> dict:
    trainers = {grouped: Trainer(finetune_config(version, tmp / f"group{grouped}", batch_size=batch_size,
                                                 max_steps=10**4, group_by_length=grouped), progress=False)
                for grouped in (False, True)}
    lengths = trainers[True].budget.lengths
    epoch = {"plain": padding_share(lengths, EpochOrder(len(lengths), 0).epoch(0), batch_size),
             "grouped": padding_share(lengths, LengthGroupedOrder(lengths, batch_size, 0).epoch(0), batch_size)}
    per_step = {False: [], True: []}
    for _ in range(steps):
        for grouped, trainer in trainers.items():
            record = trainer.run(until_step=trainer.step + 1)[0]  # its own seconds: the step, not the checkpoint after it
            per_step[grouped].append((record["tokens"], record["seconds"], record["padding_share"]))
    rate = {g: sum(t for t, _, _ in rows) / sum(s for _, s, _ in rows) for g, rows in per_step.items()}
    return {"samples": len(lengths), "mean_tokens": statistics.mean(lengths), "batch_size": batch_size,
            "epoch_padding_share": epoch, "steps_each": steps,
            "measured_padding_share": {"plain": statistics.mean(p for *_, p in per_step[False]),
                                       "grouped": statistics.mean(p for *_, p in per_step[True])},
            "tokens_per_s": {"plain": rate[False], "grouped": rate[True]}, "speedup": rate[True] / rate[False]}


def train_one(config_json: str) -> None:
    Trainer(TrainConfig.model_validate_json(config_json), progress=False).run()


def workers(version: Path, tmp: Path, batch_size: int, steps: int, arms: set[str]) -> dict:
    import ray

    from infra.local_cluster import start_head, stop_head
    from trainer.distributed import train_on_ray

    def curve(out: Path) -> list[dict]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]

    started = time.perf_counter()
    # In a process of its own, as each Ray Train worker is: a finished trainer's memory (~8 GB at 100 steps)
    # stays with the process that ran it, and beside two workers it had Ray's memory monitor kill one.
    one = multiprocessing.get_context("spawn").Process(
        target=train_one, args=(finetune_config(version, tmp / "one", batch_size=2 * batch_size,
                                                max_steps=steps).model_dump_json(),))
    one.start()
    one.join()
    if one.exitcode:
        raise SystemExit(f"the one-process arm failed (exit {one.exitcode})")
    one_seconds = time.perf_counter() - started
    owned = start_head()
    try:
        ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
        seconds = {}
        for name, folder, shard in (("ddp", "two", "none"), ("fsdp", "fsdp", "full")):
            if name in arms:
                started = time.perf_counter()
                train_on_ray(finetune_config(version, tmp / folder, batch_size=batch_size, max_steps=steps, workers=2,
                                             shard=shard))
                seconds[name] = time.perf_counter() - started
        ray.shutdown()
    finally:
        if owned:
            stop_head()
    one = curve(tmp / "one")
    rate = sum(r["tokens"] for r in one) / sum(r["seconds"] for r in one)
    results = {"steps": steps, "global_batch": 2 * batch_size,
               "one_process": {"wall_s": one_seconds, "tokens_per_s": rate, "loss": [r["loss"] for r in one]}}
    for name, folder, arm in (("two_workers", "two", "ddp"), ("two_workers_fsdp", "fsdp", "fsdp")):
        if arm not in seconds:
            continue
        run = curve(tmp / folder)
        tokens_per_s = sum(r["tokens"] for r in run) / sum(r["seconds"] for r in run)
        results[name] = {"wall_s": seconds[arm], "tokens_per_s": tokens_per_s, "loss": [r["loss"] for r in run],
                         "scaling_ratio": tokens_per_s / rate,
                         "final_loss_relative_difference": abs(run[-1]["loss"] - one[-1]["loss"]) / one[-1]["loss"],
                         "max_loss_relative_difference": max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(run, one))}
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", required=True, help="a published version the proof ran on: outputs/sample/<version>")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, of %(default)s")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    arms = set(args.arms.split(","))
    if not arms <= set(ARMS):
        p.error(f"--arms takes a comma-separated subset of {','.join(ARMS)}")
    if arms & {"ddp", "fsdp"} and "one" not in arms:
        p.error("--arms: ddp and fsdp are compared with the one-process arm; add 'one'")
    version = Path(args.version).resolve()
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": str(version),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        if "grouping" in arms:
            results["grouping"] = grouping(version, Path(tmp), args.batch_size, args.steps)
            print(json.dumps(results["grouping"], indent=1), flush=True)
        if "one" in arms:
            results["workers"] = workers(version, Path(tmp), args.batch_size // 2, args.steps, arms)
            print(json.dumps(results["workers"], indent=1), flush=True)
    results["loadavg_after"] = os.getloadavg()
    save_results(args.out, results)


if __name__ == "__main__":
    main()
