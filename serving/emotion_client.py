"""The service's Python client: predictions and feedback through the gateway, sync and async.

::

    from serving.emotion_client import EmotionClient

    with EmotionClient("http://127.0.0.1:8080") as client:     # key: EMOTION_API_KEY, or key=/key_file=
        answer = client.predict("i feel wonderful today")      # Prediction(label="joy", score=0.98, ...)
        answers = client.predict_many(texts)                    # lists of 64 texts a request
        client.feedback(answer.request_id, "joy")

:class:`AsyncEmotionClient` has the same methods as coroutines. Every call sends an
``X-Request-ID`` (the caller's, else a new one), has a timeout, and is retried with exponential
backoff on 429 and 503 only, waiting at least what ``Retry-After`` asks (a prediction is a pure
function of its text, so a retry is safe; no other status is retried: a 4xx will not change, and
a 500 was already retried by the gateway). Answers are dataclasses: :class:`Prediction`, or
:class:`PredictionError` for a text of a list the service refused; a refused request raises
:class:`EmotionAPIError`.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from project import GATEWAY_URL, MODEL_NAME, handler_module
from serving import keys as gateway_keys

KEY_ENV = "EMOTION_API_KEY"
RETRIED = (429, 503)
MAX_TEXTS = handler_module("emotion_inputs").MAX_TEXTS


@dataclass(frozen=True)
class Prediction:
    """One text's answer (docs/api.md)."""

    label: str | None
    score: float
    probabilities: dict[str, float]
    truncated: bool
    abstained: bool
    request_id: str | None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        return cls(
            body["label"],
            body["score"],
            body["probabilities"],
            body.get("truncated", False),
            body.get("abstained", False),
            body.get("request_id"),
        )


@dataclass(frozen=True)
class PredictionError:
    """The error one text of a list got (the others were answered)."""

    code: int
    type: str
    message: str
    request_id: str | None = None


class EmotionAPIError(RuntimeError):
    """A request the service refused (after the retries, for 429 and 503)."""

    def __init__(self, status: int, body: dict[str, Any] | None, request_id: str | None) -> None:
        body = body or {}
        self.status = status
        self.type = body.get("type", "")
        self.message = body.get("message") or body.get("error") or ""
        self.request_id = body.get("request_id") or request_id
        super().__init__(f"{status} {self.type}: {self.message} (request {self.request_id})")


def resolve_key(key: str | None = None, key_file: Path | None = None) -> str | None:
    """The gateway key: ``key``, else ``$EMOTION_API_KEY``, else the newest valid key of
    ``key_file`` (the gateway's keys file), else None (a gateway with keys off)."""
    if key:
        return key
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if key_file is not None:
        valid = gateway_keys.valid_keys(Path(key_file))
        return valid[0] if valid else None  # newest first
    return None


def retry_delay(attempt: int, retry_after: str | None, base: float, cap: float) -> float:
    """Seconds before retry ``attempt`` (0 for the first retry): exponential backoff with jitter,
    never less than ``Retry-After`` (seconds) when the answer gave one."""
    backoff = min(cap, base * 2**attempt) * (0.5 + random.random() / 2)
    try:
        asked = float(retry_after) if retry_after is not None else 0.0
    except ValueError:
        asked = 0.0
    return max(backoff, min(asked, cap))


def chunks(texts: Sequence[str], size: int = MAX_TEXTS) -> Iterator[Sequence[str]]:
    for start in range(0, len(texts), size):
        yield texts[start : start + size]


@dataclass
class _Settings:
    url: str = GATEWAY_URL
    key: str | None = None
    key_file: Path | None = None
    model: str = MODEL_NAME
    timeout: float = 30.0
    retries: int = 5
    backoff: float = 0.2
    backoff_cap: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        key = resolve_key(self.key, self.key_file)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, path: str, json_body: Any, request_id: str | None) -> tuple[str, dict, dict[str, str], str]:
        rid = request_id or uuid.uuid4().hex
        return f"{self.url}{path}", json_body, {**self.headers, "X-Request-ID": rid}, rid

    @property
    def predict_path(self) -> str:
        return f"/predictions/{self.model}"


def read_answer(status: int, text: str, request_id: str | None = None) -> dict[str, Any]:
    """The JSON body of an answer with ``status``; ``EmotionAPIError`` for anything but a 200
    whose body is a JSON object. Any HTTP library's answer can be read with it (the load test's
    is Locust's)."""
    try:
        body = json.loads(text)
    except ValueError:  # no JSON at all: what the text says is the message
        raise EmotionAPIError(status, {"message": text[:200]}, request_id) from None
    if status != 200 or not isinstance(body, dict):
        raise EmotionAPIError(status, body if isinstance(body, dict) else None, request_id)
    return body


def _answer(response: httpx.Response, rid: str) -> dict[str, Any]:
    return read_answer(response.status_code, response.text, rid)


