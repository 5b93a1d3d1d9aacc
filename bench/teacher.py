"""Teacher throughput, two parts, each compared as ratios measured in the same run:

1. The embedded teacher (llama.cpp, SmolLM2-135M): requests/s and prompt tokens evaluated per request, for
   llama-cpp-python's own server (every prompt evaluated from scratch, the grammar checked over the whole
   vocabulary per token), with the shared prefix restored, and with the grammar also checked lazily
   (pipelines/services/llama_server.py; what the pipeline runs). The three servers run side by side and take
   the same requests (mixed task types) in rotating order; their answers must be identical.
2. The generate stage on Ray (one actor) against the fake served model (infra/fake_teacher.py, its own
   process, 0.5 s a request, no concurrency limit) at teacher.concurrency 16, 64 and 256: the achieved rate
   over the ideal one (concurrency / latency), from the server's first request to its last answer; and the
   client's CPU time per request (TeacherClient alone, in this process, the server in another).

    python -m bench.teacher [--rounds 3] [--requests 8] [--waves 40] [--stage-repeats 3]

Prints and writes bench/results/teacher.json. Targets (issue 13): prefix reuse >= 2x requests/s; the stage
at >= 0.9 of ideal at concurrency 64 and >= 0.8 at 256 (medians of --stage-repeats interleaved runs).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pyarrow as pa

from bench import medians, save_results
from generators.absent_objects import AbsentObjectSampler, fit_object_statistics
from generators.teacher_types import TEACHER_TYPES
from generators.prompts import PROMPT_VERSION, rephrase_messages, rephrasings_model, task_messages
from generators.teacher import TeacherClient, TeacherRequest, response_format
from schemas.vocabulary import COCO_CATEGORIES
from pipelines.services.embedded_teacher import EmbeddedTeacher, free_port, grammar_checks, served_prompts
from infra.local_cluster import LOOPBACK_ONLY_ENV, start_head, stop_head
from schemas.config import load_config
from schemas.records import KEEP, ImageRecord, ObjectAnnotation

os.environ.update(LOOPBACK_ONLY_ENV)  # read by Ray when first imported: a driver attaching to the loopback head
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sample.yaml"
LATENCY = 0.5


# ---- 1. the embedded teacher, from scratch vs shared prefix restored ----

def mixed_requests(n: int, offset: int) -> list[tuple[list[dict], dict]]:
    """n requests of the pipeline's four kinds, each with its own caption and objects."""
    rng = random.Random(offset)
    out = []
    for i in range(n):
        objects = [ObjectAnnotation(category=c, box=(0.1, 0.2, 0.5, 0.6)) for c in rng.sample(COCO_CATEGORIES, 2)]
        caption = f"Photo {offset + i}: a {objects[0].category} next to a {objects[1].category}."
        kind = ("conversation", "detail", "reasoning", "negatives")[i % 4]
        if kind == "negatives":
            out.append((rephrase_messages(caption, objects, [f"No, there is no {rng.choice(COCO_CATEGORIES)}.",
                                                             f"Yes, there is a {objects[0].category}."]),
                        response_format("json_object", rephrasings_model(2))))
        else:
            out.append((task_messages(kind, caption, objects),
                        response_format("json_object", TEACHER_TYPES[kind].output)))
    return out


def serve(base_url: str, model: str, requests: list, max_tokens: int) -> tuple[float, list[str]]:
    client = openai.OpenAI(base_url=base_url, api_key="none", timeout=600, max_retries=0)
    start, answers = time.perf_counter(), []
    for messages, fmt in requests:
        response = client.chat.completions.create(model=model, messages=messages, response_format=fmt,
                                                  temperature=0.0, max_tokens=max_tokens, seed=3)
        answers.append(response.choices[0].message.content)
    return time.perf_counter() - start, answers


ARMS = {"scratch": {"prefix_reuse": False, "lazy_grammar": False},  # llama-cpp-python's own server
        "reuse": {"prefix_reuse": True, "lazy_grammar": False},
        "reuse_lazy_grammar": {"prefix_reuse": True, "lazy_grammar": True}}  # what the pipeline runs


