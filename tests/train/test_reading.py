"""Reading rows from files and Python objects, shape detection and actionable errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from lorakit.train.data_errors import (
    DataFileNotFoundError,
    EmptyDatasetError,
    MalformedRowError,
    MissingFieldError,
    UnknownRowShapeError,
    UnsupportedSourceError,
)
from lorakit.train.reading import read_dataset
from lorakit.train.shapes import normalize_task

SHAPE_EXAMPLES = [
    ({"prompt": "p", "completion": "c"}, "prompt_completion", "CAUSAL_LM"),
    ({"text": "hello"}, "text", "CAUSAL_LM"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "chat", "CAUSAL_LM"),
    ({"text": "great", "label": "pos"}, "text_label", "SEQ_CLS"),
    ({"tokens": ["a", "b"], "tags": ["O", "B"]}, "tokens_tags", "TOKEN_CLS"),
    ({"source": "s", "target": "t"}, "source_target", "SEQ_2_SEQ_LM"),
]


@pytest.mark.parametrize(("row", "shape_name", "task"), SHAPE_EXAMPLES)
def test_shape_is_detected_from_first_row(row: dict[str, Any], shape_name: str, task: str) -> None:
    dataset = read_dataset([row, row])
    assert (dataset.shape.name, dataset.task, len(dataset)) == (shape_name, task, 2)


class FakeTaskType:
    """Stands in for a ``peft.TaskType`` member: a str enum with ``.value``."""

    value = "CAUSAL_LM"


def test_explicit_task_overrides_detection() -> None:
    rows = [{"text": "a film", "label": 1}]
    assert read_dataset(rows).task == "SEQ_CLS"
    as_text = read_dataset(rows, task=FakeTaskType())
    assert (as_text.shape.name, as_text.rows) == ("text", [{"text": "a film"}])


def test_explicit_task_without_its_fields_names_the_fields() -> None:
    with pytest.raises(
        UnknownRowShapeError, match=r"\['prompt'\].*task SEQ_CLS accepts.*text\+label"
    ):
        read_dataset([{"prompt": "x"}], task="SEQ_CLS")


def test_unknown_task_lists_supported() -> None:
    with pytest.raises(UnknownRowShapeError, match=r"QUESTION_ANS.*CAUSAL_LM, SEQ_CLS"):
        normalize_task("QUESTION_ANS")


def test_unknown_shape_lists_accepted_field_sets() -> None:
    with pytest.raises(UnknownRowShapeError, match=r"list index 0.*\['input', 'output'\].*prompt"):
        read_dataset([{"input": "a", "output": "b"}])


def test_jsonl_rows_and_locations(write_jsonl: Any) -> None:
    path = write_jsonl(
        [{"prompt": "a", "completion": "b", "id": 3}, "", {"prompt": "c", "completion": "d"}]
    )
    dataset = read_dataset(path)
    assert dataset.rows == [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    assert dataset.locations == [f"{path} line 1", f"{path} line 3"]


def test_json_array_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"text": "x", "label": 0}, {"text": "y", "label": 1}]))
    dataset = read_dataset(path)
    assert [row["label"] for row in dataset.rows] == [0, 1]
    assert dataset.locations[1] == f"{path} item 1"


def test_json_file_holding_jsonl_is_read_as_jsonl(write_jsonl: Any) -> None:
    path = write_jsonl([{"text": "x"}, {"text": "y"}], name="rows.json")
    assert [row["text"] for row in read_dataset(path).rows] == ["x", "y"]


def test_csv_cells_are_parsed_per_field(tmp_path: Path) -> None:
    path = tmp_path / "ner.csv"
    path.write_text(
        'tokens,tags\nParis is big,B-LOC O O\n"[""New York"", ""rocks""]","[1, 0]"\n',
        encoding="utf-8",
    )
    dataset = read_dataset(path)
    assert dataset.rows == [
        {"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]},
        {"tokens": ["New York", "rocks"], "tags": [1, 0]},
    ]


def test_csv_integer_labels_become_ints_and_line_numbers_follow_multiline_cells(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cls.csv"
    path.write_text('text,label\n"two\nlines",1\nthird,neg\n', encoding="utf-8")
    dataset = read_dataset(path)
    assert dataset.rows == [{"text": "two\nlines", "label": 1}, {"text": "third", "label": "neg"}]
    assert dataset.locations == [f"{path} line 2", f"{path} line 4"]


def test_tsv_and_csv_messages_cell(tmp_path: Path) -> None:
    path = tmp_path / "chat.tsv"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path.write_text(f"messages\n{json.dumps(messages)}\n", encoding="utf-8")
    assert read_dataset(path).rows == [{"messages": messages}]


def test_csv_row_with_too_many_cells(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\nok,1\na,b,c\n", encoding="utf-8")
    with pytest.raises(
        MalformedRowError, match=r"bad\.csv line 3: the row has 3 cells but the header has 2"
    ):
        read_dataset(path)


def test_column_map_renames_without_mutating_rows() -> None:
    rows = [{"sentence": "fine", "y": "pos"}]
    original = copy.deepcopy(rows)
    dataset = read_dataset(rows, column_map={"text": "sentence", "label": "y"})
    assert dataset.rows == [{"text": "fine", "label": "pos"}]
    assert rows == original


class StandInDataset:
    """Duck-typed like ``datasets.Dataset`` (not installed here): column_names, len, iteration."""

    column_names = ("text", "label")

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Any:
        return iter(self._rows)


def test_dataset_like_object() -> None:
    dataset = read_dataset(
        StandInDataset([{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    )
    assert dataset.source_name == "StandInDataset with columns ['text', 'label']"
    assert dataset.locations == ["dataset row 0", "dataset row 1"]


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataFileNotFoundError, match=r"'.*nope/train\.jsonl' does not exist"):
        read_dataset(path)
    # also catchable as the built-in
    with pytest.raises(FileNotFoundError, match=r"'.*nope/train\.jsonl' does not exist"):
        read_dataset(str(path))


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="is not a file"):
        read_dataset(tmp_path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(
        UnsupportedSourceError, match=r"'\.parquet'.*\.jsonl, \.ndjson, \.json, \.csv, \.tsv"
    ):
        read_dataset(path)


def test_missing_field_names_file_line_and_fields(write_jsonl: Any) -> None:
    path = write_jsonl(
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": "c", "completion": "d"},
            {"prompt": "e", "answer": "f"},
        ],
        name="train.jsonl",
    )
    with pytest.raises(
        MissingFieldError,
        match=r"train\.jsonl line 3: the row has no 'completion' "
        r"\(its fields: \['answer', 'prompt'\]\)"
        r".*column_map=\{'completion': 'your_column'\}",
    ):
        read_dataset(path)


def test_null_field_counts_as_missing() -> None:
    with pytest.raises(MissingFieldError, match=r"list index 1: the row has no 'label'"):
        read_dataset([{"text": "a", "label": 0}, {"text": "b", "label": None}])


def test_malformed_json_line_number(write_jsonl: Any) -> None:
    path = write_jsonl([{"text": "a"}, "", '{"text": "b",}'])
    with pytest.raises(
        MalformedRowError, match=r"data\.jsonl line 3: not valid JSON \(.* at column 14\)"
    ):
        read_dataset(path)


def test_malformed_json_array(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text('[\n {"text": "a"},\n {"text": }\n]')
    with pytest.raises(MalformedRowError, match=r"rows\.json line 3: not valid JSON"):
        read_dataset(path)


def test_non_object_line(write_jsonl: Any) -> None:
    path = write_jsonl([{"text": "a"}, "[1, 2]"])
    with pytest.raises(MalformedRowError, match=r"line 2: expected a row object .* got a list"):
        read_dataset(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"text": 5}], r"field 'text' must be a string, got int '5'"),
        ([{"text": "a", "label": 0.5}], r"class name \(string\) or a class id \(int\), got float"),
        ([{"tokens": ["a", "b"], "tags": ["O"]}], r"2 tokens but 1 tags"),
        ([{"tokens": [], "tags": []}], r"'tokens' is an empty list"),
        (
            [{"messages": [{"role": "user", "content": "hi"}]}],
            r"no 'assistant' message \(roles: \['user'\]\)",
        ),
        (
            [{"messages": [{"role": "user"}]}],
            r"message 0 must be an object with string 'role' and 'content'",
        ),
    ],
)
def test_wrong_value_types(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(MalformedRowError, match=message):
        read_dataset(rows)


def test_empty_sources(write_jsonl: Any, tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match=r"'list of rows' holds no rows"):
        read_dataset([])
    with pytest.raises(EmptyDatasetError, match=r"empty\.jsonl' holds no rows"):
        read_dataset(write_jsonl(["", "  "], name="empty.jsonl"))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(EmptyDatasetError, match=r"header\.csv' holds no rows"):
        read_dataset(header_only)


def test_single_mapping_is_refused() -> None:
    with pytest.raises(UnsupportedSourceError, match=r"single mapping.*\[row\]"):
        read_dataset({"text": "a"})  # type: ignore[arg-type]
