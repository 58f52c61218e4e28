"""CI/CD configuration as users set it up: the GitHub Actions workflow and cloudbuild.yaml are
validated against the schemas check-jsonschema vendors (SchemaStore's), the pre-commit config
with pre-commit's own validator; each is also checked for what it must do."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project import PROJECT_ROOT

ROOT = PROJECT_ROOT
BIN = Path(sys.executable).parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))


def check_schema(schema: str, path: Path) -> None:
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", schema, str(path)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_workflows_match_the_github_schema(workflow):
    check_schema("vendor.github-workflows", workflow)


def test_ci_workflow_runs_the_readme_test_command():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "ci.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as a boolean
    assert "pull_request" in triggers and triggers["push"]["branches"] == ["main"]
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    assert "bash .ci/run" in steps
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
    (job,) = workflow["jobs"].values()
    assert job["timeout-minutes"] <= 90


def test_cloudbuild_builds_and_pushes_the_gpu_and_the_cpu_image():
    check_schema("vendor.cloudbuild", ROOT / "cloudbuild.yaml")
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    # each image's `docker build` command line, as its step runs it
    commands = {s["id"]: shlex.split(s["args"][-1]) for s in build["steps"] if "docker build" in s["args"][-1]}
    builds = {
        next(a.rsplit("=", 1)[1] for a in command if a.startswith("--build-arg=VARIANT=")): {
            "id": name,
            "args": command,
        }
        for name, command in commands.items()
    }
    assert set(builds) == {"cuda", "cpu"}
    pushed = set()
    for step in builds.values():
        assert "--file=docker/serve.Dockerfile" in step["args"]
        # FROM the digest the base step resolved, the same for both images
        assert "--build-arg=BASE_IMAGE=$(cat /workspace/base-image)" in step["args"]
        tags = [a.split("=", 1)[1] for a in step["args"] if a.startswith("--tag=")]
        # the commit's tag only: no mutable tag (:latest-*) that a deployment could pick by mistake
        assert len(tags) == 1 and tags[0].endswith(":${_TAG}"), tags
        pushed |= set(tags)
    assert set(build["images"]) == pushed
    # The CPU pods' image is the one the cpu overlay names; the GPU's, the gpu overlay's.
    cpu_name = next(a for a in builds["cpu"]["args"] if a.startswith("--tag=")).split("=", 1)[1].rsplit(":", 1)[0]
    assert build["substitutions"]["_IMAGE_CPU"].endswith("/emotion-serve-cpu") and cpu_name == "${_IMAGE_CPU}"
    docker = builds["cuda"]
    tags = [a.split("=", 1)[1] for a in docker["args"] if a.startswith("--tag=")]
    # tagged with the commit (a trigger's SHORT_SHA; a manual build passes _TAG), refused without one
    assert build["substitutions"]["_TAG"] == "${SHORT_SHA}"
    assert any(tag.endswith(":${_TAG}") for tag in tags)
    (check,) = [s for s in build["steps"] if s["id"] == "tag"]
    assert all(subprocess.run(["bash", "-c", check["args"][1].replace("${_TAG}", value)]).returncode == code
               for value, code in (("", 1), ("abc1234", 0)))  # fmt: skip
    steps = [s["id"] for s in build["steps"]]
    assert steps.index("tag") < steps.index(docker["id"])
    (archive,) = [s for s in build["steps"] if s["id"] == "archive"]
    assert "core.no_scm true" in archive["args"][-1]  # DVC without .git in the build's source
    # The archive the image packs is fetched before the build (it is not in git).
    steps = [s["id"] for s in build["steps"]]
    assert all(steps.index("archive") < steps.index(step["id"]) for step in builds.values())
    trigger = subprocess.run(
        ["bash", "deploy/gcp/build-trigger.sh", "--dry-run", "--project", "p", "--repo-owner", "o", "--repo-name", "n"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert trigger.returncode == 0, trigger.stderr
    command = shlex.split(trigger.stdout)
    assert command[command.index("--branch-pattern") + 1] == "^main$"
    assert command[command.index("--build-config") + 1] == "cloudbuild.yaml"


def test_pre_commit_config_is_valid_and_runs_ruff_at_the_projects_version():
    config_path = ROOT / ".pre-commit-config.yaml"
    result = subprocess.run([BIN / "pre-commit", "validate-config", str(config_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(config_path.read_text())
    (ruff,) = [r for r in config["repos"] if r["repo"].endswith("/ruff-pre-commit")]
    assert {h["id"] for h in ruff["hooks"]} == {"ruff", "ruff-format"}
    installed = subprocess.run([BIN / "ruff", "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert ruff["rev"] == f"v{installed}"


def test_cloud_build_pins_what_it_installs():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    (archive,) = [s for s in build["steps"] if s["id"] == "archive"]
    assert re.search(r'"dvc\[gs\]==\d+\.\d+\.\d+"', archive["args"][-1]), archive["args"][-1]


def test_every_action_is_pinned_by_commit():
    """A tag can be moved to other code; a commit cannot. The tag it was stands beside it."""
    workflow = (ROOT / ".github" / "workflows" / "ci.yml").read_text()
    uses = re.findall(r"uses: (\S+)(.*)", workflow)
    assert uses
    for action, comment in uses:
        ref = action.partition("@")[2]
        assert re.fullmatch(r"[0-9a-f]{40}", ref), action
        assert re.search(r"# v\d+\.\d+\.\d+", comment), action


def test_cloudbuild_pins_the_base_image_by_digest(tmp_path):
    """The base step writes name@sha256:<digest> or fails: a tag alone never reaches a build."""
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    (base,) = [s for s in build["steps"] if s["id"] == "base"]
    assert all("base" in s.get("waitFor", []) for s in build["steps"] if "docker build" in s["args"][-1])
    script = base["args"][-1].replace("/workspace", str(tmp_path)).replace("${_BASE}", "debian:bookworm-slim")
    digest = "sha256:" + "ab" * 32
    ok = subprocess.run(["bash", "-c", script.replace("${_BASE_DIGEST}", digest)], capture_output=True, text=True)
    assert ok.returncode == 0 and (tmp_path / "base-image").read_text().strip() == f"debian:bookworm-slim@{digest}"
    for bad in ("sha256:abc", "latest"):
        refused = subprocess.run(["bash", "-c", script.replace("${_BASE_DIGEST}", bad)], capture_output=True)
        assert refused.returncode != 0
    # resolved with docker when no digest is given: a stand-in docker that answers a tag is refused
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "docker").write_text('#!/bin/sh\n[ "$1" = inspect ] && echo debian:bookworm-slim\nexit 0\n')
    (fake / "docker").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin"}
    unpinned = subprocess.run(["bash", "-c", script.replace("${_BASE_DIGEST}", "")], env=env, capture_output=True)
    assert unpinned.returncode != 0
