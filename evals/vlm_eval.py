r"""Evaluates a trained VLM checkpoint on held-out images: POPE object hallucination, yes/no accuracy on
the dataset's held-out generated questions, and a few detailed descriptions to read.

    python -m evals.vlm_eval --checkpoint outputs/sample/<version>/train/with_negatives \
        --instances data/world/annotations/instances_val.json --images data/world/images/val \
        --dataset outputs/sample/<version> --out outputs/eval [--num-images 50] [--max-new-tokens 16]

Writes into --out:
  coco_pope_{random,popular,adversarial}.json  the questions, official POPE format (JSON Lines)
  answers_{split}.jsonl                         {"question_id", "text"}, as LLaVA's model_vqa_loader writes them
  image_dependence_{split}.jsonl                each question re-asked on an image with the opposite truth
                                                (evals/image_dependence.py), both answers, and whether it flipped
  qa_questions.jsonl, qa_answers.jsonl          the held-out yes/no questions (POPE format) and the answers
  captions.json                                 detailed descriptions of a few held-out images
  results.json, results.md                      metrics per split, and the markdown table

Every question is asked on its own, with its image, in one human turn, as written (without LLaVA-1.5's
"Answer the question using a single word or phrase.", which our training data never uses); answers
are greedy. The QA set is the `negatives` records of the dataset version's `validation` split: each
human turn whose gpt reply starts with "Yes" or "No" (the label the program decided) is one question;
the model's answer is read with POPE's rule, so the two numbers are comparable.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from tqdm import tqdm

from evals.image_dependence import counter_questions, flip_rate
from evals.pope import (LLAVA_POST_PROMPT, STRATEGIES, build_pope_questions, format_pope_table, format_rules_table,
                        load_instances, objects_per_image, score_every_rule, score_pope, write_pope_file)
from filters.yes_no import answer_to_label, opening_yes_no
from schemas.errors import UserError
from schemas.flags import add_config_flags, config_tree, validated

DESCRIBE = "Describe the following image in detail."  # the first of LLaVA's detailed-description prompts


class EvalConfig(BaseModel):
    """Every field is a flag of the same name (`--max-new-tokens 16`)."""

    model_config = ConfigDict(extra="forbid")

    checkpoint: str = Field(description="checkpoint folder, or a training run's --out (its newest checkpoint)")
    instances: str = Field(description="COCO instances JSON of the held-out images")
    images: str = Field(description="folder holding the images the instances name")
    out: str = Field(description="folder for question, answer and result files")
    dataset: str | None = Field(default=None, description="published dataset version (outputs/<name>/<version>) "
                                                          "whose validation negatives are the QA set")
    num_images: int | None = Field(default=None, ge=1, description="POPE images sampled from the annotated ones "
                                                                   "(default: all; official POPE: 500)")
    # POPE reads only the first sentence, and the yes/no comes first: a few words are enough.
    max_new_tokens: int = Field(default=16, ge=1, description="answer length for POPE and QA questions")
    descriptions: int = Field(default=5, ge=0, description="held-out images to describe in captions.json")
    description_tokens: int = Field(default=96, ge=1, description="length of each description")
    batch_size: int = Field(default=16, ge=1, description="prompts generated together")
    seed: int = Field(default=0, description="POPE sampling seed")
    post_prompt: str = Field(default="", description="text added on a new line after each POPE question; 'llava' "
                                                     f"is LLaVA-1.5's '{LLAVA_POST_PROMPT}'")
    device: str = Field(default="auto", description="cpu, cuda, or auto")
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto: bf16 autocast on CUDA, "
                                                                                   "fp32 on the CPU")


class GreedyAnswerer:
    """Answers (image, question) pairs with greedy decoding, in batches of left-padded prompts. Each
    distinct pair is generated once: POPE's three splits share their "yes" questions."""

    def __init__(self, vlm, render: str, batch_size: int, progress: bool = True, precision: str = "auto"):
        from trainer.conversation import ConversationEncoder
        from trainer.data import Collate
        from trainer.language_model import pad_token_id

        self.vlm, self.batch_size, self.progress = vlm, batch_size, progress
        self.encoder = ConversationEncoder(vlm.tokenizer, vlm.image_token_id, vlm.num_patches, render, max_length=4096)
        self.collate = Collate(pad_token_id(vlm.tokenizer), vlm.vision_tower.image_size, pad_left=True)
        self.device = next(vlm.projector.parameters()).device
        from trainer.config import autocast

        self.precision, self.autocast = precision, autocast
        self.known: dict[tuple[str, str, int], str] = {}

    def _prompt(self, image: Image.Image, question: str) -> dict:
        encoded = self.encoder.encode_prompt([{"from": "human", "value": f"<image>\n{question}"}], num_images=1)
        return {"input_ids": encoded.input_ids, "labels": encoded.labels,
                "pixel_values": [self.vlm.vision_tower.preprocess(image.convert("RGB"))]}

    def __call__(self, asks: list[tuple[str, str]], image_of: Callable[[str], Image.Image], max_new_tokens: int,
                 desc: str = "answers") -> list[str]:
        """asks: (image key, question) pairs; `image_of(key)` opens the image. Returns one answer per ask."""
        todo = sorted({(key, text) for key, text in asks if (key, text, max_new_tokens) not in self.known})
        with tqdm(total=len(todo), desc=desc, unit="q", disable=not self.progress) as bar:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                batch = self.collate([self._prompt(image_of(key), text) for key, text in chunk])
                with self.autocast(self.device.type, self.precision):
                        new = self.vlm.generate(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                            batch["pixel_values"].to(self.device), max_new_tokens=max_new_tokens,
                                            do_sample=False)  # [B, T_new]
                texts = self.vlm.tokenizer.batch_decode(new, skip_special_tokens=True)
                self.known.update({(key, text, max_new_tokens): answer.strip()
                                   for (key, text), answer in zip(chunk, texts)})
                bar.update(len(chunk))
        return [self.known[(key, text, max_new_tokens)] for key, text in asks]


