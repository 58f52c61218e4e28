"""Run a private Prometheus (Debian's ``prometheus``) that scrapes a given TorchServe metrics address.

Used by the integration tests and by ``make monitor``; listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
from pathlib import Path

import requests
import yaml

from project import LOOPBACK
from serving.process import ManagedProcess

MONITORING_DIR = Path(__file__).resolve().parent


class Prometheus:
    """A Prometheus process with its own config and TSDB under ``workdir``.

    Args:
        targets: ``host:port`` of TorchServe metrics endpoints to scrape.
        workdir: Folder for the generated config and the TSDB.
        port: Port for Prometheus' own HTTP API on 127.0.0.1.
        scrape_interval: Scrape and rule evaluation interval, e.g. ``1s`` in tests.
        rule_files: Rule files to load; default those of ``monitoring/prometheus.yml`` (the service
            alerts and the drift rules).
    """

    def __init__(
        self,
        targets: list[str],
        workdir: Path,
        port: int,
        scrape_interval: str = "15s",
        rule_files: list[Path] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.port = port
        config = yaml.safe_load((MONITORING_DIR / "prometheus.yml").read_text())
        config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
        if rule_files is None:
            rule_files = [MONITORING_DIR / name for name in config["rule_files"]]
        config["rule_files"] = [str(Path(path).resolve()) for path in rule_files]
        config["scrape_configs"][0]["static_configs"][0]["targets"] = targets
        self.config = config
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start Prometheus and wait until it answers ``/-/ready``."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (make system-deps, or apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        command = [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address={LOOPBACK}:{self.port}",
        ]
        self.process = ManagedProcess("Prometheus", command, self.workdir / "prometheus.log")
        self.process.start()

        def ready() -> bool:
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200
            return False

        try:
            self.process.wait_until(ready, timeout, f"ready on {self.url}")
        except Exception:
            self.stop()
            raise

    def query(self, expr: str) -> list[dict]:
        """Instant query through the HTTP API; returns the result vector."""
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        response.raise_for_status()
        return response.json()["data"]["result"]

    def alerts(self) -> list[dict]:
        """Active alerts (pending and firing) through the HTTP API."""
        response = requests.get(f"{self.url}/api/v1/alerts", timeout=10)
        response.raise_for_status()
        return response.json()["data"]["alerts"]

    def stop(self) -> None:
        """Stop Prometheus (SIGTERM, then SIGKILL after 15 s); safe to call twice."""
        if self.process is not None:
            self.process.stop(15, sig=signal.SIGTERM)
            self.process = None
