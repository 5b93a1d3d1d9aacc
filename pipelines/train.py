r"""Train the VLM, one stage per run (a plain script, so it also runs as a Ray job):

    python pipelines/train.py --stage align --data data.json --image-folder images/ --out outputs/train/align
    python pipelines/train.py --stage finetune --data instruct.json --image-folder images/ \
        --init outputs/train/align --out outputs/train/finetune [--lora true]
    python pipelines/train.py --stage finetune --dataset outputs/sample --version v-... \
        --init outputs/train/align --out outputs/train/ft

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/train.py --stage align ...
    ray job submit ... -- python pipelines/train.py --workers 2 [--gpus-per-worker 1] [--shard full] --stage finetune ...

`--workers N` runs the loop data-parallel on N Ray Train workers (trainer/distributed.py: DDP, gloo on CPUs,
NCCL on GPUs; each worker reads its slice of every global batch of N x batch size; only rank 0 writes);
without it, one process and no Ray. `--shard full` shards the model across the workers (FSDP) instead of
copying it. `--out` must be a folder every worker sees.

Every TrainConfig field is a flag (`--max-steps 100 --batch-size 8 --grad-accum 4 --lr 1e-3 --max-length 512
--seed 0 --save-every 50`); nested ones take `--set model.projector=linear`; `--config` reads a YAML base.
With `--init`, the architecture (`model`) comes from that checkpoint unless set otherwise (which then
must agree). Re-running with the same --out resumes from its newest checkpoint.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python pipelines/x.py` without an install

from schemas.errors import exit_on_user_error  # noqa: E402
from trainer.config import TrainConfig, cli_parser, config_from_args  # noqa: E402


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    args = cli_parser("Train the LLaVA-style VLM: one stage (align or finetune) per run.").parse_args(argv)
    config = config_from_args(args)
    if config.init is None:
        return config
    from trainer.checkpoint import find_checkpoint, saved_config

    inherited = saved_config(find_checkpoint(config.init)).model.model_dump(mode="json")
    return config_from_args(args, inherit_model=inherited)


def main(argv: list[str] | None = None) -> None:
    def run() -> None:
        from trainer.train import Trainer

        config = parse_train_config(argv)
        if config.workers:
            from trainer.distributed import train_on_ray

            train_on_ray(config)
            metrics = Path(config.out or f"outputs/train/{config.stage}") / "metrics.jsonl"
            history = [json.loads(line) for line in metrics.read_text().splitlines() if line] if metrics.is_file() else []
        else:
            history = Trainer(config).run()
        if history:
            print(f"{config.stage}: step {history[-1]['step']}, loss {history[-1]['loss']:.4f}; "
                  f"checkpoints and metrics.jsonl in {config.out}")

    exit_on_user_error(run)


if __name__ == "__main__":
    main()
