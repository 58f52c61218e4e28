"""The README's own sequence on a fresh clone: ``make serve``, traffic through the gateway,
``make drift``, ``make stop``, with nothing set that says where files are.

The clone's data are the fixture splits (at ``../shared/data/emotion``, where the data config looks
for them), so the default experiment trains in seconds. Only the ports move off their defaults, by
the settings' own environment overrides (servers in tests listen on free ports); ``LOG_LOCATION``,
``DRIFT_WINDOW`` and every other variable that names a folder or a window are unset: the request log
``make serve`` writes must be the one ``make drift`` reads.
"""

from __future__ import annotations

import json
import subprocess

import psutil
import pytest
import requests

from loadtest.closed_loop import ClosedLoop
from loadtest.texts import read_texts
from serving.server import free_port

from .helpers import copy_workspace

pytestmark = [pytest.mark.slow, pytest.mark.integration]

WINDOW = 1000  # monitoring/drift.yaml's drift_report.window: the requests `make drift` compares


def make(target: str, repo, env, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "--no-print-directory", target], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.timeout(1800)
def test_make_serve_traffic_make_drift_make_stop(tmp_path):
    repo, env = copy_workspace(tmp_path)
    (repo / ".venv").symlink_to(env["PATH"].split(":", 1)[0].removesuffix("/bin"))
    for name in ("LOG_LOCATION", "DRIFT_WINDOW", "EXPERIMENT", "TEACHER", "WANDB_MODE"):
        env.pop(name, None)
    port = free_port()
    env.update(
        EMOTION_SERVE_PORT=str(port), EMOTION_SERVE_METRICS_PORT=str(free_port()), EMOTION_SERVE_TS_FREE_PORTS="1"
    )
    try:
        serve = make("serve", repo, env, timeout=1500)
        assert serve.returncode == 0, serve.stdout[-4000:] + serve.stderr[-4000:]
        assert f"Ready: http://127.0.0.1:{port}" in serve.stdout
        key = subprocess.run(
            ["make", "-s", "key"], cwd=repo, env=env, capture_output=True, text=True, timeout=60, check=True
        ).stdout.strip()
        texts = read_texts(repo.parent / "shared" / "data" / "emotion" / "val.txt")
        url = f"http://127.0.0.1:{port}/predictions/emotion"
        with ClosedLoop(url, {"Authorization": f"Bearer {key}"}, texts, 4) as clients:
            assert clients.wait_answered(WINDOW, timeout=600)
        assert clients.result.statuses.count(200) >= WINDOW, clients.result.errors[:5]

        drift = make("drift", repo, env, timeout=600)
        assert drift.returncode in (0, 1), drift.stdout[-3000:] + drift.stderr[-3000:]  # 2: too few to tell
        summary = json.loads((repo / "outputs" / "drift" / "summary.json").read_text())
        assert summary["requests"] == WINDOW and summary["window"] == WINDOW
        assert summary["log_dir"] == str(repo / "outputs" / "serve" / "torchserve" / "logs")
    finally:
        stop = make("stop", repo, env, timeout=300)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/live", timeout=5)
    left = [p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(repo) in " ".join(p.info["cmdline"] or [])]
    assert not left, left
