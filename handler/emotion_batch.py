"""One TorchServe batch inside the handler, how it is cut into forward passes, and the softmax
that turns a pass's logits into probabilities."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from emotion_inputs import InputError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of ``logits / temperature`` (temperature scaling, fitted by
    ``training.calibrate``), shifted by each row's maximum so that no exponential overflows."""
    logits = logits / temperature if temperature != 1.0 else logits
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class Batch:
    """One TorchServe batch on its way through the handler's preprocess, inference and postprocess.

    (Kept out of the handler module: TorchServe requires that module to define one class.)
    """

    size: int
    texts: dict[int, str] = field(default_factory=dict)  # request index -> text
    errors: dict[int, InputError] = field(default_factory=dict)
    probabilities: dict[int, list[float]] = field(default_factory=dict)
    truncated: set[int] = field(default_factory=set)  # texts longer than the model's token window
    probes: set[int] = field(default_factory=set)  # readiness probes: answered, not counted as traffic
    abstain_below: dict[int, float] = field(default_factory=dict)  # request index -> its threshold
    request_ids: dict[int, str] = field(default_factory=dict)  # request index -> its id


def plan_passes(lengths: list[int], pass_cost_tokens: int) -> list[list[int]]:
    """Split a batch into forward passes that waste little compute on padding.

    ``lengths`` are the texts' token counts. Every text in a pass is padded to the pass's longest,
    so the cost of a pass is modelled as ``pass_cost_tokens + texts * longest``: the padded tokens
    it computes plus a fixed cost per pass (framework overhead and smaller, less efficient matrix
    products), expressed in tokens. The texts are sorted by length and cut into contiguous runs that
    minimise the total cost (exact, by dynamic programming over the sorted order: O(n^2) for n
    texts, a few microseconds for a TorchServe batch). A cost of 0 runs every distinct length on
    its own; a large cost keeps the batch whole.

    Returns the passes as lists of indices into ``lengths``, shortest texts first.

    Raises:
        ValueError: ``pass_cost_tokens`` is negative.
    """
    if pass_cost_tokens < 0:
        raise ValueError(f"pass_cost_tokens must be >= 0, not {pass_cost_tokens}")
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best = [0] + [0] * len(order)  # best[j]: least cost of the first j sorted texts
    cut = [0] * (len(order) + 1)  # cut[j]: where the last pass of that best split starts
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        best[end], cut[end] = min(
            (best[start] + pass_cost_tokens + (end - start) * longest, start) for start in range(end)
        )
    passes = []
    end = len(order)
    while end > 0:
        passes.append(order[cut[end] : end])
        end = cut[end]
    return passes[::-1]
