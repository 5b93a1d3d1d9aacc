"""Shared fixtures: one small sample world, crawled once by the real demo path (real HTTP server,
real `ray start --head`, real `ray job submit`), whose outputs several tests inspect."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Tests that attach a driver to the local head (127.0.0.1 only) need what its jobs get from the head: Ray reads
# this when first imported (infra/local_cluster.py says why), so it is set before any test imports Ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from evals.noise_eval import read_rows as read_dir  # noqa: F401 - tests read outputs as the manifest does
from pipelines.services.embedded_teacher import free_port  # noqa: F401 - tests' servers bind where nothing listens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Runs infra.demo on a 300-image world; returns (run directory, manifest, world directory, overrides)."""
    from infra.demo import run_demo
    from infra.local_cluster import head_is_up

    base = tmp_path_factory.mktemp("demo")
    head_was_up = head_is_up()
    overrides = [f"world.dir={base / 'world'}", "world.num_images=300", "world.num_val=30",
                 f"world.port={free_port()}", "world.slow_seconds=4", f"output_root={base / 'outputs'}",
                 "crawl.shard_size=100", "crawl.timeout=1.5", "generate.max_images=10",
                 "proof.enabled=false"]  # the proof's loop is tested on tiny models (tests/test_proof.py)
    final = run_demo(str(REPO / "configs" / "sample.yaml"), overrides)
    manifest = json.loads((final / "manifest.json").read_text())
    return {"final": final, "manifest": manifest, "world": base / "world", "overrides": overrides,
            "head_was_up": head_was_up}


@pytest.fixture(scope="session")
def embedded_teacher():
    """The real embedded teacher (llama.cpp server, SmolLM2-135M) on 127.0.0.1; yields (config, base_url)."""
    from pipelines.services.embedded_teacher import EmbeddedTeacher
    from schemas.config import load_config

    config = load_config(REPO / "configs" / "sample.yaml").teacher
    with EmbeddedTeacher(config) as base_url:
        yield config, base_url
