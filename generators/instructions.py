"""The `generate` stage: the teacher writes LLaVA records for each image from its caption and objects.

Per image picked for the teacher (`teacher_selected`, from generate.max_images), `types_per_image` of
the teacher types (`generators/teacher_types/`: conversation, detail, reasoning; picked by uid, as
LLaVA-Instruct has about two records per image). Every image with probes gets a `negatives` record of
the program's yes/no probes: the teacher rephrases the answers of the first `rephrase_per_image` probes
of a selected image; all other answers stay the program's own phrasings, with no teacher call. The
record's provenance carries `probe_labels` and `probe_kinds`, aligned with its human turns (the
verifier keeps them aligned).
Records are in LLaVA's schema: `{"id", "type", "conversations": [{"from": "human"|"gpt", "value"}],
"provenance"}` with `<image>` in the first human turn and nowhere else (`llava_conversation` neutralizes
placeholders a caption or the teacher put in the text). A request that fails for good drops the image
with `teacher_error:<kind>`.
"""
from __future__ import annotations

import hashlib
import json
import time

from generators.absent_objects import Probe, record_objects, seeded_rng
from generators.prompts import PROMPT_VERSION, rephrase_messages, rephrasings_model, task_messages
from generators.teacher import TeacherClient, TeacherError, TeacherRequest, TeacherUsage
from generators.teacher_cache import TeacherCache
from generators.teacher_types import TEACHER_TYPES, check_types
from schemas.config import GenerateConfig, TeacherConfig
from schemas.records import ImageRecord, StageResult, llava_conversation

class InstructionGenerator:
    name = "generate"
    columns = ("caption", "objects", "probes", "teacher_selected", "instructions", "teacher_usage")

    def __init__(self, teacher: TeacherConfig, generate: GenerateConfig, base_url: str, cache_dir: str | None):
        check_types(generate.types)
        self.teacher, self.config = teacher, generate
        self.client = TeacherClient(teacher, base_url, PROMPT_VERSION, TeacherCache(cache_dir) if cache_dir else None)

    def plan(self, record: ImageRecord) -> list[str]:
        """Which types this image gets: `types_per_image` teacher types by uid when selected, then negatives."""
        teacher_types = [t for t in self.config.types if t in TEACHER_TYPES] if for_teacher(record) else []
        rng = seeded_rng(self.teacher.seed, record.uid)
        chosen = sorted(rng.sample(teacher_types, min(self.config.types_per_image, len(teacher_types))),
                        key=teacher_types.index)
        return chosen + (["negatives"] if "negatives" in self.config.types and record.probes else [])

    def request(self, record: ImageRecord, kind: str, usage: TeacherUsage) -> TeacherRequest | None:
        """The teacher request for one type; None when the program writes it alone (negatives of an image
        the teacher does not write for, or rephrase_per_image=0)."""
        objects, caption = record_objects(record), record.caption or ""
        seed = self.teacher.seed + int(hashlib.sha256(f"{record.uid}|{kind}".encode()).hexdigest()[:8], 16)
        if kind == "negatives":
            rephrased = self.rephrased(record)
            if not rephrased:
                return None
            return TeacherRequest(rephrase_messages(caption, objects, [p.answer for p in rephrased]),
                                  rephrasings_model(len(rephrased)), seed, usage)
        return TeacherRequest(task_messages(kind, caption, objects), TEACHER_TYPES[kind].output, seed, usage)

    def rephrased(self, record: ImageRecord) -> list[Probe]:
        """The probes whose answers the teacher rewords: the first few, for a selected image only."""
        return probes_of(record)[: self.config.rephrase_per_image] if for_teacher(record) else []

    def assemble(self, record: ImageRecord, kind: str, answer) -> dict:
        provenance = {}
        if kind in TEACHER_TYPES:
            pairs = TEACHER_TYPES[kind].turns(answer, seeded_rng(self.teacher.seed, record.uid))
        else:  # negatives: the program's probes, some answers reworded by the teacher
            probes = probes_of(record)
            worded = answer.answers if answer is not None else []  # the teacher's, for the first probes
            answers = [*worded, *(p.answer for p in probes[len(worded):])]
            pairs = [(p.question, a) for p, a in zip(probes, answers)]
            provenance = {"probe_labels": [p.label for p in probes], "probe_kinds": [p.kind for p in probes]}
        objects = record_objects(record)
        provenance = {"uid": record.uid, "source_url": record.url, "type": kind, "prompt_version": PROMPT_VERSION,
                      "teacher_model": self.teacher.model,
                      "objects_source": sorted({o.source for o in objects}) or ["none"], **provenance}
        return {"id": f"{record.uid}-{kind}", "type": kind, "conversations": llava_conversation(pairs),
                "provenance": provenance}

    def __call__(self, records: list[ImageRecord]) -> StageResult:
        plans = []
        for record in records:
            usage = TeacherUsage()
            plans.append((record, usage, [(kind, self.request(record, kind, usage)) for kind in self.plan(record)]))
        requests = [request for _, _, asks in plans for _, request in asks if request is not None]
        start = time.perf_counter()
        answers = iter(self.client.run_all(requests) if requests else [])
        total = self.client.usage
        print(f"generate: {len(records)} images, {len(requests)} requests in {time.perf_counter() - start:.1f} s "
              f"(worker total: {total.requests} sent, {total.cache_hits} cached, {sum(total.retries.values())} retried, "
              f"{total.completion_tokens} tokens out)", flush=True)
        result = StageResult()
        for record, usage, asks in plans:
            got = [(kind, next(answers) if request is not None else None) for kind, request in asks]
            failed = next((a for _, a in got if isinstance(a, TeacherError)), None)
            update = {"teacher_usage": json.dumps(usage.to_dict())}
            if failed is not None or not got:
                reason = f"teacher_error:{failed.kind}" if failed else "nothing_to_generate"
                result.dropped.append(record.model_copy(update=update).dropped(self.name, reason))
                continue
            instructions = [self.assemble(record, kind, answer) for kind, answer in got]
            result.kept.append(record.model_copy(update={**update, "instructions": json.dumps(instructions)}))
        return result


def probes_of(record: ImageRecord) -> list[Probe]:
    return list(record.probes or [])


def for_teacher(record: ImageRecord) -> bool:
    """Picked by generate.max_images (None: no probes stage ran, as for a hand-made record)."""
    return record.teacher_selected is not False
