"""The demo: LoRA vs full fine-tuning of the real all-MiniLM-L6-v2 on human-rated sentiment.

Data: the VADER lexicon's words labelled negative/positive by ten human raters each
(`demo_data.load_vader_sentiment`). The same seeded model, data and batches serve both runs.
"""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig, TaskType
from ..model import get_peft_model
from .data import TokenizedDataset, make_loader, prepare_datasets
from .demo_data import load_vader_sentiment


@dataclass
class RunResult:
    name: str
    accuracy: float
    trainable: int
    total: int
    seconds: float
    peak_mib: float
    losses: list[float] = field(default_factory=list)


@contextmanager
def peak_rss_above_start() -> Iterator[list[float]]:
    """Yield a one-item list that ends up holding the peak RSS (MiB) above the starting RSS."""
    result = [0.0]
    start = _rss_mib()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        done.set()
        sampler.join()
        result[0] = max(peak[0], _rss_mib()) - start


def _rss_mib() -> float:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def accuracy(model: nn.Module, dataset: TokenizedDataset, tokenizer: Any) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in make_loader(dataset, tokenizer, batch_size=256, shuffle=False):
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(dataset)


def fit(
    model: nn.Module, train: TokenizedDataset, tokenizer: Any, lr: float, epochs: int, seed: int
) -> list[float]:
    """AdamW with a linear decay on the trainable parameters; returns the per-step losses."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.01)
    loader = make_loader(train, tokenizer, batch_size=32, seed=seed)
    total_steps = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    losses = []
    model.train()
    for _ in range(epochs):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return losses


def measured_run(
    name: str, build: Callable[[], nn.Module], train: Callable[[nn.Module], list[float]]
) -> tuple[nn.Module, RunResult]:
    """Build and train a model, measuring time and peak memory above the starting RSS."""
    with peak_rss_above_start() as peak:
        start = time.perf_counter()
        model = build()
        losses = train(model)
        seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, RunResult(name, 0.0, trainable, total, seconds, peak[0], losses)


def run(
    model_dir: Path,
    output_dir: Path,
    epochs: int = 2,
    max_train_rows: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train LoRA and full fine-tuning; save, merge and check the adapter; write the plot."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # The new classification head is expected to be missing from the checkpoint: no report.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    split = load_vader_sentiment()
    rows = split.train[:max_train_rows] if max_train_rows else split.train
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = prepare_datasets(rows, tokenizer, split.test, max_length=16)
    assert test is not None

    def base() -> nn.Module:
        torch.manual_seed(seed)
        model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=2
        )
        return model

    before = accuracy(base(), test, tokenizer)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
    )
    lora_model, lora = measured_run(
        "LoRA r=16 all-linear",
        lambda: get_peft_model(base(), lora_config),
        lambda m: fit(m, train, tokenizer, lr=1e-3, epochs=epochs, seed=seed),
    )
    lora.accuracy = accuracy(lora_model, test, tokenizer)
    merge_error = save_and_merge(lora_model, test, tokenizer, output_dir / "adapter")
    full_model, full = measured_run(
        "full fine-tuning",
        base,
        lambda m: fit(m, train, tokenizer, lr=5e-5, epochs=epochs, seed=seed),
    )
    full.accuracy = accuracy(full_model, test, tokenizer)
    plot_losses([lora, full], output_dir / "loss.png")
    return {"before": before, "lora": lora, "full": full, "merge_error": merge_error}


def save_and_merge(model: Any, test: TokenizedDataset, tokenizer: Any, folder: Path) -> float:
    """Save the adapter, merge it, and return the largest logit change merging caused."""
    model.save_pretrained(folder)
    model.eval()
    batch = next(iter(make_loader(test, tokenizer, batch_size=256, shuffle=False)))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    return float((merged - unmerged).abs().max())


def plot_losses(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(7, 4))
    for result in results:
        windows = [result.losses[max(0, i - 9) : i + 1] for i in range(len(result.losses))]
        smooth = [sum(window) / len(window) for window in windows]
        axes.plot(smooth, label=f"{result.name} (test acc {100 * result.accuracy:.1f}%)")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("training loss (10-step mean)")
    axes.set_title("all-MiniLM-L6-v2 on VADER sentiment words")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
