"""Every stage is built once per worker process, not once per task: Ray runs each task of a plain `map_batches`
on a copy of the driver's StageBatches, and a stage such as `objects` reads a COCO annotations file (450 MB
for COCO train) or loads a CLIP when it is built. On a real `ray start --head` cluster."""
from __future__ import annotations

import sys
from functools import partial

import cloudpickle
import pyarrow as pa

from pipelines.batches import StageBatches, records_to_table
from schemas.records import ImageRecord, StageResult
from tests.test_teacher_stage import ray_head  # noqa: F401 - the real local head

# The counting stage below is defined in this test file, which Ray's workers cannot import: ship it by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CountingStage:
    """Keeps every record; each time one is built, the building process's id goes into `log`."""

    def __init__(self, log: str):
        import os

        with open(log, "a") as out:
            out.write(f"{os.getpid()}\n")

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        return StageResult(kept=records)


def test_a_stage_is_built_once_per_worker_process_not_per_task(ray_head, tmp_path):
    import ray

    log = tmp_path / "built.txt"
    records = [ImageRecord(uid=f"{i:04d}", url=f"http://example.com/{i}.jpg", caption="c") for i in range(96)]
    blocks = [records_to_table(records[i:i + 4]) for i in range(0, 96, 4)]  # 24 blocks: 24 tasks
    ds = ray.data.from_arrow(blocks).map_batches(StageBatches("count", partial(CountingStage, str(log))),
                                                 batch_format="pyarrow", batch_size=None)
    out = pa.concat_tables(ray.get(ds.materialize().to_arrow_refs()))
    assert sorted(out.column("uid").to_pylist()) == [r.uid for r in records]  # every record came through
    builders = log.read_text().split()
    assert len(builders) == len(set(builders)) < 24  # one build per process, fewer processes than tasks
