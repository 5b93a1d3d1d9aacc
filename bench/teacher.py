"""Teacher throughput: conversations/s against the embedded llama.cpp server at concurrency 1, 4, 16,
and our client (validation, usage counting, retry loop) against a bare `openai` client at saturation.

    python -m bench.teacher [--requests 12] [--reps 2]

Bare and ours alternate on the same prompts and seeds (so the server writes the same tokens for
both), so the ratio is measured under the same load. Prints and writes bench/results/teacher.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import openai

from generators.prompts import PROMPT_VERSION, Conversation, task_messages
from generators.teacher import TeacherClient, TeacherRequest, response_format
from infra.embedded_teacher import EmbeddedTeacher
from schemas.config import load_config
from schemas.records import ObjectAnnotation

OBJECTS = [ObjectAnnotation(category="cup", box=(0.1, 0.5, 0.3, 0.7)),
           ObjectAnnotation(category="dog", box=(0.6, 0.4, 0.9, 0.8))]


def batch(n: int, offset: int) -> list[TeacherRequest]:
    return [TeacherRequest(task_messages("conversation", f"Photo {offset + i}: a cup and a dog.", OBJECTS),
                           Conversation, seed=offset + i) for i in range(n)]


def ours(config, base_url: str, requests: list[TeacherRequest], concurrency: int) -> float:
    client = TeacherClient(config.model_copy(update={"concurrency": concurrency}), base_url, PROMPT_VERSION)
    start = time.perf_counter()
    answers = client.run_all(requests)
    elapsed = time.perf_counter() - start
    assert all(isinstance(a, Conversation) for a in answers), answers
    return len(requests) / elapsed


def bare(config, base_url: str, requests: list[TeacherRequest], concurrency: int) -> float:
    async def go():
        limit = asyncio.Semaphore(concurrency)
        async with openai.AsyncOpenAI(base_url=base_url, api_key="none", timeout=config.timeout) as client:
            async def one(r: TeacherRequest):
                async with limit:
                    return await client.chat.completions.create(
                        model=config.model, messages=r.messages, response_format=response_format("json_object", r.output),
                        temperature=config.temperature, max_tokens=config.max_tokens, seed=r.seed)
            return await asyncio.gather(*(one(r) for r in requests))
    start = time.perf_counter()
    asyncio.run(go())
    return len(requests) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench/results/teacher.json"))
    args = p.parse_args()
    config = load_config("configs/sample.yaml").teacher
    offset = 0
    results = {"requests_per_measure": args.requests, "model": config.model, "max_tokens": config.max_tokens}
    with EmbeddedTeacher(config) as base_url:
        ours(config, base_url, batch(2, 10_000), 1)  # warm-up: model pages in, system prompt cached
        sweep = {}
        for concurrency in (1, 4, 16):
            offset += args.requests
            sweep[concurrency] = round(ours(config, base_url, batch(args.requests, offset), concurrency), 3)
            print(f"ours, concurrency {concurrency:>2}: {sweep[concurrency]} conversations/s", flush=True)
        pairs = []
        for rep in range(args.reps):
            offset += args.requests
            same = batch(args.requests, offset)  # the same prompts and seeds: the same answers, token for token
            b = bare(config, base_url, same, 16)
            o = ours(config, base_url, same, 16)
            pairs.append({"bare": round(b, 3), "ours": round(o, 3), "ratio": round(o / b, 3)})
            print(f"rep {rep}: bare {b:.3f}/s  ours {o:.3f}/s  ratio {o / b:.3f}", flush=True)
    results |= {"loadavg_after": [round(x, 2) for x in os.getloadavg()], "conversations_per_s_by_concurrency": sweep, "saturated_pairs": pairs,
                "ratio_median": round(statistics.median(p["ratio"] for p in pairs), 3), "target_ratio": 0.9}
    print(json.dumps(results, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
