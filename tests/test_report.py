"""The exam report checker and renderer."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("report_tool", ROOT / "report" / "report.py")
report = importlib.util.module_from_spec(spec)
sys.modules["report_tool"] = report  # dataclasses look their module up while the file executes
spec.loader.exec_module(report)

SAMPLE = """## Section

### Question 1
> **Say something.**
>
> Answer length: 3-5 words.
>
> Answer:

one two three four

### Question 2
> **Upload a screenshot.**
>
> Answer length: 1-10 words.
>
> Answer:

--- question 2 fill here ---

### Question 3
> **Include a figure of it.**
>
> Answer length: 2-3 words.
>
> Answer:

![x](figures/missing.png) far too many words here today
"""


def test_checker_finds_each_kind_of_problem(tmp_path):
    problems = report.check(SAMPLE, tmp_path)
    assert problems == [
        "question 2: not answered",
        "question 3: 6 words, expected 2-3",
        "question 3: image figures/missing.png not found",
    ]


def test_project_report_answers_every_question_within_limits():
    problems = report.check((ROOT / "report" / "README.md").read_text(), ROOT / "report")
    assert not [p for p in problems if "not answered" in p or "words" in p or "not found" in p], problems


def test_html_is_rendered():
    html = report.render_html(SAMPLE)
    assert "<h3>Question 1</h3>" in html and "<img" in html
