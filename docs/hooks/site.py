"""MkDocs hooks of the docs site (``mkdocs.yml``): what the site shows from outside ``docs/``.

* The figures the pipeline versions (``metrics/*/plots``, ``monitoring/figures``,
  ``report/figures``) at their repository paths, so that a page links them as the repository does.
* The exam report, ``report/README.md``, as the page ``report/``. The course template it follows
  quotes example figures that it does not ship (``figures/wandb.png``, ...); such a link to a file
  that does not exist keeps its words and loses its target, so that a strict build checks every
  link the report itself makes.
* The API description, ``reference/openapi.json``, and its page, ``reference/openapi.html``,
  written by ``serving.openapi`` from the same spec the gateway serves at ``/openapi.json`` and
  ``/docs``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from mkdocs.structure.files import File, Files

FIGURES = ("metrics/*/plots/*.png", "monitoring/figures/*.png", "report/figures/*.png")
LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def report_page(text: str, folder: Path) -> str:
    """``text`` (Markdown in ``folder``) with each link or image to a missing local file reduced
    to its words; web links, anchors and present files are kept."""

    def keep_or_drop(match: re.Match[str]) -> str:
        target = match.group(3)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            return match.group(0)
        if (folder / target.split("#", 1)[0]).exists():
            return match.group(0)
        return match.group(2)

    return LINK.sub(keep_or_drop, text)


def on_files(files: Files, config) -> Files:
    """Add the figures, the report and the API description to the site's files."""
    root = Path(config.config_file_path).resolve().parent  # mkdocs.yml sits at the project root
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from project import PROJECT_ROOT
    from serving import openapi

    for pattern in FIGURES:
        for path in sorted(PROJECT_ROOT.glob(pattern)):
            uri = path.relative_to(PROJECT_ROOT).as_posix()
            if files.get_file_from_path(uri) is None:
                files.append(File.generated(config, uri, abs_src_path=str(path)))
    report = PROJECT_ROOT / "report" / "README.md"
    files.append(File.generated(config, "report/index.md", content=report_page(report.read_text(), report.parent)))
    document = openapi.spec()
    files.append(File.generated(config, "reference/openapi.json", content=json.dumps(document, indent=2) + "\n"))
    files.append(File.generated(config, "reference/openapi.html", content=openapi.html(document)))
    return files
