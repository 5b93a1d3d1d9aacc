"""Build a VLM from a config, and save / load what a run trains.

A checkpoint is `<out>/checkpoints/step-<N>/` holding:
    config.yaml          the resolved TrainConfig (its `model` section is the architecture)
    modules.json         which modules trained and which were frozen
    projector.safetensors
    lm/                  full LM weights + tokenizer (only when the LM trained fully)
    adapter/             LoRA adapters (only when the LM trained through LoRA)
    trainer_state.pt     step, samples seen, optimizer, scheduler, RNG states: enough to resume mid-stage
It is written under a temporary name and renamed, so a listed checkpoint is always whole.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from schemas.errors import UserError
from trainer.config import ModelConfig, TrainConfig, load_saved_config, save_config
from trainer.language_model import add_image_token, load_language_model, resolve_language_model
from trainer.vision_tower import VisionTower
from trainer.vlm import VisionLanguageModel

CHECKPOINTS = "checkpoints"


def build_vlm(model: ModelConfig, checkpoint: Path | None = None) -> VisionLanguageModel:
    """Vision tower + projector (fresh) + LM — the checkpoint's full LM weights when it has them."""
    if checkpoint is not None and (checkpoint / "lm").is_dir():
        source = resolve_language_model(str(checkpoint / "lm"))
    else:
        source = resolve_language_model(model.lm, model.gguf_file)  # checked before any weights load
    vision = VisionTower.from_config(model.vision, model.vision_select_layer)
    language_model, tokenizer = load_language_model(source)
    image_token_id = add_image_token(language_model, tokenizer)
    return VisionLanguageModel(vision, language_model, tokenizer, image_token_id, model.projector)


def checkpoints_in(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    found = [p for p in folder.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest one in a run's --out folder."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "projector.safetensors").is_file():
        return path
    found = checkpoints_in(path)
    if not found:
        raise UserError(f"No checkpoint in {path}; pass --init a checkpoint folder or the --out of a finished run.")
    return found[-1]


def saved_config(checkpoint: Path) -> TrainConfig:
    return load_saved_config(checkpoint / "config.yaml")


def check_architecture(checkpoint: Path, model: ModelConfig) -> None:
    saved = saved_config(checkpoint).model.architecture()
    for key, value in model.architecture().items():
        if saved.get(key) != value:
            raise UserError(f"Checkpoint {checkpoint} was trained with model.{key}={saved.get(key)!r} but this run "
                            f"builds model.{key}={value!r}; set model.{key}={saved.get(key)} or start from another checkpoint.")


def load_weights(vlm: VisionLanguageModel, checkpoint: Path, lora: bool) -> None:
    """Projector (+ LoRA adapters) into a VLM built by build_vlm(checkpoint=...) and wrapped by its stage."""
    try:
        vlm.projector.load_state_dict(load_file(checkpoint / "projector.safetensors"))
    except RuntimeError as err:
        why = str(err).strip().splitlines()[-1].strip()[:120]
        raise UserError(f"Projector weights in {checkpoint} do not fit this model ({why}); "
                        f"start from a checkpoint of the same architecture.") from None
    adapter = checkpoint / "adapter" / "adapter_model.safetensors"
    if adapter.is_file():
        if not lora:
            raise UserError(f"Checkpoint {checkpoint} holds LoRA adapters; set lora=true to continue them.")
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(vlm.language_model, load_file(adapter))


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _under(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def save_checkpoint(out: Path, vlm: VisionLanguageModel, config: TrainConfig, modules: list[dict],
                    trainer_state: dict, weights: dict[str, torch.Tensor] | None = None) -> Path:
    """`weights`: the VLM's state dict with whole tensors (gathered from the workers of a sharded run);
    default the VLM's own."""
    weights = vlm.state_dict() if weights is None else weights
    final = out / CHECKPOINTS / f"step-{trainer_state['step']:06d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_config(config, tmp / "config.yaml")
    (tmp / "modules.json").write_text(json.dumps(modules, indent=1))
    save_file({k: v.detach().cpu().contiguous() for k, v in _under(weights, "projector.").items()},
              tmp / "projector.safetensors")
    lm, lm_weights = vlm.language_model, _under(weights, "language_model.")
    if hasattr(lm, "peft_config"):
        # adapters only: the resized embeddings are frozen and rebuilt deterministically (add_image_token)
        lm.save_pretrained(tmp / "adapter", save_embedding_layers=False, state_dict=lm_weights)
    elif any(p.requires_grad for p in lm.parameters()):
        lm.save_pretrained(tmp / "lm", state_dict=lm_weights)
        vlm.tokenizer.save_pretrained(tmp / "lm")
    torch.save({**trainer_state, "rng": rng_states()}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)


def prune_checkpoints(out: Path, keep: int) -> None:
    for old in checkpoints_in(out)[:-keep]:
        shutil.rmtree(old)


def load_vlm(checkpoint: str | Path, device: str = "cpu") -> VisionLanguageModel:
    """A trained VLM for evaluation (POPE, QA): the checkpoint's own architecture and weights, in eval mode."""
    from trainer.stages import apply_stage, stage_spec

    checkpoint = find_checkpoint(checkpoint)
    config = saved_config(checkpoint)
    vlm = build_vlm(config.model, checkpoint)
    apply_stage(vlm, stage_spec(config.stage), config.model_copy(update={"gradient_checkpointing": False}))
    load_weights(vlm, checkpoint, config.lora)
    vlm.language_model.config.use_cache = True  # training turned the KV cache off, and a full LM saves that
    return vlm.requires_grad_(False).eval().to(device)
