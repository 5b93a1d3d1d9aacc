"""The ordered stage list, and how a batch of rows goes through one stage on any engine.

Engines hand batches of rows (dicts, as stored in parquet) to `StageBatches`; it rebuilds the
typed records, runs the stage on the live ones and passes already-dropped rows through, so a
row dropped by the crawl still reaches the output with its reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from filters.clip_scorer import ClipScoreFilter, ClipScorer, fit_clip_threshold
from filters.dedup import DuplicateFilter, NearDuplicateIndex
from filters.validate import ImageValidator
from schemas.config import PipelineConfig
from schemas.records import KEEP, ImageRecord, StageResult

Stage = Callable[[list[ImageRecord]], StageResult]

# Arrow schema of a record row; fixed so that empty batches and all-null columns keep their types.
RECORD_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("key", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("stage", pa.string()),
        ("image", pa.binary()),
        ("clip_score", pa.float32()),
        ("embedding", pa.list_(pa.float32())),
    ]
)


@dataclass
class MapStage:
    """A stage applied batch by batch; `factory` builds it once per worker (a model loads once)."""

    name: str
    factory: Callable[[], Stage]
    uses_model: bool = False


@dataclass
class GlobalStage:
    """A global step in two halves: `fit` over columns of all live records, then `apply(fitted)` per batch."""

    name: str
    columns: list[str]
    fit: Callable[[pa.Table], Any]
    apply: Callable[[Any], Stage]


def _scores(table: pa.Table) -> np.ndarray:
    return table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


def fit_dedup(config: PipelineConfig, table: pa.Table) -> dict[str, str]:
    # Straight from Arrow to one [N, D] float32 array: no per-float Python objects at 1M x 512.
    values = table.column("embedding").combine_chunks().flatten().to_numpy()
    embeddings = values.astype(np.float32, copy=False).reshape(table.num_rows, -1)
    return NearDuplicateIndex(config.dedup).fit(table.column("uid").to_pylist(), embeddings, _scores(table),
                                                table.column("sha256").to_pylist())


def stage_plan(config: PipelineConfig) -> list[MapStage | GlobalStage]:
    """The ordered stage list both engines run."""
    plan: list[MapStage | GlobalStage] = [
        MapStage("validate", partial(ImageValidator, config.validate_)),
        MapStage("clip_score", partial(ClipScorer, config.clip), uses_model=True),
        GlobalStage("clip_filter", ["clip_score"],
                    lambda table: fit_clip_threshold(config.clip, _scores(table)),
                    ClipScoreFilter),
    ]
    if config.dedup.enabled:
        plan.append(GlobalStage("dedup", ["uid", "embedding", "clip_score", "sha256"], partial(fit_dedup, config),
                                DuplicateFilter))
    return plan


def apply_stage(stage: Stage, records: list[ImageRecord]) -> list[ImageRecord]:
    live = [r for r in records if r.status == KEEP]
    result = stage(live) if live else StageResult()
    if len(result.kept) + len(result.dropped) != len(live):
        raise RuntimeError(f"stage {getattr(stage, 'name', stage)} lost records: {len(live)} in, "
                           f"{len(result.kept)} kept + {len(result.dropped)} dropped")
    return result.kept + result.dropped + [r for r in records if r.status != KEEP]


def records_to_table(records: list[ImageRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=RECORD_SCHEMA)


def rows_to_records(rows: list[dict]) -> list[ImageRecord]:
    return [ImageRecord.model_validate(row) for row in rows]


class StageBatches:
    """A picklable batch function around one stage: rows in, rows out (Ray `map_batches`, Beam `DoFn`)."""

    def __init__(self, name: str, factory: Callable[[], Stage]):
        self.name = name
        self.factory = factory
        self.stage: Stage | None = None

    def setup(self) -> None:
        if self.stage is None:
            self.stage = self.factory()

    def run(self, rows: list[dict]) -> list[ImageRecord]:
        self.setup()
        return apply_stage(self.stage, rows_to_records(rows))

    def __call__(self, batch: pa.Table) -> pa.Table:  # Ray Data, batch_format="pyarrow"
        return records_to_table(self.run(batch.to_pylist()))
