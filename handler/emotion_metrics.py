"""The handler's own Prometheus metrics, declared in ``monitoring/metrics.yaml``.

All are counters, so rates and ratios of rates are what dashboards and alerts use:
mean tokens per text is ``rate(EmotionInputTokens) / rate(EmotionPredictions)``,
model milliseconds per text ``rate(EmotionModelMs) / rate(EmotionPredictions)``, and so on.

TorchServe's metrics have no histogram type: the confidence and token-length histograms are
counters with a ``Bucket`` dimension holding each bucket's upper bound (``emotion_monitor``'s
bounds; counts per bucket, not cumulative), so a bucket's share over a window is its rate over the
sum of all buckets' rates (``monitoring/drift_rules.yml``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from emotion_monitor import CONFIDENCE_BOUNDS, TOKEN_BOUNDS, bucket_names
from ts.metrics.metric_type_enum import MetricTypes


class EmotionMetrics:
    """Counters for predictions per label, rejected requests, input tokens and stage times."""

    def __init__(self, metrics_cache, model_name: str, labels: Sequence[str] = ()) -> None:
        self.model_name = model_name
        self.labels = list(labels)

        def counter(name: str, unit: str, extra: list[str]):
            return metrics_cache.add_metric_to_cache(
                name, unit=unit, dimension_names=["ModelName", *extra], metric_type=MetricTypes.COUNTER
            )

        self._predictions = counter("EmotionPredictions", "count", ["Label"])
        self._rejected = counter("EmotionRejected", "count", ["Reason"])
        self._tokens = counter("EmotionInputTokens", "count", [])
        self._tokenize_ms = counter("EmotionTokenizeMs", "ms", [])
        self._model_ms = counter("EmotionModelMs", "ms", [])
        self._confidence = counter("EmotionConfidence", "count", ["Bucket"])
        self._token_length = counter("EmotionTokenLength", "count", ["Bucket"])
        self._unknown_tokens = counter("EmotionUnknownTokens", "count", [])
        self._truncated = counter("EmotionTruncated", "count", [])
        self._words = counter("EmotionWords", "count", [])
        self._unfamiliar_words = counter("EmotionUnfamiliarWords", "count", [])
        self._abstained = counter("EmotionAbstained", "count", [])

    def start_distributions(self) -> None:
        """Emit every bucket, label and drift counter once at zero, so that each series exists from
        the start and a bucket or label no request has hit yet reads as a share of 0, not as a
        missing series (which the rules' PSI, joining live and reference shares on their label,
        would leave out of the sum)."""
        for label in self.labels:
            self._predictions.add_or_update(0, [self.model_name, label])
        for name in bucket_names(CONFIDENCE_BOUNDS):
            self._confidence.add_or_update(0, [self.model_name, name])
        for name in bucket_names(TOKEN_BOUNDS):
            self._token_length.add_or_update(0, [self.model_name, name])
        self._unknown_tokens.add_or_update(0, [self.model_name])
        self._truncated.add_or_update(0, [self.model_name])
        self._words.add_or_update(0, [self.model_name])
        self._unfamiliar_words.add_or_update(0, [self.model_name])
        self._abstained.add_or_update(0, [self.model_name])

    def predictions(self, labels: Counter[str], abstained: int = 0) -> None:
        """Count a batch's answered requests by label (one metric line per label, not per request),
        and those that abstained (no label)."""
        for label, count in labels.items():
            self._predictions.add_or_update(count, [self.model_name, label])
        if abstained:
            self._abstained.add_or_update(abstained, [self.model_name])

    def rejected(self, reasons: Counter[str]) -> None:
        """Count a batch's requests refused with a 4xx, by error type."""
        for reason, count in reasons.items():
            self._rejected.add_or_update(count, [self.model_name, reason])

    def batch(self, tokens: int, tokenize_ms: float, model_ms: float) -> None:
        """Record one batch: real (unpadded) tokens and time in each stage, summed over its passes."""
        self._tokens.add_or_update(tokens, [self.model_name])
        self._tokenize_ms.add_or_update(tokenize_ms, [self.model_name])
        self._model_ms.add_or_update(model_ms, [self.model_name])

    def distributions(
        self,
        confidence: Counter[str],
        token_length: Counter[str],
        unknown_tokens: int,
        truncated: int,
        words: int = 0,
        unfamiliar_words: int = 0,
    ) -> None:
        """Record one batch's drift statistics: requests per confidence and token-length bucket,
        unknown tokens, texts that filled the token window, and words and unfamiliar words (not
        whole words of the vocabulary) in the texts (one metric line per touched bucket)."""
        for bucket, count in confidence.items():
            self._confidence.add_or_update(count, [self.model_name, bucket])
        for bucket, count in token_length.items():
            self._token_length.add_or_update(count, [self.model_name, bucket])
        if unknown_tokens:
            self._unknown_tokens.add_or_update(unknown_tokens, [self.model_name])
        if truncated:
            self._truncated.add_or_update(truncated, [self.model_name])
        if words:
            self._words.add_or_update(words, [self.model_name])
        if unfamiliar_words:
            self._unfamiliar_words.add_or_update(unfamiliar_words, [self.model_name])
