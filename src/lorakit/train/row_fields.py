"""Checking and normalising the fields of one row.

Each field has one checker in ``FIELD_CHECKERS``. CSV cells are text, so for CSV rows list
fields are parsed from a JSON list (``["a", "b"]``) or whitespace-separated words, and
integer-looking labels become ints (so ``1`` in a CSV and ``1`` in a JSONL file are one label).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from lorakit.train.data_errors import MalformedRowError, MissingFieldError
from lorakit.train.shapes import RowShape

Label = int | str
INTEGER_PATTERN = re.compile(r"[+-]?\d+")


def _type_name(value: object) -> str:
    return f"{type(value).__name__} {str(value)[:60]!r}"


def _check_text(value: Any, field: str, location: str, is_text_cell: bool) -> str:
    if not isinstance(value, str):
        raise MalformedRowError(
            f"{location}: field {field!r} must be a string, got {_type_name(value)}."
        )
    return value


def _check_label(value: Any, field: str, location: str, is_text_cell: bool) -> Label:
    if is_text_cell and isinstance(value, str) and INTEGER_PATTERN.fullmatch(value.strip()):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MalformedRowError(
            f"{location}: field {field!r} must be a class name (string) or a class id (int), "
            f"got {_type_name(value)}. Regression targets are not supported."
        )
    return value


def _parse_list_cell(value: str, field: str, location: str) -> list[Any]:
    text = value.strip()
    if not text.startswith("["):
        return text.split()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as error:
        raise MalformedRowError(
            f"{location}: field {field!r} starts with '[' but is not a valid JSON list "
            f"({error.msg}). Write a JSON list or whitespace-separated words."
        ) from error
    if not isinstance(parsed, list):
        raise MalformedRowError(f"{location}: field {field!r} must be a list.")
    return parsed


def _check_tokens(value: Any, field: str, location: str, is_text_cell: bool) -> list[str]:
    items = _parse_list_cell(value, field, location) if is_text_cell else value
    if not isinstance(items, list | tuple) or not all(isinstance(item, str) for item in items):
        raise MalformedRowError(
            f"{location}: field {field!r} must be a list of strings (words), got "
            f"{_type_name(items)}."
        )
    if not items:
        raise MalformedRowError(f"{location}: field {field!r} is an empty list; give >= 1 word.")
    return list(items)


def _check_tags(value: Any, field: str, location: str, is_text_cell: bool) -> list[Label]:
    items = _parse_list_cell(value, field, location) if is_text_cell else value
    if not isinstance(items, list | tuple):
        raise MalformedRowError(
            f"{location}: field {field!r} must be a list of tags, got {_type_name(items)}."
        )
    return [_check_label(item, field, location, is_text_cell) for item in items]


def _check_messages(
    value: Any, field: str, location: str, is_text_cell: bool
) -> list[dict[str, str]]:
    if is_text_cell and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise MalformedRowError(
                f"{location}: field {field!r} must hold a JSON list of messages in a CSV "
                f"cell ({error.msg})."
            ) from error
    example = '[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]'
    if not isinstance(value, list | tuple) or not value:
        raise MalformedRowError(
            f"{location}: field {field!r} must be a non-empty list of messages like {example}, "
            f"got {_type_name(value)}."
        )
    messages = []
    for index, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise MalformedRowError(
                f"{location}: message {index} must be an object with string 'role' and "
                f"'content', got {_type_name(message)}."
            )
        messages.append(dict(message))
    if not any(message["role"] == "assistant" for message in messages):
        roles = [message["role"] for message in messages]
        raise MalformedRowError(
            f"{location}: the conversation has no 'assistant' message (roles: {roles}), so "
            "there is nothing to train on. Add the assistant's reply."
        )
    return messages


FieldChecker = Callable[[Any, str, str, bool], Any]
FIELD_CHECKERS: dict[str, FieldChecker] = {
    "text": _check_text,
    "prompt": _check_text,
    "completion": _check_text,
    "source": _check_text,
    "target": _check_text,
    "label": _check_label,
    "tokens": _check_tokens,
    "tags": _check_tags,
    "messages": _check_messages,
}


def normalize_row(
    row: Mapping[str, Any], shape: RowShape, location: str, *, is_text_cells: bool
) -> dict[str, Any]:
    """Return a new row holding ``shape``'s fields, checked and normalised.

    Args:
        row: The row as read (after column mapping).
        shape: The dataset's row shape.
        location: Where the row came from, for messages.
        is_text_cells: Whether values are CSV text cells (lists and ints are parsed from text).

    Raises:
        MissingFieldError: A field of the shape is absent (or ``None``).
        MalformedRowError: A value of the wrong type, or tokens and tags of unequal length.
    """
    missing = [field for field in shape.fields if row.get(field) is None]
    if missing:
        raise MissingFieldError(
            f"{location}: the row has no {', '.join(repr(f) for f in missing)} (its fields: "
            f"{sorted(row)}); every row of this {'+'.join(shape.fields)} ({shape.task}) "
            f"dataset needs {list(shape.fields)}. Add the field, or map your column with "
            f"column_map={{{missing[0]!r}: 'your_column'}}."
        )
    normalized = {
        field: FIELD_CHECKERS[field](row[field], field, location, is_text_cells)
        for field in shape.fields
    }
    if shape.name == "tokens_tags" and len(normalized["tokens"]) != len(normalized["tags"]):
        raise MalformedRowError(
            f"{location}: {len(normalized['tokens'])} tokens but {len(normalized['tags'])} "
            "tags; token classification needs exactly one tag per word."
        )
    return normalized
