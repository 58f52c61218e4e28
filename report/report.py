"""Render and check the exam report (report/README.md) against the course template.

python report/report.py check   # exit 1 and one line per problem, exit 0 when the report passes
python report/report.py html    # write report/report.html

`check` enforces what the template asks of each answer and of the document around the answers:

* every question is answered (no ``--- question N fill here ---`` left, no empty answer);
* word limits ("Answer length: A-B words"), counted twice: every whitespace-separated token of the
  answer, image links and code included (how the course's own script counts), and the prose alone
  (images and fenced code removed); both counts must lie within the limits;
* image counts where a question asks for images ("1 to 3 screenshots", "1-2 images", "one image",
  "a figure"); each image is a ``.png``/``.jpg``/``.jpeg`` in ``figures/`` that exists and is one;
* the text outside the answers is the template's, character for character, except that checklist
  boxes may be ticked, and only as ``[x]``;
* an answer contains neither ``Answer:`` nor ``##``: the course's script splits the report there.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPORT_DIR = Path(__file__).resolve().parent
REPORT = REPORT_DIR / "README.md"
TEMPLATE = REPORT_DIR / "template.md"
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]*)\)")
FENCED_CODE = re.compile(r"^```.*?^```", flags=re.M | re.S)
PLACEHOLDER = re.compile(r"--- question \d+ fill here ---")
QUESTION = re.compile(r"^### Question (\d+)\n(.*?)(?=^### |^## |\Z)", flags=re.M | re.S)
CHECKBOX = re.compile(r"^(\* )\[(.)\]", flags=re.M)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SIGNATURES = {".png": b"\x89PNG\r\n\x1a\n", ".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff"}
# How the template words its image requests, and the number of images each allows.
IMAGE_REQUESTS = (
    (re.compile(r"(\d+) to (\d+) screenshots", re.I), None),
    (re.compile(r"(\d+)-(\d+) images", re.I), None),
    (re.compile(r"\bone image\b", re.I), (1, 1)),
    (re.compile(r"\binclude a figure\b", re.I), (1, 1)),
)


@dataclass
class Question:
    """One question of the report: its prompt (the quoted block) and the answer given."""

    number: int
    prompt: str
    answer: str
    start: int  # offset of the answer in the document
    end: int

    @property
    def word_limits(self) -> tuple[int, int] | None:
        """(min, max) words from "Answer length: A-B words", or None when the question sets none."""
        match = re.search(r"Answer length: (\d+)-(\d+) words", self.prompt)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def image_limits(self) -> tuple[int, int] | None:
        """(min, max) images the prompt asks for, or None when it asks for none."""
        for pattern, fixed in IMAGE_REQUESTS:
            match = pattern.search(self.prompt)
            if match:
                return fixed or (int(match.group(1)), int(match.group(2)))
        return None

    @property
    def images(self) -> list[str]:
        """Paths of the images in the answer, as written."""
        return IMAGE.findall(self.answer)

    @property
    def words(self) -> int:
        """Every whitespace-separated token of the answer, images and code included."""
        return len(self.answer.split())

    @property
    def prose_words(self) -> int:
        """Words of the answer without its images and fenced code blocks."""
        return len(IMAGE.sub(" ", FENCED_CODE.sub(" ", self.answer)).split())


def parse(text: str) -> list[Question]:
    """Split the report into questions: the prompt up to its "Answer:" line, then the answer.

    The answer runs to the next heading. Prompts quote every line but one ("Answer:" of question 12
    is not quoted), so the prompt ends at the first line that is neither quoted nor blank, after
    an unquoted "Answer:" line when there is one.
    """
    questions = []
    for match in QUESTION.finditer(text):
        body, offset, position = match.group(2), match.start(2), 0
        for line in body.splitlines(keepends=True):
            stripped = line.strip()
            if stripped.startswith(">") or not stripped:
                position += len(line)
                continue
            if stripped.startswith("Answer:") and not stripped.removeprefix("Answer:").strip():
                position += len(line)
            break
        answer = body[position:]
        lead = len(answer) - len(answer.lstrip())
        answer = answer.strip()
        start = offset + position + lead
        questions.append(Question(int(match.group(1)), body[:position], answer, start, start + len(answer)))
    return questions


def skeleton(text: str) -> str:
    """The document with every answer blanked and every checkbox unticked: what must match the template."""
    parts, last = [], 0
    for q in parse(text):
        parts += [text[last : q.start], "<answer>"]
        last = q.end
    parts.append(text[last:])
    return CHECKBOX.sub(lambda m: f"{m.group(1)}[{' ' if m.group(2) == 'x' else m.group(2)}]", "".join(parts))


def template_problems(text: str, template: str) -> list[str]:
    """Lines outside the answers that differ from the template, and checkboxes not written [ ] or [x]."""
    problems = [
        f"checklist line {text.count(chr(10), 0, m.start()) + 1}: box [{m.group(2)}], expected [ ] or [x]"
        for m in CHECKBOX.finditer(text)
        if m.group(2) not in " x"
    ]
    ours, theirs = skeleton(text).splitlines(), skeleton(template).splitlines()
    diff = list(difflib.unified_diff(theirs, ours, "template", "report", n=0, lineterm=""))
    changed = [line for line in diff[2:] if line[:1] in "+-" and not line.startswith(("+* [", "-* ["))]
    if changed:
        problems.append(f"text outside the answers differs from the template: {'; '.join(changed[:4])[:300]}")
    numbers = [q.number for q in parse(template)]
    if [q.number for q in parse(text)] != numbers:
        problems.append(f"questions {[q.number for q in parse(text)]}, the template has {numbers}")
    return problems


def image_problems(q: Question, base: Path) -> list[str]:
    """Image count within what the question asks, and every image a real picture in figures/."""
    problems = []
    limits = q.image_limits
    if limits and not limits[0] <= len(q.images) <= limits[1]:
        problems.append(f"question {q.number}: {len(q.images)} image(s), expected {limits[0]}-{limits[1]}")
    if not limits and q.images:
        problems.append(f"question {q.number}: has image(s) but asks for none")
    for image in q.images:
        path = base / image
        suffix = Path(image).suffix.lower()
        if not image.startswith("figures/") or suffix not in IMAGE_SUFFIXES:
            problems.append(f"question {q.number}: image {image} must be a .png/.jpg/.jpeg in figures/")
        elif not path.is_file():
            problems.append(f"question {q.number}: image {image} not found")
        elif not path.read_bytes().startswith(SIGNATURES[suffix]):
            problems.append(f"question {q.number}: image {image} is not a {suffix} file")
    return problems


def check(text: str, base: Path = REPORT_DIR, template: str | None = None) -> list[str]:
    """Every problem of the report, one line each; empty when it passes.

    Args:
        text: The report (markdown).
        base: The folder image paths are relative to.
        template: The course template; None reads ``template.md`` next to this script.

    Returns:
        One line per problem, in document order.
    """
    questions = parse(text)
    if not questions:
        return ["no '### Question N' sections found"]
    template = TEMPLATE.read_text(encoding="utf-8") if template is None else template
    problems = template_problems(text, template)
    for q in questions:
        if PLACEHOLDER.search(q.answer) or not q.answer:
            problems.append(f"question {q.number}: not answered")
            continue
        for marker in ("Answer:", "##"):
            if marker in q.answer:
                problems.append(
                    f"question {q.number}: the answer contains '{marker}', where the course's script splits"
                )
        limits = q.word_limits
        if limits and not (limits[0] <= q.words <= limits[1] and limits[0] <= q.prose_words <= limits[1]):
            problems.append(
                f"question {q.number}: {q.words} words ({q.prose_words} without images and code), "
                f"expected {limits[0]}-{limits[1]}"
            )
        problems += image_problems(q, base)
    return problems


def render_html(text: str) -> str:
    """The report as a standalone HTML page."""
    import markdown

    body = markdown.markdown(text, extensions=["fenced_code", "tables"])
    head = "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Exam report</title></head><body>\n"
    return f"{head}{body}\n</body></html>\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: ``check`` exits 1 when the report has a problem."""
    parser = argparse.ArgumentParser(description="Check or render the exam report.")
    parser.add_argument("command", choices=["check", "html"])
    parser.add_argument("--report", type=Path, default=REPORT)
    parser.add_argument("--template", type=Path, default=TEMPLATE)
    args = parser.parse_args(argv)
    text = args.report.read_text(encoding="utf-8")
    if args.command == "html":
        out = args.report.with_name("report.html")
        out.write_text(render_html(text), encoding="utf-8")
        print(out)
        return 0
    problems = check(text, args.report.parent, args.template.read_text(encoding="utf-8"))
    for problem in problems:
        print(problem)
    print(f"{len(parse(text))} questions, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
