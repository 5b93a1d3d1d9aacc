"""Publishing's peak memory against the size of what it publishes (issue 14): does it hold the images?

    python -m bench.publish                       # 500 and 4,000 images; saves bench/results/publish.json
    python -m bench.publish --sizes 100,400       # a quicker pair (smallest first)

For each size N: N kept records in the record schema the pipeline writes (two parquet shards, row groups of
100 rows, as Ray's write_parquet cuts them per block), each with a ~150 kB incompressible PNG (noise,
224 x 224) and four LLaVA records, published by `publish_dataset` in a process of its own (llava/, hf/ and
the TRL / LLaMA-Factory exports) while its memory is sampled every 50 ms.

Reported per size: the peak anonymous RSS (the process's own heap; the datasets' memory-mapped Arrow files
count in plain RSS, also reported, but are the page cache's to drop), the image bytes and seconds. Target:
the anonymous peak at the largest size <= 1.2x the smallest's (8x the images by default), i.e. publishing
holds a bounded window of images, not all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench import save_results

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "publish.json"
ROW_GROUP = 100
TYPES = ("conversation", "detail", "reasoning", "negatives")


def noise_png(seed: int) -> bytes:
    import io

    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def write_records(run_dir: Path, n: int) -> int:
    """Record shards as the pipeline's records/ holds them (its Arrow schema); returns the image bytes."""
    from pipelines.batches import RECORD_SCHEMA

    rows, total = [], 0
    for i in range(n):
        uid, image = f"{i:016x}", noise_png(i)
        total += len(image)
        llava = [{"id": f"{uid}-{t}", "type": t, "provenance": {"uid": uid},
                  "conversations": [{"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
                                    {"from": "gpt", "value": f"Noise number {i}, seen as a {t}."}]} for t in TYPES]
        rows.append({"uid": uid, "url": f"http://127.0.0.1/{i}.png", "caption": f"noise {i}", "key": str(i),
                     "status": "kept", "image": image, "clip_score": 0.3, "objects": None,
                     "instructions": json.dumps(llava), "probes": None, "rejected_turns": "[]"})
    (run_dir / "records").mkdir(parents=True)
    for k in range(2):
        table = pa.Table.from_pylist(rows[k::2])
        columns = {f.name: table.column(f.name).cast(f.type) if f.name in table.column_names
                   else pa.nulls(table.num_rows, f.type) for f in RECORD_SCHEMA}
        # Row groups of 100 rows, as Ray's write_parquet cuts them per block: a parquet reader decodes a whole
        # row group at a time, so that is the least a streamed reader holds.
        pq.write_table(pa.table(columns), run_dir / "records" / f"part-{k}.parquet", row_group_size=ROW_GROUP)
    return total


def anonymous_rss(pid: int) -> int:
    """RssAnon of /proc/<pid>/status: the process's own heap pages, without the file pages it has mapped (the
    datasets' Arrow files are memory-mapped: their pages count in RSS but are the page cache's to drop)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_memory_of_publish(run_dir: Path) -> tuple[int, int, float]:
    """Peak RSS and peak anonymous RSS of publish_dataset in a process of its own, and its seconds."""
    code = ("import sys; from pipelines.publish import publish_dataset; "
            "publish_dataset(sys.argv[1], validation_fraction=0.05, seed=0)")
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    process, peak, peak_anon = psutil.Process(job.pid), 0, 0
    while job.poll() is None:
        try:
            peak, peak_anon = max(peak, process.memory_info().rss), max(peak_anon, anonymous_rss(job.pid))
        except (psutil.Error, OSError):
            break
        time.sleep(0.05)
    if job.wait():
        raise SystemExit(f"publishing {run_dir} failed:\n{job.stderr.read()[-2000:]}")
    return peak, peak_anon, time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="500,4000", help="comma-separated image counts, smallest first")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-publish-") as scratch:
        for n in map(int, args.sizes.split(",")):
            run_dir = Path(scratch) / str(n)
            image_bytes = write_records(run_dir, n)
            peak, peak_anon, seconds = peak_memory_of_publish(run_dir)
            rows.append({"images": n, "image_mib": round(image_bytes / 2**20, 1), "peak_rss_mib": round(peak / 2**20, 1),
                         "peak_anonymous_rss_mib": round(peak_anon / 2**20, 1), "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    small, large = rows[0], rows[-1]
    images = large["image_mib"] - small["image_mib"]
    ratio = large["peak_anonymous_rss_mib"] / small["peak_anonymous_rss_mib"]
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
               "code_revision": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                               text=True).stdout.strip(),
               "sizes": rows, "peak_anonymous_rss_ratio": round(ratio, 3),
               "anonymous_rss_growth_per_image_byte": round(
                   (large["peak_anonymous_rss_mib"] - small["peak_anonymous_rss_mib"]) / images, 3),
               "target_ratio": 1.2, "met": ratio <= 1.2}
    print(f"{small['images']} -> {large['images']} images ({small['image_mib']} -> {large['image_mib']} MiB): peak "
          f"anonymous RSS {small['peak_anonymous_rss_mib']} -> {large['peak_anonymous_rss_mib']} MiB, x{ratio:.2f} "
          f"(target <= 1.2); peak RSS with mapped files {small['peak_rss_mib']} -> {large['peak_rss_mib']} MiB")
    save_results(args.out, results)


if __name__ == "__main__":
    main()
