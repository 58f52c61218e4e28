"""Inference engines and quantisation schemes for the served model, for speed and accuracy.

``python -m bench.engines [--model-dir DIR]`` (``make engines``) exports the model (default: the
one of the experiment in ``params.yaml``) to ONNX and measures, in this process:

- ONNX Runtime: fp32; int8 with dynamic quantisation (the shipped backend: weights per output
  channel, activations quantised on the fly); int8 with static quantisation (QDQ, activation
  ranges calibrated on training texts); fp32 and dynamic int8 on the graph with fused transformer
  layers (``handler.fuse``);
- OpenVINO: fp32; int8 from the same static QDQ graph; the dynamic graph where OpenVINO reads it.

Every engine runs in the handler's ``EmotionEngine`` (same tokenizer, passes by length, softmax)
with the shipped handler settings: texts of a dynamically quantised graph run a pass each
(``handler.isolate_texts``), the other graphs share passes. Speed: texts/s over batches of the shipped ``batchSize``
validation texts back to back, one process; accuracy: every validation text. The matrix-product
rate is the model's multiply-adds over the padded tokens it computed (2 FLOP each) per second of
forward pass, against this CPU's fp32 peak and its int8 peak (with VNNI where the CPU has it), as
``handler/emotion_cpu.py`` computes them from the FMA pipes, their width, the clock and the cores.
Prints the CPU line first; writes ``bench/results/engines.json`` and a Markdown table; names the
fastest engine within ``--max-drop`` accuracy points of ONNX Runtime fp32, and judges the CPU's int8
engine (``CpuCapabilities.int8_engine``) against ``INT8_EFFICIENCY_TARGET`` of the int8 peak
(PASS/FAIL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from project import PROJECT_ROOT, TRAIN_FILE, VAL_FILE, handler_module, pipeline_model_dir
from training.data import read_labelled

MODEL_CONFIG = PROJECT_ROOT / "handler" / "model-config.yaml"
# Where `make venv` installs OpenVINO, apart from site-packages: TorchServe's BaseHandler imports
# `openvino.torch` whenever it can, which slows every worker's start (requirements-openvino.txt).
OPENVINO_DIR = Path(os.environ.get("OPENVINO_DIR", Path(sys.prefix) / "openvino"))
CALIBRATION_TEXTS = 256
# The share of the CPU's int8 peak its int8 engine must reach on the model's matrix products. A
# 6-layer encoder at these sequence lengths spends much of its time outside the big products
# (attention, softmax, LayerNorm, quantising activations), so a third of the peak is good.
INT8_EFFICIENCY_TARGET = 0.25


def matmul_flops(config, batch: int, tokens: int) -> float:
    """FLOPs of a BERT encoder's matrix products for ``batch`` sequences padded to ``tokens``."""
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 4 * hidden * hidden + 2 * hidden * inter  # Q, K, V, output; two feed-forward layers
    attention = 2 * tokens * hidden  # scores and weighted sum, per token
    return 2.0 * batch * tokens * layers * (per_token + attention)


def import_openvino():
    """OpenVINO from ``OPENVINO_DIR`` (see requirements-openvino.txt), else from site-packages."""
    if OPENVINO_DIR.is_dir() and str(OPENVINO_DIR) not in sys.path:
        sys.path.append(str(OPENVINO_DIR))
    import openvino

    return openvino


class OpenVinoBackend:
    """OpenVINO's CPU plugin on one ONNX graph, latency hint, ``threads`` inference threads."""

    def __init__(self, path: Path, config, threads: int, batch_invariant: bool = True) -> None:
        openvino = import_openvino()
        self.batch_invariant = batch_invariant

        core = openvino.Core()
        model = core.read_model(str(path))
        self.compiled = core.compile_model(
            model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        )
        self.request = self.compiled.create_infer_request()
        self.config = config

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        result = self.request.infer({"input_ids": input_ids, "attention_mask": attention_mask})
        return np.asarray(result[self.compiled.output(0)], dtype=np.float32)


def with_invariance(backend, batch_invariant: bool):
    """``backend`` marked as answering each text alike in any pass (or not), by its graph."""
    backend.batch_invariant = batch_invariant
    return backend


