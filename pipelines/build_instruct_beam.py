"""The same stage list as an Apache Beam pipeline (DirectRunner here; Dataflow/Flink/Spark flags pass through).

    python pipelines/build_instruct_beam.py --config configs/sample.yaml
    python pipelines/build_instruct_beam.py --config configs/sample.yaml --shards-from outputs/sample/<version>/shards
    python pipelines/build_instruct_beam.py --config my.yaml -- --runner DataflowRunner --project P --region R ...

Without `--shards-from` it crawls with img2dataset's multiprocessing distributor first. Each segment of the
stage plan (`pipelines/segments.py`) is one Beam pipeline, whose global fit the launcher reads from the files the
segment before wrote; a killed run re-run resumes at the shards not done. Outputs are laid out exactly as the Ray job's.
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import apache_beam as beam

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` without an install

from pipelines.cli import parse_config, parser  # noqa: E402
from pipelines.crawl import crawl, crawl_passes  # noqa: E402
from pipelines.run import RunDirectory, run_version  # noqa: E402
from pipelines.segments import ShardRows, ShardSource, Tally, run_segments  # noqa: E402
from pipelines.stages import MapStage, stage_plan  # noqa: E402
from schemas.config import PipelineConfig  # noqa: E402
from schemas.errors import UserError, exit_on_user_error  # noqa: E402


class SegmentDoFn(beam.DoFn):
    """One segment over one shard at a time: the shard's rows through each stage, a batch at a time, then
    written to the shard's files, so a shard is done (and a killed run keeps it) as soon as its rows are.
    setup() builds every stage (and loads its model) once per worker; shards run side by side on workers."""

    def __init__(self, stages: list[MapStage], source: ShardSource, out: ShardRows):
        self.stages = [stage.batches() for stage in stages]
        self.source, self.out = source, out

    def setup(self):
        for batches in self.stages:
            batches.setup()

    def process(self, shard: int):
        rows = self.source.read(shard)
        for batches in self.stages:  # the batch function Ray's map_batches runs, on the shard's rows
            rows = batches(rows)
        yield self.out.write(rows).num_rows


def run(config: PipelineConfig, beam_args: list[str], shards_from: Path | None = None) -> dict:
    return run_version(config, "beam", lambda run_dir: _run(run_dir, beam_args, shards_from))


def _run(run_dir: RunDirectory, beam_args: list[str], shards_from: Path | None) -> dict:
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
    ran = run_segments(run_dir.work, shards, run_dir.url_list, stage_plan(config), partial(execute, beam_args))
    # The work directory is renamed when the run finishes: name where the shards will be, not where they were.
    kept_at = run_dir.final / "shards" if shards == run_dir.shards else shards
    return run_dir.finish(num_rows, time.perf_counter() - start, {"shard_work": ran["shard_work"], "shards": str(kept_at),
                                                                   "crawl_passes": crawl_passes(shards)})


def execute(beam_args: list[str], stages: list[MapStage], names: list[str], shards: list[int], source: ShardSource,
            out: ShardRows, tally: Tally) -> None:
    """One segment as one Beam pipeline over the shards to run. The runner does not stream the (shard, rows)
    counts back, so the skeleton marks the shards whose files are whole after it."""
    from apache_beam.options.pipeline_options import PipelineOptions

    with beam.Pipeline(options=PipelineOptions(beam_args)) as pipeline:
        _ = pipeline | "Shards" >> beam.Create(shards) | "Segment" >> beam.ParDo(SegmentDoFn(stages, source, out))


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--shards-from", type=Path, default=None, help="reuse img2dataset shards crawled by an earlier run")
    args, beam_args = p.parse_known_args(argv)
    beam_args = [a for a in beam_args if a != "--"]
    exit_on_user_error(lambda: run(parse_config(args), beam_args, args.shards_from))


if __name__ == "__main__":
    main()
