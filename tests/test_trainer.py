"""The VLM trainer on tiny in-process models (tests/tiny_vlm.py): a 1-block Llama (hidden 32) with a
word-level tokenizer and chat template, and the 32 px tiny CLIP. No downloads, CPU only."""
from __future__ import annotations

import json
import random

import pytest
import torch

from schemas.config import ClipConfig
from schemas.errors import UserError
from tests.tiny_vlm import batch_of, encoder, one_sentence, tiny, train_config, vlm  # noqa: F401 - fixtures

TWO_TURNS = [{"from": "human", "value": "<image>\nwhat color is the sky"}, {"from": "gpt", "value": "blue"},
             {"from": "human", "value": "and the grass"}, {"from": "gpt", "value": "green"}]


def test_chat_labels_supervise_exactly_the_assistant_answers_and_end_tokens(vlm):
    tok = vlm.tokenizer
    encoded = encoder(vlm).encode(TWO_TURNS, num_images=1)
    supervised = [label for label in encoded.labels if label != -100]
    eos = tok.eos_token_id
    assert supervised == tok("blue", add_special_tokens=False)["input_ids"] + [eos] + \
        tok("green", add_special_tokens=False)["input_ids"] + [eos]
    image_positions = [i for i, t in enumerate(encoded.input_ids) if t == vlm.image_token_id]
    assert len(image_positions) == vlm.num_patches == 16  # 32 px / 8 px patches
    assert all(encoded.labels[i] == -100 for i in image_positions)
    assert len(encoded.input_ids) == len(encoded.labels)


def test_plain_rendering_supervises_the_caption_and_eos_only(vlm):
    tok = vlm.tokenizer
    turns = [{"from": "human", "value": "<image>\ndescribe the image"}, {"from": "gpt", "value": "a red cat on the mat"}]
    encoded = encoder(vlm, "plain").encode(turns, num_images=1)
    assert [label for label in encoded.labels if label != -100] == \
        tok("a red cat on the mat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert encoded.input_ids[: vlm.num_patches] == [vlm.image_token_id] * vlm.num_patches


def test_a_batch_without_supervised_tokens_is_an_error_not_a_zero_loss(vlm):
    from trainer.train import count_supervised

    human_only = [{"from": "human", "value": "<image>\nwhat color is the sky"}]
    batch = batch_of(vlm, [(human_only, 1), (human_only, 1)])
    with pytest.raises(UserError, match="chat template probably does not match"):
        count_supervised(batch["labels"])
    assert count_supervised(batch_of(vlm, [(TWO_TURNS, 1)])["labels"]) == 4


def test_truncation_never_splits_an_image(vlm):
    encoded = encoder(vlm, max_length=vlm.num_patches + 5).encode(
        [{"from": "human", "value": "<image> <image>\nhow many animals"}, {"from": "gpt", "value": "two"}], 2)
    assert encoded.num_images == 1 and encoded.input_ids.count(vlm.image_token_id) == vlm.num_patches


def test_vision_tower_returns_the_penultimate_blocks_patch_tokens(tmp_path):
    import open_clip

    from tests.tiny_clip import TINY_CONFIG
    from trainer.vision_tower import VisionTower

    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": 3}}
    (tmp_path / "tiny_clip3.json").write_text(json.dumps(config))
    open_clip.add_model_config(str(tmp_path / "tiny_clip3.json"))
    torch.save(open_clip.create_model("tiny_clip3").state_dict(), tmp_path / "tiny_clip3.pt")
    tower = VisionTower.from_config(ClipConfig(model="tiny_clip3", pretrained=str(tmp_path / "tiny_clip3.pt"),
                                               config_path=str(tmp_path / "tiny_clip3.json"), device="cpu"))
    seen = []
    tower.visual.transformer.resblocks[1].register_forward_hook(lambda module, args, out: seen.append(out))
    pixels = torch.randn(2, 3, 32, 32)
    patches = tower(pixels)
    hidden = seen[0] if tower.visual.transformer.batch_first else seen[0].transpose(0, 1)  # [B, 1 + N, D]
    assert patches.shape == (2, 16, 32) and torch.equal(patches, hidden[:, 1:])
    assert not any(p.requires_grad for p in tower.parameters())


@pytest.mark.parametrize("images_per_sample", [[0], [1], [2], [0, 2, 1]])
def test_image_features_are_spliced_where_the_placeholders_stand(vlm, images_per_sample):
    text = {0: "what color is the sky", 1: "<image>\nwhat color is the sky", 2: "<image> <image>\nhow many animals"}
    batch = batch_of(vlm, [([{"from": "human", "value": text[n]}, {"from": "gpt", "value": "blue"}], n)
                           for n in images_per_sample])
    mask = batch["input_ids"] == vlm.image_token_id
    assert batch["pixel_values"].shape[0] == sum(images_per_sample)
    assert mask.sum(dim=1).tolist() == [n * vlm.num_patches for n in images_per_sample]
    with torch.no_grad():
        embeds = vlm.embed(batch["input_ids"], batch["pixel_values"])
        features = vlm.projector(vlm.vision_tower(batch["pixel_values"]))
        text_embeds = vlm.language_model.get_input_embeddings()(batch["input_ids"])
        loss = vlm(**batch).loss
    d_lm = vlm.language_model.config.hidden_size
    assert embeds.shape == (*batch["input_ids"].shape, d_lm)
    assert features.shape == (sum(images_per_sample), vlm.num_patches, d_lm)
    assert torch.equal(embeds[mask], features.reshape(-1, d_lm))
    assert torch.equal(embeds[~mask], text_embeds[~mask])
    assert torch.isfinite(loss)


def test_generation_from_left_padded_prompts_with_and_without_images(vlm):
    from trainer.data import Collate

    enc = encoder(vlm)
    prompts = [enc.encode_prompt([{"from": "human", "value": "<image>\nwhat color is the sky"}], 1),
               enc.encode_prompt([{"from": "human", "value": "how many birds"}], 0)]
    size = vlm.vision_tower.image_size
    batch = Collate(vlm.tokenizer.pad_token_id, size, pad_left=True)(
        [{**vars(p), "pixel_values": [torch.randn(3, *size)] * p.num_images} for p in prompts])
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][:, -1].tolist() == [1, 1]
    new = vlm.eval().generate(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], max_new_tokens=3,
                              do_sample=False)
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 3


