"""What this CPU can do, read once from the OS (``/proc/cpuinfo``, ``lscpu``, cgroups, sysfs),
torch and ONNX Runtime, and the decisions that depend on it.

Every CPU-dependent choice of the project reads :func:`detect`: the training precision
(``training.runtime``), the worker threads (``emotion_handler``, the bench's peers), the int8
engine the bench judges, and each peak the bench compares a measured rate with. Its
:meth:`CpuCapabilities.line` heads ``make bench``, ``make engines`` and the training log.

Peaks (per second, whole machine) = physical cores x clock x operations per core per cycle, where

* fp32 FLOP/cycle = FMA pipes x (pipe width / 32 bits) x 2 (a fused multiply-add is 2 FLOP);
* int8 ops/cycle with VNNI = 4 x the fp32 rate: ``vpdpbusd`` does width / 8 multiply-adds per
  pipe and cycle, four times the fp32 lanes;
* int8 ops/cycle without VNNI = 4/3 x the fp32 rate: the same work takes three instructions
  (``vpmaddubsw``, ``vpmaddwd``, ``vpaddd``) on the same pipes;
* AMX (apart, per core and cycle): 1024 int8 multiply-adds (2048 ops) and 512 bf16 multiply-adds
  (1024 FLOP), Intel's figures for Sapphire Rapids' tile unit.

FMA pipes and width come from the micro-architecture (:func:`fma_datapath`): two 256-bit pipes for
AVX2 cores and Zen 4 (whose AVX-512 runs as two 256-bit halves), two 512-bit pipes for Zen 5 and
Xeon AVX-512 cores. The clock is the highest the OS states, in this order: sysfs
``cpuinfo_max_freq`` (the boost clock), lscpu's ``CPU max MHz``, the ``@ x.xxGHz`` of the model
name (nominal), ``cpu MHz`` of ``/proc/cpuinfo`` (in a VM usually the host's nominal clock, which a
boosting core exceeds: a measured share above 1 means the cores ran faster than stated).

Standard library only at import time (torch and onnxruntime are asked lazily), so the TorchServe
worker, training and the bench can all import it.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
SYSFS_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_MHZ = 2000.0  # no clock stated anywhere: a guess, named as such in the line

# AMX tile unit, per core and cycle (module docstring).
AMX_INT8_OPS_PER_CYCLE = 2048
AMX_BF16_FLOP_PER_CYCLE = 1024

# Feature names as the Linux kernel spells them in /proc/cpuinfo, and how the line shows them.
FEATURES = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx_vnni": "AVX-VNNI",
    "avx512f": "AVX-512F",
    "avx512_vnni": "AVX-512 VNNI",
    "avx512_bf16": "AVX-512 BF16",
    "amx_tile": "AMX-TILE",
    "amx_int8": "AMX-INT8",
    "amx_bf16": "AMX-BF16",
}


def _int(value: str | None) -> int | None:
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """``/proc/cpuinfo`` as one dict per logical processor."""
    processors: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
                current = {}
            continue
        key, _, value = line.partition(":")
        current[key.strip()] = value.strip()
    if current:
        processors.append(current)
    return [p for p in processors if "processor" in p or "flags" in p]


def parse_lscpu(text: str) -> dict[str, str]:
    """``lscpu``'s ``Key: value`` lines as a dict (the first of repeated keys wins)."""
    result: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in result:
            result[key.strip()] = value.strip()
    return result


def fma_datapath(
    vendor: str, family: int | None, model: int | None, model_name: str, flags: frozenset[str]
) -> tuple[int, int]:
    """(FMA pipes per core, bits per pipe) of the vector unit that runs the widest instructions."""
    model = model or 0
    if "avx512f" in flags:
        if vendor == "AuthenticAMD":
            # Zen 4 (family 0x19) splits a 512-bit instruction into two 256-bit halves; Zen 5
            # (0x1A) and later have full 512-bit pipes.
            return (2, 512) if (family or 0) >= 0x1A else (2, 256)
        # Xeons (Skylake-SP and later) have two 512-bit FMA pipes; client cores with AVX-512 one.
        return (2, 512) if "xeon" in model_name.lower() else (1, 512)
    if "avx2" in flags or "avx" in flags:
        if vendor == "AuthenticAMD" and family is not None and (family < 0x17 or (family == 0x17 and model < 0x30)):
            return (2, 128)  # Zen 1 and older: 256-bit instructions run as two 128-bit halves
        return (2, 256)
    return (2, 128)  # SSE


