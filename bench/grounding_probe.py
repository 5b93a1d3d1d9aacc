r"""Where the proof's grounding stalls (issue 11): does Stage 1 put the objects into the language model, and
can cheap Stage-2 variants read them? Each command saves its figures to bench/results/grounding_probe.json
under its name (replaced when rerun); checkpoints go to outputs/grounding_probe/<NAME>.

    python -m bench.grounding_probe align NAME [caption=0] [init=words] [max_steps=200]   # Stage 1 variants
    python -m bench.grounding_probe captions NAME [images=48]   # object precision / recall of its captions
    python -m bench.grounding_probe cached_top NAME --align ALIGN_NAME --version outputs/sample/<v> \
        [top=8] [epochs=3] [lr=2e-4] [images=50]

- `align`: Stage 1 exactly as the proof runs it (projector only, `plain` captions, 200 x 8, lr 1e-3, bf16),
  on caption number `caption` of each training image (0: the proof's, which names the scene and then the
  objects; 2: the sample world's object list, "A car, a person and a bus can be seen in the image.").
  `init=words` first fits the projector alone (no language model in the loop, seconds) so that, for each
  object an image's annotations name, some projected patch token points the way of the LM's own
  embedding of that word (max over patches, binary cross-entropy over the 64 categories), its norm the
  word embeddings' norm; Stage 1 then starts from it.
- `captions`: greedy captions (the `plain` prompt, 30 tokens) of the first `images` held-out images; an
  object counts as said when its category name (or plural) appears. Precision and recall over the
  annotated objects are what Stage 1 grounded: captions from the scene's priors name likely objects,
  not the ones there.
- `cached_top`: Stage 2 on the with-negatives arm of a published version with the projector and the
  bottom blocks frozen, so their output is computed once per record and cached; only the top `top`
  blocks (+ final norm) train, for `epochs` passes at `lr` (3% warmup, cosine), batch 8, the loss on
  answer tokens only. POPE (the eval's questions, `images` held-out images) is read from the logits of
  "Yes" vs "No" at the answer's first position. The point: several epochs at a third of a full step's cost.

One file of ~330 lines on purpose: an experiment kept so that it can be rerun (issue 11's record), whose three
probes share the proof's recipe, their helpers and one results file; nothing in the pipeline imports it.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bench.recipe_quick import value  # key=value arguments, as the recipe probes read them
from evals.pope import STRATEGIES, build_pope_questions, load_instances, objects_per_image

WORLD = Path("data/world")
OUT = Path("outputs/grounding_probe")
RESULTS = Path(__file__).resolve().parent / "results" / "grounding_probe.json"


def autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def caption_rows(index: int) -> list[dict]:
    """LLaVA `plain` rows: caption number `index` (by annotation id) of each training image."""
    data = json.loads((WORLD / "annotations" / "captions_train.json").read_text())
    captions = defaultdict(list)
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        captions[ann["image_id"]].append(ann["caption"])
    return [{"id": str(img["id"]), "image": img["file_name"],
             "conversations": [{"from": "human", "value": "<image>"},
                               {"from": "gpt", "value": captions[img["id"]][index]}]}
            for img in sorted(data["images"], key=lambda i: i["id"]) if len(captions[img["id"]]) > index]


def image_patches(vlm, split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(patch tokens [N, P, D_vision], presence [N, C], category names) of a split's images."""
    instances = load_instances(WORLD / "annotations" / f"instances_{split}.json")
    present = objects_per_image(instances)
    names = sorted(c["name"] for c in instances["categories"])
    images = sorted(instances["images"], key=lambda i: i["id"])
    pixels = []
    for img in images:
        with Image.open(WORLD / "images" / split / img["file_name"]) as im:
            pixels.append(vlm.vision_tower.preprocess(im.convert("RGB")))
    patches = torch.cat([vlm.vision_tower(torch.stack(pixels[i:i + 64])) for i in range(0, len(pixels), 64)])
    presence = torch.tensor([[n in present[img["id"]] for n in names] for img in images], dtype=torch.float)
    return patches, presence, names


