"""The ordered stage list, and how a batch of rows goes through one stage on any engine.

Engines hand batches of rows (dicts, as stored in parquet) to `StageBatches`; it rebuilds the
typed records, runs the stage on the live ones and passes already-dropped rows through, so a
row dropped by the crawl still reaches the output with its reason.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filters.clip_scorer import ClipPreprocessor, ClipScoreFilter, ClipScorer, fit_clip_threshold
from filters.dedup import DuplicateFilter, NearDuplicateIndex
from filters.eval_guard import EvalOverlapFilter, ReferenceIndex
from filters.grounding import GroundingVerifier
from filters.validate import ImageValidator
from generators.absent_objects import AbsentObjectSampler, fit_object_statistics
from generators.objects import ObjectFinder
from pipelines.references import load_references
from schemas.config import DedupConfig, PipelineConfig
from schemas.errors import UserError
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
        ("dedup_embedding", pa.binary()),
        ("pixels", pa.binary()),
        ("tokens", pa.list_(pa.int32())),
        ("objects", pa.string()),
        ("probes", pa.string()),
        ("teacher_selected", pa.bool_()),
        ("instructions", pa.string()),
        ("rejected_turns", pa.string()),
        ("teacher_usage", pa.string()),
    ]
)


# dropped/ keeps every column but the image bytes: a dropped row says why, it is not data to train on.
DROPPED_SCHEMA = RECORD_SCHEMA.remove(RECORD_SCHEMA.get_field_index("image"))


@dataclass
class MapStage:
    """A stage applied batch by batch; `factory` builds it once per worker (a model loads once)."""

    name: str
    factory: Callable[[], Stage]
    uses_model: bool = False  # runs on an actor pool (Ray) that keeps the model (or client) loaded
    batch_size: int | None = None  # default: validate.batch_size
    num_actors: int = 1
    num_gpus: float = 0
    # Batches one actor works on at once (threads sharing its model or client). Above 1, the stage also gets
    # one batch per block on Ray, so each batch's output leaves (and shows progress) as soon as it is done.
    concurrent_batches: int = 1


@dataclass
class GlobalStage:
    """A global step in two halves: `fit` over columns of all live records, then `apply(fitted)` per batch."""

    name: str
    columns: list[str]
    fit: Callable[[pa.Table], Any]
    apply: Callable[[Any], Stage]


def _scores(table: pa.Table) -> np.ndarray:
    return table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


def dedup_column(config: PipelineConfig) -> str:
    return "dedup_embedding" if config.dedup.separate_embedding else "embedding"


def fit_dedup(config: PipelineConfig, table: pa.Table) -> dict[str, str]:
    if table.num_rows == 0:
        return {}
    return NearDuplicateIndex(config.dedup).fit(table.column("uid").to_pylist(), embedding_matrix(table, dedup_column(config)),
                                                _scores(table), table.column("sha256").to_pylist())


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """[N, D] float32 straight from Arrow (no per-float Python objects at 1M x 512): `dedup_embedding` (float32
    bytes per row) or `embedding` (a list of floats per row)."""
    values = table.column(column).combine_chunks()
    values = binary_values(values).view(np.float32) if pa.types.is_binary(values.type) else values.flatten().to_numpy()
    return values.astype(np.float32, copy=False).reshape(table.num_rows, -1)


def clip_dedup_settings(config: PipelineConfig) -> DedupConfig | None:
    """What the CLIP stages embed for dedup and the guard: dedup's settings when either runs."""
    return config.dedup if config.dedup.enabled or config.eval_guard.enabled else None


