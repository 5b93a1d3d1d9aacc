"""The teacher's data types, one file each: its output model, its instruction and few-shot example, and how
its answer becomes LLaVA turns (`TeacherType`). A new type is one file like `detail.py`, registered in
TEACHER_TYPES below; the prompts (`generators/prompts.py`), the generator (`generators/instructions.py`) and
the config check (`check_types`, run before any crawl) read this registry, and the grounding verifier checks
every type's answers alike. `negatives` is the program's own type: its questions and labels come from
`generators/absent_objects.py`, the teacher only rewords some answers.
"""
from __future__ import annotations

from generators.teacher_types import conversation, detail, reasoning
from generators.teacher_types.base import Output, TeacherType
from schemas.errors import UserError

# In this order in the shared system prompt (changing it changes every prompt: bump PROMPT_VERSION).
TEACHER_TYPES: dict[str, TeacherType] = {t.name: t for t in (conversation.TYPE, detail.TYPE, reasoning.TYPE)}
PROGRAM_TYPES = ("negatives",)

__all__ = ["TEACHER_TYPES", "PROGRAM_TYPES", "Output", "TeacherType", "check_types"]


def check_types(types: list[str]) -> None:
    """generate.types names only known types; otherwise one sentence that lists them."""
    unknown = [t for t in types if t not in TEACHER_TYPES and t not in PROGRAM_TYPES]
    if unknown:
        raise UserError(f"generate.types has {unknown[0]!r}, which is not a data type here; use any of "
                        f"{', '.join([*TEACHER_TYPES, *PROGRAM_TYPES])} (a new teacher type is a file in "
                        f"generators/teacher_types/).")
