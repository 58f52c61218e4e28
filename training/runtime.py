"""Process setup for training: seeds, threads, DDP, provenance."""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from project import PROJECT_ROOT, handler_module

if TYPE_CHECKING:
    from emotion_cpu import CpuCapabilities


@dataclass(frozen=True)
class Runtime:
    """Where this process sits in a (possibly single-process) training job."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and logs to W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cpu() -> CpuCapabilities:
    """This machine's CPU (``handler/emotion_cpuinfo.py``, read once), which the choices below follow."""
    return handler_module("emotion_cpuinfo").detect()


def physical_cores() -> int:
    """Physical cores this process may use, capped at the container's CPU limit (hyper-threads
    slow down GEMM-bound training)."""
    return cpu().default_threads


def resolve_precision(precision: str) -> str:
    """``bf16`` or ``fp32``: ``auto`` becomes bf16 where the CPU computes it natively (AVX-512 BF16
    or AMX-BF16), else fp32; without it, bf16 autocast is emulated and many times slower."""
    if precision == "auto":
        return cpu().training_precision
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def setup_runtime(seed: int, num_threads: int | None) -> Runtime:
    """Initialise DDP when launched by torchrun, set threads and seeds.

    Under torchrun each rank gets an equal share of the physical cores unless
    ``num_threads`` says otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    threads = num_threads or max(1, physical_cores() // world_size)
    torch.set_num_threads(threads)
    seed_everything(seed)
    return Runtime(rank=rank, world_size=world_size)


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group, if one was joined."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def git_commit() -> str:
    """The checked-out commit, with ``-dirty`` when the tree has changes; ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def describe_data(paths: list[str]) -> dict[str, str]:
    """MD5 of every data file, keyed by file name."""
    from training.data import file_md5

    return {Path(p).name: file_md5(p) for p in paths}