def guard_embeddings(config: PipelineConfig, records: list[ImageRecord]) -> StageResult:
    """Records through the stages a crawled image goes through before the guard (validate, both CLIP halves),
    so that they embed exactly as the pipeline's records do."""
    dedup = clip_dedup_settings(config)
    result = StageResult(kept=records)
    for stage in built_once(f"guard_embeddings:{config.fingerprint()}", lambda: [
            ImageValidator(config.validate_), ClipPreprocessor(config.clip, dedup=dedup), ClipScorer(config.clip, dedup=dedup)]):
        if not result.kept:
            break
        step = stage(result.kept)
        result = StageResult(kept=step.kept, dropped=result.dropped + step.dropped)
    return result


def fit_eval_guard(config: PipelineConfig, table: pa.Table) -> dict[str, str]:
    """uid -> `eval_overlap:<reference id>` for the live records that copy an eval image. The guard compares the
    embedding dedup's settings describe (the CLIP stages compute it for the guard also when dedup is off;
    `eval_guard.eps` is chosen for it)."""
    if table.num_rows == 0:
        return {}
    return reference_index(config).match(table.column("uid").to_pylist(), table.column("sha256").to_pylist(),
                                         embedding_matrix(table, dedup_column(config)))


def reference_index(config: PipelineConfig, chunk: int = 256) -> ReferenceIndex:
    """The references' hashes and embeddings (`guard_embeddings`), `chunk` images at a time. A reference that
    cannot be read or decoded is left out and reported; if none is left, the run stops with one sentence."""
    ids, hashes, embeddings, problems = [], [], [], []
    references = load_references(config.eval_guard, problems)
    while batch := list(itertools.islice(references, chunk)):
        # The caption only satisfies validate (an empty one is dropped); the guard never reads it.
        records = [ImageRecord(uid=str(i), url=ref.id, caption=ref.id, image=ref.data) for i, ref in enumerate(batch)]
        result = guard_embeddings(config, records)
        problems += [f"{r.url}: {r.reason}" for r in result.dropped]
        ids += [r.url for r in result.kept]
        hashes += [hashlib.sha256(batch[int(r.uid)].data).hexdigest() for r in result.kept]
        if result.kept:
            embeddings.append(embedding_matrix(records_to_table(result.kept), dedup_column(config)))
    if not ids:
        why = f"{len(problems)} could not be used, e.g. {problems[0]}" if problems else "none was found"
        raise UserError(f"The eval-leak guard has no reference image ({why}); fix eval_guard's folders, coco and "
                        f"crawled, or set them to [] to run without the guard.")
    print(f"[pipeline] eval_guard: {len(ids)} reference images" + (f"; {len(problems)} left out, e.g. {problems[0]}"
                                                                   if problems else ""), flush=True)
    return ReferenceIndex(ids, hashes, np.concatenate(embeddings), config.eval_guard.eps or config.dedup.eps)


def binary_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The bytes of a binary column's values, end to end, as one uint8 array (no copy for one chunk)."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset:column.offset + len(column) + 1]  # [N + 1]
    return np.frombuffer(column.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]


def binary_column(rows: np.ndarray) -> pa.Array:
    """[N, ...] array -> binary column whose row i is rows[i]'s bytes."""
    n, width = len(rows), rows[0].nbytes if len(rows) else 0
    offsets = np.arange(n + 1, dtype=np.int32) * width
    return pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(np.ascontiguousarray(rows))])


def score_columns(scorer: ClipScorer, batch: pa.Table) -> pa.Table | None:
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


def fit_probes(config: PipelineConfig, table: pa.Table) -> dict:
    """Object statistics over every live image, and which images the teacher writes for (generate.max_images);
    every image gets probes."""
    uids = table.column("uid").to_pylist()
    objects = [[o["category"] for o in json.loads(text or "[]")] for text in table.column("objects").to_pylist()]
    selected = None
    if config.generate.max_images is not None and len(uids) > config.generate.max_images:
        ranked = sorted(uids, key=lambda uid: hashlib.sha256(f"{config.teacher.seed}|{uid}".encode()).hexdigest())
        selected = sorted(ranked[: config.generate.max_images])
    return {"statistics": fit_object_statistics(objects), "selected": selected}


