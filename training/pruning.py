"""Structured pruning: drop whole encoder layers from a (fine-tuned) transformer classifier.

Removing the top layers of a fine-tuned BERT-style encoder and fine-tuning briefly keeps
most of its accuracy while every forward pass runs fewer layers. ``model.keep_layers``
in the Hydra config applies it when the model is built (``experiment=pruned``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def keep_bottom_layers(model: torch.nn.Module, count: int) -> torch.nn.Module:
    """Keep the ``count`` lowest encoder layers of ``model`` (in place) and record it in its config.

    Raises:
        ValueError: ``count`` is not between 1 and the model's layer count, or the model has no
            ``encoder.layer`` list (BERT, RoBERTa, MiniLM and similar have one).
    """
    encoder = getattr(model.base_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no encoder.layer list to prune")
    if not 1 <= count <= len(layers):
        raise ValueError(f"keep_layers must be between 1 and {len(layers)}, got {count}")
    encoder.layer = torch.nn.ModuleList(list(layers)[:count])
    model.config.num_hidden_layers = count
    log.info("pruned encoder from %d to %d layers", len(layers), count)
    return model
