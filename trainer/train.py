"""The training loop: one stage (StageSpec) over one dataset, resumable mid-stage.

    python pipelines/train.py --stage align --data llava.json --image-folder images/ --out outputs/train/align

CUDA with bf16 autocast when present (fp32 master weights); the CPU in fp32, or bf16 autocast with
precision=bf16; gradient accumulation; optional gradient checkpointing. Every optimizer step appends {step, loss, lr,
tokens, tokens_per_s} to `<out>/metrics.jsonl`; checkpoints (trainer/checkpoint.py) carry the
optimizer, scheduler, RNG states and data position, so a re-run with the same --out continues the
same loss curve.
"""
from __future__ import annotations

import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from filters.clip_loader import pick_device
from schemas.errors import UserError
from trainer.checkpoint import (CHECKPOINTS, build_vlm, check_architecture, checkpoints_in, find_checkpoint,
                                load_trainer_state, load_weights, prune_checkpoints, save_checkpoint, saved_config,
                                set_rng_states)
from trainer.config import TrainConfig, autocast, save_config
from trainer.conversation import IGNORE, ConversationEncoder
from trainer.budget import check_token_budget
from trainer.distributed import (ShardOf, full_weights, global_sum, gradient_sync, load_optimizer_state,
                                 optimizer_state, rank_and_size, wrap)
from trainer.data import Collate, RowView, TrainingSamples, open_rows
from trainer.sampling import EpochOrder, LengthGroupedOrder
from trainer.language_model import pad_token_id
from trainer.stages import apply_stage, format_table, learning_rate, stage_spec


def count_supervised(labels: torch.Tensor) -> int:
    """Tokens the loss sees after the causal shift; zero raises instead of a silent NaN / 0 loss."""
    supervised = int((labels[:, 1:] != IGNORE).sum())
    if supervised == 0:
        raise UserError("A training batch has no supervised tokens: the chat template probably does not match the "
                        "conversations (no assistant turns found), or max_length cut the answers off.")
    return supervised


