"""Measure the sample-world CLIP on what the pipeline asks of it; writes infra/clip/metrics.json.

    python -m infra.clip.evaluate_sample_clip

- retrieval: image->text recall@1/@5 on the validation split of the training world (seed 1),
  against two text pools: one random caption per val image, and all captions (an image counts
  as retrieved when any of its own captions is in the top k);
- caption mismatch (the CLIP-score filter): on a seed-0 world, cosine of (image, one of its own
  captions) vs (image, a caption of an image from another scene type), the way
  infra/world_noise.py swaps captions; ROC-AUC and the best-F1 threshold for flagging mismatches;
- near duplicates (FAISS dedup): cosine between an image and its near-duplicate made by
  infra.world_noise.near_duplicate (jitter, border crop, JPEG 70-85) vs the highest cosine
  between that image and any other image of the same scene type; percentiles and the best
  threshold 1 - eps.
Thresholds are reported at the best F1 and at precision >= 0.95 / recall >= 0.95.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from infra.clip import CHECKPOINT_PATH, CLIP_DIR, CONFIG_PATH, MODEL_NAME

PERCENTILES = (0, 1, 5, 25, 50, 75, 95, 99, 100)


class Embedder:
    """The pipeline's own `ClipScorer` pointed at a checkpoint: L2-normalised [N, D] float32 embeddings.

    With `dedup` (a DedupConfig), `images` returns the embedding dedup compares instead of the CLIP one.
    """

    def __init__(self, checkpoint: Path, batch_size: int = 256, dedup=None):
        from filters.clip_scorer import ClipScorer
        from schemas.config import ClipConfig
        self.scorer = ClipScorer(ClipConfig(model=MODEL_NAME, pretrained=str(checkpoint), config_path=str(CONFIG_PATH),
                                            device="cpu", batch_size=batch_size), dedup=dedup)
        self.model, self.batch_size, self.dedup = self.scorer.clip.model, batch_size, self.scorer.dedup

    def images(self, images: list) -> np.ndarray:
        """Paths, file objects or PIL images; opened a batch at a time to keep memory flat."""
        from tqdm import tqdm
        out = []
        for start in tqdm(range(0, len(images), self.batch_size), desc="images", unit="batch", leave=False):
            batch = [im if isinstance(im, Image.Image) else Image.open(im) for im in images[start:start + self.batch_size]]
            clip_emb, dedup_emb = self.scorer.embed_images_for_dedup([im.convert("RGB") for im in batch])
            out.append(clip_emb if dedup_emb is None else dedup_emb)
        return np.concatenate(out)

    def texts(self, texts: list[str]) -> np.ndarray:
        return self.scorer.embed_texts(texts)


def load_split(world: Path, split: str) -> tuple[list[dict], dict[int, list[str]]]:
    """(images sorted by id, with their scene; image id -> captions)."""
    instances = json.loads((world / "annotations" / f"instances_{split}.json").read_text())
    captions: dict[int, list[str]] = {}
    for ann in json.loads((world / "annotations" / f"captions_{split}.json").read_text())["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"])
    return sorted(instances["images"], key=lambda im: im["id"]), captions


def recall_at(similarity: np.ndarray, owner: np.ndarray, ks=(1, 5)) -> dict[str, float]:
    """similarity [N_img, N_txt]; owner[j] = image row of text j. Hit when an own text is in the top k."""
    order = np.argsort(-similarity, axis=1)  # [N_img, N_txt]
    hits = owner[order] == np.arange(len(similarity))[:, None]  # [N_img, N_txt]
    first = hits.argmax(axis=1)  # rank of the best-ranked own text
    return {f"recall@{k}": round(float((first < k).mean()), 4) for k in ks}


def retrieval(embed: Embedder, world: Path, rng: np.random.Generator) -> dict:
    images, captions = load_split(world, "val")
    image_emb = embed.images([world / "images" / "val" / im["file_name"] for im in images])
    one = [str(rng.choice(captions[im["id"]])) for im in images]
    all_texts = [(row, c) for row, im in enumerate(images) for c in captions[im["id"]]]
    one_emb = embed.texts(one)
    all_emb = embed.texts([c for _, c in all_texts])
    owner_one, owner_all = np.arange(len(images)), np.array([row for row, _ in all_texts])
    return {
        "world": str(world), "split": "val", "images": len(images), "captions": len(all_texts),
        "image_to_text_one_caption_pool": recall_at(image_emb @ one_emb.T, owner_one),
        "image_to_text_all_captions_pool": recall_at(image_emb @ all_emb.T, owner_all),
        "text_to_image_one_caption_pool": recall_at(one_emb @ image_emb.T, owner_one),
    }


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counting half; all pairs (a few thousand each)."""
    diff = positive[:, None] - negative[None, :]  # [N_pos, N_neg]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def operating_points(flagged: np.ndarray, other: np.ndarray, flag_above: bool, target: float = 0.95) -> dict:
    """Thresholds t for flagging `flagged` but not `other`, flagging cosine >= t (flag_above) or < t.

    Candidates are the midpoints between neighbouring scores. Returns the best-F1 point, the best
    recall with precision >= target and the best precision with recall >= target (None if unreachable).
    """
    scores = np.unique(np.concatenate([flagged, other]))
    thresholds = np.concatenate([[scores[0] - 1e-4], (scores[1:] + scores[:-1]) / 2, [scores[-1] + 1e-4]])  # [T]

    def flag(x):  # [T, N]
        return x[None, :] >= thresholds[:, None] if flag_above else x[None, :] < thresholds[:, None]
    tp, fp = flag(flagged).sum(axis=1), flag(other).sum(axis=1)  # [T]
    precision, recall = tp / np.maximum(tp + fp, 1), tp / len(flagged)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)

    def point(mask: np.ndarray, key: np.ndarray) -> dict | None:
        if not mask.any():
            return None
        i = int(np.flatnonzero(mask)[np.argmax(key[mask])])
        return {"threshold": round(float(thresholds[i]), 4), "precision": round(float(precision[i]), 4),
                "recall": round(float(recall[i]), 4), "f1": round(float(f1[i]), 4)}
    return {"best_f1": point(np.ones_like(f1, bool), f1),
            f"best_recall_at_precision_{target}": point(precision >= target, recall),
            f"best_precision_at_recall_{target}": point(recall >= target, precision)}


