"""What the served model sees and says, per batch: drift metrics and the request log.

The handler calls :meth:`EmotionMonitor.observe_batch` once per batch with one
:class:`RequestRecord` per answered request. The monitor

* adds the batch to bucketed counters (prediction confidence, input token length), the
  unknown-token, unfamiliar-word and truncated-text counters (``EmotionMetrics.distributions``),
  one metric line per touched bucket and batch, so the cost does not grow with the batch size;
* appends one JSON line per request to the request log (:class:`RequestLog`), which ``make drift``
  reads.

The bucket bounds below are shared with the reference profile (``monitoring.profile``) and the
drift rules (``monitoring.drift_rules``): live and reference histograms are always on the same
buckets. This module imports nothing from TorchServe, so the training side can import it too.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Upper bounds (inclusive) of the histogram buckets; the last bucket is open ("+Inf").
# Confidence is the top label's probability (>= 1/6 with six labels); most answers of a trained
# model lie above 0.9, hence the finer buckets at the top.
CONFIDENCE_BOUNDS: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)
# Token counts include [CLS] and [SEP]; training texts have about 10 to 50 tokens.
TOKEN_BOUNDS: tuple[float, ...] = (8, 12, 16, 20, 24, 32, 40, 48, 64, 128)
# "Low confidence" in the alerts and reports: top probability at or below this (a bucket bound).
LOW_CONFIDENCE = 0.5
REQUEST_LOG_NAME = "requests.jsonl"
# A word: a run of letters (any script); digits, punctuation and emoji are not words.
WORD = re.compile(r"[^\W\d_]+")
# Prefixes that mark a word-initial piece in SentencePiece and byte-level BPE vocabularies.
_WORD_START = ("\u2581", "\u0120")


def known_words(vocabulary: Iterable[str]) -> frozenset[str]:
    """The whole words of a tokenizer's vocabulary, lower-cased: entries made of letters only,
    without WordPiece's ``##`` continuation mark (a SentencePiece or byte-level word-start mark is
    removed). A word outside this set is split into pieces; a typo usually makes one."""
    words = set()
    for token in vocabulary:
        if token.startswith(_WORD_START):
            token = token[1:]
        if token.isalpha():
            words.add(token.lower())
    return frozenset(words)


def word_counts(text: str, known: frozenset[str] | None) -> tuple[int, int]:
    """Words in ``text`` and how many of them ``known`` lacks (``(0, 0)`` without a word set).
    The cost is linear in the text's length: one regular-expression scan and a set look-up per word."""
    if known is None:
        return 0, 0
    words = WORD.findall(text.lower())
    return len(words), sum(1 for w in words if w not in known)


def bucket_names(bounds: Sequence[float]) -> list[str]:
    """Names of the buckets, as in the ``Bucket`` metric dimension: each upper bound, then ``+Inf``."""
    return [f"{b:g}" for b in bounds] + ["+Inf"]


def bucket_of(value: float, bounds: Sequence[float]) -> str:
    """Name of the bucket ``value`` falls into (a value equal to a bound belongs to that bucket)."""
    names = bucket_names(bounds)
    return names[bisect.bisect_left(bounds, value)]


def histogram(values: Sequence[float], bounds: Sequence[float]) -> dict[str, int]:
    """Counts per bucket, every bucket present (zeros included), in bucket order."""
    counts = Counter(bucket_of(v, bounds) for v in values)
    return {name: counts.get(name, 0) for name in bucket_names(bounds)}


@dataclass(frozen=True)
class RequestRecord:
    """One answered request, as the monitor sees it.

    Attributes:
        chars: Text length in characters.
        tokens: Tokens the model saw (with special tokens, after truncation).
        unknown_tokens: Tokens mapped to the tokenizer's unknown token.
        truncated: The text filled the whole token window (it was cut, or exactly fitted).
        probabilities: Label probabilities, in the model's label order.
        label: The top label.
        text: The text itself; only kept in the log when the operator opted in.
        words: Words in the text (:data:`WORD`; 0 when the vocabulary's words are not known).
        unfamiliar_words: Words that are not whole words of the tokenizer's vocabulary
            (:func:`known_words`): typos, rare words, other languages.
        request_id: The id its answer carries (``emotion_inputs.request_id``).
    """

    chars: int
    tokens: int
    unknown_tokens: int
    truncated: bool
    probabilities: Sequence[float]
    label: str
    text: str | None = None
    words: int = 0
    unfamiliar_words: int = 0
    request_id: str | None = None

    @property
    def confidence(self) -> float:
        """Probability of the top label."""
        return max(self.probabilities)


