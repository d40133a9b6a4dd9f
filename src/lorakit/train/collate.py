"""Padding a list of features into one batch of tensors.

Dynamic padding: each batch is padded to its own longest sequence (optionally rounded up to a
multiple, which helps tensor cores), not to ``max_length``. Padded input positions hold the pad
id and attention mask 0; padded label positions hold -100 so they carry no loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lorakit.train.data_errors import TokenizerCapabilityError
from lorakit.train.tokenizing import IGNORE_INDEX

PaddingSide = Literal["right", "left"]


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id (GPT-2 style tokenizers have no pad token).

    The value at padded positions never reaches the loss (mask 0, label -100), so EOS is safe.

    Raises:
        TokenizerCapabilityError: The tokenizer has neither a pad nor an EOS token.
    """
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if value is not None:
            return int(value)
    raise TokenizerCapabilityError(
        f"{type(tokenizer).__name__} has no pad token and no EOS token to pad batches with. "
        "Set one, e.g. tokenizer.pad_token = tokenizer.unk_token."
    )


def _pad(
    sequences: Sequence[Sequence[int]], length: int, value: int, side: PaddingSide
) -> torch.Tensor:
    out = torch.full((len(sequences), length), value, dtype=torch.long)  # (batch, length)
    for row, sequence in enumerate(sequences):
        if not sequence:
            continue
        values = torch.as_tensor(sequence, dtype=torch.long)
        if side == "right":
            out[row, : len(sequence)] = values
        else:
            out[row, length - len(sequence) :] = values
    return out


@dataclass(frozen=True)
class DataCollator:
    """Pads features from ``encode_dataset`` into a batch.

    Attributes:
        pad_token_id: Id written at padded input positions.
        padding_side: ``"right"`` for training; ``"left"`` for batched generation.
        pad_to_multiple_of: Round the padded length up to a multiple of this (``None``: no).
        label_pad_id: Label at padded positions (-100: no loss).
    """

    pad_token_id: int
    padding_side: PaddingSide = "right"
    pad_to_multiple_of: int | None = None
    label_pad_id: int = IGNORE_INDEX

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, **options: Any) -> DataCollator:
        """A collator padding with the tokenizer's pad (or EOS) id."""
        return cls(resolve_pad_token_id(tokenizer), **options)

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {self.padding_side!r}.")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {self.pad_to_multiple_of}.")

    def _padded_length(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of or 1
        return -(-longest // multiple) * multiple

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """Return ``input_ids`` and ``attention_mask`` of shape (batch, length) and ``labels``.

        ``labels`` is (batch,) for sequence classification (int labels), else (batch, length).
        A seq2seq batch pads its labels to their own longest target, not to the inputs.
        """
        if not features:
            raise ValueError("cannot collate an empty batch; the sampler yielded no indices.")
        input_ids = [feature["input_ids"] for feature in features]
        length = self._padded_length(max(len(ids) for ids in input_ids))
        batch = {
            "input_ids": _pad(input_ids, length, self.pad_token_id, self.padding_side),
            "attention_mask": _pad(
                [[1] * len(ids) for ids in input_ids], length, 0, self.padding_side
            ),
        }
        if "labels" not in features[0]:
            return batch
        labels = [feature["labels"] for feature in features]
        if isinstance(labels[0], int):
            batch["labels"] = torch.tensor(labels, dtype=torch.long)
            return batch
        # Causal LM labels are as long as their inputs, so this equals ``length`` for them.
        label_length = self._padded_length(max(len(row_labels) for row_labels in labels))
        batch["labels"] = _pad(labels, label_length, self.label_pad_id, self.padding_side)
        return batch
