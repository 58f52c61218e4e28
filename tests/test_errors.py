"""One error map (handler/emotion_errors.py): the handler, the gateway's answers and the API page's
error table name every error type with the status the map gives it, and nothing else."""

from __future__ import annotations

import ast
import json
import re

from emotion_errors import ERRORS, error_body
from emotion_inputs import InputError
from hypothesis import given
from hypothesis import strategies as st

from project import HANDLER_DIR, PROJECT_ROOT
from serving.gateway import REFUSALS, feedback_route

NGINX = PROJECT_ROOT / "serving" / "nginx.conf"
API_PAGE = PROJECT_ROOT / "docs" / "api.md"  # the API page of the docs site holds the error table


def raised_kinds() -> set[str]:
    """The error types the handler's modules raise (``InputError("Kind", ...)``)."""
    kinds = set()
    for path in HANDLER_DIR.glob("emotion_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError":
                first = node.args[0]
                assert isinstance(first, ast.Constant), f"{path.name}:{node.lineno}: the type must be a literal"
                kinds.add(first.value)
    return kinds


def gateway_answers() -> list[tuple[int, dict]]:
    """Every JSON error answer the gateway's template returns: (status, body) of each ``return``,
    and of each refusal (``set $refusal '<body>'; rewrite ^ /_refuse/<status> last;``, the
    status ``/_refuse/<status>`` answers with). The health answers (``{"status": ...}``) are no
    errors."""
    text = NGINX.read_text() + "\n" + feedback_route(None)
    found = []
    returned = re.findall(r"return (\d{3}) '(\{.*?\})\\n';", text)
    refused = [
        (status, body)
        for body, status in re.findall(
            r"set \$refusal '(\{.*?\})\\n';\s*rewrite \^ /_refuse/(\d{3}) last;", text, flags=re.DOTALL
        )
    ]
    assert {int(status) for _, status in re.findall(r"(/_refuse/)(\d{3})", text)} <= set(REFUSALS)
    not_found = re.findall(r"map \$request_method \$not_found \{\s*default '(\{.*?\})\\n';", text)
    for status, body in [*returned, *refused, *(("404", body) for body in not_found)]:
        answer = json.loads(body.replace("@@MAX_TEXT_CHARS@@", "2000").replace("@@MODEL@@", "m"))
        if "status" not in answer:
            found.append((int(status), answer))
    return found


def test_the_handler_raises_only_types_of_the_map():
    kinds = raised_kinds()
    assert kinds, "no InputError found: the scan is broken"
    assert kinds <= set(ERRORS), kinds - set(ERRORS)
    assert {kind for kind, spec in ERRORS.items() if spec.source == "handler"} == kinds


def test_every_gateway_answer_is_in_the_map_with_its_status():
    answers = gateway_answers()
    assert len(answers) >= 15, "the template's JSON answers were not found: the scan is broken"
    for status, body in answers:
        spec = ERRORS.get(body["type"])
        assert spec is not None, f"the gateway answers {body['type']}, which the map does not have"
        assert status == body["code"] == spec.status, body
    gateway_types = {body["type"] for _, body in answers}
    # TextTooLong: the gateway answers it first; the handler's copy serves TorchServe direct.
    assert gateway_types - {"TextTooLong"} == {kind for kind, spec in ERRORS.items() if spec.source == "gateway"}


def test_the_api_pages_table_gives_each_type_its_status():
    rows = [line for line in API_PAGE.read_text().splitlines() if line.startswith("| ") and "`" in line]
    for kind, spec in ERRORS.items():
        mine = [row for row in rows if f"`{kind}`" in row or f"{spec.status} `{kind}`" in row]
        assert mine, f"the API page's error table has no row for {kind}"
        assert any(str(spec.status) in row for row in mine), f"{kind}: {spec.status} not in {mine}"


@given(st.sampled_from(sorted(k for k, s in ERRORS.items() if s.source == "handler")), st.text())
def test_a_handler_error_answers_the_map_status(kind, message):
    error = InputError(kind, message)
    assert error.status == ERRORS[kind].status
    expected = {"code": error.status, "type": kind, "message": message, "error": message}
    assert error.to_response() == error_body(kind, message) == expected


def test_an_unknown_type_is_refused():
    try:
        InputError("NoSuchKind", "x")
    except KeyError:
        return
    raise AssertionError("an InputError of a type outside the map was made")
