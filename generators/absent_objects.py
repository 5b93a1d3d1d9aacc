"""Counterfactual probes: yes/no questions whose label the program decides from the image's objects.

A global step in two halves. `fit_object_statistics` counts, over all images, how many contain
each category and how often two categories appear together. `AbsentObjectSampler` then writes per
image (deterministically, seeded by uid), for every image that reaches it:

- "no" questions about absent objects, picked by POPE's strategies: random, popular (most frequent
  in the dataset) and adversarial (most often seen with what is present) - never a present one;
- "yes" questions about present objects, so that yes/no is balanced by default;
- count and position manipulations ("Are there three cups?" when there are two) where boxes say so.

Each probe's answer is the program's, in one of a few phrasings picked by (uid, probe index); every
phrasing opens with "Yes" / "No" and is read as its label by POPE's rule (`filters.yes_no`). A count or
side manipulation's answer always says the truth ("No, there are two cups.").
`generate.max_images` no longer drops images here: the record's `teacher_selected` says whether the
teacher writes for it; the others keep their probes with the program's phrasings. The teacher may only
rephrase the answer; the grounding verifier checks that the label and the object survived.
"""
from __future__ import annotations

import hashlib
import random
from collections import Counter
from itertools import combinations

from schemas.vocabulary import COCO_CATEGORIES, be, noun_phrase
from schemas.config import GenerateConfig, ObjectsConfig
from schemas.records import ImageRecord, ObjectAnnotation, Probe, StageResult


Draft = tuple[Probe, list[str]]  # a probe and the phrasings of its answer, the first one in `answer`


def seeded_rng(*parts) -> random.Random:
    """A generator that depends only on `parts` (never on the process's hash seed)."""
    key = "|".join(str(p) for p in parts)
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:16], 16))


def record_objects(record: ImageRecord) -> list[ObjectAnnotation]:
    return list(record.objects or [])


def fit_object_statistics(object_lists: list[list[str]]) -> dict:
    """Image frequency per category and co-occurrence counts per category pair, over the dataset."""
    frequency, pairs = Counter(), Counter()
    for names in object_lists:
        present = sorted(set(names))
        frequency.update(present)
        pairs.update(f"{a}|{b}" for a, b in combinations(present, 2))
    return {"images": len(object_lists), "frequency": dict(frequency), "cooccurrence": dict(pairs)}


def _side(obj: ObjectAnnotation) -> str | None:
    centre = (obj.box[0] + obj.box[2]) / 2
    return "left" if centre < 0.4 else "right" if centre > 0.6 else None  # the middle fifth says neither


def _draft(phrasings: list[str], **probe) -> Draft:
    return Probe(answer=phrasings[0], **probe), phrasings


def present_probe(name: str, count: int) -> Draft:
    there = f"there {'is' if count == 1 else 'are'} {noun_phrase(name, count)}"
    return _draft([f"Yes, {there} in the image.", f"Yes, I can see {noun_phrase(name, count)}.", "Yes."],
                  question=f"Is there {noun_phrase(name, 1)} in the image?", label="yes", kind="present", category=name)


def absent_probe(name: str, strategy: str, seen: str) -> Draft:
    """`seen`: what is in the image instead ("a cup, two forks"), or "" when nothing is."""
    denial = f"No, there {be(name)} no {name} in the image."
    phrasings = [denial, *([f"{denial} I can see {seen}."] if seen else []),
                 f"No, I do not see {noun_phrase(name, 1)} here.", "No."]
    return _draft(phrasings, question=f"Is there {noun_phrase(name, 1)} in the image?", label="no", kind="absent",
                  category=name, strategy=strategy)


def count_probe(name: str, true: int, wrong: int) -> Draft:
    asked = f"Are there {noun_phrase(name, wrong)} in the image?"  # wrong >= 2, see _manipulations
    return _draft([f"No, there {'is' if true == 1 else 'are'} {noun_phrase(name, true)}.",
                   f"No, I can see {noun_phrase(name, true)}."],
                  question=asked, label="no", kind="count", category=name)


