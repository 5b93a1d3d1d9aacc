"""The VLM evaluation (evals/vlm_eval.py) on tiny
in-process models (tests/test_trainer.py's tiny Llama + 32 px CLIP), a 3-image COCO fixture and a
hand-made published dataset. No downloads, CPU only."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from evals.pope import QUESTION_KEYS, STRATEGIES, answer_to_label, read_answers, read_pope_file
from evals.vlm_eval import EvalConfig, format_results, run_eval, score_qa, yes_no_questions
from schemas.errors import UserError
from tests.tiny_vlm import one_sentence, tiny  # noqa: F401 - tiny: the tiny model parts fixture

CATEGORIES = ["cat", "dog", "bird", "car", "chair", "cup"]
OBJECTS = {1: ["cat", "dog"], 2: ["car"], 3: ["chair", "cup", "bird"]}  # image id -> objects present


def negatives(uid: str, pairs: list[tuple[str, str]], kind: str = "negatives") -> dict:
    turns = []
    for i, (question, answer) in enumerate(pairs):
        turns += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + question}, {"from": "gpt", "value": answer}]
    return {"id": f"{uid}-{kind}", "type": kind, "uid": uid, "conversations": turns}


VALIDATION = [  # 3 questions with a program label; "Not that I can see" opens with neither Yes nor No
    negatives("u1", [("Is there a cat in the image?", "Yes, there is a cat."), ("Is there a dog in the image?", "No.")]),
    negatives("u2", [("Is there a car in the image?", "Not that I can see."), ("Are there two cups?", "no")]),
    negatives("u2", [("Describe the following image in detail.", "No one is here.")], kind="detail"),
]


def write_coco(folder, ids: list[int], name: str) -> None:
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": 40, "height": 36} for i in ids]
    annotations = [{"id": 10 * i + k, "image_id": i, "category_id": CATEGORIES.index(o) + 1, "bbox": [1, 1, 9, 9]}
                   for i in ids for k, o in enumerate(OBJECTS[i])]
    captions = [{"id": 10 * i + k, "image_id": i, "caption": f"a photo of {o}"} for i in ids for k, o in enumerate(OBJECTS[i])]
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(CATEGORIES)]
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    (folder / "annotations" / f"instances_{name}.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    (folder / "annotations" / f"captions_{name}.json").write_text(json.dumps({"images": images, "annotations": captions}))
    (folder / "images" / name).mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (40, 36), ((70 * i) % 256, (150 * i) % 256, (40 * i) % 256)).save(folder / "images" / name / f"{i:012d}.png")


def write_published(version_dir, image_folder) -> None:
    """A published version's hf/ DatasetDict in pipelines.publish's schema (train: 1 record; validation: VALIDATION)."""
    import datasets

    from pipelines.publish import hf_features

    def table(rows):
        image = str(image_folder / "000000000001.png")
        return datasets.Dataset.from_list([{**r, "image": image, "caption": "a cat", "clip_score": 0.3, "objects": "[]",
                                            "provenance": "{}"} for r in rows], features=hf_features())

    train = [negatives("u0", [("Is there a cat in the image?", "Yes, there is a cat.")])]
    datasets.DatasetDict({"train": table(train), "validation": table(VALIDATION)}).save_to_disk(str(version_dir / "hf"))


def answer_by_image(vlm, images: list, question: str = "Is there a cat in the image?") -> None:
    """Sets the LM head's "Yes" and "No" rows so that they outscore every other token, and the first image
    gets "Yes", the second "No": a random tiny LM alone answers every prompt alike."""
    from evals.vlm_eval import GreedyAnswerer
    from trainer.data import Collate

    asker = GreedyAnswerer(vlm, "chat", batch_size=2, progress=False)
    batch = Collate(vlm.tokenizer.pad_token_id, vlm.vision_tower.image_size)([asker._prompt(i, question) for i in images])
    with torch.no_grad():
        embeds = vlm.embed(batch["input_ids"], batch["pixel_values"])  # [2, T, D_lm]
        last = vlm.language_model.model(inputs_embeds=embeds).last_hidden_state[:, -1]  # [2, D_lm], after the norm
        middle, apart = last.mean(0), last[0] - last[1]
        apart = apart - (apart @ middle) / (middle @ middle) * middle  # only what tells the two prompts apart
        apart = 50 * apart / apart.norm()
        head = vlm.language_model.lm_head.weight  # logit(Yes) - logit(No) = 2 * apart . last: + for the first
        head[vlm.tokenizer.convert_tokens_to_ids("Yes")] = apart + 50 * middle / middle.norm()
        head[vlm.tokenizer.convert_tokens_to_ids("No")] = -apart + 50 * middle / middle.norm()


@pytest.fixture(scope="module")
def world(tiny, tmp_path_factory):
    """test_trainer's tiny parts with "Yes" and "No" in the vocabulary, a finetune checkpoint of them, a
    3-image held-out world and a published version."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.checkpoint import build_vlm, save_checkpoint
    from trainer.config import TrainConfig
    from trainer.stages import apply_stage, stage_spec

    base = tmp_path_factory.mktemp("vlm_eval")
    tokenizer = AutoTokenizer.from_pretrained(tiny["model"].lm)
    tokenizer.add_tokens(["Yes", "No"])
    lm = AutoModelForCausalLM.from_pretrained(tiny["model"].lm)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    lm.save_pretrained(base / "lm")
    tokenizer.save_pretrained(base / "lm")
    model = tiny["model"].model_copy(update={"lm": str(base / "lm")})
    config = TrainConfig(stage="finetune", model=model, out=str(base / "run"), device="cpu")
    write_coco(base / "world", [1, 2, 3], "val")
    vlm = build_vlm(model)
    answer_by_image(vlm, [Image.open(base / "world" / "images" / "val" / f"{i:012d}.png") for i in (1, 2)])
    save_checkpoint(base / "run", vlm, config, apply_stage(vlm, stage_spec("finetune"), config), {"step": 1})
    write_published(base / "outputs" / "sample" / "v-1", base / "world" / "images" / "val")
    return {"base": base, "model": model, "run": base / "run", "world": base / "world",
            "dataset": base / "outputs" / "sample" / "v-1"}


