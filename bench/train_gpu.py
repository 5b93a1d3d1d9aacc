"""Model FLOPs utilisation (MFU) of the trainer on a GPU (issue 16), Stage 2 at a realistic size:

    python -m bench.train_gpu           # on a CUDA machine: saves bench/results/train_gpu.json (~5 min on an H100)
    python -m bench.train_gpu --quick   # smoke run on any device (a 2-layer model, 3 steps): prints, saves nothing

The model is built in-process with random weights, nothing downloaded: a ~1.1B-parameter Llama language
model (TinyLlama-1.1B's shapes: 22 layers, hidden 2048, MLP 5632, 32 heads, 4 KV heads) with the embedded
SmolLM2 tokenizer, and the sample CLIP's vision tower architecture at 384 px (576 patch tokens per image,
as LLaVA-1.5's 336 px / 14). Each sample is one image and one long answer: >= 1,024 tokens. It runs
through `Trainer` exactly as `pipelines/train.py` does (DataLoader workers, pinned memory, bf16 autocast,
SDPA attention, AdamW over fp32 master weights), Stage 2: the LM and projector train, the tower is frozen.

Model FLOPs per sample of T tokens (PaLM, appendix B; gradient checkpointing's recomputation is not counted):
6 x N_lm x T (forward + backward over the LM's parameters without the input embedding) + 12 x layers x hidden
x T^2 (attention scores and values), plus 2 x N_tower x 576 (the frozen tower, forward only) and
6 x N_projector x 576. MFU = those FLOPs per second / the device's peak dense bf16 FLOP/s (H100/H200 SXM:
989 TFLOP/s). The time is the sum of the trainer's own step seconds (batch loading included; each step
ends with the loss read back, which waits for the GPU) over the steps after the warm-up ones. No checkpoint
is written: 13 GB of weights and AdamW state would only measure the disk.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench import save_results
from trainer.config import ModelConfig, TrainConfig
from trainer.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train_gpu.json"
TARGET_MFU = 0.40
SAMPLE_CLIP = Path(__file__).resolve().parents[1] / "infra" / "clip" / "sample_clip.json"
# Peak dense bf16 FLOP/s by device name (vendor data sheets, without sparsity).
PEAK_BF16 = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}
FULL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4}
QUICK = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2}


def peak_flops(device_name: str) -> float | None:
    for name, flops in PEAK_BF16.items():  # the most specific name first (H100 PCIe before H100)
        if name in device_name:
            return flops
    return None


def build_language_model(folder: Path, shape: dict, tokenizer_dir: Path | None) -> int:
    """A random-weight Llama with the embedded tokenizer (or the one saved in `tokenizer_dir`), saved where
    `model.lm` can point; returns its parameters."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        from trainer.language_model import EMBEDDED_GGUF, embedded_gguf_dir

        tokenizer = AutoTokenizer.from_pretrained(embedded_gguf_dir(), gguf_file=EMBEDDED_GGUF)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # saved in bf16 (half the disk); the trainer loads fp32
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def tower_config(folder: Path, image_size: int) -> Path:
    """The sample CLIP's architecture at `image_size` px, as an open_clip JSON config (random weights)."""
    config = json.loads(SAMPLE_CLIP.read_text())
    config["vision_cfg"]["image_size"] = image_size
    path = folder / f"sample_clip_{image_size}.json"
    path.write_text(json.dumps(config))
    return path


def write_data(folder: Path, samples: int, answer_words: int) -> Path:
    """LLaVA JSON: `samples` rendered sample-world scenes, each with one answer of `answer_words` words."""
    from infra.sample_world import captions_for, plan_scene, render_scene

    rows = []
    for i in range(samples):
        layout = plan_scene(i + 1, seed=5)
        render_scene(layout).save(folder / f"{i}.jpg", quality=90)
        words = []
        while len(words) < answer_words:
            words += " ".join(captions_for(layout, i)).split()
        rows.append({"id": str(i), "image": f"{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image in detail."},
            {"from": "gpt", "value": " ".join(words[:answer_words])}]})
    path = folder / "data.json"
    path.write_text(json.dumps(rows))
    return path


def model_flops_per_sample(trainer: Trainer, tokens: float) -> float:
    vlm = trainer.vlm
    lm = vlm.language_model
    embedding = lm.get_input_embeddings().weight.numel()
    n_lm = sum(p.numel() for p in lm.parameters()) - embedding
    n_tower = sum(p.numel() for p in vlm.vision_tower.parameters())
    n_projector = sum(p.numel() for p in vlm.projector.parameters())
    layers, hidden, patches = lm.config.num_hidden_layers, lm.config.hidden_size, vlm.num_patches
    return (6 * n_lm * tokens + 12 * layers * hidden * tokens ** 2
            + 2 * n_tower * patches + 6 * n_projector * patches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run on any device: a 2-layer model, 3 steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--answer-words", type=int, default=420, help="words per answer: 576 image + >= 448 text tokens")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s, where the name is not known")
    p.add_argument("--tokenizer", type=Path, help="a saved tokenizer folder instead of the embedded GGUF's (a GPU "
                                                  "machine the 90 MB GGUF package cannot be carried to)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        raise SystemExit("bench.train_gpu measures a GPU and none is visible here; `--quick` runs the smoke test on the CPU.")
    device = "cuda" if cuda else "cpu"
    shape, image_size = (QUICK, 96) if args.quick else (FULL, 384)
    steps, warmup, batch = (3, 1, 2) if args.quick else (args.steps, args.warmup, args.batch_size)
    with tempfile.TemporaryDirectory(prefix="bench-train-gpu-") as tmp:
        tmp = Path(tmp)
        (tmp / "lm").mkdir(), (tmp / "data").mkdir()
        lm_params = build_language_model(tmp / "lm", shape, args.tokenizer)
        tower = tower_config(tmp, image_size)
        vision = {"model": tower.stem, "pretrained": None, "config_path": str(tower)}
        data = write_data(tmp / "data", batch * (steps + warmup), 60 if args.quick else args.answer_words)
        config = TrainConfig(stage="finetune", data=str(data), out=str(tmp / "run"), resume=False,
                             model=ModelConfig.model_validate({"vision": vision, "lm": str(tmp / "lm")}),
                             batch_size=batch, max_steps=steps + warmup, save_every=10**6, lr=1e-5,
                             precision="bf16", device=device, num_workers=min(4, os.cpu_count() or 1),
                             gradient_checkpointing=args.gradient_checkpointing, max_length=4096)
        trainer = Trainer(config, progress=False)
        trainer.save = lambda: None  # see the docstring: steps are measured, not checkpoint writes
        records = trainer.run()[warmup:]
        seconds = sum(r["seconds"] for r in records)
        tokens = sum(r["tokens"] for r in records)
        per_sample = tokens / (steps * batch)
        flops = model_flops_per_sample(trainer, per_sample) * steps * batch
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(name)
    mfu = flops / seconds / peak if peak else None
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": name, "quick": args.quick,
               "lm_parameters": lm_params, "lm_shape": shape, "image_size": image_size,
               "image_tokens": trainer.vlm.num_patches, "tokens_per_sample": per_sample, "batch_size": batch,
               "gradient_checkpointing": args.gradient_checkpointing, "timed_steps": steps, "seconds": seconds,
               "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
               "peak_bf16_tflops": peak / 1e12 if peak else None, "mfu": mfu, "target_mfu": TARGET_MFU,
               "target_met": mfu is not None and mfu >= TARGET_MFU,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    print(json.dumps(results, indent=1))
    if not args.quick:
        save_results(RESULTS, results)


if __name__ == "__main__":
    main()
