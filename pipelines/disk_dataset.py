"""`DatasetDict.save_to_disk`, the same files, without the writer's process holding the whole split in its
resident memory.

datasets writes a generated split to a cache file and memory-maps it; `save_to_disk` then reads every row through
that map, so each page of the split (at 100k images, trl_dpo's pairs carry several GB of image bytes) stays
resident in the process until the dataset is dropped: page cache the kernel may reclaim, but counted in the
process's RSS (and in a container's memory). `save_dataset_dict` reads the cache files as Arrow streams instead,
into memory it frees once written (at most about one of save_to_disk's write batches, which datasets sizes to
~100 MB, whatever the split's size), and writes the shards with datasets' own `ArrowWriter`, cut and batched
exactly as `save_to_disk` cuts and batches them, so the folder is byte for byte what `save_to_disk` writes
(tests/test_disk_dataset.py compares them) and `datasets.load_from_disk` reads it as usual
(bench/publish.py measures both RSS figures). It follows `save_to_disk` of the pinned datasets (requirements.txt);
the test compares against the installed one, so an upgrade that writes other files fails there, not in a user's run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa

if TYPE_CHECKING:
    import datasets

STATE_KEYS = ("_fingerprint", "_format_columns", "_format_kwargs", "_format_type", "_output_all_columns")


def save_dataset_dict(splits: dict[str, "datasets.Dataset"], out: Path, num_shards: dict[str, int]) -> None:
    """What `datasets.DatasetDict(splits).save_to_disk(out, num_shards=num_shards)` writes."""
    import datasets

    out.mkdir(parents=True, exist_ok=True)
    with (out / datasets.config.DATASETDICT_JSON_FILENAME).open("w", encoding="utf-8") as file:
        json.dump({"splits": list(splits)}, file)
    for name, split in splits.items():
        if not split.cache_files or split._indices is not None:  # held in memory (an empty split), or a view
            split.save_to_disk(str(out / name), num_shards=num_shards[name])
        else:
            save_split(split, out / name, num_shards[name])


def save_split(split: "datasets.Dataset", out: Path, num_shards: int) -> None:
    """`split.save_to_disk(out, num_shards=num_shards)` for a split that is its cache files' rows in order
    (datasets' generator path writes one file, or several past its 500 MB shard size), streamed from them."""
    import datasets
    from datasets.arrow_writer import ArrowWriter, get_writer_batch_size_from_data_size
    from datasets.utils.py_utils import asdict  # datasets' own: it leaves out what its features' fields leave out

    # save_to_disk's sizes: _estimate_nbytes is the table's bytes when every image carries its bytes (ours do).
    nbytes, rows = split.data.nbytes, len(split)
    batch = datasets.config.DEFAULT_MAX_BATCH_SIZE
    if nbytes > 0:
        batch = min(batch, get_writer_batch_size_from_data_size(rows, nbytes))
    out.mkdir(parents=True, exist_ok=True)
    names = [f"data-{i:05d}-of-{num_shards:05d}.arrow" for i in range(num_shards)]
    stream = StreamedRows([cache["filename"] for cache in split.cache_files])
    per_shard, extra = divmod(rows, num_shards)  # Dataset.shard(contiguous=True): the first `extra` get one more
    for index, name in enumerate(names):
        writer = ArrowWriter(features=split.features, path=str(out / name), embed_local_files=True)
        try:
            left = per_shard + (index < extra)
            while left:
                writer.write_table(stream.take(min(batch, left)))
                left -= min(batch, left)
        finally:
            writer.finalize()
            writer.close()
    if not stream.done():
        raise RuntimeError(f"{split.split}: the cache files hold more rows than the dataset's {rows}")
    state = {key: split.__dict__[key] for key in STATE_KEYS}
    state["_split"] = str(split.split) if split.split is not None else None
    state["_data_files"] = [{"filename": name} for name in names]
    with (out / datasets.config.DATASET_STATE_JSON_FILENAME).open("w", encoding="utf-8") as file:
        json.dump(state, file, indent=2, sort_keys=True)
    info = asdict(split.info)
    with (out / datasets.config.DATASET_INFO_FILENAME).open("w", encoding="utf-8") as file:
        json.dump({key: info[key] for key in sorted(info)}, file, indent=2)  # first-level keys sorted, as datasets does


class StreamedRows:
    """Arrow IPC stream files read forward, `take(n)` rows at a time, holding only the batches those rows are in."""

    def __init__(self, paths: list[str]):
        self.batches: Iterator[pa.RecordBatch] = _record_batches(paths)
        self.pending: list[pa.RecordBatch] = []
        self.held = 0

    def take(self, n: int) -> pa.Table:
        while self.held < n:
            batch = next(self.batches, None)
            if batch is None:
                raise RuntimeError(f"the cache files ended {n - self.held} rows early")
            self.pending.append(batch)
            self.held += batch.num_rows
        table = pa.Table.from_batches(self.pending)
        rest = table.slice(n)
        self.pending, self.held = rest.to_batches(), rest.num_rows
        return table.slice(0, n)

    def done(self) -> bool:
        return self.held == 0 and next(self.batches, None) is None


def _record_batches(paths: list[str]) -> Iterator[pa.RecordBatch]:
    for path in paths:
        with pa.OSFile(path) as file:  # read, not memory-mapped: a batch's buffers are freed once it is written
            yield from pa.ipc.open_stream(file)
