"""Each handler speed-up measured for throughput and validation accuracy, one run.

``python -m bench.settings_sweep --model-dir models/emotion`` serves the model with the
tuned batching of ``handler/model-config.yaml`` and one ``handler:`` setting changed at a
time, measures throughput and p95 with wrk (same client as ``make bench``), then sends every
validation text once and compares the answers with the gold labels. Writes
``bench/results/settings.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from bench.run import drive, torchserve_setup_server
from loadtest.settings import PROJECT_ROOT

SETTINGS: dict[str, dict] = {
    "fp32 (baseline)": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "int8 dynamic quantisation": {"precision": "int8"},
    "fp32, sort batch by length": {"precision": "fp32", "sort_by_length": True, "micro_batch_size": 8},
    "bf16, sort batch by length": {"precision": "bf16", "sort_by_length": True, "micro_batch_size": 8},
    "fp32, max_length 64": {"precision": "fp32", "max_length": 64},
}


def validation_accuracy(url: str, headers: dict[str, str], val_file: Path) -> float:
    """Share of validation texts whose served top label equals the gold label."""
    pairs = [line.rsplit(";", 1) for line in val_file.read_text(encoding="utf-8").splitlines() if line]

    def ask(text: str) -> str:
        response = requests.post(url, data=text.encode(), headers={"Content-Type": "text/plain", **headers}, timeout=60)
        response.raise_for_status()
        return response.json()["label"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        labels = list(pool.map(ask, [text for text, _ in pairs]))
    return sum(label == gold for label, (_, gold) in zip(labels, pairs, strict=True)) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    """Run every setting and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=PROJECT_ROOT / "models" / "emotion")
    parser.add_argument("--val-file", type=Path, default=PROJECT_ROOT / "data" / "processed" / "val.txt")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=4)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "settings.json")
    args = parser.parse_args(argv)
    base = yaml.safe_load((PROJECT_ROOT / "handler" / "model-config.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "texts.txt"
        texts_file.write_text("\n".join(line.rsplit(";", 1)[0] for line in args.val_file.read_text().splitlines()))
        for index, (name, handler) in enumerate(SETTINGS.items()):
            config = {**base, "handler": {**base.get("handler", {}), **handler}}
            with torchserve_setup_server(args.model_dir, config, Path(tmp) / str(index)) as (server, _):
                url = f"{server.inference_url}/predictions/emotion"
                speed = drive(url, texts_file, server.keys.get("inference"), args)
                accuracy = validation_accuracy(url, server.headers("inference"), args.val_file)
            rows.append(
                {
                    "setting": name,
                    **handler,
                    "requests_per_s": speed["requests_per_s"],
                    "p95_ms": speed["p95_ms"],
                    "errors": speed["errors"],
                    "val_accuracy": accuracy,
                }
            )
            print(rows[-1], flush=True)
    base_row = rows[0]
    print("\n| setting | requests/s | speed-up | p95 (ms) | val accuracy | change (points) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        row["speedup"] = round(row["requests_per_s"] / base_row["requests_per_s"], 2)
        row["accuracy_change_points"] = round(100 * (row["val_accuracy"] - base_row["val_accuracy"]), 2)
        print(
            f"| {row['setting']} | {row['requests_per_s']} | {row['speedup']} | {row['p95_ms']:.0f} "
            f"| {100 * row['val_accuracy']:.2f}% | {row['accuracy_change_points']:+.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model_dir": str(args.model_dir), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
