"""The CPU half of CLIP scoring (`ClipPreprocessor`: decode, crop each view, resize with open_clip's own
transforms, tokenize) and what it shares with the model half in `filters/clip_scorer.py` (`ClipStage`:
the model's transforms and how an encoded image is decoded).
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from filters.clip_loader import LoadedClip, load_clip
from schemas.config import ClipConfig, DedupConfig
from schemas.records import ImageRecord, StageResult


def centre_crop(image: Image.Image, scale: float) -> Image.Image:
    """The centre of `image` keeping `scale` of each side (1.0: the image itself)."""
    if scale >= 1.0:
        return image
    w, h = image.size
    dx, dy = round(w * (1 - scale) / 2), round(h * (1 - scale) / 2)
    return image.crop((dx, dy, w - dx, h - dy))


def as_tensor(array: np.ndarray):
    """`torch.from_numpy` without its warning for read-only arrays: Arrow's buffers are, and are only read."""
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


_CACHE_SLICE_BYTES = 2 << 20  # float pixels normalized per slice (see _BatchedPreprocess.tensor)


class _BatchedPreprocess:
    """open_clip's preprocess with its last two steps (to tensor, normalize) done once per batch.

    Per image only the PIL steps run (resize, centre crop, RGB), in threads: PIL releases the GIL while
    it decodes and resamples. The result equals `preprocess` image by image, bit for bit (a test checks).
    A preprocess of another shape runs as it is, image by image (`batched` is then False).
    """

    def __init__(self, preprocess, workers: int):
        from torchvision import transforms as T

        steps = list(getattr(preprocess, "transforms", []))
        self.batched = len(steps) >= 2 and isinstance(steps[-2], T.ToTensor) and isinstance(steps[-1], T.Normalize)
        self.per_image = T.Compose(steps[:-2]) if self.batched else preprocess
        self.normalize = steps[-1] if self.batched else None
        self.pool = ThreadPoolExecutor(workers) if workers > 1 else None
        self._mean_std = {}  # device -> (mean, std) [1, 3, 1, 1]; made once, as a copy to a GPU waits for it

    def map(self, fn, items: list) -> list:
        return list(self.pool.map(fn, items)) if self.pool and len(items) > 1 else [fn(x) for x in items]

    def arrays(self, images: list[Image.Image]) -> np.ndarray:
        """[B, H, W, 3] uint8: the images resized and cropped for the model (batched preprocess only)."""
        return np.stack([np.asarray(im, dtype=np.uint8) for im in self.map(self.per_image, images)])

    def tensor(self, pixels):
        """[B, H, W, 3] uint8 (an array, or a tensor on any device) -> [B, 3, H, W] float on the same
        device, contiguous, as ToTensor + Normalize.

        The same float operations in the same order (so bit-identical). The scorer hands a GPU the uint8
        pixels (a quarter of the bytes) to normalize there; on the CPU this runs a few images at a time,
        so each slice's four passes stay in the cache: about half the time of whole-batch passes.
        """
        import torch

        src = (as_tensor(pixels) if isinstance(pixels, np.ndarray) else pixels).permute(0, 3, 1, 2)
        out = torch.empty(src.shape, dtype=torch.float32, device=src.device)
        if src.device not in self._mean_std:
            self._mean_std[src.device] = (torch.tensor(self.normalize.mean, device=src.device).view(1, -1, 1, 1),
                                          torch.tensor(self.normalize.std, device=src.device).view(1, -1, 1, 1))
        mean, std = self._mean_std[src.device]
        step = len(out) if src.device.type != "cpu" else max(1, _CACHE_SLICE_BYTES // max(1, out[:1].numel() * 4))
        for i in range(0, len(out), step):
            out[i:i + step].copy_(src[i:i + step]).div_(255).sub_(mean).div_(std)
        return out

    def __call__(self, images: list[Image.Image]):
        import torch

        if not self.batched:
            return torch.stack(self.map(self.per_image, images))  # [B, 3, H, W]
        return self.tensor(self.arrays(images))


def image_views(dedup: DedupConfig | None) -> list[float]:
    """The crop scales the CLIP stage embeds: the full image first, then the other crop scales of a
    dedup that has an embedding of its own."""
    own = dedup is not None and dedup.separate_embedding
    return [1.0] + [s for s in (dedup.crop_scales if own else []) if s != 1.0]


class ClipStage:
    """What both halves share: the model's transforms and how an encoded image is decoded."""

    def __init__(self, config: ClipConfig, clip: LoadedClip | None, dedup: DedupConfig | None):
        self.config = config
        self.clip = clip or load_clip(config)
        self.dedup = dedup if dedup is not None and dedup.separate_embedding else None
        self.views = image_views(self.dedup)
        self.preprocess = _BatchedPreprocess(self.clip.preprocess, workers=min(4, os.cpu_count() or 1))

    @property
    def input_hw(self) -> tuple[int, int]:
        size = self.clip.model.visual.image_size
        return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))

    @property
    def input_side(self) -> int:
        return max(self.input_hw)

    def _decode(self, record: ImageRecord) -> Image.Image | Exception:
        try:
            image = Image.open(io.BytesIO(record.image))
            # JPEGs decode straight at 1/2, 1/4 or 1/8 scale when that still covers the model's input
            # at the smallest crop: the decode and the resize after it touch 4-64x fewer pixels.
            side = int(self.input_side / min(self.views)) + 1
            image.draft("RGB", (side, side))
            return image.convert("RGB")
        except Exception as err:  # noqa: BLE001 - validate decoded it; a failure here is still per record
            return err

    def _decode_all(self, records: list[ImageRecord], result: StageResult) -> tuple[list[ImageRecord], list[Image.Image]]:
        """(records that decoded, their images); the others go to `result.dropped` with the reason."""
        decoded, images = [], []
        for record, image in zip(records, self.preprocess.map(self._decode, records)):
            if isinstance(image, Exception):
                result.dropped.append(record.dropped(self.name, f"decode_error:{type(image).__name__}"))
            else:
                decoded.append(record)
                images.append(image)
        return decoded, images


