"""Reading rows from JSONL, JSON, CSV/TSV files, Python lists and ``datasets.Dataset`` objects.

Every row keeps a location string ("data/train.jsonl line 7", "list index 3") so that any later
error can point a person at the exact line to fix. Reading never mutates the caller's rows.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.train.data_errors import (
    DataFileNotFoundError,
    EmptyDatasetError,
    MalformedRowError,
    UnsupportedSourceError,
)
from lorakit.train.row_fields import normalize_row
from lorakit.train.shapes import RowShape, TaskName, detect_shape

DataSource = str | os.PathLike[str] | Iterable[Mapping[str, Any]]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
SUPPORTED_SUFFIXES = (*JSONL_SUFFIXES, ".json", *CSV_DELIMITERS)


@dataclass
class RawDataset:
    """Rows read from one source and checked against one row shape.

    Attributes:
        rows: The rows, with lorakit's field names and normalised values.
        locations: For each row, where it came from (file and line, or list index).
        source_name: A short name of the source for messages.
        shape: The row shape every row satisfies.
    """

    rows: list[dict[str, Any]]
    locations: list[str]
    source_name: str
    shape: RowShape

    @property
    def task(self) -> TaskName:
        """The PEFT task type this dataset trains."""
        return self.shape.task

    def __len__(self) -> int:
        return len(self.rows)


def _iter_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{path} line {line_number}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                raise MalformedRowError(
                    f"{location}: not valid JSON ({error.msg} at column {error.colno}). Each "
                    'line of a JSONL file must be one JSON object, e.g. {"text": "..."}; fix or '
                    "remove that line."
                ) from error
            yield value, location


def _iter_json_array(path: Path) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8-sig") as handle:
        try:
            values = json.load(handle)
        except json.JSONDecodeError as error:
            raise MalformedRowError(
                f"{path} line {error.lineno}: not valid JSON ({error.msg} at column "
                f"{error.colno}). A .json data file must hold one JSON array of objects (or one "
                "object per line, JSONL)."
            ) from error
    if not isinstance(values, list):
        raise MalformedRowError(
            f"{path}: expected a JSON array of row objects, got a JSON {type(values).__name__}. "
            "Wrap the rows in [ ... ], or write one object per line in a .jsonl file."
        )
    for index, value in enumerate(values):
        yield value, f"{path} item {index}"


def _iter_csv(path: Path, delimiter: str) -> Iterator[tuple[Any, str]]:
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        # A quoted cell may span lines: a row starts on the line after the previous row ended.
        row_start = 2
        for record in reader:
            location = f"{path} line {row_start}"
            row_start = reader.line_num + 1
            if None in record:
                raise MalformedRowError(
                    f"{location}: the row has {len(reader.fieldnames or []) + len(record[None])} "
                    f"cells but the header has {len(reader.fieldnames or [])} "
                    f"({reader.fieldnames}). Quote cells that contain {delimiter!r}."
                )
            yield {key: value for key, value in record.items() if value is not None}, location


def _iter_file(path: Path) -> Iterator[tuple[Any, str]]:
    if not path.exists():
        raise DataFileNotFoundError(
            f"data file {str(path)!r} does not exist (looked for {path.resolve()}). Check the "
            "path and the working directory, or pass the rows as a list of dicts."
        )
    if not path.is_file():
        raise DataFileNotFoundError(
            f"data path {str(path)!r} is not a file. Name one data file "
            f"({', '.join(SUPPORTED_SUFFIXES)})."
        )
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _iter_jsonl(path)
    if suffix in CSV_DELIMITERS:
        return _iter_csv(path, CSV_DELIMITERS[suffix])
    if suffix == ".json":
        with path.open(encoding="utf-8-sig") as handle:
            is_array = handle.read(4096).lstrip().startswith("[")
        return _iter_json_array(path) if is_array else _iter_jsonl(path)
    raise UnsupportedSourceError(
        f"data file {str(path)!r} has extension {suffix or '(none)'!r}; lorakit reads "
        f"{', '.join(SUPPORTED_SUFFIXES)}. Rename the file or convert it to JSONL."
    )


def _is_hf_dataset(source: object) -> bool:
    """Whether ``source`` looks like a ``datasets.Dataset`` (checked without importing it)."""
    return hasattr(source, "column_names") and hasattr(source, "__len__")


def _iter_source(source: DataSource) -> tuple[Iterator[tuple[Any, str]], str, bool]:
    """Return (value, location) pairs, the source name, and whether values are CSV text cells."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        is_text_cells = path.suffix.lower() in CSV_DELIMITERS
        return _iter_file(path), str(path), is_text_cells
    if isinstance(source, Mapping):
        raise UnsupportedSourceError(
            f"got a single mapping with keys {sorted(source)}; pass a list of row dicts "
            "(e.g. [row]) or a file path."
        )
    if isinstance(source, bytes):
        raise UnsupportedSourceError("got bytes; pass a file path or a list of row dicts.")
    if _is_hf_dataset(source):
        name = f"{type(source).__name__} with columns {list(source.column_names)}"  # type: ignore[attr-defined]
        pairs = ((row, f"dataset row {index}") for index, row in enumerate(source))
        return pairs, name, False
    if isinstance(source, Iterable):
        pairs = ((row, f"list index {index}") for index, row in enumerate(source))
        return pairs, f"{type(source).__name__} of rows", False
    raise UnsupportedSourceError(
        f"cannot read data from a {type(source).__name__}; pass a path to a "
        f"{'/'.join(SUPPORTED_SUFFIXES)} file, a list of dicts, or a datasets.Dataset."
    )


