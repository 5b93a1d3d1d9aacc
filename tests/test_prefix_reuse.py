"""The embedded teacher restores the prompts' shared prefix instead of evaluating it per request, and checks the
JSON grammar against the greedy token before the whole vocabulary (pipelines/services/llama_server.py), and an
answer still depends on its request alone: the same requests in three orders, with other requests in between,
get byte-identical answers, the same as llama-cpp-python's own server (empty cache, full grammar checks)."""
from __future__ import annotations

import random

import openai

from generators.teacher_types import TEACHER_TYPES
from generators.prompts import rephrase_messages, rephrasings_model, task_messages
from generators.teacher import response_format
from pipelines.services.embedded_teacher import EmbeddedTeacher, grammar_checks, served_prompts
from schemas.config import load_config
from schemas.records import ObjectAnnotation
from tests.conftest import REPO

CAPTIONS = ["A cup of coffee on a wooden table.", "Two dogs run along a beach at sunset.",
            "A red car parked next to a bicycle.", "A man holding an umbrella in the rain."]
OBJECTS = [ObjectAnnotation(category="cup", box=(0.1, 0.5, 0.3, 0.7)),
           ObjectAnnotation(category="dog", box=(0.6, 0.4, 0.9, 0.8))]


def request(kind: str, caption: str) -> tuple[list[dict], dict]:
    if kind == "negatives":
        return (rephrase_messages(caption, OBJECTS, ["No, there is no car in the image.", "Yes, there is a dog."]),
                response_format("json_object", rephrasings_model(2)))
    return task_messages(kind, caption, OBJECTS), response_format("json_object", TEACHER_TYPES[kind].output)


FIXED = [request(kind, caption) for caption in CAPTIONS[:3] for kind in ("conversation", "detail", "reasoning")] + \
        [request("negatives", caption) for caption in CAPTIONS[1:]]  # 12
FILLERS = [request(kind, f"Filler photo {i}: a {thing}.") for i, (kind, thing) in
           enumerate([("detail", "kite in the sky"), ("conversation", "bowl of fruit"), ("negatives", "train"),
                      ("reasoning", "laptop on a desk"), ("conversation", "herd of sheep")])]


def answers(base_url: str, config, order: list[int], fillers: bool) -> dict[int, str]:
    """Raw answer text per FIXED index, sent in `order`, a filler request after every fourth (when asked).
    32 tokens of each answer: a prefix restored wrongly shows in the first tokens, and the test stays short."""
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=300, max_retries=0)
    got = {}

    def ask(messages, fmt) -> str:
        response = client.chat.completions.create(model=config.model, messages=messages, response_format=fmt,
                                                  temperature=0.0, max_tokens=32, seed=11)
        return response.choices[0].message.content

    for n, i in enumerate(order):
        got[i] = ask(*FIXED[i])
        if fillers and n % 4 == 3:
            ask(*FILLERS[(n // 4) % len(FILLERS)])
    return got


def test_shared_prefix_is_restored_and_answers_do_not_depend_on_order(tmp_path):
    config = load_config(REPO / "configs" / "sample.yaml").teacher
    forward = list(range(len(FIXED)))
    shuffled = random.Random(5).sample(forward, len(forward))
    with EmbeddedTeacher(config, log_path=tmp_path / "scratch.log", prefix_reuse=False, lazy_grammar=False) as base_url:
        scratch = answers(base_url, config, forward, fillers=False)
    with EmbeddedTeacher(config, log_path=tmp_path / "reuse.log") as base_url:
        runs = [answers(base_url, config, order, fillers) for order, fillers in
                [(forward, False), (forward[::-1], True), (shuffled, True)]]
    assert len(set(scratch.values())) >= 9  # different requests, different answers: the comparison has teeth
    for run in runs:
        assert run == scratch
    restored = [r for _, r in served_prompts(tmp_path / "reuse.log")]
    assert served_prompts(tmp_path / "scratch.log") == []  # that server evaluated every prompt whole
    assert len(restored) >= 3 * len(FIXED) and restored[:2] == [0, 0]  # the prefix is saved once seen twice
    assert sum(r >= 512 for r in restored) >= len(restored) - 2  # then every prompt restores 512 tokens
    checks = grammar_checks(tmp_path / "reuse.log")
    assert grammar_checks(tmp_path / "scratch.log") == [] and len(checks) == len(restored)
    sampled, full = sum(s for s, _ in checks), sum(c for _, c in checks)
    assert 0 < full < sampled / 4  # the grammar did reject greedy tokens (and the answers still match), but rarely
