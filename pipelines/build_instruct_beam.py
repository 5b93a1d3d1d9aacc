"""The same stage list as an Apache Beam pipeline (DirectRunner here; Dataflow/Flink/Spark flags pass through).

    python pipelines/build_instruct_beam.py --config configs/sample.yaml
    python pipelines/build_instruct_beam.py --config configs/sample.yaml --shards-from outputs/sample/<version>/shards
    python pipelines/build_instruct_beam.py --config my.yaml -- --runner DataflowRunner --project P --region R ...

Without `--shards-from` it crawls with img2dataset's multiprocessing distributor first.
Outputs are laid out exactly as the Ray job's.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import apache_beam as beam
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` without an install

from pipelines.cli import parse_config, parser  # noqa: E402
from pipelines.crawl import crawl, crawl_passes, read_shard  # noqa: E402
from pipelines.run import RunDirectory, run_version  # noqa: E402
from pipelines.batches import DROPPED_SCHEMA, RECORD_SCHEMA, StageBatches  # noqa: E402
from pipelines.stages import GlobalStage, MapStage, stage_plan  # noqa: E402
from pipelines.url_list import shard_count_for  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import UserError, exit_on_user_error  # noqa: E402
from schemas.records import KEEP  # noqa: E402


class StageDoFn(beam.DoFn):
    """One stage over batches of rows; setup() builds it (and loads its model) once per worker."""

    def __init__(self, batches: StageBatches):
        self.batches = batches

    def setup(self):
        self.batches.setup()

    def process(self, rows):
        for record in self.batches.run(rows):
            yield record.model_dump()


class FittedStageDoFn(beam.DoFn):
    """The apply half of a global stage; the fit arrives as a side input."""

    def __init__(self, stage: GlobalStage):
        self.stage, self.batches = stage, None

    def process(self, rows, fitted):
        if self.batches is None:
            self.batches = StageBatches(self.stage.name, partial(self.stage.apply, fitted))
        for record in self.batches.run(rows):
            yield record.model_dump()


class ColumnsCombineFn(beam.CombineFn):
    """A global stage's fit columns of every live row, combined into one Arrow table: each worker turns its rows
    into record batches of `chunk` rows as they come (no list of Python dicts for the whole dataset), partial
    results merge by concatenation, and the fit reads the columns as arrays. An empty input gives an empty
    table of the right types."""

    def __init__(self, columns: list[str], chunk: int = 4096):
        self.schema = pa.schema([RECORD_SCHEMA.field(c) for c in columns])
        self.chunk = chunk

    def create_accumulator(self) -> tuple[list[dict], list[pa.RecordBatch]]:
        return [], []

    def add_input(self, accumulator, row: dict):
        pending, batches = accumulator
        pending.append({name: row[name] for name in self.schema.names})
        if len(pending) >= self.chunk:
            return self.compact(accumulator)
        return accumulator

    def compact(self, accumulator):
        pending, batches = accumulator
        if pending:
            batches = [*batches, pa.RecordBatch.from_pylist(pending, self.schema)]
        return [], batches

    def merge_accumulators(self, accumulators):
        return [], [batch for accumulator in accumulators for batch in self.compact(accumulator)[1]]

    def extract_output(self, accumulator) -> pa.Table:
        return pa.Table.from_batches(self.compact(accumulator)[1], self.schema)


def apply_on_beam(rows, stage: MapStage | GlobalStage):
    size = stage.batch_size
    batched = rows | f"Batch {stage.name}" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
    if isinstance(stage, MapStage):
        return batched | f"Stage {stage.name}" >> beam.ParDo(StageDoFn(StageBatches(stage.name, stage.factory)))
    fitted = (  # the global half: one combine of the live rows' columns into an Arrow table, then a side input
        rows
        | f"Live {stage.name}" >> beam.Filter(lambda r: r["status"] == KEEP)
        | f"Columns {stage.name}" >> beam.CombineGlobally(ColumnsCombineFn(stage.columns))
        | f"Fit {stage.name}" >> beam.Map(stage.fit)
    )
    return batched | f"Apply {stage.name}" >> beam.ParDo(FittedStageDoFn(stage), beam.pvalue.AsSingleton(fitted))


def run(config: PipelineConfig, beam_args: list[str], shards_from: Path | None = None) -> dict:
    return run_version(config, "beam", lambda run_dir: _run(run_dir, beam_args, shards_from))


def _run(run_dir: RunDirectory, beam_args: list[str], shards_from: Path | None) -> dict:
    from apache_beam.options.pipeline_options import PipelineOptions

    config = run_dir.config
    start = time.perf_counter()
    num_rows = run_dir.prepare(probe_hosts=shards_from is None)  # reused shards need no host
    shards = run_dir.shards
    if shards_from is not None:
        shards = Path(shards_from).resolve()
        if not shards.is_dir():
            raise UserError(f"--shards-from {shards} is not a directory of img2dataset shards.")
    else:
        crawl(config.crawl, run_dir.url_list, shards, distributor="multiprocessing")

    if not any(a.startswith("--runner") for a in beam_args):
        beam_args = ["--runner", "DirectRunner", *beam_args]  # Prism, Beam's new default, downloads a binary
    url_list, records_dir, dropped_dir = run_dir.url_list, run_dir.work / "records", run_dir.work / "dropped"
    with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
        rows = (
            pipeline
            | "Shards" >> beam.Create(list(range(shard_count_for(num_rows, config.crawl.shard_size))))
            | "ReadShard" >> beam.FlatMap(lambda i: [r.model_dump() for r in read_shard(shards, i, url_list)])
        )
        for stage in stage_plan(config):
            rows = apply_on_beam(rows, stage)
        _ = (rows | "Kept" >> beam.Filter(lambda r: r["status"] == KEEP)
             | "WriteRecords" >> beam.io.WriteToParquet(str(records_dir / "part"), RECORD_SCHEMA, file_name_suffix=".parquet"))
        _ = (rows | "Dropped" >> beam.Filter(lambda r: r["status"] != KEEP)
             | "WithoutImage" >> beam.Map(lambda r: {k: r[k] for k in DROPPED_SCHEMA.names})
             | "WriteDropped" >> beam.io.WriteToParquet(str(dropped_dir / "part"), DROPPED_SCHEMA, file_name_suffix=".parquet"))

    # The work directory is renamed when the run finishes: name where the shards will be, not where they were.
    kept_at = run_dir.final / "shards" if shards == run_dir.shards else shards
    return run_dir.finish(num_rows, time.perf_counter() - start, {"shards": str(kept_at), "crawl_passes": crawl_passes(shards)})


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shards-from", type=Path, default=None, help="reuse img2dataset shards crawled by an earlier run")
    args, beam_args = p.parse_known_args(argv)
    beam_args = [a for a in beam_args if a != "--"]
    exit_on_user_error(lambda: run(parse_config(args), beam_args, args.shards_from))


if __name__ == "__main__":
    main()
