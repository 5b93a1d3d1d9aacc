"""The `generate` stage: the teacher writes LLaVA records for each image from its caption and objects.

Per image, `types_per_image` of the teacher types (conversation, detail, reasoning; picked by uid,
as LLaVA-Instruct has about two records per image) plus a `negatives` record made of the
program's yes/no probes, whose answers the teacher rephrases. Records are in LLaVA's schema:
`{"id", "type", "conversations": [{"from": "human"|"gpt", "value"}], "provenance"}` with `<image>`
in the first human turn. A request that fails for good drops the image with `teacher_error:<kind>`.
"""
from __future__ import annotations

import hashlib
import json
import random
import time

from generators.absent_objects import Probe, record_objects
from generators.prompts import (PROMPT_VERSION, Conversation, Description, Reasoning, rephrase_messages,
                                rephrasings_model, task_messages)
from generators.teacher import TeacherClient, TeacherError, TeacherRequest, TeacherUsage
from generators.teacher_cache import TeacherCache
from schemas.config import GenerateConfig, TeacherConfig
from schemas.records import ImageRecord, StageResult, llava_conversation

TEACHER_TYPES = {"conversation": Conversation, "detail": Description, "reasoning": Reasoning}

# The instructions LLaVA's detailed-description records open with (a fixed list, one picked per image).
DETAIL_PROMPTS = (
    "Describe the following image in detail.",
    "Provide a detailed description of the given image.",
    "Give an elaborate explanation of the image you see.",
    "Share a comprehensive rundown of the presented image.",
    "Explain the various aspects of the image before you.",
    "Write an exhaustive depiction of the given image.",
)


def _rng(seed: int, uid: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{seed}|{uid}".encode()).hexdigest()[:16], 16))


class InstructionGenerator:
    name = "generate"

    def __init__(self, teacher: TeacherConfig, generate: GenerateConfig, base_url: str, cache_dir: str | None):
        self.teacher, self.config = teacher, generate
        self.client = TeacherClient(teacher, base_url, PROMPT_VERSION, TeacherCache(cache_dir) if cache_dir else None)

    def plan(self, record: ImageRecord) -> list[str]:
        """Which types this image gets: `types_per_image` teacher types by uid, then negatives."""
        teacher_types = [t for t in self.config.types if t in TEACHER_TYPES]
        rng = _rng(self.teacher.seed, record.uid)
        chosen = sorted(rng.sample(teacher_types, min(self.config.types_per_image, len(teacher_types))),
                        key=teacher_types.index)
        return chosen + (["negatives"] if "negatives" in self.config.types and record.probes not in (None, "[]") else [])

    def requests(self, record: ImageRecord, kind: str, usage: TeacherUsage) -> TeacherRequest:
        objects, caption = record_objects(record), record.caption or ""
        seed = self.teacher.seed + int(hashlib.sha256(f"{record.uid}|{kind}".encode()).hexdigest()[:8], 16)
        if kind == "negatives":
            probes = [Probe.model_validate(p) for p in json.loads(record.probes)]
            return TeacherRequest(rephrase_messages(caption, objects, [p.answer for p in probes]),
                                  rephrasings_model(len(probes)), seed, usage)
        return TeacherRequest(task_messages(kind, caption, objects), TEACHER_TYPES[kind], seed, usage)

    def assemble(self, record: ImageRecord, kind: str, answer) -> dict:
        if kind == "conversation":
            pairs = [(t.question, t.answer) for t in answer.turns]
        elif kind == "detail":
            pairs = [(_rng(self.teacher.seed, record.uid).choice(DETAIL_PROMPTS), answer.description)]
        elif kind == "reasoning":
            pairs = [(answer.question, answer.answer)]
        else:
            probes = [Probe.model_validate(p) for p in json.loads(record.probes)]
            pairs = [(p.question, a) for p, a in zip(probes, answer.answers)]
        objects = record_objects(record)
        provenance = {"uid": record.uid, "source_url": record.url, "type": kind, "prompt_version": PROMPT_VERSION,
                      "teacher_model": self.teacher.model,
                      "objects_source": sorted({o.source for o in objects}) or ["none"]}
        return {"id": f"{record.uid}-{kind}", "type": kind, "conversations": llava_conversation(pairs),
                "provenance": provenance}

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        plans = [(record, self.plan(record), TeacherUsage()) for record in records]
        requests = [self.requests(record, kind, usage) for record, kinds, usage in plans for kind in kinds]
        start = time.perf_counter()
        answers = iter(self.client.run_all(requests))
        total = self.client.usage
        print(f"generate: {len(records)} images, {len(requests)} requests in {time.perf_counter() - start:.1f} s "
              f"(worker total: {total.requests} sent, {total.cache_hits} cached, {sum(total.retries.values())} retried, "
              f"{total.completion_tokens} tokens out)", flush=True)
        result = StageResult()
        for record, kinds, usage in plans:
            got = [(kind, next(answers)) for kind in kinds]
            failed = next((a for _, a in got if isinstance(a, TeacherError)), None)
            update = {"teacher_usage": json.dumps(usage.to_dict())}
            if failed is not None or not kinds:
                reason = f"teacher_error:{failed.kind}" if failed else "nothing_to_generate"
                result.dropped.append(record.model_copy(update=update).dropped(self.name, reason))
                continue
            instructions = [self.assemble(record, kind, answer) for kind, answer in got]
            result.kept.append(record.model_copy(update={**update, "instructions": json.dumps(instructions)}))
        return result
