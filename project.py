"""Where the project's files are: the root every path is anchored at, and the experiment the
pipeline (``params.yaml``) builds. Standard library and PyYAML only, so every layer can import it."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent
HANDLER_DIR = PROJECT_ROOT / "handler"
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
# `make serve`'s work folder (serving.stack) and, inside it, TorchServe's log folder: where the
# handler writes the request log that `make drift` reads.
SERVE_DIR = PROJECT_ROOT / "outputs" / "serve"
SERVE_LOG_DIR = SERVE_DIR / "torchserve" / "logs"


def current_experiment(params_file: Path = PARAMS_FILE) -> str:
    """The Hydra experiment the DVC pipeline builds: ``experiment`` in ``params.yaml``."""
    return str(yaml.safe_load(params_file.read_text())["experiment"])


def handler_module(name: str) -> ModuleType:
    """Import one of ``handler/``'s modules as a TorchServe worker does: by file name, with
    ``handler/`` on ``sys.path`` (the handler's modules import each other that way)."""
    if str(HANDLER_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLER_DIR))
    return importlib.import_module(name)
