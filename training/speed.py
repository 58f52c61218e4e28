"""Side-by-side training speed: fp32 vs bf16 autocast, with and without length buckets.

``python -m training.speed [--examples 2000]`` trains one epoch on the same seeded
subset in each setting, in one process one after another, and writes
``metrics/train_speed.json`` with seconds per epoch and the ratio to fp32.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from project import PROJECT_ROOT
from training.config import compose
from training.train import train

SETTINGS = {
    "fp32, no buckets": ["train.precision=fp32", "train.length_buckets=false"],
    "fp32, buckets": ["train.precision=fp32", "train.length_buckets=true"],
    "bf16, no buckets": ["train.precision=bf16", "train.length_buckets=false"],
    "bf16, buckets (default)": ["train.precision=bf16", "train.length_buckets=true"],
}


def main(argv: list[str] | None = None) -> int:
    """Run every setting and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "metrics" / "train_speed.json")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in SETTINGS.items():
            cfg = compose(
                [
                    "logger=none",
                    "train.epochs=1",
                    f"data.max_train_examples={args.examples}",
                    "data.max_val_examples=500",
                    f"paths.model_dir={tmp}/model",
                    f"paths.metrics_dir={tmp}/metrics",
                    *overrides,
                ]
            )
            metrics = train(cfg)
            results[name] = {"epoch_seconds": metrics["epoch_seconds"][0], "val_accuracy": metrics["accuracy"]}
    base = results["fp32, no buckets"]["epoch_seconds"]
    print(f"\n{'setting':<26}{'s/epoch':>10}{'speed-up':>10}{'val acc':>10}   ({args.examples} examples)")
    for name, row in results.items():
        row["speedup_vs_fp32"] = round(base / row["epoch_seconds"], 2)
        print(f"{name:<26}{row['epoch_seconds']:>10.1f}{row['speedup_vs_fp32']:>10.2f}{row['val_accuracy']:>10.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"examples": args.examples, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