def eval_config(world, out, **fields) -> EvalConfig:
    defaults = {"checkpoint": str(world["run"]), "instances": str(world["world"] / "annotations" / "instances_val.json"),
                "images": str(world["world"] / "images" / "val"), "dataset": str(world["dataset"]), "out": str(out),
                "max_new_tokens": 1, "description_tokens": 6, "batch_size": 5, "device": "cpu"}
    return EvalConfig(**{**defaults, **fields})


def yes_ratio(answers: dict) -> float:
    return sum(answer_to_label(a) == "yes" for a in answers.values()) / len(answers)


def test_eval_runner_writes_official_pope_files_answers_and_consistent_results(world, tmp_path):
    from evals.pope import build_pope_questions

    results = run_eval(eval_config(world, tmp_path), progress=False)
    instances = world["world"] / "annotations" / "instances_val.json"
    answered = {}
    for split in STRATEGIES:
        path = tmp_path / f"coco_pope_{split}.json"
        assert list(json.loads(path.read_text().splitlines()[0])) == list(QUESTION_KEYS)  # official key order
        questions = read_pope_file(path)
        assert questions == build_pope_questions(instances, split) and len(questions) == 12  # 2+1+3 objects, x2
        answers = read_answers(tmp_path / f"answers_{split}.jsonl")
        assert set(answers) == {q["question_id"] for q in questions}
        metrics = results["pope"][split]
        assert all(0 <= metrics[k] <= 1 for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
        assert metrics["n"] == 12 and metrics["yes_ratio"] == pytest.approx(yes_ratio(answers))
        for q in questions:  # one question asked in two splits gets one answer
            assert answered.setdefault((q["image"], q["text"]), answers[q["question_id"]]) == answers[q["question_id"]]
    assert {answer_to_label(a) for a in answered.values()} == {"yes", "no"}  # the fixture's answers mix both

    qa_answers = read_answers(tmp_path / "qa_answers.jsonl")
    assert results["qa"]["n"] == 3 and results["qa"]["skipped"] == 1
    assert results["qa"]["yes_ratio"] == pytest.approx(yes_ratio(qa_answers))
    assert [q["label"] for q in read_pope_file(tmp_path / "qa_questions.jsonl")] == ["yes", "no", "no"]
    descriptions = json.loads((tmp_path / "captions.json").read_text())
    assert [d["objects"] for d in descriptions] == [sorted(OBJECTS[i]) for i in (1, 2, 3)]
    assert json.loads((tmp_path / "results.json").read_text())["pope"] == results["pope"]
    markdown = (tmp_path / "results.md").read_text()
    assert "| split | accuracy |" in markdown and "(n=3," in markdown
    for split in STRATEGIES:  # the same answers under the three common rules, the official one as above
        assert set(results["pope_rules"][split]) == {"official", "lmms_eval", "vlmevalkit"}
        assert results["pope_rules"][split]["official"] == results["pope"][split]
    assert "| random | lmms_eval |" in markdown


def test_post_prompt_goes_into_the_prompt_not_the_official_question_file(world, tmp_path, monkeypatch):
    from evals.pope import LLAVA_POST_PROMPT
    from evals.vlm_eval import GreedyAnswerer

    asked = []
    original = GreedyAnswerer.__call__

    def recording(self, asks, *args, **kwargs):
        asked.extend(text for _, text in asks)
        return original(self, asks, *args, **kwargs)

    monkeypatch.setattr(GreedyAnswerer, "__call__", recording)
    run_eval(eval_config(world, tmp_path, post_prompt="llava", descriptions=0, dataset=None), progress=False)
    pope_texts = [q["text"] for q in read_pope_file(tmp_path / "coco_pope_random.json")]
    assert all(not t.endswith(LLAVA_POST_PROMPT) for t in pope_texts)  # the official file keeps the question
    assert f"{pope_texts[0]}\n{LLAVA_POST_PROMPT}" in asked
    assert all(t.endswith(LLAVA_POST_PROMPT) for t in asked)  # POPE and image-dependence prompts alike


def test_qa_questions_and_scores_on_a_crafted_case():
    rows = [negatives("a", [("Is there a cat in the image?", "Yes, there is a cat."), ("Is there a dog?", "No, none."),
                            ("Is there a car?", "Maybe a car."), ("Are there two cups?", "yes")]),
            negatives("b", [("Is there a bird?", "Nothing like that."), ("Is there a chair?", "no"),
                            ("Is the cup on the left?", "NO, on the right.")]),
            negatives("b", [("What is here?", "Yes, a cat.")], kind="conversation")]
    questions, skipped = yes_no_questions(rows)
    assert skipped == 2  # "Maybe a car." and "Nothing like that." open with neither Yes nor No
    assert [(q["question_id"], q["image"], q["text"], q["label"]) for q in questions] == [
        ("a-negatives-0", "a", "Is there a cat in the image?", "yes"), ("a-negatives-1", "a", "Is there a dog?", "no"),
        ("a-negatives-3", "a", "Are there two cups?", "yes"), ("b-negatives-1", "b", "Is there a chair?", "no"),
        ("b-negatives-2", "b", "Is the cup on the left?", "no")]
    said = ["Yes, there is.", "No, there isn't.", "There is not a cup.", "Yes.", "no"]  # -> yes no no yes no
    scores = score_qa(questions, {q["question_id"]: a for q, a in zip(questions, said)}, skipped)
    # gold yes no yes no no, said yes no no yes no: tp 1, tn 2, fn 1, fp 1
    assert (scores["tp"], scores["tn"], scores["fn"], scores["fp"]) == (1, 2, 1, 1)
    assert scores["accuracy"] == pytest.approx(3 / 5) and scores["yes_ratio"] == pytest.approx(2 / 5)
    assert scores["precision"] == scores["recall"] == scores["f1"] == pytest.approx(1 / 2) and scores["skipped"] == 2


def test_no_held_out_negatives_is_reported_as_n_0():
    qa = {**score_qa([], {}), "why": "no --dataset given"}
    assert qa["n"] == 0 and qa["accuracy"] is None
    text = format_results({"checkpoint": "ckpt", "pope": {}, "qa": qa})
    assert "n/a (n=0: no --dataset given)" in text


def test_missing_checkpoint_or_images_is_one_sentence(world, tmp_path):
    with pytest.raises(UserError) as err:
        run_eval(eval_config(world, tmp_path / "a", checkpoint=str(tmp_path / "nope")), progress=False)
    assert "does not exist" in one_sentence(err) and "--checkpoint" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        run_eval(eval_config(world, tmp_path / "b", checkpoint=str(tmp_path / "empty")), progress=False)
    assert "No checkpoint in" in one_sentence(err)
    with pytest.raises(UserError) as err:
        run_eval(eval_config(world, tmp_path / "c", images=str(tmp_path / "no-images")), progress=False)
    assert "--images" in one_sentence(err)


def test_cli_prints_the_sentence_and_exits_2(tmp_path, capsys):
    from evals.vlm_eval import main
    from schemas.errors import exit_on_user_error

    with pytest.raises(SystemExit) as exit_:
        exit_on_user_error(lambda: main(["--checkpoint", str(tmp_path / "nope"), "--instances", "x", "--images", "y",
                                         "--out", str(tmp_path / "out")]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().startswith(f"error: Checkpoint {tmp_path / 'nope'} does not exist;")
