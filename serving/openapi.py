"""The front door's OpenAPI 3.1 description, and a readable page of it that needs no network.

:func:`spec` describes every path the gateway serves: predictions (one text or a list), the Open
Inference Protocol v2, feedback, health, and this description itself, with every error each one
can answer (its status and ``type`` from the one error map, ``handler/emotion_errors.py``). The
gateway serves it as ``GET /openapi.json`` and :func:`html` as ``GET /docs`` (both written into
its folder at start). ``python -m serving.openapi [--out DIR]`` writes both files.
"""

from __future__ import annotations

import argparse
import html as html_escape
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from project import LABELS, MODEL_NAME, VERSION, handler_module

ERRORS = handler_module("emotion_errors").ERRORS
MAX_TEXTS = handler_module("emotion_inputs").MAX_TEXTS
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# What any request can meet before its route: nginx's own refusals and the limits.
ANY_REQUEST = (
    "BadRequest",
    "UnsupportedTransferEncoding",
    "UnsupportedHTTPVersion",
    "RequestTimeout",
    "BodyTooLarge",
    "URITooLong",
    "HeaderTooLarge",
    "TooManyRequests",
)
# Answered by TorchServe alone, never through the gateway (an explanation request sent to it).
NOT_AT_THE_FRONT_DOOR = ("UnsupportedEndpoint",)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*kinds: str) -> dict[str, Any]:
    """Responses for error ``kinds`` (and what any request may meet), grouped by status."""
    by_status = defaultdict(list)
    for kind in (*kinds, *ANY_REQUEST):
        by_status[ERRORS[kind].status].append(kind)
    responses = {}
    for status, names in sorted(by_status.items()):
        described = "; ".join(f"{k}: {ERRORS[k].when}" for k in dict.fromkeys(names))
        headers = {"Retry-After": {"schema": {"type": "string"}}} if any(ERRORS[k].retry for k in names) else {}
        responses[str(status)] = {"description": described, "content": _json(_ref("Error")), "headers": headers}
    return responses


