"""Regenerate every figure of the exam report from the project's own files and commands.

python report/figures.py            # all figures into report/figures/
python report/figures.py --only architecture dvc_remote

Each figure comes from one source, named in its caption in report/README.md:

* ``architecture.png``: ``report/architecture.dot`` rendered with Graphviz ``dot``;
* ``training_curves.png``, ``train_confusion_matrix.png``: the plots the released training run wrote
  (``make train EXPERIMENT=full`` -> ``metrics/full/plots/``), copied unchanged;
* ``dvc_remote.png``: ``dvc list-url -R --size`` of the default DVC remote, each object named from
  the remote's own directory manifests, ``dvc.lock`` and the archives' manifests;
* ``local_images.png``: the local image store of the engine ``make image`` used (``buildah images``
  here, where no Docker engine runs) and the serving image's configuration; Google Cloud's registry
  cannot be reached from here;
* ``image_history.png``: the serving image's layer history (``buildah inspect``) and ``git log`` of
  the image, CI and deployment definitions;
  both keep the existing figure when no ``emotion-serve`` image is in the local store;
* ``loadtest.png`` (used by the project README): copied from ``loadtest/results/`` when
  ``make loadtest`` has written it, otherwise left as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
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


def image_engine() -> str | None:
    """The image engine `make image` used here: buildah where no Docker engine answers, else docker."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return "docker"
    return "buildah" if shutil.which("buildah") else None


def built_images() -> tuple[str, list[str]]:
    """The engine and the project's images in its local store (names starting localhost/emotion-)."""
    engine = image_engine()
    if engine is None:
        return "", []
    name = "{{.Name}}:{{.Tag}}" if engine == "buildah" else "{{.Repository}}:{{.Tag}}"
    listing = run([engine, "images", "--format", name], check=False).splitlines()
    return engine, sorted(name for name in listing if name.startswith(("localhost/emotion-", "emotion-")))


def serving_image(images: list[str]) -> str:
    """The serving image to describe: the one `make image` tags (:cpu) when present, else the newest."""
    serving = [name for name in images if "emotion-serve" in name]
    return next((name for name in serving if name.endswith(":cpu")), serving[-1] if serving else "")


def keep_or_missing(path: Path, why: str) -> Path:
    """An existing figure is kept when its source is gone (e.g. images removed); else name the command."""
    if path.is_file():
        print(f"{path.name}: {why}; figure kept as it is", file=sys.stderr)
        return path
    raise MissingSource(f"{why}: make image-smoke")


def local_images() -> Path:
    """The images `make image` built here, as the local image store lists them, and their configuration."""
    out = FIGURES / "local_images.png"
    engine, images = built_images()
    image = serving_image(images)
    if not image:
        return keep_or_missing(out, "no emotion-serve image in the local image store")
    lines = [f"$ {engine} images", *run([engine, "images"]).splitlines()]
    inspect = "{{.Docker.Config.User}} | {{.Docker.Config.ExposedPorts}} | {{.Docker.Config.Entrypoint}}"
    if engine == "buildah":
        config = run(["buildah", "inspect", "--type", "image", "--format", inspect, image]).strip()
    else:
        config = run(["docker", "image", "inspect", "--format", inspect.replace(".Docker.", ""), image]).strip()
    lines += ["", f"$ {engine} inspect {image}   (user | exposed ports | entrypoint)", config]
    return text_figure(
        f"No container registry: the images built here by make image ({engine}), in the local image store",
        lines,
        out,
    )


def image_history() -> Path:
    """The layer history of the serving image built here, and the commits of the build definitions."""
    out = FIGURES / "image_history.png"
    engine, images = built_images()
    image = serving_image(images)
    if not image:
        return keep_or_missing(out, "no emotion-serve image in the local image store")
    history_format = '{{range .Docker.History}}{{.Created}} | {{.CreatedBy}}{{"\\n"}}{{end}}'
    if engine == "buildah":
        history = run(["buildah", "inspect", "--type", "image", "--format", history_format, image]).splitlines()
    else:
        history = run(["docker", "history", "--no-trunc", "--format", "{{.CreatedAt}} | {{.CreatedBy}}", image])
        history = history.splitlines()[::-1]
    # one line per layer: the time to the second and the instruction, shortened
    layers = [f"{line[:19]}  {line.split(' | ', 1)[-1].replace('/bin/sh -c #(nop) ', '')[:92]}" for line in history]
    definitions = ["docker", "deploy", "cloudbuild.yaml", ".github", ".dockerignore"]
    log = run(["git", "log", "--date=short", "--format=%h %ad %s", "--", *definitions]).splitlines()
    lines = [
        f"$ {engine} inspect {image}   (layer history, oldest first)",
        *layers,
        "",
        f"$ git log --format='%h %ad %s' -- {' '.join(definitions)}",
        *[line[:140] for line in log],
    ]
    return text_figure(
        "No Cloud Build: the build history of the serving image made here, and of its definitions", lines, out
    )


def loadtest() -> Path | None:
    """The last `make loadtest` plot, when there is one (the project README shows it)."""
    source = ROOT / "loadtest" / "results" / "loadtest.png"
    return Path(shutil.copyfile(source, FIGURES / "loadtest.png")) if source.is_file() else None


FIGURE_MAKERS: dict[str, Callable[[], object]] = {
    "architecture": architecture,
    "training": training_plots,
    "dvc_remote": dvc_remote,
    "local_images": local_images,
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
