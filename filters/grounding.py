"""The grounding verifier: every generated answer is checked against the objects really in the image.

A turn (question + answer) is removed, with its reason, when the answer
- asserts a vocabulary object that is not in the image (`asserts_absent:<category>`),
- denies an object that is in the image ("there is no person" when a person is there:
  `denies_present:<category>`; a denied number, "not three cups", denies the count, not the object),
- states a count of an object that contradicts the annotation (`count_mismatch:<category>`).

A rephrased probe answer must also open with Yes or No (`no_yes_no_opening`), that opening and POPE's
reading of it (`filters.yes_no`, the one reader the evals use too) must both be the program's label
(`label_flipped:<yes|no>`), and it must be about the probe's own object: it names it (a bare "Yes." /
"No." names none and is fine) and denies no other (`other_object:<category>`, or
`missing_object:<category>` when it names no object at all). A failing probe answer falls back to the
program's own answer (the label is the program's, the teacher only words it), so a `negatives`
record keeps every turn and its provenance's `probe_labels` / `probe_kinds` stay aligned; other
conversations are kept turn by turn, with those lists filtered alike. An image left with no turn at all
is dropped (`no_verified_turns`). Mentions inside a negation ("there is no dog", "I don't see a dog")
do not assert the object.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass

from filters.yes_no import answer_to_label, is_bare_yes_no, opening_yes_no
from schemas.vocabulary import COCO_CATEGORIES, NUMBER_WORDS, mention_pattern, surface_forms
from schemas.records import IMAGE_TOKEN, ImageRecord, ObjectAnnotation, StageResult, llava_conversation

_NEGATORS = {"no", "not", "never", "without", "none", "neither", "nor", "nothing", "cannot", "absent", "lacks"}
_CLAUSE = re.compile(r"[.;:!?,]|\bbut\b|\bwhile\b|\bwhereas\b|\bhowever\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9']+")
_COUNT_WORDS = {w: i for i, w in enumerate(NUMBER_WORDS) if i > 0}


_DETERMINERS = {"a", "an", "any", "the", "single", "one"}
_SEEING = {"see", "spot", "find", "notice", "have", "show", "shows", "contain", "contains"}


@dataclass(frozen=True)
class Mention:
    category: str
    negated: bool  # a negator anywhere before it in the clause: the mention asserts nothing
    denied: bool  # the negation is about this object itself ("no dog", "don't see a dog", "isn't a dog")
    count: int | None  # an explicit number right before the noun ("two cups", "3 cups")


def _is_negator(word: str) -> bool:
    return word in _NEGATORS or word.endswith("n't")


def _denies(before: list[str]) -> bool:
    """The words right before a noun negate it: "no (small) dog", "not a dog", "don't see any dog" — and not
    "is not holding the cup", where the negation is about something else."""
    words = [w for w in before[-4:] if w not in _DETERMINERS]
    if words and _is_negator(words[-1]):
        return True
    return len(words) >= 2 and words[-1] in _SEEING and _is_negator(words[-2])


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
            found.append(Mention(forms[m.group(1).lower()], negated, _denies(before), count))
    return found


TURN_ALIGNED = ("probe_labels", "probe_kinds")  # provenance lists with one entry per (human, gpt) turn


def mention_problem(found: list[Mention], objects: list[ObjectAnnotation], excused: set[str]) -> str | None:
    """What any answer may not do: assert an absent object, deny a present one, or miscount one."""
    present = Counter(o.category for o in objects)
    counted = all(o.source == "annotation" for o in objects)  # zero-shot tags say nothing about numbers
    for m in found:
        if m.negated:
            if m.denied and m.category in present and m.count is None and m.category not in excused:
                return f"denies_present:{m.category}"
            continue
        if m.category not in present:
            return f"asserts_absent:{m.category}"
        if counted and m.count is not None and m.count != present[m.category]:
            return f"count_mismatch:{m.category}"
    return None


def probe_answer_problem(answer: str, found: list[Mention], probe: dict) -> str | None:
    """What a probe answer may not do: hide or flip its yes/no, or answer about another object."""
    label, own = probe["label"], probe["category"]
    opening = opening_yes_no(answer)
    if opening is None:
        return "no_yes_no_opening"
    if opening != label or answer_to_label(answer) != label:
        return f"label_flipped:{label}"
    denied = next((m.category for m in found if m.denied and m.category != own), None)
    if denied is not None:
        return f"other_object:{denied}"
    if is_bare_yes_no(answer) or any(m.category == own for m in found):
        return None
    return f"other_object:{found[0].category}" if found else f"missing_object:{own}"


class GroundingVerifier:
    name = "verify"
    columns = ("objects", "probes", "instructions", "rejected_turns")

    def __init__(self, vocabulary: list[str] | None = None):
        self.vocabulary = tuple(vocabulary or COCO_CATEGORIES)

    def check_answer(self, answer: str, objects: list[ObjectAnnotation], probe: dict | None = None) -> str | None:
        """The reason this answer is not grounded, or None when it is."""
        found = mentions(answer, self.vocabulary)
        reason = probe_answer_problem(answer, found, probe) if probe is not None else None
        # A count or side probe denies a number or a place of its own object, not the object.
        excused = {probe["category"]} if probe is not None and probe["kind"] in ("count", "position") else set()
        return reason or mention_problem(found, objects, excused)

    def verify_item(self, item: dict, objects: list[ObjectAnnotation], probes: list[dict]) -> tuple[dict | None, list]:
        """(the LLaVA record with only grounded turns or None, rejected turns with reasons)."""
        turns, kept_turns, good, rejected = item["conversations"], [], [], []
        for i in range(0, len(turns) - 1, 2):
            question, answer = turns[i]["value"].replace(f"{IMAGE_TOKEN}\n", ""), turns[i + 1]["value"]
            probe = probes[i // 2] if item["type"] == "negatives" else None
            reason = self.check_answer(answer, objects, probe)
            if reason is not None:
                rejected.append({"type": item["type"], "reason": reason, "question": question, "answer": answer})
                if probe is None:
                    continue
                answer = probe["answer"]  # the program's answer: grounded by construction
            kept_turns.append(i // 2)
            good.append((question, answer))
        if not good:
            return None, rejected
        provenance = {key: [value[k] for k in kept_turns] if key in TURN_ALIGNED else value
                      for key, value in item.get("provenance", {}).items()}
        return {**item, "conversations": llava_conversation(good), "provenance": provenance}, rejected

    def verify(self, record: ImageRecord) -> tuple[list[dict], list[dict]]:
        """(instructions with only grounded turns, rejected turns with reasons)."""
        objects = list(record.objects or [])
        probes = [probe.model_dump() for probe in record.probes or []]
        kept, rejected = [], []
        for item in json.loads(record.instructions or "[]"):
            verified, removed = self.verify_item(item, objects, probes)
            kept += [verified] if verified is not None else []
            rejected += removed
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
