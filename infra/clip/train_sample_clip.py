"""Train the sample-world CLIP with open_clip's own trainer (open_clip_train) on the CPU.

    python -m infra.clip.train_sample_clip

1. renders the training world (seed 1, not the demo's seed 0) into data/clip_world if absent,
2. writes open_clip CSVs (tab-separated filepath/title, since captions hold commas; one row per
   training caption, the first caption of each image for open_clip's own validation),
3. registers infra/clip/sample_clip.json and runs `open_clip_train.main.main([...])` twice:
   phase 1 from scratch (3 epochs, crops down to 80% of the area, lr 1e-3), then phase 2, a
   fine-tune from phase 1's exported weights (`--pretrained`; 4 epochs, crops down to 60%,
   lr 5e-4), which made near-duplicate embeddings zoom-tolerant (near-duplicate F1 0.87 -> 0.91),
4. exports phase 2's last epoch (state_dict only, fp16) to infra/clip/sample_clip.pt.

A finished phase in data/clip_runs/ is reused unless --retrain is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import time
from pathlib import Path

from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME, register_config

WORLD_SEED = 1  # the demo world is seed 0: never train on the images the filter will judge
NUM_TRAIN, NUM_VAL = 10_000, 1_000
# (run name, epochs, crop scale, lr); phase 2 starts from phase 1's fp16 export.
PHASES = (("sample_clip_seed1", 3, "scale=(0.8,1.0)", "1e-3"),
          ("sample_clip_seed1_ft", 4, "scale=(0.6,1.0)", "5e-4"))


def render_world_if_absent(world: Path) -> None:
    if (world / "annotations" / "captions_val.json").is_file():
        return
    from infra.sample_world import render_world
    print(json.dumps(render_world(world, NUM_TRAIN, NUM_VAL, seed=WORLD_SEED)))


def write_csv(world: Path, split: str, all_captions: bool) -> Path:
    """open_clip's CsvDataset reads `filepath<TAB>title` rows (pandas, sep='\\t')."""
    data = json.loads((world / "annotations" / f"captions_{split}.json").read_text())
    files = {im["id"]: (world / "images" / split / im["file_name"]).resolve() for im in data["images"]}
    rows, seen = [], set()
    for ann in data["annotations"]:
        if all_captions or ann["image_id"] not in seen:
            seen.add(ann["image_id"])
            rows.append((str(files[ann["image_id"]]), ann["caption"]))
    path = world / f"{split}.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return path


def trainer_args(train_csv: Path, val_csv: Path, logs: Path, name: str, epochs: int, aug: str, lr: str,
                 pretrained: Path | None = None) -> list[str]:
    return (["--pretrained", str(pretrained)] if pretrained else []) + [
        "--model", MODEL_NAME,
        "--train-data", str(train_csv), "--val-data", str(val_csv), "--dataset-type", "csv",
        "--device", "cpu", "--precision", "fp32",  # bf16 autocast measured no faster on this CPU
        "--workers", "1",  # JPEG decode is ~1 ms an image; the model needs the other core
        "--batch-size", "128",  # small batches: more steps in the CPU budget; 10k images make few in-batch twins
        "--epochs", str(epochs),
        # Crops below open_clip's default 90% of the area: the sample world's near-duplicates lose up
        # to 11 px a side of 256 (~84% of the area), and dedup needs their embeddings to stay put.
        "--aug-cfg", aug,
        "--lr", lr, "--wd", "0.1", "--warmup", "100", "--grad-clip-norm", "1.0",
        "--save-frequency", "1", "--val-frequency", "1", "--zeroshot-frequency", "0",
        "--log-every-n-steps", "50", "--report-to", "",
        "--logs", str(logs), "--name", name, "--seed", "0",
    ]


def export_checkpoint(trainer_checkpoint: Path, out: Path = CHECKPOINT_PATH) -> Path:
    """Keep only the weights, in fp16 (11 MiB): the trainer's file adds AdamW's two moments to 24 MB of fp32."""
    import torch
    state = torch.load(trainer_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    state = {k.removeprefix("module."): v.half() if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=Path, default=Path("data/clip_world"))
    parser.add_argument("--logs", type=Path, default=Path("data/clip_runs"))
    # One thread: on 2 shared cores, 2 OpenMP threads spin-wait on each other (measured 3x slower
    # under load); the data-loading worker takes the other core.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--retrain", action="store_true", help="discard a finished run and train again")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    render_world_if_absent(args.world)
    train_csv = write_csv(args.world, "train", all_captions=True)
    val_csv = write_csv(args.world, "val", all_captions=False)
    register_config()
    start_from = None
    for name, epochs, aug, lr in PHASES:
        run_dir = args.logs / name
        final = run_dir / "checkpoints" / f"epoch_{epochs}.pt"
        if args.retrain or not final.is_file():
            shutil.rmtree(run_dir, ignore_errors=True)  # the trainer refuses to reuse a run name
            from open_clip_train.main import main as open_clip_train_main
            start = time.perf_counter()
            open_clip_train_main(trainer_args(train_csv, val_csv, args.logs, name, epochs, aug, lr, start_from))
            print(f"{name}: training took {time.perf_counter() - start:.0f} s")
            if not final.is_file():
                raise SystemExit(f"open_clip_train finished without writing {final}; see {run_dir}/out.log.")
        start_from = export_checkpoint(final, run_dir / "weights_fp16.pt")
    out = shutil.copy(start_from, CHECKPOINT_PATH)
    print(f"wrote {out} ({Path(out).stat().st_size / 2**20:.1f} MiB) from {start_from}; config {CONFIG_PATH}")


if __name__ == "__main__":
    main()
