"""What a teacher data type is: `TeacherType` (see `generators/teacher_types/__init__.py`)."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict


class Output(BaseModel):
    """The base of every model the teacher answers in (JSON-schema constrained): no field beyond the declared."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TeacherType:
    """One data type the teacher writes: the model it answers in, its instruction and few-shot example (both
    go into the shared system prompt, `generators/prompts.py`), and how an answer becomes LLaVA's
    (question, answer) pairs, given a random generator seeded by the image (e.g. to pick an instruction)."""

    name: str
    output: type[Output]
    instruction: str
    example: Output
    turns: Callable[[Any, random.Random], list[tuple[str, str]]]
