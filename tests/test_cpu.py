"""CPU capabilities (handler/emotion_cpu.py, emotion_cpuinfo.py) on snapshots of three machines: the right features,
peaks and choices for each, whatever CPU runs the test."""

from __future__ import annotations

from pathlib import Path

import pytest
from emotion_cpu import CpuCapabilities
from emotion_cpuinfo import detect, from_snapshot, parse_cpuinfo

SNAPSHOTS = Path(__file__).parent / "fixtures" / "cpu"


def snapshot(name: str, **kwargs) -> CpuCapabilities:
    lscpu = SNAPSHOTS / f"{name}.lscpu"
    return from_snapshot(
        (SNAPSHOTS / f"{name}.cpuinfo").read_text(), lscpu.read_text() if lscpu.is_file() else "", **kwargs
    )


# name -> (features, physical cores, logical CPUs, MHz and its source, (pipes, bits),
#          peaks fp32 / int8 / int8 without VNNI / AMX int8 / AMX bf16 in GFLOP/s, training precision)
EXPECTED = {
    "haswell-xeon-1core-ht": (
        ["AVX2"],
        1,
        2,
        (2300.0, "model name"),
        (2, 256),
        # 1 core x 2.3 GHz x (2 pipes x 8 lanes x 2 FLOP); int8 4/3 of it (no VNNI)
        (73.6, 73.6 * 4 / 3, 73.6 * 4 / 3, 0.0, 0.0),
        "fp32",
    ),
    "zen5-epyc-2core": (
        ["AVX2", "AVX-VNNI", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16"],
        2,
        2,
        (2596.094, "cpu MHz"),
        (2, 512),
        # 2 cores x 2.596 GHz x (2 pipes x 16 lanes x 2 FLOP); int8 4x with VNNI
        (2 * 2.596094 * 64, 4 * 2 * 2.596094 * 64, 2 * 2.596094 * 64 * 4 / 3, 0.0, 0.0),
        "bf16",
    ),
    "sapphire-rapids-1core-ht": (
        ["AVX2", "AVX-VNNI", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16", "AMX-TILE", "AMX-INT8", "AMX-BF16"],
        1,
        2,
        (2700.0, "model name"),
        (2, 512),
        (2.7 * 64, 4 * 2.7 * 64, 2.7 * 64 * 4 / 3, 2.7 * 2048, 2.7 * 1024),
        "bf16",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_snapshot_gives_its_features_peaks_and_choices(name):
    features, physical, logical, (mhz, source), datapath, peaks, precision = EXPECTED[name]
    cpu = snapshot(name)
    assert cpu.features() == features
    assert (cpu.physical_cores, cpu.logical_cpus) == (physical, logical)
    assert cpu.mhz == pytest.approx(mhz) and cpu.mhz_source == source
    assert cpu.datapath == datapath
    kinds = ("fp32", "int8", "int8-no-vnni", "amx-int8", "amx-bf16")
    assert [cpu.peak_gflops(kind) for kind in kinds] == pytest.approx(list(peaks))
    assert cpu.training_precision == precision
    assert cpu.int8_engine == "onnxruntime int8 dynamic"
    assert cpu.default_threads == physical


def test_the_line_names_the_cpu_its_features_peaks_and_choices():
    line = snapshot("sapphire-rapids-1core-ht").line()
    assert "Intel(R) Xeon(R) Platinum 8481C" in line and "1 cores (2 CPUs) @ 2.70 GHz (model name)" in line
    assert "AMX-INT8" in line and "AMX int8 5530 / bf16 2765" in line
    assert "training bf16" in line and "int8 engine onnxruntime int8 dynamic" in line
    assert "no AMX" in snapshot("zen5-epyc-2core").line()
    assert "(VNNI)" not in snapshot("haswell-xeon-1core-ht").line()


def test_zen4_runs_avx512_on_256_bit_pipes():
    text = (SNAPSHOTS / "zen5-epyc-2core.cpuinfo").read_text().replace("cpu family\t: 26", "cpu family\t: 25")
    zen4 = from_snapshot(text)
    assert zen4.microarchitecture == "Zen 4" and zen4.datapath == (2, 256)
    assert zen4.peak_gflops("fp32") == pytest.approx(snapshot("zen5-epyc-2core").peak_gflops("fp32") / 2)


def test_a_cpu_without_avx2_serves_fp32_and_trains_fp32():
    text = (SNAPSHOTS / "haswell-xeon-1core-ht.cpuinfo").read_text().replace(" avx2", "").replace(" fma", "")
    cpu = from_snapshot(text)
    assert cpu.int8_engine == "onnxruntime fp32" and cpu.training_precision == "fp32"
    assert cpu.fp32_flop_per_cycle == 16  # a 256-bit multiply and a 256-bit add per cycle (Sandy Bridge)


def test_the_clock_prefers_sysfs_then_lscpu_then_the_model_name_then_cpu_mhz():
    text = (SNAPSHOTS / "haswell-xeon-1core-ht.cpuinfo").read_text()
    assert from_snapshot(text, sysfs_khz="3500000").mhz_source == "sysfs cpuinfo_max_freq"
    cpu = from_snapshot(text, lscpu="CPU max MHz:  3100.0000\n")
    assert (cpu.mhz, cpu.mhz_source) == (3100.0, "lscpu CPU max MHz")
    nameless = text.replace(" @ 2.30GHz", "")
    assert from_snapshot(nameless).mhz_source == "cpu MHz"
    bare = "\n".join(line for line in nameless.splitlines() if not line.startswith("cpu MHz"))
    assert from_snapshot(bare).mhz_source.startswith("no clock stated")


def test_affinity_and_the_cgroup_limit_bound_the_cores_and_threads():
    cpu = snapshot("zen5-epyc-2core", allowed={1})
    assert (cpu.physical_cores, cpu.logical_cpus) == (1, 1)
    assert snapshot("zen5-epyc-2core", cgroup_cpus=1).default_threads == 1


def test_an_unknown_peak_kind_is_refused():
    with pytest.raises(ValueError, match="peak kind"):
        snapshot("zen5-epyc-2core").peak_gflops("fp64")


def test_parse_cpuinfo_reads_one_record_per_processor():
    records = parse_cpuinfo((SNAPSHOTS / "zen5-epyc-2core.cpuinfo").read_text())
    assert [r["processor"] for r in records] == ["0", "1"]


def test_this_machine_is_detected_consistently():
    cpu = detect()
    assert cpu is detect()  # read once
    assert cpu.physical_cores >= 1 and cpu.peak_gflops("fp32") > 0
    assert cpu.training_precision in ("bf16", "fp32") and cpu.line().startswith("CPU ")
