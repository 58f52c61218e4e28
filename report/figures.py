"""Regenerate every figure of the exam report from the project's own files and commands.

python report/figures.py            # all figures into report/figures/
python report/figures.py --only architecture dvc_remote

Each figure comes from one source, named in its caption in report/README.md:

* ``architecture.png``: ``report/architecture.dot`` rendered with Graphviz ``dot``;
* ``training_curves.png``, ``train_confusion_matrix.png``: the plots the released training run wrote
  (``make train EXPERIMENT=full`` -> ``metrics/full/plots/``), copied unchanged;
* ``dvc_remote.png``: ``dvc list-url -R --size`` of the default DVC remote, each object named from
  the remote's own directory manifests, ``dvc.lock`` and the archives' manifests;
* ``deploy_calls.png``: ``deploy/gcp/deploy.sh`` run against stubs of ``gcloud`` and ``docker`` that
  record their arguments (Google Cloud cannot be reached here; ``tests/test_deploy.py`` does the same);
* ``image_history.png``: ``git log`` of the image and deployment definitions and a run of
  ``pytest tests/test_deploy.py``, the checks CI runs on them;
* ``loadtest.png`` (used by the project README): copied from ``loadtest/results/`` when
  ``make loadtest`` has written it, otherwise left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "report" / "figures"
BIN = Path(sys.executable).parent


class MissingSource(RuntimeError):
    """A figure's source does not exist yet; the message names the command that makes it."""


def run(cmd: list[str], env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run a command in the project root and return its standard output."""
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stdout


def text_figure(title: str, lines: list[str], path: Path, width: int = 118) -> Path:
    """Render command output as a PNG: a title line, then the lines in a monospace font."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wrapped = [piece for line in lines for piece in (textwrap.wrap(line, width, subsequent_indent="    ") or [""])]
    height = 0.55 + 0.165 * (len(wrapped) + 2)
    fig = plt.figure(figsize=(0.082 * width + 0.6, height))
    fig.text(0.01, 1 - 0.3 / height, title, family="DejaVu Sans", weight="bold", fontsize=11, va="top")
    fig.text(0.01, 1 - 0.75 / height, "\n".join(wrapped), family="DejaVu Sans Mono", fontsize=9, va="top")
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)
    return path


def architecture() -> Path:
    """report/architecture.dot rendered with Graphviz."""
    if not shutil.which("dot"):
        raise MissingSource("Graphviz `dot` is missing: apt-get install -y graphviz")
    out = FIGURES / "architecture.png"
    run(["dot", "-Tpng", "-Gdpi=110", "report/architecture.dot", "-o", str(out)])
    return out


def training_plots() -> list[Path]:
    """The released training run's own plots (metrics/full/plots), copied unchanged."""
    outs = []
    for name in ("training_curves.png", "train_confusion_matrix.png"):
        source = ROOT / "metrics" / "full" / "plots" / name
        if not source.is_file():
            raise MissingSource(f"{source.relative_to(ROOT)} is missing: make train EXPERIMENT=full")
        outs.append(Path(shutil.copyfile(source, FIGURES / name)))
    return outs


def dvc_remote_url() -> str:
    """URL of the default DVC remote (.dvc/config)."""
    name = run([str(BIN / "dvc"), "config", "core.remote"]).strip()
    return run([str(BIN / "dvc"), "config", f"remote.{name}.url"]).strip()


def describe_objects(remote: Path) -> dict[str, str]:
    """What each object in a local DVC remote holds, by md5: from .dir manifests and .mar files.

    An object whose hash also appears in the repository's dvc.lock is marked so.
    """
    names: dict[str, str] = {}
    objects = sorted((remote / "files" / "md5").glob("*/*"))
    for path in objects:
        md5 = path.parent.name + path.name
        if md5.endswith(".dir"):
            entries = json.loads(path.read_text())
            names[md5] = f"manifest of a directory: {', '.join(e['relpath'] for e in entries)}"
            for entry in entries:
                names[entry["md5"]] = entry["relpath"]
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive, archive.open("MAR-INF/MANIFEST.json") as manifest:
                model = json.load(manifest)["model"]
            names[md5] = f"model archive (.mar): {model['modelName']} {model['modelVersion']}"
    lock_file = ROOT / "dvc.lock"
    lock = lock_file.read_text() if lock_file.is_file() else ""
    for md5 in list(names):
        if md5 in lock:
            names[md5] += " (hash in dvc.lock)"
    return names


