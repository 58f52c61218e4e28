"""Replay validation texts and then a shifted stream through a real TorchServe scraped by a real
Prometheus, and plot what the drift panels show.

``python -m monitoring.drift_demo --model-store <folder with emotion.mar>`` starts both on free
loopback ports (Prometheus with 1 s scrapes and the drift rules rendered with a short window),
sends the validation texts in shuffled order and then a stream built from them (four texts run
together, emoji appended), runs ``make drift``'s comparison on each half of the request log, and
writes ``drift_panels.png`` (the dashboard's PSI and share panels, from Prometheus range queries)
and ``drift_demo.json`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from monitoring.drift import read_texts, run_drift
from monitoring.drift_rules import dump, render_reference, render_rules
from monitoring.drift_stats import MONITORING_DIR, load_drift_config
from monitoring.profile import load_profile
from monitoring.prometheus_server import Prometheus
from project import ARCHIVE_NAME, MODEL_STORE, OUTPUTS_DIR, VAL_FILE
from serving.server import TorchServe, free_port


def shifted_stream(texts: list[str], count: int, seed: int = 0) -> list[str]:
    """Texts unlike the validation texts, built from them: four run together, emoji appended."""
    rng = random.Random(seed)
    return ["😱😂 " + " and ".join(rng.sample(texts, 4)) for _ in range(count)]


def send(server: TorchServe, texts: list[str], clients: int = 4) -> int:
    """Post ``texts`` concurrently; returns how many were answered with 200."""
    url = f"{server.inference_url}/predictions/emotion"
    headers = {"Content-Type": "text/plain", **server.headers("inference")}
    with requests.Session() as session, ThreadPoolExecutor(clients) as pool:
        codes = pool.map(lambda t: session.post(url, data=t.encode(), headers=headers, timeout=60).status_code, texts)
        return sum(code == 200 for code in codes)


def range_query(prometheus: Prometheus, expr: str, start: float, end: float) -> list[tuple[float, float]]:
    """(time, value) points of a single-series range query, one per second."""
    response = requests.get(
        f"{prometheus.url}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": "1s"},
        timeout=30,
    )
    response.raise_for_status()
    result = response.json()["data"]["result"]
    return [(float(t), float(v)) for t, v in result[0]["values"]] if result else []


def plot(series: dict[str, list[tuple[float, float]]], t0: float, switch: float, threshold: float, out: Path) -> None:
    """The two drift panels as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for name in ("label PSI", "length PSI", "confidence PSI"):
        points = series[name]
        left.plot([t - t0 for t, _ in points], [v for _, v in points], label=name)
    left.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"alert threshold {threshold}")
    left.set(title="Drift: PSI against the reference", xlabel="seconds", ylabel="PSI (symmetric log scale)")
    left.set_yscale("symlog", linthresh=0.1)
    for name in ("low-confidence share", "reference low-confidence share", "unknown-token share"):
        points = series[name]
        right.plot([t - t0 for t, _ in points], [v for _, v in points], label=name)
    right.set(title="Low-confidence answers and unknown tokens", xlabel="seconds", ylabel="share")
    for ax in (left, right):
        ax.axvline(switch - t0, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=8)
    fig.suptitle("validation texts, then the shifted stream (dotted line); live Prometheus data")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-store", type=Path, default=MODEL_STORE)
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument("--requests", type=int, default=1000, help="per stream")
    parser.add_argument("--window", default="30s", help="the rules' window")
    parser.add_argument("--out-dir", type=Path, default=OUTPUTS_DIR / "drift-demo")
    args = parser.parse_args(argv)
    profile = load_profile(args.model_store / ARCHIVE_NAME)
    config = load_drift_config()
    config["prometheus"].update(min_requests=50)
    texts = read_texts(args.val_file)
    rng = random.Random(0)
    validation = [rng.choice(texts) for _ in range(args.requests)]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        rules = Path(tmp) / "rules"
        rules.mkdir()
        (rules / "drift_reference.yml").write_text(dump(render_reference(profile), "demo"))
        (rules / "drift_rules.yml").write_text(dump(render_rules(config, window=args.window, for_="5s"), "demo"))
        server = TorchServe(args.model_store, Path(tmp) / "ts")
        prometheus = Prometheus(
            [server.metrics_url.removeprefix("http://")],
            Path(tmp) / "prometheus",
            free_port(),
            scrape_interval="1s",
            rule_files=[MONITORING_DIR / "alerts.yml", rules / "drift_reference.yml", rules / "drift_rules.yml"],
        )
        try:
            server.start(timeout=300)
            prometheus.start()
            t0 = time.time()
            answered = send(server, validation)
            time.sleep(2)
            alerts_validation = sorted({a["labels"]["alertname"] for a in prometheus.alerts()})
            switch = time.time()
            answered_shifted = send(server, shifted_stream(texts, args.requests))
            time.sleep(8)
            alerts_shifted = sorted({a["labels"]["alertname"] for a in prometheus.alerts() if a["state"] == "firing"})
            end = time.time()
            w = args.window
            series = {
                "label PSI": range_query(prometheus, f"emotion:label_psi:{w}", t0, end),
                "length PSI": range_query(prometheus, f"emotion:token_length_psi:{w}", t0, end),
                "confidence PSI": range_query(prometheus, f"emotion:confidence_psi:{w}", t0, end),
                "low-confidence share": range_query(prometheus, f"emotion:low_confidence_share:{w}", t0, end),
                "reference low-confidence share": range_query(
                    prometheus, "emotion:reference_low_confidence_share", t0, end
                ),
                "unknown-token share": range_query(prometheus, f"emotion:unknown_token_share:{w}", t0, end),
            }
            log_dir = server.workdir / "logs"
            entries = (log_dir / "requests.jsonl").read_text().splitlines()
            first = Path(tmp) / "first"
            first.mkdir()
            (first / "requests.jsonl").write_text("\n".join(entries[: args.requests]) + "\n")
            code_validation, summary_validation = run_drift(first, profile, args.out_dir / "validation", args.requests)
            code_shifted, summary_shifted = run_drift(log_dir, profile, args.out_dir / "shifted", args.requests)
        finally:
            prometheus.stop()
            server.stop()
    plot(series, t0, switch, config["prometheus"]["label_psi"], args.out_dir / "drift_panels.png")
    result = {
        "requests_per_stream": args.requests,
        "answered": [answered, answered_shifted],
        "seconds": [switch - t0, end - switch],
        "alerts_after_validation": alerts_validation,
        "alerts_firing_after_shifted": alerts_shifted,
        "make_drift_exit": {"validation": code_validation, "shifted": code_shifted},
        "make_drift_summary": {"validation": summary_validation, "shifted": summary_shifted},
    }
    (args.out_dir / "drift_demo.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "make_drift_summary"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
