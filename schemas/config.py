"""Pipeline configuration: one pydantic model, loaded from YAML, overridden with `--set a.b=value`
(the command line's reading: `schemas/flags.py`).

The resolved config is saved next to every output and its hash names the dataset version.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from schemas.flags import read_tree, validated


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WorldConfig(_Section):
    """The embedded sample world (rendered scenes served on loopback); ignored for real URL lists."""

    dir: str = "data/world"
    num_images: int = Field(default=1000, ge=10, description="training images crawled")
    num_val: int = Field(default=100, ge=0, description="held-out images, never in the URL list")
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = Field(default=8731, ge=1, le=65535)
    slow_seconds: float = Field(default=6.0, gt=0, description="how long 'slow' fault URLs stall")


class CrawlConfig(_Section):
    """img2dataset settings, with our guarded downloader (pipelines/fetch.py) in its place. Images are stored
    as downloaded (no re-encoding): validate decodes them."""

    url_list: str = "data/world/urls.parquet"
    timeout: float = Field(default=2.0, gt=0, description="seconds per connect or read")
    download_deadline: float = Field(default=20.0, gt=0, description="seconds for a whole download, redirects included")
    # LAION's largest images are a few MB; a body past this is dropped as too_large, unread.
    max_bytes: int = Field(default=32 << 20, ge=1, description="bytes per image")
    retries: int = Field(default=2, ge=0, description="retries of transient failures (timeouts, resets, 429, 5xx)")
    backoff_seconds: float = Field(default=1.0, gt=0, description="first backoff; doubles, with full jitter")
    max_retry_after: float = Field(default=10.0, ge=0, description="longest Retry-After waited for; longer gives up")
    # Non-public address classes the crawl may connect to. The URL list is untrusted: the default refuses
    # loopback, private, link-local (cloud metadata), unique-local, shared, multicast and reserved addresses.
    allow_private_networks: list[Literal["loopback", "private", "link_local", "unique_local", "shared",
                                         "multicast", "reserved"]] = Field(default_factory=list)
    recrawl_transient: bool = Field(default=True, description="a resumed run re-crawls rows whose last failure "
                                                              "was transient")
    processes: int = Field(default=2, ge=1)
    threads: int = Field(default=32, ge=1)
    shard_size: int = Field(default=1000, ge=1, description="URLs per img2dataset shard")
    preflight_hosts: int = Field(default=16, ge=0, description="distinct hosts probed before crawling")


class ValidateConfig(_Section):
    min_side: int = Field(default=32, ge=1)
    # Checked from the header before decoding, so a 20000x20000 'bomb' is never decoded.
    max_pixels: int = Field(default=40_000_000, ge=1)
    max_aspect_ratio: float = Field(default=4.0, ge=1.0)
    max_caption_chars: int = Field(default=1000, ge=1)
    batch_size: int = Field(default=128, ge=1)


class ClipConfig(_Section):
    """Any open_clip model: a built-in name + pretrained tag, an `hf-hub:` id, or a checkpoint + JSON config."""

    model: str = "sample_clip"
    pretrained: str | None = "infra/clip/sample_clip.pt"  # a tag (laion2b_s34b_b79k) or a checkpoint path
    config_path: str | None = "infra/clip/sample_clip.json"  # JSON config for a model open_clip does not ship
    device: str = "auto"  # auto: the GPU when one is visible
    batch_size: int = Field(default=64, ge=1)
    num_actors: int = Field(default=1, ge=1, description="Ray actors holding a model each")
    mode: Literal["threshold", "top_fraction"] = "threshold"
    # LAION-400M kept pairs at cosine >= 0.28 with ViT-B/32; the sample CLIP's own scale differs (see infra/clip).
    threshold: float = Field(default=0.28, ge=-1.0, le=1.0)
    keep_fraction: float = Field(default=0.3, gt=0.0, le=1.0, description="top_fraction mode; DataComp kept 30%")


class DedupConfig(_Section):
    enabled: bool = True
    # Near-duplicates: cosine >= 1 - eps (NeMo Curator's SemDeDup default eps is 0.01).
    eps: float = Field(default=0.01, gt=0.0, lt=1.0)
    # Exact range search costs N^2 (36 s at 50k on one core); the clustered path is exact-equivalent on
    # planted pairs and ~10x faster there (bench/dedup.py).
    exact_search_max: int = Field(default=10_000, ge=1, description="above this many images, IVF clusters")
    num_clusters: int | None = Field(default=None, ge=1, description="IVF clusters; default sqrt(N)")
    # The image embedding near-duplicates are judged on, computed by the CLIP stage. `clip`: the CLIP
    # embedding (SemDeDup's choice; semantic duplicates count too). `clip_and_patch_tokens`: that embedding
    # next to the image tower's final patch-token grid, each L2-normalized (so the cosine is the mean of the
    # two); the grid keeps where things are, so two different photos of the same things stay apart
    # (ViT towers only; D = embed_dim + tokens x width, 128 + 3200 for the sample CLIP).
    embedding: Literal["clip", "clip_and_patch_tokens"] = "clip"
    # Averaged over centre crops keeping these fractions of each side, so that a copy cropped or zoomed by
    # a few percent embeds where its original does; each scale costs one more image-tower forward.
    crop_scales: list[float] = Field(default_factory=lambda: [1.0], min_length=1)

    @field_validator("crop_scales")
    @classmethod
    def _scales_in_range(cls, scales: list[float]) -> list[float]:
        if not all(0.5 <= s <= 1.0 for s in scales):
            raise ValueError(f"dedup.crop_scales {scales} must each be between 0.5 and 1.0")
        return scales

    @property
    def separate_embedding(self) -> bool:
        """Whether dedup needs its own embedding column rather than the CLIP `embedding`."""
        return self.embedding != "clip" or self.crop_scales != [1.0]


class CocoReference(_Section):
    instances: str = Field(description="COCO instances JSON; its images[].file_name are looked up in `images`")
    images: str = Field(description="the folder holding the instances file's images")


class EvalGuardConfig(_Section):
    """Images nobody may train on (eval sets): a record whose image is an exact or near copy of one is dropped
    with `eval_overlap:<reference id>` (filters/eval_guard.py). Nothing listed: the stage does not run."""

    folders: list[str] = Field(default_factory=list, description="image folders, searched recursively")
    coco: list[CocoReference] = Field(default_factory=list, description="COCO instances files with their image folder")
    crawled: list[str] = Field(default_factory=list, description="img2dataset output folders (webdataset .tar shards), "
                               "e.g. a run's shards/ of the eval set's URL list")
    # A copy is a record within cosine 1 - eps of a reference in the dedup embedding (the CLIP embedding when
    # dedup is off). A guard should err towards dropping: a lost training image costs little, a leak voids the eval.
    eps: float | None = Field(default=None, gt=0.0, lt=1.0, description="default: dedup.eps")

    @property
    def enabled(self) -> bool:
        return bool(self.folders or self.coco or self.crawled)


class ObjectsConfig(_Section):
    """Where each image's objects come from: COCO instances annotations when given, CLIP zero-shot tags otherwise."""

    annotations: list[str] = Field(default_factory=list, description="COCO instances JSON files, matched by file name")
    vocabulary: list[str] | None = Field(default=None, description="tagging vocabulary; default: the 80 COCO categories")
    # The sample CLIP's best-F1 cutoff for 'a photo of a {category}' against the world's annotations (a run with
    # evaluate.ground_truth reports the best-F1 threshold in its manifest, counts.grounding_eval.tagging);
    # other CLIPs need their own.
    tag_threshold: float = Field(default=0.3, ge=-1.0, le=1.0)
    max_tags: int = Field(default=6, ge=1)


