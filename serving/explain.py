"""Explanations: which words of a text made its answer, by occlusion through the serving engine.

``POST /explanations/emotion`` (TorchServe's API name) with ``{"text": "...", "label": "joy"}``
(``label`` optional: the predicted one by default) answers::

    {"label": "joy", "score": 0.97, "method": "occlusion",
     "words": [{"word": "happy", "attribution": 0.41}, ...], "explained_words": 12, "words_in_text": 12}

A word's attribution is how much the label's probability falls when that word alone is removed
from the text: ``p(label | text) - p(label | text without the word)``. Positive words support the
label, negative ones speak against it. Occlusion, not Integrated Gradients: the served archive is
ONNX Runtime int8 and carries no PyTorch weights to take gradients through, and occlusion asks the
very engine that serves (same tokenizer, backend, temperature), so it explains the served answer,
not a neighbour's. Its cost is bounded: one forward pass per word, at most ``max_words`` words
(the first ones; the answer says how many were explained).

It runs in a process of its own (:class:`ExplainProcess`, ``python -m serving.explain``), on its
own copy of the archive's handler, at the lowest CPU priority, one explanation at a time: it never
joins the prediction batches, and a flood of explanations yields the CPU to them. The gateway
authenticates it and limits it on its own rate zone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests

from project import LABELS, LOOPBACK, MODEL_NAME, handler_module
from serving.feedback_service import JSONHandler, lower_priority
from serving.process import ManagedProcess
from serving.settings import max_text_chars

log = logging.getLogger("serving.explain")

ERRORS = handler_module("emotion_errors")
inputs = handler_module("emotion_inputs")
MAX_WORDS = 48  # one forward pass each: an explanation costs at most this many predictions
MAX_BODY_BYTES = 1 << 20  # the gateway's client_max_body_size: a larger body never gets here
RESTART_BACKOFF = 30.0  # seconds between starts of a service that keeps exiting


def occlusion(
    predict: Callable[[list[str]], list[dict[str, Any]]], text: str, label: str | None, max_words: int = MAX_WORDS
) -> dict[str, Any]:
    """The occlusion attributions of ``text``'s words (whitespace-separated) for ``label`` (default:
    the predicted one), for the first ``max_words`` words. ``predict`` answers lists of texts (the
    handler's answers). Each variant is the text without one word."""
    words = text.split()
    explained = words[:max_words]
    variants = [" ".join(words[:i] + words[i + 1 :]) for i in range(len(explained))]
    answers = [*predict([text]), *(predict(variants) if variants else [])]
    base = answers[0]
    if "error" in base:
        raise inputs.InputError(base["type"], base["message"])
    target = label or base["label"] or max(base["probabilities"], key=base["probabilities"].get)
    score = base["probabilities"][target]
    attributions = []
    for word, answer in zip(explained, answers[1:], strict=True):
        # A text left with nothing to classify (its one word removed) has lost all support.
        without = answer["probabilities"][target] if "probabilities" in answer else 0.0
        attributions.append({"word": word, "attribution": round(score - without, 6)})
    return {
        "label": target,
        "score": score,
        "method": "occlusion",
        "words": attributions,
        "explained_words": len(explained),
        "words_in_text": len(words),
    }


def read_request(raw: bytes, content_type: str | None) -> tuple[str, str | None]:
    """The text and the optional label of an explanation request: JSON ``{"text", "label"?}`` or
    a plain-text body (the text).

    Raises:
        InputError: as a prediction request's, and ``InvalidType`` for a label not of the model.
    """
    headers = {"Content-Type": content_type or "text/plain"}
    payload: Any = raw
    label = None
    if inputs.MediaType.parse(content_type).is_json:
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError):
            raise inputs.InputError("MalformedJSON", 'send {"text": "...", "label": "<label>"}') from None
        if isinstance(payload, dict):
            label = payload.get("label")
            if label is not None and label not in LABELS:
                raise inputs.InputError("InvalidType", f'"label" must be one of {", ".join(LABELS)}')
            payload = {"text": payload.get("text")} if "text" in payload else payload
        headers["body"] = {"content-type": "application/json"}
    text = inputs.extract_text({"body": payload}, headers, max_text_chars())
    return text, label