def grads_after_one_backward(tiny, **fields):
    from trainer.checkpoint import build_vlm
    from trainer.stages import apply_stage, stage_spec

    config = train_config(tiny, tiny["base"] / "unused", **fields)
    model = build_vlm(config.model)
    table = apply_stage(model, stage_spec(config.stage), config)
    fmt = stage_spec(config.stage).render
    text_only = [{"from": "human", "value": "what color is the sky"}, {"from": "gpt", "value": "blue"}]
    model(**batch_of(model, [(TWO_TURNS, 1), (text_only, 0)], fmt)).loss.backward()
    return model, table, {n for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("stage,lora", [("align", False), ("finetune", False), ("finetune", True)])
def test_gradients_reach_exactly_the_modules_the_stage_trains(tiny, stage, lora):
    model, table, with_grad = grads_after_one_backward(tiny, stage=stage, lora=lora)
    names = {n for n, _ in model.named_parameters()}
    projector = {n for n in names if n.startswith("projector.")}
    lm = {n for n in names if n.startswith("language_model.")}
    expected = projector | ({n for n in lm if "lora_" in n} if lora else lm if stage == "finetune" else set())
    assert with_grad == expected and projector and not any(n.startswith("vision_tower.") for n in with_grad)
    trains = {row["module"] for row in table if row["trains"]}
    assert trains == {"align": {"projector"}, "finetune": {"projector", "language_model"}}[stage] \
        if not lora else {"projector", "language_model.lora_adapters"}


def test_top_layers_and_a_frozen_projector_train_only_what_they_say(tiny):
    model, table, with_grad = grads_after_one_backward(tiny, stage="finetune", lm_layers=1, freeze=["projector"])
    names = {n for n, _ in model.named_parameters()}
    block = {n for n in names if n.startswith("language_model.model.layers.0.")}
    norm = {n for n in names if n.startswith("language_model.model.norm.")}
    assert with_grad == block | norm and block  # no embeddings, no projector
    assert {row["module"] for row in table if row["trains"]} == {"language_model"}


def test_a_stage_cannot_freeze_what_it_does_not_train_or_train_more_blocks_than_there_are(tiny):
    with pytest.raises(UserError, match="does not train"):
        grads_after_one_backward(tiny, stage="align", freeze=["language_model"])
    with pytest.raises(UserError, match="lm_layers=5 but the language model has 1 decoder blocks"):
        grads_after_one_backward(tiny, stage="finetune", lm_layers=5)


def test_the_projector_gets_its_own_learning_rate(tiny, tmp_path):
    from trainer.train import Trainer

    trainer = Trainer(train_config(tiny, tmp_path / "run", lr=1e-5, projector_lr=1e-3), progress=False)
    groups = [(g["initial_lr"], sum(p.numel() for p in g["params"])) for g in trainer.optimizer.param_groups]
    projector = sum(p.numel() for p in trainer.vlm.projector.parameters())
    assert groups == [(1e-5, sum(p.numel() for p in trainer.vlm.parameters() if p.requires_grad) - projector),
                      (1e-3, projector)]


def test_resuming_with_other_trainable_modules_is_one_sentence(tiny, tmp_path):
    from trainer.train import Trainer

    Trainer(train_config(tiny, tmp_path / "run", max_steps=3, save_every=3), progress=False).run()
    with pytest.raises(UserError, match=r"holds a run with stage=finetune, lora=False, lm_layers=None"):
        Trainer(train_config(tiny, tmp_path / "run", lm_layers=1), progress=False)


LORA = {"stage": "finetune", "lora": True, "grad_accum": 2, "gradient_checkpointing": True}


@pytest.mark.parametrize("fields", [{"stage": "align"}, {"stage": "finetune"}, LORA], ids=["align", "full", "lora"])
def test_resume_mid_stage_continues_the_same_loss_curve(tiny, tmp_path, fields):
    from trainer.train import Trainer

    straight = [r["loss"] for r in Trainer(train_config(tiny, tmp_path / "straight", **fields), progress=False).run()]
    first = Trainer(train_config(tiny, tmp_path / "resumed", **fields), progress=False).run(until_step=3)
    torch.manual_seed(1234)  # the process state a fresh start would have: nothing carried over but the files
    random.seed(1234)
    second = Trainer(train_config(tiny, tmp_path / "resumed", **fields), progress=False)
    assert second.step == 3
    resumed = [r["loss"] for r in first + second.run()]
    assert len(straight) == 6 and resumed == pytest.approx(straight, abs=1e-6, rel=0)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


@pytest.fixture(scope="module")
def align_run(tiny, tmp_path_factory):
    from trainer.train import Trainer

    out = tmp_path_factory.mktemp("align")
    Trainer(train_config(tiny, out, stage="align", max_steps=2, save_every=2), progress=False).run()
    return out


def test_cli_runs_finetune_from_the_align_checkpoint_and_inherits_its_architecture(tiny, align_run, tmp_path):
    from pipelines.train import main

    out = tmp_path / "ft"
    main(["--stage", "finetune", "--init", str(align_run), "--data", str(tiny["data"]), "--image-folder",
          str(tiny["images"]), "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--device", "cpu",
          "--set", f"model.vision.pretrained={tiny['model'].vision.pretrained}"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["tokens_per_s"] > 0 for s in steps)
    assert (out / "checkpoints" / "step-000002" / "lm" / "config.json").is_file()


def test_published_dataset_version_trains(tiny, tmp_path):
    import datasets

    from trainer.train import Trainer

    rows = json.loads(tiny["data"].read_text())[::4][:2]  # one-image samples
    table = {"id": [r["id"] for r in rows], "image": [str(tiny["images"] / r["image"]) for r in rows],
             "conversations": [r["conversations"] for r in rows], "type": ["conversation", "caption"]}
    features = datasets.Features({"id": datasets.Value("string"), "image": datasets.Image(),
                                  "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
                                  "type": datasets.Value("string")})
    published = tmp_path / "outputs" / "sample" / "v-123" / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(table, features=features)}).save_to_disk(str(published))
    config = train_config(tiny, tmp_path / "run", data=None, dataset=str(tmp_path / "outputs" / "sample"),
                          version="v-123", max_steps=1, types=["caption"])
    trainer = Trainer(config, progress=False)
    assert len(trainer.samples) == 1 and len(trainer.run()) == 1


