"""ImageValidator on hand-made records: each bad input gets its reason; good images come out RGB."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from filters.validate import ImageValidator
from infra.world_noise import bomb_png
from schemas.config import ValidateConfig
from schemas.records import ImageRecord


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def record(image: bytes | None, caption: str = "a red square") -> ImageRecord:
    return ImageRecord(uid="u1", url="http://x/a.jpg", caption=caption, image=image)


@pytest.fixture
def validator() -> ImageValidator:
    return ImageValidator(ValidateConfig(min_side=32, max_pixels=4_000_000, max_aspect_ratio=4.0, max_caption_chars=100))


def reason_of(validator: ImageValidator, rec: ImageRecord) -> str | None:
    result = validator([rec])
    assert len(result.kept) + len(result.dropped) == 1
    return result.dropped[0].reason if result.dropped else None


def test_good_jpeg_is_kept_byte_for_byte_with_its_size(validator):
    data = encode(Image.new("RGB", (64, 48), "red"))
    result = validator([record(data)])
    assert [r.image for r in result.kept] == [data]
    assert (result.kept[0].width, result.kept[0].height) == (64, 48)


def test_rgba_png_is_converted_to_rgb(validator):
    result = validator([record(encode(Image.new("RGBA", (40, 40), (0, 255, 0, 128)), "PNG"))])
    assert Image.open(io.BytesIO(result.kept[0].image)).mode == "RGB"


def test_decompression_bomb_is_rejected_without_decoding(validator, monkeypatch):
    data = bomb_png()
    assert len(data) < 100_000  # tiny on the wire...
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("a bomb must not be decoded"))
    assert reason_of(validator, record(data)).startswith("pixels_too_large")


def test_bomb_within_pillow_limit_is_caught_by_our_budget(validator):
    assert reason_of(validator, record(bomb_png(3000, 3000))) == "pixels_too_large:3000x3000"


@pytest.mark.parametrize(
    "payload, expected",
    [
        (b"<html><body>not an image</body></html>", "decode_error:cannot identify image file"),
        (encode(Image.effect_noise((200, 200), 40).convert("RGB"))[:2000], "decode_error:image file is truncated"),
        (encode(Image.new("RGB", (20, 64))), "too_small:20x64"),
        (encode(Image.new("RGB", (400, 40))), "extreme_aspect_ratio:400x40"),
        (None, "decode_error:no image bytes"),
    ],
)
def test_bad_images_get_their_reason(validator, payload, expected):
    assert reason_of(validator, record(payload)).startswith(expected)


@pytest.mark.parametrize("caption, expected", [("", "caption_empty"), ("   ", "caption_empty"),
                                                ("x" * 101, "caption_too_long:101"), (None, "caption_empty")])
def test_bad_captions_get_their_reason(validator, caption, expected):
    assert reason_of(validator, record(encode(Image.new("RGB", (64, 64))), caption)) == expected


def test_dropped_records_carry_stage_and_lose_their_bytes(validator):
    result = validator([record(b"junk")])
    (dropped,) = result.dropped
    assert dropped.status == "dropped" and dropped.stage == "validate" and dropped.image is None
