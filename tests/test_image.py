"""The serving image: its Dockerfiles pass hadolint, its build context holds what it copies and
nothing else, the archive it packs carries only what the CPU backend reads, and (slow) the image
is built and run here: ``make image-smoke`` starts a container, gets a prediction through its
gateway on 127.0.0.1 and stops it, leaving no process behind."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from project import PROJECT_ROOT
from serving.server import read_properties

ROOT = PROJECT_ROOT
BIN = Path(sys.executable).parent
DOCKERFILES = sorted((ROOT / "docker").glob("*.Dockerfile"))
SERVE = ROOT / "docker" / "serve.Dockerfile"
TRAIN = ROOT / "docker" / "train.Dockerfile"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_reports_nothing(dockerfile):
    result = subprocess.run([BIN / "hadolint", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def copied(dockerfile: Path) -> list[str]:
    """The build-context paths a Dockerfile's COPY instructions take (``--chmod`` and the like dropped)."""
    sources = []
    for instruction, args in instructions(dockerfile):
        if instruction == "COPY" and "--from" not in args:
            sources += [a.rstrip("/*") for a in args.split() if not a.startswith("--")][:-1]
    return sources


def image_files(dockerfile: Path, into: Path) -> None:
    """Copy what ``dockerfile``'s COPY instructions take from the repository (not the build
    arguments, such as the archive) to the same paths under ``into``."""
    for source in copied(dockerfile):
        if "${" in source or not (ROOT / source).exists():
            continue
        target = into / source
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / source).is_dir() else shutil.copy)(ROOT / source, target)


def test_the_training_image_holds_every_module_training_imports(tmp_path):
    # The image's /srv: only what train.Dockerfile copies. Training must start from it (its CPU
    # module lives in handler/, which the serving side packs into archives).
    image_files(TRAIN, tmp_path)
    code = "import training.train; from training.runtime import resolve_precision; print(resolve_precision('auto'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() in ("bf16", "fp32")


def test_the_serving_image_holds_every_module_the_service_imports(tmp_path):
    # The serving image's /srv: only what serve.Dockerfile copies, no archive. The supervisor, the
    # gateway and the feedback service must all import from it (`python -m serving --help` imports
    # the whole CLI; the stack imports every module it starts).
    image_files(SERVE, tmp_path)
    code = "import runpy, sys; sys.argv = ['serving', '--help']; runpy.run_module('serving', run_name='__main__')"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage" in result.stdout


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last .dockerignore pattern matching the path or a parent folder decides."""
    parts = path.split("/")
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(c, pattern) or fnmatch.fnmatch(c, pattern.replace("**/", "")) for c in candidates):
            verdict = not negate
    return verdict


def test_build_context_holds_what_the_image_copies_and_no_data_or_models():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    for dockerfile in (SERVE, TRAIN):
        for source in copied(dockerfile):
            assert not ignored(source.replace("${ARCHIVE}", "model_store/emotion.mar"), patterns), (dockerfile, source)
    assert not ignored("docker/stage/wheels/torch.whl", patterns)  # bind-mounted into the pip step
    private = ["data/raw/train.txt", "models/emotion-full/model.safetensors", ".venv/bin/python", ".git/HEAD"]
    private += ["outputs/serve/keys.json", "serving/__pycache__/stack.cpython-311.pyc", "key_file.json"]
    for path in private:
        assert ignored(path, patterns), path


def test_the_images_torchserve_config_agrees_with_the_repositorys():
    """Every property both files set has the same value (the key lifetime among them: TorchServe
    keeps one key, so a shorter one in the image means more renewals, each a window of refused
    requests); the one deliberate difference is where the image keeps log4j2.xml (/srv)."""
    image = read_properties(ROOT / "docker" / "config.properties")
    repository = read_properties(ROOT / "config.properties")
    assert image["token_expiration_min"] == repository["token_expiration_min"] == "525600"
    log4j = "-Dlog4j.configurationFile="
    assert image["vmargs"].replace(f"{log4j}/srv/", log4j) == repository["vmargs"]
    # The image registers nothing after start (model API off); the repository's stack keeps it for
    # operators on the machine (make batching registers versions).
    assert image["enable_model_api"] == "false" and repository["enable_model_api"] == "true"
    apart = ("vmargs", "enable_model_api")
    assert {k: v for k, v in image.items() if k in repository and k not in apart} == {
        k: v for k, v in repository.items() if k in image and k not in apart
    }


def test_the_torch_index_is_never_an_extra_index():
    """Dependency confusion: with an extra index beside PyPI, pip takes a name from whichever has
    the higher version. The CPU wheel's index serves torch alone, in an install of its own."""
    text = SERVE.read_text()
    assert "--extra-index-url" not in text
    (line,) = [line for line in text.splitlines() if "--index-url" in line]
    assert line.strip() == 'pip install --no-deps --index-url "$TORCH_INDEX" "$TORCH"; \\'
    assert "TORCH=\"$(grep -m1 '^torch==' /tmp/requirements-serve.txt)\"" in text


