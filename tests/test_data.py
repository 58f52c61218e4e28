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
        ([{"text": None, "label": 0}], ["joy"], "row 0: text is NoneType"),
        ([{"label": 0}], ["joy"], "row 0: text is NoneType"),
        ([{"text": "x", "label": 0}, {"text": "y", "label": 0.9}], ["joy"], "row 1: label 0.9 is not an integer"),
        ([{"text": "x", "label": "joy"}], ["joy"], "not an integer"),
        ([{"text": "x", "label": True}], ["joy", "fear"], "not an integer"),
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
    from monitoring.drift import read_texts
    from training.data import read_labelled

    path = tmp_path / "split.txt"
    write_split(path, [Example(text, LABELS.index(label)) for text, label in pairs])
    # stripped, as load_split strips them; a U+FEFF that starts the file is a byte order mark to both
    expected = [(text.removeprefix("\ufeff") if i == 0 else text, label) for i, (text, label) in enumerate(pairs)]
    expected = [(text.strip(), label) for text, label in expected]
    assert read_labelled(path) == expected
    assert read_texts(path) == [text for text, _ in expected]
    if all(text for text, _ in expected):  # load_split refuses empty texts; otherwise the two agree
        assert [(e.text, LABELS[e.label]) for e in load_split(path)] == expected


def test_the_load_test_reader_reads_raw_split_files_as_the_data_stage_does(tmp_path):
    from training.data import read_labelled

    assert read_labelled(write(tmp_path, b"\xef\xbb\xbfa b ; joy \r\ni feel\rsad;sadness\n")) == [
        ("a b", "joy"),
        ("i feel\rsad", "sadness"),
    ]


def test_a_carriage_return_inside_a_line_is_refused(tmp_path):
    """Old Mac files end lines with a bare CR: read as one line, they would join several examples."""
    with pytest.raises(DataFormatError, match="carriage return") as info:
        load_split(write(tmp_path, b"i feel sad;sadness\ri feel great;joy\ri am scared;fear\r"))
    assert info.value.line_no == 1
    assert [e.text for e in load_split(write(tmp_path, b"a;joy\r\nb;fear\r\n", "crlf.txt"))] == ["a", "b"]


def prepared_source(root: Path, train: bytes, val: bytes) -> Path:
    source = root / "source"
    source.mkdir(parents=True, exist_ok=True)
    (source / "train.txt").write_bytes(train)
    (source / "val.txt").write_bytes(val)
    return source


def test_a_bad_split_leaves_the_prepared_data_as_it_was(tmp_path):
    from training import prepare
    from training.config import compose

    out = tmp_path / "processed"
    good = prepared_source(tmp_path / "good", b"old one;joy\nold two;fear\n", b"old val;joy\n")
    prepare.prepare(compose([f"data.source_dir={good}", f"paths.data_dir={out}"]))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for train, val in ((b"new one;joy\n", b"bad val line\n"), (b"new;joy\nnew\rbroken;joy\n", b"v;joy\n")):
        bad = prepared_source(tmp_path / "bad", train, val)
        with pytest.raises(DataFormatError):
            prepare.prepare(compose([f"data.source_dir={bad}", f"paths.data_dir={out}"]))
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_data_stage_counts_repeated_texts_and_refuses_one_file_for_both_splits(tmp_path):
    from training import prepare
    from training.config import compose

    train = b"same;joy\nsame;love\nagain;fear\nagain;fear\nshared;joy\nalso shared;anger\n"
    val = b"shared;love\nalso shared;anger\nonly val;joy\nonly val;joy\n"
    source = prepared_source(tmp_path, train, val)
    stats = prepare.prepare(compose([f"data.source_dir={source}", f"paths.data_dir={tmp_path / 'out'}"]))
    assert stats["overlap"] == {
        "train_duplicate_texts": 2,
        "train_conflicting_labels": 1,
        "val_duplicate_texts": 1,
        "val_conflicting_labels": 0,
        "texts_in_both_splits": 2,
        "texts_in_both_splits_relabelled": 1,
    }
    (source / "val.txt").unlink()
    (source / "val.txt").symlink_to(source / "train.txt")
    with pytest.raises(ValueError, match="same file"):
        prepare.prepare(compose([f"data.source_dir={source}", f"paths.data_dir={tmp_path / 'out'}"]))


def test_a_hub_dataset_of_another_shape_is_named_not_crashed_on():
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    from training.hub import split_label_names

    good = Features({"text": Value("string"), "label": ClassLabel(names=["joy", "fear"])})
    dataset = DatasetDict({"train": Dataset.from_dict({"text": ["a"], "label": [1]}, features=good)})
    assert split_label_names(dataset, "x/y", "train") == ["joy", "fear"]
    with pytest.raises(ValueError, match=r"no split 'validation' \(it has \['train'\]\)"):
        split_label_names(dataset, "x/y", "validation")
    other = DatasetDict({"train": Dataset.from_dict({"sentence": ["a"], "label": [1]})})
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['text'\]"):
        split_label_names(other, "x/y", "train")
    plain = DatasetDict({"train": Dataset.from_dict({"text": ["a"], "label": [1]})})
    with pytest.raises(ValueError, match="not a class label"):
        split_label_names(plain, "x/y", "train")
