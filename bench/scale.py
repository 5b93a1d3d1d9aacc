"""How the Ray job's cost grows with its input (issue 14): seconds per step and peak memory at two sizes.

    python -m bench.scale                          # 10,000 and 100,000 images; saves bench/results/scale.json
    python -m bench.scale --sizes 1000,10000       # a quicker pair (any two or more sizes, smallest first)

For each size N: the first N images of a rendered sample world (`infra.sample_world`, rendered once for the
largest size into data/scale_world_<largest>), written as img2dataset's own output into the run's `shards/`
(webdataset tars, status parquet files and `_stats.json`, so the crawl finds every shard done and downloads
nothing), then `python pipelines/build_instruct.py` on a local Ray head: validate -> CLIP (the sample CLIP,
clip.mode=threshold) -> dedup -> objects (the world's annotations) -> probes -> generate against
`infra.fake_teacher` (50 ms per request; generate.max_images=16, so the teacher's share stays constant) ->
verify, then records/, dropped/, the manifest and publishing. The eval-leak guard is off (no held-out set).

Seconds per step are read from the job's progress lines as they arrive (the stages run in segments cut at the
global stages, each writing every shard's rows before the next fit reads them): `start + crawl` (the job's
imports, checks, Ray and img2dataset finding every shard done), `to dedup` (read shards, validate, both CLIP
halves, the threshold, rows written, dedup's fit from the written columns), `to probes` (dedup's apply, objects,
the probes fit), `stages after` (probes' apply, generate, verify, records/ and dropped/ written) and
`write + publish` (counts, publishing, the manifest).
RSS is sampled every 0.25 s: the driver (the job's own process) and every Ray worker (`ray::` processes),
the peak of each and of the workers' sum, and the driver's peak within each step.

Targets: total seconds at the largest size <= 1.2 x linear from the smallest (100k <= 12 x 10k), and the
driver's peak RSS at the largest size <= 1.5 x its peak at the smallest once the dedup embedding matrix
(N x D float32, which dedup's fit holds by design) is taken off.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

from bench import save_results
from bench.publish import anonymous_rss
from bench.teacher import FakeServer
from infra.local_cluster import LOOPBACK_ONLY_ENV, start_head, stop_head
from infra.sample_world import render_world
from pipelines.run import RunDirectory
from schemas.config import load_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
CONFIG = "configs/sample.yaml"
SHARD_SIZE = 1000
TEACHER_LATENCY = 0.05
STEPS = (("start + crawl", "crawl: done in"), ("to dedup", "dedup: fit over"), ("to probes", "probes: fit over"),
         ("stages after", "all stages done"), ("write + publish", "Hugging Face dataset:"))


def world(size: int) -> Path:
    folder = REPO / "data" / f"scale_world_{size}"
    if not (folder / "annotations" / "captions_train.json").is_file():
        render_world(folder, size, 0, seed=7, workers=os.cpu_count() or 2)
    return folder


def inputs(folder: Path, n: int, out: Path) -> tuple[Path, Path]:
    """A URL list of the world's first n images (first caption each) and their COCO instances, in `out`."""
    captions = json.loads((folder / "annotations" / "captions_train.json").read_text())
    instances = json.loads((folder / "annotations" / "instances_train.json").read_text())
    images = instances["images"][:n]
    keep = {image["id"] for image in images}
    first = {}
    for caption in captions["annotations"]:
        first.setdefault(caption["image_id"], caption["caption"])
    urls = out / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/images/{im['file_name']}" for im in images],
                             "caption": [first[im["id"]] for im in images]}), urls)
    annotations = out / "instances.json"
    annotations.write_text(json.dumps({**instances, "images": images,
                                       "annotations": [a for a in instances["annotations"] if a["image_id"] in keep]}))
    return urls, annotations


