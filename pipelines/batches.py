"""How a batch of rows goes through one stage on any engine, and the Arrow form of a record row.

Both engines hand batches of rows (Arrow tables, as stored in parquet) to `StageBatches`; it builds typed
records from the columns the stage declares (its `columns`: what it reads or sets, besides the row's identity and
status), runs the stage on the live ones, passes already-dropped rows through (a row dropped by the crawl still
reaches the output with its reason) and sets only those columns in the rows it gives back: the image bytes, the
embeddings and the rest ride through a stage that does not read them as Arrow columns, never as Python objects
(`through_columns`). A stage may offer a whole-table path that runs straight on the Arrow columns (the plan
declares it: `MapStage.arrow`; the CLIP scorer's is `score_columns`). Each stage is built once per worker
process (`built_once`).
"""
from __future__ import annotations

import threading
import typing
import uuid
from collections import OrderedDict
from functools import partial
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel

if typing.TYPE_CHECKING:
    from filters.clip_scorer import ClipScorer
from schemas.records import CLEARED_WHEN_DROPPED, KEEP, ImageRecord, StageResult, stored_type

Stage = Callable[[list[ImageRecord]], StageResult]
# A stage's whole-table path: (the built stage, an Arrow batch) -> the batch it would give, or None when the
# record path must run (`score_columns` is the CLIP scorer's).
ArrowPath = Callable[[Any, pa.Table], "pa.Table | None"]


def arrow_type(annotation, nested: bool = False) -> pa.DataType:
    """The Arrow type of a record field: numbers in 32 bits (sizes, CLIP scores and embeddings need no more),
    nullable where the field is optional (every Arrow column is); a model (an object, a probe) is a struct of its
    fields, whose floats keep 64 bits (a box's corners read back exactly as they were computed)."""
    kind = stored_type(annotation)
    if typing.get_origin(kind) in (list, tuple):
        return pa.list_(arrow_type(typing.get_args(kind)[0], nested))
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return pa.struct([(name, arrow_type(field.annotation, nested=True)) for name, field in kind.model_fields.items()])
    return {str: pa.string(), int: pa.int32(), float: pa.float64() if nested else pa.float32(), bytes: pa.binary(),
            bool: pa.bool_()}[kind]


def arrow_schema(model: type[BaseModel]) -> pa.Schema:
    return pa.schema([(name, arrow_type(field.annotation)) for name, field in model.model_fields.items()])


# Arrow schema of a record row, from `ImageRecord`; fixed so that empty batches and all-null columns keep their types.
RECORD_SCHEMA = arrow_schema(ImageRecord)

# dropped/ keeps every column but the image bytes: a dropped row says why, it is not data to train on.
DROPPED_SCHEMA = RECORD_SCHEMA.remove(RECORD_SCHEMA.get_field_index("image"))


def binary_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The bytes of a binary column's values, end to end, as one uint8 array (no copy for one chunk)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offset_type = np.int64 if pa.types.is_large_binary(column.type) else np.int32
    offsets = np.frombuffer(column.buffers()[1], offset_type)[column.offset:column.offset + len(column) + 1]  # [N + 1]
    return np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]


def binary_column(rows: np.ndarray) -> pa.Array:
    """[N, ...] array -> binary column whose row i is rows[i]'s bytes, over rows' own memory (large_binary past
    the 2 GiB that 32-bit offsets reach)."""
    n, width = len(rows), rows[0].nbytes if len(rows) else 0
    large = n * width >= 2**31
    offsets = np.arange(n + 1, dtype=np.int64 if large else np.int32) * width
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), n,
                                 [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows))])