def embedded_part(rounds: int, n: int, workdir: Path) -> dict:
    config = load_config(CONFIG).teacher
    logs = {name: workdir / f"{name}.log" for name in ARMS}
    with contextlib.ExitStack() as stack:
        servers = {name: stack.enter_context(EmbeddedTeacher(config.model_copy(update={"port": free_port()}),
                                                             logs[name], **flags)) for name, flags in ARMS.items()}
        warm = mixed_requests(4, 99_000)  # each: model paged in; the reusing ones see the prefix twice and save it
        for url in servers.values():
            serve(url, config.model, warm, config.max_tokens)
        before = len(served_prompts(logs["reuse_lazy_grammar"]))
        seconds = dict.fromkeys(ARMS, 0.0)
        same = True
        for r in range(rounds):
            requests = mixed_requests(n, 1000 * r)
            names = list(ARMS)
            order = names[r % len(names):] + names[:r % len(names)]  # no arm always goes first
            got = {}
            for name in order:
                elapsed, got[name] = serve(servers[name], config.model, requests, config.max_tokens)
                seconds[name] += elapsed
                print(f"round {r} {name}: {n / elapsed:.3f} requests/s", flush=True)
            same &= len({tuple(answers) for answers in got.values()}) == 1
        prompts = served_prompts(logs["reuse_lazy_grammar"])[before:]  # (tokens, restored)
        checks = grammar_checks(logs["reuse_lazy_grammar"])[before:]  # (tokens sampled, whole-vocabulary checks)
    total = rounds * n
    return {
        "requests": total, "max_tokens": config.max_tokens, "arms": ARMS,
        "requests_per_s": {k: round(total / v, 3) for k, v in seconds.items()},
        "speedup": round(seconds["scratch"] / seconds["reuse_lazy_grammar"], 3), "target_speedup": 2.0,
        "speedup_prefix_reuse_alone": round(seconds["scratch"] / seconds["reuse"], 3),
        "prompt_tokens_evaluated_per_request": {
            "scratch": round(sum(t for t, _ in prompts) / len(prompts), 1),
            "reuse": round(sum(t - r for t, r in prompts) / len(prompts), 1)},
        "tokens_sampled_per_request": round(sum(t for t, _ in checks) / len(checks), 1),
        "share_of_tokens_checked_against_whole_vocabulary": round(sum(c for _, c in checks) /
                                                                  max(1, sum(t for t, _ in checks)), 3),
        "identical_answers": same,
    }


# ---- 2. the generate stage on Ray against the fake served model ----

def stage_input(n: int) -> pa.Table:
    """n records as the generate stage gets them: caption, objects, and probes from the real probe sampler."""
    from pipelines.batches import RECORD_SCHEMA, records_to_table

    config = load_config(CONFIG)
    rng = random.Random(0)
    records = []
    for i in range(n):
        cats = rng.sample(COCO_CATEGORIES, 3)
        objects = [ObjectAnnotation(category=c, box=(0.1 * j, 0.2, 0.1 * j + 0.3, 0.6)) for j, c in enumerate(cats)]
        records.append(ImageRecord(uid=f"bench-{i:05d}", url=f"http://example.com/{i}.jpg",
                                   caption=f"Photo {i}: {', '.join(cats)}.", status=KEEP,
                                   objects=objects))
    fitted = {"statistics": fit_object_statistics([[o.category for o in r.objects] for r in records]),
              "selected": None}
    probed = AbsentObjectSampler(fitted, config.generate, config.objects, config.teacher.seed)(records).kept
    table = records_to_table([r.model_copy(update={"teacher_selected": True}) for r in probed])
    assert table.schema.equals(RECORD_SCHEMA)
    return table


class FakeServer:
    """infra.fake_teacher in its own process (its threads do not share this process's GIL)."""

    def __init__(self, latency: float):
        self.port = free_port()
        self.process = subprocess.Popen([sys.executable, "-m", "infra.fake_teacher", "--latency", str(latency),
                                         "--port", str(self.port)], stdout=subprocess.DEVNULL)
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        for _ in range(100):
            try:
                self.stats()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the fake teacher did not start")

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url + "/stats", timeout=5) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


