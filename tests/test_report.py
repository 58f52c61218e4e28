"""The exam report: its checker on good and bad reports, the project's own report, and its figures."""

import importlib.util
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from project import PROJECT_ROOT

ROOT = PROJECT_ROOT


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


report = load("report_tool", ROOT / "report" / "report.py")
figures = load("report_figures", ROOT / "report" / "figures.py")

TEMPLATE = """# A template

Keep everything outside the answers.

## Overall project checklist

* [ ] Do a thing
* [ ] Do another thing,
      over two lines

## Section

### Question 1
> **Say something.**
>
> Answer length: 3-5 words.
>
> Answer:

--- question 1 fill here ---

### Question 2
> **Upload one image of it.**
>
> Answer:

--- question 2 fill here ---

### Question 3
> **Insert 1-2 images of it.**
>
> Answer length: 2-6 words.
>
>
Answer:

--- question 3 fill here ---
"""

ANSWERS = {
    1: "one two three four",
    2: "![a](figures/a.png)",
    3: "![b](figures/b.png)\n\ntwo words",
}


def fill(template: str, answers: dict[int, str], ticks: tuple[str, ...] = ("Do a thing",)) -> str:
    text = template
    for number, answer in answers.items():
        text = text.replace(f"--- question {number} fill here ---", answer)
    for item in ticks:
        text = text.replace(f"* [ ] {item}", f"* [x] {item}")
    return text


@pytest.fixture
def workspace(tmp_path):
    """A report folder with the two figures the good report shows."""
    import matplotlib.pyplot as plt

    (tmp_path / "figures").mkdir()
    for name in ("a.png", "b.png"):
        plt.imsave(tmp_path / "figures" / name, [[0.0, 1.0]])
    (tmp_path / "template.md").write_text(TEMPLATE)
    return tmp_path


def run_check(folder: Path, text: str) -> tuple[list[str], int]:
    (folder / "README.md").write_text(text)
    problems = report.check(text, folder, TEMPLATE)
    code = report.main(["check", "--report", str(folder / "README.md"), "--template", str(folder / "template.md")])
    return problems, code


def test_good_report_passes(workspace):
    problems, code = run_check(workspace, fill(TEMPLATE, ANSWERS))
    assert problems == []
    assert code == 0


BAD = {
    "placeholder left": ({1: "--- question 1 fill here ---"}, (), "question 1: not answered"),
    "too many words": ({1: "one two three four five six seven"}, (), "question 1: 7 words"),
    "prose too short once code is removed": (
        {1: "one two\n\n```\nx\n```"},
        (),
        "question 1: 5 words (2 without images and code), expected 3-5",
    ),
    "image counted as a word by the course": (
        {3: "![b](figures/b.png) ![a](figures/a.png) " + "w " * 5},
        (),
        "7 words",
    ),
    "no image where one is asked": ({2: "no picture here"}, (), "question 2: 0 image(s), expected 1-1"),
    "two images where one is asked": ({2: "![a](figures/a.png) ![b](figures/b.png)"}, (), "question 2: 2 image(s)"),
    "image missing": ({2: "![a](figures/missing.png)"}, (), "image figures/missing.png not found"),
    "image of the wrong format": ({2: "![a](figures/a.gif)"}, (), "must be a .png/.jpg/.jpeg in figures/"),
    "image outside figures/": ({2: "![a](a.png)"}, (), "must be a .png/.jpg/.jpeg in figures/"),
    "text file named .png": ({2: "![a](figures/fake.png)"}, (), "figures/fake.png is not a .png file"),
    "image where none is asked": ({1: "one two three ![a](figures/a.png)"}, (), "question 1: has image(s)"),
    "'Answer:' inside an answer": ({1: "Answer: one two three"}, (), "contains 'Answer:'"),
    "'##' inside an answer": ({1: "one two ## three"}, (), "contains '##'"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_each_problem_is_reported_and_fails_the_check(workspace, case):
    answers, ticks, expected = BAD[case]
    (workspace / "figures" / "fake.png").write_text("not an image")
    problems, code = run_check(workspace, fill(TEMPLATE, {**ANSWERS, **answers}, ticks or ("Do a thing",)))
    assert any(expected in p for p in problems), problems
    assert code == 1


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda t: t.replace("* [ ] Do another", "* [X] Do another"), "box [X], expected [ ] or [x]"),
        (lambda t: t.replace("Say something.", "Say anything."), "differs from the template"),
        (lambda t: t.replace("Keep everything outside", "Drop everything outside"), "differs from the template"),
        (lambda t: t.split("### Question 3")[0], "questions [1, 2], the template has [1, 2, 3]"),
    ],
    ids=["checkbox", "prompt", "preamble", "question removed"],
)
def test_changes_outside_the_answers_fail_the_check(workspace, edit, expected):
    problems, code = run_check(workspace, edit(fill(TEMPLATE, ANSWERS)))
    assert any(expected in p for p in problems), problems
    assert code == 1


