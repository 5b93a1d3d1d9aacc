"""What the sample world is made of: COCO categories drawn as OpenMoji glyphs, and scene types.

Pure data. `infra/sample_world.py` renders scenes from it; tests and generators read the
vocabulary from here so that every caption and box speaks the same category names as COCO.
"""

from __future__ import annotations

from dataclasses import dataclass

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Category:
    name: str  # COCO 2017 category name
    coco_id: int  # real COCO 2017 id (ids are not contiguous: 12, 26, 29, ... are unused)
    supercategory: str
    emoji: str  # OpenMoji codepoint, hex without "U+"; checked to render well at 109 px


@dataclass(frozen=True)
class SceneType:
    name: str
    top_color: RGB  # wall or sky
    bottom_color: RGB  # floor or ground
    horizon: float  # fraction of the height where top turns into bottom
    objects: tuple[tuple[str, float], ...]  # (category name, prior weight)


def _cats(supercategory: str, *rows: tuple[str, int, str]) -> tuple[Category, ...]:
    return tuple(Category(name, coco_id, supercategory, emoji) for name, coco_id, emoji in rows)


# The 64 of COCO's 80 categories that OpenMoji draws recognisably.
CATEGORIES: tuple[Category, ...] = (
    _cats("person", ("person", 1, "1F9CD"))
    + _cats(
        "vehicle",
        ("bicycle", 2, "1F6B2"), ("car", 3, "1F697"), ("motorcycle", 4, "1F3CD"),
        ("airplane", 5, "2708"), ("bus", 6, "1F68C"), ("train", 7, "1F686"),
        ("truck", 8, "1F69A"), ("boat", 9, "26F5"),
    )
    + _cats("outdoor", ("traffic light", 10, "1F6A6"), ("stop sign", 13, "1F6D1"))
    + _cats(
        "animal",
        ("bird", 16, "1F426"), ("cat", 17, "1F408"), ("dog", 18, "1F415"),
        ("horse", 19, "1F40E"), ("sheep", 20, "1F411"), ("cow", 21, "1F404"),
        ("elephant", 22, "1F418"), ("bear", 23, "1F43B"), ("zebra", 24, "1F993"),
        ("giraffe", 25, "1F992"),
    )
    + _cats(
        "accessory",
        ("backpack", 27, "1F392"), ("umbrella", 28, "2602"), ("handbag", 31, "1F45C"),
        ("tie", 32, "1F454"), ("suitcase", 33, "1F9F3"),
    )
    + _cats(
        "sports",
        ("frisbee", 34, "1F94F"), ("skis", 35, "1F3BF"), ("sports ball", 37, "26BD"),
        ("kite", 38, "1FA81"), ("skateboard", 41, "1F6F9"),
    )
    + _cats(
        "kitchen",
        ("bottle", 44, "1F37E"), ("wine glass", 46, "1F377"), ("cup", 47, "2615"),
        ("fork", 48, "1F374"), ("knife", 49, "1F52A"), ("spoon", 50, "1F944"),
        ("bowl", 51, "1F963"),
    )
    + _cats(
        "food",
        ("banana", 52, "1F34C"), ("apple", 53, "1F34E"), ("sandwich", 54, "1F96A"),
        ("orange", 55, "1F34A"), ("broccoli", 56, "1F966"), ("carrot", 57, "1F955"),
        ("hot dog", 58, "1F32D"), ("pizza", 59, "1F355"), ("donut", 60, "1F369"),
        ("cake", 61, "1F382"),
    )
    + _cats(
        "furniture",
        ("chair", 62, "1FA91"), ("couch", 63, "1F6CB"), ("potted plant", 64, "1FAB4"),
        ("bed", 65, "1F6CF"), ("toilet", 70, "1F6BD"),
    )
    + _cats(
        "electronic",
        ("tv", 72, "1F4FA"), ("laptop", 73, "1F4BB"), ("mouse", 74, "1F5B1"),
        ("keyboard", 76, "2328"), ("cell phone", 77, "1F4F1"),
    )
    + _cats(
        "indoor",
        ("book", 84, "1F4D5"), ("clock", 85, "23F0"), ("vase", 86, "1F3FA"),
        ("scissors", 87, "2702"), ("teddy bear", 88, "1F9F8"), ("toothbrush", 90, "1FAA5"),
    )
)

CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in CATEGORIES)
_BY_NAME = {c.name: c for c in CATEGORIES}


def category_by_name(name: str) -> Category:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name!r} is not a sample-world category; see CATEGORY_NAMES.") from None


# How category names are spoken lives with the generators, so captions and answers agree.
from schemas.vocabulary import indefinite, noun_phrase, plural  # noqa: E402,F401