def teacher_cache_dir(config: PipelineConfig) -> str:
    return str(Path(config.teacher.cache_dir or Path(config.output_root) / "teacher_cache").resolve())


def stage_plan(config: PipelineConfig) -> list[MapStage | GlobalStage]:
    """The ordered stage list both engines run. Generation needs `config.teacher.base_url` resolved
    (the embedded teacher's address is known once it started)."""
    from generators.instructions import InstructionGenerator  # imports openai (0.5 s): only where the plan is built

    gpus = 1 if config.clip.device != "cpu" and _cuda_available() else 0
    dedup = clip_dedup_settings(config)
    plan: list[MapStage | GlobalStage] = [
        MapStage("validate", partial(ImageValidator, config.validate_)),
        # CPU tasks decode and resize; the model actors (GPU when present) only run the towers.
        MapStage("clip_preprocess", partial(ClipPreprocessor, config.clip, dedup=dedup), batch_size=config.clip.batch_size),
        MapStage("clip_score", partial(ClipScorer, config.clip, dedup=dedup),
                 uses_model=True, batch_size=config.clip.batch_size,
                 num_actors=config.clip.num_actors, num_gpus=gpus),
        # A fixed threshold is a plain per-batch stage; only top_fraction needs every score first.
        MapStage("clip_filter", partial(ClipScoreFilter, config.clip.threshold)) if config.clip.mode == "threshold" else
        GlobalStage("clip_filter", ["clip_score"], lambda table: fit_clip_threshold(config.clip, _scores(table)),
                    ClipScoreFilter),
    ]
    if config.eval_guard.enabled:  # before dedup: a leaked copy never decides which training copy survives
        plan.append(GlobalStage("eval_guard", ["uid", dedup_column(config), "sha256"], partial(fit_eval_guard, config),
                                partial(EvalOverlapFilter, clear_embedding=not config.dedup.enabled)))
    if config.dedup.enabled:
        plan.append(GlobalStage("dedup", ["uid", dedup_column(config), "clip_score", "sha256"], partial(fit_dedup, config),
                                DuplicateFilter))
    plan += [
        MapStage("objects", partial(ObjectFinder, config.objects, config.clip)),
        GlobalStage("probes", ["uid", "objects"], partial(fit_probes, config),
                    partial(AbsentObjectSampler, generate=config.generate, objects=config.objects, seed=config.teacher.seed)),
        MapStage("generate", partial(InstructionGenerator, config.teacher, config.generate,
                                     config.teacher.base_url or "", teacher_cache_dir(config)),
                 uses_model=True, batch_size=config.generate.batch_size, num_actors=config.teacher.num_actors,
                 concurrent_batches=teacher_batches_in_flight(config)),
        MapStage("verify", partial(GroundingVerifier, config.objects.vocabulary)),
    ]
    return plan


def teacher_batches_in_flight(config: PipelineConfig) -> int:
    """Batches a generate actor holds at once: enough that its requests fill the client's concurrency (about
    one request per image, so concurrency / batch_size), plus one that is being assembled or handed out."""
    from generators.teacher import serving_concurrency

    return -(-serving_concurrency(config.teacher) // config.generate.batch_size) + 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


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
    copy of one StageBatches (all the tasks and DoFn instances of a run's stage) shares one stage per process."""

    def __init__(self, name: str, factory: Callable[[], Stage]):
        self.name = name
        self.factory = factory
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

    def run(self, rows: list[dict]) -> list[ImageRecord]:
        self.setup()
        return apply_stage(self.stage, rows_to_records(rows))

    def __call__(self, batch: pa.Table) -> pa.Table:  # Ray Data, batch_format="pyarrow"
        self.setup()
        if isinstance(self.stage, ClipScorer) and (table := score_columns(self.stage, batch)) is not None:
            return table
        return records_to_table(self.run(batch.to_pylist()))
