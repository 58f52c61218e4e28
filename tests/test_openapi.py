"""The front door's OpenAPI 3.1 description: valid, complete against the gateway's routes and the
error map, served with its page, and held to by the live gateway under schemathesis."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from project import PROJECT_ROOT
from serving.openapi import ERRORS, NOT_AT_THE_FRONT_DOOR, html, spec
from serving.server import free_port
from serving.settings import GatewaySettings
from serving.stack import Stack
from tests.helpers import visit, wait_for

NGINX = PROJECT_ROOT / "serving" / "nginx.conf"
# The checks of "no 5xx and no answer that breaks the spec".
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
)


def test_the_description_is_valid_openapi_3_1():
    document = spec()
    validate(document)
    assert document["openapi"] == "3.1.0"


def test_every_route_of_the_gateway_is_described():
    """Each exact route of the template (``location = /path``), but those that answer for others,
    and each regex route's form, is a path of the description."""
    routes = {r.replace("@@MODEL@@", "{model}") for r in re.findall(r"location = (/[^\s{]+) \{", NGINX.read_text())}
    internal = {r for r in routes if r.startswith("/_")} | {"/metrics", "/metrics/rollout", "/stub_status"}
    paths = set(spec()["paths"])
    assert routes - internal <= paths, (routes - internal) - paths
    assert {"/predictions/{model}", "/predictions/{model}/{version}", "/v2/models/{model}/infer"} <= paths


def test_every_error_the_front_door_answers_is_described_with_its_status():
    described: dict[str, set[str]] = {}
    for item in spec()["paths"].values():
        for operation in (v for k, v in item.items() if k in ("get", "post")):
            for status, response in operation["responses"].items():
                for kind in re.findall(r"(\w+): ", response["description"]):
                    described.setdefault(kind, set()).add(status)
    for kind, error in ERRORS.items():
        if kind in NOT_AT_THE_FRONT_DOOR:
            continue
        assert kind in described, f"{kind} is in no response"
        assert described[kind] == {str(error.status)}, (kind, described[kind])


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.sources: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag, attrs):
        self._in_h2 = tag == "h2"
        self.sources += [v for k, v in attrs if k in ("src", "href") and v and "://" in v]

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)

    def handle_endtag(self, tag):
        self._in_h2 = False


def test_the_page_lists_every_path_and_loads_nothing_from_elsewhere():
    document = spec()
    page = Links()
    page.feed(html(document))
    assert page.headings == list(document["paths"])
    assert page.sources == []


@pytest.fixture(scope="module")
def stack(model_store, tmp_path_factory):
    # Limits far above what the fuzzer sends: it tests the API, the limits have their own tests.
    settings = GatewaySettings(
        port=free_port(),
        metrics_port=free_port(),
        rate=10000,
        burst=10000,
        key_rate=10000,
        explain_rate=1000,
        explain_burst=1000,
    )
    workdir = tmp_path_factory.mktemp("openapi") / "stack"
    running = Stack(model_store, workdir, settings, keys_file=workdir / "keys.json", free_ports=True, drain=0.5)
    try:
        running.start()
        running.wait_ready(120)
        # The explanation service loads its own copy of the model (until then, a 503 to retry).
        explained = wait_for(
            lambda: (
                requests.post(
                    f"{running.url}/explanations/emotion", data=b"i feel fine", headers=running.headers(), timeout=30
                ).status_code
                == 200
            ),
            120,
        )
        assert explained, "the explanation service never answered"
        yield running
    finally:
        running.stop()


@pytest.mark.slow
@pytest.mark.integration
def test_the_gateway_serves_the_description_and_its_page(stack):
    served = requests.get(f"{stack.url}/openapi.json", timeout=10)
    assert served.status_code == 200 and served.headers["Content-Type"].startswith("application/json")
    assert served.json() == json.loads(json.dumps(spec()))
    page = requests.get(f"{stack.url}/docs", timeout=10)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert all(f"<h2 id='{path}'>" in page.text for path in spec()["paths"])


@pytest.mark.slow
@pytest.mark.integration
def test_the_gateways_api_page_renders_in_chromium_with_every_path(stack, browser):
    """The page a user opens at ``/docs``, in a real browser: no console error, no request that
    fails or is refused (it loads nothing but itself), every path of the description listed, and
    its link to ``openapi.json`` answered by the gateway with the same description."""
    page, problems = visit(browser, f"{stack.url}/docs", screenshot="gateway-docs.png")
    try:
        assert problems == []
        assert page.locator("h2").all_inner_texts() == list(spec()["paths"])
        with page.expect_navigation() as followed:
            page.click("a[href='openapi.json']")
        assert page.url == f"{stack.url}/openapi.json" and followed.value.status == 200
        assert followed.value.json() == json.loads(json.dumps(spec()))
    finally:
        page.close()


@pytest.mark.slow
@pytest.mark.integration
def test_schemathesis_finds_no_server_error_and_no_answer_off_the_spec(stack, tmp_path):
    key = stack.headers()["Authorization"]
    report = tmp_path / "report"
    command = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{stack.url}/openapi.json",
        "--url",
        stack.url,
        "--header",
        f"Authorization: {key}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "25",
        "--seed",
        "20261207",
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--report",
        "junit",
        "--report-dir",
        str(report),
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    junit = next(report.glob("*.xml")).read_text()
    assert 'tests="0"' not in junit  # operations were exercised