def score_columns(scorer: "ClipScorer", batch: pa.Table) -> pa.Table | None:
    """`ClipScorer` straight on Arrow columns, for Ray's model actors: the live rows' pixels and tokens go
    to the model as one array each and the scores come back as columns, with no Python object per row
    (at GPU speed, building records would cost more than the model). The same table the record path
    gives (a test checks). None when that path must run: a live row without pixels, or another schema."""
    if not batch.schema.equals(RECORD_SCHEMA):
        return None
    is_live = pc.fill_null(pc.equal(batch.column("status"), KEEP), False)
    if pc.all(is_live).as_py():  # the usual batch: no copy of its columns
        live, rest = batch, batch.slice(0, 0)
    else:
        live, rest = batch.filter(is_live), batch.filter(pc.invert(is_live))
    n = live.num_rows
    if n == 0:
        return batch
    if live.column("pixels").null_count or live.column("tokens").null_count:
        return None
    pixels = binary_values(live.column("pixels"))
    tokens = live.column("tokens").combine_chunks().flatten().to_numpy()
    if pixels.size != n * len(scorer.views) * scorer.input_hw[0] * scorer.input_hw[1] * 3 or tokens.size % n:
        return None  # not ClipPreprocessor's output for this scorer: the record path says what is wrong
    scores = scorer.score_pixels(pixels.reshape(n, len(scorer.views), *scorer.input_hw, 3), tokens.reshape(n, -1))
    dim = scores.embedding.shape[1]
    columns = {
        "clip_score": pa.array(scores.clip_score, pa.float32()),
        "embedding": pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)),
                                              pa.array(scores.embedding.ravel(), pa.float32())),
        "pixels": pa.nulls(n, pa.binary()),
        "tokens": pa.nulls(n, pa.list_(pa.int32())),
    }
    if scores.dedup_embedding is not None:
        columns["dedup_embedding"] = binary_column(scores.dedup_embedding.astype(np.float32, copy=False))
    for name, array in columns.items():
        live = live.set_column(RECORD_SCHEMA.get_field_index(name), RECORD_SCHEMA.field(name), array)
    return pa.concat_tables([live, rest])  # the record path's order: kept, then rows that were not live


def apply_stage(stage: Stage, records: list[ImageRecord]) -> list[ImageRecord]:
    live = [r for r in records if r.status == KEEP]
    result = stage(live) if live else StageResult()
    if len(result.kept) + len(result.dropped) != len(live):
        raise RuntimeError(f"stage {getattr(stage, 'name', stage)} lost records: {len(live)} in, "
                           f"{len(result.kept)} kept + {len(result.dropped)} dropped")
    return result.kept + result.dropped + [r for r in records if r.status != KEEP]


# What every stage's records carry, whatever columns it declares: who the row is and whether it is live.
ROW_COLUMNS = ("uid", "url", "status", "reason", "stage")


def declared_columns(factory: Callable) -> tuple[str, ...] | None:
    """The `columns` a stage's class declares (through any `functools.partial` around it); None: every field."""
    while isinstance(factory, partial):
        factory = factory.func
    return getattr(factory, "columns", None)


def through_columns(stage: Stage, batch: pa.Table, columns: tuple[str, ...]) -> pa.Table | None:
    """`apply_stage` on records built from the declared columns only; the rows it gives back are the input rows
    (in the order the stage returned them) with those columns set from its records and, for a row it dropped,
    the columns a dropped record loses (`CLEARED_WHEN_DROPPED`) emptied: the table the whole-row path gives.
    None (the whole-row path must run) for a batch whose uids are not unique."""
    names = [n for n in RECORD_SCHEMA.names if n in ROW_COLUMNS or n in columns]
    uids = batch.column("uid").to_pylist()
    row_of = {uid: i for i, uid in enumerate(uids)}
    if len(row_of) != len(uids):
        return None
    records = apply_stage(stage, rows_to_records(batch.select(names).to_pylist()))
    given = set(names)
    for record in records:
        if undeclared := [f for f in record.model_fields_set - given if getattr(record, f) is not None]:
            raise RuntimeError(f"stage {getattr(stage, 'name', stage)} set {', '.join(sorted(undeclared))} of record "
                               f"{record.uid}, which its `columns` do not declare")
    order = pa.array([row_of[r.uid] for r in records], pa.int64())
    out = batch.take(order)
    set_by_stage = pa.Table.from_pylist([r.model_dump(include=given) for r in records],
                                        schema=pa.schema([RECORD_SCHEMA.field(n) for n in names]))
    for name in names:
        out = out.set_column(out.schema.get_field_index(name), RECORD_SCHEMA.field(name), set_by_stage.column(name))
    was_live = pc.fill_null(pc.equal(batch.column("status").take(order), KEEP), False).to_pylist()
    dropped_now = [live and r.status != KEEP for live, r in zip(was_live, records)]
    if any(dropped_now):
        emptied = pa.array([None if d else i for i, d in enumerate(dropped_now)], pa.int64())
        for name in CLEARED_WHEN_DROPPED:
            if name not in given:
                out = out.set_column(out.schema.get_field_index(name), RECORD_SCHEMA.field(name),
                                     out.column(name).take(emptied))
    return out


