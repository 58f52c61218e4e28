"""The input contract of one request (handler/emotion_inputs.py), property-based.

``extract_text`` either returns the text or raises ``InputError`` with a 4xx status, whatever the
request's bytes, content type and headers: that is what keeps one request from failing its batch.
"""

from __future__ import annotations

import codecs
import encodings.aliases
import json
import math
import unicodedata

import pytest
from emotion_inputs import InputError, MediaType, check_text, extract_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIMIT = 2000

# Texts a user could mean: at least one letter, digit, symbol or emoji somewhere.
visible_char = st.characters(categories=["L", "N", "S"])
any_char = st.characters(codec="utf-8")
texts = st.builds(
    lambda a, b, c: a + b + c, st.text(any_char, max_size=40), visible_char, st.text(any_char, max_size=40)
)
# Nothing to classify: whitespace, control and format characters (NUL, zero-width, bidi marks),
# punctuation, Hangul fillers (letters that render as nothing).
invisible = st.text(
    st.characters(categories=["Z", "Cc", "Cf", "P"], include_characters="\u115f\u1160\u3164\uffa0", codec="utf-8"),
    max_size=60,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)
content_types = st.sampled_from(
    [
        "",
        "text/plain",
        "text/plain; charset=utf-8",
        "TEXT/PLAIN; Charset=UTF-8",
        "application/json",
        "application/json; charset=utf-8",
        "text/json",
        "application/vnd.api+json",
        "application/octet-stream",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "text/plain; charset=latin-1",
        "text/plain; charset=no-such-charset",
        "image/png",
        "text/html",
        ";;;",
        "application/json; charset",
    ]
)


def as_torchserve(body: bytes, content_type: str) -> dict:
    """What a TorchServe worker hands the handler for ``body``: decoded as its front end decodes it."""
    essence = content_type.split(";")[0].strip()
    if essence == "application/json":
        try:
            return {"body": json.loads(body.decode("utf-8"))}
        except Exception:
            return {"body": bytearray(body)}
    if essence.startswith("text"):
        try:
            return {"body": body.decode("utf-8")}
        except UnicodeDecodeError:
            return {"body": bytearray(body)}
    return {"body": bytearray(body)}


def headers_for(content_type: str) -> dict:
    """Headers as TorchServe records them: the request's own, and the body's media type."""
    headers = {"explain": "False", "body": {"content-type": content_type.split(";")[0].strip()}}
    return {**headers, "Content-Type": content_type} if content_type else headers


@given(text=texts)
def test_any_visible_text_is_read_back_as_plain_text_and_as_json(text):
    expected = text.strip()
    if len(expected) > LIMIT:
        return
    plain = as_torchserve(text.encode("utf-8"), "text/plain")
    assert extract_text(plain, headers_for("text/plain; charset=utf-8"), LIMIT) == expected
    for content_type in ("application/json", "text/json", "application/json; charset=utf-8"):
        body = json.dumps({"text": text}).encode()
        assert extract_text(as_torchserve(body, content_type), headers_for(content_type), LIMIT) == expected


@given(text=texts, extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "text"), json_values, max_size=3))
def test_extra_json_fields_never_change_the_text(text, extra):
    body = json.dumps({**extra, "text": text}).encode()
    assert extract_text(as_torchserve(body, "application/json"), headers_for("application/json"), LIMIT) == text.strip()


@given(text=invisible, content_type=st.sampled_from(["text/plain", "application/json"]))
def test_text_without_anything_visible_is_empty(text, content_type):
    body = json.dumps({"text": text}).encode() if "json" in content_type else text.encode()
    with pytest.raises(InputError) as info:
        extract_text(as_torchserve(body, content_type), headers_for(content_type), LIMIT)
    assert (info.value.status, info.value.kind) == (400, "EmptyText")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()),
    content_type=content_types,
    explain=st.sampled_from(["False", "True", "false", ""]),
    other_headers=st.dictionaries(st.text(max_size=12), st.text(max_size=12), max_size=3),
)
def test_any_request_gives_a_text_or_a_client_error(body, content_type, explain, other_headers):
    headers = {**other_headers, **headers_for(content_type), "explain": explain}
    try:
        text = extract_text(as_torchserve(body, content_type), headers, LIMIT)
    except InputError as err:
        assert 400 <= err.status < 500
        assert err.kind and err.message
        assert json.loads(json.dumps(err.to_response()))["code"] == err.status
    else:
        assert text == text.strip() and 0 < len(text) <= LIMIT
        assert any(unicodedata.category(c)[0] in "LNS" for c in text)
        text.encode("utf-8")  # always valid Unicode


