"""Near-duplicate benchmark: `NearDuplicateIndex.fit` wall time, peak memory and recall at 100k-1M images.

    python -m bench.dedup                         # 100k, 300k, 1M images and the 50k recall check, 3-5 minutes
    python -m bench.dedup --quick                 # smoke run: 20k and 50k images, 20k recall check
    python -m bench.dedup --sizes 1000000         # one size
    PYTHONPATH=/path/to python -m bench.dedup --index my_dedup:NearDuplicateIndex --out bench/results/x.json
                                                  # a candidate implementation, same harness

Embeddings are synthetic, L2-normalized 512-d float32 drawn like CLIP's: a mixture of 3,000 Gaussian
clusters of lognormal sizes (random pairs sit near cosine 0, pairs inside a cluster near 0.5), plus 2%
planted near-duplicates (a base vector plus noise, cosine ~0.995 >= 1 - eps). Each size runs in a fresh
subprocess; memory is the child's peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`) minus its RSS after the
imports, so it counts the embeddings (reported on their own too) and every copy `fit` makes. The recall
check runs the clustered (IVF) and the exact path on one subset and compares their pair sets.
Prints the figures and writes bench/results/dedup.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from schemas.config import DedupConfig

RESULTS = Path("bench/results/dedup.json")
DIM = 512
EPS = 0.01  # SemDeDup's default: near-duplicate at cosine >= 0.99
NUM_CLUSTERS = 3000  # "a few thousand" topics, as k-means finds in LAION-scale CLIP embeddings
CLUSTER_SPREAD = 0.045  # per-dimension std around a unit centre: same-cluster cosine ~0.5
DUP_FRACTION = 0.02
DUP_NOISE = 0.0044  # per-dimension std: cosine(base, copy) = 1 / sqrt(1 + 512 * 0.0044**2) ~ 0.995
TARGETS = {"fit_seconds_at_1M": 60.0, "peak_gb_at_1M": 4.0, "recall": 0.99}
GB = 2 ** 30
DEFAULT_INDEX = "filters.dedup:NearDuplicateIndex"


def load_index(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def synthetic_embeddings(n: int, seed: int = 0, chunk: int = 50_000) -> tuple[np.ndarray, np.ndarray]:
    """[n, 512] unit rows; the last 2% are copies of rows `bases` (distinct). Filled in chunks so that
    generating never holds more than the output array plus one chunk."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_CLUSTERS, DIM), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    weights = rng.lognormal(0.0, 1.0, NUM_CLUSTERS)  # uneven topics: the largest is ~25x the mean
    n_dup = int(n * DUP_FRACTION)
    n_base = n - n_dup
    labels = rng.choice(NUM_CLUSTERS, size=n_base, p=weights / weights.sum())
    bases = rng.choice(n_base, size=n_dup, replace=False)
    x = np.empty((n, DIM), np.float32)
    for start in [*range(0, n_base, chunk), *range(n_base, n, chunk)]:  # every base before any copy
        if start < n_base:
            stop = min(start + chunk, n_base)
            centre, spread = centres[labels[start:stop]], CLUSTER_SPREAD
        else:
            stop = min(start + chunk, n)
            centre, spread = x[bases[start - n_base:stop - n_base]], DUP_NOISE
        block = rng.standard_normal((stop - start, DIM), dtype=np.float32)
        block *= spread
        block += centre
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[start:stop] = block
    return x, bases


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_size(n: int, index_cls) -> dict:
    """Child process: one `fit` on n images."""
    baseline = rss_gb()
    x, bases = synthetic_embeddings(n)
    n_base = n - len(bases)
    uids = [f"img{i:07d}" for i in range(n)]
    scores = np.random.default_rng(1).random(n).astype(np.float32)
    hashes = [None] * n
    inputs = rss_gb() - baseline
    start, cpu_start = time.perf_counter(), cpu_s()
    reasons = index_cls(DedupConfig(eps=EPS)).fit(uids, x, scores, hashes)
    seconds, cpu = time.perf_counter() - start, cpu_s() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - baseline  # ru_maxrss is KiB on Linux
    linked = sum(reasons.get(uids[n_base + c]) == f"near_duplicate_of:{uids[b]}"
                 or reasons.get(uids[b]) == f"near_duplicate_of:{uids[n_base + c]}" for c, b in enumerate(bases))
    return {"n": n, "fit_s": round(seconds, 2), "fit_cpu_s": round(cpu, 2), "images_per_s": round(n / seconds),
            "embeddings_gb": round(x.nbytes / GB, 3), "inputs_rss_gb": round(inputs, 3),
            "peak_rss_gb": round(peak, 3), "fit_overhead_gb": round(peak - inputs, 3),
            "planted": len(bases), "near_duplicates_found": sum(r.startswith("near_") for r in reasons.values()),
            "planted_recall": round(linked / len(bases), 4)}


