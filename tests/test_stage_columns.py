"""A stage sees only the columns it declares (`columns`; pipelines/batches.py: through_columns): the image bytes and
embeddings ride through the stages that do not read them as Arrow columns. What a user would notice if a
declaration were wrong: a stage reading a column it did not declare would see nothing there (and keep, drop or
write something else), one setting a column it did not declare would lose the value. So every stage of the sample
plan runs both ways on a real crawl shard of the demo run (with the real embedded teacher) and must give the
table the whole-row path gives; and a stage that sets an undeclared column fails with a sentence saying so."""
from __future__ import annotations

from functools import partial

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipelines.batches import StageBatches, records_to_table
from pipelines.segments import CrawlShards, segments
from pipelines.stage_fits import read_fit_columns
from pipelines.stages import stage_plan
from schemas.config import load_config
from schemas.records import KEEP, ImageRecord, StageResult


def test_every_stage_gives_the_whole_row_table_from_only_its_declared_columns(demo_run, embedded_teacher, tmp_path):
    final, _ = demo_run["final"], embedded_teacher
    config = load_config(final / "config.yaml")
    config.teacher.base_url, config.teacher.cache_dir = embedded_teacher[1], str(tmp_path / "teacher_cache")
    rows = CrawlShards(final / "shards", final / "urls.parquet").read(0)  # the Ray job's img2dataset shard 0
    checked = []
    for segment in segments(stage_plan(config)):
        fitted = None
        if segment.fit is not None:  # fitted on this shard's live rows, read as the engines read them
            pq.write_table(rows, tmp_path / f"{segment.name}.parquet")
            fitted = segment.fit.fit(read_fit_columns([tmp_path / f"{segment.name}.parquet"], segment.fit.columns))
        for stage in segment.with_fit(fitted):
            assert stage.columns is not None, f"{stage.name} declares no columns"
            whole = partial(StageBatches, stage.name, stage.factory, stage.batch_size)  # every field, no Arrow path
            if stage.name == "generate":  # fills the teacher cache, so both runs below read the same answers
                whole()(rows)
            expected = whole()(rows)
            got = StageBatches(stage.name, stage.factory, stage.batch_size, columns=stage.columns)(rows)
            assert got.schema.equals(expected.schema) and got.to_pylist() == expected.to_pylist(), stage.name
            checked.append((stage.name, pc.sum(pc.equal(expected.column("status"), KEEP)).as_py()))
            rows = expected
    names = [name for name, _ in checked]
    assert names[:3] == ["validate", "clip_preprocess", "clip_score"] and names[-2:] == ["generate", "verify"]
    assert {"dedup", "objects", "probes"} <= set(names) and checked[-1][1] > 0  # some rows made it to the end


class SetsWidth:
    """Declares the caption only, but also sets the width."""

    name = "sets_width"
    columns = ("caption",)

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        return StageResult(kept=[r.model_copy(update={"width": 7}) for r in records])


def test_a_stage_setting_a_column_it_did_not_declare_fails_with_a_sentence_not_a_lost_value():
    rows = records_to_table([ImageRecord(uid=f"{i}", url=f"http://example.com/{i}.jpg", caption="c") for i in range(3)])
    with pytest.raises(RuntimeError, match="sets_width set width of record 0, which its `columns` do not declare"):
        StageBatches("sets_width", SetsWidth, columns=SetsWidth.columns)(rows)
    assert StageBatches("sets_width", SetsWidth)(rows).column("width").to_pylist() == [7, 7, 7]  # undeclared: every field