def warmup_cosine(warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


class Trainer:
    def __init__(self, config: TrainConfig, progress: bool = True):
        self.spec = stage_spec(config.stage)
        config = config.model_copy(update={"out": config.out or f"outputs/train/{config.stage}",
                                           "lr": learning_rate(self.spec, config)})  # saved resolved
        self.config, self.out, self.progress, self.lr = config, Path(config.out), progress, config.lr
        rows = open_rows(config)  # before the models load: a data mistake fails in a second, not a minute
        resume, start = self._starting_point()
        self.device = pick_device(config.device)
        torch.manual_seed(config.seed)  # projector and LoRA initialisation
        self.vlm = build_vlm(config.model, start)
        self.vlm.language_model.config.use_cache = False  # no KV cache while training
        self.modules = apply_stage(self.vlm, self.spec, config)
        if start is not None:
            load_weights(self.vlm, start, config.lora)
        if config.shard == "full":  # fully_shard moves each unit to the device as it shards it: the whole LM
            self.vlm.vision_tower.to(self.device)  # never sits on one device; the tower it leaves out is moved here
        else:
            self.vlm.to(self.device)
        self.rank, self.world = rank_and_size()  # (0, 1) unless Ray Train started workers (trainer/distributed.py)
        self.model = wrap(self.vlm, self.device, config.shard)  # DDP or FSDP across workers; the VLM in one process

        encoder = ConversationEncoder(self.vlm.tokenizer, self.vlm.image_token_id, self.vlm.num_patches,
                                      self.spec.render, config.max_length)
        self.budget = check_token_budget(rows, encoder)  # nothing is trained cut: see trainer/budget.py
        if not self.budget.fits(config.max_dropped_share):
            if self.rank == 0:
                self.budget.save(self.out / "token_budget.json")
            raise self.budget.too_much_dropped(config.max_dropped_share, self.out / "token_budget.json")
        rows = RowView(rows, self.budget.kept)
        self.samples = TrainingSamples(rows, encoder, self.vlm.vision_tower.preprocess)
        self.collate = Collate(pad_token_id(self.vlm.tokenizer), self.vlm.vision_tower.image_size)
        per_step = config.batch_size * config.grad_accum * self.world
        self.max_steps = config.max_steps or math.ceil(len(rows) / per_step)  # default: one epoch, as LLaVA
        self.optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, weight_decay=config.weight_decay)
        warmup = math.ceil(config.warmup_ratio * self.max_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine(warmup, self.max_steps))
        self.step = 0
        if resume is not None:
            state = load_trainer_state(resume)
            load_optimizer_state(self.vlm, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step = state["step"]
            set_rng_states(state["rng"])
        self.resumed_from = resume

    def param_groups(self) -> list[dict]:
        """The trainable parameters; the projector in its own group when it has its own lr (a fresh projector
        learns at Stage 1's rate while the pretrained LM moves slowly)."""
        projector = [p for p in self.vlm.projector.parameters() if p.requires_grad]
        others = [p for n, p in self.vlm.named_parameters() if p.requires_grad and not n.startswith("projector.")]
        if self.config.projector_lr is None or not projector or not others:
            return [{"params": projector + others}]
        return [g for g in ({"params": others}, {"params": projector, "lr": self.config.projector_lr}) if g["params"]]

    def _starting_point(self) -> tuple[Path | None, Path | None]:
        """(checkpoint to resume in --out, checkpoint whose weights start the run): resume wins over --init."""
        config = self.config
        resume = checkpoints_in(self.out)[-1] if config.resume and checkpoints_in(self.out) else None
        start = resume or (find_checkpoint(config.init) if config.init else None)
        if start is not None:
            check_architecture(start, config.model)
        if resume is not None:
            saved = saved_config(resume)
            knobs = ("stage", "lora", "lm_layers", "freeze", "projector_lr", "shard")  # shard: the optimizer's format
            if any(getattr(saved, k) != getattr(config, k) for k in knobs):
                was = ", ".join(f"{k}={getattr(saved, k)}" for k in knobs)
                now = ", ".join(f"{k}={getattr(config, k)}" for k in knobs)
                raise UserError(f"{self.out} holds a run with {was}; choose another --out for this one ({now}), "
                                f"or set resume=false to overwrite it.")
        return resume, start

    def autocast(self):
        return autocast(self.device, self.config.precision)

    def batches(self):
        """Endless micro-batches from where the data order stands at `self.step`."""
        config, world = self.config, self.world
        start = self.step * config.batch_size * config.grad_accum * world
        order = (LengthGroupedOrder(self.budget.lengths, config.batch_size * world, config.seed, start)
                 if config.group_by_length else EpochOrder(len(self.samples), config.seed, start))
        if world > 1:  # this worker's slice of each global micro-batch
            order = ShardOf(order, config.batch_size, self.rank, world)
        loader = torch.utils.data.DataLoader(self.samples, batch_size=self.config.batch_size, sampler=order,
                                             collate_fn=self.collate, num_workers=self.config.num_workers,
                                             generator=torch.Generator().manual_seed(self.config.seed),  # not the global RNG
                                             pin_memory=self.device.startswith("cuda"))
        return iter(loader)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over `grad_accum` micro-batches (on every worker); returns the step's metrics. The
        loss is the mean over the supervised tokens of the whole step, all micro-batches and workers together."""
        self.model.train()
        counts = [count_supervised(batch["labels"]) for batch in micro_batches]
        supervised = global_sum(sum(counts))
        loss_sum, tokens, positions = 0.0, 0, 0
        for i, (batch, count) in enumerate(zip(micro_batches, counts)):
            positions += batch["attention_mask"].numel()
            batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            last = i == len(micro_batches) - 1  # gradients are reduced once, after the last micro-batch
            with gradient_sync(self.model, enabled=last):
                with self.autocast():
                    loss = self.model(**batch).loss  # mean over this micro-batch's supervised tokens
                # DDP and FSDP average over workers: scaled by `world`, the sum is the step's token mean
                (loss * (count * self.world / supervised)).backward()
            loss_sum += loss.item() * count
            tokens += int(batch["attention_mask"].sum())
        loss_sum, tokens, positions = global_sum(loss_sum), int(global_sum(tokens)), int(global_sum(positions))
        torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                       self.config.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "loss": loss_sum / supervised, "lr": lr, "tokens": tokens,
                "supervised_tokens": int(supervised), "positions": positions, "padding_share": 1 - tokens / positions}

    def save(self) -> Path | None:
        """Every worker calls it (gathering sharded weights and optimizer state takes all of them); rank 0 writes."""
        weights, optimizer = full_weights(self.vlm), optimizer_state(self.vlm, self.optimizer)
        if self.rank != 0:
            return None
        state = {"step": self.step, "samples_seen": self.step * self.config.batch_size * self.config.grad_accum * self.world,
                 "optimizer": optimizer, "scheduler": self.scheduler.state_dict()}
        path = save_checkpoint(self.out, self.vlm, self.config, self.modules, state, weights)
        prune_checkpoints(self.out, self.config.keep_checkpoints)
        return path

    def _open_metrics(self):
        """metrics.jsonl keeps the steps up to where this run stands (a crash may have written more)."""
        path = self.out / "metrics.jsonl"
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
        path.write_text("".join(line + "\n" for line in kept))
        return path.open("a")

    def run(self, until_step: int | None = None) -> list[dict]:
        """Trains to max_steps (or stops after `until_step`, as an interrupted run would); returns this call's metrics."""
        writer = self.rank == 0  # one writer of logs, metrics and checkpoints
        log = sys.stderr.write if writer else (lambda text: None)
        if writer:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step == 0 and checkpoints_in(self.out):  # resume=false: a fresh run replaces the old one
                log(f"resume=false: removing the earlier run's checkpoints in {self.out}\n")
                shutil.rmtree(self.out / CHECKPOINTS)
            save_config(self.config, self.out / "config.yaml")
            (self.out / "modules.json").write_text(json.dumps(self.modules, indent=1))
            self.budget.save(self.out / "token_budget.json")
        log(self.budget.summary() + (f" (ids in {self.out / 'token_budget.json'})" if self.budget.dropped else "") + "\n")
        log(f"{self.spec.name} ({self.spec.data}): {len(self.samples)} samples, {self.max_steps} steps of {self.config.batch_size}x"
            f"{self.config.grad_accum}" + (f" on each of {self.world} workers" if self.world > 1 else "")
            + (", parameters sharded (FSDP)" if self.config.shard == "full" else "")
            + f", lr {self.lr:g}, device {self.device}"
            + (f", resumed at step {self.step} from {self.resumed_from}" if self.resumed_from else "") + "\n")
        log(format_table(self.modules) + "\n")
        stop = min(self.max_steps, until_step or self.max_steps, self.config.stop_at_step or self.max_steps)
        history = []
        micro = self.batches()
        with self._open_metrics() if writer else io.StringIO() as metrics, \
                tqdm(total=self.max_steps, initial=self.step, desc=self.spec.name, unit="step",
                     disable=not (self.progress and writer)) as bar:
            while self.step < stop:
                started = time.perf_counter()
                record = self.train_step([next(micro) for _ in range(self.config.grad_accum)])
                record["seconds"] = time.perf_counter() - started
                record["tokens_per_s"] = record["tokens"] / record["seconds"]
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                history.append(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                bar.update(1)
                if self.step % self.config.save_every == 0 or self.step in (self.max_steps, stop):
                    self.save()  # on every worker: a sharded model's checkpoint is gathered by all of them
        if history:
            padding = 1 - sum(r["tokens"] for r in history) / sum(r["positions"] for r in history)
            log(f"padding: {padding:.1%} of the batch positions of these {len(history)} steps"
                f"{' (batches grouped by length)' if self.config.group_by_length else ''}\n")
        return history
