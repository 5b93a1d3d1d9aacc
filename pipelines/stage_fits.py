"""The global stages' fits: each reads a few columns of every live record (as Arrow arrays) and returns
what its per-batch half applies — the CLIP threshold, near-duplicate groups, eval-leak matches, the
absent-object statistics and the teacher's image selection.
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from filters.clip_preprocess import ClipPreprocessor
from filters.clip_scorer import ClipScorer
from filters.dedup import NearDuplicateIndex
from filters.eval_guard import ReferenceIndex
from filters.validate import ImageValidator
from generators.absent_objects import fit_object_statistics
from pipelines.batches import RECORD_SCHEMA, binary_column, binary_values, built_once, records_to_table
from pipelines.references import load_references
from schemas.config import DedupConfig, PipelineConfig
from schemas.errors import UserError
from schemas.records import KEEP, ImageRecord, StageResult

# Columns a fit reads as one [N, D] float32 matrix (dedup's and the eval-leak guard's embeddings).
MATRIX_COLUMNS = ("embedding", "dedup_embedding")


def read_fit_columns(files: list[Path], columns: list[str]) -> pa.Table:
    """The live rows' `columns` from a segment's files, in uid order (a fit sees the same table however the rows
    were cut into files). An embedding column is read file by file into one preallocated float32 matrix, which
    the returned column wraps without a copy: the driver holds that matrix once, whatever the input size."""
    keys = [pq.read_table(f, columns=["uid", "status"]) for f in files]
    live = [pc.fill_null(pc.equal(k.column("status"), KEEP), False) for k in keys]
    uids = pa.chunked_array([k.column("uid").filter(mask) for k, mask in zip(keys, live)], pa.string())
    order = pc.sort_indices(uids).to_numpy()
    place = np.empty(len(order), np.int64)
    place[order] = np.arange(len(order))  # the i-th live row read goes to row place[i]
    small = [c for c in columns if c not in MATRIX_COLUMNS]
    parts, matrices, start = [], {}, 0
    for path, mask in zip(files, live):
        table = pq.read_table(path, columns=columns, schema=RECORD_SCHEMA).filter(mask)
        rows = place[start:start + table.num_rows]
        start += table.num_rows
        for name in (c for c in columns if c in MATRIX_COLUMNS):
            if table.num_rows:
                block = embedding_matrix(table, name)
                if name not in matrices:
                    matrices[name] = np.empty((len(order), block.shape[1]), np.float32)
                matrices[name][rows] = block
        parts.append(table.select(small))
    schema = pa.schema([RECORD_SCHEMA.field(c) for c in columns])
    if not len(order):
        return schema.empty_table()
    out = pa.concat_tables(parts).take(pa.array(order))
    for name, matrix in matrices.items():
        n, dim = matrix.shape
        column = binary_column(matrix) if pa.types.is_binary(schema.field(name).type) else pa.ListArray.from_arrays(
            pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), pa.array(matrix.reshape(-1)))
        out = out.append_column(pa.field(name, column.type), column)
    return out.select(columns)


def scores(table: pa.Table) -> np.ndarray:
    return table.column("clip_score").to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan


def dedup_column(config: PipelineConfig) -> str:
    return "dedup_embedding" if config.dedup.separate_embedding else "embedding"


def fit_dedup(config: PipelineConfig, table: pa.Table) -> dict[str, str]:
    if table.num_rows == 0:
        return {}
    return NearDuplicateIndex(config.dedup).fit(table.column("uid").to_pylist(), embedding_matrix(table, dedup_column(config)),
                                                scores(table), table.column("sha256").to_pylist())


def embedding_matrix(table: pa.Table, column: str) -> np.ndarray:
    """[N, D] float32 straight from Arrow (no per-float Python objects at 1M x 512): `dedup_embedding` (float32
    bytes per row) or `embedding` (a list of floats per row)."""
    chunks = table.column(column)
    values = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()  # one chunk: its own memory
    is_bytes = pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type)
    values = binary_values(values).view(np.float32) if is_bytes else values.flatten().to_numpy()
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


def fit_probes(config: PipelineConfig, table: pa.Table) -> dict:
    """Object statistics over every live image, and which images the teacher writes for (generate.max_images);
    every image gets probes."""
    uids = table.column("uid").to_pylist()
    objects = [[o["category"] for o in found or []] for found in table.column("objects").to_pylist()]
    selected = None
    if config.generate.max_images is not None and len(uids) > config.generate.max_images:
        ranked = sorted(uids, key=lambda uid: hashlib.sha256(f"{config.teacher.seed}|{uid}".encode()).hexdigest())
        selected = sorted(ranked[: config.generate.max_images])
    return {"statistics": fit_object_statistics(objects), "selected": selected}
