"""The GPU path, checked by one command on a CUDA machine: ``make gpu-check``.

Two steps, because the GPU machine has only a small copy of the working tree (64 MiB), torch,
transformers and onnxruntime, no Java, no network and no data:

``python -m bench.gpu_check pack`` (``make gpu-pack``, here) writes ``outputs/gpu-check/``: the
model in fp16 (MiniLM: 45 MB), its tokenizer and config, the validation texts and the CPU int8
archive's probabilities for each of them (the served engine, run here), with this CPU's line.

``python -m bench.gpu_check check`` (``make gpu-check``, on the GPU machine) then

* builds the serving engine on the GPU: the handler's torch backend in fp16 (what a GPU worker
  serves) and in bf16, plus ONNX Runtime on an fp32 graph exported there, with its TensorRT or CUDA
  provider when onnxruntime has one;
* checks each engine's labels against the CPU int8 archive's on the validation texts: at least
  ``AGREEMENT_TARGET`` of them the same, and reports the largest probability difference;
* measures texts/s and p50/p99 latency per batch at batch sizes 1, 8 and 64, and peak GPU memory;
* prints the torch and CUDA builds, the driver and whether they are compatible (:func:`cuda_verdict`).

Without a CUDA device it says so and exits 0. ``--device cpu`` runs the same check on the CPU (the
torch backend in fp32), which CI uses to test everything but the GPU itself. Exit code 1 when an
engine's agreement is below the target.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path

from project import ARCHIVE, OUTPUTS_DIR, PROJECT_ROOT, VAL_FILE, handler_module
from training.data import read_labelled

PACK_DIR = OUTPUTS_DIR / "gpu-check"
AGREEMENT_TARGET = 0.99
BATCHES = (1, 8, 64)
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def read_texts(path: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a ``text;label`` file (lines with an empty text left out)."""
    pairs = [(text, label) for text, label in read_labelled(path) if text]
    return [text for text, _ in pairs], [label for _, label in pairs]


