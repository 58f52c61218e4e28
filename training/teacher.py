"""The teacher of a distilled student: fine-tuned once, its logits on the training texts cached once.

``python -m training.teacher fit <experiment>`` fine-tunes the Hydra experiment ``<experiment>``
(``mpnet``, or any other, e.g. the released ``full``) into ``models/teacher-<experiment>/``;
``python -m training.teacher logits <experiment>`` writes that model's logits on every training text
to ``data/teacher/<experiment>.npz``. They are the DVC stages ``teacher`` and ``teacher_logits``,
parametrised by ``teacher`` in params.yaml. With ``none`` (the committed default) both write only
a marker, and ``train`` distils from nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from project import MODELS_DIR, PROJECT_ROOT
from training.batching import TokenizedSplit
from training.config import compose
from training.data import LABELS, Example, load_split
from training.distill import NO_TEACHER, TeacherLogits
from training.evaluate import batch_logits

log = logging.getLogger(__name__)

MARKER = "teacher.json"


def teacher_dir(teacher: str, root: Path = PROJECT_ROOT) -> Path:
    """Where the ``teacher`` stage puts the fine-tuned teacher."""
    return root / MODELS_DIR.relative_to(PROJECT_ROOT) / f"teacher-{teacher}"


def logits_file(teacher: str, root: Path = PROJECT_ROOT) -> Path:
    """Where the ``teacher_logits`` stage puts the teacher's logits (the ``distill.logits_file`` default)."""
    return root / "data" / "teacher" / f"{teacher}.npz"


def fit(teacher: str, overrides: list[str] | None = None, root: Path = PROJECT_ROOT) -> Path:
    """Fine-tune the Hydra experiment ``teacher`` into :func:`teacher_dir` (its metrics inside it).

    ``none`` writes only the marker file. Returns the teacher's folder.
    """
    out = teacher_dir(teacher, root)
    if teacher == NO_TEACHER:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps({"teacher": NO_TEACHER}) + "\n")
        return out
    from training.train import train

    cfg = compose(
        [f"experiment={teacher}", f"paths.model_dir={out}", f"paths.metrics_dir={out / 'metrics'}", *(overrides or [])]
    )
    if cfg.distill.alpha != 0:
        raise ValueError(f"experiment {teacher!r} distils itself (distill.alpha > 0): a teacher learns from labels")
    metrics = train(cfg)
    (out / MARKER).write_text(json.dumps({"teacher": teacher, "accuracy": metrics.get("accuracy")}) + "\n")
    return out


def compute_logits(model_dir: Path | str, examples: list[Example], batch_size: int = 128) -> np.ndarray:
    """fp32 logits of the model in ``model_dir`` on each example's text, in example order."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    split = TokenizedSplit(examples, tokenizer, tokenizer.model_max_length)
    logits = np.zeros((len(split), model.config.num_labels), dtype=np.float32)
    for indices, batch in batch_logits(model, split, batch_size, desc="teacher logits"):
        logits[indices] = batch.numpy()
    return logits


def cache_logits(teacher: str, train_file: Path | str, root: Path = PROJECT_ROOT, batch_size: int = 128) -> Path:
    """Compute the teacher's logits on every distinct text of ``train_file`` and save them to
    :func:`logits_file`. ``none`` saves an empty set. Returns the file written.

    Raises:
        FileNotFoundError: The teacher has not been fine-tuned (no model in its folder).
    """
    if teacher == NO_TEACHER:
        empty = TeacherLogits(NO_TEACHER, (), np.zeros((0, len(LABELS)), dtype=np.float32))
        return empty.save(logits_file(teacher, root))
    model_dir = teacher_dir(teacher, root)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no fine-tuned teacher in {model_dir}: run `make teacher TEACHER={teacher}` first")
    config = json.loads((model_dir / "config.json").read_text())
    labels = tuple(config["id2label"][str(i)] for i in range(len(config["id2label"])))
    distinct = list({e.text: e for e in load_split(train_file, labels)}.values())
    logits = compute_logits(model_dir, distinct, batch_size)
    agreement = float((logits.argmax(axis=1) == np.array([e.label for e in distinct])).mean())
    log.info(
        "teacher %s: logits on %d distinct training texts, %.4f agree with the labels",
        teacher,
        len(distinct),
        agreement,
    )
    cached = TeacherLogits(teacher, tuple(e.text for e in distinct), logits, labels)
    return cached.save(logits_file(teacher, root))


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - thin CLI wrapper, tested through DVC
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("fit", "logits"))
    parser.add_argument("teacher", help="Hydra experiment of the teacher (training/conf/experiment), or none")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for `fit`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (
        args.teacher != NO_TEACHER
        and not (PROJECT_ROOT / "training" / "conf" / "experiment" / f"{args.teacher}.yaml").is_file()
    ):
        parser.error(f"no experiment {args.teacher!r} in training/conf/experiment (or use none)")
    if args.action == "fit":
        print(fit(args.teacher, args.overrides))
    else:
        cfg = compose([])
        print(cache_logits(args.teacher, cfg.data.train_file))


if __name__ == "__main__":
    main()
