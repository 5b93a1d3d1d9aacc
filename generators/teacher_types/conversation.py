"""`conversation`: a multi-turn conversation about the image (LLaVA-Instruct's "conversation")."""
from __future__ import annotations

from pydantic import Field

from generators.teacher_types.base import Output, TeacherType


class QA(Output):
    question: str = Field(min_length=3, max_length=300)
    answer: str = Field(min_length=1, max_length=600)


class Conversation(Output):
    turns: list[QA] = Field(min_length=2, max_length=3)


TYPE = TeacherType(
    name="conversation",
    output=Conversation,
    instruction=("Write a short conversation about the image: a person asks 3 questions and you answer each from the "
                 "facts (what is there, how many, where)."),
    example=Conversation(turns=[
        QA(question="What fruit is on the counter?", answer="There is a banana on the right side of the counter."),
        QA(question="How many cups are there?", answer="There are two cups."),
        QA(question="Where are the cups?", answer="The two cups stand next to each other on the left."),
    ]),
    turns=lambda answer, rng: [(t.question, t.answer) for t in answer.turns],
)