class ExplainServer:
    """``POST /explanations/<model>`` and ``GET /live`` on a loopback port, one explanation at a time."""

    def __init__(self, predict: Callable[[list[str]], list[dict[str, Any]]], port: int = 0, model: str = MODEL_NAME):
        self.predict = predict
        self.serial = threading.Lock()
        outer = self

        class Handler(JSONHandler):
            def do_POST(self) -> None:
                rid = self.headers.get("X-Request-ID")
                if self.path != f"/explanations/{model}":
                    return self._send(404, ERRORS.error_body("NotFound", f"POST /explanations/{model}"), rid)
                try:
                    length = int(self.headers.get("Content-Length", "0"))
                except ValueError:
                    length = -1
                if not 0 <= length <= MAX_BODY_BYTES:
                    return self._send(413, ERRORS.error_body("BodyTooLarge", "the body is over 1 MiB"), rid)
                raw = self.rfile.read(length)
                try:
                    text, label = read_request(raw, self.headers.get("Content-Type"))
                    with outer.serial:
                        answer = occlusion(outer.predict, text, label)
                except inputs.InputError as err:
                    return self._send(err.status, err.to_response(), rid)
                self._send(200, answer, rid)

            def do_GET(self) -> None:
                if self.path == "/live":
                    return self._send(200, {"status": "live"}, None)
                self._send(404, ERRORS.error_body("NotFound", f"POST /explanations/{model}"), None)

            def _send(self, status: int, body: dict, request_id: str | None) -> None:
                self.send_json(status, body | {"request_id": request_id})

        self.httpd = ThreadingHTTPServer((LOOPBACK, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def serve(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def worker_predict(archive: Path, workdir: Path) -> Callable[[list[str]], list[dict[str, Any]]]:
    """The archive's handler in this process (its request log off: explanations are no traffic),
    answering lists of texts, 64 at a time."""
    from serving.worker import InProcessWorker

    worker = InProcessWorker.from_archive(archive, workdir, request_log=False)
    size = inputs.MAX_TEXTS

    def predict(texts: list[str]) -> list[dict[str, Any]]:
        answers = []
        for start in range(0, len(texts), size):
            ((status, body),) = worker.run([({"texts": texts[start : start + size]}, "application/json")])
            answers += body["predictions"] if status == 200 else [body] * len(texts[start : start + size])
        return answers

    return predict


class ExplainProcess:
    """The supervisor's handle on ``python -m serving.explain``: start, running, stop."""

    def __init__(self, archive: Path, port: int, log_path: Path, model: str = MODEL_NAME) -> None:
        self.url = f"http://{LOOPBACK}:{port}"
        command = [sys.executable, "-m", "serving.explain", "--archive", str(archive), "--port", str(port)]
        self.process = ManagedProcess("the explanation service", [*command, "--model", model], log_path)
        self.started_at = float("-inf")

    def due_for_restart(self, backoff: float = RESTART_BACKOFF) -> bool:
        """Whether it exited and its last start is ``backoff`` seconds ago (an archive it cannot
        load is not started again every round of the supervisor)."""
        return not self.process.running() and time.monotonic() - self.started_at >= backoff

    def start(self, timeout: float | None = 120) -> None:
        """Start it; returns once ``/live`` answers, or at once with ``timeout`` None."""
        self.started_at = time.monotonic()
        self.process.start()

        def live() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.url}/live", timeout=1).status_code == 200
            return False

        if timeout is not None:
            self.process.wait_until(live, timeout, "live")

    def stop(self) -> None:
        self.process.stop(timeout=10)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True, help="loopback port")
    parser.add_argument("--model", default=MODEL_NAME)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    lower_priority()
    with tempfile.TemporaryDirectory() as tmp:
        server = ExplainServer(worker_predict(args.archive, Path(tmp)), args.port, args.model)
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.stop).start())
        log.info("explanation service on %s:%d for %s", LOOPBACK, server.port, args.archive)
        server.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