def pack(model_dir: Path, archive: Path, val_file: Path, out: Path, limit: int | None = None) -> Path:
    """Write the GPU machine's inputs to ``out`` (module docstring); returns ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, out / name)
    weights = load_file(model_dir / "model.safetensors")
    half = {k: v.to(torch.float16) for k, v in weights.items()}
    save_file(half, out / "model.safetensors", metadata={"format": "pt"})
    texts, labels = read_texts(val_file)
    texts, labels = texts[:limit], labels[:limit]
    settings_cls = handler_module("emotion_settings").HandlerSettings
    engine_cls = handler_module("emotion_engine").EmotionEngine
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(archive) as mar:
            mar.extractall(tmp)
        import yaml

        section = yaml.safe_load((Path(tmp) / "model-config.yaml").read_text()).get("handler")
        settings = settings_cls.from_yaml(section)
        engine = engine_cls(Path(tmp), settings)
        probabilities = [a["probabilities"] for a in predict_all(engine, texts)]
    reference = {
        "engine": f"{settings.backend} {settings.precision}",
        "cpu": handler_module("emotion_cpuinfo").detect().line(),
        "labels": engine.labels,
        "texts": texts,
        "gold": labels,
        "probabilities": [[row[label] for label in engine.labels] for row in probabilities],
    }
    (out / "reference.json").write_text(json.dumps(reference))
    return out


def predict_all(engine, texts: list[str], batch: int = 64) -> list[dict]:
    answers: list[dict] = []
    for i in range(0, len(texts), batch):
        answers += engine.predict(texts[i : i + batch])
    return answers


def cuda_verdict(torch_cuda: str | None, driver_cuda: str | None) -> tuple[bool, str]:
    """Whether a torch build for CUDA ``torch_cuda`` runs on a driver that supports CUDA up to
    ``driver_cuda`` (``nvidia-smi``'s "CUDA Version"): the driver's version is at least the build's,
    or both are of one major version (CUDA's minor-version compatibility, from CUDA 11 on)."""
    if not torch_cuda:
        return False, "a CPU build of torch: it cannot use the GPU"
    if not driver_cuda:
        return False, "no NVIDIA driver answers (nvidia-smi)"
    build, driver = (tuple(int(x) for x in v.split(".")[:2]) for v in (torch_cuda, driver_cuda))
    if driver >= build:
        return True, f"driver CUDA {driver_cuda} >= build CUDA {torch_cuda}"
    if build[0] == driver[0] and build[0] >= 11:
        return True, f"CUDA {torch_cuda} on a CUDA {driver_cuda} driver: minor-version compatibility (no PTX JIT)"
    return False, f"build CUDA {torch_cuda} needs a newer driver than this one (CUDA {driver_cuda})"


def driver_cuda_version() -> tuple[str | None, str | None]:
    """(driver version, highest CUDA version it supports) from ``nvidia-smi``, or Nones."""
    try:
        text = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    driver = cuda = None
    for part in text.replace("|", " ").split("  "):
        part = part.strip()
        if part.startswith("Driver Version:"):
            driver = part.split(":", 1)[1].strip()
        elif part.startswith("CUDA Version:"):
            cuda = part.split(":", 1)[1].strip()
    return driver, cuda


def speed(engine, texts: list[str], batch: int, seconds: float, synchronize) -> dict:
    """Back-to-back batches of ``batch`` texts for ``seconds``: texts/s and per-batch latency."""
    engine.predict(texts[:batch])  # warm-up: kernels and allocator
    latencies: list[float] = []
    index, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 5:
        chunk = [texts[(index + k) % len(texts)] for k in range(batch)]
        index += batch
        start = time.perf_counter()
        engine.predict(chunk)
        synchronize()
        latencies.append(time.perf_counter() - start)
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return round(1000 * ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 2)

    rate = round(batch * len(latencies) / elapsed, 1)
    return {"batch": batch, "texts_per_s": rate, "p50_ms": pct(50), "p99_ms": pct(99)}


class OrtEngineModel:
    """ONNX Runtime with a GPU provider on an fp32 graph, behind the backend interface."""

    def __init__(self, graph: Path, config, provider: str) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(graph), providers=[provider, "CPUExecutionProvider"])
        self.config = config

    def __call__(self, input_ids, attention_mask):
        import numpy as np

        (logits,) = self.session.run(["logits"], {"input_ids": input_ids, "attention_mask": attention_mask})
        return logits.astype(np.float32, copy=False)


def engines(pack_dir: Path, device: str):
    """(name, build) of every engine to check on ``device``; build() returns an EmotionEngine."""
    import torch

    settings = handler_module("emotion_settings").HandlerSettings(backend="torch", precision="fp32")
    engine_cls = handler_module("emotion_engine").EmotionEngine
    target = torch.device(device)

    def torch_engine(dtype):
        def build():
            engine = engine_cls(pack_dir, settings, target)  # fp16 on a GPU, fp32 on the CPU
            engine.model.model = engine.model.model.to(dtype)
            engine.model.forward = engine.model.model
            return engine

        return build

    if device == "cpu":
        return [("torch fp32 (cpu)", torch_engine(torch.float32))]
    rows = [("torch fp16", torch_engine(torch.float16)), ("torch bf16", torch_engine(torch.bfloat16))]
    try:
        import onnxruntime

        available = onnxruntime.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
    except ImportError:
        providers = []
    for provider in providers:

        def build(provider=provider):
            engine = engine_cls(pack_dir, replace(settings), torch.device("cpu"))
            graph = handler_module("emotion_onnx").export_onnx(pack_dir, Path(tempfile.mkdtemp()), "fp32")
            engine.model = OrtEngineModel(graph, engine.model.config, provider)
            return engine

        rows.append((f"onnxruntime fp32 {provider.replace('ExecutionProvider', '')}", build))
    return rows


def check(pack_dir: Path, device: str, seconds: float, out: Path | None) -> int:
    """Run the check (module docstring); returns the exit code."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing to check")
        return 0
    if not (pack_dir / "reference.json").is_file():
        raise SystemExit(f"{pack_dir} has no reference.json: run `make gpu-pack` where the archive is")
    reference = json.loads((pack_dir / "reference.json").read_text())
    texts, labels = reference["texts"], reference["labels"]
    expected = [labels[max(range(len(row)), key=row.__getitem__)] for row in reference["probabilities"]]
    driver, driver_cuda = driver_cuda_version()
    compatible, why = cuda_verdict(torch.version.cuda, driver_cuda) if device == "cuda" else (True, "cpu")
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else "none"
    print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, driver {driver} (CUDA {driver_cuda}): {why}")
    print(f"device {device} ({gpu}); reference {reference['engine']} on {reference['cpu']}")
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows, code = [], 0
    for name, build in engines(pack_dir, device):
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            engine = build()
            answers = predict_all(engine, texts)
        except Exception as err:  # an engine this machine cannot run is a row, not a crash
            rows.append({"engine": name, "failed": f"{type(err).__name__}: {str(err)[:300]}"})
            continue
        agree = sum(a["label"] == e for a, e in zip(answers, expected, strict=True)) / len(texts)
        diff = max(
            abs(a["probabilities"][label] - ref[i])
            for a, ref in zip(answers, reference["probabilities"], strict=True)
            for i, label in enumerate(labels)
        )
        row = {
            "engine": name,
            "agreement": round(agree, 4),
            "max_probability_difference": round(diff, 4),
            "passed": agree >= AGREEMENT_TARGET,
            "speed": [speed(engine, texts, batch, seconds, synchronize) for batch in BATCHES],
        }
        if device == "cuda":
            row["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        rows.append(row)
        code = code or (0 if row["passed"] else 1)
        del engine
    print_report(rows, len(texts))
    report = {
        "device": device,
        "gpu": gpu,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "driver": driver,
        "driver_cuda": driver_cuda,
        "cuda_compatible": compatible,
        "cuda_verdict": why,
        "reference": {"engine": reference["engine"], "cpu": reference["cpu"]},
        "texts": len(texts),
        "agreement_target": AGREEMENT_TARGET,
        "rows": rows,
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return code


def print_report(rows: list[dict], texts: int) -> None:
    print(f"\n| engine | agreement ({texts} texts) | max abs dp | batch | texts/s | p50 ms | p99 ms | peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        if "failed" in row:
            print(f"| {row['engine']} | did not run: {row['failed']} | | | | | | |")
            continue
        for s in row["speed"]:
            print(
                f"| {row['engine']} | {100 * row['agreement']:.2f}% | {row['max_probability_difference']} "
                f"| {s['batch']} "
                f"| {s['texts_per_s']} | {s['p50_ms']} | {s['p99_ms']} | {row.get('peak_gpu_memory_mb', '-')} |"
            )
    for row in rows:
        if "failed" not in row:
            verdict = "PASS" if row["passed"] else "FAIL"
            print(f"{verdict}: {row['engine']} agrees with the CPU int8 archive on >= {AGREEMENT_TARGET:.0%} of texts")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write the GPU machine's inputs (here, where the archive is)")
    packing.add_argument("--model-dir", type=Path, required=True)
    packing.add_argument("--archive", type=Path, default=ARCHIVE)
    packing.add_argument("--val-file", type=Path, default=VAL_FILE)
    packing.add_argument("--limit", type=int, default=None, help="first N validation texts only")
    packing.add_argument("--out", type=Path, default=PACK_DIR)
    checking = commands.add_parser("check", help="check the GPU path (on the GPU machine)")
    checking.add_argument("--pack", type=Path, default=PACK_DIR)
    checking.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    checking.add_argument("--seconds", type=float, default=5.0, help="measured seconds per engine and batch size")
    checking.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.command == "pack":
        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be at least 1")
        for path in (args.model_dir / "model.safetensors", args.archive, args.val_file):
            if not path.is_file():
                parser.error(f"{path} not found (make archive builds the model and the archive)")
        print(pack(args.model_dir, args.archive, args.val_file, args.out, args.limit))
        return 0
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return check(args.pack, args.device, args.seconds, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
