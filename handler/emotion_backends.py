"""Model backends the emotion handler can run: PyTorch (fp32, bf16, int8; fp16 on a GPU) and
ONNX Runtime (fp32, int8) on the graph exported when the archive is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
BACKENDS = ("torch", "onnx")
ONNX_PRECISIONS = ("fp32", "int8")


def onnx_file_name(precision: str) -> str:
    """Name of the exported ONNX graph for ``precision`` inside the archive."""
    return f"model-{precision}.onnx"


@dataclass(frozen=True)
class HandlerSettings:
    """The ``handler`` section of ``model-config.yaml``; every key is optional.

    Attributes:
        backend: ``torch`` (PyTorch eager) or ``onnx`` (ONNX Runtime on the graph exported by
            ``serving.archive``). On a GPU the torch backend always runs, in fp16.
        precision: ``fp32``, ``bf16`` (AMX on CPUs that have it, torch only) or ``int8`` (dynamic
            quantisation: torch quantises every Linear layer per tensor at load time, the ONNX
            export quantises MatMul weights per output channel at archive time).
        max_length: Truncation length in tokens; default the model directory's tokenizer setting.
        max_text_chars: Longest accepted text; longer ones get a 413.
        threads: Intra-op threads per worker (torch, or ONNX Runtime's pool); ``0`` keeps torch's
            default.
        sort_by_length: Run the batch as several forward passes of texts of similar token length,
            chosen to minimise padded tokens plus ``pass_cost_tokens`` per pass
            (``emotion_inputs.plan_passes``), instead of one pass padded to the longest text.
        pass_cost_tokens: The fixed cost of one forward pass, in tokens, for ``sort_by_length``.
        spin_wait: Let ONNX Runtime's idle threads spin waiting for the next run (its default)
            instead of sleeping; pays off only on cores the worker does not share.
        compile: Wrap the model in ``torch.compile``; the handler compiles while loading, so worker
            start takes longer (about 85 s here) and no request waits for it.
        request_log: Append one JSON line per answered request to ``requests.jsonl`` (read by
            ``make drift``; see ``emotion_monitor.RequestLog``).
        request_log_dir: Folder of the request log; default TorchServe's log folder
            (``$LOG_LOCATION``, else ``logs`` in the server's working directory).
        request_log_max_bytes: Size at which the request log is rotated.
        request_log_backups: Rotated request logs kept; the log takes at most about
            ``(backups + 1) * max_bytes``.
        request_log_texts: Also log the raw texts (operator opt-in; off by default for privacy).
    """

    backend: str = "torch"
    precision: str = "fp32"
    max_length: int | None = None
    max_text_chars: int = 2000
    threads: int = 0
    sort_by_length: bool = False
    pass_cost_tokens: int = 16
    compile: bool = False
    spin_wait: bool = False
    request_log: bool = True
    request_log_dir: str | None = None
    request_log_max_bytes: int = 20_000_000
    request_log_backups: int = 5
    request_log_texts: bool = False

    @classmethod
    def from_yaml(cls, section: dict[str, Any] | None) -> HandlerSettings:
        """Build from the YAML section, rejecting unknown keys and values with a clear message."""
        section = dict(section or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"model-config.yaml handler section: unknown keys {unknown}; known: {sorted(known)}")
        settings = cls(**section)
        if settings.backend not in BACKENDS:
            raise ValueError(f"handler.backend must be one of {BACKENDS}, not {settings.backend!r}")
        if settings.precision not in PRECISIONS:
            raise ValueError(f"handler.precision must be one of {PRECISIONS}, not {settings.precision!r}")
        if settings.backend == "onnx" and settings.precision not in ONNX_PRECISIONS:
            raise ValueError(f"handler.precision for the onnx backend must be one of {ONNX_PRECISIONS}")
        if settings.pass_cost_tokens < 0:
            raise ValueError(f"handler.pass_cost_tokens must be >= 0, not {settings.pass_cost_tokens}")
        if settings.backend == "onnx" and settings.compile:
            raise ValueError("handler.compile applies to the torch backend only")
        if settings.request_log_max_bytes <= 0 or settings.request_log_backups < 0:
            raise ValueError("handler.request_log_max_bytes must be > 0 and request_log_backups >= 0")
        if settings.backend == "torch" and settings.spin_wait:
            raise ValueError("handler.spin_wait applies to the onnx backend only")
        return settings


class TorchBackend:
    """A Hugging Face sequence classifier in the requested precision.

    Called with int64 ``input_ids`` and ``attention_mask`` arrays, returns float32 logits as NumPy
    arrays, like ``OnnxBackend``.
    """

    def __init__(self, model_dir: Path, settings: HandlerSettings, device: torch.device) -> None:
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        model.eval()
        self.autocast_dtype: torch.dtype | None = None
        if device.type == "cuda":
            model = model.half()
        elif settings.precision == "bf16":
            model = model.to(torch.bfloat16)
        elif settings.precision == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model.to(device)
        self.forward = torch.compile(self.model, dynamic=True) if settings.compile else self.model
        self.device = device
        self.config = model.config
        log.info("torch backend: %s on %s", settings.precision if device.type == "cpu" else "fp16", device)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.forward(
                input_ids=torch.from_numpy(input_ids).to(self.device),
                attention_mask=torch.from_numpy(attention_mask).to(self.device),
            ).logits
        return logits.float().cpu().numpy()


class OnnxBackend:
    """ONNX Runtime on the archive's ``model-<precision>.onnx``, returning float32 logits.

    Raises:
        FileNotFoundError: The archive was built without the export for this precision.
    """

    def __init__(self, model_dir: Path, settings: HandlerSettings) -> None:
        import onnxruntime
        from transformers import AutoConfig

        path = Path(model_dir) / onnx_file_name(settings.precision)
        if not path.is_file():
            raise FileNotFoundError(
                f"{path.name} is not in the archive: rebuild it with `python -m serving.archive` "
                f"and handler.backend: onnx, precision: {settings.precision} in model-config.yaml"
            )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = settings.threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # Idle pool threads spinning for the next run take CPU the front end and this worker's own
        # Python thread need when the cores are shared (README, "Speed-ups").
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spin_wait else "0")
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = AutoConfig.from_pretrained(model_dir)
        log.info("onnx backend: %s, %d thread(s)", path.name, options.intra_op_num_threads)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return logits.astype(np.float32, copy=False)


def load_backend(model_dir: Path, settings: HandlerSettings, device: torch.device) -> TorchBackend | OnnxBackend:
    """The backend ``settings`` ask for; a GPU always gets the torch backend in fp16."""
    if settings.backend == "onnx" and device.type == "cpu":
        return OnnxBackend(model_dir, settings)
    if settings.backend == "onnx":
        log.warning("onnx backend is CPU-only here: running torch in fp16 on %s", device)
    return TorchBackend(model_dir, settings, device)
