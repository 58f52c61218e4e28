"""Drift monitoring without servers: buckets, the request log, the monitor, the rules, the profile,
the handler's drift metrics, ``make drift``'s exit codes and the robustness runner."""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
import stat
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml
from emotion_backends import HandlerSettings
from emotion_monitor import (
    CONFIDENCE_BOUNDS,
    TOKEN_BOUNDS,
    EmotionMonitor,
    RequestLog,
    RequestRecord,
    bucket_names,
    bucket_of,
    histogram,
    known_words,
    make_records,
    word_counts,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitoring import drift, drift_rules
from monitoring.drift_stats import alerts_firing, load_drift_config, psi, stream_statistics
from tests.drift_fixtures import profiled_store  # noqa: F401 (fixture)

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
FIXTURE_VAL = Path(__file__).parent / "fixtures" / "emotion" / "val.txt"
LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]


class RecordingSink:
    """Collects what the monitor hands to EmotionMetrics."""

    def __init__(self) -> None:
        self.started = 0
        self.calls: list[tuple] = []

    def start_distributions(self) -> None:
        self.started += 1

    def distributions(self, confidence, token_length, unknown_tokens, truncated, words=0, unfamiliar_words=0) -> None:
        self.calls.append((confidence, token_length, unknown_tokens, truncated, words, unfamiliar_words))


def record(tokens: int = 10, confidence: float = 0.9, unknown: int = 0, truncated: bool = False, text: str = "hi"):
    rest = (1 - confidence) / 5
    probabilities = [confidence] + [rest] * 5
    return RequestRecord(len(text), tokens, unknown, truncated, probabilities, LABELS[0], text)


def test_bucket_bounds_are_inclusive_and_the_last_is_open():
    assert bucket_of(8, TOKEN_BOUNDS) == "8"
    assert bucket_of(9, TOKEN_BOUNDS) == "12"
    assert bucket_of(10_000, TOKEN_BOUNDS) == "+Inf"
    assert bucket_of(0.5, CONFIDENCE_BOUNDS) == "0.5"
    assert bucket_of(0.999, CONFIDENCE_BOUNDS) == "+Inf"
    counts = histogram([1, 8, 9, 500], TOKEN_BOUNDS)
    assert list(counts) == bucket_names(TOKEN_BOUNDS)
    assert counts["8"] == 2 and counts["12"] == 1 and counts["+Inf"] == 1 and sum(counts.values()) == 4


def test_make_records_counts_unknown_tokens_and_keeps_the_truncated_flags():
    records = make_records(
        ["a b", "x y z w"],
        [[101, 100, 102], [101, 5, 6, 102]],
        [[0.1, 0.9], [0.7, 0.3]],
        ["no", "yes"],
        100,
        [False, True],
    )
    assert [r.unknown_tokens for r in records] == [1, 0]
    assert [r.truncated for r in records] == [False, True]
    assert [r.label for r in records] == ["yes", "no"]
    assert records[0].chars == 3 and records[0].confidence == 0.9


def test_known_words_are_the_vocabularys_whole_words_lower_cased():
    vocabulary = ["[CLS]", "[UNK]", "happy", "##py", "Joy", "\u2581sad", "\u0120fear", "42", "don't", "hap"]
    assert known_words(vocabulary) == {"happy", "joy", "sad", "fear", "hap"}


@settings(max_examples=150, deadline=None)
@given(
    words=st.lists(st.sampled_from(["happy", "Sad", "hpapy", "saad", "ich", "très"]), max_size=20),
    filler=st.sampled_from([" ", " 42 ", ", ", "! 😱 ", " - "]),
)
def test_unfamiliar_words_are_the_words_outside_the_vocabulary_whatever_surrounds_them(words, filler):
    known = frozenset({"happy", "sad", "ich"})
    total, unfamiliar = word_counts(filler.join(words), known)
    assert total == len(words)
    assert unfamiliar == sum(w.lower() not in known for w in words)
    assert word_counts(filler.join(words), None) == (0, 0)  # no vocabulary: the signal is off


