"""`detail`: a detailed description, asked with one of LLaVA's fixed instructions (LLaVA-Instruct's "detail")."""
from __future__ import annotations

from pydantic import Field

from generators.teacher_types.base import Output, TeacherType

# The instructions LLaVA's detailed-description records open with (a fixed list, one picked per image).
DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Explain the various aspects of the image before you.",
    "Write an exhaustive depiction of the given image.",
)


class Description(Output):
    description: str = Field(min_length=10, max_length=800)


TYPE = TeacherType(
    name="detail",
    output=Description,
    instruction="Describe the image in detail in two or three sentences: every object, its count and where it is.",
    example=Description(description="The image shows a kitchen counter with two cups and a banana. The two cups stand "
                                    "side by side on the left, and the banana lies on the right."),
    turns=lambda answer, rng: [(rng.choice(DETAIL_PROMPTS), answer.description)],
)