def stage_part(waves: int, repeats: int, workdir: Path) -> dict:
    """Each concurrency c gets waves * c / 2 records (about 2 requests each): `waves` rounds of c requests, so
    the one-off start (an actor, c new connections: ~0.5 s for 256 here) weighs the same at every c."""
    import ray

    started = start_head()
    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    table = stage_input(waves * 256 // 2)
    runs = {str(c): [] for c in (16, 64, 256)}
    try:
        for repeat in range(repeats):  # interleaved: a busy spell of the machine hits every concurrency alike
            for concurrency in (16, 64, 256):
                rows = table.slice(0, waves * concurrency // 2)
                runs[str(concurrency)].append(stage_run(rows, concurrency, workdir))
                print(f"stage, concurrency {concurrency}, repeat {repeat}: {runs[str(concurrency)][-1]}", flush=True)
    finally:
        ray.shutdown()
        if started:
            stop_head()
    return {"latency_s": LATENCY, "waves": waves, "repeats": repeats,
            "by_concurrency": {c: {**medians(rows, "ratio_to_ideal", "busy_seconds", "wall_seconds"),
                                   "peak_in_flight": max(r["peak_in_flight"] for r in rows), "runs": rows}
                               for c, rows in runs.items()},
            "targets": {"64": 0.9, "256": 0.8}}


def stage_run(table: pa.Table, concurrency: int, workdir: Path) -> dict:
    """One generate stage over `table` on Ray against a fresh fake server; the server's counts."""
    import ray

    from pipelines.build_instruct import apply_on_ray
    from pipelines.stages import stage_plan

    server = FakeServer(LATENCY)
    cache = workdir / f"cache-{concurrency}"
    shutil.rmtree(cache, ignore_errors=True)  # an earlier run's answers would be cache hits, not requests
    config = load_config(CONFIG, ["teacher.kind=openai", f"teacher.base_url={server.base_url}",
                                  "teacher.model=fake-teacher", f"teacher.concurrency={concurrency}",
                                  f"teacher.cache_dir={cache}", "objects.annotations=[]"])
    generate = next(s for s in stage_plan(config) if s.name == "generate")
    start = time.perf_counter()
    result = pa.concat_tables(ray.get(apply_on_ray(ray.data.from_arrow(table), generate).to_arrow_refs()))
    wall = time.perf_counter() - start
    stats = server.stats()
    server.stop()
    assert result.num_rows == table.num_rows
    ideal = stats["requests"] * LATENCY / concurrency
    return {"records": table.num_rows, "requests": stats["requests"], "peak_in_flight": stats["peak_in_flight"],
            "busy_seconds": round(stats["busy_seconds"], 2), "wall_seconds": round(wall, 2),
            "ideal_seconds": round(ideal, 2), "ratio_to_ideal": round(ideal / stats["busy_seconds"], 3)}


def client_cpu_part(n: int = 2000, concurrency: int = 64) -> dict:
    """TeacherClient's own CPU time per request (validation, counting, retry loop, openai, httpx)."""
    server = FakeServer(0.05)
    config = load_config(CONFIG, ["teacher.kind=openai", "teacher.model=fake-teacher",
                                  f"teacher.concurrency={concurrency}"]).teacher
    objects = [ObjectAnnotation(category="cup", box=(0.1, 0.5, 0.3, 0.7))]
    requests = [TeacherRequest(task_messages("conversation", f"Photo {i}.", objects), TEACHER_TYPES["conversation"].output,
                               seed=i) for i in range(n)]
    try:
        client = TeacherClient(config, server.base_url, PROMPT_VERSION)
        client.run_all(requests[:50])  # connections opened, imports warm
        cpu, wall = time.process_time(), time.perf_counter()
        client.run_all(requests[50:])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        server.stop()
    return {"requests": n - 50, "cpu_ms_per_request": round(1000 * cpu / (n - 50), 2),
            "requests_per_s": round((n - 50) / wall, 1), "concurrency": concurrency}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=8, help="per round, for the embedded teacher")
    p.add_argument("--waves", type=int, default=40, help="generate stage: requests per concurrency c, in units of c")
    p.add_argument("--stage-repeats", type=int, default=3, help="runs per concurrency; the median is reported")
    p.add_argument("--skip-embedded", action="store_true", help="keep the embedded figures already in --out")
    p.add_argument("--out", type=Path, default=Path("bench/results/teacher.json"))
    args = p.parse_args()
    workdir = Path("outputs/bench_teacher")
    workdir.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{os.cpu_count()} CPUs", "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    if args.skip_embedded and args.out.exists():
        results["embedded"] = json.loads(args.out.read_text())["embedded"]  # from the earlier run, as measured
    else:
        results["embedded"] = embedded_part(args.rounds, args.requests, workdir)
        print(json.dumps(results["embedded"], indent=2), flush=True)
    results["client"] = client_cpu_part()
    print(json.dumps(results["client"]), flush=True)
    results["generate_stage"] = stage_part(args.waves, args.stage_repeats, workdir)
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=2))
    save_results(args.out, results)


if __name__ == "__main__":
    main()
