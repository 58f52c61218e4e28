"""The project's contract (project.py) is written once: no module repeats one of its literals, the
files that other tools read agree with it, and a change of one of its lines reaches every layer."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

import project
from project import PROJECT_ROOT

# Code that must take the contract from project.py: every tracked module but the contract itself,
# the tests (they address the served model by its URL), and report/ (scripts run by path, apart
# from the package layout; they read the project's outputs, not its contract).
CODE = sorted(
    PROJECT_ROOT / name
    for name in subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if name != "project.py" and not name.startswith(("tests/", "report/"))
)
PORTS = {project.GATEWAY_PORT, project.GATEWAY_METRICS_PORT, project.PROMETHEUS_PORT}
NAMES = {project.MODEL_NAME, project.ARCHIVE_NAME, project.SERVED_MODELS, "model_store", "outputs", "models"}


def contract_literals(path: Path) -> list[str]:
    """Where ``path`` writes a literal of the contract: a name, a folder, a port (as a number or
    inside an address), the project root derived from ``__file__``, or a handler module imported
    under the package name (a second module object beside the one TorchServe's worker loads)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    # A JSON field's name is no path, even where it spells a folder's ("outputs" of an OIP answer):
    # dict keys, subscripts and the key of .get() are not looked at.
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys.update(id(k) for k in node.keys if k is not None)
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get" and node.args:
            keys.add(id(node.args[0]))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PROJECT_ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Constant) and id(node) not in docstrings and id(node) not in keys:
            value = node.value
            if isinstance(value, int) and not isinstance(value, bool) and value in PORTS:
                found.append(f"{where} port {value}")
            elif isinstance(value, str) and (value in NAMES or any(re.search(rf":{port}\b", value) for port in PORTS)):
                found.append(f"{where} {value!r}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("handler."):
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and (
            node.attr == "parents" or (node.attr == "parent" and getattr(node.value, "attr", None) == "parent")
        ):  # a folder above the module's own: the project root again
            source = ast.unparse(node)
            if "__file__" in source:
                found.append(f"{where} {source}")
    return found


def test_the_scanner_finds_each_kind_of_literal(tmp_path):
    """The literal check itself: each kind it looks for is found, docstrings are not."""
    module = PROJECT_ROOT / "serving" / "_scanner_probe.py"
    module.write_text(
        '"""Serves emotion on 127.0.0.1:8080."""\n'
        "from pathlib import Path\n"
        "from handler.emotion_monitor import histogram\n"
        "A = 'emotion'\nB = 8080\nC = 'http://127.0.0.1:9090/api'\nD = 'emotion=emotion.mar'\n"
        "E = Path(__file__).resolve().parents[1]\nF = 'emotional'\nG = 80800\n"
    )
    try:
        found = contract_literals(module)
    finally:
        module.unlink()
    assert [line.split(" ", 1)[0].rsplit(":", 1)[1] for line in found] == ["3", "4", "5", "6", "7", "8"], found


def test_no_module_repeats_a_literal_of_the_contract():
    found = [hit for path in CODE for hit in contract_literals(path)]
    assert not found, "take these from project.py:\n" + "\n".join(found)


def makefile_code() -> str:
    """The Makefile without its comments and help texts (they describe, for people)."""
    lines = (PROJECT_ROOT / "Makefile").read_text().splitlines()
    return "\n".join(line.split("## ")[0] for line in lines if not line.lstrip().startswith("#"))


def test_the_makefile_takes_the_contract_from_project_py():
    code = makefile_code()
    for literal in (project.ARCHIVE_NAME, *map(str, PORTS), "models/", project.LOOPBACK):
        assert literal not in code, f"the Makefile writes {literal}: use the variables of outputs/contract.mk"
    assert "include $(CONTRACT)" in code and "project.py make" in code


def test_files_other_tools_read_agree_with_the_contract():
    addresses = project.torchserve_addresses()
    assert set(addresses) == {"inference", "management", "metrics"}
    assert all(urlsplit(url).hostname == project.LOOPBACK for url in addresses.values())
    ts_ports = {name: urlsplit(url).port for name, url in addresses.items()}
    # Nothing TorchServe listens on may collide with the gateway's or Prometheus' ports.
    assert not set(ts_ports.values()) & PORTS
    image = project.torchserve_addresses(PROJECT_ROOT / "docker" / "config.properties")
    assert {name: urlsplit(url).port for name, url in image.items()} == ts_ports
    scrape = {
        "torchserve": f"{project.LOOPBACK}:{ts_ports['metrics']}",
        "gateway": f"{project.LOOPBACK}:{project.GATEWAY_METRICS_PORT}",
        "rollout": f"{project.LOOPBACK}:{project.GATEWAY_METRICS_PORT}",
    }
    prometheus = yaml.safe_load((PROJECT_ROOT / "monitoring" / "prometheus.yml").read_text())
    ops_agent = yaml.safe_load((PROJECT_ROOT / "deploy" / "gcp" / "ops-agent.yaml").read_text())
    ops_jobs = ops_agent["metrics"]["receivers"]["emotion_prometheus"]["config"]["scrape_configs"]
    for jobs in (prometheus["scrape_configs"], ops_jobs):
        assert {job["job_name"]: job["static_configs"][0]["targets"][0] for job in jobs} == scrape
    deployment = yaml.safe_load((PROJECT_ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {port["name"]: port["containerPort"] for port in container["ports"]} == {
        "http": project.GATEWAY_PORT,
        "metrics": ts_ports["metrics"],
        "gateway-metrics": project.GATEWAY_METRICS_PORT,
    }
    serve = (PROJECT_ROOT / "docker" / "serve.Dockerfile").read_text()
    assert f"EXPOSE {project.GATEWAY_PORT}\n" in serve and f"{project.LOOPBACK}:{project.GATEWAY_PORT}/ready" in serve


def test_dvc_and_hydra_name_the_model_folders_as_the_contract_does():
    from training.config import experiment_paths

    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    pattern = project.model_dir("${experiment}").relative_to(PROJECT_ROOT).as_posix()
    assert pattern in stages["train"]["outs"][0] if isinstance(stages["train"]["outs"][0], str) else True
    mentioned = set(re.findall(r"models/[\w${}-]+", (PROJECT_ROOT / "dvc.yaml").read_text())) - {
        "models/teacher-${teacher}"
    }
    assert mentioned == {pattern}, mentioned
    archive = project.ARCHIVE.relative_to(PROJECT_ROOT).as_posix()
    assert archive in [out if isinstance(out, str) else next(iter(out)) for out in stages["archive"]["outs"]]
    assert experiment_paths("quick").model_dir == project.model_dir("quick")
    assert experiment_paths("quick").metrics_dir == project.METRICS_DIR / "quick"


PROBE = """
import inspect, json
from loadtest.settings import LoadTestSettings
from serving.client import TorchServeClient
from serving.gateway import GatewaySettings
from serving.__main__ import build_parser
from training.config import experiment_paths
import monitoring.drift as drift

stack = build_parser().parse_args(["run"])
print(json.dumps({
    "stack": [stack.port, stack.models, str(stack.model_store)],
    "gateway": [GatewaySettings().port, GatewaySettings().model],
    "client": inspect.signature(TorchServeClient.predict).parameters["model"].default,
    "loadtest": [LoadTestSettings().host, LoadTestSettings().model],
    "hydra": str(experiment_paths("default").model_dir),
    "drift": str(drift.pipeline_model_dir()),
}))
"""


@pytest.mark.slow
def test_a_change_of_the_contract_is_one_line(tmp_path):
    """Copy the tree, change the model name, the gateway's port and the models folder (one line of
    project.py each), and every layer follows: the CLIs' and clients' defaults, Hydra's paths, the
    Makefile's commands."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for name in files.stdout.split():
        if name.startswith(("tests/", "report/", "deploy/", "docs/")) or not (PROJECT_ROOT / name).is_file():
            continue
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / name, tmp_path / name)
    contract = tmp_path / "project.py"
    text = contract.read_text()
    for old, new in (
        ('MODEL_NAME = "emotion"', 'MODEL_NAME = "mood"'),
        ("GATEWAY_PORT = 8080", "GATEWAY_PORT = 18080"),
        ('MODELS_DIR = PROJECT_ROOT / "models"', 'MODELS_DIR = PROJECT_ROOT / "weights"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    contract.write_text(text)
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-3000:]
    import json

    seen = json.loads(probe.stdout.strip().splitlines()[-1])
    assert seen["stack"] == [18080, "mood=mood.mar", str(tmp_path / "model_store")]
    assert seen["gateway"] == [18080, "mood"]
    assert seen["client"] == "mood"
    assert seen["loadtest"] == ["http://127.0.0.1:18080", "mood"]
    assert seen["hydra"] == seen["drift"] == str(tmp_path / "weights" / "mood-default")
    make = subprocess.run(
        ["make", "-n", "--no-print-directory", "drift", "robustness"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert "--model-dir weights/mood-default" in make.stdout, make.stdout + make.stderr
    assert "--archive model_store/mood.mar" in make.stdout, make.stdout + make.stderr
    generated = (tmp_path / "outputs" / "contract.mk").read_text().splitlines()
    assert {"GATEWAY_PORT := 18080", "ARCHIVE := model_store/mood.mar", "MODELS_DIR := weights"} <= set(generated)


def test_the_pipeline_parameters_are_generated_and_untracked(tmp_path):
    """``make experiment`` writes params.yaml through project.py (no tracked file is edited); an
    absent file means the defaults, and an unchanged one is not rewritten."""
    params = tmp_path / "params.yaml"
    assert project.read_params(params) == {"experiment": project.DEFAULT_EXPERIMENT, "teacher": project.DEFAULT_TEACHER}
    assert project.write_params("quick", "full", params)
    before = params.stat().st_mtime_ns
    assert not project.write_params("quick", "full", params) and params.stat().st_mtime_ns == before
    assert project.read_params(params) == {"experiment": "quick", "teacher": "full"}
    assert project.current_experiment(params) == "quick" and project.pipeline_model_dir(params).name == "emotion-quick"
    ignored = subprocess.run(["git", "check-ignore", "-q", "params.yaml"], cwd=PROJECT_ROOT)
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", "params.yaml"], cwd=PROJECT_ROOT, capture_output=True
    )
    assert ignored.returncode == 0 and tracked.returncode != 0
    recipe = makefile_code().split("\nexperiment:", 1)[1].split("\n\n", 1)[0]
    assert "project.py params $(EXPERIMENT) $(TEACHER)" in recipe and "sed" not in recipe


def test_without_params_yaml_the_pipeline_is_what_dvc_lock_was_built_for(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  train:\n    cmd: python -m training.train\n    params:\n"
        "      params.yaml:\n        experiment: full\n        teacher: mpnet\n"
        "      training/conf/train/default.yaml:\n        experiment: not-this-one\n"
    )
    assert project.lock_params(lock) == {"experiment": "full", "teacher": "mpnet"}
    assert project.read_params(tmp_path / "params.yaml", lock) == {"experiment": "full", "teacher": "mpnet"}
    assert project.lock_params(tmp_path / "none.lock") == {}
    # the committed lock names the served experiment
    assert project.lock_params()["experiment"] == project.DEFAULT_EXPERIMENT