def position_probe(name: str, side: str) -> Draft:
    other = "right" if side == "left" else "left"
    return _draft([f"No, the {name} {be(name)} on the {side} side of the image.",
                   f"No, the {name} {be(name)} on the {side} side."],
                  question=f"{be(name).capitalize()} the {name} on the {other} side of the image?", label="no",
                  kind="position", category=name)


class AbsentObjectSampler:
    """The per-batch half: probes for each image from the fitted statistics."""

    name = "probes"
    columns = ("objects", "probes", "teacher_selected")

    def __init__(self, fitted: dict, generate: GenerateConfig, objects: ObjectsConfig, seed: int = 0):
        self.stats, self.config, self.seed = fitted["statistics"], generate, seed
        self.selected = set(fitted["selected"]) if fitted.get("selected") is not None else None
        self.vocabulary = sorted(objects.vocabulary or COCO_CATEGORIES)

    def _cooccurrence(self, a: str, b: str) -> int:
        return self.stats["cooccurrence"].get(f"{min(a, b)}|{max(a, b)}", 0)

    def ranked_absent(self, strategy: str, present: set[str], rng: random.Random) -> list[str]:
        absent = [c for c in self.vocabulary if c not in present]
        if strategy == "random":
            return rng.sample(absent, len(absent))
        if strategy == "popular":
            return sorted(absent, key=lambda c: (-self.stats["frequency"].get(c, 0), c))
        return sorted(absent, key=lambda c: (-sum(self._cooccurrence(c, p) for p in present), c))  # adversarial

    def probes_for(self, uid: str, objects: list[ObjectAnnotation]) -> list[Probe]:
        rng = seeded_rng(self.seed, uid)
        counts = Counter(o.category for o in objects)
        present = sorted(counts)
        n = self.config.probes_per_image
        share = self.config.yes_share
        n_yes = min(round(n * share), len(present))
        # Balanced by default: as many "no" as "yes" (POPE); yes_share=0 asks only "no" questions.
        n_no = n - n_yes if share in (0.0, 1.0) or not present else round(n_yes * (1 - share) / share)
        drafts = [present_probe(name, counts[name]) for name in rng.sample(present, n_yes)]
        manipulations = self._manipulations(objects, counts, rng)[: round(n_no * self.config.manipulation_share)]
        drafts += manipulations
        used, strategies = set(), self.config.strategies
        seen = ", ".join(noun_phrase(c, counts[c]) for c in present[:3])
        for i in range(n_no - len(manipulations)):
            strategy = strategies[i % len(strategies)]
            choice = next((c for c in self.ranked_absent(strategy, set(present), rng) if c not in used), None)
            if choice is not None:
                used.add(choice)
                drafts.append(absent_probe(choice, strategy, seen))
        rng.shuffle(drafts)
        return [probe.model_copy(update={"answer": seeded_rng(self.seed, uid, i).choice(phrasings)})
                for i, (probe, phrasings) in enumerate(drafts)]

    @staticmethod
    def _manipulations(objects: list[ObjectAnnotation], counts: Counter, rng: random.Random) -> list[Draft]:
        """Wrong counts and wrong sides, only where boxes make the true answer certain."""
        found = []
        boxed = [o for o in objects if o.box is not None]
        for name in sorted({o.category for o in boxed}):
            true = counts[name]
            # Never ask about one object when there are more: "Is there a cup?" would truly be a yes.
            wrong = true + rng.choice([1, 2]) if true <= 2 else true + rng.choice([-1, 1])
            found.append(count_probe(name, true, wrong))
            side = _side(boxed[[o.category for o in boxed].index(name)]) if true == 1 else None
            if side:
                found.append(position_probe(name, side))
        rng.shuffle(found)
        return found

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        """Every image keeps its probes; `teacher_selected` says whether generate.max_images picked it."""
        result = StageResult()
        for record in records:
            probes = self.probes_for(record.uid, record_objects(record))
            result.kept.append(record.model_copy(update={
                "probes": probes,
                "teacher_selected": self.selected is None or record.uid in self.selected}))
        return result
