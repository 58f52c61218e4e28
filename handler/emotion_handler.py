"""TorchServe handler for the emotion classifier.

Everything is loaded from the archive's model directory: weights, tokenizer,
and the label order (``id2label`` in the model config). The whole TorchServe
batch is tokenised at once, padded per forward pass, run by the configured
backend (PyTorch or ONNX Runtime) and turned into probabilities with softmax.

No request can change another's answer: a request that cannot be read, tokenised or run gets
its own 4xx answer and the rest of the batch is served; client headers cannot switch the
handler into another mode (``handle`` is this class's own).

Response for each good request (``truncated``: the text was longer than the model's window and
only its beginning was classified)::

    {"label": "joy", "score": 0.97, "probabilities": {"sadness": 0.01, ..., "surprise": 0.0},
     "truncated": false, "abstained": false, "request_id": "6f1c..."}

A request with a list ``{"texts": [...]}`` gets ``{"predictions": [...], "request_id": ...}``:
one such answer per text, or that text's own error (``code``, ``type``, ``message``), each with
the id ``<request_id>.<position>``. An Open Inference Protocol v2 infer request gets an OIP
answer (:func:`emotion_engine.oip_answer`).

Every answer, errors too, carries its ``request_id``: the request's ``X-Request-ID`` when valid
(the gateway sends one with every request), else TorchServe's own id; the request log has it too.

The probabilities are temperature-scaled when the archive packs a ``calibration.json``
(``training.calibrate``). Below the deployment's ``abstain_below``, or the request's
``X-Emotion-Abstain-Below`` header, the answer is ``"label": null, "abstained": true``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import torch
from emotion_batch import Batch, Tally, mean_of_windows
from emotion_cpuinfo import detect, worker_threads
from emotion_engine import WARM_UP_TEXTS, EmotionEngine, oip_answer
from emotion_errors import error_body
from emotion_inputs import InputError, abstain_threshold, is_probe, read_request, request_id
from emotion_metrics import EmotionMetrics
from emotion_monitor import EmotionMonitor, known_words, make_records
from emotion_settings import HandlerSettings
from ts.torch_handler.base_handler import BaseHandler
from ts.utils.util import PredictionException

log = logging.getLogger(__name__)


class EmotionHandler(BaseHandler):
    """Tokenisation, batched inference and softmax for the six emotion labels."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = HandlerSettings()
        self.labels: list[str] = []

    def initialize(self, context) -> None:
        """Load tokenizer and model from ``model_dir`` and read the handler settings."""
        self.context = context
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.settings = HandlerSettings.from_yaml(yaml_config.get("handler"))
        gpu_id = properties.get("gpu_id")
        use_cuda = gpu_id is not None and torch.cuda.is_available()
        if gpu_id is not None and not use_cuda and torch.version.cuda is not None:
            # A CUDA build of torch on a machine with a GPU that cannot use it (a driver older than
            # the wheel's CUDA runtime, or a driver library it cannot find) would otherwise serve
            # on the CPU at a fraction of the speed, with nothing to show for it but latency.
            raise RuntimeError(
                f"TorchServe assigned GPU {gpu_id}, but this CUDA {torch.version.cuda} build of torch "
                "cannot use it: check the NVIDIA driver (nvidia-smi; it must support this CUDA "
                "version) and that its libraries are on LD_LIBRARY_PATH"
            )
        self.device = torch.device(f"cuda:{gpu_id}" if use_cuda else "cpu")
        cpu = detect()
        log.info("%s", cpu.line())
        threads = worker_threads(self.settings.threads, torch.get_num_threads(), cpu.cgroup_cpus)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)  # also ONNX Runtime's pool size (emotion_onnx.ort_session)

        self.engine = EmotionEngine(model_dir, self.settings, self.device)
        self.labels = self.engine.labels
        self.engine.warm_up()
        self.known_good_ids = self.engine.token_ids([WARM_UP_TEXTS[0]])[0][0]
        # The vocabulary's whole words, once: the unfamiliar-word share (typos) of the drift metrics.
        self.known_words = known_words(self.engine.tokenizer.get_vocab())
        self.emotion_metrics = EmotionMetrics(context.metrics, context.model_name, self.labels)
        self.monitor = EmotionMonitor.from_settings(self.emotion_metrics, self.labels, self.settings)
        manifest = getattr(context, "manifest", None) or {}
        version = (manifest.get("model") or {}).get("modelVersion") if isinstance(manifest, dict) else None
        self.monitor.model_version = str(version) if version is not None else None
        self.initialized = True
        log.info(
            "emotion handler ready: labels %s, max_length %d, %d thread(s), temperature %.3f, abstain below %g",
            self.labels,
            self.engine.max_length,
            torch.get_num_threads(),
            self.engine.temperature,
            self.settings.abstain_below,
        )

    def handle(self, data: list[dict[str, Any]], context) -> list[str]:
        """TorchServe's entry point for one batch: preprocess, inference, postprocess.

        Owned here rather than inherited: BaseHandler's ``handle`` switches to describe or explain
        modes on request headers, which would let one client change the answers of every request
        in its batch. Every request gets exactly one answer, its own.
        """
        start = time.perf_counter()
        self.context = context
        responses = self.postprocess(self.inference(self.preprocess(data)))
        context.metrics.add_time("HandlerTime", round(1000 * (time.perf_counter() - start), 2), None, "ms")
        return responses

    def preprocess(self, data: list[dict[str, Any]]) -> Batch:
        """Read the texts of each request; unreadable requests and texts are set aside with their error."""
        batch = Batch(size=len(data))
        for idx, request in enumerate(data):
            headers = self._headers(idx)
            batch.request_ids[idx] = request_id(headers, self._torchserve_id(idx))
            try:
                if is_probe(headers):
                    batch.probes.add(idx)  # the probe's answer is judged by its label: it never abstains
                else:
                    batch.abstain_below[idx] = abstain_threshold(headers, self.settings.abstain_below)
                batch.add(idx, read_request(request, headers, self.settings.max_text_chars))
            except InputError as err:
                batch.failed[idx] = err
            except Exception:  # a request nobody foresaw still fails alone
                log.exception("request %d of the batch could not be read", idx)
                batch.failed[idx] = InputError("UnreadableInput", "the request could not be read")
        return batch

    def inference(self, batch: Batch, *args, **kwargs) -> Batch:
        """Tokenise the valid texts together and compute their label probabilities.

        With ``sort_by_length`` the batch runs as several forward passes of texts of similar length
        (see ``emotion_batch.plan_passes``); otherwise as one pass padded to its longest text. A text the
        tokenizer or the model fails on fails alone (see ``_tokenize`` and ``_run_pass``).
        """
        start = time.perf_counter()
        token_ids = self._tokenize(batch)
        tokenize_ms = 1000 * (time.perf_counter() - start)
        if not token_ids:
            return batch
        indices = list(token_ids)
        lengths = [len(token_ids[i]) for i in indices]
        passes = [[indices[k] for k in rows] for rows in self.engine.passes(lengths)]
        model_ms = sum(self._run_pass(batch, token_ids, rows) for rows in passes)
        failed = [e for e in batch.errors.values() if e.kind == "UnprocessableText"]
        if failed and not batch.probabilities and not self._model_answers():
            # Not one text went through, and neither does a text it has answered before: the model
            # itself is broken, not the requests (also for a batch of one, the usual at light load).
            raise PredictionException("the model failed on every text of the batch and on a known-good text", 500)
        self.emotion_metrics.batch(sum(lengths), tokenize_ms, model_ms)
        # The readiness probe's golden text is not traffic: it stays out of the drift statistics.
        answered = [i for i in indices if i in batch.probabilities and batch.request_of(i) not in batch.probes]
        records = make_records(
            [batch.texts[i] for i in answered],
            [token_ids[i] for i in answered],
            [batch.probabilities[i] for i in answered],
            self.labels,
            self.engine.tokenizer.unk_token_id,
            [i in batch.truncated for i in answered],
            self.known_words,
            [batch.item_id(i) for i in answered],
        )
        self.monitor.observe_batch(records)
        return batch

    def postprocess(self, batch: Batch) -> list[str]:
        """One JSON body per request, in request order, with per-request status codes."""
        responses = []
        tally = Tally()
        for idx in range(batch.size):
            status, body = self._response(batch, idx, tally)
            if status != 200:
                self.context.set_response_status(code=status, phrase=body["type"], idx=idx)
            body["request_id"] = batch.request_ids.get(idx)
            self.context.set_response_content_type(idx, "application/json")
            responses.append(json.dumps(body))
        self.emotion_metrics.predictions(tally.labels, tally.abstained)
        self.emotion_metrics.rejected(tally.rejected)
        return responses

    def _response(self, batch: Batch, idx: int, tally: Tally) -> tuple[int, dict[str, Any]]:
        """The status and body of request ``idx``: its error, its one answer, its list's answers or
        its OIP answer."""
        if idx in batch.failed:
            return batch.failed[idx].status, _error(batch.failed[idx], tally)
        carried = batch.carried[idx]
        items = batch.items[idx]
        if carried.form == "text":
            (item,) = items
            if item in batch.errors:
                return batch.errors[item].status, _error(batch.errors[item], tally)
            return 200, self._answer(batch, item, tally)
        answers = [
            _error(batch.errors[i], tally) if i in batch.errors else self._answer(batch, i, tally) for i in items
        ]
        for item, answer in zip(items, answers, strict=True):
            answer["request_id"] = batch.item_id(item)
        if carried.form == "list":
            return 200, {"predictions": answers}
        model_name = getattr(self.context, "model_name", None) or ""
        return 200, oip_answer(
            answers, self.labels, carried.outputs, carried.infer_id, model_name, self.monitor.model_version or ""
        )

    def _answer(self, batch: Batch, item: int, tally: Tally) -> dict[str, Any]:
        """One text's answer (counted in ``tally``, unless it is the readiness probe's)."""
        request = batch.request_of(item)
        body = self.engine.answer(
            batch.probabilities[item], item in batch.truncated, batch.abstain_below.get(request, 0.0)
        )
        if request in batch.probes:
            pass
        elif body["abstained"]:
            tally.abstained += 1
        else:
            tally.labels[body["label"]] += 1
        return body

    def _tokenize(self, batch: Batch) -> dict[int, list[int]]:
        """Token ids of each readable text, truncated to the model's window (recorded in
        ``batch.truncated``). The batch is tokenised at once; if that fails, text by text, and a
        text the tokenizer cannot take gets its own 400."""
        indices = list(batch.texts)
        if not indices:
            return {}
        try:
            return dict(zip(indices, self._token_ids(batch, indices), strict=True))
        except Exception:
            log.warning("tokenising the batch failed; tokenising its %d texts one by one", len(indices), exc_info=True)
        token_ids = {}
        for idx in indices:
            try:
                token_ids[idx] = self._token_ids(batch, [idx])[0]
            except Exception:
                log.exception("the tokenizer failed on request %d", idx)
                batch.errors[idx] = InputError("UntokenizableText", "the text could not be tokenised")
                del batch.texts[idx]
        return token_ids

    def _token_ids(self, batch: Batch, indices: list[int]) -> list[list[int]]:
        """Each text's first window (its only one unless ``long_texts: chunk``); further windows go
        to ``batch.windows``."""
        windows, truncated = self.engine.windows([batch.texts[i] for i in indices])
        batch.truncated.update(i for i, cut in zip(indices, truncated, strict=True) if cut)
        batch.windows.update((i, w[1:]) for i, w in zip(indices, windows, strict=True) if len(w) > 1)
        return [w[0] for w in windows]

    def _run_pass(self, batch: Batch, token_ids: dict[int, list[int]], rows: list[int]) -> float:
        """One forward pass over ``rows`` (request indices); returns its model milliseconds.

        If the pass fails, each of its texts is run alone, so that a text the model fails on fails
        only its own request (422), and the others are answered. If every text of the batch fails
        alone and a known-good text fails too, the model is what is broken: ``inference`` then fails
        the batch with a 500, which the gateway retries on another worker.
        """
        try:
            # A text cut into windows (long_texts: chunk) runs them all in its pass: its answer is
            # their mean, and depends on no other text's.
            windows = [[token_ids[i], *batch.windows.get(i, [])] for i in rows]
            probabilities, model_ms = self.engine.forward([w for text in windows for w in text])
            if len(probabilities) != len(rows):
                weights = [self.engine.window_weights(w) for w in windows]
                probabilities = mean_of_windows(probabilities, weights)
        except Exception:
            if len(rows) > 1:
                log.warning("a forward pass of %d texts failed; running them one by one", len(rows), exc_info=True)
                return sum(self._run_pass(batch, token_ids, [i]) for i in rows)
            log.exception("the model failed on request %d", rows[0])
            batch.errors[rows[0]] = InputError("UnprocessableText", "the model failed on this text")
            del batch.texts[rows[0]]
            return 0.0
        for i, row in zip(rows, probabilities.tolist(), strict=True):
            batch.probabilities[i] = row
        return model_ms

    def _model_answers(self) -> bool:
        """Whether the model still answers a text it answered at start-up (the first warm-up text)."""
        try:
            self.engine.forward([self.known_good_ids])
        except Exception:
            log.exception("the model failed on a known-good text too")
            return False
        return True

    def _torchserve_id(self, idx: int) -> str:
        """TorchServe's own id of request ``idx`` (a UUID), or a fresh one."""
        try:
            value = self.context.get_request_id(idx)
        except (AttributeError, IndexError, KeyError, TypeError):
            value = None
        return value if isinstance(value, str) and value else uuid.uuid4().hex

    def _headers(self, idx: int) -> dict[str, Any]:
        """The request's headers as TorchServe recorded them (request- and parameter-level)."""
        try:
            return dict(self.context.get_all_request_header(idx) or {})
        except (AttributeError, IndexError, KeyError, TypeError):
            return {}


def _error(error: InputError, tally: Tally) -> dict[str, Any]:
    """An error's answer body (counted in ``tally``)."""
    tally.rejected[error.kind] += 1
    return error_body(error.kind, error.message)
