"""Eval-leak guard threshold: how close the copies of a held-out image and the other training images come to it.

    python -m bench.eval_guard            # seed-2 world: 1,000 training + 100 held-out images, ~1 minute

On a sample world neither the CLIP nor the demo uses (seed 2), every held-out image is copied three ways as
the demo world plants them (`infra.world_noise.eval_copy`: exact, re-encoded, cropped by 5% of each side),
and every record goes through the pipeline's own stages (validate, both CLIP halves with configs/sample.yaml's
dedup embedding) and the guard's fit. For each eps it reports the share of copies caught, per kind, and the
training images wrongly caught; and the highest cosine any training image reaches to any held-out image.
Writes bench/results/eval_guard.json.
"""
from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import save_results
from infra.sample_world import render_world
from infra.world_noise import EVAL_COPY_KINDS, eval_copy
from pipelines.batches import records_to_table
from pipelines.stage_fits import dedup_column, embedding_matrix, guard_embeddings, reference_index
from schemas.config import load_config
from schemas.records import ImageRecord

CONFIG = "configs/sample.yaml"
RESULTS = Path("bench/results/eval_guard.json")
EPS = (0.01, 0.02, 0.035, 0.05, 0.06, 0.08, 0.1)
SEED = 2


def embedded_records(config, paths_and_bytes: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray]:
    """(uids, [N, D] guard embeddings) of images sent through validate and both CLIP halves."""
    records = [ImageRecord(uid=uid, url=uid, caption="a photo", image=data, sha256=hashlib.sha256(data).hexdigest())
               for uid, data in paths_and_bytes]
    table = records_to_table(guard_embeddings(config, records).kept)
    return table.column("uid").to_pylist(), embedding_matrix(table, dedup_column(config))


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-eval-guard-") as tmp:
        world = Path(tmp)
        render_world(world, 1000, 100, seed=SEED)
        val = sorted((world / "images" / "val").glob("*.jpg"))
        config = load_config(CONFIG, [f"eval_guard.folders=[{world / 'images' / 'val'}]"])
        index = reference_index(config)
        rng = np.random.default_rng(SEED)
        copies = [(f"{how}|{p.name}", eval_copy(p.read_bytes(), how, rng)) for p in val for how in EVAL_COPY_KINDS]
        train = [(f"train|{p.name}", p.read_bytes()) for p in sorted((world / "images" / "train").glob("*.jpg"))]
        uids, embeddings = embedded_records(config, copies + train)
    similarity = embeddings @ index.embeddings.T  # [N, R]
    nearest, best = similarity.argmax(1), similarity.max(1)
    is_train = np.array([u.startswith("train|") for u in uids])
    rows = []
    for eps in EPS:
        hit = best >= 1.0 - eps
        caught = {how: int(sum(h and u.split("|")[0] == how and index.ids[n] == u.split("|")[1]
                               for u, h, n in zip(uids, hit, nearest))) for how in EVAL_COPY_KINDS}
        rows.append({"eps": eps, "caught": caught, "copies_per_kind": len(val),
                     "recall": round(sum(caught.values()) / (len(val) * len(EVAL_COPY_KINDS)), 4),
                     "training_images_caught": int(hit[is_train].sum())})
        print(f"eps {eps:<5}: recall {rows[-1]['recall']:.3f} {caught}, training images caught "
              f"{rows[-1]['training_images_caught']} of {int(is_train.sum())}")
    copy_cosine = {how: float(np.min([b for u, b in zip(uids, best) if u.startswith(how + "|")])) for how in EVAL_COPY_KINDS}
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": "python -m bench.eval_guard",
               "world": {"seed": SEED, "train": int(is_train.sum()), "held_out": len(val)},
               "embedding": {"dedup.embedding": config.dedup.embedding, "dedup.crop_scales": config.dedup.crop_scales},
               "max_training_to_held_out_cosine": float(best[is_train].max()),
               "min_copy_to_its_image_cosine": copy_cosine, "by_eps": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    print(f"highest training-to-held-out cosine {results['max_training_to_held_out_cosine']:.4f}; lowest copy "
          f"cosine {', '.join(f'{k} {v:.4f}' for k, v in copy_cosine.items())}")
    save_results(RESULTS, results)


if __name__ == "__main__":
    main()
