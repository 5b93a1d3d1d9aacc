"""The ordered stage list both engines run: per-batch stages and global ones (a fit over every live
record's columns, then a per-batch apply). How a batch goes through a stage: `pipelines/batches.py`;
the global fits: `pipelines/stage_fits.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from filters.clip_preprocess import ClipPreprocessor
from filters.clip_scorer import ClipScoreFilter, ClipScorer, fit_clip_threshold
from filters.dedup import DuplicateFilter
from filters.eval_guard import EvalOverlapFilter
from filters.grounding import GroundingVerifier
from filters.validate import ImageValidator
from generators.absent_objects import AbsentObjectSampler
from generators.objects import ObjectFinder
from pipelines.batches import ArrowPath, Stage, StageBatches, declared_columns, score_columns
from pipelines.stage_fits import clip_dedup_settings, dedup_column, fit_dedup, fit_eval_guard, fit_probes, scores
from schemas.config import PipelineConfig


@dataclass
class MapStage:
    """A stage applied batch by batch; `factory` builds it once per worker (a model loads once)."""

    name: str
    factory: Callable[[], Stage]
    uses_model: bool = False  # runs on an actor pool (Ray) that keeps the model (or client) loaded
    batch_size: int | None = None  # stage_plan sets what is not given: validate.batch_size
    num_actors: int = 1
    num_gpus: float = 0
    # Batches one actor works on at once (threads sharing its model or client). Above 1, the stage also gets
    # one batch per block on Ray, so each batch's output leaves (and shows progress) as soon as it is done.
    concurrent_batches: int = 1
    arrow: ArrowPath | None = None  # a whole-table path the stage offers (pipelines/batches.py: StageBatches)
    # The record fields the stage reads or sets; by default what its class declares (`columns`), None: every field.
    columns: tuple[str, ...] | None = None

    def __post_init__(self):
        self.columns = self.columns if self.columns is not None else declared_columns(self.factory)

    def batches(self) -> StageBatches:
        """The batch function both engines run this stage with."""
        return StageBatches(*self.batch_arguments())

    def batch_arguments(self) -> tuple:
        return self.name, self.factory, self.batch_size, self.arrow, self.columns


@dataclass
class GlobalStage:
    """A global step in two halves: `fit` over columns of all live records, then `apply(fitted)` per batch."""

    name: str
    columns: list[str]
    fit: Callable[[pa.Table], Any]
    apply: Callable[[Any], Stage]
    batch_size: int | None = None  # of the apply half; stage_plan sets it


def teacher_cache_dir(config: PipelineConfig) -> str:
    return str(Path(config.teacher.cache_dir or Path(config.output_root) / "teacher_cache").resolve())


def stage_plan(config: PipelineConfig) -> list[MapStage | GlobalStage]:
    """The ordered stage list both engines run. Generation needs `config.teacher.base_url` resolved
    (the embedded teacher's address is known once it started)."""
    from generators.instructions import InstructionGenerator  # imports openai (0.5 s): only where the plan is built

    gpus = 1 if config.clip.device != "cpu" and _cuda_available() else 0
    dedup = clip_dedup_settings(config)
    plan: list[MapStage | GlobalStage] = [
        MapStage("validate", partial(ImageValidator, config.validate_)),
        # CPU tasks decode and resize; the model actors (GPU when present) only run the towers.
        MapStage("clip_preprocess", partial(ClipPreprocessor, config.clip, dedup=dedup), batch_size=config.clip.batch_size),
        MapStage("clip_score", partial(ClipScorer, config.clip, dedup=dedup),
                 uses_model=True, batch_size=config.clip.batch_size,
                 num_actors=config.clip.num_actors, num_gpus=gpus, arrow=score_columns),
        # A fixed threshold is a plain per-batch stage; only top_fraction needs every score first.
        MapStage("clip_filter", partial(ClipScoreFilter, config.clip.threshold)) if config.clip.mode == "threshold" else
        GlobalStage("clip_filter", ["clip_score"], lambda table: fit_clip_threshold(config.clip, scores(table)),
                    ClipScoreFilter),
    ]
    if config.eval_guard.enabled:  # before dedup: a leaked copy never decides which training copy survives
        plan.append(GlobalStage("eval_guard", ["uid", dedup_column(config), "sha256"], partial(fit_eval_guard, config),
                                partial(EvalOverlapFilter, clear_embedding=not config.dedup.enabled)))
    if config.dedup.enabled:
        plan.append(GlobalStage("dedup", ["uid", dedup_column(config), "clip_score", "sha256"], partial(fit_dedup, config),
                                DuplicateFilter))
    plan += [
        MapStage("objects", partial(ObjectFinder, config.objects, config.clip)),
        GlobalStage("probes", ["uid", "objects"], partial(fit_probes, config),
                    partial(AbsentObjectSampler, generate=config.generate, objects=config.objects, seed=config.teacher.seed)),
        MapStage("generate", partial(InstructionGenerator, config.teacher, config.generate,
                                     config.teacher.base_url or "", teacher_cache_dir(config)),
                 uses_model=True, batch_size=config.generate.batch_size, num_actors=config.teacher.num_actors,
                 concurrent_batches=teacher_batches_in_flight(config)),
        MapStage("verify", partial(GroundingVerifier, config.objects.vocabulary)),
    ]
    for stage in plan:  # both engines batch as the plan says: a stage's own setting, else validate's (light per-row work)
        stage.batch_size = stage.batch_size or config.validate_.batch_size
    return plan


def teacher_batches_in_flight(config: PipelineConfig) -> int:
    """Batches a generate actor holds at once: enough that its requests fill the client's concurrency (about
    one request per image, so concurrency / batch_size), plus one that is being assembled or handed out."""
    from generators.teacher import serving_concurrency

    return -(-serving_concurrency(config.teacher) // config.generate.batch_size) + 1


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
