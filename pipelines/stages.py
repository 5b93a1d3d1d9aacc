"""The ordered stage list, and how a batch of rows goes through one stage on any engine.

Engines hand batches of rows (dicts, as stored in parquet) to `StageBatches`; it rebuilds the
typed records, runs the stage on the live ones and passes already-dropped rows through, so a
row dropped by the crawl still reaches the output with its reason.
"""
from __future__ import annotations

import time
from typing import Callable

import pyarrow as pa

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
    ]
)


def stage_factories(config: PipelineConfig) -> list[tuple[str, Callable[[], Stage]]]:
    """(name, factory) per stage in run order; factories let an engine build a model once per worker."""
    return [("validate", lambda: ImageValidator(config.validate_))]


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
        self.seconds = 0.0

    def setup(self) -> None:
        if self.stage is None:
            self.stage = self.factory()

    def run(self, rows: list[dict]) -> list[ImageRecord]:
        self.setup()
        start = time.perf_counter()
        out = apply_stage(self.stage, rows_to_records(rows))
        self.seconds += time.perf_counter() - start
        return out

    def __call__(self, batch: pa.Table) -> pa.Table:  # Ray Data, batch_format="pyarrow"
        return records_to_table(self.run(batch.to_pylist()))
