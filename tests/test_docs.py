"""The docs site (``mkdocs.yml``, ``docs/``): it builds strictly, every page of its navigation
renders in a real headless Chromium with no console error, failed request or missing image, its
API reference lists every path of the OpenAPI description, its search works offline, and the
README stays the short front page that links into it. Screenshots of every page are kept in
``outputs/docs-screenshots/``."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from project import PROJECT_ROOT
from serving.openapi import spec

from .helpers import loopback_http_server, visit

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"


def nav_entries(nav) -> list[str]:
    """The files ``mkdocs.yml``'s navigation names, in order."""
    found = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        found += nav_entries(value) if isinstance(value, list) else [value]
    return found


def page_url(entry: str) -> str:
    """The site path of a navigation entry (MkDocs' directory URLs)."""
    if not entry.endswith(".md"):
        return entry
    stem = entry.removesuffix(".md")
    return "" if stem == "index" else stem.removesuffix("index") if stem.endswith("/index") else f"{stem}/"


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the browser's requests are checked, not logged
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def served(site):
    with loopback_http_server(functools.partial(Quiet, directory=str(site))) as address:
        yield f"http://{address}/"


def config() -> dict:
    # mkdocs.yml may carry YAML tags of MkDocs' own; this file uses none, so safe_load reads it.
    return yaml.safe_load((PROJECT_ROOT / "mkdocs.yml").read_text())


def test_every_page_in_docs_is_in_the_navigation_and_every_entry_exists():
    entries = nav_entries(config()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(e for e in entries if e.endswith(".md") and not e.startswith("report/")) == pages
    assert "report/index.md" in entries and "reference/openapi.html" in entries  # written by docs/hooks/site.py


@pytest.mark.slow
@pytest.mark.integration
def test_every_page_renders_in_chromium_without_errors(served, browser):
    entries = nav_entries(config()["nav"])
    for entry in entries:
        name = re.sub(r"[^a-z0-9]+", "-", entry.lower()).strip("-") + ".png"
        page, problems = visit(browser, served + page_url(entry), screenshot=name)
        try:
            assert problems == [], (entry, problems)
            heading = page.locator("h1").first.inner_text()
            assert heading.strip(), f"{entry} has no title"
            if entry.endswith(".md"):  # the theme's navigation lists every page
                links = page.locator("nav.md-nav--primary a.md-nav__link").count()
                assert links >= len(entries), (entry, links)
        finally:
            page.close()


@pytest.mark.slow
@pytest.mark.integration
def test_the_api_reference_lists_every_path_of_the_description(served, browser):
    page, problems = visit(browser, served + "reference/openapi.html")
    try:
        assert problems == []
        assert page.locator("h2").all_inner_texts() == list(spec()["paths"])
        described = page.request.get(served + "reference/openapi.json")
        assert described.ok and described.json()["paths"].keys() == spec()["paths"].keys()
    finally:
        page.close()
    api, problems = visit(browser, served + "api/")
    try:
        assert problems == []
        api.click("a[href$='reference/openapi.html']")
        api.wait_for_load_state("networkidle")
        assert api.url.endswith("reference/openapi.html")
    finally:
        api.close()


@pytest.mark.slow
@pytest.mark.integration
def test_search_finds_pages_offline(served, browser):
    page, problems = visit(browser, served)
    try:
        page.keyboard.press("s")  # the theme's shortcut to the search field; typing runs the query
        page.keyboard.type("runbook")
        results = page.locator(".md-search-result__item")
        results.first.wait_for(timeout=20_000)
        assert results.count() >= 1
        assert any(
            "runbook" in href
            for href in page.locator(".md-search-result__link").evaluate_all(
                "els => els.map(e => e.getAttribute('href'))"
            )
        )
        assert problems == []
    finally:
        page.close()


def test_the_readme_is_the_short_front_page_that_links_into_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) < 250
    assert "make serve" in text and "make test" in text
    linked = set(re.findall(r"\]\((docs/[^)#]+\.md)", text))
    pages = {f"docs/{p.relative_to(DOCS).as_posix()}" for p in DOCS.rglob("*.md")}
    assert linked == pages, pages ^ linked  # every page is reachable from the front page
    plain = re.sub(r"\[/[^\]]*\]", "", text)  # the table writes optional segments as [/versions/<v>]
    for path in spec()["paths"]:  # the API in one table: every route
        route = re.sub(r"/(\{version\}|versions/\{version\})", "", path.replace("{model}", "emotion"))
        assert f"{route}`" in plain or f"{route}," in plain, path


def test_the_runbook_has_a_section_for_every_alert_and_none_for_an_alert_that_does_not_exist():
    alerts = [
        rule["alert"]
        for name in ("alerts.yml", "drift_rules.yml")
        for group in yaml.safe_load((PROJECT_ROOT / "monitoring" / name).read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
    text = (DOCS / "runbook.md").read_text()
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    titled = {section.split("\n", 1)[0].strip(): section for section in sections}
    assert sorted(titled) == sorted(alerts)
    for alert, section in titled.items():  # what it means, what to look at, what to do
        assert all(part in section for part in ("**Means:**", "**Check:**", "**Do:**")), alert
