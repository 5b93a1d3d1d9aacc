"""Resume per shard and stage: a Ray run and a Beam run, each killed (`kill -9` of the process group) after some
but not all shards of a stage segment were written, re-run only that unfinished shard x segment work (and the
segments after it), and publish byte for byte what an uninterrupted run publishes.

Real parts: a rendered sample world served over HTTP and crawled by img2dataset, a real `ray start --head`, the
pipeline as its own process. The teacher is `infra.fake_teacher` (a real HTTP server with schema-valid,
seeded answers and a fixed latency), so that the generate stage is slow enough to be caught half done; and the
CLIP is the sample CLIP's architecture with a wider 224-pixel image tower (seeded random weights, ~0.15 s per
forward of 3 images on one core, once per crop scale), so that the first segment too takes long enough per
shard to be caught half done: with the sample CLIP all 6 shards could be written within one poll of the test."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.fake_teacher import FakeTeacher
from infra.sample_world import render_world
from infra.world_server import WorldServer
from tests.conftest import REPO

SHARDS, PER_SHARD = 6, 3
ENGINES = {"ray": "pipelines/build_instruct.py", "beam": "pipelines/build_instruct_beam.py"}
PUBLISHED = ("hf", "llava", "trl_sft", "trl_dpo", "llamafactory")


def slow_clip(folder: Path) -> dict[str, Path]:
    """A checkpoint + JSON config (clip.pretrained / clip.config_path) of an open_clip model slower per image."""
    import open_clip
    import torch

    config = json.loads((REPO / "infra" / "clip" / "sample_clip.json").read_text())
    config["vision_cfg"].update(image_size=224, layers=6, width=384, head_width=64)
    paths = {"config": folder / "resume_clip.json", "weights": folder / "resume_clip.pt"}
    paths["config"].write_text(json.dumps(config))
    open_clip.add_model_config(str(paths["config"]))
    torch.manual_seed(0)
    torch.save(open_clip.create_model("resume_clip").state_dict(), paths["weights"])
    return paths


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """18 rendered images behind a real HTTP server, a URL list of them, their COCO instances and a CLIP."""
    folder = tmp_path_factory.mktemp("resume_world")
    render_world(folder, SHARDS * PER_SHARD, 0, seed=11, workers=1)
    clip = slow_clip(folder)
    captions = json.loads((folder / "annotations" / "captions_train.json").read_text())
    images = json.loads((folder / "annotations" / "instances_train.json").read_text())["images"]
    first: dict[int, str] = {}
    for caption in captions["annotations"]:
        first.setdefault(caption["image_id"], caption["caption"])
    with WorldServer(folder) as server, FakeTeacher(latency=0.3) as teacher:
        urls = [f"{server.base_url}/images/train/{image['file_name']}" for image in images]
        pq.write_table(pa.table({"url": urls, "caption": [first[image["id"]] for image in images]}),
                       folder / "urls.parquet")
        yield {"folder": folder, "urls": urls, "teacher": teacher.base_url, "clip": clip}


@pytest.fixture(scope="module")
def ray_head():
    from infra.local_cluster import start_head, stop_head

    started = start_head()
    yield
    if started:
        stop_head()


def command(engine: str, world: dict, out: Path) -> list[str]:
    folder = world["folder"]
    overrides = [f"output_root={out}", f"crawl.url_list={folder / 'urls.parquet'}", f"crawl.shard_size={PER_SHARD}",
                 "crawl.processes=1", "clip.mode=threshold", "clip.threshold=-1",  # every image reaches generate
                 "clip.model=resume_clip", f"clip.pretrained={world['clip']['weights']}",
                 f"clip.config_path={world['clip']['config']}", "clip.batch_size=3",
                 f"objects.annotations=[{folder / 'annotations' / 'instances_train.json'}]",
                 "eval_guard.folders=[]", "eval_guard.coco=[]", "eval_guard.crawled=[]", "evaluate.ground_truth=[]",
                 "evaluate.noise_manifest=null", "teacher.kind=openai", f"teacher.base_url={world['teacher']}",
                 "teacher.model=fake-teacher", "teacher.concurrency=1", f"teacher.cache_dir={out / 'cache'}",
                 # Batches no larger than a shard (as with real shards of thousands of rows), so shards finish
                 # one after another rather than all in one batch
                 "validate.batch_size=3", "generate.batch_size=3", "generate.max_images=null", "name=resume"]
    return [sys.executable, ENGINES[engine], "--config", "configs/sample.yaml",
            *[a for o in overrides for a in ("--set", o)]]


# Where a segment's rows are written (README: resume): the first segment's own folder, the last one's records/ and dropped/.
WRITTEN = {"first": ("stages/0-validate",), "last": ("records", "dropped")}


def written_uids(partial: Path, segment: str) -> set[str]:
    """The uids in a segment's written files, read as any parquet reader would."""
    files = [f for folder in WRITTEN[segment] for f in (partial / folder).glob("*.parquet")]
    return {uid for f in files for uid in pq.read_table(f, columns=["uid"]).column("uid").to_pylist()}


