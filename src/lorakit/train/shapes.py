"""The row shapes lorakit accepts, the task each one trains, and how a shape is chosen.

A shape is a set of field names; the first row's keys (or an explicit task) pick the shape, and
every later row must have the same fields. Tasks are named by PEFT's ``TaskType`` values, so a
``peft.TaskType`` member, a lorakit one or a plain string all work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lorakit.train.data_errors import UnknownRowShapeError

TaskName = Literal["CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM"]
RowShapeName = Literal[
    "chat", "prompt_completion", "tokens_tags", "source_target", "text_label", "text"
]

SUPPORTED_TASKS: tuple[TaskName, ...] = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS", "SEQ_2_SEQ_LM")


@dataclass(frozen=True)
class RowShape:
    """One accepted row shape.

    Attributes:
        name: Short identifier used in code and docs.
        task: The PEFT task type this shape trains.
        fields: Field names every row must have.
        example: A one-line JSONL example shown in error messages.
    """

    name: RowShapeName
    task: TaskName
    fields: tuple[str, ...]
    example: str


# Detection order matters: a row with "text" and "label" is classification, not plain text, and
# "messages" wins over anything else a chat row may carry.
ROW_SHAPES: tuple[RowShape, ...] = (
    RowShape(
        "chat",
        "CAUSAL_LM",
        ("messages",),
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}',
    ),
    RowShape(
        "prompt_completion",
        "CAUSAL_LM",
        ("prompt", "completion"),
        '{"prompt": "2+2=", "completion": " 4"}',
    ),
    RowShape(
        "tokens_tags",
        "TOKEN_CLS",
        ("tokens", "tags"),
        '{"tokens": ["Paris", "is", "big"], "tags": ["B-LOC", "O", "O"]}',
    ),
    RowShape(
        "source_target",
        "SEQ_2_SEQ_LM",
        ("source", "target"),
        '{"source": "Guten Tag", "target": "Good day"}',
    ),
    RowShape("text_label", "SEQ_CLS", ("text", "label"), '{"text": "great film", "label": "pos"}'),
    RowShape("text", "CAUSAL_LM", ("text",), '{"text": "Once upon a time"}'),
)


def normalize_task(task: object) -> TaskName:
    """Return the task name for a ``TaskType`` member or string.

    Raises:
        UnknownRowShapeError: ``task`` is not one of the data tasks lorakit reads.
    """
    value = getattr(task, "value", task)
    if value not in SUPPORTED_TASKS:
        raise UnknownRowShapeError(
            f"task {task!r} is not a task lorakit can prepare data for; use one of "
            f"{', '.join(SUPPORTED_TASKS)} (PEFT TaskType values), or leave task=None to detect "
            "it from the first row's fields."
        )
    return value  # a member of SUPPORTED_TASKS, checked above


def _describe_shapes(shapes: tuple[RowShape, ...]) -> str:
    return "; ".join(f"{'+'.join(shape.fields)} ({shape.task})" for shape in shapes)


def detect_shape(first_row: Mapping[str, Any], location: str, task: object = None) -> RowShape:
    """Pick the row shape from the first row's keys, restricted to ``task`` when given.

    Args:
        first_row: The dataset's first row (after any column mapping).
        location: Where that row came from, for the error message.
        task: A PEFT task type (member or string), or ``None`` to accept any shape.

    Raises:
        UnknownRowShapeError: No shape (of the requested task) matches the row's fields.
    """
    task_name = None if task is None else normalize_task(task)
    candidates = tuple(s for s in ROW_SHAPES if task_name is None or s.task == task_name)
    for shape in candidates:
        if all(field in first_row for field in shape.fields):
            return shape
    wanted = f"task {task_name}" if task_name else "lorakit"
    examples = "\n  ".join(shape.example for shape in candidates)
    raise UnknownRowShapeError(
        f"{location}: the row has fields {sorted(first_row)}, which match no row shape that "
        f"{wanted} accepts. Accepted field sets: {_describe_shapes(candidates)}. Rename your "
        f"columns (or pass column_map={{'text': 'your_column', ...}}); examples:\n  {examples}"
    )