def test_records_and_log_entries_carry_the_unfamiliar_word_share(tmp_path):
    known = frozenset({"i", "feel", "so", "happy"})
    records = make_records(
        ["i feel so hpapy", "i feel so happy", "😱"],
        [[1, 2], [1, 2], [1, 2]],
        [[0.2, 0.8]] * 3,
        ["no", "yes"],
        None,
        [False] * 3,
        known,
    )
    assert [(r.words, r.unfamiliar_words) for r in records] == [(4, 1), (4, 0), (0, 0)]
    sink = RecordingSink()
    monitor = EmotionMonitor(sink, ["no", "yes"], RequestLog(tmp_path / "requests.jsonl", 10_000, 2))
    monitor.observe_batch(records)
    assert sink.calls[0][4:] == (8, 1)
    entries = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [(e["words"], e["unfamiliar_share"]) for e in entries] == [(4, 0.25), (4, 0.0), (0, 0.0)]


def test_monitor_counts_a_batch_and_logs_without_texts_by_default(tmp_path):
    sink = RecordingSink()
    monitor = EmotionMonitor(sink, LABELS, RequestLog(tmp_path / "requests.jsonl", 10_000, 2))
    assert sink.started == 1  # every bucket series is created at zero when the worker starts
    monitor.observe_batch([record(10, 0.95, text="secret"), record(70, 0.3, unknown=2, truncated=True)])
    confidence, length, unknown, truncated, _, _ = sink.calls[0]
    assert confidence == Counter({"0.95": 1, "0.4": 1})
    assert length == Counter({"12": 1, "128": 1})
    assert (unknown, truncated) == (2, 1)
    entries = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(entries) == 2
    assert all("text" not in e for e in entries)
    assert entries[1]["unknown_share"] == pytest.approx(2 / 70, abs=1e-4)
    assert entries[1]["truncated"] is True and entries[0]["label"] == "sadness"
    assert set(entries[0]["probabilities"]) == set(LABELS)


def test_monitor_logs_texts_only_when_opted_in(tmp_path):
    settings = HandlerSettings.from_yaml({"request_log_dir": str(tmp_path), "request_log_texts": True})
    monitor = EmotionMonitor.from_settings(RecordingSink(), LABELS, settings)
    monitor.observe_batch([record(text="i feel fine")])
    assert json.loads((tmp_path / "requests.jsonl").read_text())["text"] == "i feel fine"
    off = EmotionMonitor.from_settings(RecordingSink(), LABELS, HandlerSettings.from_yaml({"request_log": False}))
    assert off.request_log is None


def test_request_log_settings_are_validated():
    with pytest.raises(ValueError, match="request_log_max_bytes"):
        HandlerSettings.from_yaml({"request_log_max_bytes": 0})
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerSettings.from_yaml({"request_log_text": True})


def test_request_log_rotation_bounds_its_size(tmp_path):
    log = RequestLog(tmp_path / "requests.jsonl", max_bytes=2_000, backups=2)
    for i in range(300):
        log.write([json.dumps({"i": i, "pad": "x" * 40})])
    files = sorted(tmp_path.glob("requests.jsonl*"))
    names = {p.name for p in files if not p.name.endswith(".lock")}
    assert names == {"requests.jsonl", "requests.jsonl.1", "requests.jsonl.2"}
    assert all((tmp_path / n).stat().st_size <= 2_000 for n in names)
    assert all(stat.S_IMODE((tmp_path / n).stat().st_mode) == 0o600 for n in names)  # the owner's only
    # the newest line is last in the current file, and the drift tool reads the files in order
    entries = drift.read_requests(tmp_path, 10_000)
    assert entries[-1]["i"] == 299
    assert [e["i"] for e in entries] == sorted(e["i"] for e in entries)


