"""The benchmark's wrk client: closed loop, paced load, and its result fields."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from bench.run import at_rate, wrk
from project import PROJECT_ROOT
from tests.helpers import ScriptedHandler, loopback_http_server

pytestmark = pytest.mark.integration


class Echo(ScriptedHandler):
    protocol_version = "HTTP/1.1"
    bodies: list[bytes] = []

    def do_POST(self):
        body = self.read_body()
        self.bodies.append(body)
        self.answer(200, body)


@pytest.fixture
def echo_url():
    Echo.bodies = []
    with loopback_http_server(Echo) as address:
        yield f"http://{address}/predictions/emotion"


@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("i feel fine\ni am scared\n")
    return path


def test_closed_loop_run_sends_the_texts_and_reports_percentiles(echo_url, texts_file):
    result = wrk(echo_url, texts_file, None, concurrency=2, seconds=1)
    assert result["errors"] == 0
    assert result["requests_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert set(Echo.bodies) == {b"i feel fine", b"i am scared"}


def test_json_bodies_carry_each_text_exactly(echo_url, tmp_path):
    texts = ['she said "no" \\ twice', "tab\there", "caf\u00e9 \U0001f600", "plain"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = wrk(echo_url, path, None, concurrency=1, seconds=1, body="json")
    assert result["errors"] == 0
    assert {json.loads(body)["text"] for body in Echo.bodies} == set(texts)


def test_list_bodies_carry_64_consecutive_texts_each(echo_url, tmp_path):
    texts = [f'text {i} "quoted"' for i in range(5)]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    result = wrk(echo_url, path, None, concurrency=1, seconds=1, body="list")
    assert result["errors"] == 0
    lists = [json.loads(body)["texts"] for body in Echo.bodies]
    assert lists and all(len(items) == 64 for items in lists)
    for items in lists:  # consecutive texts of the file, wrapping round
        first = texts.index(items[0])
        assert items == [texts[(first + k) % len(texts)] for k in range(64)]


def test_paced_load_stays_near_the_asked_rate(echo_url, texts_file):
    args = argparse.Namespace(concurrency=4, warmup=2, duration=3)
    result = at_rate(echo_url, texts_file, None, rate=40, args=args)
    assert result["errors"] == 0
    assert result["target_requests_per_s"] == 40
    # How near the paced rate comes to the target is the machine's; the bench reports both.
    assert result["requests_per_s"] > 0


@pytest.mark.slow
def test_settings_sweep_measures_speed_memory_and_accuracy(tiny_model_dir, tmp_path):
    from bench.settings_sweep import main
    from tests.helpers import FIXTURE_DATA

    out = tmp_path / "settings.json"
    argv = ["--model-dir", str(tiny_model_dir), "--val-file", str(FIXTURE_DATA / "val.txt"), "--out", str(out)]
    settings = ["torch fp32 (baseline)", "shipped model-config.yaml", "shipped, maxBatchDelay 0"]
    argv += ["--only", *settings, "--duration", "2", "--warmup", "1", "--half-load"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["setting"] for row in rows] == settings
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_s"] > 0
        assert 0 <= row["val_accuracy"] <= 1
        assert row["rss_mb_per_worker"] > 100
        half = row["half_load"]
        assert half["errors"] == 0 and 0 < half["p50_ms"] <= half["p99_ms"]
        assert half["target_requests_per_s"] == round(row["requests_per_s"] / 2, 1)
    assert rows[0]["speedup"] == 1.0
    shipped = yaml.safe_load((PROJECT_ROOT / "handler" / "model-config.yaml").read_text())
    assert (rows[0]["backend"], rows[0]["maxWorkers"], rows[0]["batchSize"]) == ("torch", 1, 16)
    assert rows[1]["backend"] == shipped["handler"]["backend"]
    assert (rows[1]["maxWorkers"], rows[1]["batchSize"]) == (shipped["maxWorkers"], shipped["batchSize"])
    assert (rows[2]["maxBatchDelay"], rows[2]["batchSize"]) == (0, shipped["batchSize"])


@pytest.mark.slow
def test_benchmark_runs_every_setup_and_prints_the_checks(tiny_model_dir, tmp_path, capsys):
    from bench.run import main
    from tests.helpers import FIXTURE_DATA

    argv = ["--model-dir", str(tiny_model_dir), "--texts-file", str(FIXTURE_DATA / "val.txt"), "--out", str(tmp_path)]
    assert main([*argv, "--duration", "2", "--warmup", "1", "--concurrency", "4"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert set(report["results"]) == {"a", "b", "c", "d", "e", "f", "ceiling"}
    assert all("failed" not in row and row["requests_per_s"] > 0 for row in report["results"].values())
    assert set(report["ratios"]) == {"d/a", "d/b", "d/c", "d/ceiling", "d/best peer", "d lists/d", "make predict/d"}
    assert report["results"]["d"]["bulk"]["errors"] == 0 and report["results"]["d"]["bulk"]["texts_per_s"] > 0
    d = report["results"]["d"]
    assert d["lists"]["errors"] == 0 and d["lists"]["texts_per_s"] == round(d["lists"]["requests_per_s"] * 64, 1)
    assert d["archive_mb"] > 0 and d["cold_start_s"] > 0 and d["half_load"]["p99_ms"] > 0
    assert report["checks"]["every setup ran"] is True
    assert report["cpu"]["physical_cores"] >= 1
    printed = capsys.readouterr().out
    assert printed.startswith("CPU ")
    for check in report["checks"]:
        assert f": {check}" in printed
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_ratios_divide_d_by_each_row_and_by_the_faster_peer():
    from bench.verdict import TARGETS, ratio_table

    results = {
        "a": {"requests_per_s": 100.0},
        "d": {"requests_per_s": 300.0},
        "e": {"requests_per_s": 150.0},
        "f": {"failed": "did not start"},
        "ceiling": {"requests_per_s": 330.0},
    }
    assert ratio_table(results) == {"d/a": 3.0, "d/ceiling": 0.91, "d/best peer": 2.0}
    assert set(TARGETS) >= {"d/ceiling", "d/best peer", "d/a"}


def test_overload_refuses_a_store_without_the_archive(tmp_path):
    from bench.overload import main

    with pytest.raises(SystemExit, match="make archive"):
        main(["--model-store", str(tmp_path)])


@pytest.mark.slow
@pytest.mark.integration
def test_overload_bench_reports_capacity_goodput_and_its_verdict(model_store, tmp_path, capsys):
    from bench.overload import GOODPUT_TARGET, main

    out = tmp_path / "overload.json"
    argv = ["--model-store", str(model_store), "--clients", "24", "--seconds", "2", "--out", str(out)]
    assert main(argv) == 0
    row = json.loads(out.read_text())
    assert row["capacity_requests_per_s"] > 0 and set(row["statuses"]) <= {"200", "503"}
    assert row["goodput_share"] == pytest.approx(row["goodput_requests_per_s"] / row["capacity_requests_per_s"], 0.01)
    assert row["passed"] is (row["goodput_share"] >= GOODPUT_TARGET)
    printed = capsys.readouterr().out
    assert printed.startswith("CPU ") and f"{'PASS' if row['passed'] else 'FAIL'}: goodput" in printed


@pytest.mark.slow
@pytest.mark.integration
def test_rollout_shadow_bench_reports_each_share_and_mirrors(model_store, tmp_path, capsys):
    from bench import rollout_shadow

    out = tmp_path / "shadow.json"
    argv = ["--model-store", str(model_store), "--shadow-percent", "50", "--seconds", "2", "--rounds", "1"]
    assert rollout_shadow.main([*argv, "--out", str(out)]) == 0
    row = json.loads(out.read_text())
    share = row["shares"]["50"]
    assert share["unshadowed"]["requests"] > 0 and share["shadowed"]["requests"] > 0
    assert share["unshadowed"]["failed"] == share["shadowed"]["failed"] == 0
    assert row["mirrors_answered_200"] > 0  # the candidate answered mirrors, the clients never saw them
    assert "p99 ratio" in capsys.readouterr().out


@pytest.mark.slow
def test_long_texts_bench_answers_two_halves_truncated_and_chunked(model_store, tmp_path):
    from bench import long_texts
    from tests.helpers import FIXTURE_DATA

    out = tmp_path / "long.json"
    argv = ["--archive", str(model_store / "emotion.mar"), "--val-file", str(FIXTURE_DATA / "val.txt")]
    assert long_texts.main([*argv, "--count", "12", "--texts-per-half", "3", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    truncate, chunk = report["rows"]["truncate"], report["rows"]["chunk"]
    assert report["texts"] == 12 and report["window_tokens"] > 0
    for row in (truncate, chunk):
        assert 0 <= row["second_half_label"] + row["first_half_label"] <= 1 and row["ms_per_text"] > 0
    # Chunked, a text is cut only past max_chunks windows; truncated, past the first.
    assert chunk["truncated"] <= truncate["truncated"] and chunk["cost"] > 0
