"""Run a private Prometheus (Debian's ``prometheus``) that scrapes a given TorchServe metrics address.

Used by the integration tests and by ``make monitor``; listens on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import requests
import yaml

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
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        """Start Prometheus and wait until it answers ``/-/ready``."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (make system-deps, or apt-get install prometheus)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config))
        self.log = (self.workdir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(self.workdir / 'prometheus.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"prometheus on {self.url} not ready after {timeout} s")

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
        """Stop Prometheus; safe to call twice."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
            self.log.close()