@dataclass(frozen=True)
class CpuCapabilities:
    """One machine's CPU, as far as the project's decisions need it.

    Attributes:
        vendor: ``GenuineIntel``, ``AuthenticAMD``, ...
        model_name: The model name the OS reports.
        family: CPU family number (AMD: 0x17 Zen 1-2, 0x19 Zen 3-4, 0x1A Zen 5).
        physical_cores: Cores this process may run on (hyper-threads of one core count once).
        logical_cpus: Logical processors this process may run on.
        flags: The kernel's feature flags.
        mhz: The clock the peaks use, and ``mhz_source`` where it comes from.
        cgroup_cpus: The container's CPU limit, rounded up (None: no limit).
        torch_capability: torch's own ISA level (``torch.backends.cpu.get_cpu_capability``).
        onnxruntime: ONNX Runtime's version and device, when it is installed.
    """

    vendor: str
    model_name: str
    family: int | None
    model: int | None
    physical_cores: int
    logical_cpus: int
    flags: frozenset[str] = field(repr=False)
    mhz: float
    mhz_source: str
    cgroup_cpus: int | None = None
    torch_capability: str | None = None
    onnxruntime: str | None = None

    def has(self, flag: str) -> bool:
        return flag in self.flags

    @property
    def amx(self) -> bool:
        return self.has("amx_tile") and (self.has("amx_int8") or self.has("amx_bf16"))

    @property
    def vnni(self) -> bool:
        """8-bit dot products in the vector unit (AVX-512 VNNI or the 256-bit AVX-VNNI)."""
        return self.has("avx512_vnni") or self.has("avx_vnni")

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (AVX-512 BF16 or AMX-BF16); elsewhere it is emulated."""
        return self.has("avx512_bf16") or self.has("amx_bf16")

    @property
    def datapath(self) -> tuple[int, int]:
        return fma_datapath(self.vendor, self.family, self.model, self.model_name, self.flags)

    @property
    def fp32_flop_per_cycle(self) -> int:
        pipes, bits = self.datapath
        return pipes * bits // 32 * (2 if self.has("fma") else 1)

    @property
    def int8_ops_per_cycle(self) -> float:
        """With VNNI where the CPU has it (at the width VNNI runs), else without."""
        if self.has("avx512_vnni"):
            return 4.0 * self.fp32_flop_per_cycle
        if self.has("avx_vnni"):  # 256-bit VNNI only
            pipes, bits = self.datapath
            return 4.0 * pipes * min(bits, 256) / 32 * 2
        return self.int8_ops_per_cycle_without_vnni

    @property
    def int8_ops_per_cycle_without_vnni(self) -> float:
        return 4.0 / 3.0 * self.fp32_flop_per_cycle

    def peak_gflops(self, kind: str = "fp32") -> float:
        """Peak of the whole machine in G(FL)OP/s: ``fp32``, ``int8`` (VNNI where present),
        ``int8-no-vnni``, ``amx-int8``, ``amx-bf16`` (0 without AMX)."""
        per_cycle = {
            "fp32": self.fp32_flop_per_cycle,
            "int8": self.int8_ops_per_cycle,
            "int8-no-vnni": self.int8_ops_per_cycle_without_vnni,
            "amx-int8": AMX_INT8_OPS_PER_CYCLE if self.has("amx_int8") and self.amx else 0,
            "amx-bf16": AMX_BF16_FLOP_PER_CYCLE if self.has("amx_bf16") and self.amx else 0,
        }
        if kind not in per_cycle:
            raise ValueError(f"peak kind must be one of {sorted(per_cycle)}, not {kind!r}")
        return self.physical_cores * self.mhz / 1000 * per_cycle[kind]

    @property
    def training_precision(self) -> str:
        """``bf16`` where the CPU computes it natively, else ``fp32`` (train.precision=auto)."""
        return "bf16" if self.native_bf16 else "fp32"

    @property
    def int8_engine(self) -> str:
        """The int8 engine the project serves and judges on this CPU: ONNX Runtime's dynamic int8
        (u8 x s8 products on VNNI, AMX or AVX2), or fp32 on a CPU without AVX2, where 8-bit
        products are slower than fp32 ones."""
        return "onnxruntime int8 dynamic" if self.vnni or self.amx or self.has("avx2") else "onnxruntime fp32"

    @property
    def default_threads(self) -> int:
        """Intra-op threads for one process: the physical cores, capped at the container's limit."""
        cores = self.physical_cores
        return max(1, min(cores, self.cgroup_cpus) if self.cgroup_cpus else cores)

    @property
    def microarchitecture(self) -> str | None:
        """A name for the families whose datapath :func:`fma_datapath` tells apart."""
        if self.vendor == "AuthenticAMD" and self.family is not None:
            if self.family >= 0x1A:
                return "Zen 5"
            if self.family == 0x19:
                return "Zen 4" if self.has("avx512f") else "Zen 3"
            if self.family == 0x17:
                return "Zen 2" if (self.model or 0) >= 0x30 else "Zen 1"
        if self.vendor == "GenuineIntel" and self.amx:
            return "Sapphire Rapids or later"
        return None

    def features(self) -> list[str]:
        """The features of :data:`FEATURES` this CPU has, as the line shows them."""
        return [name for flag, name in FEATURES.items() if flag in self.flags and flag != "fma"]

    def summary(self) -> dict:
        """Everything the line says, as JSON for the bench's and training's reports."""
        pipes, bits = self.datapath
        return {
            "vendor": self.vendor,
            "model_name": self.model_name,
            "microarchitecture": self.microarchitecture,
            "physical_cores": self.physical_cores,
            "logical_cpus": self.logical_cpus,
            "mhz": round(self.mhz, 1),
            "mhz_source": self.mhz_source,
            "features": self.features(),
            "fma": f"{pipes}x{bits}-bit",
            "peak_gflops": {
                kind: round(self.peak_gflops(kind), 1)
                for kind in ("fp32", "int8", "int8-no-vnni", "amx-int8", "amx-bf16")
            },
            "training_precision": self.training_precision,
            "int8_engine": self.int8_engine,
            "default_threads": self.default_threads,
            "cgroup_cpus": self.cgroup_cpus,
            "torch_capability": self.torch_capability,
            "onnxruntime": self.onnxruntime,
        }

    def line(self) -> str:
        """One line: the CPU, its features, clock, peaks and the choices made for it."""
        arch = f", {self.microarchitecture}" if self.microarchitecture else ""
        pipes, bits = self.datapath
        amx = (
            f"AMX int8 {self.peak_gflops('amx-int8'):.0f} / bf16 {self.peak_gflops('amx-bf16'):.0f}"
            if self.amx
            else "no AMX"
        )
        parts = [
            f"CPU {self.model_name}{arch}: {self.physical_cores} cores ({self.logical_cpus} CPUs)"
            f" @ {self.mhz / 1000:.2f} GHz ({self.mhz_source})",
            " ".join(self.features()) or "no AVX2",
            f"FMA {pipes}x{bits}-bit",
            f"peak GFLOP/s fp32 {self.peak_gflops('fp32'):.0f}, int8 {self.peak_gflops('int8'):.0f}"
            f"{' (VNNI)' if self.vnni else ''}, {amx}",
            f"training {self.training_precision}, int8 engine {self.int8_engine}, {self.default_threads} threads",
        ]
        if self.torch_capability:
            parts.append(f"torch {self.torch_capability}")
        return " | ".join(parts)


