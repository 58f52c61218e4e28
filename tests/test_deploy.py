"""Deployment scripts. Google Cloud cannot be reached here: ``gcloud`` and ``docker`` are replaced by
stubs that record their arguments, so these tests check what the script would ask of them."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stub(bin_dir: Path, name: str, log: Path) -> None:
    path = bin_dir / name
    # "describe" answers "not found" so the script takes its create branches.
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\ncase "$*" in *describe*) exit 1;; esac\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def fake_cloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in ("gcloud", "docker"):
        stub(bin_dir, name, log)
    return bin_dir, log


def run_deploy(bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", **env)
    return subprocess.run(["bash", "deploy/gcp/deploy.sh"], cwd=ROOT, env=full_env, capture_output=True, text=True)


def test_deploy_requires_project_and_source_range(fake_cloud):
    bin_dir, _ = fake_cloud
    result = run_deploy(bin_dir)
    assert result.returncode != 0
    assert "PROJECT" in result.stderr


@pytest.fixture
def archive_present():
    """The script refuses to run without an archive; a placeholder stands in when none was built."""
    archive = ROOT / "model_store" / "emotion.mar"
    created = not archive.exists()
    if created:
        archive.touch()
    yield
    if created:
        archive.unlink()


def test_deploy_creates_gpu_vm_and_publishes_only_inference_and_metrics(fake_cloud, archive_present):
    bin_dir, log = fake_cloud
    result = run_deploy(bin_dir, PROJECT="demo-project", ALLOWED_SOURCE="203.0.113.0/24", TAG="test")
    assert result.returncode == 0, result.stderr
    calls = log.read_text()
    assert "docker build -f docker/serve.Dockerfile -t europe-west4-docker.pkg.dev/demo-project/emotion/" in calls
    assert "--allow=tcp:8080,tcp:8082 --source-ranges=203.0.113.0/24" in calls
    assert "--accelerator type=nvidia-l4,count=1" in calls
    assert "--gpus all" in calls and "8081" not in calls


def test_shell_scripts_parse():
    for script in [*ROOT.glob("deploy/gcp/*.sh"), *ROOT.glob("docker/*.sh"), ROOT / ".ci" / "run"]:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def test_serving_image_puts_the_gateway_in_front_of_torchserve():
    from serving.server import read_properties

    props = read_properties(ROOT / "docker" / "config.properties")
    entrypoint = (ROOT / "docker" / "serve-entrypoint.sh").read_text()
    dockerfile = (ROOT / "docker" / "serve.Dockerfile").read_text()
    torchserve_port = props["inference_address"].rsplit(":", 1)[1]
    assert props["inference_address"].startswith("http://127.0.0.1:")
    assert f"--upstream 127.0.0.1:{torchserve_port}" in entrypoint
    assert "--host 0.0.0.0 --port 8080" in entrypoint
    assert "EXPOSE 8080 8082" in dockerfile
    for path in ("gateway/nginx.conf", "serving/gateway.py", "docker/serve-entrypoint.sh"):
        assert path in dockerfile.replace(
            "serving/__init__.py serving/server.py serving/gateway.py", "serving/gateway.py"
        )
