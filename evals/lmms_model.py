"""visinstruct checkpoints as an lmms-eval model: `lmms-eval --model visinstruct --model_args checkpoint=<dir>`.

Registered through the `lmms_eval.models` entry point (pyproject.toml -> `evals.lmms_plugin`), so an
installed visinstruct is all lmms-eval needs. Model args (comma-separated `key=value`):

  checkpoint       a checkpoint folder, or a training run's --out (its newest checkpoint)   [required]
  precision        auto (bf16 autocast on CUDA), fp32 or bf16
  max_new_tokens   a cap on the task's own answer length (default: none; lmms-eval's POPE asks for 128)

and lmms-eval's own flags: `--batch_size N` (prompts generated together; `auto` means 16) and `--device`
(cpu, cuda; default: the GPU when one is visible).

Answers are greedy, one image per question in its first human turn, with the stage's own conversation
template (`evals.vlm_eval.GreedyAnswerer`, the same code as our evals). Generation tasks only: a task
that scores log-likelihoods gets a one-sentence error.
"""
from __future__ import annotations

from lmms_eval.api.model import lmms

from evals.vlm_eval import GreedyAnswerer


class Visinstruct(lmms):
    def __init__(self, checkpoint: str, device: str | None = None, batch_size: int | str = 16, precision: str = "auto",
                 max_new_tokens: int | str | None = None, **_ignored) -> None:  # _ignored: lmms-eval's max_batch_size
        super().__init__()
        from filters.clip_loader import pick_device
        from trainer.checkpoint import find_checkpoint, load_vlm, saved_config
        from trainer.stages import stage_spec

        found = find_checkpoint(checkpoint)
        vlm = load_vlm(found, pick_device(device or "auto"))
        batch = int(batch_size) if str(batch_size).isdigit() else 16
        self.answerer = GreedyAnswerer(vlm, stage_spec(saved_config(found).stage).render, batch, precision=precision)
        self.max_new_tokens = None if max_new_tokens in (None, "", "None") else int(max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        images, asks = {}, []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                raise ValueError(f"visinstruct models answer with exactly one image per question; {task} gives "
                                 f"{len(visuals)} for document {doc_id}.")
            key = f"{task}/{split}/{doc_id}"
            images[key] = visuals[0]
            length = int(gen_kwargs.get("max_new_tokens", 128))
            asks.append((key, context, min(length, self.max_new_tokens or length), gen_kwargs.get("until") or []))
        answers = []
        for length in sorted({ask[2] for ask in asks}):  # one greedy pass per answer length
            group = [i for i, ask in enumerate(asks) if ask[2] == length]
            texts = self.answerer([asks[i][:2] for i in group], images.__getitem__, length, desc=f"lmms-eval, {length} tokens")
            answers += list(zip(group, texts))
        out = [""] * len(asks)
        for i, text in answers:
            for stop in [asks[i][3]] if isinstance(asks[i][3], str) else asks[i][3]:
                text = text.split(stop)[0] if stop else text
            out[i] = text
            self.cache_hook.add_partial("generate_until", (asks[i][1], requests[i].args[1]), text)
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        raise NotImplementedError("visinstruct's lmms-eval model answers generation tasks (output_type "
                                  "generate_until, e.g. POPE); this task scores log-likelihoods.")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("visinstruct's lmms-eval model answers single-round generation tasks.")