def fit_projector_to_words(vlm, steps: int = 3000, lr: float = 1e-3) -> dict:
    """`init=words` (module docstring); returns the held-out balanced accuracy of its presence scores."""
    torch.manual_seed(0)
    patches, presence, names = image_patches(vlm, "train")
    val_patches, val_presence, _ = image_patches(vlm, "val")
    embeddings = vlm.language_model.get_input_embeddings().weight.detach()  # [V, D_lm]
    ids = [vlm.tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in names]
    words = F.normalize(torch.stack([embeddings[i].mean(0) for i in ids]), dim=1)  # [C, D_lm]
    word_norm = embeddings.norm(dim=1).mean()
    projector = vlm.projector
    scale, bias = torch.nn.Parameter(torch.tensor(10.0)), torch.nn.Parameter(torch.zeros(len(names)))
    optimizer = torch.optim.AdamW([*projector.parameters(), scale, bias], lr=lr)

    def scores(batch):
        tokens = projector(batch)  # [B, P, D_lm]
        similarity = F.normalize(tokens, dim=-1) @ words.T  # [B, P, C]
        return similarity.max(dim=1).values * scale + bias, tokens

    for _ in range(steps):
        pick = torch.randint(0, len(patches), (64,))
        logits, tokens = scores(patches[pick])
        loss = F.binary_cross_entropy_with_logits(logits, presence[pick])
        loss = loss + 0.1 * ((tokens.norm(dim=-1) / word_norm - 1) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        right = ((scores(val_patches)[0] > 0) == (val_presence > 0)).float()
    return {"steps": steps, "val_balanced_accuracy": round(float(0.5 * (right[val_presence > 0].mean()
                                                                        + right[val_presence == 0].mean())), 3)}


def align(name: str, fields: dict) -> dict:
    from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME
    from infra.proof import train as run_stage
    from schemas.config import ClipConfig
    from trainer.config import ModelConfig, TrainConfig
    from trainer.train import Trainer

    caption, init = fields.pop("caption", 0), fields.pop("init", None)
    data = OUT / f"captions{caption}.json"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(caption_rows(caption)))
    model = ModelConfig(vision=ClipConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH), config_path=str(CONFIG_PATH)))
    config = TrainConfig(stage="align", data=str(data), image_folder=str(WORLD / "images" / "train"), out=str(OUT / name),
                         model=model, device="cpu", resume=False, seed=0, keep_checkpoints=1, precision="bf16",
                         save_every=10**6, **{"max_steps": 200, "batch_size": 8, **fields})
    started, extra = time.perf_counter(), {}
    if init == "words":
        trainer = Trainer(config, progress=False)
        extra["words_init"] = fit_projector_to_words(trainer.vlm)  # the align stage already trains only the projector
        history = trainer.run()
        losses = [h["loss"] for h in history]
        summary = {"steps": len(history), "loss_first": sum(losses[:10]) / 10, "loss_last": sum(losses[-10:]) / 10}
    else:
        summary = run_stage(config, name)
    return {"caption": caption, "init": init, **extra, **{k: summary[k] for k in ("steps", "loss_first", "loss_last")},
            "seconds": round(time.perf_counter() - started)}


