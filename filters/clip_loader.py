"""Load any open_clip model offline-safely: a built-in name + pretrained tag, an `hf-hub:` id,
or a local checkpoint with a JSON model config. Shared by the CLIP filter and the trainer's
vision tower. Mistakes a user can make end in one sentence (schemas.UserError).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.config import ClipConfig
from schemas.errors import UserError


@dataclass
class LoadedClip:
    model: Any  # open_clip.CLIP, in eval mode on `device`
    preprocess: Any  # PIL image -> tensor [3, H, W]
    tokenizer: Any  # list[str] -> LongTensor [N, context_length]
    device: str
    name: str


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"clip.device={requested} but no CUDA GPU is visible; use clip.device=auto or cpu.")
    return requested


def _hub_reachable(host: str = "huggingface.co") -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _cached_pretrained(model: str, tag: str) -> str | None:
    """Path of the tag's weights in the local Hugging Face cache, or None."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    cfg = open_clip.get_pretrained_cfg(model, tag)
    repo = (cfg.get("hf_hub") or "").rstrip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        if repo:
            path = try_to_load_from_cache(repo, filename)
            if isinstance(path, str):
                return path
    return None


def resolve_weights(config: ClipConfig) -> tuple[str, str | None]:
    """(model name, pretrained argument for open_clip) after checking that both exist here."""
    import open_clip

    name = config.model
    if config.config_path:
        cfg_path = Path(config.config_path)
        if not cfg_path.is_file():
            raise UserError(f"clip.config_path {cfg_path} does not exist; point it at the model's JSON config.")
        if name != cfg_path.stem:
            raise UserError(f"clip.model {name!r} does not match clip.config_path {cfg_path} (which defines "
                            f"{cfg_path.stem!r}); set clip.model={cfg_path.stem}, or clip.config_path=null for a built-in model.")
        open_clip.add_model_config(str(cfg_path))
    if name.startswith("hf-hub:"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name[len("hf-hub:"):], "open_clip_config.json"), str) and not _hub_reachable():
            raise UserError(f"{name} is not in the local Hugging Face cache and the hub is unreachable; "
                            f"download it where there is internet, or use a local checkpoint via clip.pretrained.")
        return name, None
    if name not in open_clip.list_models():
        raise UserError(f"Unknown open_clip model {name!r}; use a name from open_clip.list_models() (e.g. ViT-B-32), "
                        f"an hf-hub: id, or clip.config_path with a JSON config.")
    pretrained = config.pretrained
    if not pretrained:
        return name, None
    if Path(pretrained).suffix in (".pt", ".bin", ".safetensors", ".pth") or "/" in pretrained:
        if not Path(pretrained).is_file():
            raise UserError(f"CLIP checkpoint {pretrained} does not exist; set clip.pretrained to a checkpoint file or a pretrained tag.")
        return name, pretrained
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise UserError(f"{name} has no pretrained tag {pretrained!r}; known tags: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(name)[:6]) or 'none'}.")
    cached = _cached_pretrained(name, pretrained)
    if cached is None and not _hub_reachable():
        raise UserError(f"Weights {name}/{pretrained} are not on this machine and cannot be downloaded offline; "
                        f"fetch them where there is internet and set clip.pretrained to the checkpoint file.")
    return name, cached or pretrained


def load_clip(config: ClipConfig) -> LoadedClip:
    import open_clip

    name, pretrained = resolve_weights(config)
    device = pick_device(config.device)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    model.eval()
    return LoadedClip(model, preprocess, open_clip.get_tokenizer(name), device, name)
