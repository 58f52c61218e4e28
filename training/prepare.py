"""The pipeline's data stage: validate the raw splits and write the prepared copies.

``python -m training.prepare`` reads ``train.txt`` and ``val.txt`` from
``data.source_dir`` (or downloads them from the hub with ``data.source=hub``),
validates every line, and writes them with a ``stats.json`` of class counts, checksums and
repeated texts (within a split, and validation texts also in training, with how many of them carry
another label) to ``paths.data_dir``. The raw files are never modified, and the prepared ones
are replaced only once both splits have passed. A local source is recorded
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
from training.data import SPLITS, class_counts, duplicate_stats, file_md5, load_split, write_split

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
            if (source_dir / "train.txt").resolve() == (source_dir / "val.txt").resolve():
                raise ValueError(f"{source_dir}: train.txt and val.txt are the same file")
        else:
            raise ValueError(f"data.source must be 'local' or 'hub', not {cfg.data.source!r}")
        source = cfg.data.hub_name if cfg.data.source == "hub" else os.path.relpath(source_dir, PROJECT_ROOT)
        # Every split is read and checked before anything is written, and each file replaces its
        # old copy in one step: a bad line leaves the last prepared data as it was.
        splits = {split: load_split(source_dir / f"{split}.txt") for split in SPLITS}
    stats: dict = {"source": str(source), "splits": {}, "overlap": duplicate_stats(splits["train"], splits["val"])}
    out_dir.mkdir(parents=True, exist_ok=True)
    staged = {split: out_dir / f".{split}.txt.tmp" for split in splits}
    try:
        for split, examples in splits.items():
            write_split(staged[split], examples)
            stats["splits"][split] = {
                "examples": len(examples),
                "class_counts": class_counts(examples),
                "md5": file_md5(staged[split]),
            }
        for split, path in staged.items():
            os.replace(path, out_dir / f"{split}.txt")
            log.info("%s: %d examples -> %s", split, len(splits[split]), out_dir / f"{split}.txt")
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    for key, count in stats["overlap"].items():
        if count:
            log.warning("%s: %d", key.replace("_", " "), count)
    staged_stats = out_dir / ".stats.json.tmp"
    staged_stats.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(staged_stats, out_dir / "stats.json")
    return stats


@hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:  # pragma: no cover - thin CLI wrapper
    """CLI entry point: ``python -m training.prepare``."""
    prepare(cfg)


if __name__ == "__main__":
    main()
