"""A small CLIP trained on the sample world with open_clip's own trainer; see infra/clip/README.md.

No pretrained CLIP can be downloaded here, so this is the pipeline's default CLIP for the
caption-match filter and near-duplicate removal (`clip.model`, `clip.pretrained` and
`clip.config_path` of configs/sample.yaml point here). Plain open_clip loads it:

    open_clip.add_model_config("infra/clip/sample_clip.json")
    model, _, preprocess = open_clip.create_model_and_transforms("sample_clip", pretrained="infra/clip/sample_clip.pt")
"""

from __future__ import annotations

from pathlib import Path

CLIP_DIR = Path(__file__).resolve().parent
MODEL_NAME = "sample_clip"  # open_clip names a registered config after its file stem
CONFIG_PATH = CLIP_DIR / f"{MODEL_NAME}.json"
CHECKPOINT_PATH = CLIP_DIR / f"{MODEL_NAME}.pt"  # state_dict only, fp16 (loads into an fp32 model)


def register_config() -> None:
    import open_clip
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)

