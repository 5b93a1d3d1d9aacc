"""Publishing's staged rows: one row per LLaVA record of every kept image (no image bytes), written once from
the record shards to a scratch Arrow file, then read back per split in id order a chunk at a time by every
writer (`pipelines/publish.py`: the LLaVA JSON, hf/, the exports). The rows are never all Python objects at
once: what is held whole is the id order (an Arrow sort of the id column).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evals.noise_eval import iter_rows

# One row per LLaVA record, as publishing stages them: the published columns, the record's split, its turns as
# JSON, and the probes / rejected turns its preference pairs are made of (`negatives` rows only).
STAGED = pa.schema([("id", pa.string()), ("split", pa.string()), ("uid", pa.string()), ("type", pa.string()),
                    ("caption", pa.string()), ("clip_score", pa.float64()), ("objects", pa.string()),
                    ("provenance", pa.string()), ("conversations", pa.string()), ("probes", pa.string()),
                    ("rejected_turns", pa.string())])
CHUNK = 1024


class SplitRows:
    """The published rows of one split in id order, read from the staged rows a chunk at a time (memory-mapped
    Arrow: the rows are never all Python objects at once). Iterable any number of times; `len` is its rows.
    Rows are gathered from each staged record batch on its own: a take on the whole (chunked) table would
    first concatenate every column, a copy of all the rows for each chunk."""

    def __init__(self, table: pa.Table, order: pa.Array):
        self.table, self.order = table, order
        self.batches = table.to_batches()
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        order = self.order.to_numpy().astype(np.int64)
        for start in range(0, len(order), CHUNK):
            wanted = order[start:start + CHUNK]
            batch_of = np.searchsorted(self.starts, wanted, side="right") - 1
            rows: list = [None] * len(wanted)
            for b in np.unique(batch_of):
                at = np.flatnonzero(batch_of == b)
                taken = self.batches[b].take(pa.array(wanted[at] - self.starts[b])).to_pylist()
                for position, row in zip(at.tolist(), taken):
                    rows[position] = row
            for row in rows:
                row["conversations"] = json.loads(row["conversations"])
                yield row

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name).take(self.order)


def stage_rows(records_dir: Path, columns: list[str], path: Path, split_of: Callable[[str], str]) -> int:
    """Every LLaVA record of every kept image (the record shards' `columns`, never the image) as a row of
    `STAGED`, written to the Arrow file `path` a chunk at a time (images with no record are left out), its split
    `split_of(uid)`; returns the rejected turns of records that are not `negatives` (they make no preference
    pair)."""
    rows, unpaired = [], 0
    with pa.ipc.new_file(str(path), STAGED) as writer:
        for record in iter_rows(records_dir, columns):
            rejected = json.loads(record.get("rejected_turns") or "[]")
            unpaired += sum(turn["type"] != "negatives" for turn in rejected)
            for llava in json.loads(record["instructions"] or "[]"):
                negatives = llava["type"] == "negatives"
                rows.append({
                    "id": llava["id"], "split": split_of(record["uid"]),
                    "uid": record["uid"], "type": llava["type"], "caption": record["caption"],
                    "clip_score": record["clip_score"], "objects": json.dumps(record["objects"] or []),
                    "provenance": json.dumps(llava.get("provenance", {}), sort_keys=True, ensure_ascii=False),
                    "conversations": json.dumps([{"from": t["from"], "value": t["value"]} for t in llava["conversations"]]),
                    "probes": json.dumps(record.get("probes") or []) if negatives else None,
                    "rejected_turns": record.get("rejected_turns") if negatives else None})
            if len(rows) >= CHUNK:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, STAGED))
                rows = []
        writer.write_batch(pa.RecordBatch.from_pylist(rows, STAGED))
    return unpaired


def rows_by_split(table: pa.Table, records_dir: Path, splits: tuple[str, ...]) -> dict[str, SplitRows]:
    """The staged rows of each split, sorted by id (so the same records give byte-identical files however the
    record shards were cut); the sort and the checks run on the id column alone."""
    order = pc.sort_indices(table, [("id", "ascending")])
    ids = table.column("id").take(order)
    repeated = pc.filter(ids[1:], pc.equal(ids[1:], ids[:-1])) if len(ids) > 1 else []
    if len(repeated):  # two records with one id would make the order (and LLaVA's ids) ambiguous
        raise ValueError(f"record id {repeated[0].as_py()!r} occurs more than once in {records_dir}")
    split = table.column("split").take(order)
    return {name: SplitRows(table, order.filter(pc.equal(split, name))) for name in splits}
