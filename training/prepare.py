"""The pipeline's data stage: validate the raw splits and write the prepared copies.

``python -m training.prepare`` reads ``train.txt`` and ``val.txt`` from
``data.source_dir`` (or downloads them from the hub with ``data.source=hub``),
validates every line, and writes them with a ``stats.json`` of class counts and
checksums to ``paths.data_dir``. The raw files are never modified. A local source is recorded
relative to the project root, so the stage's outputs do not depend on where the project is
checked out.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from project import PROJECT_ROOT
from training.config import CONFIG_DIR
from training.data import SPLITS, class_counts, file_md5, load_split, write_split

log = logging.getLogger(__name__)


def prepare(cfg: DictConfig) -> dict:
    """Validate the source splits and write them to ``paths.data_dir``.

    Returns:
        The statistics written to ``stats.json``.
    """
    out_dir = Path(cfg.paths.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.data.source == "hub":  # pragma: no cover - needs the hub
            from training.hub import download_splits

            source_dir = Path(tmp)
            download_splits(cfg.data.hub_name, source_dir)
        elif cfg.data.source == "local":
            source_dir = Path(cfg.data.source_dir)
        else:
            raise ValueError(f"data.source must be 'local' or 'hub', not {cfg.data.source!r}")
        source = cfg.data.hub_name if cfg.data.source == "hub" else os.path.relpath(source_dir, PROJECT_ROOT)
        stats: dict = {"source": str(source), "splits": {}}
        for split in SPLITS:
            examples = load_split(source_dir / f"{split}.txt")
            target = out_dir / f"{split}.txt"
            write_split(target, examples)
            stats["splits"][split] = {
                "examples": len(examples),
                "class_counts": class_counts(examples),
                "md5": file_md5(target),
            }
            log.info("%s: %d examples -> %s", split, len(examples), target)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:  # pragma: no cover - thin CLI wrapper
    """CLI entry point: ``python -m training.prepare``."""
    prepare(cfg)


if __name__ == "__main__":
    main()
