"""CLIP stage throughput through the pipeline vs the bare model forward, in one run.

    python -m bench.clip            # sample CLIP and ViT-B-32 @224 (random weights), CPU here, GPU if visible
    python -m bench.clip --quick

The CLIP stage runs in two halves (pipelines/stages.py): `clip_preprocess` (CPU tasks: decode, crop,
resize, tokenize) and `clip_score` (the model actors: normalize, both towers, annotate), as Ray
Data's batch-inference guide lays out, so the model is fed by as many CPU workers as the cluster has.
"Pipeline" is what a `clip_score` actor runs per batch in Ray Data's `map_batches`: an Arrow batch of
`clip_preprocess`'s rows in, `StageBatches(ClipScorer)` on its Arrow path, an Arrow batch out (records to and from
Arrow included). "Bare" is the same model forwards on the same batches already decoded, preprocessed
and tokenized: `encode_image` once per image view the stage embeds (the full image, plus one
centre crop per extra `dedup.crop_scales` entry when dedup has an embedding of its own) and
`encode_text`, with its inputs already on the model's device and the stage's autocast. Reps
alternate pipeline/bare; the ratio is the median of per-rep ratios. On a GPU also "bare + copy":
the same forwards copying their float inputs from host memory each batch, as a plain loop does.
Also printed, same run: the CPU half's images/s per worker (up to 1,024 images a rep), and both
halves in one process (`end_to_end_ratio`: what a machine whose cores do both gets, against the
bare forward).
Saves bench/results/clip.json (clip_gpu.json when a GPU is visible: batches of 256, more images).
"""
from __future__ import annotations

import argparse
import io
import os
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import torch
from PIL import Image

from bench import medians, save_results
from filters.clip_loader import load_clip
from filters.clip_preprocess import ClipPreprocessor, centre_crop, image_views
from filters.clip_scorer import ClipScorer
from infra.sample_world import captions_for, plan_scene, render_scene
from pipelines.batches import RECORD_SCHEMA, StageBatches, score_columns
from schemas.config import ClipConfig, DedupConfig, load_config
from schemas.records import ImageRecord

RESULTS = Path(__file__).resolve().parent / "results" / "clip.json"


def sample_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        layout = plan_scene(i + 1, seed=3)
        buffer = io.BytesIO()
        render_scene(layout).save(buffer, format="JPEG", quality=90)
        rows.append(ImageRecord(uid=f"u{i}", url=f"http://x/{i}", caption=captions_for(layout, i)[0],
                                image=buffer.getvalue()).model_dump())
    return rows