def dvc_remote() -> Path:
    """Contents of the default DVC remote, listed by `dvc list-url`, each object named."""
    url = dvc_remote_url()
    remote = (ROOT / url).resolve() if not url.startswith(("/", "gs://", "s3://")) else Path(url)
    if url.startswith(("gs://", "s3://")) or not (remote / "files").is_dir():
        raise MissingSource(f"DVC remote {url} is empty or not local: make repro && .venv/bin/dvc push")
    listing = run([str(BIN / "dvc"), "list-url", "-R", "--size", str(remote)]).splitlines()
    names = describe_objects(remote)
    lines = [f"$ dvc list-url -R --size {url}", ""]
    # each directory manifest followed by the files it lists, then the objects no manifest lists
    rows = {
        relpath.replace("files/md5/", "").replace("/", ""): (size, relpath)
        for size, relpath in (line.split(maxsplit=1) for line in listing)
    }
    order = []
    for md5 in sorted((m for m in rows if m.endswith(".dir")), key=lambda m: names.get(m, "")):
        entries = json.loads((remote / "files" / "md5" / md5[:2] / md5[2:]).read_text())
        order += [md5, *sorted((e["md5"] for e in entries if e["md5"] in rows), key=lambda m: names[m])]
    order += sorted((m for m in rows if m not in order), key=lambda m: names.get(m, "~"))
    for md5 in order:
        size, relpath = rows[md5]
        lines.append(f"{size:>7}  {relpath:<52} {names.get(md5, '')}")
    config = run([str(BIN / "dvc"), "remote", "list"]).splitlines()
    lines += ["", "$ dvc remote list", *config]
    return text_figure(
        f"DVC remote '{url}' (default remote; stands in for the Cloud Storage bucket)",
        lines,
        FIGURES / "dvc_remote.png",
    )


def stub(bin_dir: Path, name: str, log: Path) -> None:
    """A command that records its arguments; "describe" fails so the script takes its create branches."""
    path = bin_dir / name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\ncase "$*" in *describe*) exit 1;; esac\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def deploy_calls() -> Path:
    """What deploy/gcp/deploy.sh asks of docker and gcloud, recorded by stubs."""
    archive = ROOT / "model_store" / "emotion.mar"
    placeholder = not archive.exists()  # the script only checks that the archive exists
    with tempfile.TemporaryDirectory() as tmp:
        bin_dir, log = Path(tmp), Path(tmp) / "calls.log"
        for name in ("gcloud", "docker"):
            stub(bin_dir, name, log)
        env = dict(
            os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PROJECT="demo-project", ALLOWED_SOURCE="203.0.113.0/24"
        )
        try:
            if placeholder:
                archive.touch()
            run(["bash", "deploy/gcp/deploy.sh"], env=env)
        finally:
            if placeholder:
                archive.unlink()
        calls = [
            line.split(" --metadata ")[0] + (" --metadata <startup script>" if " --metadata " in line else "")
            for line in log.read_text().splitlines()
        ]
    lines = ["$ PROJECT=demo-project ALLOWED_SOURCE=203.0.113.0/24 deploy/gcp/deploy.sh", "# calls recorded:", *calls]
    return text_figure(
        "No container registry: the build and push that deploy/gcp/deploy.sh performs (stubbed)",
        lines,
        FIGURES / "deploy_calls.png",
    )


def image_history() -> Path:
    """Commits that changed the image and deployment definitions, and the tests CI runs on them."""
    log = run(["git", "log", "--date=short", "--format=%h %ad %s", "--", "docker", "deploy"]).splitlines()
    tests = run(
        [str(BIN / "python"), "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "tests/test_deploy.py"],
        check=False,
    ).splitlines()
    lines = [
        "$ git log --date=short --format='%h %ad %s' -- docker deploy",
        *log,
        "",
        "$ pytest -q -rA tests/test_deploy.py",
        *[t for t in tests if t.strip() and not t.startswith("=")],
    ]
    return text_figure(
        "No Cloud Build: history of the image definitions and their checks", lines, FIGURES / "image_history.png"
    )


def loadtest() -> Path | None:
    """The last `make loadtest` plot, when there is one (the project README shows it)."""
    source = ROOT / "loadtest" / "results" / "loadtest.png"
    return Path(shutil.copyfile(source, FIGURES / "loadtest.png")) if source.is_file() else None


FIGURE_MAKERS: dict[str, Callable[[], object]] = {
    "architecture": architecture,
    "training": training_plots,
    "dvc_remote": dvc_remote,
    "deploy_calls": deploy_calls,
    "image_history": image_history,
    "loadtest": loadtest,
}


def main(argv: list[str] | None = None) -> int:
    """Make the figures; exit 1 naming the command to run when a source is missing."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(FIGURE_MAKERS), default=sorted(FIGURE_MAKERS))
    args = parser.parse_args(argv)
    FIGURES.mkdir(parents=True, exist_ok=True)
    missing = []
    for name in args.only:
        try:
            made = FIGURE_MAKERS[name]()
        except MissingSource as error:
            missing.append(f"{name}: {error}")
            continue
        for path in made if isinstance(made, list) else [made]:
            print(f"{name}: {path.relative_to(ROOT) if path else 'no source yet, figure kept as it is'}")
    for line in missing:
        print(line, file=sys.stderr)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
