"""The order training samples are drawn in: `EpochOrder`, the resumable data order (a seeded
permutation per epoch), and `LengthGroupedOrder`, the same with neighbours of similar length (little
padding per batch); `padding_share` measures what an order pads.
"""
from __future__ import annotations

import torch


class EpochOrder(torch.utils.data.Sampler):
    """Endless sample order: epoch e is a permutation seeded by (seed, e). Starting at `start` samples
    in reproduces exactly the order an uninterrupted run would have seen from there."""

    def __init__(self, size: int, seed: int, start: int = 0):
        self.size, self.seed, self.start = size, seed, start

    def epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.size)
            yield from self.epoch(epoch)[offset:]
            position = (epoch + 1) * self.size


class LengthGroupedOrder(EpochOrder):
    """EpochOrder whose consecutive `batch_size` samples have similar lengths (Hugging Face's
    `group_by_length`, LLaVA's `group_by_modality_length` without the modality split): each epoch's seeded
    permutation is cut into mega-batches of up to 50 batches, each sorted longest first, so batches are
    still random draws of the data but pad little. Resumable at any `start` like EpochOrder."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int, start: int = 0):
        super().__init__(len(lengths), seed, start)
        self.lengths = lengths
        self.mega = batch_size * max(1, min(50, len(lengths) // (batch_size * 4)))

    def epoch(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        return [i for at in range(0, self.size, self.mega)
                for i in sorted(order[at:at + self.mega], key=lambda i: -self.lengths[i])]


def padding_share(lengths: list[int], order: list[int], batch_size: int) -> float:
    """The share of padding positions when `order` is cut into batches of `batch_size` (right padding)."""
    padded = real = 0
    for at in range(0, len(order), batch_size):
        batch = [lengths[i] for i in order[at:at + batch_size]]
        padded, real = padded + max(batch) * len(batch), real + sum(batch)
    return 1 - real / max(1, padded)