def complete_shards(world: dict, uids: set[str]) -> int:
    """Shards (URL list rows in threes) whose every row is written; the pipeline's uid is sha1(url)[:16]."""
    shard_uids = [{hashlib.sha1(u.encode()).hexdigest()[:16] for u in world["urls"][i:i + PER_SHARD]}
                  for i in range(0, len(world["urls"]), PER_SHARD)]
    return sum(shard <= uids for shard in shard_uids)


def published(final: Path) -> dict[str, bytes]:
    return {str(f.relative_to(final)): f.read_bytes() for name in PUBLISHED
            for f in sorted((final / name).rglob("*")) if f.is_file()}


def run_killed_then_resumed(engine: str, segment: str, world: dict, out: Path) -> tuple[int, dict, Path]:
    """Starts the run, kills its process group once 1..SHARDS-1 shards of the segment are written, waits
    until nothing more is written, re-runs it; returns (shards complete at the kill, manifest, final dir)."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    first = subprocess.Popen(command(engine, world, out), cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline, complete, seen = time.monotonic() + 400, 0, set()
    partial = None
    while time.monotonic() < deadline and first.poll() is None:
        partial = next((out / "resume").glob("*.partial"), None)
        complete = complete_shards(world, written_uids(partial, segment)) if partial else 0
        seen.add(complete)
        if 1 <= complete < SHARDS:
            break
        time.sleep(0.1)
    if not 1 <= complete < SHARDS:
        with contextlib.suppress(ProcessLookupError):  # the run may have finished, its group gone
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        if segment == "first" and SHARDS in seen:
            # Seen on clean clones (CI): Ray wrote the first segment's shards together, between two polls, so
            # there was no moment to kill it half done. Not a pass: reported as a skip with what was seen.
            pytest.skip(f"the first segment went from {sorted(seen - {SHARDS})} to all {SHARDS} shards written "
                        f"between two polls; no half-done moment to kill")
    assert 1 <= complete < SHARDS, f"not caught half done: {complete} shards written (seen {sorted(seen)})"
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    settled, before = time.monotonic(), written_uids(partial, segment)
    while time.monotonic() - settled < 5:  # a Ray worker may finish a write the dead driver asked for
        time.sleep(0.5)
        now = written_uids(partial, segment)
        if now != before:
            settled, before = time.monotonic(), now
    complete = complete_shards(world, before)

    second = subprocess.run(command(engine, world, out), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    manifest_path, = (out / "resume").glob("v-*/manifest.json")
    return complete, json.loads(manifest_path.read_text()), manifest_path.parent


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory):
    """engine -> what an uninterrupted run of it publishes (run once per engine). The engines agree on every
    record, but a CLIP score may differ in its last bit between them: Ray hands a stage Ray's size-bounded
    pieces of a shard, Beam the whole shard, so their batches can differ."""
    runs: dict[str, dict[str, bytes]] = {}

    def get(engine: str) -> dict[str, bytes]:
        if engine not in runs:
            runs[engine] = uninterrupted_run(engine, world, tmp_path_factory.mktemp(f"uninterrupted_{engine}"))
        return runs[engine]
    return get


def uninterrupted_run(engine: str, world: dict, out: Path) -> dict[str, bytes]:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    done = subprocess.run(command(engine, world, out), cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest_path, = (out / "resume").glob("v-*/manifest.json")
    manifest = json.loads(manifest_path.read_text())
    assert all(work["ran"] == SHARDS for work in manifest["shard_work"].values())
    return published(manifest_path.parent)


@pytest.mark.parametrize("engine, segment", [("beam", "last"), ("ray", "last"), ("ray", "first")])
def test_a_killed_run_reruns_only_unfinished_shards_and_publishes_the_same_bytes(engine, segment, world, uninterrupted,
                                                                                   tmp_path, request):
    """Killed in the last segment (probes -> generate -> verify), or on Ray in the first (validate -> CLIP), where
    a resumed run must still score every image in the same batch as an uninterrupted run does."""
    if engine == "ray":
        request.getfixturevalue("ray_head")
    complete, manifest, final = run_killed_then_resumed(engine, segment, world, tmp_path / "killed")
    reference = uninterrupted(engine)
    work = manifest["shard_work"]
    names = list(work)
    assert names[0] == "validate" and names[-1] == "probes" and len(names) >= 3, names
    killed = names[-1] if segment == "last" else names[0]
    for name in names:
        before, after = names.index(name) < names.index(killed), names.index(name) > names.index(killed)
        if before:  # finished before the kill: nothing of it ran again
            assert work[name]["ran"] == 0 and work[name]["reused"] == SHARDS, work
        elif after:  # not started at the kill: every shard ran
            assert work[name]["ran"] == SHARDS and work[name]["reused"] == 0, work
    assert work[killed]["ran"] == SHARDS - complete and work[killed]["reused"] == complete, (complete, work)
    assert manifest["counts"]["accounted"] and manifest["counts"]["input_urls"] == SHARDS * PER_SHARD
    files = published(final)
    assert files and files.keys() == reference.keys()
    assert [name for name in files if files[name] != reference[name]] == []
    assert not (final / "stages").exists()  # a finished version keeps records/ and dropped/, not the segments


def test_a_global_fit_reads_the_live_rows_as_arrays_in_uid_order_however_the_shards_were_written(tmp_path):
    """What a fit gets from the files a segment's writer (`ShardRows.write`) wrote: the live rows only, in uid
    order whatever the shards and batches, the embedding matrix as one float32 array that the column wraps (the
    fit's only copy of it), and a typed empty table when nothing is live."""
    import numpy as np

    from pipelines.batches import records_to_table
    from pipelines.segments import ShardRows
    from pipelines.stage_fits import embedding_matrix, read_fit_columns
    from schemas.records import ImageRecord

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((40, 6)).astype(np.float32)
    records = [ImageRecord(uid=f"u{i:02d}", url=f"http://x/{i}", shard=i % 4, clip_score=i / 40,
                           dedup_embedding=vectors[i].tobytes(), embedding=vectors[i].tolist())
               for i in range(40)]
    records = [r.dropped("clip_filter", "low_clip_score:0.1") if i % 5 == 0 else r for i, r in enumerate(records)]
    live = [i for i in range(40) if i % 5]
    tables = []
    for cut, order in (("one batch", list(range(40))), ("shuffled batches", rng.permutation(40).tolist())):
        out = ShardRows(tmp_path / cut.replace(" ", "_"))
        for start in range(0, 40, 7 if cut != "one batch" else 40):
            out.write(records_to_table([records[i] for i in order[start:start + 7 if cut != "one batch" else 40]]))
        table = read_fit_columns(out.files(), ["uid", "dedup_embedding", "clip_score"])
        assert table.column("uid").to_pylist() == [f"u{i:02d}" for i in live], cut
        matrix = embedding_matrix(table, "dedup_embedding")
        assert np.array_equal(matrix, vectors[live]) and np.shares_memory(matrix, embedding_matrix(table, "dedup_embedding"))
        lists = read_fit_columns(out.files(), ["uid", "embedding"])
        assert np.array_equal(embedding_matrix(lists, "embedding"), vectors[live])
        tables.append(table)
    assert tables[0].equals(tables[1])
    empty = read_fit_columns([], ["uid", "dedup_embedding"])
    assert empty.num_rows == 0 and empty.schema.field("dedup_embedding").type == tables[0].schema.field("dedup_embedding").type