@functools.lru_cache(maxsize=2)
def _cpu_clip(config_json: str) -> LoadedClip:
    """One load per worker process: Ray runs the CPU half as tasks, and a worker process serves many."""
    return load_clip(ClipConfig.model_validate_json(config_json))


class ClipPreprocessor(ClipStage):
    """The CPU half of CLIP scoring: decode, crop each view, resize/crop with open_clip's own transforms,
    tokenize the caption. Records leave with `pixels` (uint8 [views, H, W, 3]) and `tokens`, so the model
    half (`ClipScorer`, on an actor pool or a GPU) only normalizes and runs the towers: Ray Data's
    batch-inference shape, where CPU tasks scale out to keep the model fed.
    """

    name = "clip_preprocess"
    columns = ("caption", "image", "pixels", "tokens")

    def __init__(self, config: ClipConfig, clip: LoadedClip | None = None, dedup: DedupConfig | None = None):
        config = config.model_copy(update={"device": "cpu"})
        super().__init__(config, clip or _cpu_clip(config.model_dump_json()), dedup)

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result = StageResult()
        decoded, images = self._decode_all(records, result)
        if not decoded:
            return result
        if not self.preprocess.batched:  # a preprocess we cannot split: the scorer decodes itself
            result.kept = decoded
            return result
        views = np.stack([self.preprocess.arrays([centre_crop(im, s) for im in images]) for s in self.views], 1)  # [B, V, H, W, 3]
        tokens = self.clip.tokenizer([r.caption or "" for r in decoded]).numpy()  # [B, context_length]
        result.kept = [r.model_copy(update={"pixels": v.tobytes(), "tokens": t.tolist()})
                       for r, v, t in zip(decoded, views, tokens)]
        return result
