"""The texts load tests and benchmarks send, and the latency percentiles they report.

Split files hold one ``text;label`` per line, the label last (a text may contain ``;``); they are
read by ``training.data`` (:func:`training.data.read_labelled`), the project's one split reader.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from training.data import read_labelled


def read_texts(path: Path | str, limit: int | None = None, seed: int | None = None) -> list[str]:
    """The texts of a split file: shuffled with ``seed`` when given, at most ``limit`` of them."""
    texts = [text for text, _ in read_labelled(path)]
    if seed is not None:
        random.Random(seed).shuffle(texts)
    return texts[:limit]


def write_texts(path: Path, texts: list[str]) -> Path:
    """One text per line: the file ``bench/post.lua`` (wrk) sends from."""
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100, nearest rank) of non-empty ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def latency_ms(seconds: list[float], digits: int = 1) -> dict[str, float]:
    """p50, p95 and p99 of latencies given in seconds, in milliseconds."""
    return {f"p{q}_ms": round(1000 * percentile(seconds, q), digits) for q in (50, 95, 99)}
