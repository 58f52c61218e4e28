"""The ONNX Runtime backend (fp32, int8) and the export step that writes its graph when the archive
is built.

fp32: the PyTorch graph as is, checked against PyTorch on a sample batch.
int8: the fp32 graph with MatMul weights quantised per output channel (ONNX Runtime's dynamic
quantisation; activations are quantised on the fly).

With ``fuse`` (``handler.fuse``), a BERT-family graph first goes through ONNX Runtime's transformer
optimizer, which replaces each layer's attention, the embeddings' sum and LayerNorm, every residual
add and LayerNorm, and bias + GELU by one kernel each (``Attention``, ``EmbedLayerNormalization``,
``SkipLayerNormalization``, ``BiasGelu``); int8 quantisation then turns the attention and embedding
kernels into their quantised forms (``QAttention``, ``QEmbedLayerNormalization``). The fused graph
is checked against PyTorch like the plain one.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from emotion_batch import softmax
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
# transformers' model types whose exported graph ONNX Runtime's "bert" optimizer fuses (their
# layers are BERT's: post-LayerNorm residual blocks, GELU feed-forward, absolute positions).
FUSABLE_MODEL_TYPES = ("bert",)


class ExportError(RuntimeError):
    """The ONNX graph could not be written or does not match the PyTorch model."""


def onnx_file_name(precision: str) -> str:
    """Name of the exported ONNX graph for ``precision`` inside the archive."""
    return f"model-{precision}.onnx"


def export_onnx(model_dir: Path, out_dir: Path, precision: str = "fp32", fuse: bool = False) -> Path:
    """Write ``out_dir/model-<precision>.onnx`` for ``model_dir`` and return its path.

    ``fuse``: fuse the graph's transformer layers first (module docstring); a model type the
    optimizer does not know (``FUSABLE_MODEL_TYPES``) is exported unfused, with a warning.

    Raises:
        ValueError: ``precision`` is not one the onnx backend runs.
        ExportError: The exported fp32 (or fused) graph's logits differ from PyTorch's, or int8
            quantisation moves the probabilities by more than ``INT8_TOLERANCE``.
    """
    import onnxruntime
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if precision not in BACKEND_PRECISIONS["onnx"]:
        raise ValueError(f"onnx precision must be one of {BACKEND_PRECISIONS['onnx']}, not {precision!r}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / onnx_file_name(precision)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True).eval()
    if fuse and model.config.model_type not in FUSABLE_MODEL_TYPES:
        log.warning(
            "handler.fuse: ONNX Runtime's optimizer does not fuse %s models (only %s); exporting unfused",
            model.config.model_type,
            ", ".join(FUSABLE_MODEL_TYPES),
        )
        fuse = False
    if fuse:
        # The optimizer matches attention as the explicit products and softmax of the eager
        # implementation, not the single scaled_dot_product_attention call of the default one.
        model.set_attn_implementation("eager")
    sample = tokenizer(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    inputs = (sample["input_ids"], sample["attention_mask"])
    with torch.inference_mode():
        expected = model(input_ids=inputs[0], attention_mask=inputs[1]).logits.numpy()
    feeds = {"input_ids": inputs[0].numpy(), "attention_mask": inputs[1].numpy()}

    def check_fp32(path: Path, what: str) -> None:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        difference = float(np.abs(session.run(["logits"], feeds)[0] - expected).max())
        if difference > FP32_TOLERANCE:
            raise ExportError(f"{what} logits differ from PyTorch's by {difference:.2e} (> {FP32_TOLERANCE})")
        log.info("%s graph matches PyTorch (max |logit difference| %.1e)", what, difference)

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
        check_fp32(fp32_path, "ONNX")
        if fuse:
            fp32_path = fuse_graph(fp32_path, Path(tmp) / "model-fp32-fused.onnx", model.config)
            check_fp32(fp32_path, "fused ONNX")
        if precision == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            # The fused kernels are ONNX Runtime's own operators, which ONNX shape inference cannot
            # type: the quantiser is told that untyped tensors are float32.
            quantize_dynamic(
                fp32_path,
                target,
                weight_type=QuantType.QInt8,
                per_channel=True,
                extra_options={"DefaultTensorType": 1},  # onnx.TensorProto.FLOAT
            )
            int8 = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
            change = float(np.abs(softmax(int8.run(["logits"], feeds)[0]) - softmax(expected)).max())
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


def fuse_graph(source: Path, target: Path, config) -> Path:
    """ONNX Runtime's transformer optimizer on the graph at ``source``, written to ``target``
    (module docstring). ``config``: the model's transformers config (heads, hidden size)."""
    from onnxruntime.transformers.optimizer import optimize_model

    # opt_level 0: only the optimizer's own fusions; ONNX Runtime applies its generic graph
    # optimisations when a session loads the graph (ort_session).
    fused = optimize_model(
        str(source),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        opt_level=0,
    )
    counts = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    log.info("fused the graph's transformer layers: %s", counts)
    fused.save_model_to_file(str(target))
    return target


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
    # Python thread need when the cores are shared (docs/benchmarks.md, "Speed-ups").
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
        # The int8 graph quantises each MatMul's input on the fly with one scale for the whole
        # pass (DynamicQuantizeLinear): a text's answer then depends on its companions.
        self.batch_invariant = settings.precision != "int8"
        threads = self.session.get_session_options().intra_op_num_threads
        log.info("onnx backend: %s, %d thread(s)", path.name, threads)

    @staticmethod
    def export(model_dir: Path, out_dir: Path, settings: HandlerSettings) -> list[Path]:
        """The archive's build step for this backend: the graph for ``settings.precision``, fused
        with ``settings.fuse``."""
        return [export_onnx(model_dir, out_dir, settings.precision, fuse=settings.fuse)]

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return logits.astype(np.float32, copy=False)
