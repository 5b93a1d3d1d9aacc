"""Do the frozen vision tower's patch tokens hold the objects POPE asks about? (issue 11's grounding ceiling)

    python -m bench.tower_probe          # ~1 minute on 2 cores

The trainer's vision tower is the sample CLIP's ViT (80 px, 5 x 5 patches of width 128), frozen, read at
LLaVA's layer -2 (`trainer.vision_tower.VisionTower`). Here a linear probe replaces projector + language
model: per category, LayerNorm then one linear score per patch token, max over the 25 patches
(`presence = max_p w_c . LN(t_p) + b_c`), trained with binary cross-entropy on the sample world's
1,000 training images and read out as POPE on its 100 held-out images (the eval's own questions,
`evals.pope.build_pope_questions`, 6 per image; logit > 0 means "yes").

The label budget is what the VLM gets: `labels_per_image` (half present, half absent; the absent ones drawn
uniformly, not by popularity as the probes stage draws them) for `epochs` passes at batch 8, so the probe
sees about as many labels as a Stage 2 of that length. If the probe reaches the targets the information is in the tower, and what stalls
is the language model's reading of it. Writes bench/results/tower_probe.json.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bench import save_results
from evals.pope import STRATEGIES, build_pope_questions, load_instances, objects_per_image

WORLD = Path("data/world")
RESULTS = Path(__file__).resolve().parent / "results" / "tower_probe.json"
# (labels per image, epochs): the proof's Stage 2 is ~6 yes/no labels per image for ~1 epoch.
BUDGETS = [(6, 1), (6, 3), (6, 10), (16, 1), (16, 3), (16, 10), (64, 3), (64, 30)]
QUESTION = re.compile(r"Is there an? (.+) in the image\?")


class MaxPatchProbe(torch.nn.Module):
    def __init__(self, width: int, categories: int):
        super().__init__()
        self.norm, self.score = torch.nn.LayerNorm(width), torch.nn.Linear(width, categories)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, P, D] -> [B, C]
        return self.score(self.norm(tokens)).max(dim=1).values


def split(tower, name: str) -> tuple[torch.Tensor, torch.Tensor, list[str], dict]:
    """(patch tokens [N, P, D], presence [N, C], category names, instances) of one split."""
    instances = load_instances(WORLD / "annotations" / f"instances_{name}.json")
    present = objects_per_image(instances)
    names = sorted(c["name"] for c in instances["categories"])
    images = sorted(instances["images"], key=lambda i: i["id"])
    pixels = torch.stack([tower.preprocess(Image.open(WORLD / "images" / name / i["file_name"]).convert("RGB"))
                          for i in images])
    tokens = torch.cat([tower(pixels[s:s + 64]) for s in range(0, len(pixels), 64)])
    presence = torch.tensor([[n in present[i["id"]] for n in names] for i in images], dtype=torch.float)
    return tokens, presence, names, instances


def label_mask(presence: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """[N, C] 1 where a label is seen: per_image / 2 present and per_image / 2 absent categories per image
    (fewer present ones when the image has fewer); 64 or more: every label."""
    if per_image >= presence.shape[1]:
        return torch.ones_like(presence)
    mask = torch.zeros_like(presence)
    for i, row in enumerate(presence):
        for wanted in (row > 0, row == 0):
            pool = torch.nonzero(wanted).flatten()
            mask[i, pool[torch.randperm(len(pool), generator=generator)[: per_image // 2]]] = 1
    return mask


def pope(probe, tokens, names, instances) -> dict[str, float]:
    with torch.no_grad():
        logits = probe(tokens)
    row = {img["file_name"]: k for k, img in enumerate(sorted(instances["images"], key=lambda i: i["id"]))}
    scores = {}
    for strategy in STRATEGIES:
        questions = build_pope_questions(instances, strategy, seed=0)
        right = sum((logits[row[q["image"]], names.index(QUESTION.match(q["text"]).group(1))] > 0).item()
                    == (q["label"] == "yes") for q in questions)
        scores[strategy] = round(100 * right / len(questions), 1)
    return scores


def main() -> None:
    from infra.clip import CHECKPOINT_PATH, CONFIG_PATH, MODEL_NAME
    from schemas.config import ClipConfig
    from trainer.vision_tower import VisionTower

    torch.manual_seed(0)
    started = time.perf_counter()
    tower = VisionTower.from_config(ClipConfig(model=MODEL_NAME, pretrained=str(CHECKPOINT_PATH),
                                               config_path=str(CONFIG_PATH)))
    tokens, presence, names, _ = split(tower, "train")
    val_tokens, _, _, val_instances = split(tower, "val")
    runs = []
    for per_image, epochs in BUDGETS:
        generator = torch.Generator().manual_seed(0)
        mask = label_mask(presence, per_image, generator)
        probe = MaxPatchProbe(tokens.shape[-1], len(names))
        optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3)
        steps = 0
        for _ in range(epochs):
            for batch in torch.randperm(len(tokens), generator=generator).split(8):
                loss = F.binary_cross_entropy_with_logits(probe(tokens[batch]), presence[batch], reduction="none")
                loss = (loss * mask[batch]).sum() / mask[batch].sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
        runs.append({"labels_per_image": per_image, "epochs": epochs, "steps": steps, "batch_size": 8, "lr": 3e-3,
                     "pope_accuracy": pope(probe, val_tokens, names, val_instances)})
        print(f"{per_image:>2} labels/image x {epochs:>2} epochs ({steps:>5} steps): POPE "
              f"{' / '.join(str(v) for v in runs[-1]['pope_accuracy'].values())}", flush=True)
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": "python -m bench.tower_probe",
               "tower": {"model": MODEL_NAME, "patches": int(tokens.shape[1]), "width": int(tokens.shape[2]),
                         "layer": -2},
               "train_images": len(tokens), "held_out_images": len(val_tokens), "splits": list(STRATEGIES),
               "runs": runs, "seconds": round(time.perf_counter() - started, 1)}
    save_results(RESULTS, results)


if __name__ == "__main__":
    main()
