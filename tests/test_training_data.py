"""What the trainer trains on: the token-budget guard, length-grouped batches, text-only mixing. The tiny
in-process models of tests/test_trainer.py; no downloads, CPU only."""
from __future__ import annotations

import json
import random

import pytest

from schemas.errors import UserError
from tests.tiny_vlm import one_sentence, tiny, train_config  # noqa: F401 - tiny is a fixture


def budget_rows(images: str) -> list[dict]:
    """Three one-image samples for max_length=48 with 16 patches per image: one that fits, one whose image would
    start past the cut (a long question before `<image>`), one whose answer would run past it."""
    ask = {"from": "human", "value": "<image>\nwhat color is the sky"}
    return [{"id": "fits", "image": images, "conversations": [ask, {"from": "gpt", "value": "blue"}]},
            {"id": "image_late", "image": images, "conversations": [
                {"from": "human", "value": "describe the image " * 14 + "<image>"}, {"from": "gpt", "value": "blue"}]},
            {"id": "answer_long", "image": images, "conversations": [ask, {"from": "gpt", "value": "blue and green " * 10}]}]


def test_token_budget_guard_drops_exactly_the_samples_truncation_would_cut(tiny, tmp_path, capsys):
    from trainer.train import Trainer

    data = tmp_path / "budget.json"
    data.write_text(json.dumps(budget_rows("0.png")))
    trainer = Trainer(train_config(tiny, tmp_path / "run", data=str(data), max_length=48, max_steps=1, batch_size=1,
                                   max_dropped_share=0.7), progress=False)
    assert [trainer.samples.rows[i].id for i in range(len(trainer.samples))] == ["fits"]
    trainer.run()
    saved = json.loads((tmp_path / "run" / "token_budget.json").read_text())
    assert saved["dropped"] == {"image_tokens_cut": 1, "answer_cut": 1} and saved["kept"] == 1
    assert saved["examples"] == {"image_tokens_cut": ["image_late"], "answer_cut": ["answer_long"]}
    printed = capsys.readouterr().err
    assert "token budget: 1 of 3 samples fit max_length=48; dropped 1 answer_cut, 1 image_tokens_cut" in printed


def test_token_budget_guard_stops_a_run_that_would_drop_too_much_in_one_sentence(tiny, tmp_path):
    from trainer.train import Trainer

    data = tmp_path / "budget.json"
    data.write_text(json.dumps(budget_rows("0.png")))
    with pytest.raises(UserError) as err:
        Trainer(train_config(tiny, tmp_path / "run", data=str(data), max_length=48), progress=False)
    message = one_sentence(err)
    assert message.startswith("2 of 3 samples (66.7%) would be cut or cannot be trained at max_length=48")
    assert "max_dropped_share=1.0%" in message
    assert json.loads((tmp_path / "run" / "token_budget.json").read_text())["kept"] == 1


def test_length_grouped_batches_pad_less_and_resume_in_the_same_order():
    from trainer.sampling import EpochOrder, LengthGroupedOrder, padding_share

    rng = random.Random(0)
    lengths = [rng.randint(40, 600) for _ in range(1000)]  # LLaVA-like spread: short answers to long conversations
    grouped, plain = LengthGroupedOrder(lengths, 8, seed=0), EpochOrder(len(lengths), seed=0)
    assert sorted(grouped.epoch(0)) == list(range(1000)) and grouped.epoch(0) != grouped.epoch(1)
    assert padding_share(lengths, grouped.epoch(0), 8) < 0.1 < 0.3 < padding_share(lengths, plain.epoch(0), 8)
    endless = iter(LengthGroupedOrder(lengths, 8, seed=0))
    uninterrupted = [next(endless) for _ in range(1500)]
    resumed = iter(LengthGroupedOrder(lengths, 8, seed=0, start=1200))
    assert [next(resumed) for _ in range(300)] == uninterrupted[1200:]


def test_text_only_conversations_are_mixed_in_at_the_configured_ratio(tiny, tmp_path):
    from trainer.train import Trainer

    text = tmp_path / "text.json"
    text.write_text(json.dumps([{"id": f"t{i}", "conversations": [{"from": "human", "value": "what color is the sky"},
                                                                    {"from": "gpt", "value": "blue"}]} for i in range(5)]))
    trainer = Trainer(train_config(tiny, tmp_path / "run", text_data=str(text), text_ratio=0.25, max_steps=2,
                                   batch_size=4), progress=False)
    ids = [trainer.samples.rows[i].id for i in range(len(trainer.samples))]
    assert len(ids) == 16 and ids[:12] == [f"s{i}" for i in range(12)]  # 12 multimodal + 4 text-only: 25%
    assert len(set(ids[12:])) == 4 and all(i.startswith("t") for i in ids[12:])
    assert len(trainer.run()) == 2

    with_image = tmp_path / "bad.json"
    with_image.write_text(json.dumps([{"id": "x", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "blue"}]}]))
    with pytest.raises(UserError) as err:
        Trainer(train_config(tiny, tmp_path / "bad", text_data=str(with_image)), progress=False)
    assert "row x has an image" in one_sentence(err)