def measure(config: ClipConfig, dedup: DedupConfig, rows: list[dict], reps: int) -> dict:
    clip = load_clip(config)
    stage = StageBatches("clip_score", partial(ClipScorer, config, clip, dedup=dedup), arrow=score_columns)
    cpu_half = StageBatches("clip_preprocess", partial(ClipPreprocessor, config, clip, dedup=dedup),
                            columns=ClipPreprocessor.columns)  # as the plan runs it (pipelines/stages.py)
    bs = config.batch_size
    raw = [pa.Table.from_pylist(rows[i:i + bs], schema=RECORD_SCHEMA) for i in range(0, len(rows) - bs + 1, bs)]
    tables = [cpu_half(b) for b in raw]  # what Ray hands a clip_score actor
    batches = [t.to_pylist() for t in tables]
    views = image_views(dedup)
    decoded = [[Image.open(io.BytesIO(r["image"])).convert("RGB") for r in b] for b in batches]
    pixels = [[torch.stack([clip.preprocess(centre_crop(im, s)) for im in b]) for s in views] for b in decoded]
    tokens = [clip.tokenizer([r["caption"] for r in b]) for b in batches]
    # Bare gets its inputs already on the model's device and the stage's precision (autocast on a GPU).
    # On a GPU, "bare + copy" also copies its float inputs from host memory, as a plain loop over CPU
    # tensors does: the bar the stage's own copies (uint8, overlapped with the text tower) are held to.
    host_pixels, host_tokens = pixels, tokens
    pixels = [[p.to(clip.device) for p in b] for b in pixels]
    tokens = [t.to(clip.device) for t in tokens]
    autocast = ClipScorer(config, clip, dedup=dedup)._autocast

    def bare(copy: bool = False) -> None:
        with torch.inference_mode(), autocast():
            for views_of_batch, t in zip(host_pixels if copy else pixels, host_tokens if copy else tokens):
                for p in views_of_batch:
                    clip.model.encode_image(p.to(clip.device))
                clip.model.encode_text(t.to(clip.device))
        if clip.device.startswith("cuda"):
            torch.cuda.synchronize()

    def pipeline() -> None:
        for table in tables:
            stage(table)

    some = raw[:max(1, 1024 // bs)]  # the CPU half's rate, from up to 1,024 images a rep

    def preprocess() -> None:
        for b in some:
            cpu_half(b)

    bare(), pipeline(), preprocess()  # warm-up
    images = len(batches) * bs
    gpu = clip.device.startswith("cuda")
    per_rep = []
    for _ in range(reps):
        t0 = time.perf_counter(); pipeline(); t1 = time.perf_counter(); bare(); t2 = time.perf_counter()
        preprocess(); t3 = time.perf_counter()
        pipe_s, bare_s, pre_s = (t1 - t0) / images, (t2 - t1) / images, (t3 - t2) / (len(some) * bs)  # per image
        per_rep.append({"pipeline_images_per_s": 1 / pipe_s, "bare_images_per_s": 1 / bare_s,
                        "ratio": bare_s / pipe_s, "preprocess_images_per_s": 1 / pre_s,
                        "end_to_end_ratio": bare_s / (pipe_s + pre_s)})
        if gpu:
            t4 = time.perf_counter(); bare(copy=True); copy_s = (time.perf_counter() - t4) / images
            per_rep[-1].update({"bare_with_copy_images_per_s": 1 / copy_s, "ratio_to_bare_with_copy": copy_s / pipe_s})
    return {"model": clip.name, "device": clip.device, "batch_size": bs, "images_per_rep": images,
            "image_size": int(pixels[0][0].shape[-1]), "image_views": views,
            "dedup_embedding": dedup.embedding if dedup.separate_embedding else "the CLIP embedding",
            "per_rep": per_rep,
            **medians(per_rep, "pipeline_images_per_s", "bare_images_per_s", "ratio", "preprocess_images_per_s",
                      "end_to_end_ratio", *(("bare_with_copy_images_per_s", "ratio_to_bare_with_copy") if gpu else ()))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--reps", type=int, default=11, help="timed reps per model; the ratio is their median")
    p.add_argument("--out", help="where to save the JSON (default: bench/results/clip.json, clip_gpu.json on a GPU)")
    args = p.parse_args()
    gpu = torch.cuda.is_available()
    # Batch sizes and image counts for the device: a GPU needs big batches and more images per rep.
    small_bs, vit_bs, small_n, vit_n = (256, 256, 8192, 4096) if gpu else (64, 32, 512, 128)
    if args.quick:
        small_n, vit_n = small_bs * 2, vit_bs
    sample = load_config("configs/sample.yaml")
    sample_clip = sample.clip.model_copy(update={"batch_size": small_bs})
    models = {  # label: (clip, dedup, images)
        "sample_clip": (sample_clip, DedupConfig(), small_n),
        "sample_clip + sample.yaml dedup embedding": (sample_clip, sample.dedup, small_n),
        "ViT-B-32@224 (random weights)": (ClipConfig(model="ViT-B-32", pretrained=None, config_path=None,
                                                     batch_size=vit_bs), DedupConfig(), vit_n),
    }
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "loadavg_before": os.getloadavg(), "target_ratio": 0.9,
               "gpu": torch.cuda.get_device_name() if gpu else None, "models": {}}
    for label, (config, dedup, n) in models.items():
        figures = measure(config, dedup, sample_rows(n), reps=args.reps if not args.quick else 1)
        figures["target_met"] = figures["median_ratio"] >= 0.9
        results["models"][label] = figures
        print(f"{label:42s} {figures['device']}: pipeline {figures['median_pipeline_images_per_s']:8.1f} img/s  "
              f"bare {figures['median_bare_images_per_s']:8.1f} img/s  ratio {figures['median_ratio']:.3f}  "
              f"| CPU half {figures['median_preprocess_images_per_s']:7.1f} img/s, both halves in one process: "
              f"ratio {figures['median_end_to_end_ratio']:.3f}"
              + (f" | bare + copy {figures['median_bare_with_copy_images_per_s']:8.1f} img/s, ratio to it "
                 f"{figures['median_ratio_to_bare_with_copy']:.3f}" if "median_ratio_to_bare_with_copy" in figures else ""))
    results["loadavg_after"] = os.getloadavg()
    out = Path(args.out) if args.out else RESULTS.with_name("clip_gpu.json" if gpu else "clip.json")
    save_results(out, results)


if __name__ == "__main__":
    main()
