"""Run directories and versions (what a finished run counts and writes in its manifest: `pipelines/manifest.py`).

A run writes into `<output_root>/<name>/<version>.partial/` and is renamed to
`<output_root>/<name>/<version>/` only when everything, manifest last, is written: a directory
without `.partial` is complete, and a later run never overwrites it. A re-run of the same
config and inputs finds the `.partial` directory and resumes: img2dataset skips done shards, and every stage
segment skips the shards it finished (`pipelines/segments.py`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from evals.grounding_eval import evaluate_grounding
from evals.noise_eval import evaluate_against_noise
from filters.clip_loader import resolve_weights
from schemas.coco import load_coco_instances
from generators.prompts import PROMPT_VERSION
from generators.teacher import TeacherUsage, check_reachable
from generators.teacher_types import check_types
from pipelines.dataset_card import write_dataset_card
from pipelines.manifest import build_manifest, format_summary, tally_outputs
from schemas.errors import disk_full_error, disk_full_is_user_error, no_space_sentence
from pipelines.publish import publish_dataset, push_record, push_version
from pipelines.references import check_references, references_fingerprint
from pipelines.segments import remove_stage_files
from pipelines.stages import stage_plan
from pipelines.url_list import file_sha256, read_url_list, warn_unreachable_hosts, with_uids, write_url_list
from schemas.config import PipelineConfig, save_config
from schemas.errors import UserError


@contextlib.contextmanager
def teacher_endpoint(config: PipelineConfig, run: "RunDirectory") -> Iterator[PipelineConfig]:
    """The config with `teacher.base_url` set to a reachable server: the embedded llama.cpp server is
    started here (and stopped on exit); any other endpoint is checked with one request. Both engines run the
    whole crawl-to-publish inside this block, so a full disk anywhere in it is one sentence naming the run."""
    with disk_full_is_user_error(run.work), contextlib.ExitStack() as stack:
        teacher = config.teacher
        if teacher.kind == "embedded":
            from pipelines.services.embedded_teacher import EmbeddedTeacher  # only the embedded kind starts a server

            log = run.final.parent / f"{run.version}.teacher.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            base_url = stack.enter_context(EmbeddedTeacher(teacher, log_path=log))
            print(f"embedded teacher (llama.cpp, {teacher.model}) at {base_url}", flush=True)
        elif teacher.base_url:
            base_url = teacher.base_url
        else:
            raise UserError("teacher.kind=openai needs teacher.base_url (e.g. https://api.openai.com/v1).")
        check_reachable(teacher, base_url)
        yield config.model_copy(update={"teacher": teacher.model_copy(update={"base_url": base_url})})


def run_version(config: PipelineConfig, engine: str, body: Callable[["RunDirectory"], dict]) -> dict:
    """The run skeleton both engines share: a version that is complete already is only announced (and a push
    it owes retried); otherwise the teacher is started (embedded) and reachable before any crawling, and
    `body` runs the engine's crawl-to-publish inside that block, with the resolved teacher address."""
    run_dir = RunDirectory.open(config, engine=engine)
    if (done := run_dir.existing_manifest()) is not None:
        return done
    with teacher_endpoint(config, run_dir) as config:
        return body(run_dir.with_config(config))


def check_output_root(config: PipelineConfig) -> Path:
    """`<output_root>/<name>`, checked before anything starts: inside output_root, and a directory (or creatable
    under one) where a file can be written, so a file, a read-only directory or a full disk is one sentence."""
    root = Path(config.output_root).resolve()
    run_root = (root / config.name).resolve()
    if run_root == root or not run_root.is_relative_to(root):  # the name check refuses '.' and '..'; symlinks too
        raise UserError(f"Run name {config.name!r} leads to {run_root}, outside output_root {root}; set name to a "
                        f"plain directory name such as 'sample'.")
    existing = run_root
    while not existing.exists():  # the nearest part that exists; the rest is created by the run
        existing = existing.parent
    if not existing.is_dir():
        if existing == run_root:
            raise UserError(f"{run_root} is a file where the run's directory goes; move it away or set another name.")
        what = f"output_root {root} is " + ("a file" if existing == root else f"under a file, {existing}")
        raise UserError(f"{what}, not a directory; set output_root to a directory (it is created when missing).")
    try:
        with tempfile.TemporaryFile(dir=existing) as probe:  # unnamed: nothing is left behind
            probe.write(b"\0" * 4096)
            probe.flush()
    except OSError as err:
        if disk_full_error(err) is not None:
            raise UserError(no_space_sentence(err, existing)) from None
        raise UserError(f"output_root {root} is not writable ({err.strerror or err} in {existing}); set "
                        f"output_root to a directory you can write to.") from None
    return Path(config.output_root).resolve() / config.name


def check_annotations(paths: list[str]) -> None:
    """Each objects.annotations / evaluate.ground_truth file read as the objects stage and the grounding eval
    will read it: a missing file, a directory or anything that is not COCO instances JSON is one sentence here,
    before crawling, rather than a worker's traceback after the crawl and CLIP."""
    for path in map(Path, paths):
        if not path.is_file():
            state = "is a directory" if path.is_dir() else "does not exist"
            raise UserError(f"Annotation file {path} {state}; set objects.annotations (or evaluate.ground_truth) "
                            f"to COCO instances JSON files, or to [] to tag with CLIP.")
    load_coco_instances(paths)


