"""The eval-leak guard: copies of held-out images (exact, re-encoded, cropped) are dropped naming the image they
copy, other images are kept; references come from a folder, a COCO instances file or a real img2dataset crawl;
a bad reference source is one sentence before anything is crawled. The shipped sample CLIP is used (it is part
of the repo, nothing is downloaded)."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from infra.sample_world import render_world
from infra.world_noise import EVAL_COPY_KINDS, eval_copy
from pipelines.references import check_references, load_references
from pipelines.batches import apply_stage, records_to_table
from pipelines.stage_fits import fit_eval_guard, guard_embeddings, reference_index
from pipelines.stages import stage_plan
from schemas.config import load_config
from schemas.errors import UserError
from schemas.records import ImageRecord
from tests.conftest import REPO, read_dir
from tests.test_bad_input import assert_one_sentence_failure, run_beam


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 40-image world with 12 held-out images, rendered the way the demo's is."""
    path = tmp_path_factory.mktemp("guard") / "world"
    render_world(path, 40, 12, seed=3)
    return path


def config_for(*extra: str, **guard):
    """configs/sample.yaml with only the given reference sources (its default, data/world's held-out images, off)."""
    overrides = [f"eval_guard.{k}={json.dumps(v)}" for k, v in {"folders": [], **guard}.items()]
    return load_config(str(REPO / "configs" / "sample.yaml"), [*overrides, *extra])


def crawled_records(config, images: dict[str, bytes]) -> list:
    """Records as the pipeline has them when the guard runs: img2dataset's sha256 of the bytes, then validate and
    both CLIP halves."""
    records = [ImageRecord(uid=uid, url=f"http://example.com/{uid}", caption="a photo of things", image=data,
                           sha256=hashlib.sha256(data).hexdigest()) for uid, data in images.items()]
    return guard_embeddings(config, records).kept


def guard_reasons(config, records) -> dict[str, str]:
    guard = next(stage for stage in stage_plan(config) if stage.name == "eval_guard")
    return fit_eval_guard(config, records_to_table(records).select(guard.columns))


@pytest.mark.parametrize("dedup", ["true", "false"])
def test_copies_of_held_out_images_are_dropped_naming_their_image(world, dedup):
    # With dedup off, the guard still compares dedup's embedding (what eval_guard.eps is chosen for).
    config = config_for(f"dedup.enabled={dedup}", folders=[str(world / "images" / "val")])
    rng = np.random.default_rng(0)
    val = sorted((world / "images" / "val").glob("*.jpg"))
    images = {f"{how}-{p.name}": eval_copy(p.read_bytes(), how, rng) for p in val for how in EVAL_COPY_KINDS}
    images.update({f"train-{p.name}": p.read_bytes() for p in sorted((world / "images" / "train").glob("*.jpg"))})
    records = crawled_records(config, images)
    reasons = guard_reasons(config, records)
    guard = next(stage for stage in stage_plan(config) if stage.name == "eval_guard")
    kept = apply_stage(guard.apply(reasons), records)
    # the guard's embedding leaves with the records only for dedup to use (which clears it)
    assert all((r.dedup_embedding is None) == (dedup == "false") for r in kept if r.status == "ok")

    caught = {uid for uid, reason in reasons.items() if reason == f"eval_overlap:{uid.split('-', 1)[1]}"}
    copies = [uid for uid in images if not uid.startswith("train-")]
    assert len(caught) >= 0.95 * len(copies), sorted(set(copies) - caught)
    assert all(f"exact-{p.name}" in caught for p in val)  # the same bytes: always, by their hash
    assert set(reasons) <= set(copies)  # no training image is taken for a held-out one
    assert set(reasons) == caught  # and every removal names the image it copies


def test_references_from_coco_and_from_a_real_crawl(world, demo_run):
    coco = config_for(coco=[{"instances": str(world / "annotations" / "instances_val.json"),
                             "images": str(world / "images" / "val")}])
    problems = []
    ids = [ref.id for ref in load_references(coco.eval_guard, problems)]
    assert ids == sorted(p.name for p in (world / "images" / "val").glob("*.jpg")) and not problems

    # img2dataset's own output of the demo's crawl: every image it stored is a reference, and the demo's kept
    # records, which came from those shards, are all exact copies of one.
    shards = demo_run["final"] / "shards"
    crawled = config_for(crawled=[str(shards)])
    stats = [json.loads(p.read_text()) for p in shards.rglob("*_stats.json")]
    references = list(load_references(crawled.eval_guard, problems))
    assert len(references) == sum(s["successes"] for s in stats) and not problems
    # The records carry no hash here, so only their embeddings can find them among the crawled references.
    kept = read_dir(demo_run["final"] / "records", ["uid", "image"])[:40]
    records = crawled_records(crawled, {r["uid"]: r["image"] for r in kept})
    for record in records:
        record.sha256 = None
    assert len(records) == 40 and set(guard_reasons(crawled, records)) == {r.uid for r in records}


def test_unreadable_references_are_reported_not_fatal(world, tmp_path, capsys):
    folder = tmp_path / "refs"
    shutil.copytree(world / "images" / "val", folder)
    for name in ("a_broken.jpg", "b_broken.jpg"):  # sorted first: a whole chunk of 2 with nothing usable
        (folder / name).write_bytes(b"not an image")
    index = reference_index(config_for(folders=[str(folder)]), chunk=2)
    assert len(index.ids) == 12 and not {"a_broken.jpg", "b_broken.jpg"} & set(index.ids)
    assert "12 reference images; 2 left out, e.g. a_broken.jpg: decode_error" in capsys.readouterr().out

    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"^The eval-leak guard has no reference image \(1 could not be used, e.g. "
                                        r"x.jpg: decode_error"):
        reference_index(config_for(folders=[str(only_broken)]))


def test_bad_reference_sources_are_one_sentence(tmp_path, world):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.json").write_text("{not json")
    cases = [(f"eval_guard.folders=[{tmp_path / 'missing'}]", "Eval-guard folder", "does not exist"),
             (f"eval_guard.folders=[{tmp_path / 'empty'}]", "Eval-guard folder", "holds no image files"),
             (f"eval_guard.coco=[{{instances: {tmp_path / 'notes.json'}, images: {world / 'images' / 'val'}}}]",
              "Eval-guard COCO file", "cannot be read as COCO instances JSON"),
             (f"eval_guard.crawled=[{tmp_path / 'empty'}]", "Eval-guard crawl output", "holds no .tar shards")]
    for override, subject, fragment in cases:
        proc = run_beam(tmp_path, override, "crawl.preflight_hosts=0")
        assert_one_sentence_failure(proc, fragment, tmp_path)
        assert subject in proc.stderr
    with pytest.raises(UserError, match="is a directory"):
        check_references(config_for(coco=[{"instances": str(world), "images": str(world)}]).eval_guard)