def captions(name: str, fields: dict) -> dict:
    from trainer.checkpoint import load_vlm
    from trainer.conversation import ConversationEncoder
    from trainer.data import Collate

    vlm = load_vlm(OUT / name if (OUT / name).exists() else name, "cpu")
    encoder = ConversationEncoder(vlm.tokenizer, vlm.image_token_id, vlm.num_patches, "plain", 4096)
    collate = Collate(vlm.tokenizer.eos_token_id, vlm.vision_tower.image_size, pad_left=True)
    instances = load_instances(WORLD / "annotations" / "instances_val.json")
    present, names = objects_per_image(instances), sorted(c["name"] for c in instances["categories"])
    images = sorted(instances["images"], key=lambda i: i["id"])[: fields.get("images", 48)]
    said_right = said_wrong = missed = 0
    examples = []
    for start in range(0, len(images), 16):
        chunk, samples = images[start:start + 16], []
        for img in chunk:
            with Image.open(WORLD / "images" / "val" / img["file_name"]) as im:
                pixels = vlm.vision_tower.preprocess(im.convert("RGB"))
            prompt = encoder.encode_prompt([{"from": "human", "value": "<image>"}], 1)
            samples.append({"input_ids": prompt.input_ids, "labels": prompt.labels, "pixel_values": [pixels]})
        batch = collate(samples)
        with autocast():
            new = vlm.generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=30,
                               do_sample=False)
        for img, text in zip(chunk, vlm.tokenizer.batch_decode(new, skip_special_tokens=True)):
            said = {n for n in names if re.search(rf"\b{re.escape(n)}s?\b", text, re.IGNORECASE)}
            have = present[img["id"]]
            said_right, said_wrong, missed = said_right + len(said & have), said_wrong + len(said - have), missed + len(have - said)
            if len(examples) < 5:
                examples.append({"objects": sorted(have), "caption": text.strip()})
    return {"images": len(images), "object_precision": round(said_right / max(1, said_right + said_wrong), 3),
            "object_recall": round(said_right / max(1, said_right + missed), 3), "examples": examples}


