"""This machine's CPU, read from the OS: ``/proc/cpuinfo``, ``lscpu``, sysfs (the clock), the
cgroup (the container's CPU limit), torch's and ONNX Runtime's view; :func:`detect` reads it once
per process into an ``emotion_cpu.CpuCapabilities``, and :func:`from_snapshot` does the same from
recorded texts (the tests' snapshots of other machines).

Standard library only at import time (torch and onnxruntime are asked lazily).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

from emotion_cpu import CpuCapabilities

CPUINFO = Path("/proc/cpuinfo")
SYSFS_MAX_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_MHZ = 2000.0  # no clock stated anywhere: a guess, named as such in the line


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
