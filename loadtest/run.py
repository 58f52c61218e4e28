"""Headless load test: Locust with the stepped shape, CSV + HTML reports, a PNG plot, and a verdict.

``python -m loadtest.run [--config loadtest/config.yaml] [--out DIR]`` exits non-zero
when any request failed or the overall p95 latency exceeds ``p95_budget_ms``.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

from loadtest.settings import CONFIG_ENV, DEFAULT_CONFIG, LoadTestSettings
from project import PROJECT_ROOT

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def aggregated(stats_csv: Path) -> dict[str, float]:
    """Requests, failures, throughput and percentiles of the whole run from Locust's ``_stats.csv``."""
    row = next(r for r in read_rows(stats_csv) if r["Name"] == "Aggregated")
    return {
        "requests": int(row["Request Count"]),
        "failures": int(row["Failure Count"]),
        "rps": float(row["Requests/s"]),
        "p50_ms": float(row["50%"]),
        "p95_ms": float(row["95%"]),
        "p99_ms": float(row["99%"]),
    }


def plot_history(history_csv: Path, out: Path) -> Path:
    """Throughput and p50/p95 latency over time from Locust's ``_stats_history.csv``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_rows(history_csv) if r["Name"] == "Aggregated" and r["50%"] not in ("N/A", "")]
    if not rows:
        raise ValueError(f"{history_csv} has no aggregated rows: did any request run?")
    start = int(rows[0]["Timestamp"])
    seconds = [int(r["Timestamp"]) - start for r in rows]
    fig, (ax_rps, ax_lat) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    ax_rps.plot(seconds, [float(r["Requests/s"]) for r in rows], label="requests/s")
    ax_users = ax_rps.twinx()
    ax_users.step(seconds, [int(r["User Count"]) for r in rows], color="tab:gray", alpha=0.5, label="users")
    ax_users.set_ylabel("users")
    ax_rps.set_ylabel("requests/s")
    ax_rps.set_title("Throughput and latency under the stepped load")
    ax_lat.plot(seconds, [float(r["50%"]) for r in rows], label="p50")
    ax_lat.plot(seconds, [float(r["95%"]) for r in rows], label="p95")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("seconds")
    ax_lat.legend()
    for ax in (ax_rps, ax_lat):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the load test and print the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: out_dir of the config)")
    args = parser.parse_args(argv)
    settings = LoadTestSettings.load(args.config)
    out = args.out or PROJECT_ROOT / settings.out_dir
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "locust"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        settings.host,
        "--csv",
        str(prefix),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--run-time",
        f"{int(settings.duration + 30)}s",
        "--stop-timeout",
        "10",
        "--exit-code-on-error",
        "0",
        "--only-summary",
    ]
    env = dict(os.environ, **{CONFIG_ENV: str(args.config.resolve())})
    result = subprocess.run(command, env=env, cwd=PROJECT_ROOT)
    if result.returncode != 0:
        print(f"locust exited with {result.returncode}", file=sys.stderr)
        return result.returncode
    summary = aggregated(Path(f"{prefix}_stats.csv"))
    plot = plot_history(Path(f"{prefix}_stats_history.csv"), out / "loadtest.png")
    print(
        f"\n{summary['requests']} requests, {summary['failures']} failed, {summary['rps']:.1f} req/s, "
        f"p50 {summary['p50_ms']:.0f} ms, p95 {summary['p95_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms"
    )
    print(f"reports: {out / 'report.html'}, {prefix}_stats.csv, {plot}")
    verdict = 0
    if summary["requests"] == 0:
        print("FAIL: no request completed", file=sys.stderr)
        verdict = 1
    if summary["failures"]:
        print(f"FAIL: {summary['failures']} request(s) failed", file=sys.stderr)
        verdict = 1
    if summary["p95_ms"] > settings.p95_budget_ms:
        print(
            f"FAIL: p95 {summary['p95_ms']:.0f} ms exceeds the budget of {settings.p95_budget_ms:.0f} ms",
            file=sys.stderr,
        )
        verdict = 1
    if verdict == 0:
        print(f"PASS: no failures, p95 within {settings.p95_budget_ms:.0f} ms")
    return verdict


if __name__ == "__main__":
    sys.exit(main())
