"""The Ray job: crawl the URL list with img2dataset, then run the stage list on Ray Data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/build_instruct.py --config configs/sample.yaml

Writes `<output_root>/<name>/<version>/` with `records/` (kept rows, images included),
`dropped/` (every dropped row with its stage and reason), `config.yaml` and `manifest.json`. The stages run
segment by segment, shard by shard (`pipelines/segments.py`): a killed job re-run resumes at the shards not done.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext
from ray.data.exceptions import ExecutionTimeoutError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` without an install

from pipelines.cli import parse_config, parser  # noqa: E402
from pipelines.crawl import crawl, crawl_passes  # noqa: E402
from pipelines.run import RunDirectory, run_version  # noqa: E402
from pipelines.url_list import shard_count_for  # noqa: E402
from pipelines.batches import StageBatches  # noqa: E402 - Ray builds one per actor from its arguments
from pipelines.segments import ShardRows, ShardSource, Tally, progress, run_segments  # noqa: E402
from pipelines.stages import MapStage, stage_plan  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import UserError, exit_on_user_error  # noqa: E402


class ShardReader:
    """Ray Data batch function: shard ids in, that shard's rows out (from the crawl or the previous segment)."""

    def __init__(self, source: ShardSource):
        self.source = source

    def __call__(self, batch: dict) -> pa.Table:
        return pa.concat_tables([self.source.read(int(i)) for i in batch["shard_id"]])


class ShardWriter:
    """Ray Data batch function: a batch's rows written to their shards' files; (shard, rows) out."""

    def __init__(self, out: ShardRows):
        self.out = out

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.out.write(batch)


def apply_on_ray(ds: ray.data.Dataset, stage: MapStage) -> ray.data.Dataset:
    """A stage over whole blocks (one per shard from ShardReader, or Ray's size-bounded pieces of one), which
    StageBatches cuts into the stage's batches itself: Ray never builds a batch from two shards' rows, so a
    model sees the same batches in a resumed run as in an uninterrupted one."""
    if stage.uses_model:  # an actor pool: each actor loads the model (or opens the client) once
        calls = stage.concurrent_batches
        if calls > 1:  # one batch per block: a batch's output leaves when it is done, not with its whole block
            ds = ds.repartition(target_num_rows_per_block=stage.batch_size)
        pool = ActorPoolStrategy(size=stage.num_actors, max_tasks_in_flight_per_actor=calls,
                                 max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1)
        return ds.map_batches(StageBatches, fn_constructor_args=stage.batch_arguments(),
                              batch_format="pyarrow", batch_size=None, compute=pool, num_gpus=stage.num_gpus)
    return ds.map_batches(stage.batches(), batch_format="pyarrow", batch_size=None)


def run(config: PipelineConfig) -> dict:
    return run_version(config, "ray", _run)


def _run(run_dir: RunDirectory) -> dict:
    config = run_dir.config
    start = time.perf_counter()
    num_rows = run_dir.prepare()
    num_shards = shard_count_for(num_rows, config.crawl.shard_size)
    ray.init(address=config.ray.address, ignore_reinit_error=True)
    DataContext.get_current().execution_no_progress_timeout_s = config.ray.no_progress_timeout
    progress(f"crawl: {num_rows} URLs in {num_shards} shards")
    crawl(config.crawl, run_dir.url_list, run_dir.shards, distributor="ray")
    progress(f"crawl: done in {time.perf_counter() - start:.0f} s")
    ran = run_segments(run_dir.work, run_dir.shards, run_dir.url_list, stage_plan(config), partial(execute, config))
    return run_dir.finish(num_rows, time.perf_counter() - start,
                          {"shard_work": ran["shard_work"], "ray_stats": "\n".join(ran["engine"]),
                           "crawl_passes": crawl_passes(run_dir.shards)})


def execute(config: PipelineConfig, stages: list[MapStage], names: list[str], shards: list[int], source: ShardSource,
            out: ShardRows, tally: Tally) -> str:
    """One segment on Ray Data: the shards' rows through its stages to their files; the driver gets only the
    (shard, rows) each write returns, and marks a shard done as soon as its last rows are written."""
    ds = ray.data.from_items([{"shard_id": i} for i in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(ShardReader(source), batch_size=1, batch_format="numpy")
    for stage in stages:
        ds = apply_on_ray(ds, stage)
    ds = ds.map_batches(ShardWriter(out), batch_format="pyarrow", batch_size=None)
    try:
        for written in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            tally.add(written)
    except ExecutionTimeoutError:
        raise UserError(no_progress_sentence(config, names)) from None
    return ds.stats()


def no_progress_sentence(config: PipelineConfig, stages: list[str]) -> str:
    waits = (f"; generate waits on the teacher at {config.teacher.base_url}: check that it answers, or raise "
             f"ray.no_progress_timeout if it is only slow") if "generate" in stages else ""
    return (f"Ray Data made no progress for {config.ray.no_progress_timeout:.0f} s (no batch handed out) in the "
            f"stages {', '.join(stages)}{waits}.")


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    exit_on_user_error(lambda: run(parse_config(args)))


if __name__ == "__main__":
    main()