def percentiles(x: np.ndarray) -> dict[str, float]:
    return {f"p{p}": round(float(np.percentile(x, p)), 4) for p in PERCENTILES}


def caption_mismatch(embed: Embedder, world: Path, rng: np.random.Generator) -> dict:
    images, captions = load_split(world, "train")
    own = [str(rng.choice(captions[im["id"]])) for im in images]
    foreign = []
    for im in images:  # as infra/world_noise.py swaps: a caption of an image from another scene type
        partner = next(j for j in rng.permutation(len(images)) if images[j]["scene"] != im["scene"])
        foreign.append(str(rng.choice(captions[images[partner]["id"]])))
    image_emb = embed.images([world / "images" / "train" / im["file_name"] for im in images])
    true_cos = (image_emb * embed.texts(own)).sum(axis=1)  # [N]
    false_cos = (image_emb * embed.texts(foreign)).sum(axis=1)  # [N]
    return {
        "world": str(world), "pairs": {"true": len(true_cos), "mismatched": len(false_cos)},
        "roc_auc": round(roc_auc(true_cos, false_cos), 4),
        "mismatch_when_cosine_below": operating_points(false_cos, true_cos, flag_above=False),
        "true_pair_cosine": percentiles(true_cos), "mismatched_pair_cosine": percentiles(false_cos),
    }


