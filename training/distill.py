"""Knowledge distillation: a student learns from the labels and from a teacher's softened predictions.

The teacher's logits on the training texts are computed once (``python -m training.teacher logits``,
the DVC stage ``teacher_logits``) and stored as a :class:`TeacherLogits` file keyed by text. A
training run with ``distill.alpha > 0`` loads them, aligns them with its own examples, and trains on

    (1 - w) * cross_entropy(student, labels) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

where ``T`` is ``distill.temperature`` and ``w`` is ``distill.alpha`` shaped over the run by
``distill.schedule`` (``constant``, or ``linear``: from ``alpha`` down to 0 at the last step).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from training.data import LABELS, Example

NO_TEACHER = "none"
SCHEDULES = ("constant", "linear")


def soft_target_weight(alpha: float, schedule: str, step: int, total_steps: int) -> float:
    """Weight of the soft-target term at optimizer step ``step`` (0-based) of ``total_steps``.

    Raises:
        ValueError: ``alpha`` is outside [0, 1] or ``schedule`` is unknown.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distill.alpha must be between 0 and 1, got {alpha}")
    if schedule == "constant":
        return alpha
    if schedule == "linear":
        return alpha * max(0.0, 1.0 - step / max(total_steps, 1))
    raise ValueError(f"distill.schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    weight: float,
) -> torch.Tensor:
    """Cross-entropy on the labels blended with the temperature-scaled KL divergence to the teacher.

    The soft term is multiplied by ``temperature**2`` so its gradients keep their size as the
    temperature changes. Computed in fp32 whatever the autocast dtype of the logits.

    Raises:
        ValueError: ``temperature`` is not positive or the logits' shapes differ.
    """
    if temperature <= 0:
        raise ValueError(f"distill.temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} vs teacher {tuple(teacher_logits.shape)}")
    student = student_logits.float()
    hard = F.cross_entropy(student, labels)
    if weight == 0.0:
        return hard
    soft = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher_logits.float() / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * hard + weight * temperature**2 * soft


@dataclass(frozen=True)
class TeacherLogits:
    """A teacher's logits on a set of texts: what the ``teacher_logits`` stage caches.

    ``teacher`` is ``none`` (and the arrays empty) when the pipeline distils from no teacher.
    """

    teacher: str
    texts: tuple[str, ...]
    logits: np.ndarray  # float32, (len(texts), len(labels))
    labels: tuple[str, ...] = LABELS

    def __post_init__(self) -> None:
        if self.logits.shape != (len(self.texts), len(self.labels)):
            raise ValueError(
                f"teacher logits have shape {self.logits.shape}, expected ({len(self.texts)}, {len(self.labels)})"
            )
        if not np.isfinite(self.logits).all():
            raise ValueError(f"teacher {self.teacher!r}: logits hold NaN or infinite values")

    def save(self, path: Path | str) -> Path:
        """Write the logits as a compressed ``.npz`` (texts, logits, labels, teacher name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:  # a file handle: np.savez would append .npz to other names
            np.savez_compressed(
                handle,
                teacher=np.array(self.teacher),
                # JSON, not a NumPy string array: that would drop trailing NUL characters of a text.
                texts=np.array(json.dumps(self.texts)),
                logits=self.logits.astype(np.float32),
                labels=np.array(self.labels, dtype=np.str_),
            )
        return path

    @classmethod
    def load(cls, path: Path | str) -> TeacherLogits:
        """Read a file :meth:`save` wrote.

        Raises:
            FileNotFoundError: There is no such file (the ``teacher_logits`` stage has not run).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no teacher logits at {path}: run `make teacher-logits TEACHER=<experiment>`")
        with np.load(path, allow_pickle=False) as data:
            texts = tuple(json.loads(str(data["texts"])))
            labels = tuple(str(label) for label in data["labels"])
            return cls(
                teacher=str(data["teacher"]),
                texts=texts,
                logits=data["logits"].reshape(len(texts), len(labels)).astype(np.float32),
                labels=labels,
            )

    def for_examples(self, examples: Sequence[Example], labels: Sequence[str] = LABELS) -> torch.Tensor:
        """The teacher's logits for each example, in example order (texts repeat: same logits).

        Raises:
            ValueError: The teacher's label order differs from ``labels``, or it has no logits for
                some of the examples' texts (they were computed on other data).
        """
        if tuple(labels) != self.labels:
            raise ValueError(f"teacher {self.teacher!r} has labels {self.labels}, the student {tuple(labels)}")
        row = {text: i for i, text in enumerate(self.texts)}
        missing = [e.text for e in examples if e.text not in row]
        if missing:
            raise ValueError(
                f"teacher {self.teacher!r} has no logits for {len(missing)} of {len(examples)} training texts "
                f"(first: {missing[0][:80]!r}); recompute them on this training split"
            )
        return torch.from_numpy(self.logits[[row[e.text] for e in examples]])


class Distiller:
    """The loss of one distilled training run: its teacher's logits aligned with the training split."""

    def __init__(self, teacher_logits: torch.Tensor, temperature: float, alpha: float, schedule: str, total_steps: int):
        soft_target_weight(alpha, schedule, 0, total_steps)  # validates alpha and schedule
        if temperature <= 0:
            raise ValueError(f"distill.temperature must be positive, got {temperature}")
        self.teacher_logits = teacher_logits
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.schedule = schedule
        self.total_steps = total_steps

    def weight(self, step: int) -> float:
        """Soft-target weight at optimizer step ``step`` (0-based)."""
        return soft_target_weight(self.alpha, self.schedule, step, self.total_steps)

    def loss(self, student_logits: torch.Tensor, indices: Sequence[int], labels: torch.Tensor, step: int):
        """The blended loss for a batch of training-split ``indices``."""
        teacher = self.teacher_logits[list(indices)]
        return distillation_loss(student_logits, teacher, labels, self.temperature, self.weight(step))

    def describe(self) -> dict:
        return {"temperature": self.temperature, "alpha": self.alpha, "schedule": self.schedule}


def build_distiller(dcfg: DictConfig, examples: Sequence[Example], total_steps: int) -> Distiller | None:
    """The run's :class:`Distiller`, or None when it trains on labels only (``distill.alpha`` 0).

    Raises:
        ValueError: ``alpha`` > 0 with no teacher, or a teacher named for a run that does not distil
            (either way the config says two different things).
    """
    teacher = str(dcfg.teacher)
    if dcfg.alpha == 0:
        if teacher != NO_TEACHER:
            raise ValueError(
                f"teacher {teacher!r} is set but distill.alpha is 0: choose an experiment that distils "
                "(experiment=distill or distill4) or set teacher to none"
            )
        return None
    if teacher == NO_TEACHER:
        raise ValueError(
            f"distill.alpha is {dcfg.alpha} but no teacher is set: set distill.teacher (the Hydra experiment "
            "whose logits `python -m training.teacher logits <experiment>` cached), e.g. `make repro "
            "EXPERIMENT=distill TEACHER=full`"
        )
    cached = TeacherLogits.load(dcfg.logits_file)
    if cached.teacher != teacher:
        raise ValueError(f"{dcfg.logits_file} holds the logits of {cached.teacher!r}, not of {teacher!r}")
    return Distiller(cached.for_examples(examples), dcfg.temperature, dcfg.alpha, dcfg.schedule, total_steps)
