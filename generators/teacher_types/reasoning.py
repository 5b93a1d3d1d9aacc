"""`reasoning`: one question that needs reasoning about the scene, answered (LLaVA-Instruct's "complex reasoning")."""
from __future__ import annotations

from pydantic import Field

from generators.teacher_types.base import Output, TeacherType


class Reasoning(Output):
    question: str = Field(min_length=3, max_length=300)
    answer: str = Field(min_length=1, max_length=800)


TYPE = TeacherType(
    name="reasoning",
    output=Reasoning,
    instruction=("Ask one question that needs reasoning about the scene (what is happening, why the objects are there, "
                 "what someone could do next) and answer it in two sentences, using only the listed objects."),
    example=Reasoning(question="What might someone be preparing here?",
                      answer="With two cups and a banana on the counter, someone may be having a drink and a "
                             "snack. The cups suggest it is for two people."),
    turns=lambda answer, rng: [(answer.question, answer.answer)],
)
