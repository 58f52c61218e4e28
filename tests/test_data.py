"""Split-file loading and validation."""

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training.data import LABELS, DataFormatError, Example, class_counts, load_split, parse_line, write_split
from training.hub import rows_to_examples

from .helpers import FIXTURE_DATA


def write(tmp_path: Path, content: bytes, name: str = "split.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_fixture_split_loads_with_all_labels():
    examples = load_split(FIXTURE_DATA / "train.txt")
    assert len(examples) == 144
    assert set(class_counts(examples).values()) == {24}


def test_a_byte_order_mark_that_starts_the_file_is_not_part_of_the_first_text(tmp_path):
    examples = load_split(write(tmp_path, b"\xef\xbb\xbfi feel fine;joy\r\n\xef\xbb\xbfstill here;joy\n"))
    assert [e.text for e in examples] == ["i feel fine", "\ufeffstill here"]


def test_label_is_last_field_so_text_may_hold_semicolons():
    example = parse_line("i said; no; never;anger", "f", 1)
    assert example == Example(text="i said; no; never", label=LABELS.index("anger"))


@pytest.mark.parametrize(
    ("content", "line_no", "problem"),
    [
        (b"i feel fine;joy\nno separator here\n", 2, "no ';'"),
        (b"i feel fine;joy\ni feel odd;bored\n", 2, "unknown label 'bored'"),
        (b"   ;sadness\n", 1, "empty text"),
        (b"i feel fine;joy\n\ni feel bad;sadness\n", 2, "blank line"),
        (b"i feel fine;joy\ncaf\xe9 time;joy\n", 2, "not valid UTF-8"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, line_no, problem):
    path = write(tmp_path, content)
    with pytest.raises(DataFormatError) as info:
        load_split(path)
    assert info.value.line_no == line_no
    assert problem in str(info.value)
    assert str(path) in str(info.value)


def test_empty_file_is_an_error(tmp_path):
    with pytest.raises(DataFormatError, match="no examples"):
        load_split(write(tmp_path, b""))


def test_missing_file_says_which_setting_to_change(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.source_dir"):
        load_split(tmp_path / "absent.txt")


def test_write_then_load_round_trips(tmp_path):
    examples = [Example("i feel calm; mostly", 1), Example("so scared", 4)]
    path = tmp_path / "out" / "split.txt"
    assert write_split(path, examples) == 2
    assert load_split(path) == examples


def test_write_refuses_line_breaks(tmp_path):
    with pytest.raises(ValueError, match="line break"):
        write_split(tmp_path / "x.txt", [Example("two\nlines", 0)])


def test_hub_rows_are_mapped_through_label_names():
    from datasets import ClassLabel, Dataset, Features, Value

    # A hub dataset whose label ids are in a different order than ours.
    hub_names = ["joy", "sadness", "anger", "love", "surprise", "fear"]
    features = Features({"text": Value("string"), "label": ClassLabel(names=hub_names)})
    rows = Dataset.from_dict({"text": ["i am glad", " so  alone ", "wow"], "label": [0, 1, 4]}, features=features)
    examples = rows_to_examples(rows, rows.features["label"].names, "train")
    assert [LABELS[e.label] for e in examples] == ["joy", "sadness", "surprise"]
    assert examples[1].text == "so alone"


@pytest.mark.parametrize(
    ("rows", "names", "message"),
    [
        ([{"text": "x", "label": 0}], ["joy", "boredom"], "does not know"),
        ([{"text": "  ", "label": 0}], ["joy"], "empty text"),
        ([{"text": "x", "label": 3}], ["joy"], "out of range"),
    ],
)
def test_hub_conversion_errors(rows, names, message):
    with pytest.raises(ValueError, match=message):
        rows_to_examples(rows, names, "train")


def test_prepared_data_does_not_depend_on_where_the_project_is(tmp_path, monkeypatch):
    import shutil

    from training import prepare
    from training.config import compose

    outputs = []
    for checkout in ("a", "elsewhere/b"):
        root = tmp_path / checkout / "project"
        shutil.copytree(FIXTURE_DATA, root.parent / "shared" / "emotion")
        root.mkdir()
        monkeypatch.setattr(prepare, "PROJECT_ROOT", root)
        cfg = compose([f"data.source_dir={root}/../shared/emotion", f"paths.data_dir={root}/data/processed"])
        stats = prepare.prepare(cfg)
        assert stats["source"] == "../shared/emotion"
        outputs.append({p.name: p.read_bytes() for p in (root / "data" / "processed").iterdir()})
    assert outputs[0] == outputs[1]


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\n\r"), min_size=1),
            st.sampled_from(LABELS),
        ),
        min_size=1,
        max_size=20,
    )
)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_split_files_read_back_as_written_whatever_the_texts_hold(tmp_path, pairs):
    from loadtest.texts import read_labelled
    from monitoring.drift import read_texts

    path = tmp_path / "split.txt"
    write_split(path, [Example(text, LABELS.index(label)) for text, label in pairs])
    assert read_labelled(path) == pairs
    assert read_texts(path) == [text.strip() for text, _ in pairs]
