"""Image dependence ("did it look?"): each POPE question about object X on image A is asked again on
another held-out image B where X's presence is the opposite; the share of answers that flip is the
score. A model that answers from language priors (the same answer whatever the image) scores near 0,
one that looks at the image near 1.

B is drawn (seeded) from the images the same split already asks about X with the opposite label when
there are any, so most counter-questions are answers the eval already has; otherwise from every
held-out image with the opposite presence. The pairs are written next to the POPE files
(`image_dependence_{split}.jsonl`: question_id, image, counter_image, text, label, answer,
counter_answer, flipped), so anyone can re-read them.
"""
from __future__ import annotations

import random
import re
from collections import defaultdict

_OBJECT = re.compile(r"^Is there (?:a|an) (.+) in the image\?$")  # POPE's question form


def asked_object(text: str) -> str | None:
    found = _OBJECT.match(text.strip())
    return found.group(1) if found else None


def counter_questions(questions: list[dict], present: dict[str, set[str]], seed: int = 0) -> list[dict]:
    """For each question (image A, object X, label): the same text on an image B where X's presence is the
    opposite. `present` maps image file name -> objects in it (every held-out image). Questions whose
    object has no image of the opposite presence are left out (counted by the caller)."""
    asked = defaultdict(list)  # (object, label) -> images this split asks about it with that label
    for q in questions:
        asked[(asked_object(q["text"]), q["label"])].append(q["image"])
    images = sorted(present)
    pairs = []
    for q in questions:
        name = asked_object(q["text"])
        if name is None:
            continue
        opposite = "no" if q["label"] == "yes" else "yes"
        rng = random.Random(f"{seed}:{q['question_id']}")
        preferred = sorted(set(asked[(name, opposite)]) - {q["image"]})
        pool = preferred or [img for img in images if (name in present[img]) == (opposite == "yes") and img != q["image"]]
        if pool:
            pairs.append({"question_id": q["question_id"], "image": q["image"], "counter_image": rng.choice(pool),
                          "text": q["text"], "label": q["label"]})
    return pairs


def flip_rate(pairs: list[dict]) -> dict:
    """Share of pairs whose two answers read as different labels (POPE's rule), with counts."""
    flipped = sum(p["flipped"] for p in pairs)
    return {"image_dependence": flipped / len(pairs) if pairs else None, "flipped": flipped, "pairs": len(pairs)}
