"""``make bench``'s verdict: the table of setups, d's ratios to the others against their targets,
the absolute checks, ``bench/results/bench.json`` and ``bench.png`` (``bench.run`` measures)."""

from __future__ import annotations

import json
from pathlib import Path

from project import handler_module

# Ratio targets, measured in one run on one machine, so they mean the same on every CPU (docs/benchmarks.md,
# "Benchmark"): d against the in-process ceiling of its own engine, the best peer server, the
# in-process fp32 model, the seed design and stock TorchServe.
TARGETS = {"d/ceiling": 0.85, "d/best peer": 1.2, "d/a": 2.5, "d/b": 3.0, "d/c": 3.0}
# make predict through the gateway against d's requests/s.
BULK_TARGET = 0.8
# Absolute targets: p99 at half load on the project's 2-core machine (reported with the CPU line).
HALF_LOAD_P99_MS = 50
PEERS = {"e": "litserve", "f": "ray"}
NAMES = {
    "a": "in-process fp32 batched",
    "b": "FastAPI 1 text/pass",
    "c": "TorchServe stock",
    "d": "TorchServe tuned",
    "e": "LitServe, d's engine",
    "f": "Ray Serve, d's engine",
    "ceiling": "ceiling: d's engine, no HTTP",
}
# The archive of the shipped backend, as the CPU image packs it (no weights when the backend does
# not read them), must stay under this size.
ARCHIVE_LIMIT_MB = 40


def report(results: dict[str, dict], tuned: dict, args) -> int:
    """Print the table, ratios and target checks; write bench.json and bench.png."""
    ran = {k: row for k, row in results.items() if "failed" not in row}
    print(f"\n{'setup':<30}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'client CPU':>12}{'RSS MB':>8}")
    for key, row in results.items():
        label = f"{key}. {NAMES[key]}" if len(key) == 1 else NAMES[key]
        if "failed" in row:
            print(f"{label:<30}  did not run")
        elif key == "ceiling":
            print(
                f"{label:<30}{row['requests_per_s']:>8}  (no HTTP: {row['workers']} x batches of {row['batch_size']})"
            )
        else:
            print(
                f"{label:<30}{row['requests_per_s']:>8}{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}"
                f"{row['p99_ms']:>9.1f}{row['client_cpu_share']:>12.1%}{row['rss_mb_per_worker']:>8}"
            )
    d = results["d"]
    half = d["half_load"]
    backend = (tuned.get("handler") or {}).get("backend", "torch")
    print(
        f"\nd at half its throughput (paced, target {half['target_requests_per_s']} req/s): "
        f"{half['requests_per_s']} req/s, p50 {half['p50_ms']:.1f} ms, p95 {half['p95_ms']:.1f} ms, "
        f"p99 {half['p99_ms']:.1f} ms"
    )
    print(f"d: cold start {d['cold_start_s']} s, archive {d['archive_mb']} MB ({backend} backend)")
    listed = d["lists"]
    print(
        f"d with {listed['texts_per_request']} texts a request ({listed['concurrency']} connections): "
        f"{listed['texts_per_s']} texts/s ({listed['requests_per_s']} req/s, p50 {listed['p50_ms']:.1f} ms, "
        f"p99 {listed['p99_ms']:.1f} ms), {round(listed['texts_per_s'] / d['requests_per_s'], 2)}x d's single texts"
    )
    bulk = d["bulk"]
    print(
        f"make predict through the gateway: {bulk['rows']} texts in {bulk['seconds']} s, "
        f"{bulk['texts_per_s']} texts/s, {bulk['ratio_to_d']}x d's requests/s"
    )
    ratios = ratio_table(results)
    print("\nratios: " + ", ".join(f"{r} = {v}" for r, v in ratios.items()))
    checks = [(f"{r} >= {t}", ratios.get(r) is not None and ratios[r] >= t) for r, t in TARGETS.items()]
    checks += [
        (f"p99 <= {HALF_LOAD_P99_MS} ms at half of d's throughput", half["p99_ms"] <= HALF_LOAD_P99_MS),
        ("cold start <= 5 s", d["cold_start_s"] <= 5),
        (f"archive <= {ARCHIVE_LIMIT_MB} MB ({backend} backend)", d["archive_mb"] <= ARCHIVE_LIMIT_MB),
        ("RSS per worker <= 500 MB", d["rss_mb_per_worker"] <= 500),
        (f"make predict >= {BULK_TARGET} x d", bulk["ratio_to_d"] >= BULK_TARGET),
        ("every setup ran", len(ran) == len(results)),
        (
            "no errors",
            all(row.get("errors", 0) == 0 for row in ran.values())
            and half["errors"] == listed["errors"] == bulk["errors"] == 0,
        ),
    ]
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(
        json.dumps(
            {
                "cpu": handler_module("emotion_cpuinfo").detect().summary(),
                "results": results,
                "ratios": ratios,
                "checks": dict(checks),
                "concurrency": args.concurrency,
                "duration_s": args.duration,
            },
            indent=2,
        )
        + "\n"
    )
    plot({k: row for k, row in ran.items() if k != "ceiling"}, NAMES, args.out / "bench.png")
    return 0


def ratio_table(results: dict[str, dict]) -> dict[str, float]:
    """d's throughput over each other row's (setups that did not run have no ratio); the best peer
    is the faster of LitServe and Ray Serve."""
    d = results["d"]["requests_per_s"]
    rates = {k: row["requests_per_s"] for k, row in results.items() if "failed" not in row and row["requests_per_s"]}
    ratios = {f"d/{k}": round(d / rates[k], 2) for k in ("a", "b", "c", "ceiling") if k in rates}
    if "lists" in results["d"]:
        ratios["d lists/d"] = round(results["d"]["lists"]["texts_per_s"] / d, 2)
    if "bulk" in results["d"]:
        ratios["make predict/d"] = results["d"]["bulk"]["ratio_to_d"]
    peers_ran = [rates[k] for k in PEERS if k in rates]
    if peers_ran:
        ratios["d/best peer"] = round(d / max(peers_ran), 2)
    return ratios


def plot(results: dict, names: dict, path: Path) -> None:
    """Bar chart of throughput and p95 per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar([names[k] for k in keys], [results[k]["requests_per_s"] for k in keys], color="tab:blue")
    ax1.set_ylabel("requests/s")
    ax2.bar([names[k] for k in keys], [results[k]["p95_ms"] for k in keys], color="tab:orange")
    ax2.set_ylabel("p95 latency (ms)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