class TopBlocks:
    """The LM's decoder blocks [lo, hi) run by hand on hidden states (right-padded batches)."""

    def __init__(self, language_model):
        self.body = language_model.model

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        batch, length, _ = hidden.shape
        positions = torch.arange(length).unsqueeze(0).expand(batch, length)
        causal = create_causal_mask(config=self.body.config, inputs_embeds=hidden, attention_mask=mask,
                                    past_key_values=None, position_ids=positions)
        rotary = self.body.rotary_emb(hidden, positions)
        for block in self.body.layers[lo:hi]:
            hidden = block(hidden, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return hidden


def padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(r.shape[0] for r in rows)
    out = torch.zeros(len(rows), length, *rows[0].shape[1:], dtype=torch.float)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r.float(), 1
    return out, mask


def cached_top(name: str, fields: dict, align_name: str, version: Path) -> dict:
    from trainer.checkpoint import load_vlm
    from trainer.conversation import IGNORE, ConversationEncoder

    torch.manual_seed(0)
    top, epochs, lr, batch_size = fields.get("top", 8), fields.get("epochs", 3), fields.get("lr", 2e-4), 8
    vlm = load_vlm(OUT / align_name if (OUT / align_name).exists() else align_name, "cpu")
    lm, blocks = vlm.language_model, TopBlocks(vlm.language_model)
    depth = len(lm.model.layers)
    cut = depth - top
    encoder = ConversationEncoder(vlm.tokenizer, vlm.image_token_id, vlm.num_patches, "chat", 2048)

    def bottom(samples: list[tuple[list[int], torch.Tensor]]) -> list[torch.Tensor]:
        ids = torch.zeros(len(samples), max(len(i) for i, _ in samples), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, (i, _) in enumerate(samples):
            ids[j, : len(i)], mask[j, : len(i)] = torch.tensor(i), 1
        with torch.no_grad(), autocast():
            hidden = blocks(vlm.embed(ids, torch.stack([p for _, p in samples])), mask, 0, cut)
        return [hidden[j, : len(i)].to(torch.bfloat16) for j, (i, _) in enumerate(samples)]

    started = time.perf_counter()
    rows = json.loads((version / "arms" / "with_negatives" / "train.json").read_text())
    encoded = []
    for row in rows:
        with Image.open(version / "llava" / row["image"]) as im:
            pixels = vlm.vision_tower.preprocess(im.convert("RGB"))
        sample = encoder.encode(row["conversations"], 1)
        encoded.append((sample.input_ids, pixels, torch.tensor(sample.labels)))
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    cache: list = [None] * len(encoded)
    for start in range(0, len(by_length), 16):
        chunk = by_length[start:start + 16]
        for i, hidden in zip(chunk, bottom([encoded[i][:2] for i in chunk])):
            cache[i] = (hidden, encoded[i][2])
    cache_seconds = time.perf_counter() - started

    vlm.requires_grad_(False)
    trained = [p for block in lm.model.layers[cut:] for p in block.parameters()] + list(lm.model.norm.parameters())
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    steps = math.ceil(epochs * len(cache) / batch_size)
    warmup = max(1, math.ceil(0.03 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng, order, losses = random.Random(0), [], []
    started = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch_size:
            order += rng.sample(range(len(cache)), len(cache))
        pick, order = order[:batch_size], order[batch_size:]
        hidden, mask = padded([cache[i][0] for i in pick])
        labels = torch.full(mask.shape, IGNORE)
        for j, i in enumerate(pick):
            labels[j, : len(cache[i][1])] = cache[i][1]
        with autocast():
            out = lm.model.norm(blocks(hidden, mask, cut, depth))
            supervised = labels[:, 1:] != IGNORE
            loss = F.cross_entropy(lm.lm_head(out[:, :-1][supervised]).float(), labels[:, 1:][supervised])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    train_seconds = time.perf_counter() - started

    instances = load_instances(WORLD / "annotations" / "instances_val.json")
    yes_id, no_id = vlm.tokenizer.encode("Yes")[0], vlm.tokenizer.encode("No")[0]
    pixels_of: dict[str, torch.Tensor] = {}
    pope = {}
    for split in STRATEGIES:
        questions = build_pope_questions(instances, split, fields.get("images", 50), seed=0)
        right = said_yes = 0
        for start in range(0, len(questions), 16):
            chunk, samples = questions[start:start + 16], []
            for q in chunk:
                if q["image"] not in pixels_of:
                    with Image.open(WORLD / "images" / "val" / q["image"]) as im:
                        pixels_of[q["image"]] = vlm.vision_tower.preprocess(im.convert("RGB"))
                prompt = encoder.encode_prompt([{"from": "human", "value": "<image>\n" + q["text"]}], 1)
                samples.append((prompt.input_ids, pixels_of[q["image"]]))
            hidden, mask = padded(bottom(samples))
            with torch.no_grad(), autocast():
                out = lm.model.norm(blocks(hidden, mask, cut, depth))
                last = torch.stack([out[j, len(ids) - 1] for j, (ids, _) in enumerate(samples)])
                logits = lm.lm_head(last).float()
            for q, row in zip(chunk, logits):
                said = "yes" if row[yes_id] > row[no_id] else "no"
                said_yes, right = said_yes + (said == "yes"), right + (said == q["label"])
        pope[split] = {"accuracy": round(right / len(questions), 3), "yes_ratio": round(said_yes / len(questions), 3),
                       "questions": len(questions)}
    window = max(1, len(losses) // 10)
    return {"align": align_name, "version": str(version), "top": top, "epochs": epochs, "lr": lr, "steps": steps,
            "records": len(cache), "cache_seconds": round(cache_seconds), "train_seconds": round(train_seconds),
            "loss_first": sum(losses[:window]) / window, "loss_last": sum(losses[-window:]) / window, "pope": pope}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["align", "captions", "cached_top"])
    p.add_argument("name")
    p.add_argument("fields", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--align", default=None, help="cached_top: the Stage-1 run (a NAME here, or a checkpoint path)")
    p.add_argument("--version", default=None, help="cached_top: a published version with the proof's arms/")
    args = p.parse_args()
    fields = {k: value(v) for k, v in (a.split("=", 1) for a in args.fields)}
    if args.what == "align":
        result = align(args.name, dict(fields))
    elif args.what == "captions":
        result = captions(args.name, fields)
    else:
        if not args.align or not args.version:
            p.error("cached_top needs --align and --version")
        result = cached_top(args.name, fields, args.align, Path(args.version))
    command = " ".join(["python -m bench.grounding_probe", args.what, args.name, *args.fields]
                       + ([f"--align {args.align}", f"--version {args.version}"] if args.what == "cached_top" else []))
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    saved.setdefault(args.name, {})[args.what] = {"command": command, **result}
    RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
