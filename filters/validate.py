"""`ImageValidator`: decode each downloaded image with Pillow and drop, with a reason, what is unusable.

Checks run cheapest first and the pixel budget is read from the header, so a decompression
bomb (a tiny PNG declaring 20000x20000 pixels) is rejected without being decoded.

A kept image is stored as it displays, in 8-bit RGB, so CLIP, the teacher's boxes and the trainer all
see what a person sees:
- EXIF orientation is applied (a phone photo tagged "rotate 90°" is stored upright, without the tag),
  and width, height, `too_small` and `extreme_aspect_ratio` are about the displayed size;
- 16-bit and 32-bit grey images keep their grey levels (scaled to 8 bits, not clipped to white).
The downloaded bytes are kept byte for byte unless the pixels had to change (or the format is not one
we store); a PNG that only needed turning stays PNG, every other re-encode is JPEG at quality 95.
The caption's image placeholders are made inert (`schemas.records.neutralize_placeholders`).
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import ExifTags, Image, ImageOps

from schemas.config import ValidateConfig
from filters.record_filter import RecordFilter
from schemas.records import ImageRecord, neutralize_placeholders

STORED_FORMATS = ("JPEG", "PNG", "WEBP")  # kept as downloaded when already RGB and upright
SIDEWAYS = (5, 6, 7, 8)  # EXIF orientations that swap width and height (2..8 all change the pixels)


class ImageValidator(RecordFilter):
    name = "validate"
    columns = ("caption", "image", "width", "height")

    def __init__(self, config: ValidateConfig):
        self.config = config

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        """Returns (reason, record): reason is None when the record is kept, then with upright RGB bytes and
        the displayed size."""
        cfg = self.config
        caption = (record.caption or "").strip()
        if not caption:
            return "caption_empty", record
        if len(caption) > cfg.max_caption_chars:
            return f"caption_too_long:{len(caption)}", record
        if not record.image:
            return "decode_error:no image bytes", record
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(record.image))  # reads the header only
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            return "pixels_too_large:declared size over Pillow's bomb limit", record
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a per-record reason
            return f"decode_error:{_one_line(err)}", record
        width, height = image.size
        if width * height > cfg.max_pixels:  # turning never changes the area: safe to check before the EXIF
            return f"pixels_too_large:{width}x{height}", record
        try:
            orientation = exif_orientation(image)
        except Exception as err:  # noqa: BLE001 - a PNG's EXIF may follow its (truncated) pixels
            return f"decode_error:{_one_line(err)}", record
        if orientation in SIDEWAYS:
            width, height = height, width
        if min(width, height) < cfg.min_side:
            return f"too_small:{width}x{height}", record
        if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
            return f"extreme_aspect_ratio:{width}x{height}", record
        try:
            image.load()
            shown = to_rgb(ImageOps.exif_transpose(image) if orientation != 1 else image)
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data, a mode Pillow cannot convert
            return f"decode_error:{_one_line(err)}", record
        data = record.image
        if shown is not image or image.format not in STORED_FORMATS:
            data = encode(shown, "PNG" if image.format == "PNG" and image.mode == "RGB" else "JPEG")
        return None, record.model_copy(update={"image": data, "width": width, "height": height,
                                               "caption": neutralize_placeholders(caption)})


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation, 1 (as stored) when absent or not one of EXIF's eight values. Pillow reads a
    PNG's EXIF by decoding the image when it is not in the header, hence only after the pixel budget."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Corrupt EXIF data": the pixels are still fine, shown as stored
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in range(1, 9) else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, the same object when it already is. Grey images of more than 8 bits ("I;16*", "I", "F")
    are scaled by `grey_to_8bit`: Pillow's own convert clips them, so a 16-bit photo comes out nearly white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(grey_to_8bit(np.asarray(image))).convert("RGB")
    return image.convert("RGB")  # 1, L, P, LA, PA, RGBA, CMYK, YCbCr...: Pillow keeps their levels


def grey_to_8bit(values: np.ndarray) -> np.ndarray:
    """Grey values on their own scale -> uint8 [H, W]. The full scale is the smallest usual one that holds
    the data: 0..65535 for integers (16-bit data, also when Pillow reads it as 32-bit "I"); 0..1, 0..255 or
    0..65535 for floats. Anything else (negative values, a 32-bit range) is stretched from its min to its
    max. NaN and infinities become black."""
    scales = (1.0, 255.0, 65535.0) if values.dtype.kind == "f" else (65535.0,)
    values = values.astype(np.float32)  # [H, W]; exact for every 16-bit value
    finite = np.isfinite(values)
    low, high = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
    full = next((scale for scale in scales if low >= 0 and high <= scale), None)
    if full is None:  # no usual scale holds it: stretch
        full = max(high - low, 1e-12)
    else:
        low = 0.0
    scaled = np.where(finite, (values - low) * (255.0 / full), 0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str) -> bytes:
    """The image's bytes in `fmt`, without EXIF (its orientation is applied already)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _one_line(err: Exception) -> str:
    """First line of the error, without object addresses, so the same input always gets the same reason."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return _ADDRESS.sub("", text).strip()[:200]


_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-f]+>")
