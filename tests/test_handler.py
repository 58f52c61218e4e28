"""The TorchServe handler, driven through a real ts.context.Context without a server."""

from __future__ import annotations

import json

import pytest
import torch
from emotion_handler import EmotionHandler
from emotion_inputs import InputError, extract_text
from emotion_settings import HandlerSettings
from hypothesis import given
from hypothesis import strategies as st

from training.data import LABELS

from .helpers import make_context, run_batch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    context = make_context(tiny_model_dir)
    handler = EmotionHandler()
    handler.initialize(context)
    return handler, context


def test_good_requests_get_label_score_and_six_probabilities(loaded):
    handler, context = loaded
    results = run_batch(
        handler,
        context,
        [
            ("i feel so delighted today", "text/plain"),
            ({"text": "i am feeling terrified about the news"}, "application/json"),
            (b"honestly i feel lonely right now", "text/plain"),
        ],
    )
    for status, body in results:
        assert status == 200
        assert list(body["probabilities"]) == list(LABELS)
        assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert body["label"] == max(body["probabilities"], key=body["probabilities"].get)
        assert body["score"] == body["probabilities"][body["label"]]


BAD_INPUTS = [
    ("", "text/plain", 400, "EmptyText"),
    ("   \n\t ", "text/plain", 400, "EmptyText"),
    (b"\xff\xfe bad bytes", "text/plain", 400, "InvalidEncoding"),
    (b"{not json", "application/json", 400, "MalformedJSON"),
    ({"txt": "hello"}, "application/json", 400, "MissingField"),
    ({"text": 42}, "application/json", 400, "InvalidType"),
    ({"text": None}, "application/json", 400, "InvalidType"),
    (["a", "b"], "application/json", 400, "UnsupportedInput"),
    ("hello", "application/json", 400, "InvalidInput"),
    ("x" * 2001, "text/plain", 413, "TextTooLong"),
]


@pytest.mark.parametrize(("payload", "content_type", "status", "kind"), BAD_INPUTS)
def test_bad_input_fails_alone_inside_a_batch(loaded, payload, content_type, status, kind):
    handler, context = loaded
    results = run_batch(
        handler,
        context,
        [
            ("i feel so happy today", "text/plain"),
            (payload, content_type),
            ({"text": "i am furious"}, "application/json"),
        ],
    )
    assert [r[0] for r in results] == [200, status, 200]
    assert results[1][1]["type"] == kind
    assert results[1][1]["message"]
    assert "label" in results[0][1] and "label" in results[2][1]


def test_batch_of_only_bad_requests(loaded):
    handler, context = loaded
    results = run_batch(handler, context, [("", "text/plain"), (b"\xff", "text/plain")])
    assert [r[0] for r in results] == [400, 400]