def _operation(summary: str, ok: dict[str, Any], *kinds: str, **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": ok, **_errors(*kinds)}, **extra}


def _path_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


SECURITY = [{"gatewayKey": []}]


def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """A JSON object schema whose ``properties`` are all required but the ``optional`` ones."""
    return {"type": "object", "required": [k for k in properties if k not in optional], "properties": properties}


PREDICT_ERRORS = (
    "EmptyInput",
    "EmptyText",
    "InvalidEncoding",
    "InvalidText",
    "MalformedJSON",
    "MissingField",
    "InvalidType",
    "UnsupportedInput",
    "InvalidInput",
    "InvalidTexts",
    "UnreadableInput",
    "UntokenizableText",
    "InvalidAbstainThreshold",
    "InvalidPath",
    "Unauthorized",
    "ModelNotFound",
    "MethodNotAllowed",
    "LengthRequired",
    "TextTooLong",
    "UnsupportedCharset",
    "UnsupportedMediaType",
    "UnsupportedContentEncoding",
    "UnprocessableText",
    "NotReady",
    "Unavailable",
    "ServiceUnavailableException",
)


def schemas() -> dict[str, Any]:
    probabilities = {
        "type": "object",
        "properties": {label: {"type": "number", "minimum": 0, "maximum": 1} for label in LABELS},
        "required": list(LABELS),
    }
    request_id = {"type": ["string", "null"], "description": "the answer's id (X-Request-ID)"}
    error = {
        "type": "object",
        "required": ["code", "type", "message", "error"],
        "properties": {
            "code": {"type": "integer"},
            "type": {"type": "string", "enum": sorted(ERRORS)},
            "message": {"type": "string"},
            "error": {"type": "string", "description": "the message again: the Open Inference Protocol's field"},
            "request_id": request_id,
        },
    }
    prediction = {
        "type": "object",
        "required": ["label", "score", "probabilities", "truncated", "abstained"],
        "properties": {
            "label": {"type": ["string", "null"], "enum": [*LABELS, None]},
            "score": {"type": "number"},
            "probabilities": probabilities,
            "truncated": {"type": "boolean"},
            "abstained": {"type": "boolean"},
            "request_id": request_id,
        },
    }
    tensor = {
        "type": "object",
        "required": ["name", "datatype", "shape", "data"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array"},
        },
    }
    feedback_item = {
        "type": "object",
        "required": ["request_id", "label"],
        "properties": {
            "request_id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"},
            "label": {"enum": list(LABELS)},
        },
        "additionalProperties": False,
    }
    outcome = {
        "type": "object",
        "required": ["status", "result"],
        "properties": {
            "status": {"type": "integer"},
            "result": {"enum": ["accepted", "duplicate", "invalid", "unknown", "conflict", "expired"]},
            "request_id": {},
            "message": {"type": "string"},
        },
    }
    return {
        "Error": error,
        "Prediction": prediction,
        "PredictionList": {
            "type": "object",
            "required": ["predictions"],
            "properties": {
                "predictions": {"type": "array", "items": {"oneOf": [_ref("Prediction"), _ref("Error")]}},
                "request_id": request_id,
            },
        },
        "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "inputs": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["name", "datatype", "shape", "data"],
                        "properties": {
                            "name": {"type": "string"},
                            "datatype": {"const": "BYTES"},
                            "shape": {
                                "type": "array",
                                "items": {"type": "integer", "minimum": 1, "maximum": MAX_TEXTS},
                                "minItems": 1,
                                "maxItems": 1,
                            },
                            "data": {
                                "type": "array",
                                "items": {"type": "string"},
                                "minItems": 1,
                                "maxItems": MAX_TEXTS,
                            },
                        },
                    },
                },
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {"name": {"enum": ["label", "score", "probabilities", "error"]}},
                    },
                },
            },
        },
        "InferResponse": _object(
            {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {"type": "array", "items": tensor},
                "request_id": request_id,
            },
            optional=("model_version", "id", "request_id"),
        ),
        "Explanation": {
            "type": "object",
            "required": ["label", "score", "method", "words", "explained_words", "words_in_text"],
            "properties": {
                "label": {"enum": list(LABELS)},
                "score": {"type": "number"},
                "method": {"const": "occlusion"},
                "words": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["word", "attribution"],
                        "properties": {"word": {"type": "string"}, "attribution": {"type": "number"}},
                    },
                },
                "explained_words": {"type": "integer"},
                "words_in_text": {"type": "integer"},
                "request_id": request_id,
            },
        },
        "FeedbackItem": feedback_item,
        "Outcome": outcome,
        "FeedbackList": {
            "type": "object",
            "required": ["results", "counts"],
            "properties": {"results": {"type": "array", "items": outcome}, "counts": {"type": "object"}},
        },
    }


def spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the gateway."""
    model = _path_param("model", f"the model: {MODEL_NAME}", {"type": "string", "enum": [MODEL_NAME]})
    version = _path_param(
        "version", "one of the model's versions", {"type": "string", "pattern": NAME, "examples": ["1.0"]}
    )
    text_body = {
        "required": True,
        "content": {
            "text/plain": {"schema": {"type": "string"}},
            "application/json": {
                "schema": {
                    "oneOf": [
                        {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
                        {
                            "type": "object",
                            "required": ["texts"],
                            "properties": {
                                "texts": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 64}
                            },
                        },
                    ]
                }
            },
        },
    }
    abstain = {
        "name": "X-Emotion-Abstain-Below",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "this request's abstain threshold, a number from 0 to 1",
    }
    predict = _operation(
        'Classify one text, or a list of 1 to 64 ({"texts": [...]})',
        {
            "description": "the answer, or one per text",
            "content": _json({"oneOf": [_ref("Prediction"), _ref("PredictionList")]}),
        },
        *PREDICT_ERRORS,
        requestBody=text_body,
        security=SECURITY,
    )
    infer = _operation(
        "Open Inference Protocol v2 infer: one BYTES input of shape [N], N from 1 to 64",
        {"description": "label, score, probabilities and error per text", "content": _json(_ref("InferResponse"))},
        "InvalidInferenceRequest",
        *PREDICT_ERRORS,
        requestBody={"required": True, "content": _json(_ref("InferRequest"))},
        security=SECURITY,
    )
    metadata = _operation(
        "The model's metadata (input, outputs, labels)",
        {
            "description": "the metadata",
            "content": _json(
                _object({"name": {"type": "string"}, "inputs": {"type": "array"}, "outputs": {"type": "array"}})
            ),
        },
        "InvalidPath",
        "Unauthorized",
        "NotFound",
        "MethodNotAllowed",
        security=SECURITY,
    )
    model_ready = _operation(
        "Whether the model has a ready worker",
        {"description": "ready", "content": _json({"type": "object", "required": ["name", "ready"]})},
        "InvalidPath",
        "Unauthorized",
        "NotFound",
        "MethodNotAllowed",
        "NotReady",
        security=SECURITY,
    )
    health = {"description": "the state", "content": _json(_ref("Health"))}
    paths = {
        "/predictions/{model}": {"parameters": [model, abstain], "post": predict},
        "/predictions/{model}/{version}": {"parameters": [model, version, abstain], "post": predict},
        "/v2/models/{model}/infer": {"parameters": [model], "post": infer},
        "/v2/models/{model}/versions/{version}/infer": {"parameters": [model, version], "post": infer},
        "/v2/models/{model}": {"parameters": [model], "get": metadata},
        "/v2/models/{model}/versions/{version}": {"parameters": [model, version], "get": metadata},
        "/v2/models/{model}/ready": {"parameters": [model], "get": model_ready},
        "/v2/health/live": {
            "get": _operation(
                "Live", {"description": "live", "content": _json({"type": "object", "required": ["live"]})}
            )
        },
        "/v2/health/ready": {
            "get": _operation(
                "Ready",
                {"description": "ready", "content": _json({"type": "object", "required": ["ready"]})},
                "NotReady",
            )
        },
        "/v2": {
            "get": _operation(
                "The server's metadata",
                {"description": "name, version, extensions", "content": _json({"type": "object"})},
                "MethodNotAllowed",
            )
        },
        "/live": {"get": _operation("The gateway answers", health, "MethodNotAllowed")},
        "/ready": {
            "get": {
                "summary": "Whether predictions are served: a READY worker that gives the archive's golden answer",
                "responses": {"200": health, "503": health, **_errors("MethodNotAllowed")},
            }
        },
        "/feedback": {
            "post": {
                "summary": "The true label of served answers: one item, or a list of 1 to 1,000",
                "security": SECURITY,
                "requestBody": {
                    "required": True,
                    "content": _json(
                        {
                            "oneOf": [
                                _ref("FeedbackItem"),
                                {"type": "array", "items": _ref("FeedbackItem"), "minItems": 1, "maxItems": 1000},
                            ]
                        }
                    ),
                },
                "responses": {
                    "200": {
                        "description": "the outcome, or one per item",
                        "content": _json({"oneOf": [_ref("Outcome"), _ref("FeedbackList")]}),
                    },
                    **{str(status): {"description": "the item's outcome"} for status in (404, 409, 410)},
                    **_errors(
                        "InvalidFeedback",
                        "MalformedJSON",
                        "Unauthorized",
                        "MethodNotAllowed",
                        "NotFound",
                        "Unavailable",
                    ),
                },
            }
        },
        "/explanations/{model}": {
            "parameters": [model],
            "post": _operation(
                "Which words made the answer: occlusion through the serving engine (at most 48 words)",
                {"description": "each word's attribution to the label", "content": _json(_ref("Explanation"))},
                *PREDICT_ERRORS,
                "NotFound",
                requestBody={
                    "required": True,
                    "content": {
                        "text/plain": {"schema": {"type": "string"}},
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["text"],
                                "properties": {"text": {"type": "string"}, "label": {"enum": list(LABELS)}},
                            }
                        },
                    },
                },
                security=SECURITY,
            ),
        },
        "/openapi.json": {
            "get": _operation(
                "This description",
                {"description": "OpenAPI 3.1", "content": _json({"type": "object"})},
                "MethodNotAllowed",
            )
        },
        "/docs": {
            "get": _operation(
                "This description as a page",
                {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}},
                "MethodNotAllowed",
            )
        },
    }
    # A feedback item's refusal is its outcome (a 400 for an item that is no item, 404, 409, 410);
    # a body that is no feedback at all is an error.
    for status, response in paths["/feedback"]["post"]["responses"].items():
        if status in ("400", "404", "409", "410"):
            response["content"] = _json({"oneOf": [_ref("Outcome"), _ref("Error")]})
    for item in paths.values():
        for operation in (v for k, v in item.items() if k in ("get", "post")):
            operation["responses"]["default"] = {"description": "any other refusal", "content": _json(_ref("Error"))}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Emotion classifier",
            "version": VERSION,
            "description": "The gateway in front of TorchServe: six emotions of an English text.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": {"gatewayKey": {"type": "http", "scheme": "bearer", "description": "a gateway key"}},
        },
    }


def html(document: dict[str, Any]) -> str:
    """A page of ``document``: each path, its operations, parameters, body types and responses.
    Plain HTML and CSS, written here: it loads nothing from anywhere."""
    esc = html_escape.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<link rel='icon' href='data:,'>",  # no request for /favicon.ico, which nothing serves
        f"<title>{esc(document['info']['title'])} API</title>",
        "<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60em;margin:2em auto;padding:0 1em;color:#222}"
        "h2{border-top:1px solid #ccc;padding-top:.8em;font-family:monospace}"
        ".m{display:inline-block;min-width:3.5em;font-weight:bold;color:#fff;border-radius:3px;"
        "padding:0 .4em;margin-right:.5em;text-align:center}.get{background:#2a7ab0}.post{background:#3c8c3c}"
        "table{border-collapse:collapse;margin:.3em 0 1em}td,th{border:1px solid #ddd;padding:.2em .5em;"
        "text-align:left;vertical-align:top}code{font-size:90%}</style></head><body>",
        f"<h1>{esc(document['info']['title'])} <small>{esc(document['info']['version'])}</small></h1>",
        f"<p>{esc(document['info']['description'])} ",
        "The description itself: <a href='openapi.json'>openapi.json</a>.</p>",
    ]
    for path, item in document["paths"].items():
        parts.append(f"<h2 id='{esc(path)}'>{esc(path)}</h2>")
        for method in ("get", "post"):
            if method not in item:
                continue
            operation = item[method]
            parts.append(f"<p><span class='m {method}'>{method.upper()}</span>{esc(operation['summary'])}</p>")
            params = [*item.get("parameters", []), *operation.get("parameters", [])]
            if params:
                rows = "".join(
                    f"<tr><td><code>{esc(p['name'])}</code></td><td>{esc(p['in'])}</td>"
                    f"<td>{esc(p.get('description', ''))}</td></tr>"
                    for p in params
                )
                parts.append(f"<table><tr><th>parameter</th><th>in</th><th></th></tr>{rows}</table>")
            if "requestBody" in operation:
                types = ", ".join(f"<code>{esc(t)}</code>" for t in operation["requestBody"]["content"])
                parts.append(f"<p>Body: {types}</p>")
            if "security" in operation:
                parts.append("<p>Needs <code>Authorization: Bearer &lt;gateway key&gt;</code>.</p>")
            rows = "".join(
                f"<tr><td>{esc(status)}</td><td>{esc(response['description'])}</td></tr>"
                for status, response in operation["responses"].items()
            )
            parts.append(f"<table><tr><th>status</th><th>answer</th></tr>{rows}</table>")
    parts.append("</body></html>\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write openapi.json and its page, docs.html")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    document = spec()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "openapi.json").write_text(json.dumps(document, indent=2) + "\n")
    (args.out / "docs.html").write_text(html(document))
    print(f"written {args.out / 'openapi.json'} and {args.out / 'docs.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
