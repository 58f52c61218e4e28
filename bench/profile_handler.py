"""Where the worker's time goes: the handler on batches of validation texts, under cProfile.

``python -m bench.profile_handler [--model-dir DIR] [--section '{precision: bf16}']``
runs the real handler (through a TorchServe ``Context``, no server) on batches of 16
validation texts, prints the share of time spent in the model's forward pass and the top
functions, and times one of the model's linear layers to show the matrix-product rate the
CPU reaches.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import torch
import yaml

from loadtest.settings import LoadTestSettings
from project import pipeline_model_dir
from serving.worker import InProcessWorker

# Modules whose backends' __call__ is the model's forward pass.
BACKEND_MODULES = {"emotion_backends", "emotion_onnx"}


def linear_gflops(dtype: torch.dtype, tokens: int = 480, hidden: int = 384, ffn: int = 1536) -> float:
    """GFLOP/s of a ``tokens x hidden`` by ``hidden x ffn`` product (MiniLM's feed-forward shape)."""
    layer = torch.nn.Linear(hidden, ffn).to(dtype)
    x = torch.randn(tokens, hidden, dtype=dtype)
    with torch.inference_mode():
        for _ in range(10):
            layer(x)
        start = time.perf_counter()
        for _ in range(200):
            layer(x)
        seconds = (time.perf_counter() - start) / 200
    return 2 * tokens * hidden * ffn / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    """Profile the handler and print the findings."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=pipeline_model_dir())
    parser.add_argument("--section", default="{backend: torch, precision: bf16}", help="handler section (YAML)")
    parser.add_argument("--batches", type=int, default=100)
    args = parser.parse_args(argv)
    texts = LoadTestSettings.load().texts()
    section = yaml.safe_load(args.section)
    worker = InProcessWorker(args.model_dir, {"batchSize": 16, "handler": section})

    def run(batch: list[str]) -> None:
        worker.run([(text, "text/plain") for text in batch])

    batches = [texts[(16 * i) % len(texts) :][:16] for i in range(args.batches)]
    run(batches[0])
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    for batch in batches:
        run(batch)
    profile.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profile)
    model_seconds = sum(
        entry[3]
        for func, entry in stats.stats.items()
        if func[2] == "__call__" and Path(func[0]).stem in BACKEND_MODULES
    )
    print(
        f"{section}: {sum(map(len, batches)) / seconds:.1f} texts/s, "
        f"{100 * model_seconds / seconds:.0f}% of the time in the model's forward pass"
    )
    stats.sort_stats("cumulative").print_stats(12)
    for dtype in (torch.float32, torch.bfloat16):
        print(
            f"linear 480x384 by 384x1536, {dtype}: {linear_gflops(dtype):.0f} GFLOP/s "
            f"on {torch.get_num_threads()} threads"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