def test_image_shape_non_root_healthcheck_layers_and_entrypoint():
    steps = instructions(SERVE)
    kinds = [kind for kind, _ in steps]
    user = [args for kind, args in steps if kind == "USER"]
    assert user and re.fullmatch(r"[1-9]\d*:[1-9]\d*", user[-1])  # numeric, not root
    (healthcheck,) = [args for kind, args in steps if kind == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/ready" in healthcheck and "Authorization" not in healthcheck
    copies = [args for kind, args in steps if kind == "COPY"]
    requirements = next(i for i, c in enumerate(copies) if "requirements-serve.txt" in c)
    code = next(i for i, c in enumerate(copies) if "serving/" in c)
    pip = next(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args)
    assert requirements < code and pip < kinds.index("COPY", pip)  # dependencies before code
    assert copies[-1].startswith("${ARCHIVE}")  # the model last: a new model rebuilds one layer
    (entrypoint,) = [json.loads(args) for kind, args in steps if kind == "ENTRYPOINT"]
    assert entrypoint[-1] == "/srv/serve-entrypoint.sh"
    script = (ROOT / "docker" / "serve-entrypoint.sh").read_text()
    assert 'exec python -m serving run --host 0.0.0.0 "$@"' in script
    args = {line.split()[1].split("=")[0] for line in SERVE.read_text().splitlines() if line.startswith("ARG ")}
    assert {"BASE_IMAGE", "VARIANT", "ARCHIVE"} <= args
    assert "EXPOSE 8080" in SERVE.read_text() and "8082" not in " ".join(a for k, a in steps if k == "EXPOSE")


@pytest.mark.slow
def test_onnx_only_archive_packs_the_graph_without_the_weights(tiny_model_dir, tmp_path):
    from serving.archive import ArchiveError, build_archive

    slim = build_archive(tiny_model_dir, tmp_path / "onnx", without_weights=True)
    names = set(zipfile.ZipFile(slim).namelist())
    assert "model-int8.onnx" in names and "tokenizer.json" in names and "config.json" in names
    assert not any(name.endswith((".safetensors", ".bin", ".pt")) for name in names)
    torch_config = tmp_path / "torch.yaml"
    config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    config["handler"] = {"backend": "torch", "precision": "fp32"}
    torch_config.write_text(yaml.safe_dump(config))
    with pytest.raises(ArchiveError, match="reads the weights"):
        build_archive(tiny_model_dir, tmp_path / "torch", model_config=torch_config, without_weights=True)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(2400)
def test_image_smoke_serves_a_prediction_on_loopback_and_stops_cleanly(tiny_model_dir, tmp_path):
    """``make image-smoke`` with the tiny model's ONNX-only archive. The first build on a machine
    debootstraps the base and installs the dependency layers (about 10 minutes here); later builds
    reuse the cached base and layers."""
    from serving.archive import build_archive

    archive = build_archive(tiny_model_dir, tmp_path / "store", without_weights=True)
    tag = "localhost/emotion-serve:test"
    result = subprocess.run(
        ["make", "--no-print-directory", "image-smoke", f"IMAGE_ARCHIVE={archive}", f"IMAGE_TAG={tag}"],
        cwd=ROOT, capture_output=True, text=True, timeout=2300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(next(line for line in reversed(result.stdout.splitlines()) if line.startswith("{")))
    assert report["image"] == tag and report["answer"]["label"] in report["answer"]["probabilities"]
    assert report["seconds_to_stop"] < 60
    # Nothing of the container is left: no namespace, no working container, no process.
    assert "emotion-smoke" not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    if report["engine"] == "buildah":
        containers = subprocess.run(["buildah", "containers", "--format", "{{.ContainerName}}"], capture_output=True)
        assert b"emotion-smoke" not in containers.stdout
        processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert "emotion-smoke" not in processes and "serve-entrypoint" not in processes


@pytest.mark.slow
@pytest.mark.integration
def test_the_images_torchserve_refuses_registration_but_scales(model_store, tmp_path):
    """With the image's ``enable_model_api=false`` a holder of the management key cannot register
    an archive (handler code), while scaling the served model still works."""
    from serving.client import ManagementError
    from tests.helpers import running_torchserve, wait_for

    image = read_properties(ROOT / "docker" / "config.properties")
    overrides = {"enable_model_api": image["enable_model_api"]}
    with running_torchserve(model_store, tmp_path / "ts", overrides=overrides, ready=("emotion",)) as server:
        with pytest.raises(ManagementError):
            server.client.register("emotion.mar", model_name="another")
        server.client.scale("emotion", 2)
        assert wait_for(lambda: server.client.ready_workers("emotion") == 2, 180)


def test_the_image_installs_every_package_but_torch_from_the_hashed_lock():
    """Supply chain: one version per package and the SHA-256 of its files (pip --require-hashes);
    torch alone by its exact version from its one index (the test above)."""
    from packaging.requirements import Requirement

    from docker.lock import LOCK, REQUIREMENTS, SEPARATE, locked_versions, normalise

    text = SERVE.read_text()
    assert "pip install --require-hashes --no-deps -r /tmp/requirements-serve.lock" in text
    lock = LOCK.read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", lock.split("\n", 3)[3].strip())
    assert len(entries) == len(locked_versions(lock)) > 10
    for entry in entries:
        assert re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+ \\$", entry.splitlines()[0]), entry
        assert all(re.fullmatch(r"\s+--hash=sha256:[0-9a-f]{64}( \\)?", line) for line in entry.splitlines()[1:]), entry
        assert len(entry.splitlines()) >= 2, entry  # at least one hash
    locked = locked_versions(lock)
    assert normalise(SEPARATE) not in locked  # torch: its own install
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            if requirement.name != SEPARATE:
                assert requirement.specifier.contains(locked[normalise(requirement.name)]), requirement
    # torch's own dependencies are locked too (its install has --no-deps)
    from importlib import metadata

    for declared in metadata.requires(SEPARATE):
        requirement = Requirement(declared)
        if requirement.marker is None:
            assert normalise(requirement.name) in locked, requirement


def test_the_serving_image_has_no_base_image_by_tag_alone():
    """FROM a BASE_IMAGE given at build time (by digest in Cloud Build), with no tag as default."""
    steps = instructions(SERVE)
    base_args = [args for kind, args in steps if kind == "ARG" and args.split("=")[0] == "BASE_IMAGE"]
    assert base_args and all("=" not in args for args in base_args)
    assert [args for kind, args in steps if kind == "FROM"] == ["${BASE_IMAGE}"]
