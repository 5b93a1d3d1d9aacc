"""Data-parallel training on Ray Train (trainer/distributed.py) against a real `ray start --head` cluster,
with tests/test_trainer.py's tiny in-process models on the CPU (gloo): N workers with batch b follow the
loss curve of one process with batch N*b, resume mid-run, and a `ray job submit` of a 2-worker run leaves
a checkpoint the evals load."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, free_port
from tests.tiny_vlm import tiny, train_config  # noqa: F401 - tiny: the tiny model parts fixture


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

    from trainer.config import cli_parser, config_from_args

    job = yaml.safe_load((REPO / "infra" / "kuberay" / "train-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    command = shlex.split(job["spec"]["entrypoint"])
    assert command[:2] == ["python", "pipelines/train.py"]
    args = cli_parser("train").parse_args(command[2:])
    config = config_from_args(args)
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])
    assert config.workers * config.gpus_per_worker == gpus and config.stage == "finetune"


def checkpoint_tensors(run) -> dict:
    """Every tensor a run's newest checkpoint holds (projector and, when the LM trained, its weights)."""
    from safetensors.torch import load_file

    from trainer.checkpoint import find_checkpoint

    checkpoint = find_checkpoint(run)
    return {f"{f.parent.name}/{k}": v for f in sorted(checkpoint.rglob("*.safetensors")) for k, v in load_file(f).items()}


def test_fully_sharded_workers_follow_one_process_write_whole_weights_and_resume(tiny, ray_head, tmp_path):
    from trainer.checkpoint import load_vlm
    from trainer.distributed import train_on_ray
    from trainer.train import Trainer

    Trainer(train_config(tiny, tmp_path / "one", batch_size=4, grad_accum=2, save_every=100), progress=False).run()
    sharded = train_config(tiny, tmp_path / "fsdp", batch_size=2, grad_accum=2, save_every=3, workers=2, shard="full")
    train_on_ray(sharded)
    assert close(losses(tmp_path / "fsdp"), losses(tmp_path / "one")) <= 1e-4, (losses(tmp_path / "fsdp"), losses(tmp_path / "one"))

    # the checkpoint holds whole tensors, the files a one-process run writes, with its values
    one, fsdp = checkpoint_tensors(tmp_path / "one"), checkpoint_tensors(tmp_path / "fsdp")
    assert any(k.startswith("lm/") for k in one) and sorted(one) == sorted(fsdp)
    for key in one:
        assert one[key].shape == fsdp[key].shape, key
        assert (one[key] - fsdp[key]).abs().max() <= 1e-4 * max(1.0, float(one[key].abs().max())), key
    assert load_vlm(tmp_path / "fsdp").num_patches == 16

    train_on_ray(sharded.model_copy(update={"out": str(tmp_path / "resumed"), "stop_at_step": 3}))
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-000003"]
    train_on_ray(sharded.model_copy(update={"out": str(tmp_path / "resumed")}))
    assert close(losses(tmp_path / "resumed"), losses(tmp_path / "fsdp")) <= 1e-6


def _shares_of_a_sharded_vlm(rank: int, model, port: int, out) -> None:
    """One of two gloo workers: wraps the tiny VLM as the trainer does with shard=full; writes what it holds."""
    import os

    import torch.distributed as dist

    from trainer.checkpoint import build_vlm
    from trainer.distributed import wrap

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    vlm = wrap(build_vlm(model), "cpu", shard="full")
    held = {name: (p.to_local().numel() if hasattr(p, "to_local") else p.numel(), p.numel())
            for name, p in vlm.named_parameters()}
    (out / f"rank{rank}.json").write_text(json.dumps(held))
    dist.destroy_process_group()


def test_shard_full_splits_every_lm_block_and_the_projector_and_keeps_the_vision_tower_whole(tiny, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_shares_of_a_sharded_vlm, args=(tiny["model"], free_port(), tmp_path), nprocs=2)
    held = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for name, (local, whole) in held[0].items():
        if name.startswith("vision_tower."):
            assert local == whole, name  # replicated: frozen, never gathered
        else:
            assert local + held[1][name][0] == whole and local < whole, name  # each worker holds its part
    assert any(".layers." in name for name in held[0]) and any(n.startswith("projector.") for n in held[0])


def test_shard_full_without_workers_is_one_sentence():
    done = subprocess.run([sys.executable, "pipelines/train.py", "--shard", "full", "--stage", "finetune"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "shard=full shards the model across Ray Train workers; add --workers N" in done.stderr
