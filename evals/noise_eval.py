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
    """`stage_order`: the run's stages in order; a row dropped at or after a stage reached it. The records are
    streamed (two passes over `uid, url` / `stage, reason`); what is held is the noise manifest and the rows
    the figures are about (planted rows, and rows the CLIP filter, dedup and the guard dropped)."""
    noise = {r["url"]: r for r in pq.read_table(noise_manifest).to_pylist()}
    clip_stage = stage_order[stage_order.index("clip_filter"):]  # rows that reached the CLIP filter
    dedup_on = stage_order[stage_order.index("dedup"):] if "dedup" in stage_order else []
    guard_on = stage_order[stage_order.index("eval_guard"):] if "eval_guard" in stage_order else []
    groups = {u: (r["detail"], u) for u, r in noise.items() if r["kind"] in ("near_duplicate", "exact_duplicate")}
    in_groups = {u for pair in groups.values() for u in pair}
    copies = {u for u, r in noise.items() if r["kind"] == "eval_copy"}
    swapped, clip_dropped, reached_dedup, reached_guard = set(), set(), set(), set()
    dedup_drops, removed = [], {}

    def reached(url: str, stage: str | None) -> None:  # stage None: a kept row, which reached every stage
        if noise.get(url, {}).get("kind") == "caption_swapped" and (stage is None or stage in clip_stage):
            swapped.add(url)
        if url in in_groups and (stage is None or stage in dedup_on):
            reached_dedup.add(url)
        if url in copies and (stage is None or stage in guard_on):
            reached_guard.add(url)

    for row in iter_rows(records_dir, ["url"]):
        reached(row["url"], None)
    for row in iter_rows(dropped_dir, ["url", "stage", "reason"]):
        reached(row["url"], row["stage"])
        if row["stage"] == "clip_filter":
            clip_dropped.add(row["url"])
        elif row["stage"] == "dedup":
            dedup_drops.append((row["url"], row["reason"].split(":", 1)[1]))
        elif row["stage"] == "eval_guard":
            removed[row["url"]] = row["reason"].split(":", 1)[1]
    named = {uid for _, uid in dedup_drops}
    url_of = {r["uid"]: r["url"] for directory in (records_dir, dropped_dir)
              for r in iter_rows(directory, ["uid", "url"]) if r["uid"] in named}

    hits = len(swapped & clip_dropped)
    mismatch = {"positives": len(swapped), "predicted": len(clip_dropped), "true_positives": hits,
                "precision": _ratio(hits, len(clip_dropped)), "recall": _ratio(hits, len(swapped))}
    live_groups = {pair for pair in groups.values() if pair[0] in reached_dedup and pair[1] in reached_dedup}
    dedup_drops = [(url, url_of.get(uid)) for url, uid in dedup_drops]
    correct = [(a, b) for a, b in dedup_drops if (b, a) in live_groups or (a, b) in live_groups]
    caught = {frozenset(p) for p in correct}
    duplicates = {"groups": len(live_groups), "predicted": len(dedup_drops), "true_positives": len(correct),
                  "precision": _ratio(len(correct), len(dedup_drops)), "recall": _ratio(len(caught), len(live_groups))}
    figures = {"mismatched_captions": mismatch, "duplicates": duplicates}
    if guard_on:
        figures["eval_overlap"] = _eval_overlap(noise, reached_guard, removed)
    return figures


def _eval_overlap(noise: dict, reached: set[str], removed: dict[str, str]) -> dict:
    """Planted copies of held-out images (`eval_copy`, detail `<how>:<val file name>`) that reached the guard;
    a removal (url -> the reference it names) is right when it names the copy's own held-out image."""
    copies = {u: noise[u]["detail"].split(":", 1) for u in reached}
    right = {u for u, source in removed.items() if u in copies and copies[u][1] == source}
    per_kind = {}
    for how in sorted({how for how, _ in copies.values()}):
        planted = [u for u, (kind, _) in copies.items() if kind == how]
        per_kind[how] = {"planted": len(planted), "removed": sum(u in right for u in planted)}
    return {"positives": len(copies), "predicted": len(removed), "true_positives": len(right),
            "precision": _ratio(len(right), len(removed)), "recall": _ratio(len(right), len(copies)),
            "by_copy": per_kind}