def test_project_report_passes_its_check():
    result = subprocess.run(
        [sys.executable, "report/report.py", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "27 questions, 0 problem(s)" in result.stdout


def course_style_answers(text: str) -> list[str]:
    """Answers cut the way the course's own script cuts them: after each "Answer:", up to the next "##"."""
    return [chunk.split("##")[0].strip() for chunk in text.split("Answer:")[1:]]


def test_project_report_meets_the_template_constraints_counted_independently():
    """A second reading of the constraints, from the template's prompts, without report.py's parser."""
    template = (ROOT / "report" / "template.md").read_text()
    text = (ROOT / "report" / "README.md").read_text()
    prompts = template.split("Answer:")[:-1]
    answers = course_style_answers(text)
    assert len(answers) == len(prompts) == 27
    for number, (prompt, answer) in enumerate(zip(prompts, answers, strict=True), start=1):
        prompt = prompt.rsplit("### Question", 1)[-1]
        words = len(answer.split())
        images = re.findall(r"!\[.*?\]\((.*?)\)", answer)
        assert answer and "fill here ---" not in answer, number
        if limits := re.search(r"Answer length: (\d+)-(\d+) words", prompt):
            assert int(limits[1]) <= words <= int(limits[2]), (number, words)
        wanted = re.search(r"(\d+) to (\d+) screenshots|(\d+)-(\d+) images|(one image|a figure)", prompt)
        if wanted and wanted[5]:
            assert len(images) == 1, number
        elif wanted:
            low, high = (int(g) for g in wanted.groups()[:4] if g)
            assert low <= len(images) <= high, number
        for image in images:
            assert (ROOT / "report" / image).is_file(), image


def test_html_is_rendered():
    html = report.render_html(fill(TEMPLATE, ANSWERS))
    assert "<h3>Question 1</h3>" in html and '<img alt="a" src="figures/a.png"' in html


def test_dvc_remote_objects_are_named_from_their_manifests(tmp_path):
    files = tmp_path / "files" / "md5"
    manifest, text, archive = "ab" + "1" * 30 + ".dir", "cd" + "2" * 30, "ef" + "3" * 30
    for md5 in (manifest, text, archive):
        (files / md5[:2]).mkdir(parents=True)
    (files / manifest[:2] / manifest[2:]).write_text(json.dumps([{"md5": text, "relpath": "train.txt"}]))
    (files / text[:2] / text[2:]).write_text("text;joy\n")
    with zipfile.ZipFile(files / archive[:2] / archive[2:], "w") as mar:
        mar.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "emotion", "modelVersion": "1.0"}}))
    names = figures.describe_objects(tmp_path)
    assert names == {
        manifest: "manifest of a directory: train.txt",
        text: "train.txt",
        archive: "model archive (.mar): emotion 1.0",
    }


def test_text_figure_is_a_png(tmp_path):
    path = figures.text_figure("title", ["$ command", "a long line " * 20], tmp_path / "out.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_serving_image_described_is_the_one_make_image_tags():
    assert figures.serving_image(["localhost/emotion-base:bookworm", "localhost/emotion-serve:cpu"]) == (
        "localhost/emotion-serve:cpu"
    )
    assert figures.serving_image(["localhost/emotion-base:bookworm", "localhost/emotion-serve:test"]) == (
        "localhost/emotion-serve:test"
    )
    assert figures.serving_image(["localhost/emotion-base:bookworm"]) == ""


def test_every_commit_the_documents_cite_is_in_the_history():
    """A commit id in the README, the docs site or the report (a backticked hex word: seven characters, git's short
    id, or longer with a letter in it, so that numbers are not taken for ids) names a commit of
    this repository, and the release commit pins the released experiment."""
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.stdout.strip() != "false":
        pytest.skip("a shallow clone (or no git) does not hold the history the documents cite")
    cited = set()
    for doc in ("README.md", "report/README.md", *sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*.md"))):
        words = re.findall(r"`([0-9a-f]{7,40})`", (ROOT / doc).read_text())
        cited |= {w for w in words if len(w) == 7 or re.search(r"[a-f]", w)}
    assert "9304955" in cited
    for commit in sorted(cited):
        kind = subprocess.run(["git", "cat-file", "-t", commit], cwd=ROOT, capture_output=True, text=True)
        assert kind.stdout.strip() == "commit", (commit, kind.stderr)
    params = subprocess.run(["git", "show", "9304955:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert re.search(r"^experiment: full$", params.stdout, re.M), params.stdout