def test_unknown_model_id_is_one_sentence():
    from trainer.language_model import resolve_language_model

    with pytest.raises(UserError) as err:
        resolve_language_model("no-such-org/no-such-model-7b")
    assert "no-such-org/no-such-model-7b" in one_sentence(err)


def test_missing_dataset_version_lists_the_versions_there(tmp_path):
    from trainer.data import published_dataset

    for version in ("v-aaa", "v-bbb"):
        (tmp_path / "sample" / version / "hf").mkdir(parents=True)
    with pytest.raises(UserError) as err:
        published_dataset(tmp_path / "sample", "v-zzz")
    assert "v-aaa, v-bbb" in one_sentence(err)


def test_cli_prints_the_sentence_and_exits_2_before_loading_models(tmp_path, capsys):
    from pipelines.train import main

    (tmp_path / "sample" / "v-aaa" / "hf").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        main(["--dataset", str(tmp_path / "sample"), "--version", "v-nope", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: Dataset version v-nope does not exist in {tmp_path / 'sample'}; published versions there: v-aaa."]


def test_checkpoint_of_another_architecture_is_one_sentence(tiny, align_run, tmp_path):
    from trainer.train import Trainer

    config = train_config(tiny, tmp_path / "other", init=str(align_run),
                          model=tiny["model"].model_copy(update={"projector": "linear"}))
    with pytest.raises(UserError) as err:
        Trainer(config, progress=False)
    assert "model.projector='mlp2x_gelu'" in one_sentence(err)
