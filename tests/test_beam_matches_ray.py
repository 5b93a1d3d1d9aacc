"""Beam runs the same stage callables as Ray: on the same crawled shards it keeps the same uids,
drops the rest for the same reasons and publishes the same instruction records."""
from __future__ import annotations

import pyarrow.parquet as pq

from infra.demo import world_overrides
from pipelines.build_instruct_beam import run
from schemas.config import load_config
from tests.conftest import REPO, read_dir


def test_beam_on_ray_shards_gives_same_uids_and_reasons(demo_run, tmp_path):
    ray_final = demo_run["final"]
    overrides = [o for o in demo_run["overrides"] if not o.startswith("output_root=")]
    overrides += [f"output_root={tmp_path}", *world_overrides(demo_run["world"])]
    config = load_config(REPO / "configs" / "sample.yaml", overrides)
    manifest = run(config, [], shards_from=ray_final / "shards")
    beam_final = tmp_path / config.name / manifest["version"]

    assert manifest["engine"] == "beam"
    ray_kept = {r["uid"] for r in read_dir(ray_final / "records", ["uid"])}
    beam_kept = {r["uid"] for r in read_dir(beam_final / "records", ["uid"])}
    assert beam_kept == ray_kept and len(ray_kept) >= 8  # every image gets probes; generate.max_images=10 only limits the teacher
    assert manifest["counts"]["stages"] == demo_run["manifest"]["counts"]["stages"]
    ray_dropped = {r["uid"]: r["reason"] for r in read_dir(ray_final / "dropped", ["uid", "reason"])}
    beam_dropped = {r["uid"]: r["reason"] for r in read_dir(beam_final / "dropped", ["uid", "reason"])}
    assert beam_dropped == ray_dropped
    # Both engines write the same dropped/ columns, without the image bytes
    columns = [{name for path in (final / "dropped").glob("*.parquet") for name in pq.read_schema(path).names}
               for final in (ray_final, beam_final)]
    assert columns[0] == columns[1] and "image" not in columns[0] and {"uid", "stage", "reason"} <= columns[0]
    assert manifest["counts"]["stages"]["dedup"]["kept"] > 250
    # The teacher is deterministic (seeded requests), so both engines publish the same LLaVA records.
    for split in ("train", "validation"):
        assert (beam_final / "llava" / f"{split}.json").read_bytes() == (ray_final / "llava" / f"{split}.json").read_bytes()

