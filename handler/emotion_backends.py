"""The model backends the emotion handler can run, by name: PyTorch (``torch``: fp32, bf16, int8;
fp16 on a GPU) and ONNX Runtime (``onnx``: fp32, int8; ``emotion_onnx``).

Every backend is called with int64 ``input_ids`` and ``attention_mask`` arrays and returns float32
logits as a NumPy array, and provides ``export``: the files it needs packed into the archive beside
the model (``serving.archive`` runs it when the archive is built).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from emotion_onnx import ExportError, OnnxBackend
from emotion_settings import HandlerSettings

log = logging.getLogger(__name__)

__all__ = ["BACKENDS", "Backend", "ExportError", "OnnxBackend", "TorchBackend", "load_backend"]


class Backend(Protocol):
    """What the handler needs of a backend: the model's config (``id2label``), a forward pass, and
    whether a text's logits are the same whatever else its pass holds (``batch_invariant``)."""

    config: object
    batch_invariant: bool

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...


class TorchBackend:
    """A Hugging Face sequence classifier in the requested precision."""

    reads_weights = True  # the archive must carry model.safetensors

    def __init__(self, model_dir: Path, settings: HandlerSettings, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        model.eval()
        if device.type == "cuda":
            model = model.half()
        elif settings.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif settings.precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        # Dynamic int8 quantises each Linear's input with one scale for the whole pass.
        self.batch_invariant = not (device.type == "cpu" and settings.precision == "int8")
        self.model = model.to(device)
        self.forward = torch.compile(self.model, dynamic=True) if settings.compile else self.model
        self.device = device
        self.config = model.config
        log.info("torch backend: %s on %s", settings.precision if device.type == "cpu" else "fp16", device)

    @staticmethod
    def export(model_dir: Path, out_dir: Path, settings: HandlerSettings) -> list[Path]:
        """Nothing to build: the backend loads the model directory's weights as they are."""
        return []

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.forward(
                input_ids=torch.from_numpy(input_ids).to(self.device),
                attention_mask=torch.from_numpy(attention_mask).to(self.device),
            ).logits
        return logits.float().cpu().numpy()


# handler.backend -> its class; emotion_settings.BACKEND_PRECISIONS names the same backends.
BACKENDS: dict[str, type[TorchBackend] | type[OnnxBackend]] = {"torch": TorchBackend, "onnx": OnnxBackend}


def load_backend(model_dir: Path, settings: HandlerSettings, device: torch.device) -> Backend:
    """The backend ``settings`` ask for; a GPU always gets the torch backend in fp16."""
    if device.type != "cpu" and settings.backend != "torch":
        log.warning("%s backend is CPU-only here: running torch in fp16 on %s", settings.backend, device)
        return TorchBackend(model_dir, settings, device)
    return BACKENDS[settings.backend](model_dir, settings, device)
