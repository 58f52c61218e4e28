"""Turning one TorchServe request into one text, or a client error.

TorchServe hands the handler each request as a dict of its parameters: a raw body under
``body`` (already decoded by TorchServe to a ``str`` for ``text/*`` bodies that are valid UTF-8,
to a ``dict``/``list`` for ``application/json`` it could parse, and the raw bytes otherwise), or the
fields of a form. The request's own HTTP headers come separately. This module accepts:

* ``text/plain`` (any ``text/*`` but ``text/json``), ``application/octet-stream`` or no content
  type: the body is the text, in the ``charset`` the content type names (default UTF-8);
* ``application/json``, ``text/json`` or any ``+json`` type: an object ``{"text": "..."}``;
* ``multipart/form-data`` or ``application/x-www-form-urlencoded`` with a field ``text``.

Everything else is refused with a typed :class:`InputError` that becomes this request's own
4xx JSON answer; nothing a request carries can raise past :func:`extract_text`.

One request carries one text, or a list of 1 to :data:`MAX_TEXTS` texts:

* ``{"texts": ["...", ...]}`` as JSON on ``/predictions``, answered with one entry per text;
* an Open Inference Protocol v2 infer request (the gateway's ``/v2/models/<model>/infer``,
  which marks it with :data:`PROTOCOL_HEADER`): one ``BYTES`` input of shape ``[N]``, its data as
  JSON strings or in the binary tensor extension (``Inference-Header-Content-Length``).

In a list each text is checked on its own: a bad text gets its own error in the answer, and the
others are classified (:class:`Carried`). A bare JSON array is refused: ``{"texts": [...]}`` says
what it is, and leaves room for fields beside it.
"""

from __future__ import annotations

import codecs
import json
import math
import re
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from emotion_errors import error_body, status_of

JSON_TYPES = ("application/json", "text/json")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
RAW_TYPES = ("", "application/octet-stream")
HOW_TO_SEND = 'send the text as text/plain, or JSON {"text": "..."} as application/json'
# The most texts one request may carry (a list on /predictions, or an OIP infer request).
MAX_TEXTS = 64
# The gateway sets it to "v2" on its Open Inference Protocol route, and clears it on every other.
PROTOCOL_HEADER = "x-emotion-protocol"
# The Triton binary tensor extension: the JSON header's length; the tensors' bytes follow it.
BINARY_HEADER = "inference-header-content-length"
# What an OIP infer answer can hold, by output name (its datatype; the shape is [N] or [N, 6]).
OIP_OUTPUTS = {"label": "BYTES", "probabilities": "FP32", "score": "FP32", "error": "BYTES"}
# Unicode categories that carry meaning: letters, numbers, symbols (emoji are symbols, "So").
VISIBLE_CATEGORIES = ("L", "N", "S")
# Letters by category that render as nothing (Unicode's default-ignorable Hangul fillers).
INVISIBLE_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
# Text codecs of Python's registry that are no character set a body can be written in.
NOT_CHARSETS = frozenset({"idna", "punycode", "unicode-escape", "raw-unicode-escape", "undefined"})
BOM = "\ufeff"


class InputError(Exception):
    """A request the client must fix: its error type (``emotion_errors.ERRORS``, which gives the
    HTTP status) and a message that says what to fix.

    Raises:
        KeyError: ``kind`` is not in the error table.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status_of(kind)
        self.kind = kind
        self.message = message

    def to_response(self) -> dict[str, Any]:
        """The JSON body sent back to the client."""
        return error_body(self.kind, self.message)


@dataclass(frozen=True)
class MediaType:
    """A parsed ``Content-Type`` header: lower-case ``type/subtype`` and its ``charset``, if any."""

    essence: str = ""
    charset: str | None = None

    @classmethod
    def parse(cls, header: str | None) -> MediaType:
        """Parse a header value; a missing or empty header is the empty type."""
        if not header:
            return cls()
        essence, *params = str(header).split(";")
        charset = None
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset":
                charset = value.strip().strip('"').lower() or None
        return cls(essence.strip().lower(), charset)

    @property
    def is_json(self) -> bool:
        return self.essence in JSON_TYPES or self.essence.endswith("+json")

    @property
    def is_form(self) -> bool:
        return self.essence in FORM_TYPES

    @property
    def is_text(self) -> bool:
        return self.essence in RAW_TYPES or (self.essence.startswith("text/") and not self.is_json)


# Set by the gateway's readiness check (serving/health.py) on its golden request, and stripped
# by the gateway from every client request: a probe is answered but not counted as traffic.
PROBE_HEADER = "x-emotion-probe"


# The id of one request and its answer: the client's own when valid, else the gateway's (nginx
# sends every request with one), else TorchServe's. It comes back in the body and the request log.
REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(headers: Mapping[str, Any] | None, fallback: str) -> str:
    """The request's ``X-Request-ID`` when it is one (at most 64 of ``[A-Za-z0-9._-]``), else ``fallback``."""
    value = header_map(headers).get(REQUEST_ID_HEADER)
    return value if value is not None and REQUEST_ID.fullmatch(value) else fallback


