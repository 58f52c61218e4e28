"""The ONNX Runtime backend (fp32, int8) and the export step that writes its graph when the archive
is built.

fp32: the PyTorch graph as is, checked against PyTorch on a sample batch.
int8: the fp32 graph with MatMul weights quantised per output channel (ONNX Runtime's dynamic
quantisation; activations are quantised on the fly).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from emotion_settings import BACKEND_PRECISIONS, HandlerSettings

log = logging.getLogger(__name__)

OPSET = 17
# Two texts of different lengths, so the sample batch has padding like real traffic.
SAMPLE_TEXTS = ("i feel wonderful today", "i am scared and i do not know what will happen to us tomorrow")
# Largest |logit| difference between ONNX Runtime and PyTorch accepted for the fp32 graph.
FP32_TOLERANCE = 1e-3
# Largest |probability| difference between the int8 and the fp32 graph accepted on the sample texts:
# dynamic quantisation keeps MiniLM's answers, but breaks some architectures (MPNet: 30% agreement).
INT8_TOLERANCE = 0.1


class ExportError(RuntimeError):
    """The ONNX graph could not be written or does not match the PyTorch model."""


def onnx_file_name(precision: str) -> str:
    """Name of the exported ONNX graph for ``precision`` inside the archive."""
    return f"model-{precision}.onnx"


def export_onnx(model_dir: Path, out_dir: Path, precision: str = "fp32") -> Path:
    """Write ``out_dir/model-<precision>.onnx`` for ``model_dir`` and return its path.

    Raises:
        ValueError: ``precision`` is not one the onnx backend runs.
        ExportError: The exported fp32 graph's logits differ from PyTorch's.
    """
    import onnxruntime
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if precision not in BACKEND_PRECISIONS["onnx"]:
        raise ValueError(f"onnx precision must be one of {BACKEND_PRECISIONS['onnx']}, not {precision!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / onnx_file_name(precision)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    sample = tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    inputs = (sample["input_ids"], sample["attention_mask"])
    with torch.inference_mode():
        expected = model(input_ids=inputs[0], attention_mask=inputs[1]).logits.numpy()

    with tempfile.TemporaryDirectory() as tmp:
        fp32_path = Path(tmp) / onnx_file_name("fp32")
        log.info("exporting %s to ONNX (opset %d)", model_dir, OPSET)
        torch.onnx.export(
            model,
            inputs,
            str(fp32_path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "tokens"},
                "attention_mask": {0: "batch", 1: "tokens"},
                "logits": {0: "batch"},
            },
            opset_version=OPSET,
            dynamo=False,
        )
        session = onnxruntime.InferenceSession(str(fp32_path), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}
        difference = float(np.abs(session.run(["logits"], feeds)[0] - expected).max())
        if difference > FP32_TOLERANCE:
            raise ExportError(f"ONNX logits differ from PyTorch's by {difference:.2e} (> {FP32_TOLERANCE})")
        log.info("fp32 graph matches PyTorch (max |logit difference| %.1e)", difference)
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(fp32_path, target, weight_type=QuantType.QInt8, per_channel=True)
            int8 = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            change = float(np.abs(_softmax(int8.run(["logits"], feeds)[0]) - _softmax(expected)).max())
            if change > INT8_TOLERANCE:
                target.unlink()
                raise ExportError(
                    f"int8 quantisation changes this model's probabilities by {change:.2f} (> {INT8_TOLERANCE}): "
                    "archive it with precision fp32 (handler section of model-config.yaml)"
                )
            log.info("quantised MatMul weights to int8 per channel (max |probability change| %.3f)", change)
        else:
            fp32_path.replace(target)
    log.info("wrote %s (%.1f MB)", target, target.stat().st_size / 1e6)
    return target


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class LabelConfig:
    """The part of the model's ``config.json`` the engine reads (``id2label``), without
    transformers' AutoConfig, which would import transformers into the worker."""

    id2label: dict[int, str]

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def read(cls, model_dir: Path) -> LabelConfig:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return cls({int(k): str(v) for k, v in config["id2label"].items()})


def ort_session(path: Path, settings: HandlerSettings):
    """An ONNX Runtime CPU session on the graph at ``path`` with the handler's options:
    ``settings.threads`` intra-op threads (``0``: torch's count), one inter-op thread, idle threads
    spinning only with ``settings.spin_wait``, every graph optimisation."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = settings.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle pool threads spinning for the next run take CPU the front end and this worker's own
    # Python thread need when the cores are shared (README, "Speed-ups").
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin_wait else "0")
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxBackend:
    """ONNX Runtime on the archive's ``model-<precision>.onnx``, returning float32 logits.

    ``graph`` runs another ONNX graph of the same model instead (the engine benchmark's
    quantisation schemes); ``model_dir`` still gives the labels.

    Raises:
        FileNotFoundError: The archive was built without the export for this precision.
    """

    reads_weights = False  # the exported graph carries them: an archive may leave them out

    def __init__(
        self,
        model_dir: Path,
        settings: HandlerSettings,
        device: torch.device | None = None,
        *,
        graph: Path | None = None,
    ) -> None:
        path = Path(graph) if graph is not None else Path(model_dir) / onnx_file_name(settings.precision)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path.name} is not in the archive: rebuild it with `python -m serving.archive` "
                f"and handler.backend: onnx, precision: {settings.precision} in model-config.yaml"
            )
        self.session = ort_session(path, settings)
        self.config = LabelConfig.read(Path(model_dir))
        threads = self.session.get_session_options().intra_op_num_threads
        log.info("onnx backend: %s, %d thread(s)", path.name, threads)

    @staticmethod
    def export(model_dir: Path, out_dir: Path, settings: HandlerSettings) -> list[Path]:
        """The archive's build step for this backend: the graph for ``settings.precision``."""
        return [export_onnx(model_dir, out_dir, settings.precision)]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return logits.astype(np.float32, copy=False)