@dataclass
class RunDirectory:
    config: PipelineConfig
    engine: str
    version: str
    final: Path
    work: Path
    url_list_sha256: str

    @classmethod
    def open(cls, config: PipelineConfig, engine: str) -> "RunDirectory":
        """Picks the version directory: a hash of the config's data-changing fields, the bytes of the URL
        list and of the CLIP weights, the engine, and the eval-guard references' listing."""
        source = Path(config.crawl.url_list)
        url_sha = file_sha256(source) if source.is_file() else "missing"
        # New weights at the same path make new data: the checkpoint's bytes are part of the version.
        weights = [Path(p) for p in (config.clip.pretrained, config.clip.config_path) if p and Path(p).is_file()]
        weights_sha = "|".join(file_sha256(p) for p in weights)
        references = references_fingerprint(config.eval_guard) if config.eval_guard.enabled else ""
        digest = hashlib.sha256(f"{config.fingerprint()}|{url_sha}|{weights_sha}|{engine}{references}".encode()).hexdigest()
        version = f"v-{digest[:12]}"
        final = check_output_root(config) / version
        return cls(config, engine, version, final, final.with_name(version + ".partial"), url_sha)

    def with_config(self, config: PipelineConfig) -> "RunDirectory":
        """The same version directory with a config that differs only in how things run (the teacher's address)."""
        return dataclasses.replace(self, config=config)

    @property
    def complete(self) -> bool:
        return (self.final / "manifest.json").exists()

    @property
    def url_list(self) -> Path:
        return self.work / "urls.parquet"

    @property
    def shards(self) -> Path:
        return self.work / "shards"

    def prepare(self, probe_hosts: bool = True) -> int:
        """Checks the URL list, the CLIP weights, the annotation files, the eval-guard references and then (over the network) that the
        list's hosts answer, all before anything is written or crawled; then creates the work directory with the
        resolved config and the uid'ed URL list; returns the row count."""
        crawl = self.config.crawl
        table = with_uids(read_url_list(crawl.url_list))  # the job's input is reported first
        resolve_weights(self.config.clip)  # a bad model name or checkpoint fails here, not inside a worker
        check_annotations(self.config.objects.annotations + self.config.evaluate.ground_truth)
        check_references(self.config.eval_guard)
        check_types(self.config.generate.types)
        warn_unreachable_hosts(table, crawl.preflight_hosts if probe_hosts else 0, frozenset(crawl.allow_private_networks))
        self.work.mkdir(parents=True, exist_ok=True)  # a resumed run keeps what it finished (pipelines/segments.py)
        save_config(self.config, self.work / "config.yaml")
        return write_url_list(table, self.url_list, crawl.shard_size)

    def existing_manifest(self) -> dict | None:
        """The manifest of a finished run of this version, announced; None when there is work to do."""
        if not self.complete:
            return None
        print(f"{self.final} is complete already; not overwriting it (change the config for a new version).")
        manifest = json.loads((self.final / "manifest.json").read_text())
        last_push = push_record(self.final)  # a push that failed (or never ran) is owed, not forgotten
        if self.config.publish.push_to_hub and last_push.get("status") != "pushed":
            print(f"{self.final} is not on the Hub yet ({last_push.get('error', 'no push recorded').rstrip('.')}); "
                  f"pushing it now.")
            self.push()
        return manifest

    def push(self) -> None:
        """Pushes the finished version to publish.hub_repo; the outcome is recorded in its push.json."""
        publish = self.config.publish
        print(f"pushed: {push_version(self.final, publish.hub_repo, self.version, publish.token_env)}")

    def finish(self, num_rows: int, seconds: float, extra: dict | None = None) -> dict:
        """Counts what was written, writes the manifest last, renames `.partial` away, prints the summary."""
        stage_order = ["crawl"] + [stage.name for stage in stage_plan(self.config)]
        records, dropped = self.work / "records", self.work / "dropped"
        counts = tally_outputs(records, dropped, num_rows, stage_order)
        usage = TeacherUsage.total(counts.pop("usage"))
        rejected_turns = counts.pop("rejected_turns")
        if self.config.evaluate.noise_manifest:
            counts["noise_eval"] = evaluate_against_noise(Path(self.config.evaluate.noise_manifest), records, dropped,
                                                          stage_order)
        published = publish_dataset(self.work, self.config.publish.validation_fraction, self.config.teacher.seed)
        counts["published"] = published
        counts["rejected_turns"] = rejected_turns
        if self.config.evaluate.ground_truth:
            counts["grounding_eval"] = evaluate_grounding(self.config, records, dropped, num_rows)
        teacher = {"kind": self.config.teacher.kind, "model": self.config.teacher.model,
                   "prompt_version": PROMPT_VERSION, "usage": usage}
        manifest = build_manifest(self, counts, seconds, {"teacher": teacher, **(extra or {})})
        (self.work / "manifest.json").write_text(json.dumps(manifest, indent=2))  # key order = stage order
        write_dataset_card(self.work, manifest, published)
        remove_stage_files(self.work)
        self.work.rename(self.final)
        print(format_summary(manifest))
        print(f"Hugging Face dataset: {self.final / 'hf'}  (datasets.load_from_disk)")
        print(f"LLaVA export: {self.final / 'llava'}")
        print(f"TRL SFT / DPO and LLaMA-Factory exports: {self.final}/{{trl_sft,trl_dpo,llamafactory}} (the card says how each loads)")
        if self.config.publish.push_to_hub:  # publish.hub_repo is checked with the config, before crawling
            self.push()
        return manifest