# A client's own abstain threshold for one request (``abstain_threshold``), over the deployment's.
ABSTAIN_HEADER = "x-emotion-abstain-below"


def abstain_threshold(headers: Mapping[str, Any] | None, default: float) -> float:
    """The confidence below which this request's answer abstains: the client's
    ``X-Emotion-Abstain-Below`` header (a decimal number from 0 to 1; 0 never abstains), else
    ``default`` (the deployment's ``abstain_below``).

    Raises:
        InputError: The header is present but no number in [0, 1].
    """
    value = header_map(headers).get(ABSTAIN_HEADER)
    if value is None:
        return default
    try:
        threshold = float(value.strip())
    except ValueError:
        threshold = math.nan
    if not 0.0 <= threshold <= 1.0:  # NaN fails both comparisons
        raise InputError(
            "InvalidAbstainThreshold", f"X-Emotion-Abstain-Below must be a number from 0 to 1, not {value[:40]!r}"
        )
    return threshold


def is_probe(headers: Mapping[str, Any] | None) -> bool:
    """Whether the request is the gateway's readiness probe (``PROBE_HEADER`` present)."""
    return PROBE_HEADER in header_map(headers)


def header_map(headers: Mapping[str, Any] | None) -> dict[str, str]:
    """The request's HTTP headers with lower-case names (TorchServe keeps the client's spelling)."""
    return {str(k).lower(): v for k, v in (headers or {}).items() if isinstance(v, str)}


def _codec(media: MediaType) -> str:
    """The codec name for the body's charset; refuses charsets that are not text encodings.

    Python's codec registry also holds transforms that are no character set: bytes-to-bytes
    codecs (``base64``, ``hex``, ``zlib``, ...), ``rot13``, and codecs for domain names or Python
    literals (``idna``, ``punycode``, ``unicode_escape``, ...). Those are refused like unknown names.
    """
    if media.charset is None:
        return "utf-8"
    try:
        info = codecs.lookup(media.charset)
    except (LookupError, ValueError):  # ValueError: a NUL or an unpaired surrogate in the name
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True) or info.name in NOT_CHARSETS:
        raise InputError("UnsupportedCharset", f"unknown charset {media.charset!r}: send UTF-8 (charset=utf-8)")
    return info.name


def _raw_bytes(payload: Any) -> bytes:
    """The body's bytes as the client sent them (TorchServe decodes valid UTF-8 ``text/*`` bodies)."""
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    return bytes(payload)


def _decode(raw: bytes, codec: str) -> str:
    """The body's text in ``codec``, without a leading byte order mark (which no codec but UTF-16
    and UTF-32 removes, and which JSON parsers refuse)."""
    try:
        return raw.decode(codec).removeprefix(BOM)
    except UnicodeDecodeError as err:
        raise InputError("InvalidEncoding", f"the body is not valid {codec} (byte {err.start})") from None
    except UnicodeError:
        raise InputError("InvalidEncoding", f"the body is not valid {codec}") from None


def _refuse_constant(name: str) -> Any:
    # Python's parser accepts NaN, Infinity and -Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not a JSON value")