def write_crawl_output(run: RunDirectory, images: Path) -> int:
    """img2dataset's output for every row of the run's URL list, as if each download had succeeded."""
    from img2dataset.logger import CappedCounter, write_stats

    run.shards.mkdir(parents=True, exist_ok=True)
    url_list = pq.ParquetFile(run.url_list)
    now = time.time()
    for shard in range(url_list.num_row_groups):
        rows, status = url_list.read_row_group(shard).to_pylist(), []
        with tarfile.open(run.shards / f"{shard:05d}.tar", "w") as tar:
            for i, row in enumerate(rows):
                key, data = f"{shard:05d}{i:04d}", (images / row["url"].rsplit("/", 1)[1]).read_bytes()
                member = tarfile.TarInfo(f"{key}.jpg")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
                status.append({"uid": row["uid"], "url": row["url"], "caption": row["caption"], "key": key,
                               "status": "success", "error_message": None, "sha256": hashlib.sha256(data).hexdigest()})
        pq.write_table(pa.Table.from_pylist(status), run.shards / f"{shard:05d}.parquet")
        write_stats(str(run.shards), shard, len(rows), len(rows), 0, 0, now, now, CappedCounter(), 5)
    return url_list.num_row_groups


def embedding_bytes(config, n: int) -> int:
    """N x D x 4: the dedup matrix the fit holds (D from one image through the CLIP stages)."""
    from pipelines.stage_fits import dedup_column, embedding_matrix, guard_embeddings
    from pipelines.batches import records_to_table
    from schemas.records import ImageRecord

    image = next((REPO / "data").glob("scale_world_*/images/train/*.jpg")).read_bytes()
    kept = guard_embeddings(config, [ImageRecord(uid="0", url="x", caption="a scene", image=image)]).kept
    return n * embedding_matrix(records_to_table(kept), dedup_column(config)).shape[1] * 4


