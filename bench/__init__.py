"""Benchmarks: each module is runnable with `python -m bench.<name>` and writes bench/results/<name>.json."""
from __future__ import annotations

import json
import statistics
from pathlib import Path


def save_results(path: Path, results: dict) -> None:
    """Writes a benchmark's figures as JSON (the folder made where missing) and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"saved {path}")


def medians(rows: list[dict], *keys: str) -> dict[str, float]:
    """{"median_<key>": the median of row[key] over rows} for each key (per-repetition figures)."""
    return {f"median_{key}": statistics.median(row[key] for row in rows) for key in keys}