@given(text=texts, charset=st.sampled_from(["latin-1", "cp1252", "utf-16", "utf-8", "iso-8859-15", "shift_jis"]))
def test_the_declared_charset_is_honoured(text, charset):
    try:
        body = text.encode(charset)
    except UnicodeEncodeError:
        return
    content_type = f"text/plain; charset={charset}"
    if len(text.strip()) <= LIMIT:
        assert extract_text(as_torchserve(body, content_type), headers_for(content_type), LIMIT) == text.strip()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "kind"),
    [
        (b'{"text": "\\ud800 hi"}', "application/json", 400, "InvalidText"),
        (b'{"text": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400, "MalformedJSON"),
        # NaN and the infinities are not JSON, also in a field the service ignores.
        (b'{"text": "hi", "x": NaN}', "application/json", 400, "MalformedJSON"),
        (b'{"text": "hi", "x": [-Infinity]}', "application/json", 400, "MalformedJSON"),
        (b'{"text": "hi", "x": Infinity}', "application/json", 400, "MalformedJSON"),
        (b"\x00\x00\x01\x02", "text/plain", 400, "EmptyText"),
        ("\u200b\u200e\u202e\ufeff".encode(), "text/plain", 400, "EmptyText"),
        (b"hi", "text/plain; charset=klingon", 415, "UnsupportedCharset"),
        (b"hi", "image/png", 415, "UnsupportedMediaType"),
        (b"i feel great", "application/x-www-form-urlencoded", 415, "UnsupportedMediaType"),
        (b"x" * (LIMIT + 1), "text/plain", 413, "TextTooLong"),
        (b"", "text/plain", 400, "EmptyText"),
        (b"{}", "application/json", 400, "MissingField"),
        (b'{"text": 7}', "application/json", 400, "InvalidType"),
        (b'["a"]', "application/json", 400, "UnsupportedInput"),
    ],
)
def test_hostile_requests_get_their_documented_errors(body, content_type, status, kind):
    request = {} if "form" in content_type else as_torchserve(body, content_type)
    with pytest.raises(InputError) as info:
        extract_text(request, headers_for(content_type), LIMIT)
    assert (info.value.status, info.value.kind) == (status, kind)


def test_a_huge_number_in_an_ignored_field_does_not_make_the_request_unreadable():
    body = b'{"digits": ' + b"9" * 5000 + b', "text": "i feel calm"}'
    assert (
        extract_text(as_torchserve(body, "application/json"), headers_for("application/json"), LIMIT) == "i feel calm"
    )


def test_form_fields_and_the_explanations_endpoint():
    form = "application/x-www-form-urlencoded"
    assert extract_text({"text": bytearray(b"i feel great")}, headers_for(form), LIMIT) == "i feel great"
    with pytest.raises(InputError) as info:
        extract_text({"body": "i feel great"}, {"Content-Type": "text/plain", "explain": "True"}, LIMIT)
    assert (info.value.status, info.value.kind) == (400, "UnsupportedEndpoint")


def test_media_type_parsing():
    assert MediaType.parse('Text/Plain; CHARSET="Latin-1"') == MediaType("text/plain", "latin-1")
    assert MediaType.parse(None) == MediaType()
    assert MediaType.parse("application/problem+json").is_json
    assert not MediaType.parse("text/json").is_text
    assert check_text("  i feel ok \n", 100) == "i feel ok"


# Every name Python's codec registry knows, text encodings or not (base64, hex, zlib, rot13, ...),
# and names no registry knows (a NUL, an unpaired surrogate, quotes).
codec_names = sorted({*encodings.aliases.aliases, *encodings.aliases.aliases.values()})
NOT_TEXT = ["rot13", "base64", "hex", "zlib", "bz2", "uu", "quopri", "idna", "punycode", "undefined", "unicode_escape"]
charsets = st.sampled_from([*codec_names, *NOT_TEXT, "utf-7", "utf-8-sig"]) | st.text(max_size=12)


