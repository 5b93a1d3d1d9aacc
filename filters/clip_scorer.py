"""CLIP image-text similarity: `ClipScorer` annotates, `ClipScoreFilter` drops below a threshold.

Two halves, as DESIGN.md asks of global steps: the scorer runs per batch (one model per
worker) and adds `clip_score` and the normalized image embedding to each record; the threshold
is either fixed (LAION: 0.28 with ViT-B/32) or fit as a global quantile (DataComp: keep the
top 30%), then `ClipScoreFilter` applies it per batch.
"""
from __future__ import annotations

import contextlib
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from filters.clip_loader import LoadedClip, load_clip
from filters.record_filter import RecordFilter
from schemas.config import ClipConfig, DedupConfig
from schemas.errors import UserError
from schemas.records import ImageRecord, StageResult


def centre_crop(image: Image.Image, scale: float) -> Image.Image:
    """The centre of `image` keeping `scale` of each side (1.0: the image itself)."""
    if scale >= 1.0:
        return image
    w, h = image.size
    dx, dy = round(w * (1 - scale) / 2), round(h * (1 - scale) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


class _BatchedPreprocess:
    """open_clip's preprocess with its last two steps (to tensor, normalize) done once per batch.

    Per image only the PIL steps run (resize, centre crop, RGB), in threads: PIL releases the GIL while
    it decodes and resamples. The result equals `preprocess` image by image, bit for bit (a test checks).
    A preprocess of another shape runs as it is, image by image.
    """

    def __init__(self, preprocess, workers: int):
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        batched = len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)
        self.per_image = T.Compose(steps[:-2]) if batched else preprocess
        self.normalize = steps[-1] if batched else None
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None

    def map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items)) if self.pool and len(items) > 1 else [fn(x) for x in items]

    def __call__(self, images: list[Image.Image]):
        import torch

        done = self.map(self.per_image, images)
        if self.normalize is None:
            return torch.stack(done)  # [B, 3, H, W]
        pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in done]))  # [B, H, W, 3]
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255)  # [B, 3, H, W], as ToTensor
        mean = torch.tensor(self.normalize.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.normalize.std).view(1, -1, 1, 1)
        return pixels.sub_(mean).div_(std)


class ClipScorer:
    name = "clip_score"

    def __init__(self, config: ClipConfig, clip: LoadedClip | None = None, dedup: DedupConfig | None = None):
        self.config = config
        self.clip = clip or load_clip(config)
        self.dedup = dedup if dedup is not None and dedup.separate_embedding else None
        if self.dedup and self.dedup.embedding == "clip_and_patch_tokens" and not hasattr(self.clip.model.visual, "output_tokens"):
            raise UserError(f"dedup.embedding=clip_and_patch_tokens needs a ViT image tower and {self.clip.name} has a "
                            f"{type(self.clip.model.visual).__name__}; use dedup.embedding=clip.")
        self.preprocess = _BatchedPreprocess(self.clip.preprocess, workers=min(4, os.cpu_count() or 1))

    @property
    def input_side(self) -> int:
        size = self.clip.model.visual.image_size
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    def _autocast(self):
        import torch

        if self.clip.device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def embed_images(self, images: list[Image.Image]) -> np.ndarray:
        """[N, D] float32, L2-normalized."""
        return self.embed_images_for_dedup(images)[0]

    def embed_images_for_dedup(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
        """([N, D] CLIP embeddings, [N, K] dedup embeddings or None when dedup uses the CLIP ones); L2-normalized."""
        import torch

        normalize = torch.nn.functional.normalize
        scales = self.dedup.crop_scales if self.dedup else []
        tokens = bool(self.dedup) and self.dedup.embedding == "clip_and_patch_tokens"
        embeddings, dedup_embeddings = [], []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(images), self.config.batch_size):
                chunk = images[start:start + self.config.batch_size]
                full = self._encode_image(chunk, tokens)  # ([B, D], [B, T, W] or None)
                embeddings.append(normalize(full[0].float(), dim=-1).cpu().numpy())
                if not scales:
                    continue
                total = 0
                for scale in scales:
                    pooled, grid = full if scale == 1.0 else self._encode_image([centre_crop(im, scale) for im in chunk], tokens)
                    view = normalize(pooled.float(), dim=-1)  # [B, D]
                    if tokens:  # [B, D + T * W]: the cosine of two such rows is the mean of the two cosines
                        view = torch.cat([view, normalize(grid.flatten(1).float(), dim=-1)], dim=1) / 2 ** 0.5
                    total = total + view
                dedup_embeddings.append(normalize(total, dim=-1).cpu().numpy())
        if not embeddings:
            return np.zeros((0, 0), np.float32), None
        return np.concatenate(embeddings), np.concatenate(dedup_embeddings) if dedup_embeddings else None

    def _encode_image(self, images: list[Image.Image], tokens: bool):
        """(pooled [B, D], patch tokens [B, T, W] or None) of one batch."""
        pixels = self.preprocess(images).to(self.clip.device)  # [B, 3, H, W]
        if not tokens:
            return self.clip.model.encode_image(pixels), None
        visual = self.clip.model.visual
        visual.output_tokens = True
        try:
            return visual(pixels)
        finally:
            visual.output_tokens = False

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32, L2-normalized."""
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(texts), self.config.batch_size):
                tokens = self.clip.tokenizer(texts[start:start + self.config.batch_size])  # [B, context_length]
                features = self.clip.model.encode_text(tokens.to(self.clip.device))  # [B, D]
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _decode(self, record: ImageRecord) -> Image.Image | Exception:
        try:
            image = Image.open(io.BytesIO(record.image))
            # JPEGs decode straight at 1/2, 1/4 or 1/8 scale when that still covers the model's input
            # at the smallest crop: the decode and the resize after it touch 4-64x fewer pixels.
            side = int(self.input_side / min(self.dedup.crop_scales if self.dedup else [1.0])) + 1
            image.draft("RGB", (side, side))
            return image.convert("RGB")
        except Exception as err:  # noqa: BLE001 - validate decoded it; a failure here is still per record
            return err

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result, images, scored = StageResult(), [], []
        for record, image in zip(records, self.preprocess.map(self._decode, records)):
            if isinstance(image, Exception):
                result.dropped.append(record.dropped(self.name, f"decode_error:{type(image).__name__}"))
            else:
                images.append(image)
                scored.append(record)
        if scored:
            image_emb, dedup_emb = self.embed_images_for_dedup(images)
            text_emb = self.embed_texts([r.caption or "" for r in scored])
            cosine = (image_emb * text_emb).sum(axis=1)  # [N]
            for i, (record, c, e) in enumerate(zip(scored, cosine, image_emb)):
                update = {"clip_score": float(c), "embedding": e.tolist()}
                if dedup_emb is not None:
                    update["dedup_embedding"] = dedup_emb[i].tolist()
                result.kept.append(record.model_copy(update=update))
        return result


def fit_clip_threshold(config: ClipConfig, scores: np.ndarray) -> float:
    """The global half: the fixed threshold, or the score quantile that keeps `keep_fraction`."""
    if config.mode == "threshold" or len(scores) == 0:
        return config.threshold
    return float(np.quantile(scores, 1.0 - config.keep_fraction))


class ClipScoreFilter(RecordFilter):
    """The per-batch half: drop pairs whose CLIP score is below the fitted threshold."""

    name = "clip_filter"

    def __init__(self, threshold: float):
        self.threshold = threshold

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        if record.clip_score is not None and record.clip_score >= self.threshold:
            return None, record
        return f"clip_score_below:{self.threshold:.4f}", record