def _write_lines(path: str, worker: int) -> None:
    log = RequestLog(Path(path), max_bytes=5_000, backups=50)
    for i in range(200):
        log.write([json.dumps({"worker": worker, "i": i})] * 2)


def test_request_log_is_safe_with_several_writer_processes(tmp_path):
    path = tmp_path / "requests.jsonl"
    processes = [multiprocessing.Process(target=_write_lines, args=(str(path), w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    entries = drift.read_requests(tmp_path, 100_000)
    assert len(entries) == 3 * 200 * 2  # no line lost or torn across rotations
    for w in range(3):
        assert [e["i"] for e in entries if e["worker"] == w] == [i for i in range(200) for _ in range(2)]


def test_psi_is_zero_on_the_reference_and_grows_with_the_shift():
    reference = {"a": 0.5, "b": 0.3, "c": 0.2, "d": 0.0}
    assert psi({"a": 50, "b": 30, "c": 20}, reference) == pytest.approx(0, abs=1e-9)
    small = psi({"a": 45, "b": 33, "c": 22}, reference)
    large = psi({"a": 10, "b": 10, "c": 80}, reference)
    assert 0 < small < 0.05 < 0.2 < large


def test_committed_drift_rules_match_their_generator():
    rendered = drift_rules.dump(drift_rules.render_rules(load_drift_config()), "drift.yaml")
    assert (MONITORING / "drift_rules.yml").read_text() == rendered, "run python -m monitoring.drift_rules"


def test_reference_rules_hold_every_bucket_and_label_of_the_profile(tmp_path):
    profile = fake_profile()
    rules = drift_rules.render_reference(profile)["groups"][0]["rules"]
    by_record = lambda name: [r for r in rules if r["record"] == f"emotion:reference_{name}"]  # noqa: E731
    confidence = {r["labels"]["Bucket"]: r["expr"] for r in by_record("confidence_share")}
    assert list(confidence) == bucket_names(CONFIDENCE_BOUNDS)
    assert confidence["+Inf"] == f"vector({profile['validation']['confidence_histogram']['+Inf']:.6g})"
    labels = {r["labels"]["Label"] for r in by_record("label_share")}
    assert labels == set(LABELS)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make system-deps)")
def test_drift_rules_pass_their_promtool_tests_and_the_reference_file_is_valid():
    result = subprocess.run(
        ["promtool", "test", "rules", "tests/drift_rules_test.yml"], cwd=MONITORING, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    result = subprocess.run(["promtool", "check", "rules", "drift_reference.yml"], cwd=MONITORING, capture_output=True)
    assert result.returncode == 0, result.stdout


def test_the_committed_reference_records_every_reference_series_a_rule_reads():
    # A rule comparing with a reference series nobody records never fires: the committed
    # reference must come from a profile that holds everything the alerts and drift rules read.
    import re

    recorded = {rule["record"] for group in yaml.safe_load((MONITORING / "drift_reference.yml").read_text())["groups"]
                for rule in group["rules"]}  # fmt: skip
    for name in ("alerts.yml", "drift_rules.yml"):
        text = (MONITORING / name).read_text()
        read = set(re.findall(r"emotion:reference_\w+", text))
        assert read and read <= recorded, (name, sorted(read - recorded))


def fake_profile() -> dict:
    """A profile shaped like monitoring.profile's, with known shares (no model needed)."""
    confidence = {name: 0.0 for name in bucket_names(CONFIDENCE_BOUNDS)}
    confidence.update({"0.9": 0.2, "+Inf": 0.8})
    tokens = {name: 0.0 for name in bucket_names(TOKEN_BOUNDS)}
    tokens.update({"12": 0.5, "16": 0.5})
    return {
        "labels": LABELS,
        "low_confidence": 0.5,
        "validation": {
            "predicted_label_shares": dict.fromkeys(LABELS, 1 / 6),
            "token_histogram": tokens,
            "confidence_histogram": confidence,
            "low_confidence_share": 0.0,
            "unknown_token_share": 0.0,
            "unfamiliar_word_share": 0.03,
            "truncated_share": 0.0,
        },
    }


def test_stream_statistics_see_what_the_alerts_watch():
    profile = fake_profile()
    config = load_drift_config()
    like = [
        {"tokens": 12 + (i % 2) * 4, "confidence": 0.99, "label": LABELS[i % 6], "unknown_share": 0, "truncated": 0}
        for i in range(600)
    ]
    stats = stream_statistics(like, profile)
    assert stats["label_psi"] < 0.01 and stats["length_psi"] < 0.01
    assert alerts_firing(stats, config) == []
    shifted = [
        dict(e, tokens=100, confidence=0.3, label="joy", unknown_share=0.1, words=10, unfamiliar_share=0.3)
        for e in like
    ]
    assert set(alerts_firing(stream_statistics(shifted, profile), config)) == {
        "EmotionLabelShift",
        "EmotionInputLengthShift",
        "EmotionLowConfidenceRise",
        "EmotionUnknownTokensRise",
        "EmotionUnfamiliarWordsRise",
    }
    typo_heavy = [dict(e, words=10, unfamiliar_share=0.3) for e in like]
    assert alerts_firing(stream_statistics(typo_heavy, profile), config) == ["EmotionUnfamiliarWordsRise"]
    few_typos = [dict(e, words=10, unfamiliar_share=0.02) for e in like]
    assert alerts_firing(stream_statistics(few_typos, profile), config) == []
    assert alerts_firing(stream_statistics(shifted[:10], profile), config) == []  # too few requests


def test_drift_exits_2_on_too_few_requests(tmp_path):
    log = RequestLog(tmp_path / "logs" / "requests.jsonl", 10**6, 1)
    log.write([json.dumps({"tokens": 10}) for _ in range(5)])
    profile_file = tmp_path / "profile.json"
    profile_file.write_text(json.dumps(fake_profile()))
    argv = ["--log-dir", str(tmp_path / "logs"), "--profile", str(profile_file), "--out-dir", str(tmp_path / "out")]
    assert drift.main(argv) == drift.EXIT_TOO_FEW
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["verdict"] == "too few requests"
    assert drift.main([*argv[:2], "--profile", str(tmp_path / "missing.json")]) == drift.EXIT_NO_PROFILE


def log_line(i: int = 0, label: str = "joy", **changes) -> dict:
    """A request-log entry as the handler writes it (``changes`` overrides or, with None, drops fields)."""
    entry = {
        "time": 1.0,
        "chars": 10 + i,
        "tokens": 5 + i % 20,
        "unknown_share": 0.0,
        "words": 3,
        "unfamiliar_share": 0.0,
        "truncated": False,
        "label": label,
        "confidence": 0.9,
        "probabilities": dict.fromkeys(LABELS, 0.1) | ({label: 0.5} if label in LABELS else {}),
    }
    entry.update(changes)
    return {k: v for k, v in entry.items() if v is not None}


# What `make drift` reads (an older handler's lines lack the unfamiliar-word share, and still count).
LOG_FIELDS = ("chars", "tokens", "unknown_share", "truncated", "label", "confidence")
VALID_LINES = [json.dumps(log_line(i, unfamiliar_share=None if i % 3 else 0.0)) for i in range(100)]
JUNK_LINES = st.one_of(
    st.sampled_from(["[1, 2]", "null", '"text"', "42", "{", "", "{}"]),
    st.sampled_from(LOG_FIELDS).map(lambda name: json.dumps(log_line(**{name: None}))),
    st.sampled_from(
        [
            *(("tokens", "12"), ("label", 3), ("truncated", 0), ("confidence", None), ("chars", True)),
            *(("unfamiliar_share", "0.1"), ("unfamiliar_share", False)),
        ]
    ).map(lambda change: json.dumps(log_line(**dict([change])))),
)


@given(
    lines=st.lists(st.one_of(st.sampled_from(VALID_LINES), JUNK_LINES)),
    window=st.integers(1, 30),
)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_read_requests_keeps_the_last_usable_entries_whatever_else_the_log_holds(tmp_path, lines, window):
    (tmp_path / "requests.jsonl").write_text("".join(line + "\n" for line in lines))
    usable = [json.loads(line) for line in lines if line in VALID_LINES]
    entries = drift.read_requests(tmp_path, window, drift.ENTRY_FIELDS)
    assert entries == usable[-window:]
    assert all(isinstance(e, dict) for e in drift.read_requests(tmp_path, 1000))  # any object, no other JSON
    stream_statistics(entries, fake_profile())  # every field it reads is there


def test_read_requests_reads_rotated_files_oldest_first(tmp_path):
    for name, first in (("requests.jsonl.2", 0), ("requests.jsonl.1", 10), ("requests.jsonl", 20)):
        (tmp_path / name).write_text("".join(json.dumps(log_line(first + i)) + "\n" for i in range(10)))
    (tmp_path / "requests.jsonl.lock").write_text("")
    assert [e["chars"] - 10 for e in drift.read_requests(tmp_path, 25, drift.ENTRY_FIELDS)] == list(range(5, 30))


def test_drift_refuses_a_window_below_one(tmp_path, capsys):
    (tmp_path / "requests.jsonl").write_text(json.dumps(log_line()) + "\n")
    for window in (0, -5):
        with pytest.raises(ValueError, match="at least 1"):
            drift.read_requests(tmp_path, window)
    for window in ("0", "-5", "many"):
        with pytest.raises(SystemExit):
            drift.main(["--log-dir", str(tmp_path), "--window", window])
        assert "--window" in capsys.readouterr().err


def test_a_window_below_min_requests_is_still_too_few_to_tell(tmp_path):
    config = load_drift_config()
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(log_line(i)) + "\n" for i in range(3)))
    for window in (1, 3):
        code, summary = drift.run_drift(tmp_path, fake_profile(), tmp_path / "out", window, None, config)
        assert code == drift.EXIT_TOO_FEW
        assert summary["needed"] == config["drift_report"]["min_requests"]


@pytest.mark.parametrize(("in_reference", "in_log"), [(True, True), (False, True), (True, False), (False, False)])
def test_a_profile_or_log_older_than_the_unfamiliar_word_column_is_compared_on_the_others(
    tmp_path, in_reference, in_log
):
    config = load_drift_config()
    config["drift_report"]["min_requests"] = 5
    rows = [log_line(i, label=LABELS[i % 6]) for i in range(60)]
    profile = fake_profile() | {"records": {f: [r[f] for r in rows] for f in (*LOG_FIELDS, "unfamiliar_share")}}
    if not in_reference:
        del profile["records"]["unfamiliar_share"]
    (tmp_path / "logs").mkdir()
    lines = [json.dumps(r if in_log else {k: v for k, v in r.items() if k != "unfamiliar_share"}) for r in rows]
    (tmp_path / "logs" / "requests.jsonl").write_text("".join(line + "\n" for line in lines))
    code, summary = drift.run_drift(tmp_path / "logs", profile, tmp_path / "out", 100, None, config)
    assert summary["requests"] == 60 and code == drift.EXIT_OK
    assert {"chars", "tokens", "unknown_share", "label", "confidence"} <= set(summary["columns"])
    assert ("unfamiliar_share" in summary["columns"]) == (in_reference and in_log)


def test_drift_names_a_profile_of_another_label_set(tmp_path, capsys):
    config = load_drift_config()
    config["drift_report"]["min_requests"] = 5
    (tmp_path / "logs").mkdir()
    lines = [json.dumps(log_line(i, label=["joy", "neutral"][i % 2])) for i in range(10)]
    (tmp_path / "logs" / "requests.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(drift.ProfileMismatch, match="neutral"):
        drift.run_drift(tmp_path / "logs", fake_profile(), tmp_path / "out", 100, None, config)
    (tmp_path / "drift.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "profile.json").write_text(json.dumps(fake_profile()))
    argv = ["--log-dir", str(tmp_path / "logs"), "--profile", str(tmp_path / "profile.json")]
    assert drift.main([*argv, "--config", str(tmp_path / "drift.yaml"), "--out-dir", str(tmp_path / "out")]) == 3
    assert "neutral" in capsys.readouterr().err


def test_label_psi_counts_answers_with_labels_the_profile_lacks_like_the_rules():
    profile = fake_profile()
    known = [log_line(i, label=LABELS[i % 6]) for i in range(600)]
    assert stream_statistics(known, profile)["label_psi"] == pytest.approx(0, abs=1e-9)
    # Half the answers carry a seventh label: in the rules each known label's share halves.
    mixed = known + [dict(e, label="neutral") for e in known]
    # sum over the six labels of (1/12 - 1/6) * ln(1/2)
    assert stream_statistics(mixed, profile)["label_psi"] == pytest.approx(0.5 * math.log(2))
    other = [dict(e, label="positive") for e in known]  # another model's label set altogether
    stats = stream_statistics(other, profile)
    assert stats["label_psi"] > load_drift_config()["prometheus"]["label_psi"]
    assert "EmotionLabelShift" in alerts_firing(stats, load_drift_config())


def test_texts_are_not_compared_on_a_single_text_per_side(tmp_path, caplog):
    reference = {name: [log_line(i)[name] for i in range(3)] for name in LOG_FIELDS}
    settings_ = dict(load_drift_config()["drift_report"])
    entries = [log_line(0, text="i feel fine")]
    columns = drift.evidently_report(reference, entries, ["i am so happy today"], settings_, tmp_path)
    assert "text" not in columns and "texts not compared" in caplog.text


# ---- with a trained (tiny) model -------------------------------------------------------------


@pytest.mark.slow
def test_profile_describes_the_validation_split(profiled_store, tiny_model_dir):  # noqa: F811
    from monitoring.profile import load_profile, profile_path

    profile = load_profile(profiled_store / "emotion.mar")  # packed into the archive
    assert profile == json.loads(profile_path(tiny_model_dir).read_text())
    val = profile["validation"]
    n = len(FIXTURE_VAL.read_text().splitlines())
    assert val["examples"] == n == len(profile["records"]["tokens"])
    assert sum(val["confidence_histogram"].values()) == pytest.approx(1)
    assert sum(val["token_histogram"].values()) == pytest.approx(1)
    assert sum(val["predicted_label_shares"].values()) == pytest.approx(1)
    assert list(profile["train"]["label_shares"]) == profile["labels"]
    assert val["token_quantiles"]["p05"] <= val["token_quantiles"]["p50"] <= val["token_quantiles"]["p95"]
    assert 0 <= val["accuracy"] <= 1


@pytest.mark.slow
def test_handler_exports_drift_metrics_and_logs_requests(tiny_model_dir, tmp_path, caplog):
    from emotion_handler import EmotionHandler

    from tests.test_handler import make_context, run_batch

    context = make_context(tiny_model_dir, {"request_log_dir": str(tmp_path), "request_log_max_bytes": 100_000})
    handler = EmotionHandler()
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        handler.initialize(context)
        results = run_batch(
            handler, context, [("i feel glad", "text/plain"), ("", "text/plain"), ("so very scared 😱", "text/plain")]
        )
    lines = [r.getMessage() for r in caplog.records]
    # zero-initialised buckets at start, then one line per touched bucket for the batch
    assert sum(line.startswith("[METRICS]EmotionConfidence.Count:0|") for line in lines) == len(CONFIDENCE_BOUNDS) + 1
    counted = [line for line in lines if line.startswith("[METRICS]EmotionTokenLength.Count:") and ":0|" not in line]
    assert sum(int(line.split(":")[1].split("|")[0]) for line in counted) == 2  # the 400 is not counted
    assert any(line.startswith("[METRICS]EmotionUnknownTokens.Count:1|") for line in lines)  # the emoji
    entries = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [e["label"] for e in entries] == [results[0][1]["label"], results[2][1]["label"]]
    assert entries[0]["probabilities"] == pytest.approx(results[0][1]["probabilities"], abs=1e-5)
    assert entries[1]["unknown_share"] > 0 and "text" not in entries[0]
    assert [e["words"] for e in entries] == [3, 3]  # the emoji is no word
    assert any(line.startswith("[METRICS]EmotionWords.Count:6|") for line in lines)


def test_the_readiness_probe_is_answered_but_not_counted_as_traffic(tiny_model_dir, tmp_path, caplog):
    from emotion_handler import EmotionHandler
    from emotion_inputs import PROBE_HEADER

    from serving.client import PROBE_HEADER as CLIENT_PROBE_HEADER
    from tests.helpers import make_context, run_batch

    assert CLIENT_PROBE_HEADER.lower() == PROBE_HEADER
    context = make_context(tiny_model_dir, {"request_log_dir": str(tmp_path)})
    handler = EmotionHandler()
    handler.initialize(context)
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        results = run_batch(
            handler,
            context,
            [("i feel glad", "text/plain", {CLIENT_PROBE_HEADER: "readiness"}), ("i feel glad", "text/plain")],
        )
    assert [status for status, _ in results] == [200, 200]
    assert results[0][1]["label"] == results[1][1]["label"]
    assert results[0][1]["probabilities"] == pytest.approx(results[1][1]["probabilities"], abs=1e-5)
    lines = [r.getMessage() for r in caplog.records]
    predictions = [line for line in lines if line.startswith("[METRICS]EmotionPredictions.Count:")]
    assert [line.split("|")[0] for line in predictions] == ["[METRICS]EmotionPredictions.Count:1"]
    counted = [line for line in lines if line.startswith("[METRICS]EmotionTokenLength.Count:") and ":0|" not in line]
    assert sum(int(line.split(":")[1].split("|")[0]) for line in counted) == 1
    assert len((tmp_path / "requests.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_robustness_runs_the_archive_handler_under_each_perturbation(profiled_store, tmp_path):  # noqa: F811
    from monitoring import robustness

    out = tmp_path / "robustness.json"
    assert (
        robustness.main(
            [
                *("--archive", str(profiled_store / "emotion.mar"), "--val-file", str(FIXTURE_VAL)),
                "--out",
                str(out),
                "--no-drift-report",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    rows = {r["perturbation"]: r for r in result["perturbations"]}
    assert set(rows) == set(robustness.PERTURBATIONS)
    assert rows["none"]["label_psi"] < 0.05 and rows["none"]["length_psi"] < 0.05
    assert rows["emoji"]["unknown_token_share"] > rows["none"]["unknown_token_share"]
    assert rows["repeated punctuation"]["mean_tokens"] > rows["none"]["mean_tokens"]
    assert rows["truncation (first half)"]["mean_tokens"] < rows["none"]["mean_tokens"]
    assert rows["upper case"]["accuracy"] == rows["none"]["accuracy"]  # an uncased tokenizer
    assert rows["upper case"]["macro_f1"] == rows["none"]["macro_f1"] and 0 <= rows["none"]["macro_f1"] <= 1
    assert [r["window"] for r in result["noise"]] == [18, 18]  # half of the 36 fixture texts
    assert all(0 <= r["length_psi_p95"] <= r["length_psi_max"] for r in result["noise"])


def test_perturbations_are_reproducible_and_do_what_they_say():
    from training.perturb import perturb

    texts = ["i feel rather miserable this morning", "so glad"]
    assert perturb(texts, "typos", seed=1) == perturb(texts, "typos", seed=1)
    assert perturb(texts, "upper case") == [t.upper() for t in texts]
    assert perturb(texts, "negation") == ["i feel not rather miserable this morning", "i do not think that so glad"]
    assert perturb(texts, "truncation (first half)") == ["i feel rather", "so"]
    shouted = perturb(texts, "repeated punctuation")
    assert all(p.startswith(t) and p[len(t) :].strip("!?") == "" for p, t in zip(shouted, texts, strict=True))
    typo = perturb(texts, "typos", seed=3)[0]
    assert sorted(typo) == sorted(texts[0]) and len(typo.split()) == len(texts[0].split())
    with pytest.raises(KeyError, match="choose one of"):
        perturb(texts, "typo")


def test_drift_config_thresholds_are_consistent():
    config = yaml.safe_load((MONITORING / "drift.yaml").read_text())
    assert config["drift_report"]["min_requests"] <= config["drift_report"]["window"]
    assert 0 < config["prometheus"]["psi_floor"] < 0.01


@pytest.mark.parametrize("limit", ["0", "-1", "two"])
def test_robustness_refuses_a_limit_below_one_text(limit, tmp_path, capsys):
    from monitoring import robustness

    with pytest.raises(SystemExit) as info:
        robustness.main(["--archive", str(tmp_path / "none.mar"), "--limit", limit])
    assert info.value.code == 2
    assert "whole number >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 1 text"):
        robustness.evaluate(tmp_path / "none.mar", FIXTURE_VAL, limit=0)


def test_make_drift_reads_the_request_log_where_make_serve_writes_it(monkeypatch, tmp_path):
    # `make serve` runs the stack in its default work folder; its TorchServe sets LOG_LOCATION to
    # its own logs folder, where the handler writes requests.jsonl. `make drift` sets nothing.
    from monitoring.drift import request_log_dir
    from project import SERVE_DIR
    from serving.stack import Stack

    monkeypatch.delenv("LOG_LOCATION", raising=False)
    stack = Stack(tmp_path, SERVE_DIR)  # built, not started: nothing is written
    assert request_log_dir() == stack.torchserve.workdir / "logs"
    monkeypatch.setenv("LOG_LOCATION", str(tmp_path))
    assert request_log_dir() == tmp_path


@given(st.lists(st.tuples(st.floats(0, 5000), st.integers(1, 5)), min_size=1, max_size=40))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_request_log_entry_outlives_the_age_limit(tmp_path_factory, writes):
    """Whatever the pace of writes, after each one every entry kept is at most ``max_age_s`` old
    (checked at every write here), and the newest entries are always kept."""
    folder = tmp_path_factory.mktemp("aged")
    now = [0.0]
    log = RequestLog(folder / "requests.jsonl", 10_000, 3, max_age_s=3600, check_every_s=0, clock=lambda: now[0])
    for advance, count in writes:
        now[0] += advance
        log.write([json.dumps({"time": now[0], "n": i}) for i in range(count)])
        kept = [
            json.loads(line)["time"]
            for path in folder.glob("requests.jsonl*")
            if not path.name.endswith(".lock")
            for line in path.read_text().splitlines()
        ]
        assert min(kept) >= now[0] - 3600, (now[0], min(kept))
        assert kept.count(now[0]) >= count  # this write's lines are there


def test_the_handler_setting_gives_the_request_log_its_age_limit(tmp_path):
    settings = HandlerSettings.from_yaml({"request_log_dir": str(tmp_path), "request_log_max_age_days": 7})
    monitor = EmotionMonitor.from_settings(RecordingSink(), LABELS, settings)
    assert monitor.request_log.max_age_s == 7 * 86400
    unlimited = HandlerSettings.from_yaml({"request_log_dir": str(tmp_path), "request_log_max_age_days": 0})
    assert EmotionMonitor.from_settings(RecordingSink(), LABELS, unlimited).request_log.max_age_s is None
    with pytest.raises(ValueError, match="max_age_days"):
        HandlerSettings.from_yaml({"request_log_max_age_days": -1})
