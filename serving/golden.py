"""The archive's golden record: what the archived engine answered for a few texts when the archive
was built, and how far a served answer may differ from it before the model counts as broken.

``serving.archive`` writes ``golden.json`` into every archive: the texts, the probabilities the
archived engine (backend and precision as ``model-config.yaml`` sets them) gave each one alone,
the engine's noise, and the tolerance derived from it. the gateway's ``/ready``
(``serving.health``) sends the same texts through TorchServe and compares the answers with the
record (:func:`judge`), so readiness holds for any model the pipeline can produce (a well-trained
one or the tests' barely-trained one) on any CPU, and fails for a served model that is not the
archived one: permuted labels, NaN or constant output, another tokenizer, other weights.

The bound, in log-probabilities (a softmax turns a shift of every logit by at most e into a change
of every log-probability by at most 2e, however small the probability):

* ``noise`` is the largest logit difference between the archived engine and the model's fp32
  PyTorch forward pass on the golden texts: the kernel noise of the engine (int8 quantisation of
  activations and weights; 0 for fp32 PyTorch itself). The same engine on another CPU (other int8
  kernels: AVX2, VNNI, AMX) is as far from fp32, so its logits are within 2 x noise of the
  record's and its log-probabilities within 4 x noise.
* ``tolerance`` = max(``TOLERANCE_FLOOR``, ``NOISE_FACTOR`` x noise): every served probability p
  must satisfy |log p - log p_recorded| <= tolerance.
* A text decides the label only when its recorded top-two log-ratio exceeds twice the tolerance
  (both log-probabilities may move by it); for such a text the served label must be the recorded
  one. A text within the noise decides nothing about the label.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GOLDEN_FILE = "golden.json"
# One text per label and a mixed one: a broken model cannot keep every answer by chance.
GOLDEN_TEXTS = (
    "i feel so happy and excited about today, everything is wonderful",
    "i feel so lonely and miserable tonight, nothing matters anymore",
    "i love you so much, you mean everything to me",
    "i am furious at him for lying to me again",
    "i am terrified of what will happen tomorrow",
    "i was so surprised, i never expected that at all",
    "i feel fine i guess",
)
# log-probability (10%): above the noise of a GPU's fp16 serving an fp32 record, far below a broken
# model's change (a log-ratio of 2 and more in the tests)
TOLERANCE_FLOOR = 0.1
NOISE_FACTOR = 4.0  # two CPUs, each within the noise of fp32 in logits: 2 x noise, doubled by the softmax
SMALLEST = 1e-30  # a probability the float32 softmax rounded to 0 is compared as this


class GoldenError(ValueError):
    """A golden record that cannot be read."""


@dataclass(frozen=True)
class GoldenRecord:
    """The archived engine's answers to the golden texts.

    Attributes:
        texts: The golden texts.
        probabilities: For each text, the probability of each label (label name -> probability).
        engine: The backend and precision that answered (``onnx int8``, ``torch fp32``, ...).
        noise: Largest logit difference between that engine and fp32 PyTorch.
        tolerance: Largest log-probability difference a served answer may have (module docstring).
        cpu: The CPU line of the machine the archive was built on.
    """

    texts: tuple[str, ...]
    probabilities: tuple[dict[str, float], ...]
    engine: str
    noise: float
    tolerance: float
    cpu: str = ""

    def margin(self, index: int) -> float:
        """Top-two log-probability ratio of text ``index`` in the record."""
        values = sorted(self.probabilities[index].values(), reverse=True)
        return math.log(max(values[0], SMALLEST) / max(values[1], SMALLEST))

    def label(self, index: int) -> str:
        row = self.probabilities[index]
        return max(row, key=row.__getitem__)

    def decisive(self, index: int) -> bool:
        """Whether text ``index``'s label is outside the noise (module docstring)."""
        return self.margin(index) > 2 * self.tolerance

    def to_json(self) -> str:
        return json.dumps(
            {
                "engine": self.engine,
                "noise": self.noise,
                "tolerance": self.tolerance,
                "cpu": self.cpu,
                "texts": [
                    {"text": text, "probabilities": row}
                    for text, row in zip(self.texts, self.probabilities, strict=True)
                ],
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str, source: str = GOLDEN_FILE) -> GoldenRecord:
        """Parse ``golden.json``; raises GoldenError naming ``source`` on any other shape."""
        try:
            data = json.loads(text)
            rows = data["texts"]
            texts = tuple(str(row["text"]) for row in rows)
            probabilities = tuple({str(k): float(v) for k, v in row["probabilities"].items()} for row in rows)
            record = cls(
                texts, probabilities, str(data["engine"]), float(data["noise"]), float(data["tolerance"]), data["cpu"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise GoldenError(f"{source} is not a golden record: {err!r}") from err
        if not texts or any(len(row) < 2 or not all(map(math.isfinite, row.values())) for row in probabilities):
            raise GoldenError(f"{source} holds no texts, or probabilities that are not finite")
        if not 0 < record.tolerance < 10:
            raise GoldenError(f"{source}: tolerance {record.tolerance} is not between 0 and 10")
        return record

    @classmethod
    def from_archive(cls, archive: Path) -> GoldenRecord:
        """The record packed in a model archive (``.mar``)."""
        try:
            with zipfile.ZipFile(archive) as mar:
                text = mar.read(GOLDEN_FILE).decode("utf-8")
        except KeyError as err:
            raise GoldenError(
                f"{archive} has no {GOLDEN_FILE}: rebuild it with `make archive` (python -m serving.archive)"
            ) from err
        except (OSError, zipfile.BadZipFile) as err:
            raise GoldenError(f"{archive} cannot be read as a model archive: {err}") from err
        return cls.from_json(text, f"{archive}:{GOLDEN_FILE}")


def archive_of(models: str, model: str) -> str | None:
    """The archive file TorchServe's ``--models`` argument serves ``model`` from
    (``emotion=emotion.mar``, ``emotion.mar``, comma-separated), or None."""
    for entry in models.split(","):
        name, sep, archive = entry.strip().partition("=")
        if not sep:
            name, archive = Path(entry.strip()).stem, entry.strip()
        if name == model and archive.endswith(".mar"):
            return archive
    return None


def served_record(model_store: Path, models: str, model: str) -> tuple[GoldenRecord | None, str]:
    """The golden record of the archive that serves ``model``, or None and why there is none."""
    archive = archive_of(models, model)
    if archive is None:
        return None, f"--models {models!r} names no .mar archive for {model!r}"
    try:
        return GoldenRecord.from_archive(Path(model_store) / archive), archive
    except GoldenError as err:
        return None, str(err)


def tolerance_for(noise: float) -> float:
    """The bound a served probability must keep to the record (module docstring)."""
    return max(TOLERANCE_FLOOR, NOISE_FACTOR * noise)


def logits(engine: Any, text: str) -> list[float]:
    """The engine's logits for ``text`` alone (its backend's forward pass, as the handler runs it),
    divided by its temperature, as its softmax sees them."""
    ids, mask = engine.pad(engine.token_ids([text])[0])
    temperature = getattr(engine, "temperature", 1.0)
    return [float(x) / temperature for x in engine.model(ids, mask)[0]]


def build_record(engine: Any, reference: Any, engine_name: str, cpu: str = "") -> GoldenRecord:
    """Answers of ``engine`` (the archived one) to the golden texts, each text alone, and the
    noise against ``reference`` (the fp32 PyTorch engine of the same model directory)."""
    served = [engine.predict([text])[0]["probabilities"] for text in GOLDEN_TEXTS]
    if not all(math.isfinite(p) for row in served for p in row.values()):
        raise GoldenError(f"the {engine_name} engine answers the golden texts with probabilities that are not finite")
    noise = max(
        abs(a - b) for text in GOLDEN_TEXTS for a, b in zip(logits(engine, text), logits(reference, text), strict=True)
    )
    return GoldenRecord(
        GOLDEN_TEXTS,
        tuple({label: float(p) for label, p in row.items()} for row in served),
        engine_name,
        round(float(noise), 6),
        round(tolerance_for(float(noise)), 6),
        cpu,
    )


def judge(record: GoldenRecord, index: int, answer: Any) -> str | None:
    """Why a served ``answer`` (the JSON body of a 200) to golden text ``index`` shows a broken
    model, or None when it agrees with the record."""
    want = record.probabilities[index]
    got = answer.get("probabilities") if isinstance(answer, dict) else None
    if not isinstance(got, dict) or set(got) != set(want):
        labels = sorted(got) if isinstance(got, dict) else got
        return f"labels {labels} are not the archive's {sorted(want)}"
    values = {}
    for label, value in got.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1 + 1e-6:
            return f"probability of {label!r} is {value!r}"  # also NaN and infinities
        values[label] = float(value)

    def log_ratio(label: str) -> float:
        return abs(math.log(max(values[label], SMALLEST)) - math.log(max(want[label], SMALLEST)))

    worst = max(want, key=log_ratio)
    if log_ratio(worst) > record.tolerance + 1e-9:  # rounding of the bound itself is no difference
        return (
            f"p({worst}) {values[worst]:.4g} against the archive's {want[worst]:.4g}: "
            f"|log ratio| {log_ratio(worst):.3f} > {record.tolerance}"
        )
    if record.decisive(index) and answer.get("label") != record.label(index):
        margin = record.margin(index)
        return f"label {answer.get('label')!r}, the archive's is {record.label(index)!r} (log margin {margin:.3f})"
    return None
