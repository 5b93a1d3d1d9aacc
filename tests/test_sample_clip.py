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
