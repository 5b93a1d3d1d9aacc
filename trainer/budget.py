"""The token-budget guard: before the first step every sample's tokens (image tokens + text) are counted
against `max_length`, and a sample that would lose image tokens or answer tokens to truncation is dropped
with its reason instead of being trained cut (a cut image still lowers the loss while the model never sees
it). The counts are printed before training and saved as `<out>/token_budget.json`; a run that would drop
more than `max_dropped_share` of its samples stops with one sentence.

Reasons: `image_tokens_cut` (an image's patch tokens cross max_length), `answer_cut` (an assistant answer
does), `no_answer` (nothing to supervise: no assistant turn), `bad_conversation` (roles or `<image>` count
the encoder refuses; the message says which).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import UserError
from trainer.conversation import ConversationEncoder

EXAMPLES = 20  # sample ids kept per reason in token_budget.json


@dataclass
class TokenBudget:
    max_length: int
    samples: int
    kept: list[int] = field(default_factory=list)  # row indices that fit
    lengths: list[int] = field(default_factory=list)  # tokens of each kept row (the batch sampler groups by it)
    dropped: Counter = field(default_factory=Counter)  # reason -> samples
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first sample ids

    def drop(self, reason: str, example: str) -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append(example)

    @property
    def dropped_share(self) -> float:
        return sum(self.dropped.values()) / max(1, self.samples)

    def fits(self, max_dropped_share: float) -> bool:
        """Whether training may start: something is kept and at most `max_dropped_share` is dropped."""
        return bool(self.kept) and self.dropped_share <= max_dropped_share

    def too_much_dropped(self, max_dropped_share: float, saved_to: Path) -> UserError:
        """The one sentence for a budget that does not fit."""
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return UserError(f"{sum(self.dropped.values())} of {self.samples} samples ({self.dropped_share:.1%}) would be "
                         f"cut or cannot be trained at max_length={self.max_length} ({reasons}), more than "
                         f"max_dropped_share={max_dropped_share:.1%}; raise max_length or fix those samples "
                         f"(their ids: {saved_to}).")

    def summary(self) -> str:
        line = f"token budget: {len(self.kept)} of {self.samples} samples fit max_length={self.max_length}"
        if self.dropped:
            line += "; dropped " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.dropped.items()))
        return line

    def to_dict(self) -> dict:
        return {"max_length": self.max_length, "samples": self.samples, "kept": len(self.kept),
                "dropped": dict(sorted(self.dropped.items())), "dropped_share": round(self.dropped_share, 6),
                "examples": self.examples,
                "mean_tokens": round(sum(self.lengths) / max(1, len(self.lengths)), 1)}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))


def check_token_budget(rows, encoder: ConversationEncoder) -> TokenBudget:
    """Counts every row of `rows` (anything with len() and text_of(i) -> (id, conversations, images))."""
    budget = TokenBudget(encoder.max_length, len(rows))
    for index in range(len(rows)):
        sample_id, conversations, num_images = rows.text_of(index)
        try:
            footprint = encoder.measure(conversations, num_images)
        except ValueError as err:
            budget.drop("bad_conversation", f"{sample_id}: {err}")
            continue
        if footprint.answer_end == 0:
            budget.drop("no_answer", sample_id)
        elif footprint.image_end > encoder.max_length:
            budget.drop("image_tokens_cut", sample_id)
        elif footprint.answer_end > encoder.max_length:
            budget.drop("answer_cut", sample_id)
        else:
            budget.kept.append(index)
            budget.lengths.append(min(footprint.length, encoder.max_length))
    return budget
