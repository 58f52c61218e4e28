"""The GPU VM deployment (deploy/gcp/). Google Cloud cannot be reached here: the tests read
``deploy.sh --dry-run`` (every command it would run, one per line) and, for the branches that
depend on what already exists, run it against recording stubs of ``gcloud`` and ``docker/image.sh``'s
engine. The VM-side files (startup script, Ops Agent config, TLS proxy config) are checked with
the real tools that can run here: bash, promtool and nginx."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
import yaml

from project import PROJECT_ROOT
from serving.server import free_port, read_properties
from tests.helpers import loopback_http_server

ROOT = PROJECT_ROOT
GCP = ROOT / "deploy" / "gcp"
BASE_ARGS = ["--project", "demo", "--allowed-source", "203.0.113.0/24", "--tls-cert", "c.pem", "--tls-key", "k.pem"]


def deploy(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(GCP / "deploy.sh"), *args], cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True
    )


def dry_run(*args: str) -> list[list[str]]:
    """The commands of a dry run, each split into its words (comments dropped)."""
    result = deploy("--dry-run", *BASE_ARGS, "--tag", "t1", *args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\nVM ")[0].splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.strip()]


def find(commands: list[list[str]], *words: str) -> list[list[str]]:
    """Commands that contain all ``words`` in this order."""

    def has(command: list[str]) -> bool:
        it = iter(command)
        return all(word in it for word in words)

    return [c for c in commands if has(c)]


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_every_gcloud_command_names_the_project_and_never_asks():
    commands = dry_run()
    gcloud = [c for c in commands if c[0] == "gcloud"]
    assert len(gcloud) > 10
    assert all(c[1:4] == ["--project", "demo", "--quiet"] for c in gcloud)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allowed-source", "203.0.113.0/24", "--tls-cert", "c", "--tls-key", "k"], "--project"),
        (["--project", "p", "--tls-cert", "c", "--tls-key", "k"], "--allowed-source"),
        (["--project", "p", "--allowed-source", "203.0.113.0/24"], "--tls-cert"),
        (["--project", "p", "--allowed-source", "my office", "--tls-cert", "c", "--tls-key", "k"], "not a CIDR"),
        (["--project", "p", "--allowed-source", "0.0.0.0/0", "--tls-cert", "c", "--tls-key", "k"], "whole internet"),
        (["--project", "p", "--allowed-source", "10.0.0.0/8,::/0", "--tls-cert", "c", "--tls-key", "k"], "whole"),
    ],
)
def test_refuses_incomplete_or_open_settings(args, message):
    result = deploy("--dry-run", *args)
    assert result.returncode != 0
    assert message in result.stderr
    assert "gcloud" not in result.stdout


def test_the_whole_internet_only_when_forced():
    commands = dry_run("--allowed-source", "0.0.0.0/0", "--allow-any-source")
    (rule,) = find(commands, "firewall-rules", "create", "emotion-serve-https")
    assert "--source-ranges=0.0.0.0/0" in rule


def test_dedicated_service_account_with_three_roles_and_narrow_scopes():
    commands = dry_run()
    sa = "serviceAccount:emotion-serve@demo.iam.gserviceaccount.com"
    assert find(commands, "iam", "service-accounts", "create", "emotion-serve")
    bindings = find(commands, "add-iam-policy-binding")
    granted = {(c[c.index("add-iam-policy-binding") - 1], flag(c, "--role")) for c in bindings}
    assert {flag(c, "--member") for c in bindings} == {sa}
    # Artifact Registry read on the one repository; metrics and logs on the project; the TLS
    # bucket's objects. Nothing else, and no editor/owner-like role anywhere.
    assert granted == {
        ("repositories", "roles/artifactregistry.reader"),
        ("projects", "roles/monitoring.metricWriter"),
        ("projects", "roles/logging.logWriter"),
        ("buckets", "roles/storage.objectViewer"),
    }
    (vm,) = find(commands, "compute", "instances", "create")
    assert flag(vm, "--service-account") == "emotion-serve@demo.iam.gserviceaccount.com"
    scopes = set(flag(vm, "--scopes").split(","))
    assert scopes == {"storage-ro", "monitoring-write", "logging-write"}
    assert not any("cloud-platform" in word for c in commands for word in c)


def test_inference_open_to_the_allowed_source_over_https_only():
    commands = dry_run("--allowed-source", "203.0.113.0/24,198.51.100.7/32")
    (rule,) = find(commands, "firewall-rules", "create", "emotion-serve-https")
    assert "--rules=tcp:443" in rule and "--source-ranges=203.0.113.0/24,198.51.100.7/32" in rule
    assert "--target-tags=emotion-serve" in rule
    # SSH only from Identity-Aware Proxy's range, for `gcloud compute ssh --tunnel-through-iap`
    (ssh,) = find(commands, "firewall-rules", "create", "emotion-serve-iap-ssh")
    assert "--rules=tcp:22" in ssh and "--source-ranges=35.235.240.0/20" in ssh
    opened = sorted(w for c in commands for w in c if w.startswith(("--rules=", "--allow=")))
    assert opened == ["--rules=tcp:22", "--rules=tcp:443"]  # never 8080 (plain HTTP), 8081 or metrics


def test_the_vm_and_its_rules_live_on_a_network_of_their_own():
    """Not the default network, whose default rules open SSH and RDP to the whole internet."""
    commands = dry_run()
    assert find(commands, "compute", "networks", "create", "emotion-serve", "--subnet-mode=custom")
    (subnet,) = find(commands, "networks", "subnets", "create", "emotion-serve")
    assert flag(subnet, "--network") == "emotion-serve" and flag(subnet, "--region") == "europe-west4"
    for command in find(commands, "firewall-rules", "create") + find(commands, "instances", "create"):
        assert flag(command, "--network") == "emotion-serve", command
    (vm,) = find(commands, "instances", "create")
    assert flag(vm, "--subnet") == "emotion-serve"


def test_tls_certificate_and_key_go_to_a_private_bucket():
    commands = dry_run()
    (bucket,) = find(commands, "storage", "buckets", "create")
    assert "--public-access-prevention" in bucket and "--uniform-bucket-level-access" in bucket
    assert find(commands, "storage", "cp", "c.pem", "gs://demo-emotion-tls/tls.crt")
    assert find(commands, "storage", "cp", "k.pem", "gs://demo-emotion-tls/tls.key")


def test_gpu_zone_machine_and_boot_image_are_options():
    defaults = find(dry_run(), "compute", "instances", "create")[0]
    assert flag(defaults, "--accelerator") == "type=nvidia-l4,count=1"
    assert flag(defaults, "--machine-type") == "g2-standard-4"
    assert flag(defaults, "--maintenance-policy") == "TERMINATE"  # GPU VMs cannot live-migrate
    custom = find(
        dry_run(
            *["--gpu-type", "nvidia-tesla-t4", "--gpu-count", "2", "--zone", "us-central1-b"],
            *["--machine-type", "n1-standard-8", "--boot-image-family", "common-cu124-debian-11"],
            *["--boot-image-project", "deeplearning-platform-release"],
        ),
        "compute",
        "instances",
        "create",
    )[0]
    assert flag(custom, "--accelerator") == "type=nvidia-tesla-t4,count=2"
    assert flag(custom, "--zone") == "us-central1-b"
    assert flag(custom, "--machine-type") == "n1-standard-8"
    assert flag(custom, "--image-family") == "common-cu124-debian-11"
    assert flag(custom, "--image-project") == "deeplearning-platform-release"


def test_builds_the_cuda_image_and_hands_the_vm_its_configs():
    commands = dry_run()
    (build,) = find(commands, "docker/image.sh", "build")
    image = "europe-west4-docker.pkg.dev/demo/emotion/emotion-serve:t1"
    assert flag(build, "--variant") == "cuda" and flag(build, "--tag") == image
    assert find(commands, "docker/image.sh", "push", image)
    (vm,) = find(commands, "compute", "instances", "create")
    files = dict(item.split("=", 1) for item in flag(vm, "--metadata-from-file").split(","))
    assert set(files) == {"startup-script", "ops-agent-config", "nginx-tls-config"}
    assert files["ops-agent-config"] == "deploy/gcp/ops-agent.yaml"
    assert files["nginx-tls-config"] == "deploy/gcp/nginx-tls.conf"
    # --image skips the build (an image that cloudbuild.yaml pushed).
    prebuilt = dry_run("--image", "europe-west4-docker.pkg.dev/demo/emotion/emotion-serve:abc123")
    assert not find(prebuilt, "docker/image.sh")


def test_alert_rules_of_monitoring_become_cloud_monitoring_policies():
    (migrate,) = find(dry_run(), "monitoring", "policies", "migrate")
    assert "--policies-from-prometheus-alert-rules-yaml=monitoring/alerts.yml" in migrate
    assert not find(dry_run("--skip-alerts"), "monitoring", "policies")


def recording_stub(bin_dir: Path, name: str, log: Path, existing: tuple[str, ...]) -> None:
    """A stand-in for ``name`` that logs its arguments; ``describe`` succeeds only for ``existing``."""
    path = bin_dir / name
    cases = "".join(f'  *describe*"{thing}"*) exit 0;;\n' for thing in existing)
    path.write_text(
        f'#!/bin/sh\necho "{name} $*" >> {log}\ncase "$*" in\n{cases}  *describe*) exit 1;;\nesac\nexit 0\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def cloud_stubs(tmp_path):
    """``gcloud`` and the image engine replaced by recording stubs (no Google Cloud here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_text("certificate")
    key.write_text("key")

    def run(existing: tuple[str, ...] = (), *args: str) -> list[str]:
        for name in ("gcloud", "docker"):
            recording_stub(bin_dir, name, log, existing)
        log.write_text("")
        env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", ENGINE="docker")
        result = deploy(
            *["--project", "demo", "--tls-cert", str(cert), "--tls-key", str(key)],
            *["--image", "europe-west4-docker.pkg.dev/demo/emotion/emotion-serve:abc", *args],
            env=env,
        )
        assert result.returncode == 0, result.stderr
        return log.read_text().splitlines()

    return run


def test_a_changed_allowed_source_updates_the_existing_rule(cloud_stubs):
    calls = cloud_stubs(("emotion-serve-https",), "--allowed-source", "198.51.100.0/24")
    (update,) = [c for c in calls if "firewall-rules update" in c]
    assert "--source-ranges=198.51.100.0/24" in update and "--allow=tcp:443" in update
    assert not [c for c in calls if "firewall-rules create emotion-serve-https" in c]


def test_an_existing_vm_gets_the_new_startup_script_and_restarts(cloud_stubs):
    calls = cloud_stubs(("emotion-serve --zone",), "--allowed-source", "203.0.113.0/24")
    assert [c for c in calls if "instances add-metadata emotion-serve" in c]
    # stopped and started, so that the guest shuts down and the container drains; never a power cycle
    stop = [i for i, c in enumerate(calls) if "instances stop emotion-serve" in c]
    start = [i for i, c in enumerate(calls) if "instances start emotion-serve" in c]
    assert stop and start and stop[0] < start[0]
    assert not [c for c in calls if "instances reset" in c]
    assert not [c for c in calls if "instances create" in c]


def test_startup_script_sets_up_driver_runtime_telemetry_tls_and_the_container():
    script = (GCP / "startup.sh").read_text()
    assert subprocess.run(["bash", "-n", str(GCP / "startup.sh")]).returncode == 0
    for step in ("nvidia-driver", "nvidia-ctk runtime configure --runtime=docker", "google-cloud-ops-agent", "nginx"):
        assert step in script
    (run_line,) = [line for line in script.replace("\\\n", " ").splitlines() if line.startswith("docker run")]
    run = shlex.split(run_line.replace('"$NETWORK_GATEWAY"', "172.30.0.1"))
    assert "--gpus" in run and flag(run, "--network") == "emotion"  # a bridge network, not the host's
    # published on the VM's loopback only: only nginx listens beyond it
    published = [run[i + 1] for i, a in enumerate(run) if a == "--publish"]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    assert {p.rsplit(":", 1)[1] for p in published} == {"8080", "8082", "8083"}
    # hardened: read-only root (tmpfs where it writes), no capability, no privilege gain
    assert "--read-only" in run and flag(run, "--cap-drop") == "ALL"
    assert flag(run, "--security-opt") == "no-new-privileges" and "/tmp:rw,size=2g" in run
    # the metadata server (the VM's token, the TLS bucket) is out of the container's reach
    assert re.search(r"iptables -I DOCKER-USER -s \"\$NETWORK_SUBNET\" -d 169\.254\.169\.254 -j DROP", script)
    assert script.index("DOCKER-USER") < script.index("docker run")
    # nginx's requests arrive from the network's gateway (Docker's proxy): the one trusted proxy
    assert "NETWORK_GATEWAY=172.30.0.1" in script and flag(run, "--trusted-proxy") == "172.30.0.1"
    assert "@IMAGE@" in script and "@REGISTRY@" in script and "@TLS_BUCKET@" in script


def test_the_vm_replaces_its_container_gracefully_and_rebuilds_the_driver_for_a_new_kernel():
    import yaml

    from serving.settings import RETRY_MARGIN

    script = (GCP / "startup.sh").read_text()
    flat = script.replace("\\\n", " ")
    # the longest request behind the gateway, the drain and TorchServe's stop fit in the stop timeout
    timeout = int(yaml.safe_load((ROOT / "handler" / "model-config.yaml").read_text())["responseTimeout"])
    (run_line,) = [line for line in flat.splitlines() if line.startswith("docker run")]
    (stop_line,) = [line for line in flat.splitlines() if line.startswith("docker stop")]
    budget = 2 + 3 * timeout + RETRY_MARGIN + 30
    assert int(flag(shlex.split(run_line), "--stop-timeout")) >= budget
    assert int(flag(shlex.split(stop_line), "--time")) >= budget
    assert "docker rm -f" not in script  # a SIGKILL would drop the requests in flight
    # earlier releases' images are removed once unused, so the boot disk does not fill up
    (prune,) = [line for line in flat.splitlines() if line.startswith("docker image prune")]
    assert "--all" in prune and "until=" in prune
    assert flat.index("docker run") < flat.index("docker image prune")  # after the new one runs
    # headers of the kernel flavour's metapackage, so DKMS builds the driver for every new kernel
    assert '"linux-headers-${KERNEL_FLAVOUR}"' in script and "dkms autoinstall" in script
    flavour = subprocess.run(
        [
            "bash",
            "-c",
            "uname() { echo 6.1.0-28-cloud-amd64; }; "
            + next(line for line in script.splitlines() if line.startswith("KERNEL_FLAVOUR="))
            + '; echo "$KERNEL_FLAVOUR"',
        ],
        capture_output=True,
        text=True,
    )
    assert flavour.stdout.strip() == "cloud-amd64"


def test_shell_scripts_parse():
    for script in [*GCP.glob("*.sh"), *ROOT.glob("docker/*.sh"), ROOT / ".ci" / "run"]:
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script


def ops_agent_jobs() -> dict[str, dict]:
    config = yaml.safe_load((GCP / "ops-agent.yaml").read_text())
    receivers = config["metrics"]["receivers"]
    pipelines = config["metrics"]["service"]["pipelines"]
    jobs = {}
    for name, pipeline in pipelines.items():
        for receiver in pipeline["receivers"]:
            assert receivers[receiver]["type"] == "prometheus", name
            jobs.update({job["job_name"]: job for job in receivers[receiver]["config"]["scrape_configs"]})
    return jobs


def test_vm_scrapes_torchserve_on_its_loopback_with_the_alert_rules_job_names():
    jobs = ops_agent_jobs()
    targets = [t for job in jobs.values() for group in job["static_configs"] for t in group["targets"]]
    assert targets and all(t.startswith("127.0.0.1:") for t in targets)
    metrics_address = read_properties(ROOT / "docker" / "config.properties")["metrics_address"]
    assert metrics_address.startswith("http://127.0.0.1:")
    assert metrics_address.removeprefix("http://") in [
        t for g in jobs["torchserve"]["static_configs"] for t in g["targets"]
    ]
    local = yaml.safe_load((ROOT / "monitoring" / "prometheus.yml").read_text())
    assert {j["job_name"] for j in local["scrape_configs"]} <= set(jobs)
    # Every job an alert rule selects is scraped on the VM, so the rules mean the same there.
    rules = (ROOT / "monitoring" / "alerts.yml").read_text()
    selected = set(re.findall(r'job="([^"]+)"', rules))
    assert selected
    assert selected <= set(jobs)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with `make system-deps`")
def test_ops_agent_scrape_configs_are_valid_prometheus(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": list(ops_agent_jobs().values())}))
    result = subprocess.run(["promtool", "check", "config", str(config)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def nginx_binary() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(nginx_binary() is None or shutil.which("openssl") is None, reason="needs nginx and openssl")
def test_tls_proxy_terminates_https_and_forwards_to_the_gateway(tmp_path):
    """nginx-tls.conf for real: a self-signed certificate, a stand-in gateway on loopback, one HTTPS request."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    seen: dict[str, str] = {}

    class Gateway(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.update(self.headers)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"ready")

        def log_message(self, *args):
            pass

    with loopback_http_server(Gateway) as upstream:
        port = free_port()
        server = (GCP / "nginx-tls.conf").read_text()
        server = server.replace("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl;")
        server = server.replace("listen [::]:443 ssl http2;", "")
        server = server.replace("/etc/nginx/tls/tls.crt", str(cert)).replace("/etc/nginx/tls/tls.key", str(key))
        server = server.replace("http://127.0.0.1:8080", f"http://{upstream}")
        assert str(cert) in server and upstream in server
        conf = tmp_path / "nginx.conf"
        conf.write_text(
            f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
            f"http {{\naccess_log off;\nclient_body_temp_path {tmp_path};\nproxy_temp_path {tmp_path};\n{server}\n}}\n"
        )
        nginx = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(tmp_path)], stderr=subprocess.PIPE)
        try:
            context = ssl.create_default_context(cafile=str(cert))
            pause = threading.Event()
            for _ in range(50):
                try:
                    with (
                        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
                        context.wrap_socket(raw, server_hostname="localhost") as tls,
                    ):
                        tls.sendall(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                        answer = b""
                        while chunk := tls.recv(4096):
                            answer += chunk
                    break
                except ConnectionRefusedError:
                    pause.wait(0.1)
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"Strict-Transport-Security" in answer and b"\r\nready\r\n" in answer
            assert b"nginx/" not in answer  # no version in the Server header
            assert seen["X-Forwarded-Proto"] == "https"
            # Plain HTTP on the TLS port is refused, not served.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                raw.sendall(b"GET /ready HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert b"ready" not in raw.recv(4096)
        finally:
            nginx.terminate()
            nginx.wait(timeout=10)


def test_the_vm_is_shielded_and_installs_only_signed_packages():
    """vTPM and integrity monitoring on (Secure Boot off, for the DKMS-built driver: the reason is
    in deploy.sh); the Ops Agent comes from Google's signed apt repository, not from a script run
    as root."""
    (vm,) = find(dry_run(), "instances", "create")
    assert "--shielded-vtpm" in vm and "--shielded-integrity-monitoring" in vm
    assert "Secure Boot\n  # refuses an unsigned kernel module" in (GCP / "deploy.sh").read_text()
    script = (GCP / "startup.sh").read_text()
    assert "add-google-cloud-ops-agent-repo.sh" not in script and "| bash" not in script.replace("\\\n", " ")
    assert "signed-by=/usr/share/keyrings/google-cloud-ops-agent.gpg" in script
    assert "apt-get install -y --no-install-recommends google-cloud-ops-agent" in script
