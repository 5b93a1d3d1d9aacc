"""What a finished run says about itself: the counts (one streamed pass over records/ and dropped/), the
manifest and the summary printed at the end."""
from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.records import reason_kind

if TYPE_CHECKING:
    from pipelines.run import RunDirectory


def code_revision() -> str:
    """The git commit of the code; a Ray job runs in a copy without .git, so its submitter passes
    VISINSTRUCT_CODE_REVISION (infra/demo.py does)."""
    if revision := os.environ.get("VISINSTRUCT_CODE_REVISION"):
        return revision
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tally_outputs(records_dir: Path, dropped_dir: Path, input_rows: int, stage_order: list[str]) -> dict:
    """Counts per stage and per reason (from what was written, so Ray and Beam are counted alike), the turns the
    grounding verifier removed and the teacher's usage, in one streamed pass over records/ and dropped/: a
    record batch at a time, only the columns counted. Returns the manifest's counts and `usage` (its list of
    per-image usages, which `finish` totals)."""
    kept, by_stage, rejected, usages = 0, {}, Counter(), []
    for folder, is_kept in ((records_dir, True), (dropped_dir, False)):
        for batch in column_batches(folder, ["stage", "reason", "rejected_turns", "teacher_usage"]):
            if is_kept:
                kept += batch.num_rows
            else:
                for stage, reason in zip(batch.column("stage").to_pylist(), batch.column("reason").to_pylist()):
                    by_stage.setdefault(stage, Counter())[reason_kind(reason)] += 1
            for text in batch.column("rejected_turns").drop_null().to_pylist():
                rejected.update(f"{turn['type']}:{reason_kind(turn['reason'])}" for turn in json.loads(text))
            usages += [json.loads(text) for text in batch.column("teacher_usage").drop_null().to_pylist()]
    dropped = sum(sum(reasons.values()) for reasons in by_stage.values())
    stages, remaining = {}, input_rows
    for name in stage_order + sorted(set(by_stage) - set(stage_order)):
        reasons = by_stage.get(name, Counter())
        lost = sum(reasons.values())
        stages[name] = {"in": remaining, "kept": remaining - lost, "dropped": lost, "reasons": dict(sorted(reasons.items()))}
        remaining -= lost
    return {
        "input_urls": input_rows,
        "kept": kept,
        "dropped": dropped,
        "accounted": kept + dropped == input_rows,
        "stages": stages,
        "rejected_turns": dict(sorted(rejected.items())),
        "usage": usages,
    }


def column_batches(folder: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The parquet files of a run's records/ or dropped/, a record batch at a time, with `columns` (null where a
    file has no such column)."""
    for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
        file = pq.ParquetFile(path)
        present = [c for c in columns if c in file.schema_arrow.names]
        for batch in file.iter_batches(columns=present, batch_size=65536):
            for name in (c for c in columns if c not in present):
                batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
            yield batch


def build_manifest(run: "RunDirectory", counts: dict, seconds: float, extra: dict | None = None) -> dict:
    return {
        "name": run.config.name,
        "version": run.version,
        "engine": run.engine,
        "config": run.config.to_dict(),
        "config_sha256": run.config.fingerprint(),
        "url_list": {"path": str(Path(run.config.crawl.url_list).resolve()), "sha256": run.url_list_sha256},
        "code_revision": code_revision(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(seconds, 2),
        "counts": counts,
        **(extra or {}),
    }


def format_summary(manifest: dict) -> str:
    counts = manifest["counts"]
    lines = [f"{manifest['name']} {manifest['version']} ({manifest['engine']}): "
             f"{counts['input_urls']} URLs in, {counts['kept']} kept, {counts['dropped']} dropped"]
    for stage, info in counts["stages"].items():
        lines.append(f"  {stage:<10} in {info['in']:>7}  kept {info['kept']:>7}  dropped {info['dropped']:>6}")
        for reason, n in sorted(info["reasons"].items(), key=lambda kv: -kv[1]):
            lines.append(f"      {n:>7}  {reason}")
    for reason, n in counts.get("rejected_turns", {}).items():
        lines.append(f"  turn removed by the grounding verifier: {n:>5}  {reason}")
    if grounding := counts.get("grounding_eval"):
        lines.append(f"  vs ground truth: answers asserting an absent object {grounding['absent_object_rate']}, "
                     f"negative labels wrong {grounding['negative_label_error_rate']}, "
                     f"{grounding['yield']['llava_records']} LLaVA records from {grounding['yield']['input_urls']} URLs")
    for name, figures in counts.get("noise_eval", {}).items():
        lines.append(f"  vs noise manifest, {name}: precision {figures['precision']}  recall {figures['recall']}  "
                     f"({figures['true_positives']} right of {figures['predicted']} removed)")
    return "\n".join(lines)
