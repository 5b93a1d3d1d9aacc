"""POPE: split construction on a hand-made COCO world, official file format, official scoring rules."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import defaultdict

import pytest

from evals.pope import (STRATEGIES, answer_to_label, build_pope_questions, format_pope_table, read_answers,
                        read_pope_file, score_pope, write_pope_file)
from filters.yes_no import opening_yes_no
from schemas.errors import UserError
from tests.conftest import REPO

NAMES = ["person", "dog", "cat", "car", "bicycle", "chair", "table", "apple"]
# image id -> objects in it. Image frequencies: person 3, table 3, car 2, dog 2, chair 2, bicycle 1,
# cat 1, apple 1. Co-occurring pairs (images): person-dog, person-car, dog-car (1); person-car,
# person-bicycle, car-bicycle (2); person-chair, person-table, chair-table (3); dog-cat (4);
# chair-table, chair-apple, table-apple (5).
SCENES = {1: ["person", "dog", "car", "person"], 2: ["person", "car", "bicycle"], 3: ["person", "chair", "table"],
          4: ["dog", "cat"], 5: ["chair", "table", "apple"], 6: ["table"]}


def coco(scenes: dict[int, list[str]], names: list[str]) -> dict:
    cat_id = {name: i + 1 for i, name in enumerate(names)}
    anns = [{"id": len(scenes) * 100 + k, "image_id": img, "category_id": cat_id[name], "bbox": [0, 0, 10, 10]}
            for img, objs in scenes.items() for k, name in enumerate(objs)]
    return {"images": [{"id": img, "file_name": f"{img:012d}.jpg"} for img in scenes],
            "annotations": anns, "categories": [{"id": i, "name": n} for n, i in cat_id.items()]}


def by_image(questions: list[dict]) -> dict[str, dict[str, list[str]]]:
    """file_name -> {"yes": [objects], "no": [objects]} in question order."""
    out: dict = defaultdict(lambda: {"yes": [], "no": []})
    for q in questions:
        out[q["image"]][q["label"]].append(q["text"].removeprefix("Is there a ").removesuffix(" in the image?"))
    return out


def test_popular_picks_most_frequent_absent_and_adversarial_most_cooccurring():
    world = coco(SCENES, NAMES)
    popular = by_image(build_pope_questions(world, "popular"))
    adversarial = by_image(build_pope_questions(world, "adversarial"))
    # Image 6 holds only a table: one positive, so one negative. Most frequent absent: person (3 images);
    # most co-occurring with table: chair (images 3 and 5 = 2) beats person and apple (1 each).
    assert popular["000000000006.jpg"] == {"yes": ["table"], "no": ["person"]}
    assert adversarial["000000000006.jpg"] == {"yes": ["table"], "no": ["chair"]}
    # Image 4 (dog, cat): popular ties person/table at 3 -> by name; adversarial: dog co-occurs once with
    # person and once with car, cat with nothing absent -> car 1, person 1 -> by name.
    assert popular["000000000004.jpg"]["no"] == ["person", "table"]
    assert adversarial["000000000004.jpg"]["no"] == ["car", "person"]
    # Image 5 (chair, table, apple): person scores 1 + 1 = 2, every other absent object 0 -> by name.
    assert adversarial["000000000005.jpg"]["no"] == ["person", "bicycle", "car"]


def test_balance_and_fewer_positives_mean_fewer_negatives():
    questions = build_pope_questions(coco(SCENES, NAMES), "random")
    per_image = by_image(questions)
    # Images 1, 2, 3, 5 hold 3 distinct objects (image 1 lists person twice) -> 6 questions each; image 4 -> 4;
    # image 6 -> 2: 4*6 + 4 + 2 = 30 questions.
    assert {img: len(q["yes"]) for img, q in per_image.items()} == {
        "000000000001.jpg": 3, "000000000002.jpg": 3, "000000000003.jpg": 3,
        "000000000004.jpg": 2, "000000000005.jpg": 3, "000000000006.jpg": 1}
    assert all(len(q["yes"]) == len(q["no"]) for q in per_image.values())
    assert [q["question_id"] for q in questions] == list(range(1, 31))
    assert [q["label"] for q in questions[:4]] == ["yes", "no", "yes", "no"]


def random_world(seed: int = 1) -> tuple[dict, dict[int, list[str]]]:
    rng = random.Random(seed)
    names = [f"object{i:02d}" for i in range(20)]
    scenes = {img: [rng.choice(names) for _ in range(rng.randint(1, 7))] for img in range(1, 41)}
    scenes[41] = list(names)  # holds every category: nothing absent, so no balanced questions
    world = coco(scenes, names)
    world["images"].append({"id": 42, "file_name": "000000000042.jpg"})  # no annotations at all
    return world, scenes


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_no_question_never_names_a_present_object(strategy):
    world, scenes = random_world()
    questions = build_pope_questions(world, strategy, seed=3)
    present = {f"{img:012d}.jpg": set(objs) for img, objs in scenes.items()}
    for image, asked in by_image(questions).items():
        assert set(asked["yes"]) <= present[image] and not set(asked["no"]) & present[image]
        assert len(asked["yes"]) == len(asked["no"]) == min(3, len(present[image]))
        assert len(set(asked["yes"])) == len(asked["yes"]) and len(set(asked["no"])) == len(asked["no"])
    assert not {"000000000041.jpg", "000000000042.jpg"} & {q["image"] for q in questions}


def test_deterministic_given_seed_and_splits_share_images_and_positives():
    world, _ = random_world()
    assert build_pope_questions(world, "random", seed=5) == build_pope_questions(world, "random", seed=5)
    assert build_pope_questions(world, "random", seed=5) != build_pope_questions(world, "random", seed=6)
    splits = [by_image(build_pope_questions(world, s, num_images=10, seed=5)) for s in STRATEGIES]
    assert len(splits[0]) == 10
    assert all({img: q["yes"] for img, q in s.items()} == {img: q["yes"] for img, q in splits[0].items()}
               for s in splits)


def test_official_wording_and_user_errors():
    texts = [q["text"] for q in build_pope_questions(coco(SCENES, NAMES), "random")]
    assert "Is there a apple in the image?" in texts  # official POPE never writes "an"
    with pytest.raises(UserError, match="unknown POPE strategy"):
        build_pope_questions(coco(SCENES, NAMES), "frequent")
    with pytest.raises(UserError, match="only 6 have annotated objects"):
        build_pope_questions(coco(SCENES, NAMES), "random", num_images=7)


def test_file_round_trip_and_official_line(tmp_path):
    questions = build_pope_questions(coco(SCENES, NAMES), "adversarial")
    write_pope_file(questions, tmp_path / "coco_pope_adversarial.json")
    assert read_pope_file(tmp_path / "coco_pope_adversarial.json") == questions
    official = ('{"question_id": 1, "image": "COCO_val2014_000000310196.jpg", '
                '"text": "Is there a snowboard in the image?", "label": "yes"}')
    first = (tmp_path / "coco_pope_adversarial.json").read_text().splitlines()[0]
    assert first == '{"question_id": 1, "image": "000000000001.jpg", "text": "Is there a car in the image?", "label": "yes"}'
    (tmp_path / "official.json").write_text(official + "\n\n")
    assert read_pope_file(tmp_path / "official.json") == [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
         "text": "Is there a snowboard in the image?", "label": "yes"}]


@pytest.mark.parametrize("bad", ['{"question_id": 3, "image": "x.jpg", "text": "Is there a dog?"}', "not json", "[1, 2]"])
def test_malformed_line_names_the_line(tmp_path, bad):
    good = json.dumps({"question_id": 1, "image": "x.jpg", "text": "Is there a dog in the image?", "label": "no"})
    (tmp_path / "q.json").write_text(f"{good}\n\n{bad}\n")
    with pytest.raises(UserError, match=r"q\.json line 3 "):
        read_pope_file(tmp_path / "q.json")


CRAFTED = [  # (gold label, answer, what the official rule makes of it)
    ("yes", "Yes, there is a cat.", "yes"),  # TP
    ("yes", "Yes. But no dog.", "yes"),  # TP: only the first sentence "Yes" counts
    ("yes", "I don't know", "yes"),  # TP: "don't" is not "not"
    ("yes", "Not really", "yes"),  # TP: capital "Not" is not in {No, not, no}
    ("yes", "No, there is not.", "no"),  # FN
    ("no", "There is no cat, I think", "no"),  # TN
    ("no", "No.", "no"),  # TN
    ("no", "Yes, there is a dog.", "yes"),  # FP
    ("no", "There is not a dog in the image.", "no"),  # TN
    ("no", "There is a dog. No wait, there is not.", "yes"),  # FP: the "No" is in the second sentence
]


def test_official_answer_rule():
    assert [answer_to_label(a) for _, a, _ in CRAFTED] == [p for _, _, p in CRAFTED]
    assert answer_to_label("No, I can't see one") == "no"  # comma removed, so "No," counts as "No"
    assert answer_to_label("Nope") == "yes"
    assert answer_to_label("No\nthere is none") == "yes"  # evaluate.py splits on ' ' only
    # Negations without No / no / not are "yes" to POPE: our data must not use them for a "no".
    for answer in ("I don't see a dog here.", "There isn't a dog.", "None of the objects is a dog."):
        assert answer_to_label(answer) == "yes"


def test_one_reader_for_scoring_verifying_and_evaluating():
    import evals.grounding_eval
    import evals.vlm_eval
    import filters.grounding
    import filters.yes_no

    assert answer_to_label is filters.yes_no.answer_to_label
    assert filters.grounding.answer_to_label is evals.grounding_eval.answer_to_label is answer_to_label
    assert evals.vlm_eval.opening_yes_no is filters.yes_no.opening_yes_no


@pytest.mark.parametrize("answer, opening", [
    ("Yes, there is a cat.", "yes"), ("no", "no"), ("  NO, on the right.", "no"), ("Yes.", "yes"),
    ("Not really.", None), ("Nothing like that.", None), ("I don't see one.", None), ("Question 2: No.", None)])
def test_opening_yes_no(answer, opening):
    assert opening_yes_no(answer) == opening


def test_scores_match_hand_computation():
    questions = [{"question_id": i + 1, "image": "x.jpg", "text": "?", "label": g} for i, (g, _, _) in enumerate(CRAFTED)]
    answers = {i + 1: a for i, (_, a, _) in enumerate(CRAFTED)}
    m = score_pope(questions, answers)
    # TP 4, FN 1, TN 3, FP 2. accuracy (4+3)/10 = 0.7; precision 4/(4+2) = 2/3; recall 4/(4+1) = 0.8;
    # F1 = 2*(2/3)*(4/5) / (2/3 + 4/5) = (16/15)/(22/15) = 8/11; yes_ratio = (4+2)/10 = 0.6.
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (4, 2, 3, 1, 10)
    assert m["accuracy"] == pytest.approx(0.7, abs=1e-12)
    assert m["precision"] == pytest.approx(0.6666666666666666, abs=1e-12)
    assert m["recall"] == pytest.approx(0.8, abs=1e-12)
    assert m["f1"] == pytest.approx(0.7272727272727273, abs=1e-12)
    assert m["yes_ratio"] == pytest.approx(0.6, abs=1e-12)
    nothing_yes = score_pope(questions, {q: "No." for q in answers})
    assert (nothing_yes["precision"], nothing_yes["recall"], nothing_yes["f1"], nothing_yes["yes_ratio"]) == (0, 0, 0, 0)
    with pytest.raises(UserError, match="2 of 10 POPE questions have no answer"):
        score_pope(questions, {q: a for q, a in answers.items() if q not in (3, 7)})


def test_read_answers_accepts_text_and_answer_keys(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question_id": 1, "prompt": "?", "text": "Yes", "model_id": "m"}\n'
                                      '{"question_id": 2, "answer": "No"}\n')
    assert read_answers(tmp_path / "a.jsonl") == {1: "Yes", 2: "No"}
    (tmp_path / "b.jsonl").write_text('{"question_id": 1}\n')
    with pytest.raises(UserError, match="line 1"):
        read_answers(tmp_path / "b.jsonl")


def test_table():
    m = {"accuracy": 0.7, "precision": 2 / 3, "recall": 0.8, "f1": 8 / 11, "yes_ratio": 0.6, "n": 10}
    assert format_pope_table({"random": m}).splitlines()[2] == "| random | 70.0 | 66.7 | 80.0 | 72.7 | 60.0 | 10 |"


def test_cli_build_then_score(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps(coco(SCENES, NAMES)))
    run = [sys.executable, "-m", "evals.pope"]
    subprocess.run(run + ["build", "--instances", str(tmp_path / "instances.json"), "--out", str(tmp_path / "pope")],
                   cwd=REPO, check=True, capture_output=True, timeout=60)
    assert sorted(p.name for p in (tmp_path / "pope").iterdir()) == [f"coco_pope_{s}.json" for s in sorted(STRATEGIES)]
    questions = read_pope_file(tmp_path / "pope" / "coco_pope_popular.json")
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": q["question_id"], "text": "Yes"}) + "\n"
                                                    for q in questions))
    scored = subprocess.run(run + ["score", "--questions", str(tmp_path / "pope" / "coco_pope_popular.json"),
                                   "--answers", str(tmp_path / "answers.jsonl")],
                            cwd=REPO, check=True, capture_output=True, text=True, timeout=60)
    assert json.loads(scored.stdout)["yes_ratio"] == 1.0
    failed = subprocess.run(run + ["score", "--questions", str(tmp_path / "missing.json"), "--answers", "x"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.startswith("error: cannot read") and len(failed.stderr.strip().splitlines()) == 1


RULE_CASES = [  # gold, answer, and how official / lmms_eval / vlmevalkit read it
    ("yes", "Yes.", "yes", "other", "yes"),
    ("yes", "yes", "yes", "yes", "yes"),
    ("yes", "I don't see a dog.", "yes", "other", "other"),
    ("yes", "No", "no", "no", "no"),
    ("no", "No, there is no dog.", "no", "other", "no"),
    ("no", "There is no dog.", "no", "other", "no"),
    ("no", "Unknown", "yes", "other", "other"),
    ("no", "yes", "yes", "yes", "yes"),
    ("no", "no", "no", "no", "no"),
    ("yes", "Yes, there is a dog.", "yes", "other", "yes"),
]


def test_one_answer_file_scored_under_the_three_common_rules(tmp_path, capsys):
    from evals.pope import main, read_answer

    for _, answer, *readings in RULE_CASES:
        assert [read_answer(answer, rule) for rule in ("official", "lmms_eval", "vlmevalkit")] == readings, answer
    questions = [{"question_id": i + 1, "image": "x.jpg", "text": "Is there a dog in the image?", "label": gold}
                 for i, (gold, *_) in enumerate(RULE_CASES)]
    write_pope_file(questions, tmp_path / "coco_pope_random.json")
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps({"question_id": i + 1, "text": answer}) + "\n"
                                                    for i, (_, answer, *_) in enumerate(RULE_CASES)))
    main(["score", "--questions", str(tmp_path / "coco_pope_random.json"), "--answers", str(tmp_path / "answers.jsonl"),
          "--rule", "all"])
    scored = json.loads(capsys.readouterr().out)
    # official: TP 4 (1, 2, 3, 10), FN 1 (4), FP 2 (7, 8), TN 3 (5, 6, 9)
    # lmms_eval: only bare yes/no count: TP 1 (2), FP 1 (8), FN 1 (4), TN 1 (9); 6 "other" answers are wrong
    # vlmevalkit: TP 3 (1, 2, 10), FN 2 (3 unknown, 4), FP 1 (8), TN 3 (5, 6, 9); 2 unknown
    expected = {"official": (4, 2, 3, 1, 0.7, 4 / 6, 4 / 5, 8 / 11, 0.6, 0),
                "lmms_eval": (1, 1, 1, 1, 0.2, 1 / 2, 1 / 2, 1 / 2, 0.2, 6),
                "vlmevalkit": (3, 1, 3, 2, 0.6, 3 / 4, 3 / 5, 2 / 3, 0.4, 2)}
    for rule, (tp, fp, tn, fn, accuracy, precision, recall, f1, yes_ratio, other) in expected.items():
        m = scored[rule]
        assert (m["tp"], m["fp"], m["tn"], m["fn"], m["other"], m["n"]) == (tp, fp, tn, fn, other, 10), rule
        assert [m[k] for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")] == pytest.approx(
            [accuracy, precision, recall, f1, yes_ratio], abs=1e-12), rule
