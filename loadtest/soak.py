"""Soak test: a steady load at a share of measured capacity through the gateway, for minutes.

``python -m loadtest.soak`` (``make soak``) runs against the service ``make serve`` started:

1. capacity: a closed loop of ``--concurrency`` clients for ``--capacity-seconds``;
2. soak: requests paced at ``--share`` of that capacity (open loop: each request is due at a fixed
   time whether or not the previous ones have returned, and its latency is counted from when it
   was due, so a stall shows up in the percentiles) for ``--minutes``;
3. one row per window (a minute by default): requests, failures, p50/p95, and the resident memory
   of the front end (TorchServe's JVM and nginx) and of each TorchServe worker.

Targets (exit 1 when missed): no failed request, resident memory growing less than 10% after the
first window, and the last window's p95 within 25% of the first's.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from loadtest.closed_loop import ClosedLoop
from loadtest.settings import LoadTestSettings, inference_key
from loadtest.texts import percentile
from project import PROJECT_ROOT


@dataclass
class Window:
    """What one window of the soak saw."""

    start: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    memory_mb: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        ok = self.latencies or [0.0]
        return {
            "requests": len(self.latencies) + self.failures,
            "failed": self.failures,
            "p50_ms": round(1000 * percentile(ok, 50), 1),
            "p95_ms": round(1000 * percentile(ok, 95), 1),
            **{f"rss_{name}_mb": mb for name, mb in sorted(self.memory_mb.items())},
        }


def service_memory_mb(root_pid: int) -> dict[str, float]:
    """Resident memory (MB) of the processes under ``root_pid``: ``frontend`` (TorchServe's JVM and
    nginx together) and ``worker<N>`` for each TorchServe worker, by start order."""
    memory: dict[str, float] = {"frontend": 0.0}
    workers = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            name, cmdline, rss = proc.name(), " ".join(proc.cmdline()), proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        if "model_service_worker" in cmdline:
            workers.append((proc.create_time(), proc.pid, rss))
        elif name in ("java", "nginx"):
            memory["frontend"] += rss
    for n, (_, _, rss) in enumerate(sorted(workers)):
        memory[f"worker{n}"] = rss
    return {name: round(mb, 1) for name, mb in memory.items()}


class PacedLoad:
    """Requests due at a fixed rate, sent by a pool of threads; results per time window."""

    def __init__(self, url: str, headers: dict[str, str], texts: list[str], rate: float, threads: int = 32) -> None:
        self.url, self.headers, self.texts, self.rate = url, headers, texts, rate
        self.due: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self.results: queue.Queue[tuple[float, float, bool]] = queue.Queue()
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]

    def _send(self) -> None:
        session = requests.Session()
        while (item := self.due.get()) is not None:
            due, text = item
            try:
                ok = session.post(self.url, data=text.encode(), headers=self.headers, timeout=60).status_code == 200
            except requests.RequestException:
                ok = False
            self.results.put((due, time.monotonic() - due, ok))

    def run(self, seconds: float, window: float, on_window) -> list[Window]:
        """Pace requests for ``seconds``; ``on_window(window)`` fills each window's memory reading."""
        for thread in self.threads:
            thread.start()
        start = time.monotonic()
        windows = [Window(start + k * window) for k in range(int(seconds // window))]
        n = 0
        end = start + len(windows) * window
        while (due := start + n / self.rate) < end:
            time.sleep(max(0.0, due - time.monotonic()))
            self.due.put((due, self.texts[n % len(self.texts)]))
            n += 1
            if n % max(1, int(self.rate)) == 0:
                k = int((time.monotonic() - start) // window)
                if 0 < k <= len(windows) and not windows[k - 1].memory_mb:
                    windows[k - 1].memory_mb = on_window()
        for _ in self.threads:
            self.due.put(None)
        for thread in self.threads:
            thread.join(timeout=90)
        if not windows[-1].memory_mb:
            windows[-1].memory_mb = on_window()
        while not self.results.empty():
            due, latency, ok = self.results.get()
            window_for = windows[min(int((due - start) // window), len(windows) - 1)]
            if ok:
                window_for.latencies.append(latency)
            else:
                window_for.failures += 1
        return windows


def verdict(windows: list[Window], rss_growth: float = 0.10, p95_drift: float = 0.25) -> list[tuple[str, bool, str]]:
    """The soak's targets: (name, passed, measured) for each."""
    rows = [w.row() for w in windows]
    failed = sum(r["failed"] for r in rows)
    first, last = windows[0].memory_mb, windows[-1].memory_mb
    growth = max((last.get(k, 0) - v) / v for k, v in first.items() if v > 0) if first else 0.0
    drift = (rows[-1]["p95_ms"] - rows[0]["p95_ms"]) / rows[0]["p95_ms"] if rows[0]["p95_ms"] else 0.0
    return [
        ("no failed request", failed == 0, str(failed)),
        (f"RSS growth after the first window < {rss_growth:.0%}", growth < rss_growth, f"{growth:+.1%}"),
        (f"p95 drift (last vs first window) < {p95_drift:.0%}", drift < p95_drift, f"{drift:+.1%}"),
    ]


def soak(
    url: str,
    headers: dict[str, str],
    texts: list[str],
    root_pid: int,
    minutes: float,
    share: float = 0.7,
    window: float = 60,
    concurrency: int = 8,
    capacity_seconds: float = 15,
) -> dict:
    """Measure capacity, then soak at ``share`` of it; returns capacity, rate, rows and verdict."""
    with ClosedLoop(url, headers, texts, concurrency) as probe:
        time.sleep(capacity_seconds)
    capacity = probe.result.statuses.count(200) / capacity_seconds
    rate = share * capacity
    print(f"capacity {capacity:.1f} requests/s; soaking at {rate:.1f}/s for {minutes:g} min", flush=True)
    windows = PacedLoad(url, {"Content-Type": "text/plain", **headers}, texts, rate).run(
        60 * minutes, window, lambda: service_memory_mb(root_pid)
    )
    return {
        "capacity_rps": round(capacity, 1),
        "rate_rps": round(rate, 1),
        "window_s": window,
        "rows": [w.row() for w in windows],
        "verdict": [{"target": n, "passed": p, "measured": m} for n, p, m in verdict(windows)],
    }


def print_report(report: dict) -> None:
    rows = report["rows"]
    columns = list(rows[0])
    print("\n| window | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for k, row in enumerate(rows, 1):
        print(f"| {k} | " + " | ".join(str(row[c]) for c in columns) + " |")
    for target in report["verdict"]:
        print(f"{'PASS' if target['passed'] else 'FAIL'}  {target['target']}: {target['measured']}")


def main(argv: list[str] | None = None) -> int:
    """Soak the service of ``make serve`` and print the table and the verdict."""
    from serving.process import ManagedProcess
    from serving.stack import pid_file

    parser = argparse.ArgumentParser(description="Soak test through the gateway.")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--share", type=float, default=0.7, help="share of measured capacity")
    parser.add_argument("--window", type=float, default=60, help="seconds per row")
    parser.add_argument("--url", default=None, help="gateway (default: loadtest/config.yaml's host)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "loadtest" / "results" / "soak.json")
    args = parser.parse_args(argv)
    settings = LoadTestSettings.load()
    if ManagedProcess.recorded(pid_file()) is None:
        print("no running service: start it with `make serve`", file=sys.stderr)
        return 2
    key = inference_key()
    url = f"{args.url or settings.host}/predictions/{settings.model}"
    report = soak(
        url,
        {"Authorization": f"Bearer {key}"} if key else {},
        settings.texts(),
        int(pid_file.read_text()),
        args.minutes,
        args.share,
        args.window,
    )
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(t["passed"] for t in report["verdict"]) else 1


if __name__ == "__main__":
    sys.exit(main())