def _rename_columns(row: Mapping[str, Any], column_map: Mapping[str, str] | None) -> dict[str, Any]:
    renamed = dict(row)
    for field, column in (column_map or {}).items():
        if column in renamed:
            renamed[field] = renamed.pop(column)
    return renamed


def read_dataset(
    source: DataSource,
    *,
    task: object = None,
    column_map: Mapping[str, str] | None = None,
) -> RawDataset:
    """Read and check every row of a data source.

    The first row's fields pick the row shape (see ``lorakit.train.shapes``); every row must then
    have that shape's fields with values of the right types.

    Args:
        source: A path to a ``.jsonl``/``.ndjson``/``.json``/``.csv``/``.tsv`` file, a list (or
            other iterable) of dicts, or a ``datasets.Dataset``.
        task: A PEFT task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``,
            ``"SEQ_2_SEQ_LM"`` or a ``TaskType`` member); ``None`` detects it from the first row.
        column_map: lorakit field name -> the name of your column holding it, e.g.
            ``{"text": "sentence"}``.

    Returns:
        The rows with their locations and shape.

    Raises:
        DataFileNotFoundError: The file does not exist.
        UnsupportedSourceError: An unknown file extension or source type.
        MalformedRowError: A line that is not a JSON object, or a value of the wrong type.
        MissingFieldError: A row lacks one of the shape's fields.
        UnknownRowShapeError: The first row matches no accepted shape (or not ``task``'s).
        EmptyDatasetError: The source holds no rows.
    """
    pairs, source_name, is_text_cells = _iter_source(source)
    rows: list[dict[str, Any]] = []
    locations: list[str] = []
    shape: RowShape | None = None
    for value, location in pairs:
        if not isinstance(value, Mapping):
            raise MalformedRowError(
                f"{location}: expected a row object with named fields, got a "
                f"{type(value).__name__} ({str(value)[:80]!r}). Pass rows, e.g. "
                "df.to_dict('records') for a pandas DataFrame or dataset['train'] for a "
                "DatasetDict."
            )
        row = _rename_columns(value, column_map)
        if shape is None:
            shape = detect_shape(row, location, task)
        rows.append(normalize_row(row, shape, location, is_text_cells=is_text_cells))
        locations.append(location)
    if shape is None:
        raise EmptyDatasetError(
            f"the data source {source_name!r} holds no rows. Point to a file with at least one "
            "row (blank lines are skipped)."
        )
    return RawDataset(rows, locations, source_name, shape)
