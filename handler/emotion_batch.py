"""One TorchServe batch inside the handler, how it is cut into forward passes, and the softmax
that turns a pass's logits into probabilities."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from emotion_inputs import Carried, InputError


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Probabilities over the last axis of ``logits / temperature`` (temperature scaling, fitted by
    ``training.calibrate``), shifted by each row's maximum so that no exponential overflows."""
    logits = logits / temperature if temperature != 1.0 else logits
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def mean_of_windows(probabilities: np.ndarray, weights: list[list[float]]) -> np.ndarray:
    """One row per text: the weighted mean of its windows' probabilities (``weights``: one list per
    text, one weight per window, its rows consecutive in ``probabilities``).

    The mean of probability vectors is one too. Weighted by the tokens each window adds (its
    length, less the overlap with the window before), every token of a text counts once: a text of
    two equal halves with different emotions gets both in equal measure, and one confident window
    cannot outvote the rest, as the window-wise maximum would let it.
    """
    rows, start = [], 0
    for text in weights:
        w = np.asarray(text, dtype=np.float64)
        rows.append((probabilities[start : start + len(w)] * w[:, None]).sum(axis=0) / w.sum())
        start += len(w)
    return np.stack(rows)


@dataclass
class Batch:
    """One TorchServe batch on its way through the handler's preprocess, inference and postprocess.

    A request carries one text or several (a list, an OIP infer request): each text is an *item*,
    numbered across the batch, and tokenised, run and answered on its own; the items of a request
    are answered together. (Kept out of the handler module: TorchServe requires that module to
    define one class.)
    """

    size: int  # requests
    texts: dict[int, str] = field(default_factory=dict)  # item -> text
    errors: dict[int, InputError] = field(default_factory=dict)  # item -> the error it gets alone
    probabilities: dict[int, list[float]] = field(default_factory=dict)  # item -> probabilities
    truncated: set[int] = field(default_factory=set)  # items longer than the model's token window
    windows: dict[int, list[list[int]]] = field(default_factory=dict)  # item -> its windows after the first
    owners: list[tuple[int, int]] = field(default_factory=list)  # item -> (request, position in it)
    items: dict[int, list[int]] = field(default_factory=dict)  # request -> its items, in order
    carried: dict[int, Carried] = field(default_factory=dict)  # request -> what it carries
    failed: dict[int, InputError] = field(default_factory=dict)  # request -> the error that answers it
    probes: set[int] = field(default_factory=set)  # readiness probes: answered, not counted as traffic
    abstain_below: dict[int, float] = field(default_factory=dict)  # request -> its threshold
    request_ids: dict[int, str] = field(default_factory=dict)  # request -> its id

    def add(self, request: int, carried: Carried) -> None:
        """The texts ``request`` carries, as items (a text's own error set aside with it)."""
        self.carried[request] = carried
        self.items[request] = list(range(len(self.owners), len(self.owners) + len(carried.texts)))
        for position, text in enumerate(carried.texts):
            item = len(self.owners)
            self.owners.append((request, position))
            if isinstance(text, InputError):
                self.errors[item] = text
            else:
                self.texts[item] = text

    def request_of(self, item: int) -> int:
        return self.owners[item][0]

    def item_id(self, item: int) -> str | None:
        """The id an item's answer carries and the request log keeps: its request's id for one
        text; ``<id>.<position>`` for a text of a list (the id cut to keep it within 64 characters)."""
        request, position = self.owners[item]
        rid = self.request_ids.get(request)
        if rid is None or self.carried[request].form == "text":
            return rid
        suffix = f".{position}"
        return rid[: 64 - len(suffix)] + suffix


@dataclass
class Tally:
    """What one batch's answers count for the metrics: labels given, errors by type, abstentions."""

    labels: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    abstained: int = 0


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
