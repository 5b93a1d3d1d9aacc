"""CLIP image-text similarity: `ClipPreprocessor` (CPU: decode, resize, tokenize; `filters/clip_preprocess.py`)
feeds `ClipScorer` (the model: annotates), `ClipScoreFilter` drops below a threshold.

Two halves, as DESIGN.md asks of global steps: the scorer runs per batch (one model per
worker) and adds `clip_score` and the normalized image embedding to each record; the threshold
is either fixed (LAION: 0.28 with ViT-B/32) or fit as a global quantile (DataComp: keep the
top 30%), then `ClipScoreFilter` applies it per batch.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np
from PIL import Image

from filters.clip_loader import LoadedClip
from filters.clip_preprocess import ClipStage, as_tensor, centre_crop
from filters.record_filter import RecordFilter
from schemas.config import ClipConfig, DedupConfig
from schemas.errors import UserError
from schemas.records import ImageRecord, StageResult


class ClipScores(NamedTuple):
    """What the model half computes for N image-caption pairs."""

    clip_score: np.ndarray  # [N] float32: cosine of image and caption embeddings
    embedding: np.ndarray  # [N, D] float32, L2-normalized image embeddings
    dedup_embedding: np.ndarray | None  # [N, K] float32, L2-normalized; None when dedup compares `embedding`


class ClipScorer(ClipStage):
    """The model half: image and caption embeddings, their cosine, and the embedding dedup compares.

    Takes records straight from `ClipPreprocessor` (pixels + tokens) or with only their encoded image.
    """

    name = "clip_score"
    columns = ("caption", "image", "pixels", "tokens", "clip_score", "embedding", "dedup_embedding")

    def __init__(self, config: ClipConfig, clip: LoadedClip | None = None, dedup: DedupConfig | None = None):
        super().__init__(config, clip, dedup)
        self._copy_stream = None  # the side stream of `_to_device`, on a GPU
        if self.dedup and self.dedup.embedding == "clip_and_patch_tokens" and not hasattr(self.clip.model.visual, "output_tokens"):
            raise UserError(f"dedup.embedding=clip_and_patch_tokens needs a ViT image tower and {self.clip.name} has a "
                            f"{type(self.clip.model.visual).__name__}; use dedup.embedding=clip.")

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
        embeddings, dedup = self._embed_chunks(self._image_chunks(images))
        return embeddings.cpu().numpy(), None if dedup is None else dedup.cpu().numpy()

    def _chunks(self, items):
        """`items` (a list, array or tensor) in slices of `batch_size`."""
        bs = self.config.batch_size
        return (items[i:i + bs] for i in range(0, len(items), bs))

    def _image_chunks(self, images: list[Image.Image]):
        """Per-view pixel tensors [B, 3, H, W] (`self.views` order), one chunk of images at a time."""
        return ([self.preprocess([centre_crop(im, s) for im in chunk]) for s in self.views] for chunk in self._chunks(images))

    def _token_chunks(self, texts: list[str]):
        return (self.clip.tokenizer(chunk) for chunk in self._chunks(texts))

    def _embed_chunks(self, chunks):
        """chunks: iterable of per-view pixel tensors [B, 3, H, W], `self.views` order. Returns ([N, D], [N, K] or
        None) float32 tensors on the model's device: nothing waits for the GPU until a caller reads them."""
        import torch

        normalize = torch.nn.functional.normalize
        tokens = bool(self.dedup) and self.dedup.embedding == "clip_and_patch_tokens"
        embeddings, dedup_embeddings = [], []
        with torch.inference_mode(), self._autocast():
            for views in chunks:
                encoded = {}  # scale -> (pooled [B, D], patch tokens [B, T, W] or None)
                for scale, pixels in zip(self.views, views):
                    encoded[scale] = self._encode_image(pixels.to(self.clip.device), tokens)
                embeddings.append(normalize(encoded[1.0][0].float(), dim=-1))
                if not self.dedup:
                    continue
                total = 0
                for scale in self.dedup.crop_scales:
                    pooled, grid = encoded[scale]
                    view = normalize(pooled.float(), dim=-1)  # [B, D]
                    if tokens:  # [B, D + T * W]: the cosine of two such rows is the mean of the two cosines
                        view = torch.cat([view, normalize(grid.flatten(1).float(), dim=-1)], dim=1) / 2 ** 0.5
                    total = total + view
                dedup_embeddings.append(normalize(total, dim=-1))
        if not embeddings:
            return torch.zeros((0, 0), device=self.clip.device), None
        return torch.cat(embeddings), torch.cat(dedup_embeddings) if dedup_embeddings else None

    def _encode_image(self, pixels, tokens: bool):
        """(pooled [B, D], patch tokens [B, T, W] or None) of one batch of pixels [B, 3, H, W]."""
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
        return self._embed_tokens(self._token_chunks(texts)).cpu().numpy()

    def _embed_tokens(self, chunks):
        """chunks: iterable of token tensors [B, context_length]. Returns [N, D] float32 on the model's device."""
        import torch

        out = []
        with torch.inference_mode(), self._autocast():
            for tokens in chunks:
                features = self.clip.model.encode_text(tokens.to(self.clip.device))  # [B, D]
                out.append(torch.nn.functional.normalize(features.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros((0, 0), device=self.clip.device)

    @staticmethod
    def _scores(image, text, dedup) -> ClipScores:
        """From [N, D] image and caption embeddings (and [N, K] dedup ones or None) on the model's device."""
        cosine = (image * text).sum(dim=1)  # [N]
        return ClipScores(cosine.cpu().numpy(), image.cpu().numpy(), None if dedup is None else dedup.cpu().numpy())

    def score_pixels(self, pixels: np.ndarray, tokens: np.ndarray) -> ClipScores:
        """The model half on `ClipPreprocessor`'s output as arrays: pixels [N, V, H, W, 3] uint8 (V: one per
        `self.views` entry), tokens [N, context_length]. Arrays in and out, so an engine can hand it
        columns without building a record per row."""
        import torch

        # The tokens go first, while nothing is queued (a copy from ordinary memory waits for the GPU), then
        # the text tower is queued and the GPU runs it while the pixels travel. Nothing waits until `_scores`.
        tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(self.clip.device)
        text_emb = self._embed_tokens(self._chunks(tokens))
        pixels = self._to_device(pixels)  # [N, V, H, W, 3] uint8
        image_emb, dedup_emb = self._embed_chunks(  # normalized one chunk at a time, on the model's device
            [self.preprocess.tensor(chunk[:, v]) for v in range(len(self.views))] for chunk in self._chunks(pixels))
        return self._scores(image_emb, text_emb, dedup_emb)

    def _to_device(self, array: np.ndarray):
        """`array` as a tensor on the model's device. To a GPU through pinned memory on a side stream, so the
        copy overlaps with the work already queued; the model's stream waits for it before using it."""
        import torch

        source = as_tensor(array)
        if not self.clip.device.startswith("cuda"):
            return source
        staged = torch.empty(source.shape, dtype=source.dtype, pin_memory=True)  # PyTorch reuses these buffers
        staged.copy_(source)
        model_stream = torch.cuda.current_stream()
        self._copy_stream = self._copy_stream or torch.cuda.Stream()
        with torch.cuda.stream(self._copy_stream):
            out = torch.empty(source.shape, dtype=source.dtype, device=self.clip.device)
            out.copy_(staged, non_blocking=True)
        model_stream.wait_stream(self._copy_stream)
        out.record_stream(model_stream)  # the allocator keeps `out` until the model's stream is done with it
        return out

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result = StageResult()
        if all(r.pixels is not None and r.tokens is not None for r in records):  # from ClipPreprocessor
            scored = records
            pixels = np.stack([np.frombuffer(r.pixels, np.uint8) for r in records])
            scores = self.score_pixels(pixels.reshape(len(records), len(self.views), *self.input_hw, 3),
                                       np.array([r.tokens for r in records], np.int64))
        else:
            scored, images = self._decode_all(records, result)
            if not scored:
                return result
            image_emb, dedup_emb = self._embed_chunks(self._image_chunks(images))
            text_emb = self._embed_tokens(self._token_chunks([r.caption or "" for r in scored]))
            scores = self._scores(image_emb, text_emb, dedup_emb)
        for i, record in enumerate(scored):
            update = {"clip_score": float(scores.clip_score[i]), "embedding": scores.embedding[i].tolist(),
                      "pixels": None, "tokens": None}
            if scores.dedup_embedding is not None:
                update["dedup_embedding"] = scores.dedup_embedding[i].tobytes()
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
    columns = ("clip_score",)

    def __init__(self, threshold: float):
        self.threshold = threshold

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        if record.clip_score is not None and record.clip_score >= self.threshold:
            return None, record
        return f"clip_score_below:{self.threshold:.4f}", record