class TeacherConfig(_Section):
    """An OpenAI-compatible chat endpoint. `kind: embedded` starts llama.cpp's server with SmolLM2-135M here."""

    kind: Literal["embedded", "openai"] = "embedded"
    base_url: str | None = Field(default=None, description="e.g. https://api.openai.com/v1 or http://vllm:8000/v1")
    model: str = "SmolLM2-135M-Instruct"
    api_key_env: str = Field(default="OPENAI_API_KEY", description="NAME of the env var holding the key (never the key)")
    # llama.cpp only constrains output with {"type": "json_object", "schema": ...}; OpenAI and vLLM take json_schema.
    response_format: Literal["json_schema", "json_object"] = "json_schema"
    concurrency: int = Field(default=4, ge=1, description="requests in flight per worker")
    timeout: float = Field(default=60.0, gt=0, description="seconds per request")
    max_retries: int = Field(default=6, ge=0, description="on 429, 5xx, timeouts and malformed responses")
    max_invalid_retries: int = Field(default=2, ge=0, description="re-asks when the output breaks the schema")
    backoff_seconds: float = Field(default=0.5, gt=0, description="first backoff; doubles, with full jitter")
    max_backoff_seconds: float = Field(default=30.0, gt=0)
    temperature: float = Field(default=0.2, ge=0.0, le=2.0)
    max_tokens: int = Field(default=256, ge=16)
    seed: int = 0
    cache_dir: str | None = Field(default=None, description="default: <output_root>/teacher_cache")
    port: int = Field(default=0, ge=0, le=65535, description="embedded server port; 0 picks a free one")
    threads: int = Field(default=2, ge=1, description="embedded server CPU threads")
    num_actors: int = Field(default=1, ge=1, description="Ray actors sending requests")


