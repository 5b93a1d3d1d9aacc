"""The exports of a published version (pipelines/exports.py), read from what the demo run really published
(conftest's demo_run: the real crawl, probes, teacher, verifier and publish), each with its consumer's code:
TRL's own dataset utilities and a 1-step SFTTrainer / DPOTrainer (a tiny transformers LLaVA and its processor,
built in-process) for the TRL exports, LLaMA-Factory's documented sharegpt schema for its files.

Not run here: LLaMA-Factory's own loader, whose package pins its own transformers / peft / trl versions and is
not part of this project's environment."""
from __future__ import annotations

import json

import pytest

from filters.yes_no import answer_to_label
from tests.tiny_vlm import tiny_tokenizer

# Content parts as Qwen2-VL / LLaVA processors render them; SFT and DPO rows go through TRL with it.
PARTS_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {% for p in m['content'] %}"
                  "{% if p['type'] == 'image' %}<image> {% else %}{{ p['text'] }} {% endif %}{% endfor %}<eos> "
                  "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


@pytest.fixture(scope="module")
def version(demo_run):
    return demo_run["final"], demo_run["manifest"]["counts"]["published"]


@pytest.fixture(scope="module")
def tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = PARTS_TEMPLATE
    return tok


def test_trl_sft_rows_load_and_render_with_trls_utilities(version, tokenizer):
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational

    final, counts = version
    sft = datasets.load_from_disk(str(final / "trl_sft"))
    llava = {split: json.loads((final / "llava" / f"{split}.json").read_text()) for split in ("train", "validation")}
    assert {s: len(sft[s]) for s in sft} == counts["exports"]["trl_sft"] == {s: len(llava[s]) for s in llava}
    for row, entry in zip(sft["train"], llava["train"]):
        assert row["id"] == entry["id"] and is_conversational(row)
        assert len(row["images"]) == 1 and row["images"][0].size[0] > 0  # a decodable image
        user, assistant = row["messages"][0], row["messages"][1]
        assert user["role"] == "user" and user["content"][0]["type"] == "image"
        assert user["content"][1]["text"] == entry["conversations"][0]["value"].replace("<image>\n", "")
        assert assistant["content"][0]["text"] == entry["conversations"][1]["value"]
        rendered = apply_chat_template({"messages": row["messages"]}, tokenizer)["text"]
        assert rendered.startswith("<|user|> <image> ") and rendered.count("<|assistant|>") == len(row["messages"]) // 2


def test_trl_dpo_pairs_prefer_the_grounded_answer_and_say_where_they_come_from(version, tokenizer):
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational

    final, counts = version
    dpo = datasets.load_from_disk(str(final / "trl_dpo"))
    assert {s: len(dpo[s]) for s in dpo} == counts["exports"]["trl_dpo"]
    pairs = [row for split in dpo for row in dpo[split]]
    sources = {}
    for row in pairs:
        sources[row["source"]] = sources.get(row["source"], 0) + 1
    assert sources == counts["exports"]["dpo_sources"]
    records = {r["id"]: r for split in ("train", "validation")
               for r in json.loads((final / "llava" / f"{split}.json").read_text())}
    rejected_by_verifier = 0
    for row in pairs:
        assert is_conversational(row) and row["prompt"][0]["content"][0]["type"] == "image"
        question = row["prompt"][0]["content"][1]["text"]
        chosen, rejected = row["chosen"][0]["content"][0]["text"], row["rejected"][0]["content"][0]["text"]
        turns = records[row["id"].rsplit("-", 1)[0]]["conversations"]
        published = {t["value"].replace("<image>\n", ""): a["value"] for t, a in zip(turns[::2], turns[1::2])}
        assert published[question] == chosen  # the chosen answer is the one the version publishes
        if row["source"].startswith("probe:"):
            assert answer_to_label(rejected) != answer_to_label(chosen), (question, chosen, rejected)
        else:
            rejected_by_verifier += 1
            assert rejected != chosen
        text = apply_chat_template({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]},
                                   tokenizer)
        assert text["prompt"].endswith("<|assistant|> ") and chosen in text["chosen"] and rejected in text["rejected"]
    probe_turns = sum(len(r["conversations"]) // 2 for r in records.values() if json.loads(r["provenance"]).get("probe_labels"))
    assert sum(n for s, n in sources.items() if s.startswith("probe:")) == probe_turns > 0  # one pair per probe turn
    assert rejected_by_verifier == sum(n for s, n in sources.items() if s.startswith("verifier:"))


@pytest.fixture(scope="module")
def tiny_llava():
    """A transformers LLaVA (1-block CLIP at 32 px: 4 image tokens, 1-block Llama) and its processor, rendering
    content parts with PARTS_TEMPLATE: what TRL's trainers take for vision-language data."""
    import torch
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=tokenizer.convert_tokens_to_ids("<image>")))
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=16, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=PARTS_TEMPLATE)
    return model, processor


