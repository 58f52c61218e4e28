"""The ONNX Runtime backend: export at archive time, same answers as PyTorch, clear errors."""

from __future__ import annotations

import zipfile

import pytest
from emotion_engine import EmotionEngine
from emotion_handler import EmotionHandler
from emotion_onnx import export_onnx
from emotion_settings import HandlerSettings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.archive import ArchiveError, build_archive

from .helpers import make_context, run_batch

pytestmark = pytest.mark.slow

TEXTS = [
    ("i feel so glad", "text/plain"),
    ("i was stunned when i heard it, really stunned", "text/plain"),
    ("scared", "text/plain"),
    ("", "text/plain"),
]


@pytest.fixture(scope="module")
def onnx_model_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model directory with both ONNX exports beside the weights."""
    import shutil

    target = tmp_path_factory.mktemp("onnx") / "model"
    shutil.copytree(tiny_model_dir, target)
    for precision in ("fp32", "int8"):
        export_onnx(target, target, precision)
    return target


@pytest.fixture(scope="module")
def fused_model_dir(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model directory with both fused ONNX exports beside the weights."""
    import shutil

    target = tmp_path_factory.mktemp("fused") / "model"
    shutil.copytree(tiny_model_dir, target)
    for precision in ("fp32", "int8"):
        export_onnx(target, target, precision, fuse=True)
    return target


def op_types(path):
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def handler_for(model_dir, section):
    context = make_context(model_dir, section)
    handler = EmotionHandler()
    handler.initialize(context)
    return handler, context


def test_onnx_fp32_answers_like_torch(onnx_model_dir):
    torch_results = run_batch(*handler_for(onnx_model_dir, {"precision": "fp32"}), TEXTS)
    onnx_results = run_batch(*handler_for(onnx_model_dir, {"backend": "onnx", "precision": "fp32"}), TEXTS)
    assert [status for status, _ in onnx_results] == [200, 200, 200, 400]
    for (_, a), (_, b) in zip(onnx_results[:3], torch_results[:3], strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)


def test_onnx_int8_stays_close_to_fp32(onnx_model_dir):
    fp32 = run_batch(*handler_for(onnx_model_dir, {"backend": "onnx", "precision": "fp32"}), TEXTS[:3])
    int8 = run_batch(*handler_for(onnx_model_dir, {"backend": "onnx", "precision": "int8"}), TEXTS[:3])
    for (_, a), (_, b) in zip(int8, fp32, strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=0.05)
    assert (onnx_model_dir / "model-int8.onnx").stat().st_size < 0.5 * (
        onnx_model_dir / "model-fp32.onnx"
    ).stat().st_size


def test_fused_graph_runs_each_layer_as_fused_kernels(onnx_model_dir, fused_model_dir):
    fp32, int8 = op_types(fused_model_dir / "model-fp32.onnx"), op_types(fused_model_dir / "model-int8.onnx")
    assert {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= fp32
    assert {"QAttention", "QEmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"} <= int8
    # The plain export keeps the layers as ONNX's standard operators, which every engine reads.
    assert not {"Attention", "QAttention", "SkipLayerNormalization"} & op_types(onnx_model_dir / "model-int8.onnx")


def test_fused_graph_answers_like_torch(onnx_model_dir, fused_model_dir):
    torch_results = run_batch(*handler_for(onnx_model_dir, {"precision": "fp32"}), TEXTS)
    section = {"backend": "onnx", "precision": "fp32", "fuse": True}
    fused = run_batch(*handler_for(fused_model_dir, section), TEXTS)
    assert [status for status, _ in fused] == [200, 200, 200, 400]
    for (_, a), (_, b) in zip(fused[:3], torch_results[:3], strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)
    section["precision"] = "int8"
    fused_int8 = run_batch(*handler_for(fused_model_dir, section), TEXTS[:3])
    for (_, a), (_, b) in zip(fused_int8, torch_results[:3], strict=True):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=0.05)


def test_fusion_skips_a_model_type_the_optimizer_does_not_know(tiny_model_dir, tmp_path, monkeypatch, caplog):
    import emotion_onnx

    monkeypatch.setattr(emotion_onnx, "FUSABLE_MODEL_TYPES", ("mpnet",))
    with caplog.at_level("WARNING", logger=emotion_onnx.__name__):
        graph = export_onnx(tiny_model_dir, tmp_path, "fp32", fuse=True)
    assert "exporting unfused" in caplog.text
    assert not {"Attention", "SkipLayerNormalization"} & op_types(graph)


@pytest.mark.parametrize(("spin_wait", "allowed"), [(False, "0"), (True, "1")])
def test_idle_threads_spin_only_when_asked(onnx_model_dir, spin_wait, allowed):
    handler, _ = handler_for(onnx_model_dir, {"backend": "onnx", "precision": "fp32", "spin_wait": spin_wait})
    options = handler.engine.model.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == allowed


