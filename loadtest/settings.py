"""Load-test settings shared by the Locust file and the runner."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadtest.texts import read_texts
from project import GATEWAY_URL, MODEL_NAME, PROJECT_ROOT, SERVE_DIR

DEFAULT_CONFIG = PROJECT_ROOT / "loadtest" / "config.yaml"
CONFIG_ENV = "LOADTEST_CONFIG"


@dataclass(frozen=True)
class LoadTestSettings:
    """See ``loadtest/config.yaml`` for the meaning of each field."""

    host: str = GATEWAY_URL
    model: str = MODEL_NAME
    texts_file: str = "data/processed/val.txt"
    json_share: float = 0.5
    spawn_rate: float = 4
    steps: list[dict] = field(default_factory=lambda: [{"users": 2, "seconds": 20}])
    max_users: int = 32
    p95_budget_ms: float = 500
    out_dir: str = "loadtest/results"

    @classmethod
    def load(cls, path: Path | str | None = None) -> LoadTestSettings:
        """Read the YAML file (default: ``$LOADTEST_CONFIG`` or ``loadtest/config.yaml``) and check it."""
        path = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
        settings = cls(**yaml.safe_load(path.read_text()))
        if not settings.host.startswith(("http://127.0.0.1", "http://localhost")):
            raise ValueError(f"{path}: host must be a loopback address, not {settings.host}")
        for step in settings.steps:
            if not 0 < int(step["users"]) <= settings.max_users or float(step["seconds"]) <= 0:
                raise ValueError(f"{path}: bad step {step} (1..{settings.max_users} users, positive seconds)")
        return settings

    @property
    def duration(self) -> float:
        """Total seconds of the stepped shape."""
        return sum(float(step["seconds"]) for step in self.steps)

    def texts(self, limit: int = 2000, seed: int = 0) -> list[str]:
        """Texts of the configured split file (``text;label`` lines), shuffled."""
        path = Path(self.texts_file)
        path = path if path.is_absolute() else PROJECT_ROOT / path
        if not path.is_file():
            raise FileNotFoundError(f"load-test texts not found: {path} (run `make data`, or set texts_file)")
        return read_texts(path, limit, seed)


def inference_key() -> str | None:
    """The key clients send: ``$EMOTION_INFERENCE_KEY``, or the newest gateway key of the
    service ``make serve`` started (``python -m serving key``)."""
    key = os.environ.get("EMOTION_INFERENCE_KEY")
    if key:
        return key
    from serving import keys

    try:
        return keys.valid_keys(SERVE_DIR / "keys.json")[0]
    except (OSError, ValueError, IndexError):
        return None
