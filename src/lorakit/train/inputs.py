"""The trainer's data inputs: already tokenised datasets, or sources to read and tokenise."""

from __future__ import annotations

from typing import Any

from .data import TokenizedDataset, prepare_datasets
from .data_errors import EmptyDatasetError
from .tokenizing import Tokenizer


def resolve_datasets(
    train_data: Any,
    eval_data: Any,
    tokenizer: Tokenizer,
    *,
    task: object = None,
    max_length: int = 512,
) -> tuple[TokenizedDataset, TokenizedDataset | None]:
    """Return tokenised training and evaluation datasets.

    Args:
        train_data: A ``TokenizedDataset``, or any source ``prepare_datasets`` reads.
        eval_data: The same forms (a ``TokenizedDataset`` when ``train_data`` is one), or
            ``None``.
        tokenizer: Tokenises sources.
        task: PEFT task type of sources; ``None`` detects it from the first row.
        max_length: Truncation length for sources.

    Raises:
        EmptyDatasetError: A dataset without rows.
        TypeError: A tokenised training set with an untokenised evaluation source.
        DataError: Any problem ``prepare_datasets`` finds in the rows.
    """
    if isinstance(train_data, TokenizedDataset):
        if eval_data is not None and not isinstance(eval_data, TokenizedDataset):
            raise TypeError(
                "train_data is a TokenizedDataset, so eval_data must be one too (or None); "
                f"got {type(eval_data).__name__}. Tokenise both with prepare_datasets."
            )
        train, evaluation = train_data, eval_data
    else:
        train, evaluation = prepare_datasets(
            train_data, tokenizer, eval_data, task=task, max_length=max_length
        )
    for name, dataset in (("training", train), ("evaluation", evaluation)):
        if dataset is not None and len(dataset) == 0:
            raise EmptyDatasetError(
                f"the {name} data ({dataset.source_name}) has no rows; give it at least one row."
            )
    return train, evaluation