def predictions_of(body: dict[str, Any]) -> list[Prediction | PredictionError]:
    """The entries of a list's answer (``{"predictions": [...]}``), in order."""
    return [
        PredictionError(a["code"], a["type"], a["message"], a.get("request_id"))
        if "code" in a
        else Prediction.from_json(a)
        for a in body["predictions"]
    ]


class EmotionClient:
    """A synchronous client of the gateway (one connection pool; use it as a context manager).

    Args:
        url: The gateway's address (default ``http://127.0.0.1:8080``).
        key: A gateway key; default ``$EMOTION_API_KEY``, else the newest in ``key_file``.
        key_file: The gateway's keys file (``outputs/serve/keys.json`` for ``make serve``).
        model: The model's name in the route.
        timeout: Seconds for each attempt (connect, send and answer).
        retries: Retries of a 429 or 503 (the first attempt not counted).
        backoff, backoff_cap: The first retry's delay, doubled each time, capped (seconds).
    """

    def __init__(self, url: str = GATEWAY_URL, **settings: Any) -> None:
        self.settings = _Settings(url, **settings)
        self.http = httpx.Client(timeout=self.settings.timeout)

    def _post(self, path: str, body: Any, request_id: str | None) -> dict[str, Any]:
        url, body, headers, rid = self.settings.request(path, body, request_id)
        for attempt in range(self.settings.retries + 1):
            response = self.http.post(url, json=body, headers=headers)
            if response.status_code not in RETRIED or attempt == self.settings.retries:
                return _answer(response, rid)
            time.sleep(
                retry_delay(
                    attempt, response.headers.get("Retry-After"), self.settings.backoff, self.settings.backoff_cap
                )
            )
        raise AssertionError("unreachable")

    def predict(self, text: str, request_id: str | None = None) -> Prediction:
        """One text's answer."""
        return Prediction.from_json(self._post(self.settings.predict_path, {"text": text}, request_id))

    def predict_list(self, texts: Sequence[str], request_id: str | None = None) -> list[Prediction | PredictionError]:
        """One request of 1 to 64 texts: an answer or an error per text, in order."""
        return predictions_of(self._post(self.settings.predict_path, {"texts": list(texts)}, request_id))

    def predict_many(self, texts: Sequence[str]) -> list[Prediction | PredictionError]:
        """Any number of texts, 64 a request, in order."""
        return [answer for chunk in chunks(texts) for answer in self.predict_list(chunk)]

    def feedback(self, request_id: str, label: str) -> dict[str, Any]:
        """The true label of an answer (``POST /feedback``); its outcome."""
        return self._post("/feedback", {"request_id": request_id, "label": label}, None)

    def feedback_list(self, items: Sequence[dict[str, str]]) -> dict[str, Any]:
        """Up to 1,000 ``{"request_id", "label"}`` at once; each item's outcome and the counts."""
        return self._post("/feedback", list(items), None)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> EmotionClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncEmotionClient:
    """:class:`EmotionClient`'s methods as coroutines (``async with AsyncEmotionClient(...)``)."""

    def __init__(self, url: str = GATEWAY_URL, **settings: Any) -> None:
        self.settings = _Settings(url, **settings)
        self.http = httpx.AsyncClient(timeout=self.settings.timeout)

    async def _post(self, path: str, body: Any, request_id: str | None) -> dict[str, Any]:
        url, body, headers, rid = self.settings.request(path, body, request_id)
        for attempt in range(self.settings.retries + 1):
            response = await self.http.post(url, json=body, headers=headers)
            if response.status_code not in RETRIED or attempt == self.settings.retries:
                return _answer(response, rid)
            await asyncio.sleep(
                retry_delay(
                    attempt, response.headers.get("Retry-After"), self.settings.backoff, self.settings.backoff_cap
                )
            )
        raise AssertionError("unreachable")

    async def predict(self, text: str, request_id: str | None = None) -> Prediction:
        return Prediction.from_json(await self._post(self.settings.predict_path, {"text": text}, request_id))

    async def predict_list(
        self, texts: Sequence[str], request_id: str | None = None
    ) -> list[Prediction | PredictionError]:
        return predictions_of(await self._post(self.settings.predict_path, {"texts": list(texts)}, request_id))

    async def predict_many(self, texts: Sequence[str], concurrency: int = 4) -> list[Prediction | PredictionError]:
        """Any number of texts, 64 a request, ``concurrency`` requests at a time, in order."""
        gate = asyncio.Semaphore(concurrency)

        async def one(chunk: Sequence[str]) -> list[Prediction | PredictionError]:
            async with gate:
                return await self.predict_list(chunk)

        lists = await asyncio.gather(*(one(chunk) for chunk in chunks(texts)))
        return [answer for answers in lists for answer in answers]

    async def feedback(self, request_id: str, label: str) -> dict[str, Any]:
        return await self._post("/feedback", {"request_id": request_id, "label": label}, None)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncEmotionClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
