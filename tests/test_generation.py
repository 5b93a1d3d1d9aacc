"""Probes, the negatives record, the grounding verifier and the teacher cache, called directly on hand-made
records (no teacher server: only images the teacher does not write for, or requests built but not sent)."""
from __future__ import annotations

import json

import pytest

from filters.grounding import GroundingVerifier, mentions
from filters.yes_no import answer_to_label, opening_yes_no
from generators.absent_objects import AbsentObjectSampler, absent_probe, fit_object_statistics
from generators.instructions import InstructionGenerator
from generators.teacher import TeacherUsage
from generators.teacher_cache import TeacherCache, cache_key
from schemas.vocabulary import COCO_CATEGORIES
from schemas.config import GenerateConfig, ObjectsConfig, TeacherConfig
from schemas.records import ImageRecord, ObjectAnnotation, llava_conversation


def obj(category: str, x0: float = 0.1, x1: float = 0.2) -> ObjectAnnotation:
    return ObjectAnnotation(category=category, box=(x0, 0.4, x1, 0.6))


def record(uid: str, objects: list[ObjectAnnotation], **extra) -> ImageRecord:
    return ImageRecord(uid=uid, url=f"http://x/{uid}.jpg", caption="c",
                       objects=objects, **extra)


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


def test_every_image_gets_probes_and_selection_only_marks_the_teachers_images():
    fitted = {"statistics": fit_object_statistics(DATASET), "selected": ["keep"]}
    s = AbsentObjectSampler(fitted, GenerateConfig(), ObjectsConfig())
    result = s([record("keep", [obj("cup")]), record("skip", [obj("cup")])])
    assert not result.dropped
    assert [(r.uid, r.teacher_selected) for r in result.kept] == [("keep", True), ("skip", False)]
    assert all(r.probes for r in result.kept)


def random_objects(i: int) -> list[ObjectAnnotation]:
    """1-4 categories, some twice, spread over the width; every 5th image has CLIP tags instead of boxes."""
    names = [COCO_CATEGORIES[(7 * i + k * 13) % 80] for k in range(1 + i % 4)] + [COCO_CATEGORIES[i % 80]] * (i % 3)
    if i % 5 == 4:
        return [ObjectAnnotation(category=n, box=None, source="clip_zero_shot") for n in dict.fromkeys(names)]
    return [obj(n, 0.05 + 0.2 * (k % 4), 0.15 + 0.2 * (k % 4)) for k, n in enumerate(names)]


def test_program_answers_open_with_their_label_and_vary_by_uid():
    s = sampler(probes_per_image=8, manipulation_share=0.5)
    answers = set()
    for i in range(300):
        for p in s.probes_for(f"u{i}", random_objects(i)):
            assert opening_yes_no(p.answer) == answer_to_label(p.answer) == p.label, p
            answers.add(p.answer)
    assert {"Yes.", "No."} <= answers and any(a.startswith("No, I do not see") for a in answers)
    assert any(" I can see " in a for a in answers)  # the "what is there instead" tail is one phrasing
    assert s.probes_for("u7", random_objects(7)) == s.probes_for("u7", random_objects(7))
def test_mentions_understand_negation_plurals_synonyms_and_counts():
    found = mentions("No, I don't see a dog; there are two cups, 3 sofas and a teddy bear.")
    assert [(m.category, m.negated, m.count) for m in found] == [
        ("dog", True, None), ("cup", False, 2), ("couch", False, 3), ("teddy bear", False, None)]
    assert answer_to_label("No, there is not.") == "no" and answer_to_label("Yes. But no dog.") == "yes"


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
    r = record("u", objects, instructions=json.dumps(instructions), probes=probes)
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


def probe(question: str, label: str, kind: str, category: str, answer: str) -> dict:
    return {"question": question, "label": label, "kind": kind, "category": category, "answer": answer}


def verify_turn(answer: str, objects: list[ObjectAnnotation], probe: dict | None = None) -> tuple[str | None, list]:
    """(the answer the verifier kept, or None, and the rejection reasons) for one turn."""
    kind = "negatives" if probe else "conversation"
    question = probe["question"] if probe else "What is there?"
    r = record("u", objects, instructions=json.dumps([llava(kind, [(question, answer)])]),
               probes=[probe] if probe else [])
    kept, rejected = GroundingVerifier().verify(r)
    return (kept[0]["conversations"][1]["value"] if kept else None), [t["reason"] for t in rejected]


