"""Crawl benchmark: our crawl + validate against the plain img2dataset CLI, and the sample-world render rate.

    python -m bench.crawl            # full: 5,000-image world (5,300 clean URLs), 5 repetitions, ~8 minutes
    python -m bench.crawl --quick    # smoke run: 1,000-image world, 1 repetition

"Ours" is what the pipeline runs: prepare_url_list, crawl (img2dataset with our guarded downloader,
pipelines/fetch.py: URL policy on every resolved address, deadline, byte limit), then read_shard + the
validate stage per shard on a pool of one worker per core. "Plain" is the img2dataset CLI (its own
urllib downloader, no guard) with the same `img2dataset_arguments`. Both run as fresh processes on the same loopback URL list, interleaved
(ours, plain, then plain, ours, ...), each into a fresh output directory. images/s is images stored
(ours: kept by validate; plain: img2dataset successes) per wall second; the ratio is the median of
the per-repetition ratios, so a busy machine slows both alike. Writes bench/results/crawl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from multiprocessing import Pool
from pathlib import Path

import pyarrow.parquet as pq

from bench import save_results
from filters.validate import ImageValidator
from pipelines.services.embedded_teacher import free_port
from infra.sample_world import render_world
from infra.world_noise import EXPECTED_REASON, prepare_world
from infra.world_server import WorldServer
from pipelines.crawl import crawl, img2dataset_arguments, read_shard
from pipelines.batches import apply_stage
from pipelines.url_list import prepare_url_list, shard_count_for
from schemas.config import ValidateConfig, WorldConfig, load_config

CONFIG = "configs/sample.yaml"
RESULTS = Path("bench/results/crawl.json")
TARGET_RATIO = 0.9  # ours may cost at most 10% of plain img2dataset's throughput
# Rows whose noise kind the pipeline must drop (404, slow, bomb, empty caption...) are left out:
# a 'slow' URL stalls a thread for the whole timeout and would measure the timeout, not the crawl.
URL_FILTER = "clean image URLs only: rows whose noise kind has no expected drop reason"


def clean_url_list(world_dir: Path, destination: Path) -> int:
    """The world's urls.parquet without the rows the pipeline is meant to drop; returns the row count."""
    kinds = dict(zip(*pq.read_table(world_dir / "noise_manifest.parquet", columns=["url", "kind"]).to_pydict().values()))
    table = pq.read_table(world_dir / "urls.parquet")
    keep = [kinds[url] not in EXPECTED_REASON for url in table.column("url").to_pylist()]
    pq.write_table(table.filter(keep), destination)
    return sum(keep)


def crawl_stats(shards_dir: Path) -> dict:
    """img2dataset's successes, and the epoch times its first shard started and its last one ended."""
    stats = [json.loads(f.read_text()) for f in shards_dir.glob("*_stats.json")]
    return {"crawled": sum(s["successes"] for s in stats), "first_shard_start": min(s["start_time"] for s in stats),
            "last_shard_end": max(s["end_time"] for s in stats)}


def _validate_shard(job: tuple[Path, int, Path, ValidateConfig]) -> tuple[Counter, float, float]:
    """Pool worker, one shard: read it back and validate it, as a Ray/Beam worker does; returns counts and CPU seconds."""
    shards_dir, shard_id, url_list, config = job
    start = time.process_time()  # CPU seconds: the machine is shared, wall time in a worker would count waiting
    records = read_shard(shards_dir, shard_id, url_list)
    read = time.process_time()
    out = apply_stage(ImageValidator(config), records)
    return Counter(r.status for r in out), read - start, time.process_time() - read


