"""The model engine of the emotion classifier, without TorchServe: tokenizer, backend, forward
passes by length and softmax.

``EmotionHandler`` runs it for TorchServe. The benchmark's in-process ceiling and the peer servers
(LitServe, Ray Serve; ``bench/peers.py``) run the same object, so every row of ``make bench``
serves the same model with the same engine, tokenizer and passes; only the server differs.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from emotion_backends import Backend, load_backend
from emotion_batch import plan_passes, softmax
from emotion_monitor import known_words
from emotion_settings import HandlerSettings
from emotion_spelling import Speller, load_speller

# The temperature fitted on the validation split (training.calibrate), packed by serving.archive.
CALIBRATION_FILE = "calibration.json"
# A single text and a padded pair: the shapes a dynamic torch.compile specialises on.
WARM_UP_TEXTS = ("i feel fine", "i could not sleep because i was worried about what would happen tomorrow")


class FastTokenizer:
    """A model directory's ``tokenizer.json`` run by the ``tokenizers`` library, which transformers'
    fast tokenizers wrap: the same ids, without importing transformers in the worker (about 1.5 s
    of every worker's start here).

    Special tokens and ``model_max_length`` come from ``tokenizer_config.json``, as transformers
    reads them; without ``model_max_length``, the model's ``max_position_embeddings``.
    """

    is_fast = True

    def __init__(self, model_dir: Path) -> None:
        import tokenizers

        model_dir = Path(model_dir)
        self.backend = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.backend.no_padding()
        config = _read_json(model_dir / "tokenizer_config.json")
        for name in ("pad", "unk", "cls", "sep"):
            token = config.get(f"{name}_token")
            token = token.get("content") if isinstance(token, dict) else token
            setattr(self, f"{name}_token_id", self.backend.token_to_id(token) if token else None)
        length = config.get("model_max_length")
        if not isinstance(length, int) or length > 1_000_000:  # transformers' "no limit" sentinel
            length = _read_json(model_dir / "config.json").get("max_position_embeddings", 512)
        self.model_max_length = int(length)

    def encode(self, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
        """Ids of each text with the model's special tokens, cut to ``max_length`` tokens, and
        whether each was cut (it had tokens left over)."""
        self.backend.enable_truncation(max_length)
        encodings = self.backend.encode_batch(texts)
        return [e.ids for e in encodings], [bool(e.overflowing) for e in encodings]

    def windows(self, texts: list[str], max_length: int, overlap: int) -> list[list[list[int]]]:
        """Each text's windows of ``max_length`` tokens, each with the model's special tokens and
        sharing ``overlap`` tokens of the text with the window before it."""
        self.backend.enable_truncation(max_length, stride=overlap)
        try:
            encodings = self.backend.encode_batch(texts)
        finally:
            self.backend.enable_truncation(max_length)
        return [[e.ids, *(o.ids for o in e.overflowing)] for e in encodings]

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """Every token of the vocabulary and its id."""
        return self.backend.get_vocab()


class TransformersTokenizer:
    """transformers' AutoTokenizer behind ``FastTokenizer``'s ``encode``, for a model directory
    without ``tokenizer.json`` (only ``vocab.txt``: a slow tokenizer). Other attributes are the
    wrapped tokenizer's."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.wrapped = AutoTokenizer.from_pretrained(model_dir)

    def __getattr__(self, name: str):
        return getattr(self.wrapped, name)

    def encode(self, texts: list[str], max_length: int) -> tuple[list[list[int]], list[bool]]:
        """As ``FastTokenizer.encode``."""
        encoded = self.wrapped(
            texts, truncation=True, max_length=max_length, return_overflowing_tokens=self.wrapped.is_fast
        )
        if not self.wrapped.is_fast:  # slow tokenizers have no overflow mapping: count untruncated
            full = self.wrapped(texts)["input_ids"]
            return encoded["input_ids"], [len(ids) > max_length for ids in full]
        rows: dict[int, list[int]] = {}
        truncated = [False] * len(texts)
        for row, sample in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"], strict=True):
            if sample in rows:  # an overflow row: the text did not fit in the window
                truncated[sample] = True
            else:
                rows[sample] = row
        return [rows[k] for k in range(len(texts))], truncated


def load_tokenizer(model_dir: Path) -> FastTokenizer | TransformersTokenizer:
    """``FastTokenizer`` on ``tokenizer.json``; transformers' tokenizer when there is none."""
    if (Path(model_dir) / "tokenizer.json").is_file():
        return FastTokenizer(model_dir)
    return TransformersTokenizer(model_dir)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_temperature(path: Path) -> float:
    """The softmax temperature in a calibration file (``CALIBRATION_FILE`` in an archive); 1 (the
    logits as the model gives them) when there is no such file.

    Raises:
        ValueError: The file is there but holds no positive finite ``temperature``.
    """
    path = Path(path)
    if not path.is_file():
        return 1.0
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("temperature")
    except (ValueError, AttributeError):
        value = None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{path}: temperature must be a positive finite number, got {value!r}")
    return float(value)


class EmotionEngine:
    """Tokenizer and backend loaded from a model directory (an unpacked archive or a training output).

    Attributes:
        model: The backend (``emotion_backends``): int64 ids and mask in, float32 logits out.
        labels: Label names in the model's output order (``id2label``).
        max_length: Truncation length in tokens.
        temperature: The logits are divided by it before the softmax (``calibration.json`` in the
            model directory, else the ``temperature`` argument, else 1).
    """

    def __init__(
        self,
        model_dir: Path,
        settings: HandlerSettings,
        device: torch.device | None = None,
        temperature: float | None = None,
    ) -> None:
        self.settings = settings
        self.temperature = read_temperature(Path(model_dir) / CALIBRATION_FILE) if temperature is None else temperature
        self.tokenizer = load_tokenizer(model_dir)
        self.max_length = settings.max_length or self.tokenizer.model_max_length
        if settings.long_texts == "chunk" and not hasattr(self.tokenizer, "windows"):
            raise ValueError("handler.long_texts: chunk needs a fast tokenizer (tokenizer.json in the model directory)")
        self.pad_token_id = self.tokenizer.pad_token_id or 0
        self.speller: Speller | None = (
            load_speller(Path(model_dir), known_words(self.tokenizer.get_vocab())) if settings.correct_typos else None
        )
        self.model: Backend = load_backend(Path(model_dir), settings, device or torch.device("cpu"))
        config = self.model.config
        self.labels = [config.id2label[i] for i in range(config.num_labels)]

    def token_ids(self, texts: list[str]) -> tuple[list[list[int]], list[bool]]:
        """Token ids of each text (its typos corrected, :meth:`read`), truncated to ``max_length``,
        and whether each was truncated."""
        return self.tokenizer.encode(self.read(texts), self.max_length)

    def read(self, texts: list[str]) -> list[str]:
        """The texts as the model reads them: with ``correct_typos`` and a word list in the model
        directory, each word one typo away from a known word replaced by it; else as written."""
        return texts if self.speller is None else self.speller.correct_all(texts)

    def windows(self, texts: list[str]) -> tuple[list[list[list[int]]], list[bool]]:
        """With ``long_texts: chunk``, each text's windows (``max_chunks`` at most), and whether
        it had more; else each text's one window (:meth:`token_ids`)."""
        if self.settings.long_texts != "chunk":
            token_ids, truncated = self.token_ids(texts)
            return [[ids] for ids in token_ids], truncated
        windows = self.tokenizer.windows(self.read(texts), self.max_length, self.chunk_overlap)
        cap = self.settings.max_chunks
        return [w[:cap] for w in windows], [len(w) > cap for w in windows]

    @property
    def chunk_overlap(self) -> int:
        """Tokens a window shares with the one before (leaving at least one new token in each)."""
        return min(self.settings.chunk_overlap, self.max_length - 3)

    def window_weights(self, windows: list[list[int]]) -> list[float]:
        """A text's windows' weights in its answer: the tokens each adds to the ones before."""
        return [float(max(1, len(w) - (self.chunk_overlap if i else 0))) for i, w in enumerate(windows)]

    def passes(self, lengths: list[int]) -> list[list[int]]:
        """The forward passes (index lists into ``lengths``) for texts of these token counts: one
        text per pass where the backend's answers depend on a pass's other texts and
        ``isolate_texts`` is set, else by length (``sort_by_length``) or all in one."""
        if self.settings.isolate_texts and not self.model.batch_invariant:
            return [[i] for i in range(len(lengths))]
        if self.settings.sort_by_length:
            return plan_passes(lengths, self.settings.pass_cost_tokens)
        return [list(range(len(lengths)))]

    def forward(self, token_ids: list[list[int]]) -> tuple[np.ndarray, float]:
        """One forward pass of the token sequences, padded to the longest: their label
        probabilities (softmax) and the milliseconds the model took."""
        input_ids, attention_mask = self.pad(token_ids)
        start = time.perf_counter()
        logits = self.model(input_ids, attention_mask)
        model_ms = 1000 * (time.perf_counter() - start)
        return softmax(logits, self.temperature), model_ms

    def pad(self, token_ids: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """The model's int64 ``input_ids`` and ``attention_mask`` for sequences padded to the longest."""
        longest = max(len(ids) for ids in token_ids)
        input_ids = np.full((len(token_ids), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(token_ids), longest), dtype=np.int64)
        for row, ids in enumerate(token_ids):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask

    def warm_up(self) -> None:
        """Forward passes before serving: torch.compile compiles here (minutes on a small CPU)
        instead of on the first requests; the other backends allocate their buffers."""
        for texts in (WARM_UP_TEXTS[:1], WARM_UP_TEXTS):
            self.forward(self.token_ids(list(texts))[0])

    def predict(self, texts: list[str], abstain_below: float | None = None) -> list[dict]:
        """Answers for valid texts, in order, as the handler gives them (label, score,
        probabilities, truncated, abstained), abstaining below ``abstain_below`` (default the
        settings'). No per-text fault isolation: that is the handler's job."""
        threshold = self.settings.abstain_below if abstain_below is None else abstain_below
        token_ids, truncated = self.token_ids(texts)
        probabilities: list[list[float]] = [[]] * len(texts)
        for rows in self.passes([len(ids) for ids in token_ids]):
            result, _ = self.forward([token_ids[i] for i in rows])
            for i, row in zip(rows, result.tolist(), strict=True):
                probabilities[i] = row
        return [self.answer(row, cut, threshold) for row, cut in zip(probabilities, truncated, strict=True)]

    def answer(self, probabilities: list[float], truncated: bool, abstain_below: float = 0.0) -> dict:
        """The response body for one text's probabilities: its top label and score, or, when the
        score is below ``abstain_below``, ``"label": null`` and ``"abstained": true`` (the score
        and every probability are still there)."""
        best = max(range(len(probabilities)), key=probabilities.__getitem__)
        abstained = probabilities[best] < abstain_below
        return {
            "label": None if abstained else self.labels[best],
            "score": probabilities[best],
            "probabilities": dict(zip(self.labels, probabilities, strict=True)),
            "truncated": truncated,
            "abstained": abstained,
        }


def oip_answer(
    answers: list[dict[str, Any]],
    labels: list[str],
    outputs: tuple[str, ...],
    infer_id: str | None,
    model_name: str,
    model_version: str,
) -> dict[str, Any]:
    """The Open Inference Protocol v2 answer to an infer request of ``len(answers)`` texts.

    ``answers`` holds each text's answer (:meth:`EmotionEngine.answer`) or its error body. The
    outputs are columns over the texts: ``label`` (BYTES [N]; "" for a text that abstained or
    failed), ``score`` (FP32 [N]), ``probabilities`` (FP32 [N, labels], in ``labels``' order;
    zeros for a failed text) and ``error`` (BYTES [N]; the failed text's message, else ""). Only
    ``outputs`` are sent, in that order; all of them when it is empty.
    """
    good = [None if "error" in a else a for a in answers]
    n = len(answers)
    columns = {
        "label": ("BYTES", [n], [a["label"] or "" if a else "" for a in good]),
        "score": ("FP32", [n], [a["score"] if a else 0.0 for a in good]),
        "probabilities": (
            "FP32",
            [n, len(labels)],
            [a["probabilities"][k] if a else 0.0 for a in good for k in labels],
        ),
        "error": ("BYTES", [n], ["" if a else e["message"] for a, e in zip(good, answers, strict=True)]),
    }
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if infer_id is not None:
        body["id"] = infer_id
    body["outputs"] = [
        {"name": name, "datatype": columns[name][0], "shape": columns[name][1], "data": columns[name][2]}
        for name in (outputs or tuple(columns))
    ]
    return body
