"""Evaluation: mean loss and the task's metrics over a whole dataset.

Loss is averaged over label items (tokens for language modelling and token classification,
examples for sequence classification), so the result does not depend on the batch size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .metrics import accuracy, macro_f1, perplexity
from .shapes import TaskName
from .tokenizing import IGNORE_INDEX

CLASSIFICATION_TASKS: tuple[str, ...] = ("SEQ_CLS", "TOKEN_CLS")


def label_count(batch: dict[str, torch.Tensor], task: TaskName) -> int:
    """How many label items the model's mean loss of ``batch`` averages over.

    Causal LM models shift labels by one inside the loss, so the first position never counts.
    """
    labels = batch["labels"]
    if task == "SEQ_CLS":
        return int(labels.shape[0])
    if task == "CAUSAL_LM":
        labels = labels[:, 1:]
    return int((labels != IGNORE_INDEX).sum())


def autocast_context(
    device: torch.device, precision: str
) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` to bf16 for ``precision="bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def main_metric(task: TaskName) -> tuple[str, bool]:
    """(name of the metric that picks the best evaluation, whether higher is better)."""
    return ("eval_accuracy", True) if task in CLASSIFICATION_TASKS else ("eval_loss", False)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    task: TaskName,
    device: torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Run ``model`` in eval mode over ``batches``; restore its train/eval mode after.

    Returns:
        ``eval_loss`` and ``eval_perplexity`` for language modelling tasks; ``eval_loss``,
        ``eval_accuracy`` and ``eval_macro_f1`` for classification.
    """
    was_training = model.training
    model.eval()
    total_loss = 0.0
    total_count = 0
    predictions: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for batch in batches:
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast_context(device, precision):
                output = model(**batch)
            count = label_count(batch, task)
            total_loss += float(output.loss) * count
            total_count += count
            if task in CLASSIFICATION_TASKS:
                predictions.append(output.logits.argmax(dim=-1).flatten().cpu())
                labels.append(batch["labels"].flatten().cpu())
    finally:
        model.train(was_training)
    if total_count == 0:
        raise ValueError("evaluation data has no label to score; check the evaluation rows.")
    loss = total_loss / total_count
    if task not in CLASSIFICATION_TASKS:
        return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
    predicted, expected = torch.cat(predictions), torch.cat(labels)
    return {
        "eval_loss": loss,
        "eval_accuracy": accuracy(predicted, expected),
        "eval_macro_f1": macro_f1(predicted, expected),
    }
