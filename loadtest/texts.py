"""The texts load tests and benchmarks send, and the latency percentiles they report.

Split files hold one ``text;label`` per line, the label last (a text may contain ``;``).
"""

from __future__ import annotations

import math
import random
from pathlib import Path


def read_labelled(path: Path | str) -> list[tuple[str, str]]:
    """The ``(text, label)`` pairs of a split file, both stripped; lines without a ``;`` are skipped.

    Read as ``training.data.load_split`` reads them: a byte order mark that starts the file is
    dropped, and lines end at ``\n`` (and an ``\r`` before it) only, so a text may hold the other
    characters ``str.splitlines`` or universal newlines break at (a lone ``\r``, U+2028, U+0085,
    form feeds, ...).
    """
    content = Path(path).read_bytes().decode("utf-8-sig")
    lines = (line.removesuffix("\r") for line in content.split("\n"))
    return [(text.strip(), label.strip()) for text, sep, label in (line.rpartition(";") for line in lines) if sep]


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
