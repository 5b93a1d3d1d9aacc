"""POPE (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language Models"):
build the random / popular / adversarial yes-no question splits from COCO-format instance
annotations, and score a model's answers with the official rules (POPE's evaluate.py), read by
`filters.yes_no.answer_to_label`: the one yes/no reader the grounding verifier and the evals share.

The field scores the same benchmark three ways, which is why published POPE figures of one model
disagree across repositories; `score_pope(..., rule=)` reports each, so ours sit next to anyone's:

  official     POPE's evaluate.py: the first sentence; "No" / "no" / "not" as a word -> no, else yes.
  lmms_eval    lmms-eval's pope task: the whole answer, lower-cased and stripped, must equal "yes" or
               "no"; anything else ("Yes.", "No, there is no dog.") is wrong, and, as there, counts
               neither as a false positive nor as a false negative.
  vlmevalkit   VLMEvalKit's YOrN extraction: punctuation dropped, lower-cased words; "yes" without "no"
               -> yes, "no" without "yes" -> no, else "unknown": wrong, and not a "yes" in precision
               and recall.

The yes-ratio is always the share of answers read as "yes" (lmms-eval's own yes_ratio aggregates the
ground truth, always 0.5 on balanced splits; we do not copy that).

    python -m evals.pope build --instances data/world/annotations/instances_val.json --out outputs/pope
    python -m evals.pope score --questions outputs/pope/coco_pope_random.json --answers answers.jsonl [--rule all]

Files are JSON Lines in the official format, so official POPE files and LLaVA's
`model_vqa_loader` answer files work unchanged.
"""
from __future__ import annotations

import argparse
import json
import random
import re
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Literal

from filters.yes_no import answer_to_label
from schemas.errors import UserError

STRATEGIES = ("random", "popular", "adversarial")
QUESTION_KEYS = ("question_id", "image", "text", "label")
RULES = ("official", "lmms_eval", "vlmevalkit")
LLAVA_POST_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's, in published POPE runs

_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")


def _vlmevalkit_words(text: str) -> list[str]:
    """VLMEvalKit's punctuation handling: a mark next to a space (or any text with a digit-comma-digit) is
    dropped, otherwise it becomes a space; periods not between digits are dropped."""
    keep_glued = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        glued = keep_glued or f"{mark} " in text or f" {mark}" in text
        text = text.replace(mark, "" if glued else " ")
    return _LONE_PERIOD.sub("", text).split()


def read_answer(answer: str, rule: str = "official") -> Literal["yes", "no", "other"]:
    """The answer as `rule` reads it (module docstring); "other" only under lmms_eval and vlmevalkit."""
    if rule == "official":
        return answer_to_label(answer)
    if rule == "lmms_eval":
        said = answer.lower().strip()
        return said if said in ("yes", "no") else "other"
    if rule == "vlmevalkit":
        words = set(_vlmevalkit_words(answer.lower()))
        return "yes" if "yes" in words and "no" not in words else "no" if "no" in words and "yes" not in words else "other"
    raise UserError(f"unknown POPE rule {rule!r}; use one of {', '.join(RULES)}.")


