"""Render and check the exam report (report/README.md).

python report/report.py check   # every question answered, within its word limits, images present
python report/report.py html    # write report/report.html
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

REPORT_DIR = Path(__file__).resolve().parent
REPORT = REPORT_DIR / "README.md"
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")
PLACEHOLDER = re.compile(r"--- question \d+ fill here ---")
IMAGE_WORDS = ("upload", "insert 1-2 images", "include a figure", "screenshot")


@dataclass
class Question:
    """One question of the report: its limits and the answer given."""

    number: int
    prompt: str
    answer: str

    @property
    def word_limits(self) -> tuple[int, int] | None:
        match = re.search(r"Answer length: (\d+)-(\d+) words", self.prompt)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def wants_image(self) -> bool:
        return any(word in self.prompt.lower() for word in IMAGE_WORDS)

    @property
    def images(self) -> list[str]:
        return IMAGE.findall(self.answer)

    @property
    def words(self) -> int:
        return len(IMAGE.sub("", self.answer).split())


def parse(text: str) -> list[Question]:
    """Split the report into questions: the quoted prompt, then the answer up to the next heading."""
    questions = []
    for match in re.finditer(r"^### Question (\d+)\n(.*?)(?=^### |^## |\Z)", text, flags=re.M | re.S):
        body = match.group(2)
        prompt_lines, answer_lines, in_prompt = [], [], True
        for line in body.splitlines():
            if in_prompt and (line.startswith(">") or not line.strip()) and not answer_lines:
                prompt_lines.append(line)
                continue
            in_prompt = False
            answer_lines.append(line)
        answer = "\n".join(answer_lines).strip()
        if answer.startswith("Answer:"):  # a prompt whose "Answer:" line is not quoted
            answer = answer.removeprefix("Answer:").strip()
        questions.append(Question(int(match.group(1)), "\n".join(prompt_lines), answer))
    return questions


def check(text: str, base: Path = REPORT_DIR) -> list[str]:
    """Every problem of the report, one line each; empty when it passes."""
    problems = []
    questions = parse(text)
    if not questions:
        return ["no '### Question N' sections found"]
    for q in questions:
        if PLACEHOLDER.search(q.answer) or not q.answer:
            problems.append(f"question {q.number}: not answered")
            continue
        limits = q.word_limits
        if limits and not limits[0] <= q.words <= limits[1]:
            problems.append(f"question {q.number}: {q.words} words, expected {limits[0]}-{limits[1]}")
        if q.wants_image and not q.images:
            problems.append(f"question {q.number}: asks for an image, none included")
        problems += [f"question {q.number}: image {i} not found" for i in q.images if not (base / i).is_file()]
    return problems


def render_html(text: str) -> str:
    """The report as a standalone HTML page."""
    import markdown

    body = markdown.markdown(text, extensions=["fenced_code", "tables"])
    head = "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Exam report</title></head><body>\n"
    return f"{head}{body}\n</body></html>\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Check or render the exam report.")
    parser.add_argument("command", choices=["check", "html"])
    parser.add_argument("--report", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    text = args.report.read_text(encoding="utf-8")
    if args.command == "html":
        out = args.report.with_name("report.html")
        out.write_text(render_html(text), encoding="utf-8")
        print(out)
        return 0
    problems = check(text, args.report.parent)
    for problem in problems:
        print(problem)
    print(f"{len(parse(text))} questions, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
