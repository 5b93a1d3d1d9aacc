"""The trainer tests' tiny in-process VLM parts: a word-level tokenizer with its own chat template, a 1-block
Llama (hidden 32) and the 32 px tiny CLIP, saved to a temporary folder with a LLaVA JSON of 0, 1 and 2 images
per sample (`tiny`); helpers to encode and collate conversations for it. No downloads, CPU only."""
from __future__ import annotations

import json
import random

import pytest
import torch
from PIL import Image

from schemas.config import ClipConfig
from tests.tiny_clip import write_tiny_clip

WORDS = ("a photo of red cat dog on the mat two birds what color is sky blue and grass green describe "
         "image there are animals how many").split()
SPECIALS = ["<unk>", "<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(SPECIALS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """ModelConfig of tiny parts on disk, plus a LLaVA JSON with 0, 1 and 2 images per sample."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import ModelConfig

    base = tmp_path_factory.mktemp("tiny")
    clip_json, clip_pt = write_tiny_clip(base)
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                      intermediate_size=64, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id, max_position_embeddings=256))
    lm.save_pretrained(base / "lm")
    tokenizer.save_pretrained(base / "lm")
    images = base / "images"
    images.mkdir()
    rng = random.Random(0)
    for i in range(6):
        Image.new("RGB", (40, 36), tuple(rng.randrange(256) for _ in range(3))).save(images / f"{i}.png")
    rows = []
    for i in range(12):
        turns = [{"from": "human", "value": "<image>\nwhat color is the sky"}, {"from": "gpt", "value": "blue"},
                 {"from": "human", "value": "and the grass"}, {"from": "gpt", "value": "green"}]
        row = {"id": f"s{i}", "image": f"{i % 6}.png", "conversations": turns}
        if i % 4 == 1:  # text only
            row.pop("image")
            turns[0]["value"] = "what color is the sky"
        if i % 4 == 2:  # two images
            row["image"] = [f"{i % 6}.png", f"{(i + 1) % 6}.png"]
            turns[0]["value"] = "<image> <image>\nhow many animals"
        rows.append(row)
    (base / "data.json").write_text(json.dumps(rows))
    vision = ClipConfig(model="tiny_clip", pretrained=str(clip_pt), config_path=str(clip_json), device="cpu")
    return {"model": ModelConfig(vision=vision, lm=str(base / "lm")), "data": base / "data.json", "images": images,
            "base": base}


def train_config(tiny, out, **fields):
    from trainer.config import TrainConfig

    defaults = {"stage": "finetune", "out": str(out), "model": tiny["model"], "data": str(tiny["data"]),
                "image_folder": str(tiny["images"]), "batch_size": 3, "max_steps": 6, "save_every": 3, "device": "cpu"}
    return TrainConfig(**{**defaults, **fields})


@pytest.fixture(scope="module")
def vlm(tiny):
    from trainer.checkpoint import build_vlm

    return build_vlm(tiny["model"])


def encoder(vlm, fmt="chat", max_length=512):
    from trainer.conversation import ConversationEncoder

    return ConversationEncoder(vlm.tokenizer, vlm.image_token_id, vlm.num_patches, fmt, max_length)


def batch_of(vlm, samples, fmt="chat"):
    """samples: (conversations, number of images) pairs -> a collated batch with random pixels."""
    from trainer.data import Collate

    enc = encoder(vlm, fmt)
    size = vlm.vision_tower.image_size
    items = [{**vars(e), "pixel_values": [torch.randn(3, *size) for _ in range(e.num_images)]}
             for e in (enc.encode(c, n) for c, n in samples)]
    return Collate(vlm.tokenizer.pad_token_id, size)(items)


def one_sentence(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and message.endswith(".") and message.count(". ") == 0, message
    return message