def _parse_json(text: str) -> Any:
    # Integers become Decimals: Python refuses to convert integers of more than 4,300 digits, and
    # a huge number in a field this service ignores must not make the request unreadable.
    try:
        return json.loads(text, parse_int=Decimal, parse_constant=_refuse_constant)
    except json.JSONDecodeError as err:
        raise InputError("MalformedJSON", f"the body is not valid JSON: {err.msg} at char {err.pos}") from None
    except RecursionError:
        raise InputError("MalformedJSON", "the JSON body is nested too deeply") from None
    except ValueError as err:
        raise InputError("MalformedJSON", f"the body is not valid JSON: {err}") from None


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float, Decimal)):
        return "number"
    return {dict: "object", list: "array", str: "string", type(None): "null"}.get(type(value), type(value).__name__)


def _refuse_non_finite(value: Any) -> None:
    """Refuse NaN and infinities anywhere in a parsed body: TorchServe's own parser (Python's)
    accepts them, though they are not JSON (RFC 8259). Iterative: the depth is the body's."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float) and not math.isfinite(item):
            raise InputError("MalformedJSON", f"{item} is not a JSON value (NaN and infinities are refused)")
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)


def _from_json(value: Any) -> str | list[Any]:
    """The text of a JSON body ``{"text": ...}``, or the items of ``{"texts": [...]}``."""
    _refuse_non_finite(value)
    if isinstance(value, list):
        raise InputError(
            "UnsupportedInput",
            'a bare JSON list is not accepted: send {"texts": [...]} for a list, {"text": "..."} for one',
        )
    if not isinstance(value, dict):
        raise InputError("InvalidInput", f'expected a JSON object {{"text": ...}}, got {json_type(value)}')
    if "text" not in value and "texts" in value:
        return _texts(value["texts"])
    if "text" not in value:
        raise InputError("MissingField", 'the JSON object has no "text" field (or "texts" for a list)')
    text = value["text"]
    if not isinstance(text, str):
        raise InputError("InvalidType", f'"text" must be a string, got {json_type(text)}')
    return text


def _texts(value: Any) -> list[Any]:
    """``"texts"`` as the list of a request's 1 to ``MAX_TEXTS`` items (each checked later, alone)."""
    if not isinstance(value, list):
        raise InputError("InvalidTexts", f'"texts" must be a list of texts, got {json_type(value)}')
    if not 1 <= len(value) <= MAX_TEXTS:
        raise InputError("InvalidTexts", f'"texts" must hold 1 to {MAX_TEXTS} texts, not {len(value)}')
    return value


def _body(request: Mapping[str, Any], parsed: bool) -> Any:
    """The request's body; with ``parsed`` (TorchServe parsed it as JSON) a JSON ``null`` too."""
    for key in ("body", "data"):
        if request.get(key) is not None or (parsed and key in request):
            return request[key]
    raise InputError("EmptyInput", f"the request has no body; {HOW_TO_SEND}")


def _form_text(request: Mapping[str, Any], media: MediaType) -> str:
    if request.get("text") is None:
        raise InputError(
            "UnsupportedMediaType",
            f"a {media.essence} body needs a field named 'text'; or {HOW_TO_SEND}",
        )
    value = request["text"]
    if not isinstance(value, (str, bytes, bytearray, memoryview)):
        # TorchServe parses a part sent as application/json: a number would become that many bytes.
        raise InputError("InvalidType", f"the form field 'text' must be text, got JSON {json_type(value)}")
    return _decode(_raw_bytes(value), "utf-8")


def _body_text(request: Mapping[str, Any], media: MediaType, parsed: bool) -> str | list[Any]:
    payload = _body(request, parsed)
    codec = _codec(media)
    if parsed and not isinstance(payload, (bytes, bytearray, memoryview)):
        return _from_json(payload)  # TorchServe parsed the application/json body itself
    if not isinstance(payload, (bytes, bytearray, memoryview, str)):
        raise InputError("UnsupportedMediaType", f"a JSON body needs Content-Type: application/json; {HOW_TO_SEND}")
    text = _decode(_raw_bytes(payload), codec)
    return _from_json(_parse_json(text)) if media.is_json else text