def absent(name: str) -> dict:
    return absent_probe(name, "random", "")[0].model_dump()  # the program's first phrasing as its answer


REJECTED_REPHRASINGS = [  # (answer, probe, reason): the first four are from the demo's 25 of 234 failures
    ("Yes, there is no person in the image.", absent("person"), "label_flipped:no"),
    ("There is a truck in the image.", probe("Is there a truck in the image?", "yes", "present", "truck",
                                             "Yes, there is a truck in the image."), "no_yes_no_opening"),
    ("Question 2: No, there is no skis in the image.", absent("skis"), "no_yes_no_opening"),
    ("The answer to question 1: No, there is no cow in the image.", absent("cow"), "no_yes_no_opening"),
    # "no" to the eye, "yes" to POPE's reader: not a rephrasing of a "no" probe
    ("I don't see a dog here.", absent("dog"), "no_yes_no_opening"),
    ("There isn't a dog.", absent("dog"), "no_yes_no_opening"),
    ("None of the objects is a dog.", absent("dog"), "no_yes_no_opening"),
    ("NO, there is none.", absent("dog"), "label_flipped:no"),  # opens with No, POPE reads "yes"
    ("Yes, there is a dog in the image.", probe("Is there a cat in the image?", "yes", "present", "cat",
                                                "Yes, there is a cat in the image."), "other_object:dog"),
    ("Yes, it is there.", probe("Is there a cat in the image?", "yes", "present", "cat", "Yes."), "missing_object:cat"),
    ("No, there is no person, and no dog.", absent("dog"), "other_object:person"),
]


@pytest.mark.parametrize("answer, probe, reason", REJECTED_REPHRASINGS)
def test_a_failed_rephrasing_falls_back_to_the_program_answer(answer, probe, reason):
    objects = [obj("cup"), obj("truck"), obj("cat")]
    assert verify_turn(answer, objects, probe) == (probe["answer"], [reason])


def test_the_reader_takes_negations_without_no_or_not_for_yes():
    for answer in ("I don't see a dog here.", "There isn't a dog.", "None of the objects is a dog."):
        assert answer_to_label(answer) == "yes" and opening_yes_no(answer) is None


def test_a_probe_answer_about_another_object_is_rejected():
    bottle = absent("bottle")
    kept, reasons = verify_turn("No, there is no person in the image. I can see a bus, a tie.",
                                [obj("person"), obj("bus"), obj("tie")], bottle)
    assert kept == bottle["answer"] and reasons[0] in ("other_object:person", "denies_present:person")


def test_denying_a_present_object_is_rejected_in_every_answer():
    assert verify_turn("There is no person here.", [obj("person"), obj("cup")]) == (None, ["denies_present:person"])
    assert verify_turn("There is no dog here, only a cup.", [obj("cup")]) == ("There is no dog here, only a cup.", [])
    assert verify_turn("I don't see a person.", [obj("person")]) == (None, ["denies_present:person"])


@pytest.mark.parametrize("answer", ["The person is not holding the cup.", "Nothing but a cup is here.",
                                    "The person cannot reach the cup."])
def test_a_negation_about_something_else_does_not_deny_the_objects_named(answer):
    assert verify_turn(answer, [obj("person"), obj("cup")]) == (answer, [])


def test_count_and_side_answers_that_deny_a_number_or_a_side_pass():
    cups = [obj("cup", 0.05, 0.15), obj("cup", 0.2, 0.3), obj("dog", 0.8, 0.95)]
    three = probe("Are there three cups in the image?", "no", "count", "cup", "No, there are two cups.")
    for answer in ("No, there are two cups.", "No, there are not three cups.", "No, I can see two cups."):
        assert verify_turn(answer, cups, three) == (answer, [])
    assert verify_turn("No, there are three cups.", cups, three)[1] == ["count_mismatch:cup"]
    left = probe("Is the dog on the left side of the image?", "no", "position", "dog",
                 "No, the dog is on the right side.")
    answer = "No, there is no dog on the left side; it is on the right."
    assert verify_turn(answer, cups, left) == (answer, [])