def quantize_static(fp32_path: Path, target: Path, engine, texts: list[str]) -> Path:
    """QDQ int8 graph: MatMul weights per output channel (int8), activations per tensor (uint8)
    with ranges calibrated on ``texts``. Only MatMuls with a weight initializer are quantised, as
    in the dynamic scheme (the attention products of two activations stay fp32)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    graph = onnx.load(str(fp32_path))
    weights = {init.name for init in graph.graph.initializer}
    nodes = [n.name for n in graph.graph.node if n.op_type == "MatMul" and any(i in weights for i in n.input)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            batches = [texts[i : i + 16] for i in range(0, len(texts), 16)]
            padded = (engine.pad(engine.token_ids(batch)[0]) for batch in batches)
            self.feeds = iter({"input_ids": ids, "attention_mask": mask} for ids, mask in padded)

        def get_next(self):
            return next(self.feeds, None)

    ort_quantize_static(
        str(fp32_path),
        str(target),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_quantize=nodes,
    )
    return target


# Graphs of ONNX Runtime's own fused kernels (com.microsoft operators), which only it runs.
ORT_ONLY_GRAPHS = ("fp32 fused", "int8 dynamic fused")


def build_graphs(model_dir: Path, out: Path, calibration: list[str], engine) -> dict[str, Path]:
    """The fp32, dynamic int8 and static int8 ONNX graphs of ``model_dir``, and the fp32 and
    dynamic int8 graphs with fused transformer layers (``engine`` tokenises the calibration texts)."""
    export = handler_module("emotion_onnx").export_onnx
    fp32 = export(model_dir, out / "fp32", "fp32")
    return {
        "fp32": fp32,
        "int8 dynamic": export(model_dir, out / "dynamic", "int8"),
        "int8 static": quantize_static(fp32, out / "model-int8-static.onnx", engine, calibration),
        "fp32 fused": export(model_dir, out / "fused", "fp32", fuse=True),
        "int8 dynamic fused": export(model_dir, out / "fused", "int8", fuse=True),
    }


def measure(engine, config, texts: list[str], labels: list[str], batch: int, seconds: float) -> dict:
    """Texts/s and matrix-product rate on back-to-back batches; accuracy on every text. ``config``
    is the model's transformers config (layer sizes for the matrix-product count)."""
    engine.warm_up()
    done, busy, flops, index = 0, 0.0, 0.0, 0
    forward = engine.forward

    def counting_forward(token_ids):
        nonlocal busy, flops
        probabilities, model_ms = forward(token_ids)
        busy += model_ms / 1000
        flops += matmul_flops(config, len(token_ids), max(len(ids) for ids in token_ids))
        return probabilities, model_ms

    engine.forward = counting_forward
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.predict([texts[(index + k) % len(texts)] for k in range(batch)])
        index += batch
        done += batch
    elapsed = time.perf_counter() - start
    engine.forward = forward
    correct = 0
    for i in range(0, len(texts), 64):
        answers = engine.predict(texts[i : i + 64])
        correct += sum(a["label"] == gold for a, gold in zip(answers, labels[i : i + 64], strict=True))
    return {
        "texts_per_s": round(done / elapsed, 1),
        "val_accuracy": round(correct / len(texts), 4),
        "model_share": round(busy / elapsed, 3),
        "gflops": round(flops / busy / 1e9, 1),
    }