class Sampler(threading.Thread):
    """Peak RSS of one process (the driver) and of the Ray workers, every 0.25 s, until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.driver, self.stop = psutil.Process(pid), threading.Event()
        self.peak = {"driver": 0, "driver_anonymous": 0, "worker": 0, "workers_sum": 0}
        self.step = STEPS[0][0]  # the step the job is in (set by the reader of its lines)
        self.driver_by_step, self.anonymous_by_step = {}, {}

    def run(self) -> None:
        while not self.stop.wait(0.25):
            try:
                rss = self.driver.memory_info().rss
                self.peak["driver"] = max(self.peak["driver"], rss)
                anonymous = anonymous_rss(self.driver.pid)
                self.peak["driver_anonymous"] = max(self.peak["driver_anonymous"], anonymous)
                self.driver_by_step[self.step] = max(self.driver_by_step.get(self.step, 0), rss)
                self.anonymous_by_step[self.step] = max(self.anonymous_by_step.get(self.step, 0), anonymous)
            except (psutil.Error, OSError):
                return
            workers = []
            for process in psutil.process_iter(["name", "cmdline"]):
                try:
                    if (process.info["cmdline"] or [""])[0].startswith("ray::"):
                        workers.append(process.memory_info().rss)
                except psutil.Error:
                    continue
            self.peak["worker"] = max([self.peak["worker"], *workers])
            self.peak["workers_sum"] = max(self.peak["workers_sum"], sum(workers))


def run_size(folder: Path, n: int, teacher: FakeServer, scratch: Path) -> dict:
    out = scratch / str(n)
    out.mkdir()
    urls, annotations = inputs(folder, n, out)
    overrides = [f"output_root={out / 'outputs'}", f"crawl.url_list={urls}", "crawl.preflight_hosts=0",
                 f"crawl.shard_size={SHARD_SIZE}", "clip.mode=threshold", f"objects.annotations=[{annotations}]",
                 "eval_guard.folders=[]", "eval_guard.coco=[]", "eval_guard.crawled=[]", "evaluate.ground_truth=[]",
                 "evaluate.noise_manifest=null", "generate.max_images=16", "teacher.kind=openai",
                 f"teacher.base_url={teacher.base_url}", "teacher.model=fake-teacher",
                 f"teacher.cache_dir={out / 'cache'}",
                 "proof.enabled=false"]
    config = load_config(CONFIG, overrides)
    run = RunDirectory.open(config, "ray")
    run.prepare(probe_hosts=False)
    shards = write_crawl_output(run, folder / "images" / "train")
    command = [sys.executable, "pipelines/build_instruct.py", "--config", CONFIG,
               *[a for o in overrides for a in ("--set", o)]]
    started = time.perf_counter()
    job = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=(out / "job.log").open("w"), text=True,
                           env={**os.environ, **LOOPBACK_ONLY_ENV})
    sampler = Sampler(job.pid)
    sampler.start()
    seen: dict[str, float] = {}
    for line in job.stdout:
        for step, prefix in STEPS:
            if prefix in line and step not in seen:
                seen[step] = time.perf_counter() - started
                later = [name for name, _ in STEPS if name not in seen]
                sampler.step = later[0] if later else "after publish"
    job.wait()
    total = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if job.returncode:
        tail = (out / "job.log").read_text(errors="replace")[-3000:]  # the scratch folder goes with the exit
        raise SystemExit(f"the job at {n} images failed ({job.returncode}); the end of its log:\n{tail}")
    marks, steps, last = [seen.get(step) for step, _ in STEPS], {}, 0.0
    for (step, _), mark in zip(STEPS, marks):
        if mark is not None:
            steps[step], last = round(mark - last, 1), mark
    matrix = embedding_bytes(config, n)
    gib = 2 ** 30
    return {"images": n, "shards": shards, "seconds": round(total, 1), "seconds_by_step": steps,
            "driver_peak_rss_gib": round(sampler.peak["driver"] / gib, 3),
            "driver_peak_anonymous_rss_gib": round(sampler.peak["driver_anonymous"] / gib, 3),
            "driver_peak_rss_gib_by_step": {step: round(rss / gib, 3) for step, rss in sampler.driver_by_step.items()},
            "driver_peak_anonymous_rss_gib_by_step": {step: round(rss / gib, 3)
                                                      for step, rss in sampler.anonymous_by_step.items()},
            "dedup_matrix_gib": round(matrix / gib, 3),
            "driver_peak_without_matrix_gib": round((sampler.peak["driver"] - matrix) / gib, 3),
            "worker_peak_rss_gib": round(sampler.peak["worker"] / gib, 3),
            "workers_sum_peak_rss_gib": round(sampler.peak["workers_sum"] / gib, 3),
            "kept": json.loads((run.final / "manifest.json").read_text())["counts"].get("kept")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated image counts, smallest first")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    folder = world(max(sizes))
    owned = start_head()
    teacher = FakeServer(TEACHER_LATENCY)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
            for n in sizes:
                rows.append(run_size(folder, n, teacher, Path(scratch)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        teacher.stop()
        if owned:
            stop_head()
    small, large = rows[0], rows[-1]
    growth = large["images"] / small["images"]
    time_ratio = large["seconds"] / small["seconds"]
    memory_ratio = large["driver_peak_without_matrix_gib"] / small["driver_peak_without_matrix_gib"]
    # RSS counts the pages of the memory-mapped Arrow files publishing writes (hf/, trl_*), which the page cache
    # can drop; the anonymous RSS is what the driver itself holds.
    anonymous_ratio = ((large["driver_peak_anonymous_rss_gib"] - large["dedup_matrix_gib"])
                       / (small["driver_peak_anonymous_rss_gib"] - small["dedup_matrix_gib"]))
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
               "loadavg_after": os.getloadavg(), "shard_size": SHARD_SIZE, "teacher_latency_s": TEACHER_LATENCY,
               "sizes": rows, "time_ratio": round(time_ratio, 2), "linear_ratio": growth,
               "time_vs_linear": round(time_ratio / growth, 3),
               "driver_memory_ratio_without_matrix": round(memory_ratio, 3),
               "driver_anonymous_memory_ratio_without_matrix": round(anonymous_ratio, 3),
               "targets": {"time_vs_linear": 1.2, "driver_memory_ratio_without_matrix": 1.5},
               "met": {"time": time_ratio / growth <= 1.2, "driver_memory": memory_ratio <= 1.5}}
    print(f"{small['images']} -> {large['images']} images: time x{time_ratio:.2f} (linear x{growth:g}: "
          f"{time_ratio / growth:.2f} of linear, target <= 1.2), driver peak RSS without the dedup matrix "
          f"x{memory_ratio:.2f} (target <= 1.5)")
    save_results(RESULTS, results)


if __name__ == "__main__":
    main()
