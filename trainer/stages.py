"""Training stages as data: a StageSpec names what trains, how samples are rendered and the default lr.

    align     (LLaVA Stage 1): the projector learns to map CLIP patches into the LM; captions, `plain` rendering.
    finetune  (LLaVA Stage 2): projector + LM (fully, or through LoRA adapters); instructions, chat template.

The vision tower never trains. `apply_stage` freezes everything, unfreezes the spec's modules, and
returns the table of what trains, which the run prints and saves.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from schemas.errors import UserError
from trainer.config import TrainConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    trains: tuple[str, ...]  # VLM submodules that train
    render: Literal["plain", "chat"]  # ConversationEncoder format
    lr: float
    lora_lr: float | None  # when the LM trains through LoRA adapters
    data: str  # what the stage expects to read


STAGES = {
    # LLaVA-1.5 pretrain: lr 1e-3 on the projector alone, blip_laion_cc_sbu_558k captions.
    "align": StageSpec("align", ("projector",), "plain", 1e-3, None, "image-caption pairs (LLaVA 558k style)"),
    # LLaVA-1.5 finetune: lr 2e-5 full; its LoRA recipe uses 2e-4.
    "finetune": StageSpec("finetune", ("projector", "language_model"), "chat", 2e-5, 2e-4,
                          "instruction conversations (llava_instruct_150k style)"),
}


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise UserError(f"Unknown stage {name!r}; use one of {', '.join(STAGES)}.")
    return STAGES[name]


def learning_rate(spec: StageSpec, config: TrainConfig) -> float:
    if config.lr is not None:
        return config.lr
    return spec.lora_lr if config.lora and spec.lora_lr else spec.lr


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder blocks (`model.layers` in Llama, Qwen, Mistral, SmolLM ...)."""
    layers = getattr(getattr(language_model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(language_model).__name__} has no model.layers stack, which lm_layers needs; "
                        f"drop lm_layers to train the whole language model.")
    return layers


def top_layers(language_model: nn.Module, n: int | None) -> list[int]:
    """Indices of the top n decoder blocks (all of them when n is None)."""
    depth = len(decoder_layers(language_model)) if n is not None else 0
    if n is not None and n > depth:
        raise UserError(f"lm_layers={n} but the language model has {depth} decoder blocks; use 1..{depth}.")
    return list(range(depth - n, depth)) if n is not None else []


def wrap_lora(language_model: nn.Module, config: TrainConfig) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UserError("lora=true needs the peft package; pip install peft.") from None
    layers = top_layers(language_model, config.lm_layers) or None
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM",  # all-linear: LLaVA's LoRA targets
                      layers_to_transform=layers)
    return get_peft_model(language_model, lora)


def train_top_layers(language_model: nn.Module, n: int) -> None:
    """Only the top n decoder blocks and the final norm train. With the projector frozen too (freeze), the
    backward pass stops below them and the frozen blocks cost a forward pass only; while the projector trains,
    gradients still pass through every block."""
    language_model.requires_grad_(False)
    layers = decoder_layers(language_model)
    for index in top_layers(language_model, n):
        layers[index].requires_grad_(True)
    norm = getattr(language_model.model, "norm", None)
    if norm is not None:
        norm.requires_grad_(True)


def apply_stage(vlm: nn.Module, spec: StageSpec, config: TrainConfig) -> list[dict]:
    """Freezes all, then unfreezes `spec.trains` (the LM through LoRA when config.lora); returns the table."""
    if config.lora and "language_model" not in spec.trains:
        raise UserError(f"lora=true applies to a stage that trains the language model, and {spec.name} does not; "
                        f"drop lora or use --stage finetune.")
    vlm.requires_grad_(False)
    if config.gradient_checkpointing:  # non-reentrant: works when the LM's own inputs need no grad (LoRA)
        lm, kwargs = vlm.language_model, {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # the transformers 5.x name
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    unknown = set(config.freeze) - set(spec.trains)
    if unknown:
        raise UserError(f"freeze names {', '.join(sorted(unknown))}, which the {spec.name} stage does not train; "
                        f"it trains {', '.join(spec.trains)}.")
    for name in (n for n in spec.trains if n not in config.freeze):
        if name == "language_model" and config.lora:
            vlm.language_model = wrap_lora(vlm.language_model, config)  # peft leaves only adapters trainable
        elif name == "language_model" and config.lm_layers is not None:
            train_top_layers(vlm.language_model, config.lm_layers)
        else:
            getattr(vlm, name).requires_grad_(True)
    return module_table(vlm)


def module_table(vlm: nn.Module) -> list[dict]:
    """One row per top-level module (LoRA adapters as their own row): trainable and frozen parameter counts."""
    rows = []
    for name, module in vlm.named_children():
        params = dict(module.named_parameters())
        adapters = {k: p for k, p in params.items() if "lora_" in k}
        for label, group in ((name, {k: p for k, p in params.items() if k not in adapters}),
                             (f"{name}.lora_adapters", adapters)):
            if group or label == name:
                trainable = sum(p.numel() for p in group.values() if p.requires_grad)
                total = sum(p.numel() for p in group.values())
                rows.append({"module": label, "trains": trainable > 0, "trainable_params": trainable,
                             "frozen_params": total - trainable})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'module':34s} {'status':8s} {'trainable':>12s} {'frozen':>12s}"]
    lines += [f"{r['module']:34s} {'TRAINS' if r['trains'] else 'frozen':8s} {r['trainable_params']:12,d} "
              f"{r['frozen_params']:12,d}" for r in rows]
    return "\n".join(lines)
