"""Evaluation metrics as pure functions of tensors or lists.

Predictions may be class ids or logits/scores (one more trailing dimension than the labels,
reduced with argmax). Positions whose label is ``ignore_index`` (-100, as in the collator) are
left out, so token classification can pass its padded (batch, length) tensors directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.train.tokenizing import IGNORE_INDEX

ArrayLike = torch.Tensor | Sequence[Any]


def perplexity(loss: float | torch.Tensor) -> float:
    """``exp(loss)`` for a mean per-token cross-entropy loss in nats; ``inf`` on overflow.

    Raises:
        ValueError: ``loss`` is NaN or negative (no cross-entropy is).
    """
    value = float(loss)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"perplexity needs a mean cross-entropy loss >= 0, got {value}; check the loss "
            "(a NaN loss often means a batch with every label -100)."
        )
    return math.exp(value) if value < math.log(torch.finfo(torch.float64).max) else math.inf


def _flatten(
    predictions: ArrayLike, labels: ArrayLike, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (predicted ids, label ids) as flat 1-D tensors without ignored positions."""
    label_tensor = torch.as_tensor(labels)
    prediction_tensor = torch.as_tensor(predictions)
    if prediction_tensor.dim() == label_tensor.dim() + 1:
        prediction_tensor = prediction_tensor.argmax(dim=-1)  # scores (..., classes) -> ids (...)
    if prediction_tensor.shape != label_tensor.shape:
        raise ValueError(
            f"predictions of shape {tuple(prediction_tensor.shape)} do not match labels of shape "
            f"{tuple(label_tensor.shape)}; pass class ids of the labels' shape, or scores with "
            "one extra trailing class dimension."
        )
    keep = label_tensor != ignore_index
    kept_labels = label_tensor[keep].long()
    if kept_labels.numel() == 0:
        raise ValueError(
            f"no labels left to score: every label equals ignore_index={ignore_index}."
        )
    return prediction_tensor[keep].long(), kept_labels


def accuracy(
    predictions: ArrayLike, labels: ArrayLike, *, ignore_index: int = IGNORE_INDEX
) -> float:
    """Fraction of (non-ignored) positions where the predicted class equals the label."""
    predicted, expected = _flatten(predictions, labels, ignore_index)
    return float((predicted == expected).double().mean())


def macro_f1(
    predictions: ArrayLike, labels: ArrayLike, *, ignore_index: int = IGNORE_INDEX
) -> float:
    """Unweighted mean over classes of F1 = 2·TP / (2·TP + FP + FN).

    The classes are those occurring in the labels or the predictions (scikit-learn's default), so
    every class has a non-zero denominator.
    """
    predicted, expected = _flatten(predictions, labels, ignore_index)
    classes = torch.unique(torch.cat([predicted, expected]))
    # (classes, positions) boolean masks
    is_predicted = predicted.unsqueeze(0) == classes.unsqueeze(1)
    is_expected = expected.unsqueeze(0) == classes.unsqueeze(1)
    true_positives = (is_predicted & is_expected).sum(dim=1).double()
    false_positives = (is_predicted & ~is_expected).sum(dim=1).double()
    false_negatives = (~is_predicted & is_expected).sum(dim=1).double()
    scores = 2 * true_positives / (2 * true_positives + false_positives + false_negatives)
    return float(scores.mean())
