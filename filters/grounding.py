"""The grounding verifier: every generated answer is checked against the objects really in the image.

A turn (question + answer) is removed, with its reason, when the answer
- asserts a vocabulary object that is not in the image (`asserts_absent:<category>`),
- states a count of an object that contradicts the annotation (`count_mismatch:<category>`),
- is a probe answer whose yes/no is not the program's label (`label_flipped:<yes|no>`).

Conversations are kept turn by turn; a rephrased probe answer that fails falls back to the
program's own answer (the label is the program's, the teacher only words it). An image left with
no turn at all is dropped (`no_verified_turns`). Mentions inside a negation ("there is no dog",
"I don't see a dog") do not assert the object.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from generators.vocabulary import COCO_CATEGORIES, NUMBER_WORDS, mention_pattern, surface_forms
from schemas.records import ImageRecord, ObjectAnnotation, StageResult, llava_conversation

_NEGATORS = {"no", "not", "never", "without", "none", "neither", "nor", "nothing", "cannot", "absent", "lacks"}
_CLAUSE = re.compile(r"[.;:!?,]|\bbut\b|\bwhile\b|\bwhereas\b|\bhowever\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9']+")
_COUNT_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS) if i > 0}


@dataclass(frozen=True)
class Mention:
    category: str
    negated: bool
    count: int | None  # an explicit number right before the noun ("two cups", "3 cups")


def _is_negator(word: str) -> bool:
    return word in _NEGATORS or word.endswith("n't")


def mentions(text: str, vocabulary: tuple[str, ...] = COCO_CATEGORIES) -> list[Mention]:
    forms = dict(surface_forms(vocabulary))
    found = []
    pattern = mention_pattern(vocabulary)
    for clause in _CLAUSE.split(text):
        for m in pattern.finditer(clause):
            before = _WORD.findall(clause[: m.start()].lower())
            negated = any(_is_negator(w) for w in before)
            count = None
            for back in before[-2:][::-1]:  # "two cups", "two small cups"
                if back.isdigit():
                    count = int(back)
                    break
                if back in _COUNT_WORDS:
                    count = _COUNT_WORDS[back]
                    break
            found.append(Mention(forms[m.group(1).lower()], negated, count))
    return found


def yes_or_no(answer: str) -> str:
    """POPE's rule: the first sentence is 'no' when it holds the word no / not (or a n't form), else 'yes'."""
    first = answer.split(".")[0].replace(",", " ").lower()
    return "no" if any(_is_negator(w) and w != "without" for w in _WORD.findall(first)) else "yes"


class GroundingVerifier:
    name = "verify"

    def __init__(self, vocabulary: list[str] | None = None):
        self.vocabulary = tuple(vocabulary or COCO_CATEGORIES)

    def check_answer(self, answer: str, objects: list[ObjectAnnotation], probe: dict | None = None) -> str | None:
        """The reason this answer is not grounded, or None when it is."""
        present = Counter(o.category for o in objects)
        counted = all(o.source == "annotation" for o in objects)  # zero-shot tags say nothing about numbers
        if probe is not None and yes_or_no(answer) != probe["label"]:
            return f"label_flipped:{probe['label']}"
        for m in mentions(answer, self.vocabulary):
            if m.negated:
                continue
            if m.category not in present:
                return f"asserts_absent:{m.category}"
            if counted and m.count is not None and m.count != present[m.category]:
                return f"count_mismatch:{m.category}"
        return None

    def verify(self, record: ImageRecord) -> tuple[list[dict], list[dict]]:
        """(instructions with only grounded turns, rejected turns with reasons)."""
        objects = [ObjectAnnotation.model_validate(o) for o in json.loads(record.objects or "[]")]
        probes = json.loads(record.probes or "[]")
        kept, rejected = [], []
        for item in json.loads(record.instructions or "[]"):
            turns = item["conversations"]
            good = []
            for i in range(0, len(turns) - 1, 2):
                question, answer = turns[i]["value"].replace("<image>\n", ""), turns[i + 1]["value"]
                probe = probes[i // 2] if item["type"] == "negatives" else None
                reason = self.check_answer(answer, objects, probe)
                if reason is not None:
                    rejected.append({"type": item["type"], "reason": reason, "question": question, "answer": answer})
                    if probe is None:
                        continue
                    answer = probe["answer"]  # the program's answer: grounded by construction
                good.append((question, answer))
            if good:
                kept.append({**item, "conversations": llava_conversation(good)})
        return kept, rejected

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        result = StageResult()
        for record in records:
            kept, rejected = self.verify(record)
            update = {"instructions": json.dumps(kept), "rejected_turns": json.dumps(rejected)}
            record = record.model_copy(update=update)
            if kept:
                result.kept.append(record)
            else:
                result.dropped.append(record.dropped(self.name, "no_verified_turns"))
        return result
