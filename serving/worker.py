"""The handler in this process, as a TorchServe worker runs it, without the server.

:class:`InProcessWorker` builds TorchServe's own ``ts.context.Context`` from a model folder's real
files (its ``model-config.yaml`` where it has one, the project's ``monitoring/metrics.yaml``),
initializes :class:`emotion_handler.EmotionHandler` in it and sends batches the way TorchServe's
front end does (one ``RequestProcessor`` per request, with its content type and headers). Tests,
``make robustness`` (on an unpacked archive) and ``bench.profile_handler`` all use it, so that
no second, hand-built context can drift away from the worker's.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from project import MODEL_NAME, PROJECT_ROOT, handler_module

METRICS_YAML = PROJECT_ROOT / "monitoring" / "metrics.yaml"
# The TorchServe version the context reports to the handler (it reads none of it).
TS_VERSION = "0.12.0"


def worker_context(model_dir: Path, yaml_config: dict[str, Any] | None = None, gpu: int | None = None) -> Any:
    """TorchServe's worker context for ``model_dir``: ``yaml_config`` is the model config
    (default: the folder's ``model-config.yaml``, else none), ``gpu`` the gpu_id TorchServe
    would hand the worker (None: CPU)."""
    from ts.context import Context
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

    model_dir = Path(model_dir)
    if yaml_config is None:
        config_file = model_dir / "model-config.yaml"
        yaml_config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    metrics = MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    metrics.initialize_cache()
    batch_size = int(yaml_config.get("batchSize", 8))
    return Context(
        MODEL_NAME, str(model_dir), {"model": {}}, batch_size, gpu, TS_VERSION, metrics=metrics,
        model_yaml_config=yaml_config,
    )  # fmt: skip


def run_batch(handler: Any, context: Any, requests: Sequence[tuple]) -> list[tuple[int, dict]]:
    """Send ``(payload, content type[, request headers])`` tuples as one batch, as TorchServe's
    front end does; returns ``(status, answer)`` per request, in order.

    Raises:
        RuntimeError: The handler returned another number of answers than it was sent requests.
    """
    from ts.context import RequestProcessor

    context.request_processor = [
        RequestProcessor({"body": {"content-type": r[1]}, **(r[2] if len(r) > 2 else {})}) for r in requests
    ]
    context.request_ids = {i: f"req-{i}" for i in range(len(requests))}
    context.metrics.request_ids = context.request_ids
    outputs = handler.handle([{"body": r[0]} for r in requests], context)
    if len(outputs) != len(requests):
        raise RuntimeError(f"the handler answered {len(outputs)} of {len(requests)} requests")
    return [(context.get_response_status(i)[0], json.loads(out)) for i, out in enumerate(outputs)]


class InProcessWorker:
    """The handler on one model folder, initialized in a real worker context.

    Args:
        model_dir: A trained model's folder, or an unpacked archive.
        yaml_config: The model config (default: the folder's ``model-config.yaml``, else none).
        gpu: The gpu_id TorchServe would hand the worker (None: CPU).
    """

    def __init__(self, model_dir: Path, yaml_config: dict[str, Any] | None = None, gpu: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.context = worker_context(self.model_dir, yaml_config, gpu)
        self.batch_size = int(self.context.model_yaml_config.get("batchSize", 8))
        self.handler = handler_module("emotion_handler").EmotionHandler()
        self.handler.initialize(self.context)

    @classmethod
    def from_archive(cls, archive: Path, workdir: Path, **handler_settings: Any) -> InProcessWorker:
        """Unpack ``archive`` into ``workdir/model`` and start the worker on it, with its own
        ``model-config.yaml`` and ``handler_settings`` over its handler section."""
        model_dir = Path(workdir) / "model"
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(model_dir)
        yaml_config = yaml.safe_load((model_dir / "model-config.yaml").read_text()) or {}
        yaml_config.setdefault("handler", {}).update(handler_settings)
        return cls(model_dir, yaml_config)

    def run(self, requests: Sequence[tuple]) -> list[tuple[int, dict]]:
        """One batch of ``(payload, content type[, headers])``: ``(status, answer)`` per request."""
        return run_batch(self.handler, self.context, requests)

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Answers for ``texts``, sent as text/plain in batches of the model config's ``batchSize``."""
        answers = []
        for start in range(0, len(texts), self.batch_size):
            batch = [(text, "text/plain") for text in texts[start : start + self.batch_size]]
            answers += [answer for _, answer in self.run(batch)]
        return answers