def yes_no_questions(rows: list[dict]) -> tuple[list[dict], int]:
    """POPE-format questions from `negatives` records: one per human turn whose gpt reply starts with Yes
    or No (label from that word); returns (questions, turns skipped for lack of a Yes/No opening)."""
    questions, skipped = [], 0
    for row in rows:
        if row.get("type") != "negatives":
            continue
        turns = row["conversations"]
        for i, (human, gpt) in enumerate(zip(turns[::2], turns[1::2])):
            opening = opening_yes_no(gpt["value"]) if (human["from"], gpt["from"]) == ("human", "gpt") else None
            if opening is None:
                skipped += 1
                continue
            questions.append({"question_id": f"{row['id']}-{i}", "image": row["uid"],
                              "text": human["value"].replace("<image>", "").strip(), "label": opening})
    return questions, skipped


def score_qa(questions: list[dict], answers: dict, skipped: int = 0) -> dict:
    """POPE's metrics on the held-out yes/no questions; n=0 (no negatives held out) gives null rates."""
    if not questions:
        return {"n": 0, "skipped": skipped, "accuracy": None, "precision": None, "recall": None, "f1": None,
                "yes_ratio": None}
    return {**score_pope(questions, answers), "skipped": skipped}


def validation_rows(dataset: str) -> list[dict]:
    """The validation split of a published version (`outputs/<name>/<version>` or its `hf/`), images decoded."""
    import datasets

    path = Path(dataset)
    hf = path / "hf" if (path / "hf").is_dir() else path
    try:
        loaded = datasets.load_from_disk(str(hf))
    except (FileNotFoundError, ValueError):
        raise UserError(f"{path} is not a published dataset version; pass --dataset outputs/<name>/<version>, "
                        f"the folder holding hf/.") from None
    if not isinstance(loaded, datasets.DatasetDict) or "validation" not in loaded:
        return []
    return [row for row in loaded["validation"] if row.get("type") == "negatives"]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_results(results: dict) -> str:
    qa = results["qa"]
    if qa["n"]:
        line = (f"QA accuracy on held-out generated yes/no questions: {_percent(qa['accuracy'])} "
                f"(n={qa['n']}, F1 {_percent(qa['f1'])}, yes-ratio {_percent(qa['yes_ratio'])})")
    else:
        line = f"QA accuracy on held-out generated yes/no questions: n/a (n=0: {qa.get('why', 'no questions')})"
    looked = ", ".join(f"{split} {_percent(d['image_dependence'])} ({d['flipped']}/{d['pairs']})"
                       for split, d in results.get("image_dependence", {}).items())
    rules = results.get("pope_rules")
    by_rule = f"The same answers under each common rule (evals/pope.py):\n\n{format_rules_table(rules)}\n\n" if rules else ""
    return (f"POPE ({results['checkpoint']})\n\n{format_pope_table(results['pope'])}\n\n{by_rule}"
            f"Image dependence (answers that flip on an image with the opposite truth): {looked or 'n/a'}\n{line}\n")


