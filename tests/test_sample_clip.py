"""The shipped sample-world CLIP: it loads through plain open_clip with its JSON config, stays
small, and matches a rendered scene to its own caption rather than to another scene's."""

from pathlib import Path

import numpy as np
import pytest
import torch

from infra.sample_world import captions_for, plan_scene, render_scene

CLIP_DIR = Path(__file__).resolve().parents[1] / "infra" / "clip"
CONFIG, CHECKPOINT = CLIP_DIR / "sample_clip.json", CLIP_DIR / "sample_clip.pt"
SEED = 0  # the demo's world, which the CLIP was not trained on (it saw seed 1)


@pytest.fixture(scope="module")
def clip():
    open_clip = pytest.importorskip("open_clip")
    open_clip.add_model_config(CONFIG)
    model, _, preprocess = open_clip.create_model_and_transforms("sample_clip", pretrained=str(CHECKPOINT))
    return model.eval(), preprocess, open_clip.get_tokenizer("sample_clip")


def test_checkpoint_is_small_weights_only():
    assert CHECKPOINT.stat().st_size <= 30 * 2**20
    state = torch.load(CHECKPOINT, map_location="cpu", weights_only=True)
    assert "optimizer" not in state and "visual.conv1.weight" in state


def test_own_caption_beats_another_scenes_caption(clip):
    model, preprocess, tokenizer = clip
    rng = np.random.default_rng(0)
    layouts = [plan_scene(i, SEED) for i in range(1, 80)]
    images, own, foreign = [], [], []
    for layout in layouts[:20]:
        partner = next(o for o in layouts[20:] if o.scene != layout.scene)
        images.append(preprocess(render_scene(layout)))
        own.append(str(rng.choice(captions_for(layout, SEED))))
        foreign.append(str(rng.choice(captions_for(partner, SEED))))
    with torch.inference_mode():
        image_emb = torch.nn.functional.normalize(model.encode_image(torch.stack(images)), dim=-1)  # [20, D]
        own_emb = torch.nn.functional.normalize(model.encode_text(tokenizer(own)), dim=-1)  # [20, D]
        foreign_emb = torch.nn.functional.normalize(model.encode_text(tokenizer(foreign)), dim=-1)  # [20, D]
    own_cos, foreign_cos = (image_emb * own_emb).sum(-1), (image_emb * foreign_emb).sum(-1)  # [20]
    assert (own_cos > foreign_cos).sum() >= 18, list(zip(own, foreign, own_cos.tolist(), foreign_cos.tolist()))
    assert float((own_cos - foreign_cos).mean()) > 0.3  # the shipped model: ~0.5


def test_dedup_embedding_finds_a_cropped_copy_but_not_a_look_alike():
    """The sample config's dedup embedding (patch tokens over 3 crop scales) puts a near-duplicate
    (re-rendered with jitter, border-cropped, re-encoded) within 1 - eps of its original, and other
    images of the same scene type outside it."""
    import io

    from PIL import Image

    from filters.clip_scorer import ClipScorer
    from infra.world_noise import near_duplicate
    from schemas.config import load_config

    config = load_config(CLIP_DIR.parents[1] / "configs" / "sample.yaml")
    scorer = ClipScorer(config.clip.model_copy(update={"device": "cpu"}), dedup=config.dedup)
    rng = np.random.default_rng(3)
    layouts = [plan_scene(i, 5) for i in range(1, 200)]  # seed 5: a world no setting was chosen on
    originals = layouts[:12]
    copies = [Image.open(io.BytesIO(near_duplicate(layout, rng))).convert("RGB") for layout in originals]
    clip_emb, dedup_emb = scorer.embed_images_for_dedup([render_scene(layout) for layout in layouts] + copies)
    n = len(layouts)
    copy_cos = (dedup_emb[:12] * dedup_emb[n:]).sum(-1)  # [12]
    same_scene = np.array([[a.scene == b.scene and a is not b for b in layouts] for a in originals])  # [12, n]
    look_alike = np.where(same_scene, dedup_emb[:12] @ dedup_emb[:n].T, -1).max(axis=1)  # [12]
    assert (copy_cos >= 1 - config.dedup.eps).all(), copy_cos
    assert (look_alike < 1 - config.dedup.eps).all(), look_alike
    assert clip_emb.shape == (n + 12, 128) and dedup_emb.shape == (n + 12, 128 + 25 * 128)
