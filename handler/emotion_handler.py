"""TorchServe handler for the emotion classifier.

Everything is loaded from the archive's model directory: weights, tokenizer,
and the label order (``id2label`` in the model config). The whole TorchServe
batch is tokenised at once, padded per forward pass, run by the configured
backend (PyTorch or ONNX Runtime) and turned into probabilities with softmax. A request
that cannot be read gets its own 4xx answer; the rest of the batch is served.

Response for each good request::

    {"label": "joy", "score": 0.97, "probabilities": {"sadness": 0.01, ..., "surprise": 0.0}}
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from emotion_backends import HandlerSettings, load_backend
from emotion_inputs import Batch, InputError, extract_text, plan_passes
from emotion_metrics import EmotionMetrics
from emotion_monitor import EmotionMonitor, make_records
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
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.model = load_backend(model_dir, self.settings, self.device)
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]
        self._warm_up()
        self.emotion_metrics = EmotionMetrics(context.metrics, context.model_name)
        self.monitor = EmotionMonitor.from_settings(self.emotion_metrics, self.labels, self.settings)
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
        """Tokenise the valid texts together and compute their label probabilities.

        With ``sort_by_length`` the batch runs as several forward passes of texts of similar length
        (see ``plan_passes``); otherwise as one pass padded to its longest text.
        """
        if not batch.texts:
            return batch
        indices = list(batch.texts)
        start = time.perf_counter()
        texts = [batch.texts[i] for i in indices]
        token_ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        tokenize_ms = 1000 * (time.perf_counter() - start)
        lengths = [len(ids) for ids in token_ids]
        if self.settings.sort_by_length:
            passes = plan_passes(lengths, self.settings.pass_cost_tokens)
        else:
            passes = [list(range(len(indices)))]
        model_ms = 0.0
        for rows in passes:
            probabilities, pass_ms = self._forward([token_ids[k] for k in rows])
            model_ms += pass_ms
            for k, row in zip(rows, probabilities.tolist(), strict=True):
                batch.probabilities[indices[k]] = row
        self.emotion_metrics.batch(sum(lengths), tokenize_ms, model_ms)
        probabilities = [batch.probabilities[i] for i in indices]
        unk_id = self.tokenizer.unk_token_id
        self.monitor.observe_batch(make_records(texts, token_ids, probabilities, self.labels, unk_id, self.max_length))
        return batch

    def postprocess(self, batch: Batch) -> list[str]:
        """One JSON body per request, in request order, with per-request status codes."""
        responses = []
        labels, rejected = Counter(), Counter()
        for idx in range(batch.size):
            if idx in batch.errors:
                error = batch.errors[idx]
                self.context.set_response_status(code=error.status, phrase=error.kind, idx=idx)
                rejected[error.kind] += 1
                body = error.to_response()
            else:
                row = batch.probabilities[idx]
                best = max(range(len(row)), key=row.__getitem__)
                labels[self.labels[best]] += 1
                body = {
                    "label": self.labels[best],
                    "score": row[best],
                    "probabilities": dict(zip(self.labels, row, strict=True)),
                }
            self.context.set_response_content_type(idx, "application/json")
            responses.append(json.dumps(body))
        self.emotion_metrics.predictions(labels)
        self.emotion_metrics.rejected(rejected)
        return responses

    def _warm_up(self) -> None:
        """Forward passes at load time, inside TorchServe's startupTimeout: torch.compile compiles
        here (minutes on a small CPU) instead of on the first requests, which would exceed
        responseTimeout; the other backends allocate their buffers."""
        for texts in (WARM_UP_TEXTS[:1], WARM_UP_TEXTS):
            self._forward(self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"])

    def _forward(self, token_ids: list[list[int]]) -> tuple[np.ndarray, float]:
        """One forward pass of the token sequences, padded to the longest: their label
        probabilities (softmax) and the milliseconds the model took."""
        longest = max(len(ids) for ids in token_ids)
        input_ids = np.full((len(token_ids), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        start = time.perf_counter()
        logits = self.model(input_ids, attention_mask)
        model_ms = 1000 * (time.perf_counter() - start)
        exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return exp / exp.sum(axis=-1, keepdims=True), model_ms

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