def run_ours(source: Path, work: Path) -> dict:
    """What the pipeline does (in a fresh process, like `python pipelines/build_instruct.py`): prepare, crawl, validate."""
    config = load_config(CONFIG, [f"crawl.url_list={source}"])
    url_list, shards = work / "urls.parquet", work / "shards"
    start = time.perf_counter()
    rows = prepare_url_list(source, url_list, config.crawl.preflight_hosts, config.crawl.shard_size,
                            frozenset(config.crawl.allow_private_networks))
    prepared = time.perf_counter()
    crawl(config.crawl, url_list, shards, distributor="multiprocessing")
    crawled = time.perf_counter()
    jobs = [(shards, i, url_list, config.validate_) for i in range(shard_count_for(rows, config.crawl.shard_size))]
    statuses, read_s, validate_s = Counter(), 0.0, 0.0
    with Pool(os.cpu_count()) as pool:  # one worker per core, as Ray/Beam would run the stage
        for counts, read, validate in pool.imap_unordered(_validate_shard, jobs):
            statuses, read_s, validate_s = statuses + counts, read_s + read, validate_s + validate
    end = time.perf_counter()
    return {"kept": statuses["ok"], "dropped": statuses["dropped"],
            "prepare_s": prepared - start, "crawl_s": crawled - prepared, "validate_wall_s": end - crawled,
            "read_shard_cpu_s": read_s, "validate_cpu_s": validate_s}


def plain_command(url_list: Path, shards: Path) -> list[str]:
    """The img2dataset CLI with exactly our `img2dataset_arguments` (python-fire parses each repr back)."""
    arguments = img2dataset_arguments(load_config(CONFIG).crawl, url_list, shards, "multiprocessing")
    return [str(Path(sys.executable).with_name("img2dataset"))] + [f"--{k}={v!r}" for k, v in arguments.items()]


def run_side(command: list[str], shards_dir: Path, log: Path) -> dict:
    """Runs one side as a fresh process; its wall time split into startup (launch to the first shard's
    start: imports, sharding, spawning workers), downloading (first shard start to last shard end) and the rest."""
    launched, start = time.time(), time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}); its output is in {log}")
    stats = crawl_stats(shards_dir)
    startup, downloading = stats["first_shard_start"] - launched, stats["last_shard_end"] - stats["first_shard_start"]
    return {"crawled": stats["crawled"], "seconds": seconds, "startup_s": startup, "downloading_s": downloading,
            "after_download_s": seconds - startup - downloading}


