"""ClipScorer and ClipScoreFilter with a tiny in-process open_clip model; loader errors."""
from __future__ import annotations

import io
from functools import partial

import numpy as np
import pytest
from PIL import Image

from filters import clip_loader
from filters.clip_preprocess import ClipPreprocessor
from filters.clip_scorer import ClipScoreFilter, ClipScorer, fit_clip_threshold
from filters.dedup import DuplicateFilter
from pipelines.batches import StageBatches, records_to_table, score_columns
from schemas.config import ClipConfig, DedupConfig
from schemas.errors import UserError
from schemas.records import ImageRecord
from tests.tiny_clip import write_tiny_clip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    config_path, checkpoint = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return ClipConfig(model="tiny_clip", config_path=str(config_path), pretrained=str(checkpoint), batch_size=3)


def jpeg(color: str, size=(48, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def records(n: int) -> list[ImageRecord]:
    colors = ["red", "green", "blue", "white", "black", "yellow", "purple"]
    return [ImageRecord(uid=f"u{i}", url=f"http://x/{i}.jpg", caption=f"a {colors[i % 7]} square",
                        image=jpeg(colors[i % 7])) for i in range(n)]


def test_scorer_annotates_every_record_with_cosine_and_unit_embedding(tiny):
    scorer = ClipScorer(tiny)
    result = scorer(records(7))  # 7 with batch_size 3: a partial last batch
    assert len(result.kept) == 7 and not result.dropped
    emb = np.array([r.embedding for r in result.kept])
    assert emb.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    scores = np.array([r.clip_score for r in result.kept])
    assert np.all((scores >= -1.0) & (scores <= 1.0))
    texts = scorer.embed_texts([r.caption for r in result.kept])
    np.testing.assert_allclose(scores, (emb * texts).sum(1), atol=1e-5)


def test_scores_do_not_depend_on_batch_size(tiny):
    one = ClipScorer(tiny.model_copy(update={"batch_size": 1}))([*records(4)])
    many = ClipScorer(tiny.model_copy(update={"batch_size": 64}))([*records(4)])
    np.testing.assert_allclose([r.clip_score for r in one.kept], [r.clip_score for r in many.kept], atol=1e-5)


def test_batched_preprocess_equals_open_clips_own_bit_for_bit(tiny):
    import torch

    scorer = ClipScorer(tiny)
    images = [Image.open(io.BytesIO(jpeg(c, size))).convert("RGB")
              for c, size in [("red", (48, 40)), ("blue", (17, 90)), ("white", (200, 33)), ("green", (24, 24))]]
    own = torch.stack([scorer.clip.preprocess(im) for im in images])
    assert torch.equal(scorer.preprocess(images), own)


def test_patch_token_dedup_embedding_is_unit_and_cleared_once_dedup_ran(tiny):
    dedup = DedupConfig(embedding="clip_and_patch_tokens", crop_scales=[1.0, 0.8])
    result = ClipScorer(tiny, dedup=dedup)(records(4))
    grid = ClipScorer(tiny).clip.model.visual.grid_size  # tokens per side
    width = ClipScorer(tiny).clip.model.visual.transformer.width
    emb = np.array([np.frombuffer(r.dedup_embedding, np.float32) for r in result.kept])
    assert emb.shape == (4, 32 + grid[0] * grid[1] * width)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # The CLIP embedding and score are those of the full image, whatever dedup asks for.
    plain = ClipScorer(tiny)(records(4))
    np.testing.assert_allclose([r.clip_score for r in result.kept], [r.clip_score for r in plain.kept], atol=1e-6)
    assert all(r.dedup_embedding is None for r in plain.kept)  # dedup.embedding=clip: nothing extra stored
    after = DuplicateFilter({})(result.kept)
    assert len(after.kept) == 4 and all(r.dedup_embedding is None for r in after.kept)


def test_preprocessor_then_scorer_equals_the_scorer_alone(tiny):
    dedup = DedupConfig(embedding="clip_and_patch_tokens", crop_scales=[1.0, 0.9])
    broken = ImageRecord(uid="bad", url="http://x/bad.jpg", caption="c", image=b"not an image")
    prepared = ClipPreprocessor(tiny, dedup=dedup)(records(5) + [broken])
    assert [r.reason for r in prepared.dropped] == ["decode_error:UnidentifiedImageError"]
    assert all(len(r.pixels) == 2 * 32 * 32 * 3 and r.tokens for r in prepared.kept)  # 2 views of 32 x 32
    split = ClipScorer(tiny, dedup=dedup)(prepared.kept)
    alone = ClipScorer(tiny, dedup=dedup)(records(5))
    assert [r.uid for r in split.kept] == [r.uid for r in alone.kept]
    np.testing.assert_allclose([r.clip_score for r in split.kept], [r.clip_score for r in alone.kept], atol=1e-6)
    np.testing.assert_allclose([np.frombuffer(r.dedup_embedding, np.float32) for r in split.kept],
                               [np.frombuffer(r.dedup_embedding, np.float32) for r in alone.kept], atol=1e-6)
    assert all(r.pixels is None and r.tokens is None for r in split.kept)  # not carried past the CLIP stage


def test_ray_arrow_batches_are_scored_as_columns_with_the_record_paths_result(tiny):
    # Both engines hand the scorer Arrow batches (often slices of a bigger table); it scores their columns
    # without building records, and takes the record path for a batch the column path cannot score (a row
    # without pixels). Both paths must write the same table.
    dedup = DedupConfig(embedding="clip_and_patch_tokens", crop_scales=[1.0, 0.9])
    broken = ImageRecord(uid="bad", url="http://x/bad.jpg", caption="c", image=b"not an image")
    prepared = ClipPreprocessor(tiny, dedup=dedup)(records(6) + [broken])
    table = records_to_table(prepared.kept + prepared.dropped).slice(1)  # 5 live rows, 1 dropped, offset 1
    batches = StageBatches("clip_score", partial(ClipScorer, tiny, dedup=dedup), arrow=score_columns)
    batches.setup()
    assert score_columns(batches.stage, table) is not None  # the column path is the one taken
    by_columns = batches(table)
    by_records = StageBatches("clip_score", partial(ClipScorer, tiny, dedup=dedup))(table)  # records, every field
    assert by_columns.equals(by_records)
    assert by_columns.column("uid").to_pylist() == [f"u{i}" for i in range(1, 6)] + ["bad"]
    assert by_columns.column("pixels").null_count == 6 and by_columns.column("clip_score").null_count == 1


def test_crop_scales_outside_the_image_are_refused():
    with pytest.raises(ValueError, match="crop_scales"):
        DedupConfig(crop_scales=[1.0, 0.2])


def scored(scores) -> list[ImageRecord]:
    return [ImageRecord(uid=f"u{i:03d}", url="http://x", caption="c", clip_score=s) for i, s in enumerate(scores)]


def test_threshold_mode_drops_below_with_reason():
    config = ClipConfig(mode="threshold", threshold=0.28)
    threshold = fit_clip_threshold(config, np.array([0.1, 0.9]))
    result = ClipScoreFilter(threshold)(scored([0.1, 0.28, 0.5, 0.27]))
    assert [r.clip_score for r in result.kept] == [0.28, 0.5]
    assert {r.reason for r in result.dropped} == {"clip_score_below:0.2800"}
    assert all(r.stage == "clip_filter" for r in result.dropped)


def test_only_top_fraction_gathers_scores_before_filtering():
    """A fixed threshold filters batch by batch (no engine materializes the data for it); top_fraction needs
    every score first, so it is the one global clip_filter."""
    from pipelines.batches import apply_stage
    from pipelines.stages import GlobalStage, MapStage, stage_plan
    from schemas.config import load_config
    from tests.conftest import REPO

    def clip_filter(mode: str):
        config = load_config(str(REPO / "configs" / "sample.yaml"), [f"clip.mode={mode}", "clip.threshold=0.3"])
        return next(stage for stage in stage_plan(config) if stage.name == "clip_filter")

    plain = clip_filter("threshold")
    assert isinstance(plain, MapStage)
    out = apply_stage(plain.factory(), scored([0.2, 0.3, 0.4]))
    assert [(r.clip_score, r.reason) for r in out] == [(0.3, None), (0.4, None), (0.2, "clip_score_below:0.3000")]
    assert isinstance(clip_filter("top_fraction"), GlobalStage)


def test_top_fraction_mode_keeps_the_best_share_across_batches():
    scores = np.random.default_rng(0).normal(0.3, 0.05, 1000)
    threshold = fit_clip_threshold(ClipConfig(mode="top_fraction", keep_fraction=0.3), scores)
    batches = [scored(scores[i:i + 128]) for i in range(0, 1000, 128)]  # the fit is global, the apply per batch
    kept = [r.clip_score for b in batches for r in ClipScoreFilter(threshold)(b).kept]
    assert len(kept) == 300
    assert min(kept) >= np.sort(scores)[-300] - 1e-12


def test_unknown_model_name_is_one_sentence():
    with pytest.raises(UserError, match="Unknown open_clip model 'ViT-Nope'"):
        clip_loader.resolve_weights(ClipConfig(model="ViT-Nope", config_path=None, pretrained=None))


def test_missing_checkpoint_is_one_sentence(tiny, tmp_path):
    bad = tiny.model_copy(update={"pretrained": str(tmp_path / "gone.pt")})
    with pytest.raises(UserError, match="checkpoint .*gone.pt does not exist"):
        clip_loader.load_clip(bad)


def test_mismatched_model_and_config_is_one_sentence(tiny):
    with pytest.raises(UserError, match="does not match clip.config_path"):
        clip_loader.resolve_weights(tiny.model_copy(update={"model": "ViT-B-32"}))


def test_pretrained_tag_needing_a_download_offline(monkeypatch):
    # Test double: this machine has no internet, but CI elsewhere might; pin "offline" explicitly.
    monkeypatch.setattr(clip_loader, "_hub_reachable", lambda host="huggingface.co": False)
    with pytest.raises(UserError, match="cannot be downloaded offline"):
        clip_loader.resolve_weights(ClipConfig(model="ViT-B-32", config_path=None, pretrained="laion2b_s34b_b79k"))
    with pytest.raises(UserError, match="has no pretrained tag 'nope'"):
        clip_loader.resolve_weights(ClipConfig(model="ViT-B-32", config_path=None, pretrained="nope"))