def int8_verdict(rows: list[dict], engine: str) -> dict | None:
    """Whether the CPU's int8 engine reached ``INT8_EFFICIENCY_TARGET`` of the int8 peak (None: it
    was not measured, or it is an fp32 engine on this CPU)."""
    row = next((r for r in rows if r["engine"] == engine and "int8_peak_share" in r), None)
    if row is None or "int8" not in engine:
        return None
    share = row["int8_peak_share"]
    check = f"{engine}: {share:.0%} of the int8 peak >= {INT8_EFFICIENCY_TARGET:.0%}"
    return {"engine": engine, "int8_peak_share": share, "check": check, "passed": share >= INT8_EFFICIENCY_TARGET}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=pipeline_model_dir())
    parser.add_argument("--val-file", type=Path, default=VAL_FILE)
    parser.add_argument(
        "--calibration-file",
        type=Path,
        default=TRAIN_FILE,
        help=f"text;label file whose first {CALIBRATION_TEXTS} texts calibrate static quantisation",
    )
    parser.add_argument("--duration", type=float, default=15, help="seconds of measured load per engine")
    parser.add_argument("--max-drop", type=float, default=0.3, help="accuracy points an engine may lose")
    parser.add_argument("--only", nargs="*", help="engine rows to run (default: all)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "engines.json")
    args = parser.parse_args(argv)
    if not (args.model_dir / "config.json").is_file():
        raise SystemExit(f"{args.model_dir} is not a trained model directory: make train EXPERIMENT=<experiment>")

    settings_module, engine_module = handler_module("emotion_settings"), handler_module("emotion_engine")
    shipped = yaml.safe_load(MODEL_CONFIG.read_text())
    settings = settings_module.HandlerSettings.from_yaml(shipped.get("handler"))
    import torch

    threads = settings.threads or torch.get_num_threads()
    labelled = read_labelled(args.val_file)
    texts, labels = [t for t, _ in labelled], [lab for _, lab in labelled]
    calibration = [t for t, _ in read_labelled(args.calibration_file)][:CALIBRATION_TEXTS]
    # Built on the torch backend (the model directory has no graph yet); each row swaps the model.
    engine = engine_module.EmotionEngine(
        args.model_dir, dataclasses.replace(settings, backend="torch", precision="fp32", spin_wait=False)
    )
    engine.settings = settings
    config, batch = engine.model.config, int(shipped["batchSize"])
    onnx_backend = handler_module("emotion_onnx").OnnxBackend
    rows: list[dict] = []
    cpu = handler_module("emotion_cpuinfo").detect()
    print(cpu.line(), flush=True)
    peak, int8_peak = cpu.peak_gflops("fp32"), cpu.peak_gflops("int8")
    with tempfile.TemporaryDirectory() as tmp:
        graphs = build_graphs(args.model_dir, Path(tmp), calibration, engine)
        runners: dict[str, Callable] = {}
        for scheme, path in graphs.items():
            # A dynamically quantised graph takes one activation scale per pass: the handler runs
            # its texts a pass each (handler.isolate_texts), as served; the others share passes.
            invariant = "dynamic" not in scheme
            runners[f"onnxruntime {scheme}"] = lambda p=path, i=invariant: with_invariance(
                onnx_backend(args.model_dir, settings, graph=p), i
            )
            if scheme not in ORT_ONLY_GRAPHS:
                runners[f"openvino {scheme}"] = lambda p=path, i=invariant: OpenVinoBackend(p, config, threads, i)
        for name, make in runners.items():
            if args.only and name not in args.only:
                continue
            print(f"{name} ...", flush=True)
            try:
                engine.model = make()
                row = {"engine": name, **measure(engine, config, texts, labels, batch, args.duration)}
            except Exception as err:  # an engine that cannot run this graph is a row, not a crash
                row = {"engine": name, "failed": f"{type(err).__name__}: {str(err)[:300]}"}
            row["graph_mb"] = round(graphs[name.split(" ", 1)[1]].stat().st_size / 1e6, 1)
            if "gflops" in row:
                row["fp32_peak_share"] = round(row["gflops"] / peak, 3)
                row["int8_peak_share"] = round(row["gflops"] / int8_peak, 3)
            rows.append(row)
    ran = [r for r in rows if "failed" not in r]
    reference = next((r for r in ran if r["engine"] == "onnxruntime fp32"), ran[0] if ran else None)
    print(f"\npeaks: fp32 {peak:.0f}, int8 {int8_peak:.0f} GFLOP/s, {cpu.physical_cores} cores, {threads} threads\n")
    print("| engine | texts/s | speed-up | val accuracy | GFLOP/s | of fp32 peak | of int8 peak | graph MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['engine']} | did not run: {row['failed']} | | | | | | {row['graph_mb']} |")
            continue
        row["speedup"] = round(row["texts_per_s"] / reference["texts_per_s"], 2)
        print(
            f"| {row['engine']} | {row['texts_per_s']} | {row['speedup']}x | {100 * row['val_accuracy']:.2f}% "
            f"| {row['gflops']} | {100 * row['fp32_peak_share']:.0f}% | {100 * row['int8_peak_share']:.0f}% "
            f"| {row['graph_mb']} |"
        )
    eligible = [r for r in ran if 100 * (reference["val_accuracy"] - r["val_accuracy"]) <= args.max_drop]
    best = max(eligible, key=lambda r: r["texts_per_s"]) if eligible else None
    if best:
        print(f"\nfastest within {args.max_drop} points of {reference['engine']}: {best['engine']}")
    verdict = int8_verdict(rows, cpu.int8_engine)
    if verdict is not None:
        print(f"{'PASS' if verdict['passed'] else 'FAIL'}: {verdict['check']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model_dir": os.path.relpath(args.model_dir, PROJECT_ROOT),
        "threads": threads,
        "cpu": cpu.summary(),
        "int8_verdict": verdict,
        "duration_s": args.duration,
        "rows": rows,
        "fastest_within_max_drop": best["engine"] if best else None,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