@settings(max_examples=400)
@given(
    body=st.binary(max_size=100) | texts.map(str.encode),
    charset=charsets,
    essence=st.sampled_from(["text/plain", "application/json", ""]),
    quoted=st.booleans(),
)
def test_any_charset_gives_a_text_or_a_client_error(body, charset, essence, quoted):
    content_type = f"{essence or 'text/plain'}; charset={json.dumps(charset) if quoted else charset}"
    headers = {**headers_for(essence), "Content-Type": content_type}
    try:
        text = extract_text(as_torchserve(body, essence), headers, LIMIT)
    except InputError as err:
        assert 400 <= err.status < 500
    else:
        assert text == text.strip() and any(unicodedata.category(c)[0] in "LNS" for c in text)
        declared = MediaType.parse(content_type).charset
        assert declared is None or codecs.lookup(declared)._is_text_encoding


@pytest.mark.parametrize("charset", NOT_TEXT)
def test_codecs_that_are_no_character_set_are_unsupported_charsets(charset):
    content_type = f"text/plain; charset={charset}"
    for body in (b"aGVsbG8gdGhlcmU=", b"i feel great", b"xn--i feel-", b"\\N{nope}"):
        with pytest.raises(InputError) as info:
            extract_text(as_torchserve(body, "text/plain"), headers_for(content_type), LIMIT)
        assert (info.value.status, info.value.kind) == (415, "UnsupportedCharset")


@given(text=texts, content_type=st.sampled_from(["text/plain", "application/json", "", "text/json"]))
def test_a_utf8_byte_order_mark_is_not_part_of_the_text(text, content_type):
    if len(text.strip()) > LIMIT:
        return
    body = json.dumps({"text": text}).encode() if "json" in content_type else text.encode()
    request = as_torchserve(b"\xef\xbb\xbf" + body, content_type)
    # Only the body's own mark goes: a U+FEFF inside the text is the client's text.
    assert extract_text(request, headers_for(content_type), LIMIT) == text.strip()


# Non-string JSON values, numbers bounded: read as a byte count, a larger one would take gigabytes.
non_string_json = st.recursive(
    st.booleans() | st.integers(-(10**6), 10**6) | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@given(value=non_string_json)
def test_a_form_field_sent_as_json_that_is_not_a_string_is_refused(value):
    # TorchServe parses a multipart part sent as application/json: the field arrives as that value.
    headers = {"Content-Type": "multipart/form-data; boundary=x", "text": {"content-type": "application/json"}}
    with pytest.raises(InputError) as info:
        extract_text({"text": value}, headers, LIMIT)
    assert (info.value.status, info.value.kind) == (400, "InvalidType")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json"])
def test_a_text_that_itself_starts_with_u_feff_keeps_it(content_type):
    text = "\ufeff i feel fine"
    body = json.dumps({"text": text}).encode() if "json" in content_type else text.encode()
    request = as_torchserve(b"\xef\xbb\xbf" + body, content_type)
    assert extract_text(request, headers_for(content_type), LIMIT) == text


def test_a_json_null_body_is_not_an_object():
    with pytest.raises(InputError) as info:
        extract_text(as_torchserve(b"null", "application/json"), headers_for("application/json"), LIMIT)
    assert (info.value.status, info.value.kind) == (400, "InvalidInput")


def test_a_long_text_is_refused_for_its_length_before_it_is_scanned():
    # A megabyte of NULs or zero-width spaces is not scanned character by character.
    for char in ("\x00", "\u200b", "\u3164"):
        with pytest.raises(InputError) as info:
            check_text(char * 1_000_000, LIMIT)
        assert (info.value.status, info.value.kind) == (413, "TextTooLong")


@given(
    extra=json_values,
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    content_type=st.sampled_from(["application/json", "text/json"]),
)
def test_nan_or_an_infinity_anywhere_in_a_json_body_is_refused(extra, bad, content_type):
    body = json.dumps({"text": "i feel fine", "x": [extra, {"deeper": bad}]}).encode()  # Python writes NaN
    with pytest.raises(InputError) as info:
        extract_text(as_torchserve(body, content_type), headers_for(content_type), LIMIT)
    assert (info.value.status, info.value.kind) == (400, "MalformedJSON")


@given(value=st.one_of(st.text(max_size=80), st.text(alphabet="aZ09._-", min_size=1, max_size=70)))
def test_a_request_id_is_echoed_only_when_it_is_one(value):
    from emotion_inputs import request_id

    valid = 1 <= len(value) <= 64 and all(c.isascii() and (c.isalnum() or c in "._-") for c in value)
    for name in ("X-Request-ID", "x-request-id", "X-REQUEST-ID"):
        assert request_id({name: value}, "fallback") == (value if valid else "fallback")
    assert request_id({}, "fallback") == "fallback" and request_id(None, "fallback") == "fallback"
