"""Model backends the emotion handler can run: PyTorch (fp32, bf16, int8, fp16 on GPU)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler`` section of ``model-config.yaml``; every key is optional.

    Attributes:
        precision: ``fp32``, ``bf16`` (AMX on CPUs that have it) or ``int8`` (dynamic quantisation).
            On a GPU the model always runs in fp16.
        max_length: Truncation length in tokens; default the model directory's tokenizer setting.
        max_text_chars: Longest accepted text; longer ones get a 413.
        threads: torch intra-op threads per worker; ``0`` keeps torch's default.
        sort_by_length: Sort the batch by text length (characters, a cheap proxy for tokens) and
            run it in micro-batches of ``micro_batch_size`` texts, so short texts are not padded
            to the longest.
        micro_batch_size: See ``sort_by_length``.
        compile: Wrap the model in ``torch.compile`` (first requests pay the compile time).
    """

    precision: str = "fp32"
    max_length: int | None = None
    max_text_chars: int = 2000
    threads: int = 0
    sort_by_length: bool = False
    micro_batch_size: int = 16
    compile: bool = False

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        """Build from the YAML section, rejecting unknown keys and values with a clear message."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler section: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**section)
        if settings.precision not in PRECISIONS:
            raise ValueError(f"handler.precision must be one of {PRECISIONS}, not {settings.precision!r}")
        return settings


class TorchBackend:
    """A Hugging Face sequence classifier in the requested precision, returning float32 logits."""

    def __init__(self, model_dir: Path, settings: HandlerSettings, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        model.eval()
        self.autocast_dtype: torch.dtype | None = None
        if device.type == "cuda":
            model = model.half()
        elif settings.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif settings.precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(device)
        self.forward = torch.compile(self.model, dynamic=True) if settings.compile else self.model
        self.device = device
        self.config = model.config
        log.info("torch backend: %s on %s", settings.precision if device.type == "cpu" else "fp16", device)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.forward(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            ).logits
        return logits.float().cpu()