def bench_crawl(num_images: int, repetitions: int, scratch: Path) -> dict:
    port, slow = free_port(), load_config(CONFIG).world.slow_seconds
    world_dir = prepare_world(WorldConfig(dir=f"data/bench_world_{num_images}", num_images=num_images, num_val=0,
                                          port=port, slow_seconds=slow))
    source = scratch / "urls.parquet"
    num_urls = clean_url_list(world_dir, source)
    plain_list = scratch / "plain_urls.parquet"  # the uid'ed copy: img2dataset must see the same rows and uids
    prepare_url_list(source, plain_list, 0, load_config(CONFIG).crawl.shard_size)
    reps = []
    with WorldServer(world_dir, "127.0.0.1", port, slow):
        for rep in range(repetitions):
            ours_dir, plain_dir = scratch / f"ours_{rep}", scratch / f"plain_{rep}"
            ours_dir.mkdir()
            sides = {"ours": ([sys.executable, "-m", "bench.crawl", "--ours", str(source), str(ours_dir)], ours_dir / "shards"),
                     "plain": (plain_command(plain_list, plain_dir / "shards"), plain_dir / "shards")}
            order = ("ours", "plain") if rep % 2 == 0 else ("plain", "ours")  # alternate, so going first favours neither
            figures = {name: run_side(*sides[name], scratch / f"{name}.log") for name in order}
            ours, plain = figures["ours"], figures["plain"]
            ours.update(json.loads((ours_dir / "result.json").read_text()))
            ours_rate, plain_rate = ours["kept"] / ours["seconds"], plain["crawled"] / plain["seconds"]
            downloading = plain["downloading_s"] / ours["downloading_s"]  # where the guarded downloader differs
            reps.append({"order": order, "ours": ours, "plain": plain, "ours_images_per_s": ours_rate,
                         "plain_images_per_s": plain_rate, "ratio": ours_rate / plain_rate,
                         "downloading_ratio": downloading})
            print(f"rep {rep + 1}/{repetitions}: ratio {ours_rate / plain_rate:.3f} (downloading phase {downloading:.3f}); "
                  f"ours {ours_rate:.1f} images/s, plain {plain_rate:.1f} images/s", flush=True)
            for name, side in (("ours", ours), ("plain", plain)):
                print(f"  {name:<5} {side['crawled']} crawled in {side['seconds']:.1f}s: startup {side['startup_s']:.1f}s, "
                      f"downloading {side['downloading_s']:.1f}s, after {side['after_download_s']:.1f}s"
                      + (f" (read+validate {side['validate_wall_s']:.1f}s, {side['kept']} kept)" if name == "ours" else ""))
            shutil.rmtree(ours_dir), shutil.rmtree(plain_dir)
    ratio = statistics.median(r["ratio"] for r in reps)
    return {"url_count": num_urls, "url_filter": URL_FILTER, "repetitions": repetitions, "per_repetition": reps,
            "median_ours_images_per_s": statistics.median(r["ours_images_per_s"] for r in reps),
            "median_plain_images_per_s": statistics.median(r["plain_images_per_s"] for r in reps),
            "median_ratio": ratio, "target_ratio": TARGET_RATIO, "target_met": ratio >= TARGET_RATIO,
            # plain's downloading seconds / ours (first shard start to last shard end): the downloaders alone,
            # without either side's fixed costs (imports, preflight, validate)
            "median_downloading_ratio": statistics.median(r["downloading_ratio"] for r in reps),
            "ours_counts": "records kept by validate", "plain_counts": "img2dataset successes",
            "plain_command": " ".join(plain_command(Path("URLS"), Path("OUT")))}


def bench_render(num_images: int, scratch: Path) -> dict:
    start = time.perf_counter()
    summary = render_world(scratch / "render", num_images, 0, seed=1, workers=2)
    seconds = time.perf_counter() - start
    return {"images": num_images, "workers": 2, "seconds": seconds, "images_per_s": num_images / seconds,
            "render_world_reported_images_per_s": summary["images_per_second"], "target": None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1,000 images, 1 repetition")
    p.add_argument("--repetitions", type=int, default=5, help="full run only (default: %(default)s)")
    p.add_argument("--ours", nargs=2, type=Path, metavar=("URL_LIST", "WORK_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.ours:  # child process of one 'ours' repetition
        result = run_ours(*args.ours)
        (args.ours[1] / "result.json").write_text(json.dumps(result))
        return
    num_images, repetitions, render_images = (1000, 1, 300) if args.quick else (5000, args.repetitions, 2000)
    with tempfile.TemporaryDirectory(prefix="bench-crawl-") as tmp:
        load_before = os.getloadavg()
        crawl_figures = bench_crawl(num_images, repetitions, Path(tmp))
        render_figures = bench_render(render_images, Path(tmp))
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": args.quick,
               "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                           "python": platform.python_version(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
               "crawl": crawl_figures, "render": render_figures}
    save_results(RESULTS, results)
    print(f"crawl: {crawl_figures['url_count']} URLs x {repetitions}: ours {crawl_figures['median_ours_images_per_s']:.1f} "
          f"images/s, plain img2dataset {crawl_figures['median_plain_images_per_s']:.1f} images/s, median ratio "
          f"{crawl_figures['median_ratio']:.3f} (target >= {TARGET_RATIO}: {'met' if crawl_figures['target_met'] else 'NOT met'}); "
          f"downloading phase alone {crawl_figures['median_downloading_ratio']:.3f}")
    print(f"render: {render_images} images, 2 workers: {render_figures['images_per_s']:.1f} images/s")


if __name__ == "__main__":
    main()