def test_batched_probabilities_match_single_requests(loaded):
    handler, context = loaded
    texts = ["i feel so glad", "i was stunned when i heard it; really and truly stunned", "scared"]
    together = run_batch(handler, context, [(t, "text/plain") for t in texts])
    alone = [run_batch(handler, context, [(t, "text/plain")])[0] for t in texts]
    for (_, a), (_, b) in zip(together, alone, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


@pytest.mark.parametrize("pass_cost_tokens", [0, 4, 1000])
def test_passes_by_length_give_the_same_answers(tiny_model_dir, loaded, pass_cost_tokens):
    handler, context = loaded
    sorted_context = make_context(tiny_model_dir, {"sort_by_length": True, "pass_cost_tokens": pass_cost_tokens})
    sorted_handler = EmotionHandler()
    sorted_handler.initialize(sorted_context)
    texts = [("a " * n + "happy", "text/plain") for n in (9, 1, 5, 3, 7)] + [("", "text/plain")]
    expected = run_batch(handler, context, texts)
    results = run_batch(sorted_handler, sorted_context, texts)
    assert [r[0] for r in results] == [r[0] for r in expected] == [200] * 5 + [400]
    for (_, a), (_, b) in zip(results[:5], expected[:5], strict=True):
        assert a["label"] == b["label"]
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_handler_emits_its_metrics(loaded, caplog):
    handler, context = loaded
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        results = run_batch(
            handler, context, [("i feel glad", "text/plain"), ("", "text/plain"), ("i feel glad", "text/plain")]
        )
    lines = [r.getMessage() for r in caplog.records]
    label = results[0][1]["label"]
    # one line per label and batch, carrying the batch's count
    predictions = [line for line in lines if line.startswith("[METRICS]EmotionPredictions.Count:")]
    assert len(predictions) == 1
    assert predictions[0].startswith("[METRICS]EmotionPredictions.Count:2|#ModelName:emotion,Label:" + label)
    assert any(
        line.startswith("[METRICS]EmotionRejected.Count:1|#ModelName:emotion,Reason:EmptyText") for line in lines
    )
    assert any(line.startswith("[METRICS]EmotionInputTokens.Count:") for line in lines)
    assert not any("Failed to update metric" in line for line in lines)


def test_every_label_counter_starts_at_zero(tiny_model_dir, caplog):
    """A label no request has been given yet still has its series, at 0: the drift rules join live
    and reference label shares on the label, and a missing series would drop out of the PSI sum."""
    context = make_context(tiny_model_dir)
    with caplog.at_level("INFO", logger="ts.metrics.caching_metric"):
        EmotionHandler().initialize(context)
    started = {
        line.split("Label:")[1].split("|")[0].split(",")[0]
        for line in (r.getMessage() for r in caplog.records)
        if line.startswith("[METRICS]EmotionPredictions.Count:0|")
    }
    assert started == set(LABELS)


def test_settings_reject_unknown_keys_and_precisions():
    with pytest.raises(ValueError, match="unknown keys"):
        HandlerSettings.from_yaml({"presicion": "bf16"})
    with pytest.raises(ValueError, match="precision"):
        HandlerSettings.from_yaml({"precision": "fp8"})
    with pytest.raises(ValueError, match="pass_cost_tokens"):
        HandlerSettings.from_yaml({"sort_by_length": True, "pass_cost_tokens": -1})
    assert HandlerSettings.from_yaml(None) == HandlerSettings()


def test_extract_text_without_body():
    with pytest.raises(InputError) as info:
        extract_text({}, None, 100)
    assert info.value.status == 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback")
def test_gpu_id_without_cuda_runs_on_cpu(tiny_model_dir):
    context = make_context(tiny_model_dir, gpu=0)
    handler = EmotionHandler()
    handler.initialize(context)
    assert handler.device.type == "cpu"
    assert run_batch(handler, context, [("i feel glad", "text/plain")])[0][0] == 200


def test_a_cuda_build_that_cannot_use_its_gpu_fails_loudly(tiny_model_dir, monkeypatch):
    """TorchServe assigned a GPU and torch is built for CUDA, yet CUDA is unavailable: a driver
    mismatch, not a CPU machine. Serving on the CPU would hide it."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"GPU 0.*CUDA 12\.8.*driver"):
        EmotionHandler().initialize(make_context(tiny_model_dir, gpu=0))
    EmotionHandler().initialize(make_context(tiny_model_dir))  # no GPU assigned: the CPU, as asked


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_gpu_worker_runs_half_precision_on_cuda(tiny_model_dir, loaded, backend):
    context = make_context(tiny_model_dir, {"backend": backend, "precision": "fp32"}, gpu=0)
    handler = EmotionHandler()
    handler.initialize(context)
    assert handler.device.type == "cuda"
    assert next(handler.engine.model.model.parameters()).dtype == torch.float16
    texts = [("i feel so glad", "text/plain"), ("i am scared of the dark", "text/plain")]
    on_gpu = run_batch(handler, context, texts)
    on_cpu = run_batch(*loaded, texts)
    for (status, a), (_, b) in zip(on_gpu, on_cpu, strict=True):
        assert status == 200
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-2)


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_the_containers_cpu_limit_is_read_from_its_cgroup(tmp_path, files, limit):
    from emotion_cpuinfo import cgroup_cpu_limit

    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    assert cgroup_cpu_limit(tmp_path) == limit


@given(configured=st.integers(0, 64), default=st.integers(1, 256), limit=st.none() | st.integers(1, 64))
def test_worker_threads_never_exceed_the_cpu_limit_unless_configured(configured, default, limit):
    from emotion_cpuinfo import worker_threads

    threads = worker_threads(configured, default, limit)
    if configured:
        assert threads == configured
    else:
        assert 1 <= threads <= default and (limit is None or threads <= limit)
        assert threads == (min(default, limit) if limit else default)


def test_negative_threads_are_refused():
    with pytest.raises(ValueError, match="threads"):
        HandlerSettings.from_yaml({"threads": -1})


def test_every_answer_and_request_log_line_carries_its_request_id(tiny_model_dir, tmp_path):
    context = make_context(tiny_model_dir, {"request_log_dir": str(tmp_path)})
    handler = EmotionHandler()
    handler.initialize(context)
    sent = ["client-1", "not a valid id!", "x" * 65, "err.2", None]
    payloads = ["i feel so delighted today", "i am furious", "i am scared", "", "so lonely"]
    requests = [
        (text, "text/plain", {} if rid is None else {"X-Request-ID": rid})
        for text, rid in zip(payloads, sent, strict=True)
    ]
    results = run_batch(handler, context, requests)
    assert [status for status, _ in results] == [200, 200, 200, 400, 200]
    # A valid id is echoed; otherwise TorchServe's own id of the request (req-<index> here).
    expected = ["client-1", "req-1", "req-2", "err.2", "req-4"]
    assert [body["request_id"] for _, body in results] == expected
    logged = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert [entry["request_id"] for entry in logged] == ["client-1", "req-1", "req-2", "req-4"]  # answered only


@pytest.mark.parametrize(("keep", "field"), [(True, "text"), ("hash", "text_sha256"), (False, None)])
def test_the_request_log_keeps_the_text_its_hash_or_nothing(tiny_model_dir, tmp_path, keep, field):
    import hashlib

    context = make_context(tiny_model_dir, {"request_log_dir": str(tmp_path), "request_log_texts": keep})
    handler = EmotionHandler()
    handler.initialize(context)
    run_batch(handler, context, [("i feel so delighted today", "text/plain")])
    (entry,) = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    kept = {
        "text": "i feel so delighted today",
        "text_sha256": hashlib.sha256(b"i feel so delighted today").hexdigest(),
    }
    assert {k: entry[k] for k in kept if k in entry} == ({field: kept[field]} if field else {})


@pytest.mark.parametrize("value", ["yes", 1, 0, "text", None])
def test_request_log_texts_is_true_false_or_hash(value):
    with pytest.raises(ValueError, match="request_log_texts"):
        HandlerSettings.from_yaml({"request_log_texts": value})
