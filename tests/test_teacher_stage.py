"""The generate stage on Ray Data against a served model (the fake one in infra/fake_teacher.py, which stands
in for vLLM / OpenAI: no model can be downloaded here): batches leave as they are done, so a slow teacher
never trips Ray Data's no-progress watchdog, and requests stay in flight across batch boundaries.

Input rows are the demo run's own published records (the real producer's output), reset to what the generate
stage receives, in one block, as a real crawl's shard arrives."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from infra.fake_teacher import FakeTeacher
from schemas.records import KEEP
from tests.conftest import REPO, read_dir


@pytest.fixture(scope="module")
def ray_head():
    """A real local head (`ray start --head`), started here unless one is up, stopped if started here."""
    import ray

    from infra.local_cluster import start_head, stop_head

    started = start_head()  # the driver's loopback setting comes from conftest, before Ray is imported
    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()
    if started:
        stop_head()


def generate_input(demo_run, copies: int = 1) -> pa.Table:
    """The demo's kept records as the generate stage gets them: probes in, every image picked for the teacher,
    nothing generated yet; `copies` > 1 repeats them under new uids."""
    from pipelines.batches import RECORD_SCHEMA

    rows = read_dir(demo_run["final"] / "records", RECORD_SCHEMA.names)
    rows = [{**row, "uid": f"{row['uid']}-{copy}" if copy else row["uid"], "teacher_selected": True,
             "instructions": None, "rejected_turns": None, "teacher_usage": None}
            for copy in range(copies) for row in rows]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def generate_on_ray(table: pa.Table, base_url: str, cache_dir, *overrides: str) -> pa.Table:
    """The pipeline's own generate stage, as pipelines/build_instruct.py applies it, over one input block."""
    import ray

    from pipelines.build_instruct import apply_on_ray
    from pipelines.stages import stage_plan
    from schemas.config import load_config

    config = load_config(REPO / "configs" / "sample.yaml", [
        "teacher.kind=openai", f"teacher.base_url={base_url}", "teacher.model=fake-teacher", "teacher.max_retries=0",
        f"teacher.cache_dir={cache_dir}", "objects.annotations=[]", *overrides])
    ray.data.DataContext.get_current().execution_no_progress_timeout_s = config.ray.no_progress_timeout
    generate = next(stage for stage in stage_plan(config) if stage.name == "generate")
    return pa.concat_tables(ray.get(apply_on_ray(ray.data.from_arrow(table), generate).to_arrow_refs()))


def by_uid(table: pa.Table) -> dict[str, tuple]:
    return {r["uid"]: (r["status"], r["reason"], r["instructions"])
            for r in table.select(["uid", "status", "reason", "instructions"]).to_pylist()}


def test_a_block_slower_than_the_watchdog_finishes_with_the_same_data(demo_run, ray_head, tmp_path):
    """One block takes longer than the no-progress timeout (20 s here), each batch much less: the run
    finishes, with what a fast teacher gives."""
    table = generate_input(demo_run)
    with FakeTeacher(latency=0.0) as fast:
        expected = by_uid(generate_on_ray(table, fast.base_url, tmp_path / "fast"))
    requests = fast.requests
    latency = 0.6  # requests / concurrency 4 x 0.6 s: the whole block well over 20 s, a batch of 16 under 10 s
    assert requests / 4 * latency > 40, requests
    with FakeTeacher(latency=latency) as slow:
        got = by_uid(generate_on_ray(table, slow.base_url, tmp_path / "slow", "ray.no_progress_timeout=20"))
    assert slow.requests == requests
    assert got == expected and len(got) == table.num_rows
    assert all(status == KEEP and instructions for status, _, instructions in got.values())  # nothing dropped


def test_requests_stay_in_flight_across_batches(demo_run, ray_head, tmp_path):
    """400 records, concurrency 64, one actor, 0.2 s a request: the server sees at least 60 at once."""
    table = generate_input(demo_run, copies=-(-400 // demo_run["manifest"]["counts"]["kept"]))[:400]
    with FakeTeacher(latency=0.2) as teacher:
        out = generate_on_ray(table, teacher.base_url, tmp_path / "cache", "teacher.concurrency=64")
    assert out.num_rows == 400 and pc.all(pc.equal(out.column("status"), KEEP)).as_py()
    assert teacher.peak_in_flight >= 60, teacher.peak_in_flight
    assert json.loads(out.column("teacher_usage")[0].as_py())["failed"] == 0


def test_a_teacher_that_answers_nothing_still_trips_the_watchdog(demo_run, ray_head, tmp_path):
    """The watchdog stays on: a teacher that answers nothing ends the run after the timeout, and the job says
    so in one sentence naming the stage and the teacher."""
    from ray.data.exceptions import ExecutionTimeoutError

    from pipelines.build_instruct import no_progress_sentence
    from schemas.config import load_config

    with FakeTeacher(latency=600) as stuck, pytest.raises(ExecutionTimeoutError):
        generate_on_ray(generate_input(demo_run)[:32], stuck.base_url, tmp_path / "cache", "teacher.timeout=900",
                        "ray.no_progress_timeout=15")
    assert stuck.requests > 0
    config = load_config(REPO / "configs" / "sample.yaml", ["teacher.kind=openai", "teacher.base_url=http://t/v1",
                                                            "ray.no_progress_timeout=15"])
    sentence = no_progress_sentence(config, ["probes", "generate", "verify"])
    assert sentence.endswith(".") and sentence.count(". ") == 0 and "15 s" in sentence
    assert "generate waits on the teacher at http://t/v1" in sentence
