"""Dynamic padding: pad ids, attention masks and -100 labels, checked element by element."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lorakit.train.collate import DataCollator, resolve_pad_token_id
from lorakit.train.data_errors import TokenizerCapabilityError

PAD = 7
CAUSAL_FEATURES = [
    {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
    {"input_ids": [4], "labels": [4]},
]


def test_right_padding_to_longest_in_batch() -> None:
    batch = DataCollator(PAD)(CAUSAL_FEATURES)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert {tensor.dtype for tensor in batch.values()} == {torch.long}


def test_left_padding_and_multiple_of() -> None:
    batch = DataCollator(PAD, padding_side="left", pad_to_multiple_of=4)(CAUSAL_FEATURES)
    assert batch["input_ids"].tolist() == [[PAD, 1, 2, 3], [PAD, PAD, PAD, 4]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 2, 3], [-100, -100, -100, 4]]


def test_class_labels_stay_one_per_row() -> None:
    batch = DataCollator(0)([{"input_ids": [5, 6], "labels": 1}, {"input_ids": [5], "labels": 0}])
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].tolist() == [[5, 6], [5, 0]]


def test_seq2seq_labels_pad_to_longest_target() -> None:
    features = [{"input_ids": [1], "labels": [9, 9, 9]}, {"input_ids": [1, 2], "labels": [8]}]
    batch = DataCollator(0)(features)
    assert batch["input_ids"].tolist() == [[1, 0], [1, 2]]
    assert batch["labels"].tolist() == [[9, 9, 9], [8, -100, -100]]


def test_features_without_labels() -> None:
    batch = DataCollator(0)([{"input_ids": [3]}])
    assert sorted(batch) == ["attention_mask", "input_ids"]


class Tok:
    def __init__(self, pad: int | None, eos: int | None) -> None:
        self.pad_token_id, self.eos_token_id = pad, eos


def test_pad_id_falls_back_to_eos(causal_tokenizer: Any) -> None:
    assert causal_tokenizer.pad_token_id is None
    assert resolve_pad_token_id(causal_tokenizer) == causal_tokenizer.eos_token_id
    assert resolve_pad_token_id(Tok(3, 9)) == 3
    with pytest.raises(
        TokenizerCapabilityError, match=r"Tok has no pad token and no EOS.*pad_token ="
    ):
        resolve_pad_token_id(Tok(None, None))


def test_bad_options_and_empty_batch() -> None:
    with pytest.raises(ValueError, match="padding_side must be 'right' or 'left', got 'up'"):
        DataCollator(0, padding_side="up")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pad_to_multiple_of must be >= 1, got 0"):
        DataCollator(0, pad_to_multiple_of=0)
    with pytest.raises(ValueError, match="empty batch"):
        DataCollator(0)([])
