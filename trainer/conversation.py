"""Conversations -> token ids + labels: which tokens the loss sees.

Two renderings, as LLaVA: `plain` (Stage 1: the images' `<image>` tokens, then the caption + EOS; loss on
the caption) and `chat` (Stage 2: the tokenizer's own chat template; loss only on assistant turns). The
system prompt, human turns, template scaffolding and image positions are IGNORE. Each `<image>` expands
to the vision tower's N_patches positions here, before embedding, so ids, labels and mask line up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.errors import UserError
from trainer.language_model import IMAGE_TOKEN

IGNORE = -100  # the label the loss skips (torch CrossEntropyLoss' ignore_index)
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Footprint:
    """Where a sample's tokens end before any truncation (positions after image expansion)."""

    length: int  # all tokens
    image_end: int  # one past the last image position (0: no image)
    answer_end: int  # one past the last supervised token (0: nothing supervised)


@dataclass
class EncodedSample:
    input_ids: list[int]  # image tokens already expanded to N_patches each
    labels: list[int]  # IGNORE where the loss does not look
    num_images: int  # images whose tokens survived truncation (the first ones)


def to_messages(conversations: list[dict], num_images: int) -> list[dict]:
    """LLaVA turns ({"from", "value"}) -> chat messages; a sample with images but no `<image>` gets them
    in front of its first human turn, as LLaVA does."""
    messages = [{"role": ROLES.get(t.get("from") or t.get("role"), "?"), "content": t.get("value", t.get("content", ""))}
                for t in conversations]
    unknown = {t.get("from") or t.get("role") for t, m in zip(conversations, messages) if m["role"] == "?"}
    if unknown:
        raise ValueError(f"unknown conversation roles {sorted(map(str, unknown))}; use human/gpt (or user/assistant)")
    if not messages or messages[0]["role"] == "assistant":
        raise ValueError("a conversation must start with a human (or system) turn")
    placed = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if placed == 0 and num_images:
        first = next((m for m in messages if m["role"] == "user"), None)
        if first is None:
            raise ValueError("a sample with images needs a human turn to hold them")
        first["content"] = IMAGE_TOKEN * num_images + "\n" + first["content"]
    elif placed != num_images:
        raise ValueError(f"the text holds {placed} {IMAGE_TOKEN} tokens but the sample has {num_images} images")
    return messages


class ConversationEncoder:
    def __init__(self, tokenizer, image_token_id: int, num_patches: int, fmt: Literal["plain", "chat"],
                 max_length: int):
        self.tokenizer, self.image_token_id, self.num_patches = tokenizer, image_token_id, num_patches
        self.fmt, self.max_length = fmt, max_length
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            raise UserError("The language model's tokenizer has no chat template, which the finetune stage renders "
                            "conversations with; use an instruct model or set tokenizer.chat_template.")

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Assistant spans found by rendering each prefix: [prompt up to the answer, end of that turn)."""
        full = self._render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start, end = self._render(messages[:i], True), self._render(messages[: i + 1], False)
            if not (full.startswith(start) and full.startswith(end)):
                raise UserError("The tokenizer's chat template does not render a conversation prefix by prefix, so "
                                "assistant turns cannot be located; use a template without history-dependent edits.")
            spans.append((len(start), len(end)))
        encoding = self.tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoding["input_ids"]
        labels = [t if any(s <= a < e for s, e in spans) else IGNORE for t, (a, _) in zip(ids, encoding["offset_mapping"])]
        return ids, labels

    def _plain(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """LLaVA's `plain` template: the images, then the caption; the human text is dropped."""
        images = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
        answer = "\n".join(m["content"] for m in messages if m["role"] == "assistant")
        prompt = self._ids(IMAGE_TOKEN * images)
        target = self._ids(answer) + [self.tokenizer.eos_token_id]
        return prompt + target, [IGNORE] * len(prompt) + target

    def _expand(self, ids: list[int], labels: list[int]) -> EncodedSample:
        """Each `<image>` -> N_patches positions (label IGNORE); truncation never splits an image."""
        out_ids, out_labels = [], []
        for token, label in zip(ids, labels):
            if token == self.image_token_id:
                out_ids += [token] * self.num_patches
                out_labels += [IGNORE] * self.num_patches
            else:
                out_ids.append(token)
                out_labels.append(label)
        out_ids, out_labels = out_ids[: self.max_length], out_labels[: self.max_length]
        image_positions = sum(t == self.image_token_id for t in out_ids)
        partial = image_positions % self.num_patches
        if partial:  # the cut fell inside an image: drop that image's tokens and everything after
            cut = len(out_ids) - out_ids[::-1].index(self.image_token_id) - partial
            out_ids, out_labels = out_ids[:cut], out_labels[:cut]
        return EncodedSample(out_ids, out_labels, image_positions // self.num_patches)

    def measure(self, conversations: list[dict], num_images: int) -> Footprint:
        """The sample's untruncated footprint (what `encode` would cut at max_length); ValueError as `encode`."""
        messages = to_messages(conversations, num_images)
        ids, labels = (self._plain if self.fmt == "plain" else self._chat)(messages)
        position = image_end = answer_end = 0
        for token, label in zip(ids, labels):
            position += self.num_patches if token == self.image_token_id else 1
            if token == self.image_token_id:
                image_end = position
            elif label != IGNORE:
                answer_end = position
        return Footprint(position, image_end, answer_end)

    def encode(self, conversations: list[dict], num_images: int) -> EncodedSample:
        messages = to_messages(conversations, num_images)
        ids, labels = (self._plain if self.fmt == "plain" else self._chat)(messages)
        return self._expand(ids, labels)

    def encode_prompt(self, conversations: list[dict], num_images: int) -> EncodedSample:
        """For generation: the conversation up to and including the assistant's opening, nothing supervised."""
        messages = to_messages(conversations, num_images)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if self.fmt == "plain":
            ids = self._ids(IMAGE_TOKEN * num_images)
        else:
            ids = self.tokenizer(self._render(messages, True), add_special_tokens=False)["input_ids"]
        return self._expand(ids, [IGNORE] * len(ids))
