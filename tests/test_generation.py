"""Probes, the grounding verifier and the teacher cache, called directly on hand-made records."""
from __future__ import annotations

import json

from filters.grounding import GroundingVerifier, mentions, yes_or_no
from generators.absent_objects import AbsentObjectSampler, fit_object_statistics
from generators.teacher_cache import TeacherCache, cache_key
from generators.vocabulary import COCO_CATEGORIES
from schemas.config import GenerateConfig, ObjectsConfig
from schemas.records import ImageRecord, ObjectAnnotation, llava_conversation


def obj(category: str, x0: float = 0.1, x1: float = 0.2) -> ObjectAnnotation:
    return ObjectAnnotation(category=category, box=(x0, 0.4, x1, 0.6))


def record(uid: str, objects: list[ObjectAnnotation], **extra) -> ImageRecord:
    return ImageRecord(uid=uid, url=f"http://x/{uid}.jpg", caption="c",
                       objects=json.dumps([o.model_dump() for o in objects]), **extra)


# A dataset where 'person' is the most frequent category and 'fork' co-occurs most with 'cup'.
DATASET = [["person", "car"], ["person", "bus"], ["person", "dog"], ["cup", "fork"], ["cup", "fork", "knife"],
           ["cup", "bowl"]]


def sampler(**generate) -> AbsentObjectSampler:
    fitted = {"statistics": fit_object_statistics(DATASET), "selected": None}
    return AbsentObjectSampler(fitted, GenerateConfig(**generate), ObjectsConfig())


def test_popular_and_adversarial_pick_what_pope_would():
    s = sampler(probes_per_image=2, strategies=["popular"], manipulation_share=0.0)
    absent = [p for p in s.probes_for("a", [obj("cup")]) if p.label == "no"]
    assert [(p.category, p.strategy) for p in absent] == [("person", "popular")]  # in 3 of 6 images
    s = sampler(probes_per_image=2, strategies=["adversarial"], manipulation_share=0.0)
    absent = [p for p in s.probes_for("a", [obj("cup")]) if p.label == "no"]
    assert [p.category for p in absent] == ["fork"]  # seen with 'cup' twice, more than bowl or knife


def test_probes_never_ask_no_about_a_present_object_and_are_balanced():
    s = sampler(probes_per_image=6)
    for i in range(200):
        present = [obj(c) for c in COCO_CATEGORIES[i % 70: i % 70 + 1 + i % 5]]
        probes = s.probes_for(f"u{i}", present)
        names = {o.category for o in present}
        for p in probes:
            if p.kind == "absent":
                assert p.category not in names and p.label == "no"
            if p.kind == "present":
                assert p.category in names and p.label == "yes"
        yes = sum(p.label == "yes" for p in probes)
        assert yes == len(probes) - yes, probes  # balanced by default
    assert s.probes_for("u1", [obj("cup")]) == s.probes_for("u1", [obj("cup")])  # deterministic per uid


def test_count_and_position_manipulations_carry_the_true_answer():
    s = sampler(probes_per_image=8, manipulation_share=1.0)
    probes = s.probes_for("m", [obj("cup", 0.05, 0.15), obj("cup", 0.2, 0.3), obj("dog", 0.8, 0.95)])
    counts = {p.question: p for p in probes if p.kind == "count"}
    assert counts and all(p.label == "no" for p in counts.values())
    cup = next(p for p in counts.values() if p.category == "cup")
    assert "two cups" in cup.answer and "Are there two cups" not in cup.question
    position = next(p for p in probes if p.kind == "position")
    assert position.category == "dog" and "left side" in position.question and "right side" in position.answer


def test_selection_drops_unselected_images_with_a_reason():
    fitted = {"statistics": fit_object_statistics(DATASET), "selected": ["keep"]}
    s = AbsentObjectSampler(fitted, GenerateConfig(), ObjectsConfig())
    result = s([record("keep", [obj("cup")]), record("skip", [obj("cup")])])
    assert [r.uid for r in result.kept] == ["keep"]
    assert result.dropped[0].reason.startswith("not_selected:")


def test_mentions_understand_negation_plurals_synonyms_and_counts():
    found = mentions("No, I don't see a dog; there are two cups, 3 sofas and a teddy bear.")
    assert [(m.category, m.negated, m.count) for m in found] == [
        ("dog", True, None), ("cup", False, 2), ("couch", False, 3), ("teddy bear", False, None)]
    assert yes_or_no("No, there is not.") == "no" and yes_or_no("Yes. But no dog.") == "yes"


def llava(kind: str, pairs: list[tuple[str, str]]) -> dict:
    return {"id": f"u-{kind}", "type": kind, "conversations": llava_conversation(pairs), "provenance": {}}


def test_verifier_removes_ungrounded_turns_with_reasons_and_keeps_the_rest():
    objects = [obj("cup"), obj("cup"), obj("banana")]
    probes = [{"question": "Is there a dog in the image?", "label": "no", "answer": "No, there is no dog in the image.",
               "kind": "absent", "category": "dog"}]
    instructions = [
        llava("conversation", [("What is there?", "A dog sits by the cups."),  # dog is absent
                               ("How many cups?", "There are three cups."),  # there are two
                               ("Any fruit?", "Yes, a banana, but no apple.")]),  # negated apple is fine
        llava("negatives", [("Is there a dog in the image?", "Yes, a dog.")]),  # label flipped
    ]
    r = record("u", objects, instructions=json.dumps(instructions), probes=json.dumps(probes))
    result = GroundingVerifier()([r])
    kept = json.loads(result.kept[0].instructions)
    conversation = kept[0]["conversations"]
    assert [t["value"] for t in conversation] == ["<image>\nAny fruit?", "Yes, a banana, but no apple."]
    assert kept[1]["conversations"][1]["value"] == "No, there is no dog in the image."  # the program's answer
    reasons = [t["reason"] for t in json.loads(result.kept[0].rejected_turns)]
    assert reasons == ["asserts_absent:dog", "count_mismatch:cup", "label_flipped:no"]


def test_verifier_drops_an_image_with_no_grounded_turn_left():
    instructions = [llava("detail", [("Describe it.", "A giraffe eats a pizza.")])]
    result = GroundingVerifier()([record("u", [obj("cup")], instructions=json.dumps(instructions))])
    assert not result.kept and result.dropped[0].reason == "no_verified_turns"


def test_cache_key_covers_everything_that_changes_an_answer(tmp_path):
    base = dict(model="m", prompt_version="1", messages=[{"role": "user", "content": "hi"}],
                sampling={"temperature": 0.2, "seed": 1}, schema={"type": "object"})
    key = cache_key(**base)
    for field, other in [("model", "m2"), ("prompt_version", "2"), ("messages", [{"role": "user", "content": "ho"}]),
                         ("sampling", {"temperature": 0.2, "seed": 2}), ("schema", {"type": "array"})]:
        assert cache_key(**{**base, field: other}) != key, field
    cache = TeacherCache(tmp_path)
    assert cache.get(key) is None
    cache.put(key, {"content": "{}"})
    assert cache.get(key) == {"content": "{}"}
    assert not list(tmp_path.rglob(".tmp-*"))  # written whole, then renamed
