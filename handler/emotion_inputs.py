"""Turning one TorchServe request into one text, or a client error.

TorchServe hands the handler each request as a dict whose ``body`` (or ``data``)
is already decoded: a ``str`` for ``text/*`` bodies, a ``dict``/``list`` for valid
JSON, and the raw ``bytes`` when its own decoding failed. This module accepts:

* ``text/plain`` (or any non-JSON type): the body is the text;
* ``application/json``: an object ``{"text": "..."}``.

One request carries one text. A JSON list of texts is refused with a 400:
TorchServe already batches concurrent requests server-side, and one text per
request keeps per-request status codes, latency and metrics meaningful.
"""

from __future__ import annotations

import json
from typing import Any

JSON_TYPES = ("application/json", "text/json")


class InputError(Exception):
    """A request the client must fix; carries the HTTP status to answer with."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message

    def to_response(self) -> dict[str, Any]:
        """The JSON body sent back to the client."""
        return {"code": self.status, "type": self.kind, "message": self.message}


def request_payload(request: dict[str, Any]) -> Any:
    """The request's payload: TorchServe puts a raw body under ``body``, form fields under ``data``."""
    for key in ("body", "data"):
        if request.get(key) is not None:
            return request[key]
    raise InputError(400, "EmptyInput", 'the request has no body; send the text as text/plain or JSON {"text": ...}')


def _decode(raw: bytes | bytearray) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(400, "InvalidEncoding", f"the body is not valid UTF-8 (byte {err.start})") from None


def _from_json(value: Any) -> str:
    if isinstance(value, list):
        raise InputError(
            400, "UnsupportedInput", 'a JSON list is not accepted: send one text per request as {"text": "..."}'
        )
    if not isinstance(value, dict):
        raise InputError(400, "InvalidInput", f'expected a JSON object {{"text": ...}}, got {type(value).__name__}')
    if "text" not in value:
        raise InputError(400, "MissingField", 'the JSON object has no "text" field')
    text = value["text"]
    if not isinstance(text, str):
        raise InputError(400, "InvalidType", f'"text" must be a string, got {type(text).__name__}')
    return text


def extract_text(request: dict[str, Any], content_type: str | None, max_chars: int) -> str:
    """The text of one request.

    Args:
        request: One element of the batch TorchServe passes to ``handle``.
        content_type: The body's content type, if known.
        max_chars: Longest text accepted, in characters.

    Returns:
        The text, stripped of surrounding whitespace.

    Raises:
        InputError: Empty body, invalid UTF-8, malformed JSON, a missing or
            non-string ``text``, a JSON list, or a text over ``max_chars``.
    """
    payload = request_payload(request)
    is_json = bool(content_type) and content_type.split(";")[0].strip().lower() in JSON_TYPES
    if isinstance(payload, (bytes, bytearray)):
        payload = _decode(payload)
        if is_json:
            try:
                payload = json.loads(payload)
            except json.JSONDecodeError as err:
                raise InputError(
                    400, "MalformedJSON", f"the body is not valid JSON: {err.msg} at char {err.pos}"
                ) from None
    # With a JSON content type, a bare JSON string is refused too: only {"text": ...} is the contract.
    text = _from_json(payload) if is_json or not isinstance(payload, str) else payload
    text = text.strip()
    if not text:
        raise InputError(400, "EmptyText", "the text is empty or whitespace only")
    if len(text) > max_chars:
        raise InputError(413, "TextTooLong", f"the text has {len(text)} characters; the limit is {max_chars}")
    return text
