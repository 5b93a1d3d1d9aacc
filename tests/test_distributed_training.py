"""Data-parallel training on Ray Train (trainer/distributed.py) against a real `ray start --head` cluster,
with tests/test_trainer.py's tiny in-process models on the CPU (gloo): N workers with batch b follow the
loss curve of one process with batch N*b, resume mid-run, and a `ray job submit` of a 2-worker run leaves
a checkpoint the evals load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_trainer import tiny, train_config  # noqa: F401 - tiny: the tiny model parts fixture


@pytest.fixture(scope="module")
def ray_head():
    import ray

    from infra.local_cluster import start_head, stop_head

    started = start_head()
    ray.init(address="auto", ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()
    if started:
        stop_head()


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def close(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b) == 6, (a, b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))


def test_two_workers_follow_one_process_with_twice_the_batch_and_resume_on_the_same_curve(tiny, ray_head, tmp_path):
    from trainer.distributed import train_on_ray
    from trainer.train import Trainer

    # grad_accum 2: each optimizer step is 2 global micro-batches; text-only samples leave the projector unused
    Trainer(train_config(tiny, tmp_path / "one", batch_size=4, grad_accum=2, save_every=100), progress=False).run()
    one = losses(tmp_path / "one")
    train_on_ray(train_config(tiny, tmp_path / "two", batch_size=2, grad_accum=2, save_every=3, workers=2))
    two = losses(tmp_path / "two")
    assert close(two, one) <= 1e-4, (two, one)
    assert len(set(one)) == 6  # a curve that moves, not a constant

    halted = train_config(tiny, tmp_path / "resumed", batch_size=2, grad_accum=2, save_every=3, workers=2)
    train_on_ray(halted.model_copy(update={"stop_at_step": 3}))
    assert len(losses(tmp_path / "resumed")) == 3
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000003"]
    train_on_ray(halted)
    assert close(losses(tmp_path / "resumed"), two) <= 1e-6


def test_ray_job_submit_of_a_two_worker_run_leaves_a_checkpoint_the_evals_load(tiny, ray_head, tmp_path):
    from infra.local_cluster import dashboard_url, ray_executable
    from trainer.checkpoint import find_checkpoint, load_vlm

    out = tmp_path / "job"
    command = [ray_executable(), "job", "submit", "--address", dashboard_url(), "--working-dir", str(REPO), "--",
               sys.executable, "pipelines/train.py", "--workers", "2", "--stage", "finetune", "--data", str(tiny["data"]),
               "--image-folder", str(tiny["images"]), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
               "--device", "cpu", "--set", f"model.lm={tiny['model'].lm}",
               "--set", f"model.vision.model={tiny['model'].vision.model}",
               "--set", f"model.vision.pretrained={tiny['model'].vision.pretrained}",
               "--set", f"model.vision.config_path={tiny['model'].vision.config_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "finetune: step 2, loss" in done.stdout
    checkpoint = find_checkpoint(out)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    vlm = load_vlm(checkpoint)
    assert not vlm.training and vlm.num_patches == 16


def test_the_kuberay_rayjob_runs_a_train_command_our_cli_accepts():
    import shlex

    import yaml

    from trainer.config import build_config, cli_parser, flag_fields, flag_value

    job = yaml.safe_load((REPO / "infra" / "kuberay" / "train-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "pipelines/train.py"]
    args = cli_parser("train").parse_args(command[2:])
    config = build_config({n: flag_value(n, getattr(args, n)) for n in flag_fields() if n in vars(args)})
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert config.workers * config.gpus_per_worker == gpus and config.stage == "finetune"
