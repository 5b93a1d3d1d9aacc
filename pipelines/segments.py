"""The run skeleton both engines share: the stage plan in segments, run shard by shard, resumable.

The plan is cut at its global stages into segments: a segment is a global stage's apply half (its fit reads
the previous segment's written rows) followed by the per-batch stages up to the next global stage. An engine
runs one segment at a time over the crawl shards (`ShardRows` is where a segment reads and writes them):

- every batch's rows are written to files of their own shard, `stages/<n>-<segment>/shard-<id>-<part>.parquet`
  (the last segment writes the kept rows to `records/` and the rest, without image bytes, to `dropped/`), each
  file whole or not at all (written under a temporary name, then renamed);
- a shard is done when all its rows are written: its completion marker, `stages/<n>-<segment>/done/<id>`
  (datatrove style), is written then, and a global fit is saved beside it (`fit.pkl`) before the next segment.

A re-run of a killed run (the same version's `.partial` directory) keeps every marked shard, marks one whose
files hold all its rows although its marker was never written, deletes what the killed run wrote for the others
and runs only those; the manifest's `shard_work` counts what ran and what was reused. Fits are deterministic
(live rows in uid order), so a resumed run writes the same records as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.batches import DROPPED_SCHEMA, RECORD_SCHEMA, records_to_table
from pipelines.crawl import read_shard
from pipelines.stage_fits import read_fit_columns
from pipelines.stages import GlobalStage, MapStage
from schemas.errors import UserError
from schemas.records import KEEP

SHARD_PREFIX = "shard-"
EMPTY = "empty.parquet"  # records/ or dropped/ of a run with no such row: one file with the columns, for every reader


def progress(message: str) -> None:
    """One line per step of the job; `make demo` shows these lines and keeps Ray's own log in a file."""
    print(f"[pipeline] {message}", flush=True)


@dataclass
class Segment:
    name: str  # its first stage's
    fit: GlobalStage | None  # None for the first segment
    stages: list[MapStage] = field(default_factory=list)

    def with_fit(self, fitted: Any) -> list[MapStage]:
        """The segment's stages, the global stage's apply half (with what its fit returned) first."""
        if self.fit is None:
            return self.stages
        return [MapStage(self.fit.name, partial(self.fit.apply, fitted), batch_size=self.fit.batch_size), *self.stages]

    @property
    def stage_names(self) -> list[str]:
        return ([self.fit.name] if self.fit else []) + [stage.name for stage in self.stages]


def segments(plan: list[MapStage | GlobalStage]) -> list[Segment]:
    cut: list[Segment] = []
    for stage in plan:
        if isinstance(stage, GlobalStage):
            cut.append(Segment(stage.name, stage))
        elif not cut:
            cut.append(Segment(stage.name, None, [stage]))
        else:
            cut[-1].stages.append(stage)
    return cut


class ShardSource(Protocol):
    def read(self, shard: int) -> pa.Table: ...


@dataclass(frozen=True)
class CrawlShards:
    """The first segment's input: img2dataset's shards, one URL-list row group each (`read_shard`)."""

    shards: Path
    url_list: Path

    def read(self, shard: int) -> pa.Table:
        return records_to_table(read_shard(self.shards, shard, self.url_list))


@dataclass(frozen=True)
class ShardRows:
    """Where one segment's rows go, file by file and shard by shard, with its completion markers and its fit.
    Picklable: engine workers write through it, the driver marks and reads."""

    folder: Path  # stages/<n>-<segment>: done/, fit.pkl, and the rows unless `final` is set
    final: Path | None = None  # the run's work directory when this is the last segment (records/, dropped/)

    @property
    def outputs(self) -> list[Path]:
        return [self.final / "records", self.final / "dropped"] if self.final else [self.folder]

    def write(self, table: pa.Table) -> pa.Table:
        """One batch's rows, one new file per shard in it; returns (shard, rows) for the driver's tally."""
        shards = table.column("shard")
        if shards.null_count:
            raise RuntimeError("a row reached the shard writer without its shard; rows must come from read_shard")
        written = []
        for shard in sorted(pc.unique(shards).to_pylist()):
            part = table.filter(pc.equal(shards, shard))
            name = f"{SHARD_PREFIX}{shard:05d}-{uuid.uuid4().hex}.parquet"
            if self.final is None:
                _write_whole(part, self.folder / name)
            else:
                is_kept = pc.fill_null(pc.equal(part.column("status"), KEEP), False)
                for folder, rows in ((self.final / "records", part.filter(is_kept)),
                                     (self.final / "dropped", part.filter(pc.invert(is_kept)).select(DROPPED_SCHEMA.names))):
                    if rows.num_rows:
                        _write_whole(rows, folder / name)
            written.append((shard, part.num_rows))
        return pa.table({"shard": pa.array([s for s, _ in written], pa.int32()),
                         "rows": pa.array([n for _, n in written], pa.int64())})

    def files(self, shard: int | None = None) -> list[Path]:
        pattern = f"{SHARD_PREFIX}{shard:05d}-*.parquet" if shard is not None else f"{SHARD_PREFIX}*.parquet"
        return sorted(p for folder in self.outputs if folder.is_dir() for p in folder.glob(pattern))

    def read(self, shard: int) -> pa.Table:
        files = self.files(shard)
        if not files:
            return RECORD_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(f, schema=RECORD_SCHEMA) for f in files])

    def done(self) -> set[int]:
        folder = self.folder / "done"
        return {int(p.name) for p in folder.iterdir() if p.name.isdigit()} if folder.is_dir() else set()

    def mark(self, shard: int, rows: int) -> None:
        _write_whole(json.dumps({"rows": rows}).encode(), self.folder / "done" / f"{shard:05d}")

    def recover(self, expected: list[int]) -> list[int]:
        """Marks every unmarked shard whose files hold exactly its rows, each once (a run killed between writing a
        shard's last file and its marker); returns them."""
        done, recovered = self.done(), []
        for shard, rows in enumerate(expected):
            if shard in done or not (files := self.files(shard)):
                continue
            uids = pa.concat_arrays([pq.read_table(f, columns=["uid"]).column("uid").combine_chunks() for f in files])
            if len(uids) == rows and len(pc.unique(uids)) == rows:
                self.mark(shard, rows)
                recovered.append(shard)
        return recovered

    def clear(self, shards: list[int]) -> None:
        """What an earlier, killed run wrote for these shards (and any file it left half written)."""
        for folder in self.outputs:
            for temporary in folder.glob(".*.tmp") if folder.is_dir() else []:
                temporary.unlink()
        for shard in shards:
            for path in self.files(shard):
                path.unlink()

    def saved_fit(self, fit: Callable[[], Any]) -> Any:
        """The global fit of this segment, computed once and read back by a resumed run."""
        path = self.folder / "fit.pkl"
        if path.is_file():
            return pickle.loads(path.read_bytes())
        fitted = fit()
        _write_whole(pickle.dumps(fitted), path)
        return fitted


