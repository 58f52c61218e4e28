"""A pretrained checkpoint's own classification head: reordered to the dataset's labels, or replaced."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from training.config import compose
from training.data import LABELS
from training.heads import head_order, load_classifier, output_layer, trained_head_labels
from training.train import build_model

from .helpers import tiny_overrides

TEXTS = ["i feel so glad today", "i am terrified of what comes next", "i was stunned"]


def logits_of(model, model_dir: Path) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        return model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits


def checkpoint_with_head(tiny_model_dir: Path, folder: Path, names: list[str], order: list[int]) -> Path:
    """A copy of the trained tiny model whose head lists ``names`` in its config and holds the
    trained rows ``order`` (row i of the copy is row order[i] of the original)."""
    shutil.copytree(tiny_model_dir, folder)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir)
    layer = output_layer(model, len(LABELS))
    with torch.no_grad():
        layer.weight.copy_(layer.weight[order])
        layer.bias.copy_(layer.bias[order])
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: i for i, name in enumerate(names)}
    model.save_pretrained(folder)
    return folder


@given(st.permutations(LABELS), st.booleans())
def test_head_order_finds_each_label_in_any_order_and_case(head, upper):
    head = [name.upper() for name in head] if upper else head
    order = head_order(head, LABELS)
    assert [head[i].casefold() for i in order] == list(LABELS)


@given(st.lists(st.sampled_from([*LABELS, "neutral", "Joy"]), min_size=1, max_size=8))
def test_head_order_refuses_any_other_set_of_names(head):
    if sorted(name.casefold() for name in head) == sorted(LABELS):
        assert head_order(head, LABELS) is not None
    else:
        assert head_order(head, LABELS) is None


def test_an_encoder_without_a_head_has_no_head_labels(tiny_model_dir):
    from transformers import AutoConfig

    from training.config import packaged_minilm_dir

    assert trained_head_labels(AutoConfig.from_pretrained(packaged_minilm_dir())) is None
    assert trained_head_labels(AutoConfig.from_pretrained(tiny_model_dir)) == list(LABELS)


def test_a_head_over_the_same_labels_in_another_order_keeps_its_answers(tiny_model_dir, tmp_path):
    reference = logits_of(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir), tiny_model_dir)
    order = [3, 5, 0, 4, 1, 2]
    names = [LABELS[i].capitalize() for i in order]
    folder = checkpoint_with_head(tiny_model_dir, tmp_path / "shuffled", names, order)
    # the copy's rows follow its own names: it gives the same answers under them
    assert torch.allclose(
        logits_of(AutoModelForSequenceClassification.from_pretrained(folder), folder), reference[:, order], atol=1e-5
    )

    model = load_classifier(str(folder), LABELS)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert torch.allclose(logits_of(model, folder), reference, atol=1e-5)

    # and so does training's own loader, from the config key
    cfg = compose(tiny_overrides(tmp_path / "run", f"model.pretrained={folder}"))
    _, built = build_model(cfg)
    assert torch.allclose(logits_of(built, folder), reference, atol=1e-5)


@pytest.mark.parametrize("names", [[f"topic{i}" for i in range(6)], ["negative", "positive"]])
def test_a_head_over_other_labels_is_replaced(tiny_model_dir, tmp_path, caplog, names):
    folder = tmp_path / "other"
    if len(names) == len(LABELS):
        checkpoint_with_head(tiny_model_dir, folder, names, list(range(6)))
    else:  # a two-label head on the same encoder
        shutil.copytree(tiny_model_dir, folder)
        other = AutoModelForSequenceClassification.from_pretrained(
            tiny_model_dir, num_labels=2, id2label=dict(enumerate(names)), ignore_mismatched_sizes=True
        )
        other.save_pretrained(folder)
    old = output_layer(AutoModelForSequenceClassification.from_pretrained(folder), len(names)).weight
    with caplog.at_level(logging.WARNING, logger="training.heads"):
        model = load_classifier(str(folder), LABELS)
    assert any("replaced by a new head" in r.getMessage() and names[0] in r.getMessage() for r in caplog.records)
    assert model.config.id2label == dict(enumerate(LABELS))
    layer = output_layer(model, len(LABELS))
    assert layer.weight.shape[0] == len(LABELS)
    if old.shape == layer.weight.shape:
        assert not torch.allclose(layer.weight, old)
    assert torch.count_nonzero(layer.bias) == 0
    assert float(layer.weight.detach().std()) == pytest.approx(model.config.initializer_range, rel=0.3)
