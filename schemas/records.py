"""Records that flow between stages.

Every input URL becomes one `ImageRecord`; a stage either keeps it or drops it with
a reason (`decode_error:...`, `pixels_too_large:...`), so nothing vanishes.
"""
from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

KEEP = "ok"
DROP = "dropped"
# What a dropped record no longer carries (`ImageRecord.dropped`): its image and what was computed from it.
CLEARED_WHEN_DROPPED = ("image", "embedding", "dedup_embedding", "pixels", "tokens")


def reason_kind(reason: str) -> str:
    """`download_error:http_404` -> `download_error:http_404`; `decode_error:<pillow text>` -> `decode_error`.

    Reasons are `<kind>[:<detail>]`; a few kinds carry a well-known sub-kind that we keep
    (`download_error:<class>`), the rest keep only the kind so counts stay small.
    """
    kind, _, detail = reason.partition(":")
    if kind in ("download_error", "teacher_error") and detail:
        return f"{kind}:{detail.split(':')[0]}"
    return kind


class ObjectAnnotation(BaseModel):
    """An object in an image: a category and a normalized box [x0, y0, x1, y1] in 0..1 (None for a CLIP tag)."""

    model_config = ConfigDict(extra="forbid")

    category: str
    box: tuple[float, float, float, float] | None
    score: float = Field(default=1.0, ge=0.0, le=1.0)
    source: Literal["annotation", "clip_zero_shot"] = "annotation"

    @model_validator(mode="after")
    def _box_is_ordered_and_normalized(self) -> "ObjectAnnotation":
        if self.box is None:
            return self
        x0, y0, x1, y1 = self.box
        if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
            raise ValueError(f"box {self.box} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
        return self


class Probe(BaseModel):
    """A program-labelled yes/no question about an image (generators/absent_objects.py writes them)."""

    question: str
    label: Literal["yes", "no"]
    answer: str  # the program's grounded answer; the teacher may rephrase it
    kind: Literal["present", "absent", "count", "position"]
    category: str
    strategy: str | None = None  # random / popular / adversarial for absent-object probes


class ImageRecord(BaseModel):
    """One image-caption pair, from URL list row to validated image."""

    model_config = ConfigDict(extra="forbid")

    uid: str
    url: str
    caption: str | None = None
    key: str | None = None  # img2dataset's key inside its shard
    shard: int | None = None  # the crawl shard (URL list row group) it came from: resume counts work per shard
    sha256: str | None = None  # of the downloaded bytes, before any re-encoding
    width: int | None = None
    height: int | None = None
    status: Literal["ok", "dropped"] = KEEP
    reason: str | None = None
    stage: str | None = None  # the stage that dropped it
    image: bytes | None = Field(default=None, repr=False)  # encoded image (RGB JPEG/PNG once validated)
    clip_score: float | None = None  # cosine(image, caption) under the configured CLIP
    embedding: list[float] | None = Field(default=None, repr=False)  # L2-normalized CLIP image embedding
    # L2-normalized embedding dedup compares when dedup.embedding / crop_scales ask for one of their own,
    # float32 bytes (3328 of them for the sample CLIP: a list of floats costs more to build than the model
    # forward); dedup clears it on the records it keeps.
    dedup_embedding: bytes | None = Field(default=None, repr=False)
    # Between the CLIP stage's CPU half and its model half only (filters/clip_preprocess.py -> clip_scorer.py):
    pixels: bytes | None = Field(default=None, repr=False)  # uint8 [views, H, W, 3], resized for the model
    tokens: list[int] | None = Field(default=None, repr=False)  # the caption, tokenized for the model
    # Generation columns (see generators/): objects and probes as typed Arrow columns (lists of structs)
    objects: list[ObjectAnnotation] | None = None
    probes: list[Probe] | None = None  # program-labelled yes/no questions
    # Set by the probes stage: whether generate.max_images picked this image for the teacher (False: it
    # keeps only its probes, in the program's phrasings).
    teacher_selected: bool | None = None
    # JSON text: an item's provenance, a rejected turn's fields and the usage counts differ by type and teacher
    instructions: str | None = None  # [LLaVA record]: {id, type, conversations, provenance}
    rejected_turns: str | None = None  # [{type, reason, question, answer}] the grounding verifier removed
    teacher_usage: str | None = None  # TeacherUsage.to_dict() for this image's requests

    @model_validator(mode="after")
    def _dropped_has_reason(self) -> "ImageRecord":
        if self.status == DROP and not self.reason:
            raise ValueError(f"record {self.uid} is dropped without a reason")
        return self

    def dropped(self, stage: str, reason: str) -> "ImageRecord":
        return self.model_copy(update={"status": DROP, "stage": stage, "reason": reason,
                                       **dict.fromkeys(CLEARED_WHEN_DROPPED)})


def stored_type(annotation):
    """A field's type as a column stores it: `X | None` -> X (the column is nullable), `Literal["ok", ...]` ->
    str; `list[X]` and models as they are. The Arrow schema (`pipelines/batches.py`) and the published
    features (`pipelines/publish.py`) are derived from the models through this."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


class PublishedTurn(BaseModel):
    """One turn of a published conversation (LLaVA's keys)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Literal["human", "gpt"] = Field(alias="from")
    value: str


class PublishedRow(BaseModel):
    """One row of the published Hugging Face dataset (`hf/`): one LLaVA record with its image and where it came
    from. `pipelines/publish.py` derives the dataset's features from these fields; `image` is stored as the
    crawled bytes (an HF `Image` feature, decoded to PIL on access)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    image: bytes = Field(json_schema_extra={"hf": "image"}, repr=False)
    conversations: list[PublishedTurn]
    type: str  # the teacher data type: conversation, detail, reasoning, negatives, caption
    uid: str  # the image's record
    caption: str | None = None
    clip_score: float | None = None
    objects: str = "[]"  # JSON text of the record's objects ([ObjectAnnotation], as the objects stage found them)
    provenance: str = "{}"  # JSON text (sorted keys)


IMAGE_TOKEN = "<image>"  # where a sample's image goes: LLaVA's placeholder, and the trainer's (trainer/conversation.py)

# What a VLM trainer could expand into image or video features, in any case and with spaces inside:
# ours and LLaVA's <image>, LLaVA-Video's <video>, LLaVA's <im_start>/<im_end>/<im_patch>, Llama 3.2's
# <|image|>, Qwen2-VL's <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>, <|vision_pad|>.
_PLACEHOLDER = re.compile(r"<\|?\s*(image|video|im_start|im_end|im_patch|image_pad|video_pad|vision_start|vision_end|"
                          r"vision_pad)\s*\|?>", re.IGNORECASE)


def neutralize_placeholders(text: str) -> str:
    """Web or teacher text with every image placeholder made inert: `<image>` -> `[image]`, `< Video >` ->
    `[Video]`, `<|image_pad|>` -> `[image_pad]` (the pattern above lists what counts). Captions and answers
    are data: a caption holding `<image>` would otherwise give its record a second image slot, which the
    trainer rejects (or, in another trainer, fills with the wrong features). Applied to the caption at
    validate (so the teacher prompt, CLIP and the published `caption` column get the inert text) and to
    every question and answer in `llava_conversation`, the one builder of written turns."""
    return _PLACEHOLDER.sub(lambda m: f"[{m.group(1)}]", text)


def llava_conversation(pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    """(question, answer) pairs as LLaVA's `conversations`: human/gpt turns, `<image>` in the first human turn
    and nowhere else (placeholders in the text are neutralized)."""
    turns = []
    for i, (question, answer) in enumerate(pairs):
        question, answer = neutralize_placeholders(question), neutralize_placeholders(answer)
        turns += [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + question},
                  {"from": "gpt", "value": answer}]
    return turns


@dataclass
class StageResult:
    """What a stage returns for a batch: the records it keeps and those it drops (each with a reason)."""

    kept: list[ImageRecord] = field(default_factory=list)
    dropped: list[ImageRecord] = field(default_factory=list)
