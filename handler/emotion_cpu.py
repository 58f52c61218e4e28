"""What a CPU can do (:class:`CpuCapabilities`), and the decisions that depend on it.

``emotion_cpuinfo.detect`` reads this machine's once, from the OS (``/proc/cpuinfo``, ``lscpu``,
cgroups, sysfs), torch and ONNX Runtime. Every CPU-dependent choice of the project reads it: the training precision
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

Standard library only, so the TorchServe worker, training and the bench can all import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