def _write_whole(data: pa.Table | bytes, path: Path) -> None:
    """A file that is there whole or not at all: written under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    if isinstance(data, bytes):
        temporary.write_bytes(data)
    else:
        pq.write_table(data, temporary)
    os.replace(temporary, path)


class Tally:
    """The driver's count of written rows per shard; marks a shard done when all its rows are written."""

    def __init__(self, out: ShardRows, expected: list[int]):
        self.out, self.expected, self.rows = out, expected, [0] * len(expected)

    def add(self, written: pa.Table) -> None:
        for shard, rows in zip(written.column("shard").to_pylist(), written.column("rows").to_pylist()):
            self.rows[shard] += rows
            if self.rows[shard] == self.expected[shard]:
                self.out.mark(shard, rows=self.rows[shard])


# An engine runs one segment: its stages over these shards' rows (read from the source), every batch through
# `out.write`, each returned (shard, rows) table to `tally.add` (or, if it cannot stream them back, nothing: the
# skeleton then marks the shards whose files are whole). It may return a description of the run (Ray's stats).
Execute = Callable[[list[MapStage], list[str], list[int], ShardSource, ShardRows, Tally], str | None]


def expected_rows(url_list: Path) -> list[int]:
    """Rows per shard: the URL list's row groups (`write_url_list` writes one per shard)."""
    metadata = pq.ParquetFile(url_list).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def run_segments(work: Path, shards: Path, url_list: Path, plan: list[MapStage | GlobalStage],
                 execute: Execute) -> dict:
    """Every segment of the plan over every shard not done yet; returns the manifest's `shard_work` and the
    engine's descriptions."""
    expected = expected_rows(url_list)
    _drop_unsharded(work)
    source: ShardSource = CrawlShards(shards, url_list)  # then each segment reads the one before it (ShardRows)
    cut = segments(plan)
    report, described, started = {}, [], time.perf_counter()
    for n, segment in enumerate(cut):
        out = ShardRows(work / "stages" / f"{n}-{segment.name}", final=work if n == len(cut) - 1 else None)
        recovered = out.recover(expected)
        todo = sorted(set(range(len(expected))) - out.done())
        out.clear(todo)
        report[segment.name] = {"shards": len(expected), "ran": len(todo), "reused": len(expected) - len(todo),
                                "recovered_markers": len(recovered)}
        if not todo:
            progress(f"{segment.name}: every shard done already ({len(expected)})")
            source = out
            continue
        fitted = None
        if segment.fit is not None:  # never the first segment: the source is the previous segment's rows
            fitted = out.saved_fit(partial(_fit, segment.fit, source, started))
        if len(todo) < len(expected):
            progress(f"{segment.name}: {len(expected) - len(todo)} of {len(expected)} shards done already; "
                     f"running the other {len(todo)}")
        tally = Tally(out, expected)
        described.append(execute(segment.with_fit(fitted), segment.stage_names, todo, source, out, tally))
        out.recover(expected)
        if missing := sorted(set(todo) - out.done()):
            written = {s: len(out.files(s)) for s in missing[:3]}
            raise UserError(f"{segment.name}: {len(missing)} shards did not get all their rows written (e.g. shard "
                            f"{missing[0]}: {written[missing[0]]} files); re-run to redo them.")
        source = out
    for folder, schema in ((work / "records", RECORD_SCHEMA), (work / "dropped", DROPPED_SCHEMA)):
        if not any(folder.glob("*.parquet")):
            _write_whole(schema.empty_table(), folder / EMPTY)
    progress(f"all stages done in {time.perf_counter() - started:.0f} s")
    return {"shard_work": report, "engine": [d for d in described if d]}


def _fit(stage: GlobalStage, previous: ShardRows, started: float) -> Any:
    table = read_fit_columns(previous.files(), stage.columns)
    progress(f"{stage.name}: fit over {table.num_rows} live rows; the stages before it took "
             f"{time.perf_counter() - started:.0f} s")
    return stage.fit(table)


def _drop_unsharded(work: Path) -> None:
    """records/ and dropped/ files that no shard wrote (an older run's whole-run files) would be counted twice."""
    for folder in (work / "records", work / "dropped"):
        if folder.is_dir() and any(not p.name.startswith(SHARD_PREFIX) and p.name != EMPTY for p in folder.iterdir()):
            shutil.rmtree(folder)


def remove_stage_files(work: Path) -> None:
    """A finished run's intermediate segments (records/ and dropped/ hold what it keeps)."""
    shutil.rmtree(work / "stages", ignore_errors=True)
