"""The project's contract: the names, ports and folders that every layer shares, each written once.

Everything else reads them from here: Python modules import them, the Makefile includes
``outputs/contract.mk`` (``python3 project.py make`` writes it), and ``tests/test_contract.py``
fails where one of these literals is written again elsewhere, or where a file that a tool other
than Python reads (TorchServe's ``config.properties``, Prometheus' scrape config, the Kubernetes
and Compute Engine files) disagrees with them. Standard library only (PyYAML is imported where a
function needs it), so that the Makefile can run it before the virtualenv exists.

What is not here has one owner of its own, named in docs/architecture.md:
TorchServe's ports are ``config.properties`` (:func:`torchserve_addresses` reads them), the
drift window is ``monitoring/drift.yaml``, the training recipe is Hydra's ``training/conf``.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PROJECT_ROOT = Path(__file__).resolve().parent

# The model: the name clients use in /predictions/<name>, and the archive TorchServe serves it from.
MODEL_NAME = "emotion"
# The service's version: pyproject.toml's (a test keeps them equal); OIP's server metadata gives it.
VERSION = "1.0.0"
# The order of the public dataset's integer ids (dair-ai/emotion): 0 sadness .. 5 surprise.
LABELS: tuple[str, ...] = ("sadness", "joy", "love", "anger", "fear", "surprise")
ARCHIVE_NAME = f"{MODEL_NAME}.mar"
MODEL_STORE = PROJECT_ROOT / "model_store"
ARCHIVE = MODEL_STORE / ARCHIVE_NAME
# The archive of the serving image: only what its backend reads (the ONNX graph, no weights).
IMAGE_ARCHIVE = MODEL_STORE / "onnx" / ARCHIVE_NAME
# TorchServe's --models argument for the served model.
SERVED_MODELS = f"{MODEL_NAME}={ARCHIVE_NAME}"

# Where the trained models and their metrics go: models/<model>-<experiment>/, metrics/<experiment>/
# (the Hydra paths group and dvc.yaml name them the same way; tests/test_contract.py checks both).
MODELS_DIR = PROJECT_ROOT / "models"
# The validated splits the data stage writes (the Hydra paths group's data_dir).
DATA_DIR = PROJECT_ROOT / "data" / "processed"
TRAIN_FILE = DATA_DIR / "train.txt"
VAL_FILE = DATA_DIR / "val.txt"
METRICS_DIR = PROJECT_ROOT / "metrics"
OUTPUTS_DIR = PROJECT_ROOT / "outputs"
HANDLER_DIR = PROJECT_ROOT / "handler"
# The DVC pipeline's parameters: which Hydra experiment it builds and which teaches it. The file is
# generated and untracked (`make experiment`, :func:`write_params`); without it, the defaults.
PARAMS_FILE = PROJECT_ROOT / "params.yaml"
DVC_LOCK = PROJECT_ROOT / "dvc.lock"
DEFAULT_EXPERIMENT = "default"  # the model `make serve` serves
DEFAULT_TEACHER = "none"
TORCHSERVE_CONFIG = PROJECT_ROOT / "config.properties"

# The network: every server the project starts on a machine listens on loopback; a deployment
# publishes the gateway's port on purpose (the image binds 0.0.0.0 inside its own namespace).
LOOPBACK = "127.0.0.1"
GATEWAY_PORT = 8080  # predictions, /live, /ready: the one port clients use
GATEWAY_METRICS_PORT = 8083  # the gateway's own Prometheus metrics
PROMETHEUS_PORT = 9090  # `make monitor`
GATEWAY_URL = f"http://{LOOPBACK}:{GATEWAY_PORT}"

# `make serve`'s work folder (serving.stack) and, inside it, TorchServe's log folder: where the
# handler writes the request log that `make drift` reads.
SERVE_DIR = OUTPUTS_DIR / "serve"
SERVE_LOG_DIR = SERVE_DIR / "torchserve" / "logs"


def model_dir(experiment: str) -> Path:
    """The folder ``training.train`` writes an experiment's model to: ``models/<model>-<experiment>``."""
    return MODELS_DIR / f"{MODEL_NAME}-{experiment}"


def lock_params(lock_file: Path = DVC_LOCK) -> dict[str, str]:
    """``experiment`` and ``teacher`` as the committed ``dvc.lock`` records them (its stages'
    ``params.yaml`` entries): what the pipeline of this commit was built for. Empty without a lock."""
    found: dict[str, str] = {}
    if not lock_file.exists():
        return found
    inside = False
    for line in lock_file.read_text().splitlines():
        stripped = line.strip()
        if stripped == "params.yaml:":
            inside, depth = True, len(line) - len(line.lstrip())
            continue
        if inside:
            if not stripped or len(line) - len(line.lstrip()) <= depth:
                inside = False
                continue
            key, _, value = stripped.partition(":")
            if key in ("experiment", "teacher"):
                found.setdefault(key, value.strip())
    return found