def test_one_sft_and_one_dpo_step_of_trl_on_the_exports(version, tiny_llava, tmp_path):
    import copy
    import math

    import datasets
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    final, _ = version
    model, processor = tiny_llava
    image_token = model.config.image_token_index
    common = dict(max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True, save_strategy="no")

    sft = datasets.load_from_disk(str(final / "trl_sft"))["train"].select(range(4))
    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path / "sft"), max_length=None, **common),
                         train_dataset=sft, processing_class=processor)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)  # each row's image went through the processor
    assert ((batch["input_ids"] == image_token).sum(dim=1) == 4).all()  # and took its 4 image tokens
    assert math.isfinite(trainer.train().training_loss)

    dpo = datasets.load_from_disk(str(final / "trl_dpo"))["train"].select(range(4))
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), train_dataset=dpo, processing_class=processor,
                         args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common))
    # the policy starts as its reference, so the first step's DPO loss is -log sigmoid(0) = log 2
    assert trainer.train().training_loss == pytest.approx(math.log(2), abs=1e-4)


def test_llamafactory_files_follow_its_sharegpt_schema(version):
    final, counts = version
    folder = final / "llamafactory"
    info = json.loads((folder / "dataset_info.json").read_text())
    assert set(info) == {"visinstruct_train", "visinstruct_validation"}
    for split, entry in (("train", info["visinstruct_train"]), ("validation", info["visinstruct_validation"])):
        assert entry == {"file_name": f"{split}.json", "formatting": "sharegpt",
                         "columns": {"messages": "messages", "images": "images"},
                         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                  "assistant_tag": "assistant"}}
        rows = json.loads((folder / entry["file_name"]).read_text())
        assert len(rows) == counts["exports"]["llamafactory"][split] == counts[split]["records"]
        for row in rows:
            roles = [m["role"] for m in row["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2)
            # LLaMA-Factory checks that the <image> placeholders match the images, and reads them from dataset_dir
            assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"]) == 1
            assert (folder / row["images"][0]).is_file()


def test_the_card_lists_every_export_with_its_rows_and_how_to_load_it(version, demo_run):
    final, counts = version
    card = (final / "README.md").read_text()
    grounding = demo_run["manifest"]["counts"]["grounding_eval"]  # the demo run measures it against the world's truth
    assert "## Grounding evaluation" in card and grounding
    assert f"| answers | {grounding['answers']} |" in card
    for folder, rows in (("trl_sft", counts["exports"]["trl_sft"]), ("trl_dpo", counts["exports"]["trl_dpo"]),
                         ("llamafactory", counts["exports"]["llamafactory"])):
        line = next(line for line in card.splitlines() if line.startswith(f"| `{folder}/`"))
        assert f"| {rows['train']} | {rows['validation']} |" in line
        assert "load_from_disk" in line or "dataset_dir" in line