def clock_mhz(processors: list[dict[str, str]], lscpu: dict[str, str], sysfs_khz: str | None) -> tuple[float, str]:
    """The clock the peaks use and its source (module docstring)."""
    khz = _float(sysfs_khz)
    if khz:
        return khz / 1000, "sysfs cpuinfo_max_freq"
    mhz = _float(lscpu.get("CPU max MHz"))
    if mhz:
        return mhz, "lscpu CPU max MHz"
    name = processors[0].get("model name", "") if processors else lscpu.get("Model name", "")
    match = re.search(r"@\s*([0-9.]+)\s*GHz", name)
    if match:
        return float(match.group(1)) * 1000, "model name"
    mhz = _float(processors[0].get("cpu MHz")) if processors else None
    if mhz:
        return mhz, "cpu MHz"
    return DEFAULT_MHZ, "no clock stated: assumed"


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number and math.isfinite(number) and number > 0 else None


def from_snapshot(
    cpuinfo: str,
    lscpu: str = "",
    sysfs_khz: str | None = None,
    allowed: set[int] | None = None,
    cgroup_cpus: int | None = None,
    torch_capability: str | None = None,
    onnxruntime: str | None = None,
) -> CpuCapabilities:
    """Capabilities from the texts of ``/proc/cpuinfo`` and (optionally) ``lscpu``.

    Args:
        allowed: Logical processor numbers this process may run on (None: all).
        sysfs_khz: The text of ``cpuinfo_max_freq``, where the kernel has cpufreq.
    """
    processors = parse_cpuinfo(cpuinfo)
    info = parse_lscpu(lscpu)
    if allowed is not None:
        processors = [p for p in processors if _int(p.get("processor")) in allowed] or processors
    first = processors[0] if processors else {}
    flags = frozenset(first.get("flags", info.get("Flags", "")).split())
    cores = {(p.get("physical id", "0"), p.get("core id", p.get("processor"))) for p in processors}
    physical = len(cores) if processors and all("core id" in p for p in processors) else None
    if physical is None:
        sockets = _int(info.get("Socket(s)")) or 1
        per_socket = _int(info.get("Core(s) per socket")) or _int(first.get("cpu cores"))
        physical = sockets * per_socket if per_socket else len(processors) or 1
    mhz, source = clock_mhz(processors, info, sysfs_khz)
    return CpuCapabilities(
        vendor=first.get("vendor_id", info.get("Vendor ID", "unknown")),
        model_name=first.get("model name", info.get("Model name", "unknown CPU")),
        family=_int(first.get("cpu family", info.get("CPU family"))),
        model=_int(first.get("model", info.get("Model"))),
        physical_cores=max(1, physical),
        logical_cpus=max(1, len(processors)),
        flags=flags,
        mhz=mhz,
        mhz_source=source,
        cgroup_cpus=cgroup_cpus,
        torch_capability=torch_capability,
        onnxruntime=onnxruntime,
    )


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> int | None:
    """The CPUs the container may use, rounded up, from its cgroup's CPU quota (v2 ``cpu.max``,
    or v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None when there is no quota or no
    cgroup to read (``docker run --cpus 2`` and a Kubernetes CPU limit set one)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, math.ceil(quota / period)) if quota > 0 and period > 0 else None


def worker_threads(configured: int, default: int, cpu_limit: int | None) -> int:
    """Intra-op threads for one worker: ``configured`` when set, else ``default`` capped at the
    container's CPU limit (torch counts the host's CPUs, which would oversubscribe the quota)."""
    if configured > 0:
        return configured
    return max(1, min(default, cpu_limit)) if cpu_limit else max(1, default)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _torch_capability() -> str | None:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # torch absent or too old: the line goes without it
        return None


def _onnxruntime() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return f"{onnxruntime.__version__} {onnxruntime.get_device()}"


_DETECTED: CpuCapabilities | None = None


def detect() -> CpuCapabilities:
    """This machine's capabilities, read once per process."""
    global _DETECTED
    if _DETECTED is None:
        try:
            allowed = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            allowed = None
        _DETECTED = from_snapshot(
            _read(CPUINFO) or "",
            _lscpu(),
            _read(SYSFS_MAX_FREQ),
            allowed=allowed,
            cgroup_cpus=cgroup_cpu_limit(),
            torch_capability=_torch_capability(),
            onnxruntime=_onnxruntime(),
        )
    return _DETECTED