def load_instances(instances: dict | str | Path) -> dict:
    """A COCO instances dict, given as the dict itself or the path of its JSON file."""
    if isinstance(instances, dict):
        data = instances
    else:
        try:
            data = json.loads(Path(instances).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else f"not JSON: {err.msg}"
            raise UserError(f"cannot read COCO instances file {instances} ({why}); pass an instances_*.json.") from err
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise UserError(f"COCO instances lack the list(s) {', '.join(missing)}; pass an instances_*.json, not captions.")
    return data


def objects_per_image(data: dict) -> dict[int, set[str]]:
    """Category names present in each image (images without annotations map to an empty set)."""
    names = {c["id"]: c["name"] for c in data["categories"]}
    present: dict[int, set[str]] = {img["id"]: set() for img in data["images"]}
    for ann in data["annotations"]:
        if ann["category_id"] not in names:
            raise UserError(f"annotation {ann.get('id')} names category_id {ann['category_id']}, "
                            "which is not in `categories`; fix the instances file.")
        if ann["image_id"] in present:  # annotations of images not listed are not part of the split
            present[ann["image_id"]].add(names[ann["category_id"]])
    return present


def _ranked(scores: Counter, candidates: set[str]) -> list[str]:
    """Candidates by score, highest first; ties by name so the order never depends on set order."""
    return sorted(candidates, key=lambda name: (-scores[name], name))


def build_pope_questions(instances: dict | str | Path, strategy: str, num_images: int | None = None,
                         questions_per_image: int = 6, seed: int = 0) -> list[dict]:
    """Balanced yes/no questions per image: half about sampled present objects, half about absent ones.

    The images and each image's positives depend only on `seed`, so the three splits built with the
    same seed ask about the same images and the same present objects, as the official splits do.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown POPE strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")
    if questions_per_image < 2 or questions_per_image % 2:
        raise UserError(f"questions_per_image must be an even number >= 2 (half yes, half no), got {questions_per_image}.")
    data = load_instances(instances)
    present = objects_per_image(data)
    all_names = {c["name"] for c in data["categories"]}
    # Popularity counts images, not boxes: ten people in one photo make "person" no more popular.
    frequency = Counter(name for names in present.values() for name in names)
    cooccurrence: dict[str, Counter] = {name: Counter() for name in all_names}
    for names in present.values():
        for a, b in combinations(sorted(names), 2):
            cooccurrence[a][b] += 1
            cooccurrence[b][a] += 1

    images = sorted((img for img in data["images"] if present[img["id"]]), key=lambda img: img["id"])
    if num_images is not None:
        if num_images > len(images):
            raise UserError(f"asked for {num_images} POPE images but only {len(images)} have annotated objects; "
                            "lower --num-images.")
        images = sorted(random.Random(seed).sample(images, num_images), key=lambda img: img["id"])

    questions: list[dict] = []
    for img in images:
        have, absent = present[img["id"]], all_names - present[img["id"]]
        n = min(questions_per_image // 2, len(have), len(absent))  # fewer positives -> as few negatives
        # A per-image generator keyed by (seed, image): the same positives in every split.
        rng = random.Random(f"{seed}:{img['id']}")
        positives = rng.sample(sorted(have), n)
        if strategy == "random":
            negatives = rng.sample(sorted(absent), n)
        elif strategy == "popular":
            negatives = _ranked(frequency, absent)[:n]
        else:
            together = sum((cooccurrence[name] for name in have), Counter())
            negatives = _ranked(together, absent)[:n]
        for yes, no in zip(positives, negatives):  # interleaved yes/no, like the official files
            for name, label in ((yes, "yes"), (no, "no")):
                # Official POPE always writes "a", even before vowels ("Is there a apple ..."): we keep
                # its exact wording so our splits and answers stay comparable with published numbers.
                questions.append({"question_id": len(questions) + 1, "image": img["file_name"],
                                  "text": f"Is there a {name} in the image?", "label": label})
    return questions


def write_pope_file(questions: list[dict], path: str | Path) -> None:
    """One JSON object per line, keys in the official order (`coco_pope_random.json` is JSON Lines)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({k: q[k] for k in QUESTION_KEYS}) + "\n" for q in questions), encoding="utf-8")


def _json_lines(path: str | Path) -> list[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line; an unparseable line is a UserError."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}); check the path.") from err
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise UserError(f"{path} line {number} is not valid JSON ({err.msg}); "
                                "POPE files hold one JSON object per line.") from err
    return rows


def read_pope_file(path: str | Path) -> list[dict]:
    """Questions from an official (or our) POPE file."""
    questions = []
    for number, row in _json_lines(path):
        if not (isinstance(row, dict) and all(k in row for k in QUESTION_KEYS) and row["label"] in ("yes", "no")):
            raise UserError(f"{path} line {number} is not a POPE question (a JSON object with question_id, image, "
                            "text and a yes/no label); fix or regenerate the file.")
        questions.append(row)
    return questions


def read_answers(path: str | Path) -> dict:
    """question_id -> answer text from JSON Lines with `text` (LLaVA's model_vqa_loader) or `answer`."""
    answers = {}
    for number, row in _json_lines(path):
        key = "text" if isinstance(row, dict) and "text" in row else "answer"
        if not (isinstance(row, dict) and "question_id" in row and isinstance(row.get(key), str)):
            raise UserError(f"{path} line {number} is not an answer (a JSON object with question_id and a "
                            "text or answer string); fix the answer file.")
        answers[row["question_id"]] = row[key]
    return answers


