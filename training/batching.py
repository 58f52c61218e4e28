"""Tokenised datasets, length-bucketed batches and dynamic padding."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from training.data import Example


class TokenizedSplit:
    """Examples tokenised once, without padding; padding happens per batch."""

    def __init__(self, examples: Sequence[Example], tokenizer, max_length: int) -> None:
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_length)
        self.input_ids: list[list[int]] = encoded["input_ids"]
        self.labels: list[int] = [e.label for e in examples]
        self.pad_id: int = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> list[int]:
        """Token count of every example."""
        return [len(ids) for ids in self.input_ids]

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Pad the given examples to the longest among them."""
        width = max(len(self.input_ids[i]) for i in indices)
        ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            seq = self.input_ids[i]
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        labels = torch.tensor([self.labels[i] for i in indices], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    window_batches: int = 50,
    shuffle: bool = True,
    bucket: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> list[list[int]]:
    """Split example indices into batches of similar length.

    Indices are shuffled (seeded by ``seed`` and ``epoch``), then sorted by length
    inside windows of ``window_batches`` batches, cut into batches, and the batch
    order is shuffled again, so every epoch sees a different but reproducible order
    with little padding. With ``world_size > 1`` each rank takes every
    ``world_size``-th batch; batches are dropped at the end so ranks get equal counts.

    Returns:
        Lists of example indices, one per batch.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if bucket:
        window = batch_size * window_batches
        order = [
            i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lengths.__getitem__)
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    if world_size > 1:
        usable = len(batches) - len(batches) % world_size
        batches = batches[rank:usable:world_size]
    return batches
