"""Build ``model_store/emotion.mar`` from a trained model directory.

``python -m serving.archive --model-dir DIR [--version 1.0]`` packs the weights,
tokenizer, model config, handler modules and ``model-config.yaml`` with
torch-model-archiver, plus what the configured backend's export step builds (the
ONNX graph for the ``onnx`` backend). ``--without-weights`` leaves the PyTorch weights out for a
backend whose CPU worker never reads them (the CPU serving image). Nothing the archive needs is
fetched at serve time. The reference profile written beside the model directory
(``<model-dir>.profile.json``, ``monitoring.profile``) is packed as ``reference_profile.json``, and
the softmax temperature (``<model-dir>.calibration.json``, ``training.calibrate``) as
``calibration.json``, which the handler applies; the training split's word counts
(``<model-dir>.words.json``, ``training.words``) as ``words.json``, the known words of the
handler's typo correction.
The archived engine's answers to the golden texts are packed as ``golden.json``
(``serving.golden``), which the gateway's readiness check compares served answers with.
The pipeline's archive stage (``dvc.yaml``) passes the experiment's model directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from project import HANDLER_DIR, MODEL_NAME, MODEL_STORE, handler_module
from serving.golden import GOLDEN_FILE, GoldenError, build_record

log = logging.getLogger(__name__)

HANDLER_FILE = HANDLER_DIR / "emotion_handler.py"
# The drift tools' reference (monitoring/profile.py writes it beside the model directory).
PROFILE_SUFFIX = ".profile.json"
ARCHIVE_PROFILE_NAME = "reference_profile.json"
# The temperature training/calibrate.py fits, beside the model directory too.
CALIBRATION_SUFFIX = ".calibration.json"
# The training split's word counts training/words.py writes, for the handler's typo correction.
WORDS_SUFFIX = ".words.json"
WEIGHTS = "model.safetensors"
# Files of a Hugging Face model directory the handler needs besides the weights.
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


class ArchiveError(RuntimeError):
    """The model directory or handler cannot be packed."""


def handler_modules() -> list[Path]:
    """The modules the handler imports, packed beside it: every ``handler/emotion_*.py``."""
    return sorted(path for path in HANDLER_DIR.glob("emotion_*.py") if path != HANDLER_FILE)


def check_model_dir(model_dir: Path) -> list[Path]:
    """Files of ``model_dir`` to pack besides the weights; raises ArchiveError when it is incomplete."""
    if not (model_dir / WEIGHTS).is_file():
        raise ArchiveError(f"{model_dir} has no {WEIGHTS}: train a model first (make train)")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ArchiveError(f"{model_dir} has no config.json")
    id2label = json.loads(config_path.read_text()).get("id2label") or {}
    if len(id2label) < 2:
        raise ArchiveError(f"{config_path} has no id2label mapping: the handler needs the label names")
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "vocab.txt").is_file():
        raise ArchiveError(f"{model_dir} has no tokenizer files (tokenizer.json or vocab.txt)")
    return [model_dir / name for name in MODEL_FILES if (model_dir / name).is_file()]


def build_archive(
    model_dir: Path,
    export_dir: Path,
    name: str = MODEL_NAME,
    version: str = "1.0",
    model_config: Path = HANDLER_DIR / "model-config.yaml",
    without_weights: bool = False,
) -> Path:
    """Pack ``model_dir`` into ``<export_dir>/<name>.mar``.

    Args:
        model_dir: Trained Hugging Face model directory (safetensors, tokenizer, config).
        export_dir: Folder for the archive (TorchServe's model store).
        name: Archive file stem and the model name in its manifest (a registration's
            ``model_name`` parameter can override it, e.g. to serve ``emotion-v2.mar`` as ``emotion``).
        version: Model version recorded in the archive's manifest.
        model_config: TorchServe ``model-config.yaml`` (batching, workers, handler settings).
        without_weights: Leave the PyTorch weights out. Only for a backend whose CPU worker does
            not read them (``onnx``): on a GPU the handler falls back to PyTorch and needs them.

    Returns:
        Path of the written archive.
    """
    model_dir, export_dir = Path(model_dir), Path(export_dir)
    extra = check_model_dir(model_dir) + handler_modules()
    if not model_config.is_file():
        raise ArchiveError(f"model config not found: {model_config}")
    settings_module, backends = handler_module("emotion_settings"), handler_module("emotion_backends")
    try:
        # Fail here, not in every worker at serve time, on a bad handler section.
        settings = settings_module.HandlerSettings.from_yaml(yaml.safe_load(model_config.read_text()).get("handler"))
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as err:
        raise ArchiveError(f"{model_config}: {err}") from err
    if without_weights and backends.BACKENDS[settings.backend].reads_weights:
        raise ArchiveError(f"--without-weights: the {settings.backend} backend of {model_config} reads the weights")
    export_dir.mkdir(parents=True, exist_ok=True)
    archiver = shutil.which("torch-model-archiver", path=str(Path(sys.executable).parent)) or shutil.which(
        "torch-model-archiver"
    )
    if archiver is None:
        raise ArchiveError("torch-model-archiver is not installed (pip install torch-model-archiver)")
    with tempfile.TemporaryDirectory() as tmp:
        # Build in a temporary folder so a failed run never leaves a half-written archive in the store.
        try:
            extra += backends.BACKENDS[settings.backend].export(model_dir, Path(tmp) / "export", settings)
        except backends.ExportError as err:
            raise ArchiveError(str(err)) from err
        calibration = beside(model_dir, CALIBRATION_SUFFIX)
        if calibration.is_file():
            engine = handler_module("emotion_engine")
            try:
                temperature = engine.read_temperature(calibration)
            except ValueError as err:
                raise ArchiveError(str(err)) from err
            extra.append(Path(shutil.copy(calibration, Path(tmp) / engine.CALIBRATION_FILE)))
            log.info("packing the temperature %.4f of %s", temperature, calibration)
        else:
            log.warning("no calibration %s: the archive serves uncalibrated probabilities", calibration)
        words = beside(model_dir, WORDS_SUFFIX)
        if words.is_file():
            spelling = handler_module("emotion_spelling")
            try:
                spelling.read_words(words)  # every worker would fail on a broken list: fail here
            except ValueError as err:  # JSONDecodeError is one
                raise ArchiveError(str(err)) from err
            extra.append(Path(shutil.copy(words, Path(tmp) / spelling.WORDS_FILE)))
        else:
            log.warning("no word list %s: the archive reads texts as written (python -m training.words)", words)
        try:
            # After the calibration and the word list: the record holds the answers as served.
            extra.append(write_golden_record(model_dir, extra, settings, Path(tmp)))
        except GoldenError as err:
            raise ArchiveError(f"{model_dir}: {err}") from err
        profile = beside(model_dir, PROFILE_SUFFIX)
        if profile.is_file():
            extra.append(Path(shutil.copy(profile, Path(tmp) / ARCHIVE_PROFILE_NAME)))
        else:
            log.warning("no reference profile %s: the archive carries none (python -m monitoring.profile)", profile)
        command = [
            archiver,
            "--model-name",
            name,
            "--version",
            version,
            *([] if without_weights else ["--serialized-file", str(model_dir / WEIGHTS)]),
            "--handler",
            str(HANDLER_FILE),
            "--extra-files",
            ",".join(str(p) for p in extra),
            "--config-file",
            str(model_config),
            "--export-path",
            tmp,
            "--force",
        ]
        log.info("packing %s", " ".join(command))
        # torch-model-archiver stages files in $TMPDIR/<model name>: a private TMPDIR keeps two
        # concurrent builds of the same model apart.
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if result.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed ({result.returncode}):\n{result.stderr}")
        target = export_dir / f"{name}.mar"
        shutil.move(str(Path(tmp) / f"{name}.mar"), target)
    log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def beside(model_dir: Path, suffix: str) -> Path:
    """A file the pipeline writes next to the model directory: ``<model-dir><suffix>``."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + suffix)


def write_golden_record(model_dir: Path, files: list[Path], settings, tmp: Path) -> Path:
    """``golden.json``: the archived engine (``files`` staged as the unpacked archive) on the golden
    texts, with its noise against the model's fp32 PyTorch forward pass (``serving.golden``)."""
    stage = tmp / "golden-stage"
    stage.mkdir()
    for path in [*files, model_dir / WEIGHTS]:
        (stage / path.name).symlink_to(path.resolve())
    engine_module, cpu = handler_module("emotion_engine"), handler_module("emotion_cpuinfo").detect()
    # torch.compile changes no answer beyond the tolerance and would take minutes here.
    archived = engine_module.EmotionEngine(stage, dataclasses.replace(settings, compile=False))
    fp32 = dataclasses.replace(settings, backend="torch", precision="fp32", compile=False, spin_wait=False, fuse=False)
    # The same temperature: the noise compares the logits both engines feed the softmax.
    reference = engine_module.EmotionEngine(model_dir, fp32, temperature=archived.temperature)
    reference.speller = archived.speller  # and the same reading of the texts (the archive's word list)
    record = build_record(archived, reference, f"{settings.backend} {settings.precision}", cpu.line())
    log.info(
        "golden record: %d texts, %d decisive, noise %.4f, tolerance %.4f (%s)",
        len(record.texts),
        sum(record.decisive(i) for i in range(len(record.texts))),
        record.noise,
        record.tolerance,
        record.engine,
    )
    target = tmp / GOLDEN_FILE
    target.write_text(record.to_json() + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True, help="trained model directory")
    parser.add_argument("--export-dir", type=Path, default=MODEL_STORE)
    parser.add_argument("--name", default=MODEL_NAME, help="archive file stem and model name")
    parser.add_argument("--version", default="1.0")
    parser.add_argument("--model-config", type=Path, default=HANDLER_DIR / "model-config.yaml")
    parser.add_argument(
        "--without-weights", action="store_true", help="leave the PyTorch weights out (onnx backend, CPU image)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = build_archive(
            args.model_dir, args.export_dir, args.name, args.version, args.model_config, args.without_weights
        )
    except ArchiveError as err:
        log.error("%s", err)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
