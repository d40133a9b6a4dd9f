"""Metrics against hand computations (float64) and scikit-learn as an oracle."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.train.metrics import accuracy, macro_f1, perplexity

LABELS = [0, 0, 1, 1, 2, 2]
PREDICTIONS = [0, 1, 1, 1, 2, 0]
# By hand, F1 = 2TP / (2TP + FP + FN):
#   class 0: TP 1 (index 0), FP 1 (index 5), FN 1 (index 1) -> 2/4
#   class 1: TP 2 (indices 2, 3), FP 1 (index 1), FN 0      -> 4/5
#   class 2: TP 1 (index 4), FP 0, FN 1 (index 5)           -> 2/3
HAND_MACRO_F1 = (2 / 4 + 4 / 5 + 2 / 3) / 3
HAND_ACCURACY = 4 / 6
EXACT = 1e-12  # float64 arithmetic on a handful of counts


def test_perplexity_is_exp_of_loss() -> None:
    assert perplexity(math.log(12.5)) == pytest.approx(12.5, rel=EXACT)
    assert perplexity(torch.tensor(0.0)) == 1.0
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError, match=r"loss >= 0, got nan.*every label -100"):
        perplexity(float("nan"))


def test_accuracy_and_macro_f1_by_hand() -> None:
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(HAND_ACCURACY, abs=EXACT)
    assert macro_f1(PREDICTIONS, LABELS) == pytest.approx(HAND_MACRO_F1, abs=EXACT)


def test_macro_f1_matches_sklearn_on_random_data() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    generator = torch.Generator().manual_seed(0)
    for num_classes in (2, 3, 7):
        labels = torch.randint(num_classes, (200,), generator=generator)
        predictions = torch.randint(num_classes, (200,), generator=generator)
        predictions[:5] = num_classes  # a class only ever predicted
        expected = metrics.f1_score(labels.numpy(), predictions.numpy(), average="macro")
        assert macro_f1(predictions, labels) == pytest.approx(expected, abs=EXACT)
        assert accuracy(predictions, labels) == pytest.approx(
            metrics.accuracy_score(labels.numpy(), predictions.numpy()), abs=EXACT
        )


def test_logits_are_argmaxed_and_ignored_positions_dropped() -> None:
    # (batch 2, length 3, classes 3) token-classification logits; -100 marks padding.
    labels = torch.tensor([[0, 2, -100], [1, -100, -100]])
    logits = torch.zeros(2, 3, 3)
    logits[0, 0, 0] = logits[0, 1, 1] = logits[1, 0, 1] = 5.0
    logits[0, 2, 2] = logits[1, 1, 0] = logits[1, 2, 0] = 5.0  # padding: must not count
    # kept: (pred 0, label 0), (pred 1, label 2), (pred 1, label 1)
    assert accuracy(logits, labels) == pytest.approx(2 / 3, abs=EXACT)
    # class 0: F1 1; class 1: TP 1 FP 1 -> 2/3; class 2: FN 1 -> 0
    assert macro_f1(logits, labels) == pytest.approx((1 + 2 / 3 + 0) / 3, abs=EXACT)


def test_metric_errors() -> None:
    with pytest.raises(ValueError, match=r"shape \(2,\) do not match labels of shape \(3,\)"):
        accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="every label equals ignore_index=-100"):
        macro_f1([0, 1], [-100, -100])
