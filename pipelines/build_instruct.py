"""The Ray job: crawl the URL list with img2dataset, then run the stage list on Ray Data.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python pipelines/build_instruct.py --config configs/sample.yaml

Writes `<output_root>/<name>/<version>/` with `records/` (kept rows, images included),
`dropped/` (every dropped row with its stage and reason), `config.yaml` and `manifest.json`.
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
from ray.data.expressions import col

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` without an install

from pipelines.cli import parse_config, parser  # noqa: E402
from pipelines.crawl import crawl, crawl_passes, read_shard  # noqa: E402
from pipelines.run import RunDirectory, run_version  # noqa: E402
from pipelines.url_list import shard_count_for  # noqa: E402
from pipelines.batches import DROPPED_SCHEMA, RECORD_SCHEMA, StageBatches, records_to_table  # noqa: E402
from pipelines.stages import GlobalStage, MapStage, stage_plan  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import UserError, exit_on_user_error  # noqa: E402
from schemas.records import KEEP  # noqa: E402


class ShardReader:
    """Ray Data batch function: shard ids in, that shard's record rows out."""

    def __init__(self, shards: Path, url_list: Path):
        self.shards, self.url_list = shards, url_list

    def __call__(self, batch: dict) -> pa.Table:
        tables = [records_to_table(read_shard(self.shards, int(i), self.url_list)) for i in batch["shard_id"]]
        return pa.concat_tables(tables)


def progress(message: str) -> None:
    """One line per step of the job; `make demo` shows these lines and keeps Ray's own log in a file."""
    print(f"[pipeline] {message}", flush=True)


def apply_on_ray(ds: ray.data.Dataset, stage: MapStage | GlobalStage) -> ray.data.Dataset:
    if isinstance(stage, GlobalStage):  # fit on the driver over the live rows' columns, then apply per batch
        started = time.perf_counter()
        ds = ds.materialize()
        live = ds.filter(expr=col("status") == KEEP).select_columns(stage.columns).to_arrow_refs()
        table = pa.concat_tables([ray.get(ref) for ref in live]) if live else RECORD_SCHEMA.empty_table()
        fitted = stage.fit(table.select(stage.columns))
        progress(f"{stage.name}: fit over {table.num_rows} live rows; the stages before it took "
                 f"{time.perf_counter() - started:.0f} s")
        return ds.map_batches(StageBatches(stage.name, partial(stage.apply, fitted)), batch_format="pyarrow",
                              batch_size=stage.batch_size)
    batch_size = stage.batch_size
    if stage.uses_model:  # an actor pool: each actor loads the model (or opens the client) once
        calls = stage.concurrent_batches
        if calls > 1:  # one batch per block: a batch's output leaves when it is done, not with its whole block
            ds = ds.repartition(target_num_rows_per_block=batch_size)
        pool = ActorPoolStrategy(size=stage.num_actors, max_tasks_in_flight_per_actor=calls,
                                 max_concurrent_calls_per_actor=calls, enable_true_multi_threading=calls > 1)
        return ds.map_batches(StageBatches, fn_constructor_args=(stage.name, stage.factory), batch_format="pyarrow",
                              batch_size=batch_size, compute=pool, num_gpus=stage.num_gpus)
    return ds.map_batches(StageBatches(stage.name, stage.factory), batch_format="pyarrow", batch_size=batch_size)


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

    ds = ray.data.from_items([{"shard_id": i} for i in range(num_shards)], override_num_blocks=num_shards)
    ds = ds.map_batches(ShardReader(run_dir.shards, run_dir.url_list), batch_size=1, batch_format="numpy")
    running = ["read"]  # the stages the next execution runs (a global stage's fit executes those before it)
    try:
        for stage in stage_plan(config):
            if not isinstance(stage, GlobalStage):
                running.append(stage.name)
            ds = apply_on_ray(ds, stage)
            if isinstance(stage, GlobalStage):
                running = [stage.name]
        ds = ds.materialize()
    except ExecutionTimeoutError:
        raise UserError(no_progress_sentence(config, running)) from None
    progress(f"all stages done in {time.perf_counter() - start:.0f} s; writing records/ and dropped/")
    ds.filter(expr=col("status") == KEEP).write_parquet(str(run_dir.work / "records"))
    ds.filter(expr=col("status") != KEEP).select_columns(DROPPED_SCHEMA.names).write_parquet(str(run_dir.work / "dropped"))

    return run_dir.finish(num_rows, time.perf_counter() - start,
                          {"ray_stats": ds.stats(), "crawl_passes": crawl_passes(run_dir.shards)})


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
