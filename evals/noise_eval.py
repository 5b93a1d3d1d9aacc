"""How well the filters removed the injected noise: compares a run's outputs with the sample
world's noise manifest (which no stage reads).

- mismatched captions: positives are `caption_swapped` rows that reached the CLIP filter;
  predictions are rows the CLIP filter dropped.
- duplicates: each planted copy (`near_duplicate` / `exact_duplicate`) and its original form a
  group; a group that reached dedup with both members is caught when dedup dropped one of them
  as a duplicate of the other. Predictions are rows dedup dropped; one is right when the uid it
  names is in the same group.
- eval overlap (when the eval-leak guard ran): planted copies of held-out images (`eval_copy`) that
  reached the guard; a removal is right when it names that copy's own held-out image.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq


def read_rows(directory: Path, columns: list[str] | None = None) -> list[dict]:
    """Every row of the parquet files in a run's `records/` or `dropped/` (none if it does not exist)."""
    return list(iter_rows(directory, columns))


def iter_rows(directory: Path, columns: list[str] | None = None, batch_size: int = 1024) -> Iterator[dict]:
    """`read_rows` a batch at a time: never every row in memory."""
    for path in sorted(directory.glob("*.parquet")) if directory.exists() else []:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            yield from batch.to_pylist()


def _ratio(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def evaluate_against_noise(noise_manifest: Path, records_dir: Path, dropped_dir: Path, stage_order: list[str]) -> dict:
    """`stage_order`: the run's stages in order; a row dropped at or after a stage reached it."""
    noise = {r["url"]: r for r in pq.read_table(noise_manifest).to_pylist()}
    kept = read_rows(records_dir, ["uid", "url"])
    dropped = read_rows(dropped_dir, ["uid", "url", "stage", "reason"])
    url_of = {r["uid"]: r["url"] for r in kept + dropped}
    clip_stage = stage_order[stage_order.index("clip_filter"):]  # rows that reached the CLIP filter
    reached_clip = [r["url"] for r in kept] + [r["url"] for r in dropped if r["stage"] in clip_stage]
    swapped = {u for u in reached_clip if noise.get(u, {}).get("kind") == "caption_swapped"}
    clip_dropped = {r["url"] for r in dropped if r["stage"] == "clip_filter"}
    hits = len(swapped & clip_dropped)
    mismatch = {"positives": len(swapped), "predicted": len(clip_dropped), "true_positives": hits,
                "precision": _ratio(hits, len(clip_dropped)), "recall": _ratio(hits, len(swapped))}

    dedup_on = stage_order[stage_order.index("dedup"):] if "dedup" in stage_order else []
    reached_dedup = {r["url"] for r in kept} | {r["url"] for r in dropped if r["stage"] in dedup_on}
    groups = {u: (r["detail"], u) for u, r in noise.items() if r["kind"] in ("near_duplicate", "exact_duplicate")}
    live_groups = {pair for pair in groups.values() if pair[0] in reached_dedup and pair[1] in reached_dedup}
    dedup_drops = [(r["url"], url_of.get(r["reason"].split(":", 1)[1])) for r in dropped if r["stage"] == "dedup"]
    correct = [(a, b) for a, b in dedup_drops if (b, a) in live_groups or (a, b) in live_groups]
    caught = {frozenset(p) for p in correct}
    duplicates = {"groups": len(live_groups), "predicted": len(dedup_drops), "true_positives": len(correct),
                  "precision": _ratio(len(correct), len(dedup_drops)), "recall": _ratio(len(caught), len(live_groups))}
    figures = {"mismatched_captions": mismatch, "duplicates": duplicates}
    if "eval_guard" in stage_order:
        figures["eval_overlap"] = _eval_overlap(noise, kept, dropped, stage_order[stage_order.index("eval_guard"):])
    return figures


def _eval_overlap(noise: dict, kept: list[dict], dropped: list[dict], guard_on: list[str]) -> dict:
    """Planted copies of held-out images (`eval_copy`, detail `<how>:<val file name>`) that reached the guard;
    a removal is right when it names the copy's own held-out image."""
    reached = {r["url"] for r in kept} | {r["url"] for r in dropped if r["stage"] in guard_on}
    copies = {u: r["detail"].split(":", 1) for u, r in noise.items() if r["kind"] == "eval_copy" and u in reached}
    removed = {r["url"]: r["reason"].split(":", 1)[1] for r in dropped if r["stage"] == "eval_guard"}
    right = {u for u, source in removed.items() if u in copies and copies[u][1] == source}
    per_kind = {}
    for how in sorted({how for how, _ in copies.values()}):
        planted = [u for u, (kind, _) in copies.items() if kind == how]
        per_kind[how] = {"planted": len(planted), "removed": sum(u in right for u in planted)}
    return {"positives": len(copies), "predicted": len(removed), "true_positives": len(right),
            "precision": _ratio(len(right), len(removed)), "recall": _ratio(len(right), len(copies)),
            "by_copy": per_kind}