def run_recall(n: int, index_cls) -> dict:
    """Child process: clustered (IVF) pairs vs exact range-search pairs on the same n images."""
    x, _ = synthetic_embeddings(n, seed=2)
    timed = {}
    for name, exact_max in (("ivf", 1), ("exact", n)):
        start = time.perf_counter()
        pairs = set(index_cls(DedupConfig(eps=EPS, exact_search_max=exact_max)).similar_pairs(x))
        timed[name] = (pairs, time.perf_counter() - start)
    ivf, exact = timed["ivf"][0], timed["exact"][0]
    return {"n": n, "exact_pairs": len(exact), "ivf_pairs": len(ivf), "common": len(ivf & exact),
            "recall_vs_exact": round(len(ivf & exact) / max(1, len(exact)), 4),
            "ivf_s": round(timed["ivf"][1], 2), "exact_s": round(timed["exact"][1], 2)}


def in_child(flag: str, n: int, index: str) -> dict:
    before = os.getloadavg()
    out = subprocess.run([sys.executable, "-m", "bench.dedup", flag, str(n), "--index", index],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench.dedup {flag} {n} failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.splitlines()[-1]), "loadavg_before": before, "loadavg_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--recall-subset", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="20k and 50k images, 20k recall subset")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="module:class of the index to measure")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-recall", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_size or args.child_recall:
        index_cls = load_index(args.index)
        print(json.dumps(run_size(args.child_size, index_cls) if args.child_size
                         else run_recall(args.child_recall, index_cls)))
        return
    if args.quick:
        args.sizes, args.recall_subset = [20_000, 50_000], 20_000

    loadavg_start, sizes = os.getloadavg(), []
    for n in args.sizes:
        sizes.append(row := in_child("--child-size", n, args.index))
        print(f"{n:>9,} images: fit {row['fit_s']:6.1f} s (cpu {row['fit_cpu_s']:.0f} s, {row['images_per_s']:,}/s)  "
              f"peak {row['peak_rss_gb']:.2f} GB (embeddings {row['embeddings_gb']:.2f}, fit's own "
              f"{row['fit_overhead_gb']:.2f})  found {row['near_duplicates_found']:,}/{row['planted']:,} planted, "
              f"recall {row['planted_recall']:.4f}  "
              f"load {row['loadavg_before'][0]:.1f}", flush=True)
    recall = in_child("--child-recall", args.recall_subset, args.index)
    print(f"recall vs exact on {recall['n']:,}: {recall['common']:,}/{recall['exact_pairs']:,} = "
          f"{recall['recall_vs_exact']:.4f}  (IVF {recall['ivf_s']:.1f} s, exact {recall['exact_s']:.1f} s)")

    at_1m = next((r for r in sizes if r["n"] == 1_000_000), None)
    met = {"recall_vs_exact": recall["recall_vs_exact"] >= TARGETS["recall"],
           "planted_recall": all(r["planted_recall"] >= TARGETS["recall"] for r in sizes)}
    if at_1m:
        met |= {"fit_seconds_at_1M": at_1m["fit_s"] <= TARGETS["fit_seconds_at_1M"],
                "peak_gb_at_1M": at_1m["peak_rss_gb"] <= TARGETS["peak_gb_at_1M"]}
    print("targets:", ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in met.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "quick": args.quick, "index": args.index,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.machine(), "python": platform.python_version(),
                    "loadavg_start": loadavg_start, "loadavg_end": os.getloadavg(),
                    "note": "2 cores shared with other jobs (a CLIP training): timings are noisy, see loadavg"},
        "data": {"dim": DIM, "eps": EPS, "num_clusters": NUM_CLUSTERS, "cluster_spread": CLUSTER_SPREAD,
                 "dup_fraction": DUP_FRACTION, "dup_noise": DUP_NOISE},
        "memory_method": "fresh subprocess per size; ru_maxrss minus RSS after imports (includes the embeddings)",
        "sizes": sizes, "recall_vs_exact": recall, "targets": TARGETS, "met": met}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