def check_text(text: str, max_chars: int) -> str:
    """The text stripped of surrounding whitespace, if it is one the model can classify.

    Raises:
        InputError: Unpaired surrogates (not Unicode text), nothing visible (no letter, digit,
            symbol or emoji: only whitespace, control, format or punctuation characters, or Hangul
            fillers), or more than ``max_chars`` characters.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError("InvalidText", f"the text is not valid Unicode (unpaired surrogate at {err.start})") from None
    text = text.strip()
    # The length first: looking for a visible character is a Python loop over the whole text.
    if len(text) > max_chars:
        raise InputError("TextTooLong", f"the text has {len(text)} characters; the limit is {max_chars}")
    if not any(unicodedata.category(char)[0] in VISIBLE_CATEGORIES and char not in INVISIBLE_LETTERS for char in text):
        raise InputError("EmptyText", "the text has no letter, digit, symbol or emoji to classify")
    return text


@dataclass
class Carried:
    """What one request carries, read: its texts, each a checked text or its own error, and the
    form its answer takes.

    Attributes:
        texts: One entry per text, in order: the text (stripped), or the :class:`InputError` that
            text alone gets.
        form: ``text`` (one text, answered as one: its error is the request's), ``list``
            (``{"texts": [...]}``) or ``v2`` (an OIP infer request).
        outputs: The OIP outputs asked for, in order (empty: all of :data:`OIP_OUTPUTS`).
        infer_id: The OIP request's own ``id``, echoed in its answer.
    """

    texts: list[str | InputError]
    form: str = "text"
    outputs: tuple[str, ...] = ()
    infer_id: str | None = None


def _check_item(value: Any, position: int, max_chars: int) -> str | InputError:
    """One text of a list, checked alone: the text, or the error it gets."""
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            return InputError("InvalidEncoding", f"text {position} is not valid UTF-8 (byte {err.start})")
    if not isinstance(value, str):
        return InputError("InvalidType", f"text {position} must be a string, got {json_type(value)}")
    try:
        return check_text(value, max_chars)
    except InputError as err:
        return err


def _binary_tensors(raw: bytes, header_length: str) -> tuple[Any, bytes]:
    """The JSON header and the tensor bytes of a body in the binary tensor extension."""
    try:
        length = int(header_length)
    except ValueError:
        length = -1
    if not 0 < length <= len(raw):
        raise InputError(
            "InvalidInferenceRequest",
            "Inference-Header-Content-Length must be the JSON header's length "
            f"(1 to {len(raw)}), not {header_length[:20]!r}",
        )
    return _parse_json(_decode(raw[:length], "utf-8")), raw[length:]


def _bytes_elements(raw: bytes, count: int) -> list[bytes]:
    """``count`` BYTES elements of the binary extension: each a 4-byte little-endian length, then
    that many bytes, with nothing left over."""
    elements, offset = [], 0
    for _ in range(count):
        if offset + 4 > len(raw):
            break
        (size,) = struct.unpack_from("<I", raw, offset)
        if offset + 4 + size > len(raw):
            break
        elements.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    if len(elements) != count or offset != len(raw):
        raise InputError("InvalidInferenceRequest", f"the binary data does not hold {count} BYTES elements, exactly")
    return elements


def _oip_request(request: Mapping[str, Any], names: dict[str, str], parsed: bool, max_chars: int) -> Carried:
    """An Open Inference Protocol v2 infer request: ``{"id"?, "parameters"?, "inputs": [one BYTES
    input of shape [N]], "outputs"?: [{"name": ...}]}``, as JSON or in the binary extension."""
    payload = _body(request, parsed)
    binary = b""
    if isinstance(payload, (bytes, bytearray, memoryview, str)):
        raw = _raw_bytes(payload)
        if BINARY_HEADER in names:
            body, binary = _binary_tensors(raw, names[BINARY_HEADER])
        else:
            body = _parse_json(_decode(raw, "utf-8"))
    else:
        body = payload  # TorchServe parsed the application/json body itself
    _refuse_non_finite(body)

    def invalid(message: str) -> InputError:
        return InputError("InvalidInferenceRequest", message)

    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        raise invalid('an infer request is a JSON object with "inputs": [one BYTES input]')
    if len(body["inputs"]) != 1 or not isinstance(body["inputs"][0], dict):
        raise invalid(f'"inputs" must hold one input (the texts), not {len(body["inputs"])}')
    tensor = body["inputs"][0]
    if tensor.get("datatype") != "BYTES":
        raise invalid(f'the input\'s datatype must be "BYTES", not {str(tensor.get("datatype"))[:20]!r}')
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) != 1
        or isinstance(shape[0], bool)
        or not isinstance(shape[0], (int, Decimal))
        or not 1 <= shape[0] <= MAX_TEXTS
    ):
        raise invalid(f"the input's shape must be [N] with N from 1 to {MAX_TEXTS}, not {str(shape)[:40]}")
    count = int(shape[0])
    parameters = tensor.get("parameters") if isinstance(tensor.get("parameters"), dict) else {}
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, (int, Decimal)) or int(size) != len(binary):
            raise invalid(f"binary_data_size must be the {len(binary)} bytes that follow the JSON header")
        items: list[Any] = _bytes_elements(binary, count)
    else:
        data = tensor.get("data")
        if binary:
            raise invalid("binary data follows the JSON header, but no input has a binary_data_size")
        if not isinstance(data, list) or len(data) != count:
            raise invalid(f'the input\'s "data" must be a list of its {count} texts')
        items = data
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and o.get("name") in OIP_OUTPUTS for o in outputs):
        raise invalid(f'"outputs" must be a list of {{"name": ...}} among {", ".join(OIP_OUTPUTS)}')
    infer_id = body.get("id")
    if infer_id is not None and not isinstance(infer_id, str):
        raise invalid(f'"id" must be a string, got {json_type(infer_id)}')
    return Carried(
        [_check_item(item, i, max_chars) for i, item in enumerate(items)],
        "v2",
        tuple(dict.fromkeys(o["name"] for o in outputs)),
        infer_id,
    )


def read_request(request: Mapping[str, Any], headers: Mapping[str, Any] | None, max_chars: int) -> Carried:
    """What one request carries: one text, a list of texts, or an OIP infer request.

    Args:
        request: One element of the batch TorchServe passes to ``handle`` (its parameters).
        headers: The request's headers as TorchServe records them (``Content-Type``, ``explain``,
            and per parameter a ``{"content-type": ...}`` dict); any spelling of the names.
        max_chars: Longest text accepted, in characters.

    Returns:
        The request's texts, each stripped of surrounding whitespace or its own error (lists),
        and the form of its answer.

    Raises:
        InputError: Anything that keeps the request from being read: an unsupported endpoint,
            media type or charset, an empty body, invalid encoding, malformed JSON, a missing or
            non-string ``text``, a bare JSON list, ``texts`` or an OIP body out of shape; for one
            text, a text with nothing visible or over ``max_chars``.
    """
    names = header_map(headers)
    if names.get("explain", "").lower() == "true":
        raise InputError("UnsupportedEndpoint", "explanations are not served: use /predictions/<model>")
    # TorchServe records the body's media type per parameter, without its parameters, and parses
    # the body itself when that type is exactly application/json.
    parameter_type = next(
        (v.get("content-type") for k, v in (headers or {}).items() if k in ("body", "data") and isinstance(v, dict)),
        None,
    )
    parsed = MediaType.parse(parameter_type).essence == "application/json"
    if names.get(PROTOCOL_HEADER) == "v2":
        return _oip_request(request, names, parsed, max_chars)
    media = MediaType.parse(names.get("content-type", parameter_type))
    if media.is_form:
        text = _form_text(request, media)
    elif media.is_json or media.is_text:
        text = _body_text(request, media, parsed)
    else:
        raise InputError("UnsupportedMediaType", f"content type {media.essence!r} is not accepted; {HOW_TO_SEND}")
    if isinstance(text, list):
        return Carried([_check_item(item, i, max_chars) for i, item in enumerate(text)], "list")
    return Carried([check_text(text, max_chars)])


def extract_text(request: Mapping[str, Any], headers: Mapping[str, Any] | None, max_chars: int) -> str:
    """The text of a request that carries one (:func:`read_request`).

    Raises:
        InputError: As :func:`read_request`, and ``UnsupportedInput`` for a list of texts.
    """
    carried = read_request(request, headers, max_chars)
    if carried.form != "text":
        raise InputError("UnsupportedInput", "this request carries a list of texts")
    (text,) = carried.texts  # one text's error is raised by read_request: this is a str
    return str(text)
