"""Weights & Biases logging that is a no-op when disabled or off rank 0."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


class Tracker:
    """A thin wrapper around one W&B run.

    Args:
        cfg: The full training config (logged as the run config).
        active: False on non-zero DDP ranks: nothing is logged there.
    """

    def __init__(self, cfg: DictConfig, active: bool = True) -> None:
        self.run = None
        logger_cfg = cfg.logger
        if not (active and logger_cfg.enabled and logger_cfg.mode != "disabled"):
            return
        import wandb

        Path(logger_cfg.dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            mode=logger_cfg.mode,
            dir=logger_cfg.dir,
            tags=list(logger_cfg.tags),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit="create_new",
        )
        log.info("W&B run %s (%s) in %s", self.run.id, logger_cfg.mode, self.run.dir)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log scalar values at an optimizer step."""
        if self.run is not None:
            self.run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        """Set run summary values (final metrics, provenance)."""
        if self.run is not None:
            self.run.summary.update(values)

    def log_confusion(self, confusion: list[list[int]], labels: list[str], step: int | None = None) -> None:
        """Log the confusion matrix as a W&B table."""
        if self.run is None:
            return
        import wandb

        rows = [[labels[i], labels[j], confusion[i][j]] for i in range(len(labels)) for j in range(len(labels))]
        self.run.log(
            {"val/confusion_matrix": wandb.Table(columns=["actual", "predicted", "count"], data=rows)}, step=step
        )

    def log_files(self, name: str, kind: str, path: Path, metadata: dict[str, Any] | None = None) -> None:
        """Attach a folder or file to the run as an artifact."""
        if self.run is None:
            return
        import wandb

        artifact = wandb.Artifact(name=name, type=kind, metadata=metadata or {})
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def log_images(self, images: dict[str, Path]) -> None:
        """Log PNG files as W&B images."""
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def finish(self, failed: bool = False) -> None:
        """Close the run; marks it failed when training raised."""
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None