def run_eval(config: EvalConfig, progress: bool = True) -> dict:
    """Writes the files listed in the module docstring; returns results.json's content."""
    from filters.clip_loader import pick_device
    from trainer.checkpoint import find_checkpoint, load_vlm, saved_config
    from trainer.stages import stage_spec

    started = time.perf_counter()
    if not Path(config.checkpoint).exists():
        raise UserError(f"Checkpoint {config.checkpoint} does not exist; pass --checkpoint a checkpoint folder "
                        f"or the --out of a finished training run.")
    try:
        checkpoint = find_checkpoint(config.checkpoint)
    except UserError:
        raise UserError(f"No checkpoint in {config.checkpoint}; pass --checkpoint a checkpoint folder or the --out "
                        f"of a finished training run.") from None
    images = Path(config.images)
    if not images.is_dir():
        raise UserError(f"Image folder {images} does not exist; pass --images the folder holding the held-out "
                        f"images that --instances names.")
    instances = load_instances(config.instances)
    present = objects_per_image(instances)
    pope = {s: build_pope_questions(instances, s, config.num_images, seed=config.seed) for s in STRATEGIES}
    described = sorted(instances["images"], key=lambda img: img["id"])[: config.descriptions]
    for name in {q["image"] for qs in pope.values() for q in qs} | {img["file_name"] for img in described}:
        if not (images / name).is_file():
            raise UserError(f"Image {name} named in {config.instances} is not in {images}; pass --images the "
                            f"folder of those images.")
    rows = validation_rows(config.dataset) if config.dataset else []  # before the model: a bad path fails fast

    vlm = load_vlm(checkpoint, pick_device(config.device))
    answer = GreedyAnswerer(vlm, stage_spec(saved_config(checkpoint).stage).render, config.batch_size, progress,
                            config.precision)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    def from_folder(name: str) -> Image.Image:
        with Image.open(images / name) as image:
            return image.convert("RGB")

    post = LLAVA_POST_PROMPT if config.post_prompt == "llava" else config.post_prompt

    def pope_prompt(question: str) -> str:
        """The POPE question as asked: the post prompt on a line after it (the question files keep the text)."""
        return f"{question}\n{post}" if post else question

    def ask(questions: list[dict], image_of, questions_file: str, answers_file: str, desc: str,
            prompt=lambda text: text) -> dict:
        """Writes the questions (as given) and the answers files; returns question_id -> answer."""
        write_pope_file(questions, out / questions_file)
        texts = answer([(q["image"], prompt(q["text"])) for q in questions], image_of, config.max_new_tokens, desc)
        _write_jsonl([{"question_id": q["question_id"], "text": t} for q, t in zip(questions, texts)], out / answers_file)
        return {q["question_id"]: t for q, t in zip(questions, texts)}

    present_in = {img["file_name"]: present[img["id"]] for img in instances["images"]}
    results = {"checkpoint": str(checkpoint), "pope": {}, "pope_rules": {}, "image_dependence": {}}
    for split, questions in pope.items():
        said = ask(questions, from_folder, f"coco_pope_{split}.json", f"answers_{split}.jsonl", f"POPE {split}", pope_prompt)
        results["pope"][split] = score_pope(questions, said)
        results["pope_rules"][split] = score_every_rule(questions, said)
        pairs = counter_questions(questions, present_in, config.seed)
        counter = answer([(p["counter_image"], pope_prompt(p["text"])) for p in pairs], from_folder,
                         config.max_new_tokens, f"image dependence {split}")
        pairs = [{**p, "answer": said[p["question_id"]], "counter_answer": c,
                  "flipped": answer_to_label(said[p["question_id"]]) != answer_to_label(c)} for p, c in zip(pairs, counter)]
        _write_jsonl(pairs, out / f"image_dependence_{split}.jsonl")
        results["image_dependence"][split] = {**flip_rate(pairs), "questions": len(questions)}

    qa_questions, skipped = yes_no_questions(rows)
    by_uid = {row["uid"]: row["image"] for row in rows}
    said = ask(qa_questions, by_uid.__getitem__, "qa_questions.jsonl", "qa_answers.jsonl", "QA")
    results["qa"] = score_qa(qa_questions, said, skipped)
    if not qa_questions:
        results["qa"]["why"] = ("no --dataset given" if not config.dataset else
                                "the validation split holds no negatives records with Yes/No answers")

    texts = answer([(img["file_name"], DESCRIBE) for img in described], from_folder, config.description_tokens,
                   "descriptions")
    (out / "captions.json").write_text(json.dumps(
        [{"image": img["file_name"], "objects": sorted(present[img["id"]]), "prompt": DESCRIBE, "description": t}
         for img, t in zip(described, texts)], indent=1))

    results.update(config=config.model_dump(), seconds=time.perf_counter() - started)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(format_results(results))
    return results


def config_from_flags(argv: list[str] | None) -> EvalConfig:
    """EvalConfig from `--field-name V` flags (one per field), a `--config` YAML file and `--set` overrides."""
    p = add_config_flags(argparse.ArgumentParser(description="POPE, held-out QA accuracy and descriptions of a "
                                                             "trained VLM."),
                         EvalConfig, config_help="YAML file of EvalConfig fields", field_flags=True)
    return validated(EvalConfig, config_tree(EvalConfig, p.parse_args(argv), "a YAML file of EvalConfig fields"),
                     "python -m evals.vlm_eval --help")


def main(argv: list[str] | None = None) -> None:
    config = config_from_flags(argv)
    results = run_eval(config)
    print(format_results(results))


if __name__ == "__main__":
    from schemas.errors import exit_on_user_error

    exit_on_user_error(main)