def test_missing_export_is_a_clear_error(tiny_model_dir):
    with pytest.raises(FileNotFoundError, match=r"model-int8\.onnx is not in the archive"):
        handler_for(tiny_model_dir, {"backend": "onnx", "precision": "int8"})


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"backend": "tensorrt"}, "backend"),
        ({"backend": "onnx", "precision": "bf16"}, "onnx backend"),
        ({"backend": "onnx", "compile": True}, "torch backend only"),
        ({"backend": "torch", "spin_wait": True}, "onnx backend only"),
        ({"backend": "torch", "fuse": True}, "onnx backend only"),
    ],
)
def test_settings_reject_combinations_the_backend_cannot_run(section, message):
    with pytest.raises(ValueError, match=message):
        HandlerSettings.from_yaml(section)


def test_every_configurable_backend_is_registered_with_an_export_step(tiny_model_dir, tmp_path):
    from emotion_backends import BACKENDS
    from emotion_settings import BACKEND_PRECISIONS

    assert set(BACKENDS) == set(BACKEND_PRECISIONS)
    assert all(callable(backend.export) for backend in BACKENDS.values())
    # The torch backend runs the model directory as it is: nothing to build.
    assert BACKENDS["torch"].export(tiny_model_dir, tmp_path, HandlerSettings()) == []


def test_archive_exports_the_graph_its_config_selects(tiny_model_dir, tmp_path):
    config = tmp_path / "model-config.yaml"
    config.write_text("batchSize: 4\nmaxBatchDelay: 5\nhandler:\n  backend: onnx\n  precision: int8\n")
    archive = build_archive(tiny_model_dir, tmp_path / "store", model_config=config)
    with zipfile.ZipFile(archive) as packed:
        names = set(packed.namelist())
    assert "model-int8.onnx" in names
    assert "model-fp32.onnx" not in names


def test_archive_refuses_a_bad_handler_section(tiny_model_dir, tmp_path):
    config = tmp_path / "model-config.yaml"
    config.write_text("handler:\n  backend: onnx\n  precision: bf16\n")
    with pytest.raises(ArchiveError, match="onnx backend"):
        build_archive(tiny_model_dir, tmp_path / "store", model_config=config)
    assert not (tmp_path / "store" / "emotion.mar").exists()


def test_int8_export_refuses_a_quantisation_that_changes_the_answers(tiny_model_dir, tmp_path, monkeypatch):
    import onnxruntime.quantization
    from emotion_onnx import ExportError

    def scrambled_quantisation(fp32_path, target, **_):
        # A graph whose logits come out reversed and sharpened: what a broken quantisation looks like.
        import onnx
        from onnx import helper

        graph = onnx.load(str(fp32_path))
        for node in graph.graph.node:
            node.output[:] = ["logits_raw" if name == "logits" else name for name in node.output]
        scale = helper.make_node("Constant", [], ["scale"], value=helper.make_tensor("v", 1, [], [-100.0]))
        graph.graph.node.extend([scale, helper.make_node("Mul", ["logits_raw", "scale"], ["logits"])])
        onnx.save(graph, str(target))

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", scrambled_quantisation)
    with pytest.raises(ExportError, match="archive it with precision fp32"):
        export_onnx(tiny_model_dir, tmp_path, "int8")
    assert not list(tmp_path.glob("*.onnx"))  # no graph left behind for the archive to pack


COMPANIONS = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=300),
        st.sampled_from(["WHY WOULD YOU DO THIS TO ME!!!!!!", "ok", "i " * 120, "🙂" * 40, "love love love"]),
    ),
    min_size=1,
    max_size=7,
)


ENGINES: dict = {}  # one engine per backend and precision for all the generated examples


@pytest.mark.parametrize("backend,precision", [(b, p) for b in ("onnx", "torch") for p in ("int8", "fp32")])
@given(companions=COMPANIONS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_no_texts_answer_depends_on_what_is_batched_with_it(onnx_model_dir, backend, precision, companions):
    # A pass cost this high makes the planner put every text of the batch in one pass: where the
    # backend's answers would depend on that (int8), isolate_texts must run each text alone.
    engine = ENGINES.setdefault(
        (backend, precision),
        EmotionEngine(
            onnx_model_dir,
            HandlerSettings(backend=backend, precision=precision, sort_by_length=True, pass_cost_tokens=10**6),
        ),
    )
    texts = [text for text, _ in TEXTS[:3]]
    alone = [engine.predict([text])[0]["probabilities"] for text in texts]
    valid = [c for c in companions if c.strip() and engine.token_ids([c])[0][0]]
    together = engine.predict(texts + valid)[: len(texts)]
    for expected, answer in zip(alone, together, strict=True):
        assert answer["probabilities"] == pytest.approx(expected, abs=1e-5)
