"""Every error a client of the service can meet: its ``type``, HTTP status, who answers it, when.

Each answer is one JSON body, ``{"code": <status>, "type": <type>, "message": <what to fix>,
"error": <the same message>}`` (:func:`error_body`; ``error`` is the Open Inference Protocol's
field, so that OIP clients read every refusal). The handler raises
:class:`emotion_inputs.InputError` by type and takes the status from here; the gateway's error
answers (``serving/nginx.conf``) and the API page's error table (docs/api.md) are checked against this table by
``tests/test_errors.py``, so none of them can name a status the others do not. Standard library
only: it travels in the model archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ErrorKind:
    """One kind of error answer.

    Attributes:
        status: The HTTP status.
        source: Who answers it: ``handler`` (the model's worker), ``gateway`` (nginx, before
            TorchServe), ``feedback`` (the feedback service behind ``POST /feedback``; it also
            answers ``MalformedJSON`` and ``BodyTooLarge``), or ``torchserve`` (TorchServe's front
            end, passed through).
        retry: Whether the same request may succeed later (the answer carries ``Retry-After``).
        when: When it is answered, for the docs.
    """

    status: int
    source: str
    retry: bool
    when: str


def _kind(status: int, source: str, when: str, retry: bool = False) -> ErrorKind:
    return ErrorKind(status, source, retry, when)


ERRORS: dict[str, ErrorKind] = {
    # The request's content: the handler (emotion_inputs), per request of a batch.
    "EmptyInput": _kind(400, "handler", "the request has no body"),
    "EmptyText": _kind(400, "handler", "the text has no letter, digit, symbol or emoji"),
    "InvalidEncoding": _kind(400, "handler", "the body is not valid in its charset"),
    "InvalidText": _kind(400, "handler", "the text has unpaired surrogates"),
    "MalformedJSON": _kind(400, "handler", "malformed JSON, nested too deeply, or NaN/Infinity in it"),
    "MissingField": _kind(400, "handler", 'a JSON object without "text"'),
    "InvalidType": _kind(400, "handler", '"text" is not a string'),
    "UnsupportedInput": _kind(400, "handler", 'a bare JSON list (lists go as {"texts": [...]})'),
    "InvalidTexts": _kind(400, "handler", '"texts" that is not a list of 1 to 64 items'),
    "InvalidInferenceRequest": _kind(400, "handler", "an OIP v2 infer body that is not one BYTES input of 1 to 64"),
    "InvalidInput": _kind(400, "handler", "JSON that is not an object"),
    "UnreadableInput": _kind(400, "handler", "a request the handler cannot read at all"),
    "UntokenizableText": _kind(400, "handler", "a text the tokenizer cannot take"),
    "InvalidAbstainThreshold": _kind(400, "handler", "an X-Emotion-Abstain-Below that is no number in [0, 1]"),
    "UnsupportedEndpoint": _kind(400, "handler", "an explanation request (TorchServe direct)"),
    "UnprocessableText": _kind(422, "handler", "a text the model fails on, alone"),
    "TextTooLong": _kind(413, "handler", "a text over max_text_chars (the gateway answers it first)"),
    "UnsupportedCharset": _kind(415, "handler", "an unknown charset, or a codec that is no character set"),
    "UnsupportedMediaType": _kind(415, "handler", "another content type, or a form without 'text'"),
    # The request itself: the gateway, before TorchServe sees it.
    "BadRequest": _kind(400, "gateway", "a request nginx cannot read as HTTP/1.1"),
    "InvalidPath": _kind(400, "gateway", "a prediction path that is not the route as written"),
    "Unauthorized": _kind(401, "gateway", "a missing or wrong gateway key"),
    "NotFound": _kind(404, "gateway", "any other path"),
    "ModelNotFound": _kind(404, "gateway", "a model or version the service does not serve"),
    "MethodNotAllowed": _kind(405, "gateway", "another method than POST"),
    "RequestTimeout": _kind(408, "gateway", "a request not sent in time"),
    "LengthRequired": _kind(411, "gateway", "a body without Content-Length (chunked)"),
    "BodyTooLarge": _kind(413, "gateway", "a body over 1 MiB"),
    "URITooLong": _kind(414, "gateway", "a request line over 8 KiB"),
    "UnsupportedContentEncoding": _kind(415, "gateway", "a Content-Encoding other than identity"),
    "HeaderTooLarge": _kind(431, "gateway", "headers over the buffers"),
    "TooManyRequests": _kind(429, "gateway", "too many requests or connections from one client", retry=True),
    "UnsupportedTransferEncoding": _kind(400, "gateway", "a Transfer-Encoding other than chunked, alone"),
    "NotReady": _kind(503, "gateway", "no READY worker, the model registered again, a key switch", retry=True),
    "Unavailable": _kind(503, "gateway", "TorchServe does not answer", retry=True),
    "UnsupportedHTTPVersion": _kind(400, "gateway", "another HTTP version than 1.0 or 1.1"),
    # The feedback service (POST /feedback, serving/feedback.py); each item of a valid body gets
    # its own outcome (accepted, duplicate, invalid, unknown, conflict, expired) instead.
    "InvalidFeedback": _kind(400, "feedback", "a feedback body that is not one item or a list of 1 to 1,000"),
    # TorchServe's own, passed through with Retry-After.
    "ServiceUnavailableException": _kind(503, "torchserve", "TorchServe's queue is full (overload)", retry=True),
}


def status_of(kind: str) -> int:
    """The HTTP status of an error type.

    Raises:
        KeyError: The type is not in :data:`ERRORS`.
    """
    return ERRORS[kind].status


def error_body(kind: str, message: str) -> dict[str, Any]:
    """The JSON body of an error answer."""
    return {"code": status_of(kind), "type": kind, "message": message, "error": message}