def records_to_table(records: list[ImageRecord]) -> pa.Table:
    return pa.Table.from_pylist([r.model_dump() for r in records], schema=RECORD_SCHEMA)


def rows_to_records(rows: list[dict]) -> list[ImageRecord]:
    return [ImageRecord.model_validate(row) for row in rows]


# Stages built in this process, by StageBatches key: Ray runs each task of a plain `map_batches` on a copy of
# the one StageBatches the driver made, so without this every task would build its stage again (re-read the
# COCO annotations, reload a CLIP). A few runs' worth of stages; the oldest goes first.
_BUILT: OrderedDict[str, "_Built"] = OrderedDict()
_BUILT_LOCK = threading.Lock()
_BUILT_MAX = 16


class _Built:
    """One cache entry: built once by whichever thread asks first; others wait on this entry only."""

    def __init__(self, factory: Callable[[], Any]):
        self.factory, self.lock, self.value, self.done = factory, threading.Lock(), None, False

    def get(self) -> Any:
        with self.lock:
            if not self.done:
                self.value, self.done = self.factory(), True
            return self.value


def built_once(key: str, factory: Callable[[], Any]) -> Any:
    """What `factory` builds, built once per process under `key` (a slow build holds up only its own key)."""
    with _BUILT_LOCK:
        entry = _BUILT.get(key)
        if entry is None:
            entry = _BUILT[key] = _Built(factory)
            while len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
        _BUILT.move_to_end(key)
    return entry.get()


class StageBatches:
    """A picklable batch function around one stage: rows in, rows out (Ray `map_batches`, Beam `DoFn`). Every
    copy of one StageBatches (all the tasks and DoFn instances of a run's stage) shares one stage per process.

    The engines hand it a shard's rows (or a piece of them) whole; it cuts them into the stage's batches itself,
    from the first row, so what a model sees together is the same in every run: a resumed run, which runs only
    some shards, scores each row in the same batch, to the last bit, as an uninterrupted one."""

    def __init__(self, name: str, factory: Callable[[], Stage], batch_size: int | None = None,
                 arrow: ArrowPath | None = None, columns: tuple[str, ...] | None = None):
        self.name = name
        self.factory = factory
        self.batch_size = batch_size  # None: the rows as given, in one batch
        self.arrow = arrow  # the stage's whole-table path, when it offers one (`MapStage.arrow`)
        self.columns = columns  # the record fields it reads or sets (`MapStage.columns`); None: every field
        self.key = f"{name}:{uuid.uuid4().hex}"  # the same in every pickled copy of this instance
        self.stage: Stage | None = None
        self._setup_lock = threading.Lock()  # an actor running batches in threads builds its stage once

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_setup_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _setup_lock=threading.Lock())

    def setup(self) -> None:
        with self._setup_lock:
            if self.stage is None:
                self.stage = built_once(self.key, self.factory)

    def _cuts(self, n: int) -> list[tuple[int, int]]:
        size = self.batch_size or max(n, 1)
        return [(start, min(start + size, n)) for start in range(0, n, size)] or [(0, 0)]

    def __call__(self, block: pa.Table) -> pa.Table:  # Ray Data (batch_format="pyarrow") and Beam's SegmentDoFn
        self.setup()
        return pa.concat_tables([self._table(block.slice(start, end - start)) for start, end in self._cuts(block.num_rows)])

    def _table(self, batch: pa.Table) -> pa.Table:
        if self.arrow is not None and (table := self.arrow(self.stage, batch)) is not None:
            return table
        if self.columns is not None and batch.schema.equals(RECORD_SCHEMA):
            if (table := through_columns(self.stage, batch, self.columns)) is not None:
                return table
        return records_to_table(apply_stage(self.stage, rows_to_records(batch.to_pylist())))