def score_pope(questions: list[dict], answers: dict, rule: str = "official") -> dict:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes_ratio of predictions, confusion counts and
    `other` (answers the rule reads as neither yes nor no), as `rule` scores them (module docstring)."""
    if not questions:
        raise UserError("there are no POPE questions to score; check the questions file.")
    missing = [q["question_id"] for q in questions if q["question_id"] not in answers]
    if missing:
        raise UserError(f"{len(missing)} of {len(questions)} POPE questions have no answer (first: question_id "
                        f"{missing[0]}); answer every question before scoring.")
    pairs = [(q["label"], read_answer(answers[q["question_id"]], rule)) for q in questions]
    tp = sum(gold == "yes" and said == "yes" for gold, said in pairs)
    fp = sum(gold == "no" and said == "yes" for gold, said in pairs)
    tn = sum(gold == "no" and said == "no" for gold, said in pairs)
    # lmms-eval counts a false negative only for an answer of exactly "no"; VLMEvalKit for any answer but "yes"
    fn = sum(gold == "yes" and (said == "no" or (said == "other" and rule == "vlmevalkit")) for gold, said in pairs)
    n = len(pairs)
    # The official script divides by zero when nothing is predicted "yes"; we report 0.0 instead.
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / n, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(said == "yes" for _, said in pairs) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "other": sum(said == "other" for _, said in pairs), "n": n, "rule": rule}


def score_every_rule(questions: list[dict], answers: dict) -> dict[str, dict]:
    return {rule: score_pope(questions, answers, rule) for rule in RULES}


def format_rules_table(by_split: dict[str, dict[str, dict]]) -> str:
    """Markdown: one row per split and rule (split -> rule -> metrics), rates in percent."""
    lines = ["| split | rule | accuracy | precision | recall | F1 | yes-ratio | neither yes nor no | n |",
             "|---|---|---|---|---|---|---|---|---|"]
    for split, rules in by_split.items():
        for rule, m in rules.items():
            rates = " | ".join(f"{100 * m[k]:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
            lines.append(f"| {split} | {rule} | {rates} | {m['other']} | {m['n']} |")
    return "\n".join(lines)


def format_pope_table(results: dict[str, dict]) -> str:
    """Markdown table, one row per split; rates in percent with one decimal, as papers report POPE."""
    lines = ["| split | accuracy | precision | recall | F1 | yes-ratio | n |", "|---|---|---|---|---|---|---|"]
    for split, m in results.items():
        rates = " | ".join(f"{100 * m[k]:.1f}" for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
        lines.append(f"| {split} | {rates} | {m['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="POPE object-hallucination splits and scoring.")
    sub = p.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write coco_pope_{random,popular,adversarial}.json")
    build.add_argument("--instances", required=True, help="COCO instances JSON")
    build.add_argument("--out", required=True, help="output directory")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--num-images", type=int, default=None,
                       help="sample this many annotated images (official POPE: 500; default: all)")
    build.add_argument("--questions-per-image", type=int, default=6, help="half yes, half no (official: 6)")
    score = sub.add_parser("score", help="print metrics JSON for one split")
    score.add_argument("--questions", required=True, help="POPE question file (JSON Lines)")
    score.add_argument("--answers", required=True, help="answers (JSON Lines with question_id and text)")
    score.add_argument("--rule", default="official", choices=[*RULES, "all"], help="how answers are read (all: each)")
    args = p.parse_args(argv)
    if args.command == "build":
        data = load_instances(args.instances)  # parse once for all three splits
        for strategy in STRATEGIES:
            questions = build_pope_questions(data, strategy, args.num_images, args.questions_per_image, args.seed)
            path = Path(args.out) / f"coco_pope_{strategy}.json"
            write_pope_file(questions, path)
            print(f"{path}: {len(questions)} questions")
    else:
        questions, answers = read_pope_file(args.questions), read_answers(args.answers)
        scored = score_every_rule(questions, answers) if args.rule == "all" else score_pope(questions, answers, args.rule)
        print(json.dumps(scored, indent=2))


if __name__ == "__main__":
    from schemas.errors import exit_on_user_error

    exit_on_user_error(main)
