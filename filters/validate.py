"""`ImageValidator`: decode each downloaded image with Pillow and drop, with a reason, what is unusable.

Checks run cheapest first and the pixel budget is read from the header, so a decompression
bomb (a tiny PNG declaring 20000x20000 pixels) is rejected without being decoded.
"""
from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from schemas.config import ValidateConfig
from filters.record_filter import RecordFilter
from schemas.records import ImageRecord


class ImageValidator(RecordFilter):
    name = "validate"

    def __init__(self, config: ValidateConfig):
        self.config = config

    def check(self, record: ImageRecord) -> tuple[str | None, ImageRecord]:
        """Returns (reason, record): reason is None when the record is kept, then with RGB bytes and size."""
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
        if width * height > cfg.max_pixels:
            return f"pixels_too_large:{width}x{height}", record
        if min(width, height) < cfg.min_side:
            return f"too_small:{width}x{height}", record
        if max(width, height) / min(width, height) > cfg.max_aspect_ratio:
            return f"extreme_aspect_ratio:{width}x{height}", record
        try:
            image.load()
        except Exception as err:  # noqa: BLE001 - truncated or corrupt data
            return f"decode_error:{_one_line(err)}", record
        data = record.image
        if image.mode != "RGB" or image.format not in ("JPEG", "PNG", "WEBP"):
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=95)
            data = buffer.getvalue()
        return None, record.model_copy(update={"image": data, "width": width, "height": height, "caption": caption})


def _one_line(err: Exception) -> str:
    """First line of the error, without object addresses, so the same input always gets the same reason."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    return _ADDRESS.sub("", text).strip()[:200]


_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-f]+>")
