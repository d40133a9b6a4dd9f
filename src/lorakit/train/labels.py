"""Label <-> id maps for classification, built from the training data only.

Ids follow sorted order: integer labels sort numerically (so labels 0..K-1 keep their values as
ids) and string labels alphabetically, which makes the map independent of row order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from lorakit.train.data_errors import LabelTypeError, UnseenLabelError
from lorakit.train.reading import RawDataset
from lorakit.train.row_fields import Label

LABEL_FIELD_BY_SHAPE = {"text_label": "label", "tokens_tags": "tags"}
MAX_LISTED = 20


def dataset_labels(dataset: RawDataset) -> list[tuple[Label, str]]:
    """Every (label, location) in a classification dataset; empty for other shapes."""
    field = LABEL_FIELD_BY_SHAPE.get(dataset.shape.name)
    if field is None:
        return []
    pairs: list[tuple[Label, str]] = []
    for row, location in zip(dataset.rows, dataset.locations, strict=True):
        values = row[field] if field == "tags" else [row[field]]
        pairs.extend((value, location) for value in values)
    return pairs


def build_label_map(labels: Iterable[Label]) -> dict[Label, int]:
    """Map each distinct label to an id, in sorted order.

    Args:
        labels: Labels as they appear in the training data (strings or ints).

    Returns:
        ``{label: id}`` with ids ``0..K-1``.

    Raises:
        LabelTypeError: Labels mix ints and strings.
    """
    distinct = set(labels)
    kinds = {type(label) for label in distinct}
    if len(kinds) > 1:
        examples = sorted(repr(label) for label in distinct)[:MAX_LISTED]
        raise LabelTypeError(
            f"labels mix integers and strings ({', '.join(examples)}); use one kind, e.g. all "
            "class names or all class ids."
        )
    return {label: index for index, label in enumerate(sorted(distinct))}


def invert_label_map(label_to_id: Mapping[Label, int]) -> dict[int, Label]:
    """Return ``{id: label}`` (what ``transformers`` configs call ``id2label``)."""
    return {index: label for label, index in label_to_id.items()}


def check_labels_known(
    pairs: Iterable[tuple[Label, str]], label_to_id: Mapping[Label, int], source_name: str
) -> None:
    """Raise if any label is missing from ``label_to_id``.

    Args:
        pairs: (label, location) pairs of the data being checked (usually evaluation data).
        label_to_id: The map built from the training data.
        source_name: Name of the checked data for the message.

    Raises:
        UnseenLabelError: Lists every unseen label with where it first occurs.
    """
    first_seen: dict[Label, str] = {}
    for label, location in pairs:
        if label not in label_to_id and label not in first_seen:
            first_seen[label] = location
    if not first_seen:
        return
    unseen = sorted(first_seen.items(), key=lambda item: repr(item[0]))
    listed = ", ".join(
        f"{label!r} (first at {location})" for label, location in unseen[:MAX_LISTED]
    )
    more = f" and {len(unseen) - MAX_LISTED} more" if len(unseen) > MAX_LISTED else ""
    known = ", ".join(repr(label) for label in list(label_to_id)[:MAX_LISTED])
    raise UnseenLabelError(
        f"{source_name} has {len(unseen)} label(s) never seen in the training data: "
        f"{listed}{more}. Training labels: {known}. Add training examples of these labels, "
        "or remove those rows from the evaluation data."
    )
