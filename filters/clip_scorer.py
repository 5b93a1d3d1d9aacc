"""CLIP image-text similarity: `ClipScorer` annotates, `ClipScoreFilter` drops below a threshold.

Two halves, as DESIGN.md asks of global steps: the scorer runs per batch (one model per
worker) and adds `clip_score` and the normalized image embedding to each record; the threshold
is either fixed (LAION: 0.28 with ViT-B/32) or fit as a global quantile (DataComp: keep the
top 30%), then `ClipScoreFilter` applies it per batch.
"""
from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image

from filters.clip_loader import LoadedClip, load_clip
from filters.record_filter import RecordFilter
from schemas.config import ClipConfig
from schemas.records import ImageRecord, StageResult


class ClipScorer:
    name = "clip_score"

    def __init__(self, config: ClipConfig, clip: LoadedClip | None = None):
        self.config = config
        self.clip = clip or load_clip(config)

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
        import torch

        return self._embed(images, lambda chunk: torch.stack([self.clip.preprocess(im) for im in chunk]),
                           self.clip.model.encode_image)  # pixels [B, 3, H, W]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """[N, D] float32, L2-normalized."""
        return self._embed(texts, self.clip.tokenizer, self.clip.model.encode_text)  # tokens [B, context_length]

    def _embed(self, items: list, to_tensor, encode) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for start in range(0, len(items), self.config.batch_size):
                features = encode(to_tensor(items[start:start + self.config.batch_size]).to(self.clip.device))  # [B, D]
                out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result, images, scored = StageResult(), [], []
        side = self.input_side
        for record in records:
            try:
                image = Image.open(io.BytesIO(record.image))
                # JPEGs decode straight at 1/2, 1/4 or 1/8 scale when that still covers the model's
                # input: the decode and the resize that follows then touch 4-64x fewer pixels.
                image.draft("RGB", (side, side))
                images.append(image.convert("RGB"))
                scored.append(record)
            except Exception as err:  # noqa: BLE001 - validate decoded it; a failure here is still per record
                result.dropped.append(record.dropped(self.name, f"decode_error:{type(err).__name__}"))
        if scored:
            image_emb = self.embed_images(images)
            text_emb = self.embed_texts([r.caption or "" for r in scored])
            cosine = (image_emb * text_emb).sum(axis=1)  # [N]
            result.kept = [r.model_copy(update={"clip_score": float(c), "embedding": e.tolist()})
                           for r, c, e in zip(scored, cosine, image_emb)]
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
