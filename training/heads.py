"""Fitting a pretrained checkpoint's classification head to the dataset's labels.

A checkpoint may already carry a sequence-classification head: a model this project trained, or
one from the hub trained on the same six emotions in another order, or on other labels altogether.
Imposing the dataset's ``id2label`` on it would rename its output rows without moving them, so a
head trained on these labels in another order would answer "joy" for what it learned as
"sadness". Instead:

* a head over exactly these labels (in any order, names compared case-insensitively) is kept, its
  rows permuted into the dataset's order;
* a head over other labels is dropped and a fresh one trained, with a warning that names them;
* a checkpoint without a head (the plain sentence encoders) gets a fresh one, as usual.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)


def trained_head_labels(config: Any) -> list[str] | None:
    """The label names of the checkpoint's classification head, in its row order; None when the
    checkpoint has no such head (no ``*ForSequenceClassification`` architecture, or only the
    placeholder names ``LABEL_0``, ``LABEL_1``, ... that mark an untrained one)."""
    architectures = getattr(config, "architectures", None) or []
    if not any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return None
    id2label = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
    names = [id2label.get(i, f"LABEL_{i}") for i in range(len(id2label))]
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def head_order(head_labels: Sequence[str], labels: Sequence[str]) -> list[int] | None:
    """For each of ``labels``, the index of its row in a head over ``head_labels``; None when the
    two are not the same set of names (compared case-insensitively)."""
    position = {name.casefold(): i for i, name in enumerate(head_labels)}
    if len(position) != len(head_labels) or len(head_labels) != len(labels):
        return None
    if set(position) != {name.casefold() for name in labels}:
        return None
    return [position[name.casefold()] for name in labels]


def output_layer(model: torch.nn.Module, num_labels: int) -> torch.nn.Linear:
    """The head's last linear layer (one output row per label): BERT's ``classifier``, RoBERTa's
    and MPNet's ``classifier.out_proj``, DistilBERT's ``classifier``."""
    found = [m for _, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_labels]
    if not found:
        raise ValueError(f"no linear layer with {num_labels} outputs in {type(model).__name__}")
    return found[-1]


@torch.no_grad()
def permute_head(model: torch.nn.Module, order: Sequence[int]) -> None:
    """Reorder the output rows of the model's head so that row ``i`` is the old row ``order[i]``."""
    layer = output_layer(model, len(order))
    index = torch.tensor(list(order), dtype=torch.long, device=layer.weight.device)
    layer.weight.copy_(layer.weight.index_select(0, index))
    if layer.bias is not None:
        layer.bias.copy_(layer.bias.index_select(0, index))


@torch.no_grad()
def reset_layer(layer: torch.nn.Linear, std: float) -> None:
    """A fresh output layer, as transformers initialises one: weights from N(0, std), zero bias.
    Done here because transformers leaves a layer alone once it has loaded it from the checkpoint,
    which it does when the old head happens to have as many rows as the new one."""
    layer.weight.normal_(0.0, std or 0.02)
    if layer.bias is not None:
        layer.bias.zero_()


def load_classifier(pretrained: str, labels: Sequence[str], **model_kwargs: Any):
    """``AutoModelForSequenceClassification`` from ``pretrained`` with one output row per label of
    ``labels``, in that order, and those names in its config (see the module docstring)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    head_labels = trained_head_labels(AutoConfig.from_pretrained(pretrained))
    order = head_order(head_labels, labels) if head_labels is not None else None
    model_kwargs = {"use_safetensors": True, **model_kwargs}  # never a pickle, which loading would run
    names = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if order is not None:
        model = AutoModelForSequenceClassification.from_pretrained(pretrained, **model_kwargs)
        permute_head(model, order)
        model.config.id2label, model.config.label2id = names["id2label"], names["label2id"]
        if order != list(range(len(order))):
            log.info("the checkpoint's head had the labels in the order %s; rows reordered to %s", head_labels, labels)
        return model
    if head_labels is not None:
        log.warning(
            "the checkpoint's classification head is for the labels %s, not %s: it is replaced by a new head",
            head_labels,
            list(labels),
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            pretrained, **names, ignore_mismatched_sizes=True, **model_kwargs
        )
        reset_layer(output_layer(model, len(labels)), getattr(model.config, "initializer_range", 0.02))
        return model
    return AutoModelForSequenceClassification.from_pretrained(pretrained, **names, **model_kwargs)