def generator(**generate) -> InstructionGenerator:
    """No server behind it: the tests only build requests, or records the teacher has no part in."""
    return InstructionGenerator(TeacherConfig(), GenerateConfig(**generate), "http://127.0.0.1:9/v1", cache_dir=None)


def test_images_not_selected_get_program_negatives_that_pass_the_verifier():
    records = [record(f"u{i}", random_objects(i)) for i in range(300)]
    fitted = {"statistics": fit_object_statistics([[o.category for o in random_objects(i)] for i in range(300)]),
              "selected": []}  # a selection that excludes every image
    config = GenerateConfig(probes_per_image=8, manipulation_share=0.5)
    probed = AbsentObjectSampler(fitted, config, ObjectsConfig())(records)
    g = generator()
    generated = g(probed.kept)
    assert not generated.dropped and g.client.usage.requests == 0
    verified = GroundingVerifier()(generated.kept)
    assert not verified.dropped
    for r in verified.kept:
        assert json.loads(r.rejected_turns) == []  # every program phrasing passes the verifier
        (negatives,) = json.loads(r.instructions)
        assert negatives["type"] == "negatives" and json.loads(r.teacher_usage)["requests"] == 0
        answers = [t["value"] for t in negatives["conversations"][1::2]]
        labels, kinds = negatives["provenance"]["probe_labels"], negatives["provenance"]["probe_kinds"]
        assert labels == [p.label for p in r.probes] and len(kinds) == len(answers) == len(labels)
        assert [opening_yes_no(a) for a in answers] == [answer_to_label(a) for a in answers] == labels


def selected_record() -> ImageRecord:
    objects = [obj("cup", 0.05, 0.15), obj("dog", 0.8, 0.95), obj("bus"), obj("cat")]
    fitted = {"statistics": fit_object_statistics(DATASET), "selected": None}
    (probed,) = AbsentObjectSampler(fitted, GenerateConfig(probes_per_image=8), ObjectsConfig())(
        [record("s", objects)]).kept
    assert probed.teacher_selected and len(probed.probes) == 8
    return probed


def test_the_teacher_rewords_only_the_first_probes_and_labels_stay_aligned():
    r, g = selected_record(), generator(types=["negatives"], rephrase_per_image=4)
    request = g.request(r, "negatives", TeacherUsage())
    assert "\n4. " in request.messages[-1]["content"] and "\n5. " not in request.messages[-1]["content"]
    probes = [p.model_dump() for p in r.probes]
    teacher = request.output(answers=["Yes, there is no person in the image.", "Question 2: No.",
                                      "The answer is yes.", "No, I can see two cups."])
    negatives = g.assemble(r, "negatives", teacher)
    answers = [t["value"] for t in negatives["conversations"][1::2]]
    assert answers == [*teacher.answers, *(p["answer"] for p in probes[4:])]
    kept, rejected = GroundingVerifier().verify(r.model_copy(update={"instructions": json.dumps([negatives])}))
    assert len(rejected) == 4  # none of those rewordings keeps its label and object
    turns, provenance = kept[0]["conversations"], kept[0]["provenance"]
    assert [t["value"] for t in turns[1::2]] == [p["answer"] for p in probes]
    assert provenance["probe_labels"] == [p["label"] for p in probes]
    assert provenance["probe_kinds"] == [p["kind"] for p in probes] and len(turns) == 16
    assert generator(rephrase_per_image=0).request(r, "negatives", TeacherUsage()) is None


def test_turn_aligned_provenance_follows_the_kept_turns():
    item = llava("conversation", [("What is there?", "A giraffe."), ("How many cups?", "There are two cups.")])
    item["provenance"] = {"uid": "u", "probe_labels": ["yes", "no"], "probe_kinds": ["present", "absent"]}
    verified, rejected = GroundingVerifier().verify_item(item, [obj("cup"), obj("cup")], [])
    assert [r["reason"] for r in rejected] == ["asserts_absent:giraffe"]
    assert verified["provenance"] == {"uid": "u", "probe_labels": ["no"], "probe_kinds": ["absent"]}


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