def make_records(
    texts: Sequence[str],
    token_ids: Sequence[Sequence[int]],
    probabilities: Sequence[Sequence[float]],
    labels: Sequence[str],
    unknown_token_id: int | None,
    truncated: Sequence[bool],
    known: frozenset[str] | None = None,
    request_ids: Sequence[str | None] | None = None,
) -> list[RequestRecord]:
    """Records for a batch from what the handler already has: texts, their (truncated) token ids,
    probabilities, and whether each text was longer than the model's window, all in the same order;
    ``known``: the vocabulary's whole words (:func:`known_words`), for the unfamiliar-word counts;
    ``request_ids``: the id of each answer."""
    records = []
    ids_of = request_ids if request_ids is not None else [None] * len(texts)
    for text, ids, row, cut, rid in zip(texts, token_ids, probabilities, truncated, ids_of, strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        words, unfamiliar = word_counts(text, known)
        records.append(
            RequestRecord(
                chars=len(text),
                tokens=len(ids),
                unknown_tokens=sum(1 for i in ids if i == unknown_token_id) if unknown_token_id is not None else 0,
                truncated=cut,
                probabilities=row,
                label=labels[best],
                text=text,
                words=words,
                unfamiliar_words=unfamiliar,
                request_id=rid,
            )
        )
    return records


class DistributionSink(Protocol):
    """Where the per-batch counts go (``EmotionMetrics`` in the handler)."""

    def start_distributions(self) -> None: ...

    def distributions(
        self,
        confidence: Counter[str],
        token_length: Counter[str],
        unknown_tokens: int,
        truncated: int,
        words: int = 0,
        unfamiliar_words: int = 0,
    ) -> None: ...


class RequestLog:
    """A size- and age-bounded JSON-lines log that several worker processes append to safely.

    Each write opens the file in append mode under an exclusive ``flock`` on a lock file beside
    it, rotates when the file has reached ``max_bytes`` (``requests.jsonl`` -> ``.1`` -> ... ->
    ``.<backups>``, the oldest dropped), writes the batch's lines and closes. A worker therefore
    never writes into a file another worker has just rotated away, and the log never takes more
    than about ``(backups + 1) * max_bytes``.

    With ``max_age_s``, no entry is kept longer than that (give or take ``check_every_s``): the
    current file is rotated once its first entry is half that old, and a rotated file is removed
    once its last entry is.

    Args:
        path: The log file.
        max_bytes: Size at which the file is rotated.
        backups: Rotated files kept.
        max_age_s: Seconds an entry may be kept (None: no age limit).
        check_every_s: Seconds between age checks (a check reads the first line and the rotated
            files' times).
        clock: Unix seconds (tests pass their own).
    """

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        backups: int,
        max_age_s: float | None = None,
        check_every_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes <= 0 or backups < 0:
            raise ValueError(f"request log needs max_bytes > 0 and backups >= 0, not {max_bytes}, {backups}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"request log max_age_s must be > 0 (or None), not {max_age_s}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_age_s = max_age_s
        self.check_every_s = check_every_s
        self.clock = clock
        self._checked_at = float("-inf")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    def write(self, lines: Sequence[str]) -> None:
        """Append ``lines`` (without newlines) as one block."""
        if not lines:
            return
        block = ("\n".join(lines) + "\n").encode("utf-8")
        with open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._expire()
                with contextlib.suppress(FileNotFoundError):
                    if self.path.stat().st_size + len(block) > self.max_bytes and self.path.stat().st_size > 0:
                        self._rotate()
                # Owner-only: the log holds what clients sent (texts too, when an operator opts in).
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "ab") as out:
                    out.write(block)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _expire(self) -> None:
        """Under the lock: apply ``max_age_s`` (at most every ``check_every_s``)."""
        now = self.clock()
        if self.max_age_s is None or now - self._checked_at < self.check_every_s:
            return
        self._checked_at = now
        half = self.max_age_s / 2
        first = self._entry_time(self.path, last=False)
        if first is not None and first < now - half:
            self._rotate()
        for rotated in self.path.parent.glob(self.path.name + ".*"):
            if not rotated.suffix[1:].isdigit():
                continue
            newest = self._entry_time(rotated, last=True)
            if (newest if newest is not None else rotated.stat().st_mtime) < now - half:
                rotated.unlink(missing_ok=True)

    @staticmethod
    def _entry_time(path: Path, last: bool) -> float | None:
        """The ``time`` of a log file's first (or last) entry; None: no file, or no readable time."""
        try:
            with path.open("rb") as log_file:
                if last:
                    log_file.seek(max(0, path.stat().st_size - 65536))
                    lines = [line for line in log_file.read().splitlines() if line.strip()]
                    line = lines[-1] if lines else b""
                else:
                    line = log_file.readline()
            return float(json.loads(line)["time"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _rotate(self) -> None:
        if self.backups == 0:
            self.path.unlink()
            return
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))


def request_log_files(log_dir: Path) -> list[Path]:
    """The request log in ``log_dir`` and its rotated files, oldest first."""
    current = Path(log_dir) / REQUEST_LOG_NAME
    rotated = sorted(
        (p for p in current.parent.glob(REQUEST_LOG_NAME + ".*") if p.suffix[1:].isdigit()),
        key=lambda p: int(p.suffix[1:]),
        reverse=True,
    )
    return [*rotated, current] if current.exists() else rotated


def default_log_dir(in_worker: bool = False) -> Path:
    """TorchServe's log folder: ``$LOG_LOCATION`` when set (TorchServe uses it too), else ``logs``.

    A TorchServe worker runs in its model's unpacked folder, while TorchServe's ``logs`` folder is
    relative to the front end's working directory: with ``in_worker``, a relative ``logs`` is
    taken from the parent process' (the front end's) working directory.
    """
    if os.environ.get("LOG_LOCATION"):
        return Path(os.environ["LOG_LOCATION"])
    if in_worker:
        with contextlib.suppress(OSError):
            return Path(os.readlink(f"/proc/{os.getppid()}/cwd")) / "logs"
    return Path("logs")


def log_entry(
    record: RequestRecord, labels: Sequence[str], now: float, with_text: bool | str, model_version: str | None = None
) -> dict[str, Any]:
    """The request log's JSON object for one request; ``with_text``: True keeps the text,
    ``"hash"`` its SHA-256 (``text_sha256``: repeated texts can be told apart, not read), False
    nothing; ``model_version``: the archive's version that answered."""
    entry: dict[str, Any] = {
        "time": round(now, 3),
        **({"request_id": record.request_id} if record.request_id is not None else {}),
        **({"model_version": model_version} if model_version is not None else {}),
        "chars": record.chars,
        "tokens": record.tokens,
        "unknown_share": round(record.unknown_tokens / record.tokens, 4) if record.tokens else 0.0,
        "words": record.words,
        "unfamiliar_share": round(record.unfamiliar_words / record.words, 4) if record.words else 0.0,
        "truncated": record.truncated,
        "label": record.label,
        "confidence": round(record.confidence, 5),
        "probabilities": {name: round(p, 5) for name, p in zip(labels, record.probabilities, strict=True)},
    }
    if with_text == "hash" and record.text is not None:
        entry["text_sha256"] = hashlib.sha256(record.text.encode("utf-8", "surrogatepass")).hexdigest()
    elif with_text is True and record.text is not None:
        entry["text"] = record.text
    return entry


class EmotionMonitor:
    """Per-batch drift metrics and request log for the handler.

    Args:
        sink: Receives the batch's bucket counts (the handler's ``EmotionMetrics``).
        labels: Label names in the model's order.
        request_log: Where to log requests; None disables the log.
        log_texts: Keep the raw texts in the log (True, operator opt-in; off by default for
            privacy), only their SHA-256 (``"hash"``), or nothing (False).
    """

    def __init__(
        self,
        sink: DistributionSink,
        labels: Sequence[str],
        request_log: RequestLog | None = None,
        log_texts: bool | str = False,
    ) -> None:
        self.sink = sink
        self.labels = list(labels)
        self.request_log = request_log
        self.log_texts = log_texts
        self.model_version: str | None = None  # the archive's version, logged with each answer
        sink.start_distributions()

    @classmethod
    def from_settings(cls, sink: DistributionSink, labels: Sequence[str], settings: Any) -> EmotionMonitor:
        """Build from the handler settings' ``request_log*`` keys (see ``HandlerSettings``)."""
        request_log = None
        if settings.request_log:
            folder = Path(settings.request_log_dir) if settings.request_log_dir else default_log_dir(in_worker=True)
            max_age_s = 86400 * settings.request_log_max_age_days if settings.request_log_max_age_days else None
            request_log = RequestLog(
                folder / REQUEST_LOG_NAME, settings.request_log_max_bytes, settings.request_log_backups, max_age_s
            )
            log.info(
                "request log: %s (texts %s)",
                request_log.path,
                {True: "kept", "hash": "hashed"}.get(settings.request_log_texts, "not kept"),
            )
        return cls(sink, labels, request_log, settings.request_log_texts)

    def observe_batch(self, records: Sequence[RequestRecord]) -> None:
        """Count one batch's answered requests and append them to the request log."""
        if not records:
            return
        confidence = Counter(bucket_of(r.confidence, CONFIDENCE_BOUNDS) for r in records)
        token_length = Counter(bucket_of(r.tokens, TOKEN_BOUNDS) for r in records)
        self.sink.distributions(
            confidence,
            token_length,
            sum(r.unknown_tokens for r in records),
            sum(1 for r in records if r.truncated),
            sum(r.words for r in records),
            sum(r.unfamiliar_words for r in records),
        )
        if self.request_log is not None:
            now = time.time()
            lines = [json.dumps(log_entry(r, self.labels, now, self.log_texts, self.model_version)) for r in records]
            try:
                self.request_log.write(lines)
            except OSError:
                # A full disk or a removed folder must not fail the requests: the answers are ready.
                log.exception("request log %s: write failed", self.request_log.path)