class GenerateConfig(_Section):
    """What the teacher writes per image, and the program-labelled probes mixed in."""

    # The teacher's types are registered in generators/teacher_types/ (checked before any crawl), plus the
    # program's `negatives`.
    types: list[str] = Field(default_factory=lambda: ["conversation", "detail", "reasoning", "negatives"],
                             min_length=1, description="data types to write")
    # LLaVA-Instruct-158K has about two records per image, not all three types for each.
    types_per_image: int = Field(default=3, ge=1, description="teacher types per image, picked by uid (at most "
                                                              "the teacher types listed)")
    max_images: int | None = Field(default=None, ge=1, description="the teacher writes for this many images (picked "
                                   "by uid hash); every image still gets its probes")
    batch_size: int = Field(default=16, ge=1)
    probes_per_image: int = Field(default=4, ge=0, description="yes/no turns in a 'negatives' record")
    # Each rephrased answer costs the teacher ~25 output tokens: 4 fit SmolLM2's max_tokens of 160.
    rephrase_per_image: int = Field(default=4, ge=0, description="probes whose answers the teacher rewords; "
                                                                 "the rest keep the program's phrasings")
    yes_share: float = Field(default=0.5, ge=0.0, le=1.0, description="share of probes answered yes; POPE is balanced")
    strategies: list[Literal["random", "popular", "adversarial"]] = Field(
        default_factory=lambda: ["random", "popular", "adversarial"])
    # Count and position manipulations ("Are there three cups?" when there are two); need annotations.
    manipulation_share: float = Field(default=0.25, ge=0.0, le=1.0, description="share of 'no' probes that manipulate")