def near_duplicates(embed: Embedder, world: Path, count: int, rng: np.random.Generator) -> dict:
    from infra.sample_world import plan_scene
    from infra.world_noise import near_duplicate
    images, _ = load_split(world, "train")
    seed = json.loads((world / "annotations" / "instances_train.json").read_text())["info"]["seed"]
    image_emb = embed.images([world / "images" / "train" / im["file_name"] for im in images])  # [N, D]
    picks = rng.choice(len(images), size=min(count, len(images)), replace=False)
    copies = [io.BytesIO(near_duplicate(plan_scene(images[i]["id"], seed, images[i]["width"]), rng)) for i in picks]
    dup_cos = (image_emb[picks] * embed.images(copies)).sum(axis=1)  # [count]
    scenes = np.array([im["scene"] for im in images])
    similarity = image_emb[picks] @ image_emb.T  # [count, N]
    similarity[scenes[picks][:, None] != scenes[None, :]] = -np.inf  # same scene type only
    similarity[np.arange(len(picks)), picks] = -np.inf  # not itself
    distinct_cos = similarity.max(axis=1)  # [count]
    points = operating_points(dup_cos, distinct_cos, flag_above=True)
    for point in filter(None, points.values()):
        point["eps"] = round(1 - point["threshold"], 4)
    gap = float(dup_cos.min() - distinct_cos.max())
    return {
        "world": str(world), "originals": len(picks), "searched_images": len(images),
        "near_duplicate_cosine": percentiles(dup_cos),
        "max_cosine_to_other_image_of_same_scene": percentiles(distinct_cos),
        "separable": gap > 0, "gap": round(gap, 4),
        "duplicate_when_cosine_at_least": points,
    }


def ensure_world(world: Path, num_images: int, num_val: int, seed: int) -> None:
    if not (world / "annotations" / "captions_train.json").is_file():
        from infra.sample_world import render_world
        print(json.dumps(render_world(world, num_images, num_val, seed=seed)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT_PATH)
    parser.add_argument("--val-world", type=Path, default=Path("data/clip_world"), help="the training world (seed 1)")
    parser.add_argument("--filter-world", type=Path, default=Path("/tmp/w0"), help="a seed-0 world; rendered if absent")
    parser.add_argument("--filter-images", type=int, default=2000)
    parser.add_argument("--near-duplicates", type=int, default=200)
    parser.add_argument("--dedup-world", type=Path, default=Path("/tmp/w2"),
                        help="a seed-2 world (neither the CLIP's nor the demo's) for choosing dedup.eps; rendered if absent")
    parser.add_argument("--config", type=Path, default=Path("configs/sample.yaml"), help="whose dedup settings to measure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=CLIP_DIR / "metrics.json")
    args = parser.parse_args(argv)

    import torch
    torch.set_num_threads(1)  # 2 OpenMP threads on 2 shared cores spin-wait on each other (see train_sample_clip.py)
    ensure_world(args.val_world, 10_000, 1_000, seed=1)  # train_sample_clip.py's world, images identical
    ensure_world(args.filter_world, args.filter_images, 0, seed=0)
    ensure_world(args.dedup_world, args.filter_images, 0, seed=2)
    from schemas.config import load_config
    dedup = load_config(args.config).dedup
    embed = Embedder(args.checkpoint)
    metrics = {
        "checkpoint": str(args.checkpoint),
        "checkpoint_mib": round(args.checkpoint.stat().st_size / 2**20, 2),
        "parameters": sum(p.numel() for p in embed.model.parameters()),
        "retrieval": retrieval(embed, args.val_world, np.random.default_rng([args.seed, 1])),
        "caption_mismatch": caption_mismatch(embed, args.filter_world, np.random.default_rng([args.seed, 2])),
        "near_duplicates": near_duplicates(embed, args.filter_world, args.near_duplicates,
                                           np.random.default_rng([args.seed, 3])),
        # What the pipeline's dedup compares (dedup.embedding, dedup.crop_scales of --config), on a world
        # no setting was chosen on before: dedup.eps comes from here.
        "near_duplicates_dedup_embedding": {
            "embedding": dedup.embedding, "crop_scales": dedup.crop_scales,
            **near_duplicates(Embedder(args.checkpoint, dedup=dedup), args.dedup_world, args.near_duplicates,
                              np.random.default_rng([args.seed, 4])),
        },
    }
    args.out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
