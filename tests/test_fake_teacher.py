"""The stand-in served model (infra/fake_teacher.py) that the teacher tests and benchmarks measure against:
schema-valid answers the client accepts, no limit on requests in flight, and counters that say so."""
from __future__ import annotations

from generators.instructions import TEACHER_TYPES
from generators.prompts import PROMPT_VERSION, task_messages
from generators.teacher import TeacherClient, TeacherRequest
from infra.fake_teacher import FakeTeacher
from schemas.config import TeacherConfig
from schemas.records import ObjectAnnotation

OBJECTS = [ObjectAnnotation(category="cup", box=(0.1, 0.5, 0.3, 0.7))]


def test_every_teacher_type_gets_a_valid_answer_and_requests_run_side_by_side():
    config = TeacherConfig(kind="openai", model="fake-teacher", concurrency=32, max_retries=0)
    kinds = sorted(TEACHER_TYPES)
    batch = [TeacherRequest(task_messages(kind, f"Photo {i}.", OBJECTS), TEACHER_TYPES[kind], seed=i)
             for i in range(48) for kind in [kinds[i % len(kinds)]]]
    with FakeTeacher(latency=0.3) as teacher:
        client = TeacherClient(config, teacher.base_url, PROMPT_VERSION)
        answers = client.run_all(batch)
        again = client.run_all(batch[:4])
    assert all(isinstance(a, r.output) for a, r in zip(answers, batch))  # validated by the client's own parsing
    assert client.usage.failed == 0 and teacher.requests == 52
    assert teacher.peak_in_flight >= 24  # 32 allowed in flight; a server that queued would show 1
    assert again == answers[:4]  # the same request, the same answer