class PublishConfig(_Section):
    validation_fraction: float = Field(default=0.05, ge=0.0, lt=1.0, description="images (with all their records)")
    push_to_hub: bool = False
    hub_repo: str | None = Field(default=None, validate_default=True, description="e.g. my-org/my-dataset")
    token_env: str = Field(default="HF_TOKEN", description="NAME of the env var holding the token (never the token)")

    @field_validator("hub_repo")
    @classmethod
    def _repo_when_pushing(cls, repo: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("push_to_hub") and not repo:  # known before crawling, not after the whole run
            raise ValueError("publish.push_to_hub needs publish.hub_repo (e.g. my-org/my-dataset)")
        return repo


class EvaluateConfig(_Section):
    """Evaluation only: compared with the outputs after every stage ran, never read by a stage."""

    noise_manifest: str | None = None
    ground_truth: list[str] = Field(default_factory=list, description="COCO instances JSON for grounding figures")


class RayConfig(_Section):
    address: str = "auto"
    # Ray Data's own default. Stages hand out batch by batch, so this only fires when nothing moves at all
    # (a teacher that answers nothing); raise it for a teacher slower than this per batch.
    no_progress_timeout: float = Field(default=1800.0, gt=0, description="seconds without any stage handing out a "
                                       "batch before the Ray run stops")


# How requests are sent, not what comes back: changing these keeps the dataset version (and the cache).
_TEACHER_OPERATIONAL = {"base_url", "api_key_env", "concurrency", "timeout", "max_retries", "backoff_seconds",
                        "max_backoff_seconds", "cache_dir", "port", "threads", "num_actors"}


class ProofConfig(_Section):
    """The demo's proof that the data works (infra/proof.py): Stage 1, Stage 2 with and without the negatives
    at equal compute, POPE / image dependence / QA evals of both arms, and a report. Defaults are the recipe
    measured on 2 CPU cores (bench/results/recipe_quick.json); on a GPU raise the steps."""

    enabled: bool = Field(default=True, description="false: stop at the published dataset")
    align_steps: int = Field(default=200, ge=1)
    align_batch_size: int = Field(default=8, ge=1)
    finetune_steps: int = Field(default=100, ge=1)
    finetune_batch_size: int = Field(default=8, ge=1)
    finetune_lr: float | None = Field(default=None, gt=0, description="default: the finetune stage's own")
    finetune_projector_lr: float | None = Field(default=None, gt=0, description="default: finetune_lr")
    lm_layers: int | None = Field(default=None, ge=1, description="Stage 2 trains only the LM's top N blocks")
    freeze_projector: bool = False
    lora: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"
    eval_images: int | None = Field(default=None, ge=1, description="held-out images POPE samples (default all)")
    max_new_tokens: int = Field(default=12, ge=1, description="answer length; POPE reads the first sentence")
    seed: int = 0


class PipelineConfig(_Section):
    name: str = Field(default="sample", pattern=r"^[A-Za-z0-9._-]+$", description="a directory under output_root")
    output_root: str = "outputs"
    world: WorldConfig = WorldConfig()
    crawl: CrawlConfig = CrawlConfig()
    validate_: ValidateConfig = Field(default=ValidateConfig(), alias="validate")
    clip: ClipConfig = ClipConfig()
    dedup: DedupConfig = DedupConfig()
    eval_guard: EvalGuardConfig = EvalGuardConfig()
    objects: ObjectsConfig = ObjectsConfig()
    teacher: TeacherConfig = TeacherConfig()
    generate: GenerateConfig = GenerateConfig()
    publish: PublishConfig = PublishConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ray: RayConfig = RayConfig()
    proof: ProofConfig = ProofConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("name")
    @classmethod
    def _name_stays_inside_output_root(cls, name: str) -> str:
        if name in (".", ".."):  # the pattern admits them, and they would write into or above output_root
            raise ValueError(f"name {name!r} is not a directory of its own under output_root; use a plain name "
                             f"such as 'sample'")
        return name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def fingerprint(self) -> str:
        """Hash of everything that changes the data; where outputs go and which cluster runs it do not."""
        semantic = {k: v for k, v in self.to_dict().items() if k not in ("output_root", "ray", "proof")}
        semantic["teacher"] = {k: v for k, v in semantic["teacher"].items() if k not in _TEACHER_OPERATIONAL}
        return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PipelineConfig:
    """The pipeline's config from a YAML file (none: every default) and `--set` overrides (`schemas/flags.py`)."""
    return validated(PipelineConfig, read_tree(path, overrides, "configs/sample.yaml"), "configs/sample.yaml")


def save_config(config: PipelineConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=True))
