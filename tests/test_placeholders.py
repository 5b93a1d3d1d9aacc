"""Captions are data: image placeholders a caption (or the teacher) puts in the text never reach a record.

Crawled images with captions full of `<image>`-like tokens go through the real stages (validate, objects
from a COCO instances file, probes, generate, verify), are published, and the trainer reads the LLaVA
export: every record has exactly one `<image>`, at the start of its first human turn, and the trainer's
`ConversationEncoder` (built as tests/test_trainer.py builds it) accepts it.

The teacher is a test double: `CaptionEchoingTeacher`, a small OpenAI-compatible HTTP server on
127.0.0.1 (a real llama.cpp server cannot be made to copy captions). It answers every request in the
JSON shape the generator asks for, copying the caption it finds in the prompt into its answers and adding
an `<image>` of its own, as a teacher trained on LLaVA data might.
"""
from __future__ import annotations

import io
import json
import re

import pyarrow.parquet as pq
import pytest
from PIL import Image

from filters.grounding import GroundingVerifier
from filters.validate import ImageValidator
from generators.absent_objects import AbsentObjectSampler
from generators.instructions import InstructionGenerator
from generators.objects import ObjectFinder
from generators.prompts import task_messages
from infra.fake_teacher import FakeTeacher
from pipelines.publish import publish_dataset
from pipelines.batches import records_to_table
from pipelines.stage_fits import fit_probes
from schemas.config import ClipConfig, GenerateConfig, ObjectsConfig, PipelineConfig, TeacherConfig, ValidateConfig
from schemas.records import IMAGE_TOKEN, ImageRecord, ObjectAnnotation, neutralize_placeholders
from tests.tiny_vlm import encoder, tiny, vlm  # noqa: F401 - the trainer tests' tiny model fixtures

# file name -> (caption as crawled, COCO objects as (category, [x, y, w, h]) on a 64x48 image)
IMAGES = {
    "000000000001.jpg": ("<image> Two cups and a banana <image> on a kitchen counter <Image> < image > <video>",
                         [("cup", [4, 20, 10, 14]), ("cup", [18, 20, 10, 14]), ("banana", [40, 24, 18, 8])]),
    "000000000002.jpg": ("<image>\nA dog and a person in a park <|image_pad|> <image><image>",
                         [("dog", [4, 10, 20, 30]), ("person", [36, 4, 20, 40])]),
    "000000000003.jpg": ("A cat next to a bowl <IMAGE>", [("cat", [4, 10, 24, 30]), ("bowl", [40, 30, 16, 10])]),
}


class CaptionEchoingTeacher(FakeTeacher):
    """OpenAI-compatible `/v1/chat/completions` that copies the prompt's caption into every answer (test double)."""

    def __init__(self):
        self.prompts: list[str] = []
        super().__init__(latency=0.0, answer=lambda request, seed: self.reply(request["messages"][-1]["content"]))

    def reply(self, prompt: str) -> dict:
        """The JSON the generator's output model asks for, by the task named in the prompt."""
        self.prompts.append(prompt)
        caption = json.loads(re.search(r"^Caption: (.*)$", prompt, re.MULTILINE).group(1))
        task = re.search(r"Task \((\w+)\)", prompt).group(1)
        echo = f"{caption} {IMAGE_TOKEN}"
        if task == "conversation":
            return {"turns": [{"question": f"What does the {IMAGE_TOKEN} show?", "answer": echo},
                              {"question": f"{IMAGE_TOKEN} What else?", "answer": echo}]}
        if task == "detail":
            return {"description": echo}
        if task == "reasoning":
            return {"question": f"Why is this in the {IMAGE_TOKEN}?", "answer": echo}
        numbered = re.findall(r"^\d+\. (.*)$", prompt.split("Task (rephrase)")[1], re.MULTILINE)
        return {"answers": [f"{answer} {IMAGE_TOKEN}" for answer in numbered]}


def jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def crawled_run(tmp_path, teacher: CaptionEchoingTeacher):
    """The kept records after every text-handling stage, as the pipeline would write them (CLIP and dedup,
    which only score and drop, are left out)."""
    coco = {"images": [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in enumerate(IMAGES)],
            "categories": [{"id": k, "name": c} for k, c in enumerate(sorted({c for _, objs in IMAGES.values()
                                                                              for c, _ in objs}))],
            "annotations": []}
    ids = {c["name"]: c["id"] for c in coco["categories"]}
    for i, (_, objs) in enumerate(IMAGES.values()):
        coco["annotations"] += [{"id": len(coco["annotations"]), "image_id": i, "category_id": ids[c], "bbox": box}
                                for c, box in objs]
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    records = [ImageRecord(uid=f"{i:016x}", url=f"http://127.0.0.1/img/{name}", caption=caption,
                           image=jpeg((40 * i, 90, 200)))
               for i, (name, (caption, _)) in enumerate(IMAGES.items())]
    config = PipelineConfig()
    stages = [ImageValidator(ValidateConfig()),
              ObjectFinder(ObjectsConfig(annotations=[str(tmp_path / "instances.json")]), ClipConfig())]
    for stage in stages:
        records = stage(records).kept
    records = AbsentObjectSampler(fit_probes(config, records_to_table(records)), config.generate, config.objects)(
        records).kept
    teacher_config = TeacherConfig(kind="openai", timeout=10, max_retries=1)
    generated = InstructionGenerator(teacher_config, GenerateConfig(types_per_image=3, rephrase_per_image=2),
                                     teacher.base_url, cache_dir=None)(records)
    assert not generated.dropped, [r.reason for r in generated.dropped]
    verified = GroundingVerifier()(generated.kept)
    assert len(verified.kept) == len(IMAGES), [r.reason for r in verified.dropped]
    return verified.kept


def test_placeholders_in_captions_and_teacher_answers_never_reach_a_record(tmp_path, vlm):  # noqa: F811
    import datasets

    from trainer.data import LlavaJson

    with CaptionEchoingTeacher() as teacher:
        records = crawled_run(tmp_path, teacher)
    assert len(teacher.prompts) == len(IMAGES) * 4  # three teacher types and one rephrasing per image
    assert not any(IMAGE_TOKEN in prompt for prompt in teacher.prompts)  # the teacher never saw one
    run = tmp_path / "run"
    (run / "records").mkdir(parents=True)
    pq.write_table(records_to_table(records), run / "records" / "part-0.parquet")
    publish_dataset(run, validation_fraction=0.0)

    rows = LlavaJson(run / "llava" / "train.json", run / "llava")
    assert len(rows) == len(IMAGES) * 4
    echoed = [t["value"] for r in rows.rows if r["id"].endswith("-detail") for t in r["conversations"][1::2]]
    assert echoed and all(answer.endswith("[image]") for answer in echoed)  # the teacher's copies were kept
    chat, plain = encoder(vlm, "chat"), encoder(vlm, "plain")
    for i in range(len(rows)):
        row = rows[i]
        turns = row.conversations
        text = json.dumps(turns)
        assert text.count(IMAGE_TOKEN) == 1 and turns[0]["value"].startswith(f"{IMAGE_TOKEN}\n"), text
        assert chat.encode(turns, len(row.images)).num_images == 1
        assert plain.encode(turns, len(row.images)).num_images == 1

    captions = set(datasets.load_from_disk(str(run / "hf"))["train"]["caption"])
    assert captions == {neutralize_placeholders(caption).strip() for caption, _ in IMAGES.values()}
    for caption in captions:  # Stage-1 caption samples, as infra/proof.py writes them
        sample = [{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}]
        assert plain.encode(sample, 1).num_images == 1


def test_the_trainer_still_refuses_a_record_with_a_stray_placeholder(vlm):  # noqa: F811
    """The last guard, for data written elsewhere: the count of `<image>` must match the sample's images."""
    caption = IMAGES["000000000001.jpg"][0]
    with pytest.raises(ValueError, match="tokens but the sample has 1 images"):
        encoder(vlm, "plain").encode([{"from": "human", "value": IMAGE_TOKEN}, {"from": "gpt", "value": caption}], 1)


@pytest.mark.parametrize("text, inert", [
    ("<image> a <Image> b < image > c", "[image] a [Image] b [image] c"),
    ("<video> <|image|> <|image_pad|> <|vision_start|> <im_patch>", "[video] [image] [image_pad] [vision_start] [im_patch]"),
    ("2 < 3 and <b>bold</b> <images> [image]", "2 < 3 and <b>bold</b> <images> [image]"),
])
def test_neutralizing_changes_only_placeholders(text, inert):
    assert neutralize_placeholders(text) == inert


def test_the_teacher_prompt_never_holds_a_placeholder():
    """Records that skipped validate (hand-made, or from an older run) still reach the teacher inert."""
    cup = ObjectAnnotation(category="cup", box=(0.1, 0.1, 0.3, 0.3))
    prompt = task_messages("detail", "<image> a cup <image>", [cup])[-1]["content"]
    assert IMAGE_TOKEN not in prompt and '"[image] a cup [image]"' in prompt
