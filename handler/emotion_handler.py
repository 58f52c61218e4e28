"""TorchServe handler for the emotion classifier.

Everything is loaded from the archive's model directory: weights, tokenizer,
and the label order (``id2label`` in the model config). The whole TorchServe
batch is tokenised at once with dynamic padding, run under
``torch.inference_mode`` and turned into probabilities with softmax. A request
that cannot be read gets its own 4xx answer; the rest of the batch is served.

Response for each good request::

    {"label": "joy", "score": 0.97, "probabilities": {"sadness": 0.01, ..., "surprise": 0.0}}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from emotion_backends import HandlerSettings, load_backend
from emotion_inputs import Batch, InputError, extract_text
from emotion_metrics import EmotionMetrics
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)

# A single text and a padded pair: the shapes a dynamic torch.compile specialises on.
WARM_UP_TEXTS = ("i feel fine", "i could not sleep because i was worried about what would happen tomorrow")


class EmotionHandler(BaseHandler):
    """Tokenisation, batched inference and softmax for the six emotion labels."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = HandlerSettings()
        self.labels: list[str] = []

    def initialize(self, context) -> None:
        """Load tokenizer and model from ``model_dir`` and read the handler settings."""
        from transformers import AutoTokenizer

        self.context = context
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.settings = HandlerSettings.from_yaml(yaml_config.get("handler"))
        gpu_id = properties.get("gpu_id")
        use_cuda = gpu_id is not None and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        if self.settings.threads > 0:
            torch.set_num_threads(self.settings.threads)

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.max_length = self.settings.max_length or self.tokenizer.model_max_length
        self.model = load_backend(model_dir, self.settings, self.device)
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self._warm_up()
        self.emotion_metrics = EmotionMetrics(context.metrics, context.model_name)
        self.initialized = True
        log.info(
            "emotion handler ready: labels %s, max_length %d, %d thread(s)",
            self.labels,
            self.max_length,
            torch.get_num_threads(),
        )

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        """Read one text per request; unreadable requests are set aside with their error."""
        batch = Batch(size=len(data))
        for idx, request in enumerate(data):
            try:
                batch.texts[idx] = extract_text(request, self._content_type(idx), self.settings.max_text_chars)
            except InputError as err:
                batch.errors[idx] = err
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        """Tokenise the valid texts together and compute their label probabilities."""
        if not batch.texts:
            return batch
        indices = list(batch.texts)
        texts = [batch.texts[i] for i in indices]
        if self.settings.sort_by_length and len(texts) > self.settings.micro_batch_size:
            order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
            step = self.settings.micro_batch_size
            groups = [order[s : s + step] for s in range(0, len(order), step)]
        else:
            groups = [list(range(len(texts)))]
        for group in groups:
            probabilities = self._probabilities([texts[k] for k in group])
            for k, row in zip(group, probabilities.tolist(), strict=True):
                batch.probabilities[indices[k]] = row
        return batch

    def postprocess(self, batch: Batch) -> list[str]:
        """One JSON body per request, in request order, with per-request status codes."""
        responses = []
        for idx in range(batch.size):
            if idx in batch.errors:
                error = batch.errors[idx]
                self.context.set_response_status(code=error.status, phrase=error.kind, idx=idx)
                self.emotion_metrics.rejected(error.kind)
                body = error.to_response()
            else:
                row = batch.probabilities[idx]
                best = max(range(len(row)), key=row.__getitem__)
                self.emotion_metrics.prediction(self.labels[best])
                body = {
                    "label": self.labels[best],
                    "score": row[best],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
            self.context.set_response_content_type(idx, "application/json")
            responses.append(json.dumps(body))
        return responses

    def _warm_up(self) -> None:
        """Forward passes at load time, inside TorchServe's startupTimeout: torch.compile compiles
        here (minutes on a small CPU) instead of on the first requests, which would exceed
        responseTimeout; the other backends allocate their buffers."""
        for texts in (WARM_UP_TEXTS[:1], WARM_UP_TEXTS):
            encoded = self.tokenizer(
                list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            self.model(encoded["input_ids"], encoded["attention_mask"])

    def _probabilities(self, texts: list[str]) -> torch.Tensor:
        start = time.perf_counter()
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        tokenized = time.perf_counter()
        logits = self.model(encoded["input_ids"], encoded["attention_mask"])
        done = time.perf_counter()
        tokens = int(encoded["attention_mask"].sum())
        self.emotion_metrics.batch(tokens, 1000 * (tokenized - start), 1000 * (done - tokenized))
        return torch.softmax(logits, dim=-1)

    def _content_type(self, idx: int) -> str | None:
        """The body's content type as TorchServe recorded it (parameter- or request-level)."""
        try:
            headers = self.context.get_all_request_header(idx) or {}
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
        for name in ("body", "data"):
            if isinstance(headers.get(name), dict):
                return headers[name].get("content-type")
        for key, value in headers.items():
            if key.lower() == "content-type":
                return value
        return None
