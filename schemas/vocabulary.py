"""Object names as they are written and spoken: the 80 COCO categories, their plurals, counts and synonyms.

Shared by the sample world's captions, the probes the program writes and the grounding verifier
that reads the teacher's answers, so all three use one spelling of every object.
"""
from __future__ import annotations

import re
from functools import lru_cache

COCO_CATEGORIES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

# Plurals that adding "s" gets wrong. "skis" and "scissors" are already plural and are
# counted in pairs by captions ("a pair of skis").
_IRREGULAR_PLURALS = {
    "person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep",
    "broccoli": "broccoli", "skis": "skis", "scissors": "scissors",
}
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve")
_COUNTED_IN = {"skis": "pair", "scissors": "pair", "broccoli": "piece"}  # "a pair of skis"

# Other words a writer uses for a category; a mention of any of them asserts the category.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "men", "woman", "women", "boy", "boys", "girl", "girls", "child", "children", "kid", "kids",
               "pedestrian", "pedestrians", "persons"),
    "motorcycle": ("motorbike", "motorbikes"), "airplane": ("plane", "planes", "aeroplane", "aeroplanes", "jet"),
    "tv": ("television", "televisions", "tvs"), "couch": ("sofa", "sofas"), "dining table": ("table", "tables"),
    "cell phone": ("phone", "phones", "cellphone", "smartphone"), "potted plant": ("plant", "plants", "houseplant"),
    "sports ball": ("ball", "balls", "football", "soccer ball"), "hair drier": ("hair dryer", "hairdryer"),
    "donut": ("doughnut", "doughnuts"), "refrigerator": ("fridge", "fridges"), "remote": ("remote control",),
    "teddy bear": ("teddy",), "bicycle": ("bike", "bikes"), "wine glass": ("wineglass",),
}


def plural(name: str) -> str:
    if name in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[name]
    if name.endswith(("s", "sh", "ch", "x")):  # bus, glass, toothbrush, couch, sandwich
        return name + "es"
    return name + "s"


def indefinite(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def number_word(count: int) -> str:
    return NUMBER_WORDS[count] if count < len(NUMBER_WORDS) else str(count)


def noun_phrase(name: str, count: int) -> str:
    """How captions and answers say a count: "a knife", "two knives", "a pair of skis"."""
    if name in _COUNTED_IN:
        unit = _COUNTED_IN[name]
        return f"a {unit} of {name}" if count == 1 else f"{number_word(count)} {plural(unit)} of {name}"
    return indefinite(name) if count == 1 else f"{number_word(count)} {plural(name)}"


def be(name: str) -> str:
    """The verb agreeing with the bare name: "the cup is", "there is no cup"; "skis" and "scissors" are
    plural as they stand: "the skis are", "there are no scissors"."""
    return "are" if _COUNTED_IN.get(name) == "pair" else "is"


@lru_cache(maxsize=8)
def surface_forms(vocabulary: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(written form, category) pairs, longest first so "teddy bear" wins over "bear"."""
    forms = {}
    for name in vocabulary:
        for form in (name, plural(name), *SYNONYMS.get(name, ())):
            forms.setdefault(form, name)
    return tuple(sorted(forms.items(), key=lambda kv: (-len(kv[0]), kv[0])))


@lru_cache(maxsize=8)
def mention_pattern(vocabulary: tuple[str, ...]) -> re.Pattern:
    alternatives = "|".join(re.escape(form) for form, _ in surface_forms(vocabulary))
    return re.compile(rf"\b({alternatives})\b", re.IGNORECASE)