def read_params(params_file: Path = PARAMS_FILE, lock_file: Path = DVC_LOCK) -> dict[str, str]:
    """``experiment`` and ``teacher`` of the pipeline: ``params.yaml`` where it exists, else what
    ``dvc.lock`` was built for (a fresh clone), else the defaults."""
    params = {"experiment": DEFAULT_EXPERIMENT, "teacher": DEFAULT_TEACHER}
    if not params_file.exists():
        return params | lock_params(lock_file)
    for line in params_file.read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in params and not line.startswith("#"):
            params[key.strip()] = value.split("#", 1)[0].strip()
    return params


def current_experiment(params_file: Path = PARAMS_FILE) -> str:
    """The Hydra experiment the DVC pipeline builds: ``experiment`` in ``params.yaml``."""
    return read_params(params_file)["experiment"]


def write_params(experiment: str, teacher: str, params_file: Path = PARAMS_FILE) -> bool:
    """Point the pipeline at ``experiment`` taught by ``teacher`` (``params.yaml``, untracked);
    returns whether the file changed (an unchanged file is not rewritten)."""
    text = (
        "# Written by `make experiment` (python3 project.py params EXPERIMENT TEACHER); not tracked.\n"
        "# The Hydra experiment (training/conf/experiment) the DVC pipeline builds, and the one whose\n"
        "# fine-tuned model teaches it (none: no teacher). Hyperparameters live in training/conf.\n"
        f"experiment: {experiment}\nteacher: {teacher}\n"
    )
    if params_file.exists() and params_file.read_text() == text:
        return False
    params_file.write_text(text)
    return True


def pipeline_model_dir(params_file: Path = PARAMS_FILE) -> Path:
    """The model folder of the experiment the DVC pipeline builds (the default ``--model-dir``)."""
    return model_dir(current_experiment(params_file))


def torchserve_addresses(config: Path = TORCHSERVE_CONFIG) -> dict[str, str]:
    """TorchServe's listeners as its ``config.properties`` sets them: ``{"inference": url,
    "management": url, "metrics": url}`` (the file is their one owner; TorchServe reads it)."""
    addresses = {}
    for line in config.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip().endswith("_address") and not key.startswith("grpc"):
            addresses[key.strip().removesuffix("_address")] = value.strip()
    return addresses


def handler_module(name: str) -> ModuleType:
    """Import one of ``handler/``'s modules as a TorchServe worker does: by file name, with
    ``handler/`` on ``sys.path`` (the handler's modules import each other that way), so that a
    module is loaded once, under one name, whoever imports it first."""
    if str(HANDLER_DIR) not in sys.path:
        sys.path.insert(0, str(HANDLER_DIR))
    return importlib.import_module(name)


def make_variables() -> dict[str, str]:
    """The contract as Makefile variables (paths relative to the project root)."""

    def rel(path: Path) -> str:
        return path.relative_to(PROJECT_ROOT).as_posix()

    return {
        "MODEL_NAME": MODEL_NAME,
        "ARCHIVE": rel(ARCHIVE),
        "IMAGE_ARCHIVE_DEFAULT": rel(IMAGE_ARCHIVE),
        "MODELS_DIR": rel(MODELS_DIR),
        "LOOPBACK": LOOPBACK,
        "GATEWAY_PORT": str(GATEWAY_PORT),
        "PROMETHEUS_PORT": str(PROMETHEUS_PORT),
        "SERVE_DIR": rel(SERVE_DIR),
        "DEFAULT_EXPERIMENT": DEFAULT_EXPERIMENT,
        "DEFAULT_TEACHER": DEFAULT_TEACHER,
    }


def main(argv: list[str]) -> int:
    """``make``: the contract as Makefile variables; ``params EXPERIMENT TEACHER``: write params.yaml;
    ``params --from-lock``: write it for the experiment ``dvc.lock`` was built for."""
    if argv == ["make"]:
        print("# Written by `python3 project.py make` from project.py: edit that file, not this one.")
        for name, value in make_variables().items():
            print(f"{name} := {value}")
        return 0
    if len(argv) == 3 and argv[0] == "params":
        write_params(argv[1], argv[2])
        return 0
    if argv == ["params", "--from-lock"]:  # a fresh clone: the experiment its dvc.lock was built for
        params = {"experiment": DEFAULT_EXPERIMENT, "teacher": DEFAULT_TEACHER} | lock_params()
        write_params(params["experiment"], params["teacher"])
        return 0
    usage = "python3 project.py make | params EXPERIMENT TEACHER | params --from-lock"
    print(f"usage: {usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
