"""The stand-in served model (infra/fake_teacher.py) that the teacher tests and benchmarks measure against:
schema-valid answers the client accepts, no limit on requests in flight, and counters that say so."""
from __future__ import annotations

from generators.teacher_types import TEACHER_TYPES
from generators.prompts import PROMPT_VERSION, task_messages
from generators.teacher import TeacherClient, TeacherRequest
from infra.fake_teacher import FakeTeacher
from schemas.config import TeacherConfig
from schemas.records import ObjectAnnotation

OBJECTS = [ObjectAnnotation(category="cup", box=(0.1, 0.5, 0.3, 0.7))]


def test_every_teacher_type_gets_a_valid_answer_and_requests_run_side_by_side():
    config = TeacherConfig(kind="openai", model="fake-teacher", concurrency=32, max_retries=0)
    kinds = sorted(TEACHER_TYPES)
    batch = [TeacherRequest(task_messages(kind, f"Photo {i}.", OBJECTS), TEACHER_TYPES[kind].output, seed=i)
             for i in range(48) for kind in [kinds[i % len(kinds)]]]
    with FakeTeacher(latency=0.3) as teacher:
        client = TeacherClient(config, teacher.base_url, PROMPT_VERSION)
        answers = client.run_all(batch)
        again = client.run_all(batch[:4])
    assert all(isinstance(a, r.output) for a, r in zip(answers, batch))  # validated by the client's own parsing
    assert client.usage.failed == 0 and teacher.requests == 52
    assert teacher.peak_in_flight >= 24  # 32 allowed in flight; a server that queued would show 1
    assert again == answers[:4]  # the same request, the same answer


def test_a_new_teacher_type_is_one_registration_away(monkeypatch):
    """A data type is declared once (generators/teacher_types/): registering one more makes the generator
    plan it, ask for it in its own output model and assemble its turns, with no other change; the grounding
    verifier checks its answers like any other type's. An unknown type in the config is one sentence."""
    import json

    import pytest
    from pydantic import Field

    from filters.grounding import GroundingVerifier
    from generators.instructions import InstructionGenerator
    from generators.teacher_types import Output, TeacherType, check_types
    from schemas.config import GenerateConfig, ObjectsConfig
    from schemas.errors import UserError
    from schemas.records import ImageRecord

    class Count(Output):
        answer: str = Field(min_length=1, max_length=200)

    counting = TeacherType(name="counting", output=Count, instruction="Say how many objects there are.",
                           example=Count(answer="There are three objects."),
                           turns=lambda answer, rng: [("How many objects are there?", answer.answer)])
    monkeypatch.setitem(TEACHER_TYPES, "counting", counting)
    records = [ImageRecord(uid=f"u{i}", url=f"http://x/{i}.jpg", caption=caption, teacher_selected=True,
                           objects=list(OBJECTS))
               for i, caption in enumerate(["A cup on a table.", "A cup, and maybe a dog."])]

    def answer(request, seed):  # a teacher that sees a dog where the caption guesses one
        said_dog = "dog" in request["messages"][-1]["content"].split("Task")[0]
        return {"answer": "There is one dog next to the cup." if said_dog else "There is one cup."}

    config = TeacherConfig(kind="openai", model="fake-teacher", concurrency=4, max_retries=0)
    with FakeTeacher(latency=0.01, answer=answer) as teacher:
        generator = InstructionGenerator(config, GenerateConfig(types=["counting"], types_per_image=1),
                                         teacher.base_url, cache_dir=None)
        generated = generator(records)
    assert teacher.requests == 2 and len(generated.kept) == 2
    (written,) = json.loads(generated.kept[0].instructions)
    assert written["type"] == "counting" and written["conversations"] == [
        {"from": "human", "value": "<image>\nHow many objects are there?"}, {"from": "gpt", "value": "There is one cup."}]
    verified = GroundingVerifier(ObjectsConfig().vocabulary)(generated.kept)
    assert [r.uid for r in verified.kept] == ["u0"] and [r.uid for r in verified.dropped] == ["u1"]
    assert "dog" in verified.dropped[0].reason + (verified.dropped[0].rejected_turns or "")
    monkeypatch.delitem(TEACHER_TYPES, "counting")
    with pytest.raises(UserError, match=r"^generate.types has 'counting', which is not a data type here; use any of "
                                        r"conversation, detail, reasoning, negatives"):
        check_types(["conversation", "counting"])
