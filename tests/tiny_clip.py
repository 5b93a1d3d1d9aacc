"""A tiny open_clip model built in-process (no downloads): hidden size 32, one block, 32 px images."""
from __future__ import annotations

import json
from pathlib import Path

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip(directory: Path, name: str = "tiny_clip", seed: int = 0) -> tuple[Path, Path]:
    """Writes `<name>.json` and a random-weight `<name>.pt`; returns (config path, checkpoint path)."""
    import open_clip
    import torch

    config = directory / f"{name}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(str(config))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    checkpoint = directory / f"{name}.pt"
    torch.save(model.state_dict(), checkpoint)
    return config, checkpoint
