"""ImageValidator on hand-made records: each bad input gets its reason; good images come out RGB."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image

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


def with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif)
    return buffer.getvalue()


def red_left_blue_right(width: int = 320, height: int = 256) -> Image.Image:
    """As the camera stored it; EXIF orientation 6 says "turn 90° clockwise to show", so the red half is the top."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))
    return image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_so_the_photo_is_stored_upright(validator, fmt):
    (kept,) = validator([record(with_orientation(red_left_blue_right(), 6, fmt))]).kept
    stored = Image.open(io.BytesIO(kept.image))
    assert (kept.width, kept.height) == stored.size == (256, 320)  # as it displays, not as the sensor wrote it
    assert stored.format == fmt and ExifTags.Base.Orientation not in stored.getexif()
    top, bottom = stored.getpixel((128, 60)), stored.getpixel((128, 260))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]


def test_an_upright_orientation_tag_keeps_the_bytes(validator):
    data = with_orientation(red_left_blue_right(), 1)
    assert [r.image for r in validator([record(data)]).kept] == [data]


@pytest.mark.parametrize("size, expected", [((64, 20), "too_small:20x64"), ((400, 80), "extreme_aspect_ratio:80x400")])
def test_size_reasons_are_about_the_displayed_size(validator, size, expected):
    assert reason_of(validator, record(with_orientation(Image.new("RGB", size), 8))) == expected


def grey_levels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float64)


def sixteen_bit_photo() -> np.ndarray:
    """A 16-bit grey 'photo': noise around grey 163 (of 255), a darker band to keep some contrast."""
    rng = np.random.default_rng(0)
    levels = np.clip(rng.normal(163 * 257, 20 * 257, (96, 128)), 0, 65535)
    levels[:, :32] *= 0.4
    return levels


@pytest.mark.parametrize("dtype, scale, fmt", [(np.uint16, 1, "PNG"), (np.int32, 1, "TIFF"),
                                               (np.float32, 1 / 65535, "TIFF")])
def test_high_bit_depth_grey_keeps_its_grey_levels(validator, dtype, scale, fmt):
    levels = sixteen_bit_photo()
    source = Image.fromarray((levels * scale).astype(dtype))
    assert source.mode in ("I;16", "I", "F")
    (kept,) = validator([record(encode(source, fmt))]).kept
    stored = grey_levels(kept.image)
    assert Image.open(io.BytesIO(kept.image)).mode == "RGB"
    assert stored.mean() == pytest.approx(levels.mean() / 257, rel=0.02)  # not washed out to white
    assert stored[:, :32].mean() < 0.5 * stored[:, 32:].mean()  # the dark band stays dark


@pytest.mark.parametrize("mode, color", [("L", 90), ("LA", (90, 200)), ("P", 90), ("1", 1)])
def test_grey_palette_and_alpha_pngs_come_out_rgb_with_their_colour(validator, mode, color):
    image = Image.new(mode, (48, 40), color)
    if mode == "P":
        image.putpalette([90, 90, 90] * 256)
        image.info["transparency"] = 0
    (kept,) = validator([record(encode(image, "PNG"))]).kept
    stored = Image.open(io.BytesIO(kept.image))
    expected = 255 if mode == "1" else 90
    assert stored.mode == "RGB" and abs(grey_levels(kept.image).mean() - expected) < 2


def test_placeholders_in_the_caption_are_stored_inert(validator):
    (kept,) = validator([record(encode(Image.new("RGB", (64, 64))), " a cat <image> on a <Image> mat ")]).kept
    assert kept.caption == "a cat [image] on a [Image] mat"
