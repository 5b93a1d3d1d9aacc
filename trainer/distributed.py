"""Data-parallel training on Ray Train: the same Trainer loop in N worker processes (`TorchTrainer`, which
starts the torch.distributed process group: gloo on CPUs, NCCL on GPUs), the model wrapped in
DistributedDataParallel (`shard: none`), or fully sharded with torch's FSDP (`shard: full`).

- FSDP: each decoder block of the LM is one unit (its parameters gathered just before it runs and freed
  after), the rest that trains (embeddings, final norm, LM head, projector) the root unit; the frozen
  vision tower stays whole on every worker (no gradient to reduce, and gathering it every step would move
  it for nothing). Gradients are reduce-scattered and averaged as DDP all-reduces and averages them, so the
  loss curve is DDP's. A checkpoint gathers whole tensors to rank 0's CPU (every worker takes part), so it
  is the same files a one-process run writes; the optimizer state is saved whole too, by parameter name
  (one file, not one per worker), and each worker takes its shard back on resume.

- One global data order (the single-process one, with a global batch of workers x batch_size); worker r
  reads the r-th slice of each global micro-batch, so N workers with batch b see exactly the samples one
  process sees with batch N*b.
- The loss is normalised by the supervised tokens of the whole global step (all micro-batches, all
  workers), so the gradient is the one-process gradient of that batch, not a mean of per-worker means.
- Only rank 0 writes logs, metrics.jsonl and checkpoints; every rank resumes from `--out`, which must
  be a folder all workers see (one machine, or a shared file system on a cluster).

    python pipelines/train.py --workers 2 [--gpus-per-worker 1] --stage finetune ...
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from schemas.errors import UserError


def rank_and_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_sum(value: float) -> float:
    """The sum of `value` over all workers (the value itself in one process)."""
    if rank_and_size()[1] == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor)
    return float(tensor.item())


def wrap(vlm: torch.nn.Module, device: str, shard: str = "none") -> torch.nn.Module:
    """DDP around the VLM when there are several workers (unused parameters allowed, for a language model
    whose forward skips a module), or the VLM itself fully sharded in place."""
    if shard == "full":
        return fully_sharded(vlm)
    if rank_and_size()[1] == 1:
        return vlm
    from torch.nn.parallel import DistributedDataParallel

    on_cuda = str(device).startswith("cuda")
    index = torch.device(device).index if on_cuda else None
    return DistributedDataParallel(vlm, device_ids=[index] if on_cuda and index is not None else None,
                                   find_unused_parameters=True)


def fully_sharded(vlm: torch.nn.Module) -> torch.nn.Module:
    """The VLM under FSDP (module docstring): one unit per decoder block, the root for the rest, the vision
    tower left out. Every worker must run every trainable parameter in every micro-batch (a collective per
    unit); the VLM's forward does, as it projects even an empty batch of images."""
    from torch.distributed.fsdp import fully_shard

    for name, stack in vlm.language_model.named_modules():
        if name.endswith("layers") and isinstance(stack, torch.nn.ModuleList):
            for block in stack:
                fully_shard(block)
    fully_shard(vlm, ignored_params=set(vlm.vision_tower.parameters()))
    return vlm


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool):
    """Gradients reduced across workers at the end of this backward (the last micro-batch of a step), or only
    accumulated on each worker (the others)."""
    if enabled or rank_and_size()[1] == 1:
        yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with model.no_sync():
            yield


def _whole():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


def full_weights(vlm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VLM's state dict with whole tensors; sharded, every worker must call it, and only rank 0 gets them."""
    if not is_sharded(vlm):
        return vlm.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(vlm, options=_whole())


def optimizer_state(vlm: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state to save (sharded: whole, by parameter name, to rank 0; every worker calls it)."""
    if not is_sharded(vlm):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(vlm, optimizer, options=_whole())


def load_optimizer_state(vlm: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """What `optimizer_state` saved, back into this run's optimizer (sharded: each worker keeps its shard)."""
    if not is_sharded(vlm):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(vlm, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))


class ShardOf(torch.utils.data.Sampler):
    """Worker `rank`'s share of a global order: the rank-th `batch_size` slice of every global micro-batch
    of `size * batch_size` positions."""

    def __init__(self, order, batch_size: int, rank: int, size: int):
        self.order, self.batch_size, self.rank, self.size = order, batch_size, rank, size

    def __iter__(self):
        for position, index in enumerate(self.order):
            if (position % (self.size * self.batch_size)) // self.batch_size == self.rank:
                yield index


def worker_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: the Trainer on this worker's shard."""
    from trainer.config import TrainConfig
    from trainer.train import Trainer

    config = TrainConfig.model_validate(loop_config["config"])
    rank = rank_and_size()[0]
    if rank != 0:
        sys.stderr = open("/dev/null", "w")  # noqa: SIM115 - one writer: rank 0 logs for the run
    Trainer(config, progress=False).run()


def user_error_in(err: BaseException) -> UserError | None:
    """The UserError a worker raised, found through Ray's wrappers (exception causes, per-worker failures)."""
    seen, todo = set(), [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        todo += [current.__cause__, current.__context__, *getattr(current, "worker_failures", {}).values()]
    return None


def train_on_ray(config) -> None:
    """Runs `config` on `config.workers` Ray Train workers of the cluster this process is attached to (a
    `ray job submit` job's, RAY_ADDRESS, or a local one started here)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(ignore_reinit_error=True, log_to_driver=True)
    out = Path(config.out).resolve()
    gpus = config.gpus_per_worker
    scaling = ScalingConfig(num_workers=config.workers, use_gpu=gpus > 0,
                            resources_per_worker={"CPU": 1, **({"GPU": gpus} if gpus else {})})
    trainer = TorchTrainer(worker_loop, train_loop_config={"config": config.model_copy(update={"out": str(out)}).to_dict()},
                           scaling_config=scaling, run_config=RunConfig(name=out.name, storage_path=str(out.parent / ".ray_train")))
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps a worker's exception; ours is one sentence, so pass that on
        found = user_error_in(err)
        if found is not None:
            raise UserError(str(found)) from None
        raise
