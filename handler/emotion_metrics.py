"""The handler's own Prometheus metrics, declared in ``monitoring/metrics.yaml``.

All are counters, so rates and ratios of rates are what dashboards and alerts use:
mean tokens per text is ``rate(EmotionInputTokens) / rate(EmotionPredictions)``,
model milliseconds per text ``rate(EmotionModelMs) / rate(EmotionPredictions)``, and so on.
"""

from __future__ import annotations

from collections import Counter

from ts.metrics.metric_type_enum import MetricTypes


class EmotionMetrics:
    """Counters for predictions per label, rejected requests, input tokens and stage times."""

    def __init__(self, metrics_cache, model_name: str) -> None:
        self.model_name = model_name

        def counter(name: str, unit: str, extra: list[str]):
            return metrics_cache.add_metric_to_cache(
                name, unit=unit, dimension_names=["ModelName", *extra], metric_type=MetricTypes.COUNTER
            )

        self._predictions = counter("EmotionPredictions", "count", ["Label"])
        self._rejected = counter("EmotionRejected", "count", ["Reason"])
        self._tokens = counter("EmotionInputTokens", "count", [])
        self._tokenize_ms = counter("EmotionTokenizeMs", "ms", [])
        self._model_ms = counter("EmotionModelMs", "ms", [])

    def predictions(self, labels: Counter[str]) -> None:
        """Count a batch's answered requests by top label (one metric line per label, not per request)."""
        for label, count in labels.items():
            self._predictions.add_or_update(count, [self.model_name, label])

    def rejected(self, reasons: Counter[str]) -> None:
        """Count a batch's requests refused with a 4xx, by error type."""
        for reason, count in reasons.items():
            self._rejected.add_or_update(count, [self.model_name, reason])

    def batch(self, tokens: int, tokenize_ms: float, model_ms: float) -> None:
        """Record one batch: real (unpadded) tokens and time in each stage, summed over its passes."""
        self._tokens.add_or_update(tokens, [self.model_name])
        self._tokenize_ms.add_or_update(tokenize_ms, [self.model_name])
        self._model_ms.add_or_update(model_ms, [self.model_name])