# Object priors follow COCO co-occurrence: what you find in a kitchen photo is cups, bowls
# and cutlery, in a street photo cars, buses and people. Weights are relative per scene.
SCENES: tuple[SceneType, ...] = (
    SceneType("kitchen", (236, 226, 200), (170, 134, 98), 0.55, (
        ("cup", 3), ("bowl", 3), ("knife", 2), ("spoon", 2), ("fork", 2), ("banana", 2),
        ("apple", 2), ("orange", 2), ("bottle", 2), ("broccoli", 2), ("carrot", 2),
        ("wine glass", 1), ("sandwich", 1), ("scissors", 1), ("vase", 1), ("clock", 1),
        ("person", 1), ("potted plant", 1), ("chair", 1), ("cake", 1),
    )),
    SceneType("dining room", (222, 205, 180), (128, 92, 70), 0.55, (
        ("pizza", 3), ("wine glass", 3), ("cup", 2), ("fork", 2), ("knife", 2), ("spoon", 1),
        ("bowl", 2), ("cake", 2), ("donut", 2), ("hot dog", 1), ("sandwich", 2), ("chair", 3),
        ("person", 2), ("bottle", 2), ("vase", 1),
    )),
    SceneType("living room", (214, 206, 186), (150, 120, 96), 0.6, (
        ("couch", 3), ("tv", 3), ("chair", 2), ("potted plant", 2), ("clock", 2), ("book", 2),
        ("vase", 1), ("cat", 2), ("dog", 1), ("teddy bear", 1), ("person", 2), ("cup", 1),
        ("laptop", 1),
    )),
    SceneType("bedroom", (206, 214, 228), (160, 140, 120), 0.55, (
        ("bed", 4), ("teddy bear", 2), ("book", 2), ("clock", 2), ("laptop", 1),
        ("cell phone", 1), ("tv", 1), ("cat", 1), ("chair", 1), ("suitcase", 1), ("vase", 1),
        ("person", 1),
    )),
    SceneType("bathroom", (204, 224, 228), (134, 156, 170), 0.6, (
        ("toilet", 4), ("toothbrush", 3), ("bottle", 2), ("cup", 2), ("scissors", 1),
        ("vase", 1), ("potted plant", 1), ("clock", 1), ("book", 1), ("cat", 1),
    )),
    SceneType("office", (226, 228, 222), (126, 130, 140), 0.58, (
        ("laptop", 3), ("keyboard", 3), ("mouse", 3), ("cell phone", 2), ("cup", 2),
        ("book", 2), ("chair", 2), ("person", 2), ("clock", 1), ("tie", 1), ("scissors", 1),
        ("bottle", 1), ("potted plant", 1), ("backpack", 1), ("tv", 1),
    )),
    SceneType("street", (176, 204, 230), (128, 128, 128), 0.42, (
        ("car", 4), ("person", 4), ("bus", 2), ("truck", 2), ("traffic light", 2),
        ("motorcycle", 2), ("bicycle", 2), ("stop sign", 1), ("handbag", 1), ("backpack", 1),
        ("umbrella", 1), ("dog", 1), ("cell phone", 1), ("tie", 1),
    )),
    SceneType("railway station", (196, 200, 206), (150, 140, 128), 0.45, (
        ("train", 4), ("person", 4), ("suitcase", 2), ("backpack", 2), ("clock", 2),
        ("handbag", 1), ("cell phone", 1), ("umbrella", 1), ("traffic light", 1),
    )),
    SceneType("airport", (186, 214, 238), (156, 156, 150), 0.48, (
        ("airplane", 4), ("suitcase", 3), ("person", 3), ("truck", 2), ("backpack", 1),
        ("handbag", 1), ("bus", 1), ("cell phone", 1),
    )),
    SceneType("park", (180, 214, 240), (132, 176, 100), 0.4, (
        ("person", 4), ("dog", 3), ("bicycle", 2), ("frisbee", 2), ("kite", 2),
        ("sports ball", 2), ("skateboard", 2), ("bird", 1), ("umbrella", 1), ("backpack", 1),
        ("hot dog", 1), ("chair", 1),
    )),
    SceneType("beach", (170, 210, 240), (232, 214, 170), 0.45, (
        ("umbrella", 3), ("person", 3), ("boat", 3), ("kite", 2), ("frisbee", 1),
        ("sports ball", 1), ("dog", 1), ("bird", 2), ("bottle", 1), ("handbag", 1),
        ("chair", 1),
    )),
    SceneType("farm", (186, 212, 236), (150, 168, 104), 0.42, (
        ("cow", 3), ("sheep", 3), ("horse", 3), ("dog", 2), ("cat", 1), ("person", 2),
        ("bird", 1), ("truck", 1), ("carrot", 1), ("apple", 1),
    )),
    SceneType("savanna", (214, 220, 226), (200, 176, 120), 0.4, (
        ("elephant", 3), ("zebra", 3), ("giraffe", 3), ("bird", 1), ("car", 1), ("person", 1),
    )),
    SceneType("snowy mountain", (196, 214, 232), (236, 238, 242), 0.4, (
        ("skis", 3), ("person", 3), ("backpack", 2), ("bear", 2), ("dog", 1), ("bird", 1),
    )),
)
