"""Each handler speed-up measured for throughput and validation accuracy, one run.

``python -m bench.settings_sweep [--model-dir DIR ...]`` serves the model (default: the one of the
experiment in ``params.yaml``) with one
worker taking batches of up to 16 within 20 ms (``SWEEP_BATCHING``: the best topology for
the PyTorch backend, whose threads contend when two workers share two cores) and one
``handler:`` setting changed at a time; the last rows change workers and batching on top, up
to the shipped ``handler/model-config.yaml``. It measures throughput and p95 with wrk (same
client as ``make bench``) and the worker's resident memory, then sends every validation text
once and compares the answers with the gold labels. Several ``--model-dir`` values (e.g. a
pruned model beside its parent) run every setting for each model in the same run; speed-ups
are relative to the first row. With ``--half-load`` each row is also driven at half its measured
throughput (paced connections, as ``make bench`` drives d) and its latency there reported: the
``shipped, maxBatchDelay ...`` and ``1 thread per worker`` rows trade batching for that latency.
Writes ``bench/results/settings.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import yaml

from bench.run import at_rate, drive, torchserve_setup_server, worker_rss_mb
from loadtest.texts import write_texts
from project import PROJECT_ROOT, VAL_FILE, handler_module, pipeline_model_dir
from training.data import read_labelled

# Batching every setting runs with unless its row changes it.
SWEEP_BATCHING = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 16, "maxBatchDelay": 20}
# The shipped handler/model-config.yaml as a row: its batching and handler section, unchanged.
SHIPPED = "shipped model-config.yaml"
SHIPPED_SPIN = "shipped, spin_wait: true"
SHIPPED_FUSED = "shipped, fuse: true"
# The shipped int8 engine runs each text alone (isolate_texts); these rows share passes instead,
# in int8 (answers move with their companions) and in fp32 (they do not).
SHIPPED_SHARED = "shipped, isolate_texts: false"
SHIPPED_FP32 = "shipped, precision: fp32"
# The shipped configuration with less waiting for a batch and one thread per worker: what latency
# at light load asks for (``--half-load``).
SHIPPED_LATENCY = {
    "shipped, maxBatchDelay 2": ({}, {"maxBatchDelay": 2}),
    "shipped, maxBatchDelay 0": ({}, {"maxBatchDelay": 0}),
    "shipped, 1 thread per worker": ({"threads": 1}, {}),
    "shipped, maxBatchDelay 2, 1 thread per worker": ({"threads": 1}, {"maxBatchDelay": 2}),
}
# Rows whose changes apply to the shipped configuration instead of SWEEP_BATCHING.
ON_SHIPPED = {SHIPPED, SHIPPED_SPIN, SHIPPED_FUSED, SHIPPED_SHARED, SHIPPED_FP32, *SHIPPED_LATENCY}

# The int8 rows that study passes and threads share passes between texts (isolate_texts off).
PASSES_INT8 = {"backend": "onnx", "precision": "int8", "sort_by_length": True, "isolate_texts": False}

# name -> (handler section changes, model-config.yaml top-level changes)
SETTINGS: dict[str, tuple[dict, dict]] = {
    "torch fp32 (baseline)": ({"backend": "torch", "precision": "fp32"}, {}),
    "torch bf16": ({"backend": "torch", "precision": "bf16"}, {}),
    "torch int8 (per tensor)": ({"backend": "torch", "precision": "int8", "isolate_texts": False}, {}),
    "torch bf16, torch.compile": (
        {"backend": "torch", "precision": "bf16", "compile": True},
        {"startupTimeout": 900, "responseTimeout": 120},
    ),
    "torch fp32, passes by length": ({"backend": "torch", "precision": "fp32", "sort_by_length": True}, {}),
    "torch bf16, passes by length": ({"backend": "torch", "precision": "bf16", "sort_by_length": True}, {}),
    "onnx fp32": ({"backend": "onnx", "precision": "fp32"}, {}),
    "onnx int8 (per channel)": ({"backend": "onnx", "precision": "int8", "isolate_texts": False}, {}),
    "onnx int8, passes by length": (PASSES_INT8, {}),
    "onnx int8, passes by length, pass cost 4": (
        PASSES_INT8 | {"pass_cost_tokens": 4},
        {},
    ),
    "onnx int8, passes by length, pass cost 64": (
        PASSES_INT8 | {"pass_cost_tokens": 64},
        {},
    ),
    "onnx int8, passes by length, max_length 32": (
        PASSES_INT8 | {"max_length": 32},
        {},
    ),
    "onnx int8, passes by length, spin_wait": (
        PASSES_INT8 | {"spin_wait": True},
        {},
    ),
    "onnx int8, passes by length, 1 worker x 1 thread": (
        PASSES_INT8 | {"threads": 1},
        {},
    ),
    "onnx int8, passes by length, 2 workers x 1 thread": (
        PASSES_INT8 | {"threads": 1},
        {"minWorkers": 2, "maxWorkers": 2},
    ),
    "onnx int8, passes by length, 2 workers x 2 threads": (
        PASSES_INT8 | {"threads": 2},
        {"minWorkers": 2, "maxWorkers": 2},
    ),
    SHIPPED: ({}, {}),
    SHIPPED_SPIN: ({"spin_wait": True}, {}),
    SHIPPED_FUSED: ({"fuse": True}, {}),
    SHIPPED_SHARED: ({"isolate_texts": False}, {}),
    SHIPPED_FP32: ({"precision": "fp32"}, {}),
    **SHIPPED_LATENCY,
}


# Settings whose first requests are slower: longer warm-up (the handler compiles at load time).
WARMUP_S = {"torch bf16, torch.compile": 180.0}


def validation_accuracy(url: str, headers: dict[str, str], val_file: Path) -> float:
    """Share of validation texts whose served top label equals the gold label."""
    pairs = read_labelled(val_file)

    def ask(text: str) -> str:
        response = requests.post(
            url, data=text.encode(), headers={"Content-Type": "text/plain", **headers}, timeout=300
        )
        response.raise_for_status()
        return response.json()["label"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        labels = list(pool.map(ask, [text for text, _ in pairs]))
    return sum(label == gold for label, (_, gold) in zip(labels, pairs, strict=True)) / len(pairs)


def main(argv: list[str] | None = None) -> int:
    """Run every setting and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, nargs="+", default=[pipeline_model_dir()])
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15)
    parser.add_argument("--warmup", type=float, default=4)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "settings.json")
    parser.add_argument("--only", nargs="+", choices=list(SETTINGS), help="run these settings only")
    parser.add_argument(
        "--half-load",
        action="store_true",
        help="also measure each row's latency at half its throughput (paced, as make bench does for d)",
    )
    args = parser.parse_args(argv)
    base = yaml.safe_load((PROJECT_ROOT / "handler" / "model-config.yaml").read_text())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = write_texts(Path(tmp) / "texts.txt", [text for text, _ in read_labelled(args.val_file)])
        chosen = {name: SETTINGS[name] for name in args.only} if args.only else SETTINGS
        runs = [(model_dir, *item) for model_dir in args.model_dir for item in chosen.items()]
        for index, (model_dir, name, (handler, top_level)) in enumerate(runs):
            if name in ON_SHIPPED:
                handler = {**base["handler"], **handler}
                config = {**base, **top_level, "handler": handler}
            else:
                # every other handler key at its HandlerSettings default, so only the row's changes apply
                handler = {**dataclasses.asdict(handler_module("emotion_settings").HandlerSettings()), **handler}
                config = {**base, **SWEEP_BATCHING, **top_level, "handler": handler}
            warmup = argparse.Namespace(**{**vars(args), "warmup": WARMUP_S.get(name, args.warmup)})
            if len(args.model_dir) > 1:
                name = f"{model_dir.name}: {name}"
            row = {"setting": name, "model_dir": str(model_dir), **handler, **top_level}
            row.update({key: config[key] for key in SWEEP_BATCHING})
            try:
                with torchserve_setup_server(model_dir, config, Path(tmp) / str(index)) as (server, _):
                    url = f"{server.inference_url}/predictions/emotion"
                    speed = drive(url, texts_file, server.keys.get("inference"), warmup)
                    half = (
                        at_rate(url, texts_file, server.keys.get("inference"), speed["requests_per_s"] / 2, args)
                        if args.half_load
                        else None
                    )
                    accuracy = validation_accuracy(url, server.headers("inference"), args.val_file)
                    rss = worker_rss_mb(server)
            except Exception as err:  # one broken setting must not lose the others' measurements
                row["error"] = f"{type(err).__name__}: {err}"
            else:
                row.update(
                    requests_per_s=speed["requests_per_s"],
                    p95_ms=speed["p95_ms"],
                    errors=speed["errors"],
                    val_accuracy=accuracy,
                    rss_mb_per_worker=rss,
                )
                if half is not None:
                    row["half_load"] = {
                        k: half[k]
                        for k in ("target_requests_per_s", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "errors")
                    }
            rows.append(row)
            print(rows[-1], flush=True)
    base_row = rows[0]
    half_column = " p50 / p99 at half load (ms) |" if args.half_load else ""
    print(
        f"\n| setting | requests/s | speed-up | p95 (ms) |{half_column} RSS per worker (MB) | val accuracy "
        "| change (points) |"
    )
    print("| --- | --- | --- | --- |" + (" --- |" if args.half_load else "") + " --- | --- | --- |")
    for row in rows:
        if "error" in row or "error" in base_row:
            print(f"| {row['setting']} | failed: {row.get('error', 'baseline failed')} | | | | | |")
            continue
        row["speedup"] = round(row["requests_per_s"] / base_row["requests_per_s"], 2)
        row["accuracy_change_points"] = round(100 * (row["val_accuracy"] - base_row["val_accuracy"]), 2)
        half = row.get("half_load")
        half_cell = f"| {half['p50_ms']:.0f} / {half['p99_ms']:.0f} " if half else ""
        print(
            f"| {row['setting']} | {row['requests_per_s']} | {row['speedup']} | {row['p95_ms']:.0f} "
            f"{half_cell}| {row['rss_mb_per_worker']} "
            f"| {100 * row['val_accuracy']:.2f}% | {row['accuracy_change_points']:+.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
