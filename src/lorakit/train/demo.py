"""The demo: LoRA vs full fine-tuning of the real all-MiniLM-L6-v2 on human-rated sentiment.

Data: the VADER lexicon's words labelled negative/positive by ten human raters each
(`demo_data.load_vader_sentiment`). Both runs go through lorakit's own ``Trainer`` (what
``lorakit train`` runs), on the same seeded model, data and batches, each in its own folder of
the output folder (``lora/``, ``full/``) with its ``metrics.jsonl``, plot and summary. Before
each phase the demo says, through the ``lorakit.demo`` logger, what it does and how long it
should take; a training run's time is restated once its first steps are measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig, TaskType
from ..extras import import_optional
from ..io.atomic import write_file
from ..model import get_peft_model
from .config import TrainConfig
from .data import TokenizedDataset, make_loader, prepare_datasets
from .demo_data import load_vader_sentiment
from .demo_timing import PACE_STEPS, StepClock, peak_rss_above_start
from .evaluation import evaluate
from .reporting import format_seconds
from .trainer import Trainer

logger = logging.getLogger("lorakit.demo")

BATCH_SIZE = 32
MAX_LENGTH = 16  # tokens; the longest demo word takes 9 with [CLS] and [SEP]: none is cut
LOGGING_STEPS = 10
MERGE_BATCH_ROWS = 256  # test rows whose logits the merge check compares
ADAPTER_FILE = "adapter_model.safetensors"
MODEL_FILE = "model.safetensors"
LORA_FOLDER = "lora"
FULL_FOLDER = "full"
PLOT_FILE = "loss.png"


@dataclass(frozen=True)
class RunSpec:
    """One of the demo's two runs.

    Attributes:
        name: Shown in the table and the plot.
        folder: Its sub-folder of the output folder.
        learning_rate: Peak AdamW learning rate (linear decay to 0, weight decay 0.01).
        reference_seconds_per_step: Pace on an idle 2-core machine, measured over
            the demo's 286 steps (2 epochs of 4,558 words in batches of 32): LoRA 51 s, full
            fine-tuning 63 s, model building and evaluation included (`/usr/bin/time lorakit
            demo` on 2 idle cores, benchmarks/RESULTS.md).
    """

    name: str
    folder: str
    learning_rate: float
    reference_seconds_per_step: float


LORA_RUN = RunSpec("LoRA r=16 all-linear", LORA_FOLDER, 1e-3, 51 / 286)
FULL_RUN = RunSpec("full fine-tuning", FULL_FOLDER, 5e-5, 63 / 286)


@dataclass
class RunResult:
    """What one run measured and saved."""

    name: str
    accuracy: float
    trainable: int
    total: int
    seconds: float
    seconds_per_step: float
    steps: int
    peak_mib: float
    saved_file: Path
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def saved_bytes(self) -> int:
        return self.saved_file.stat().st_size


@dataclass
class DemoReport:
    """The demo's results: accuracy before training, both runs, the merge check."""

    before: float
    lora: RunResult
    full: RunResult
    merge_error: float
    plot: Path


@dataclass(frozen=True)
class DemoData:
    """The tokenised splits, the tokenizer and the run length they give."""

    tokenizer: Any
    train: TokenizedDataset
    test: TokenizedDataset
    epochs: int
    steps: int
    steps_per_epoch: int

    @property
    def evaluations(self) -> int:
        """The trainer evaluates at the end of each epoch."""
        return self.epochs


def run(
    model_dir: Path,
    output_dir: Path,
    epochs: int = 2,
    max_train_rows: int | None = None,
    seed: int = 0,
) -> DemoReport:
    """Measure the untrained model, train LoRA and fully, check the merge, plot both losses."""
    data = load_data(model_dir, epochs, max_train_rows)

    def base() -> nn.Module:
        return _classifier(model_dir, data.train, seed)

    logger.info(
        "[2/6] Test accuracy of the untrained classifier, %d words (a few s)", len(data.test)
    )
    untrained = base()
    started = time.perf_counter()
    before = _accuracy(untrained, data)
    eval_seconds = time.perf_counter() - started  # the runs' estimates use it
    del untrained
    logger.info("      %.1f%% (two balanced classes: chance is 50%%)", 100 * before)
    lora_config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=16,
        lora_alpha=32,
        lora_dropout=0.05,
        target_modules="all-linear",
    )
    lora_model, lora = _train_run(
        3,
        LORA_RUN,
        lambda: get_peft_model(base(), lora_config),
        data,
        output_dir,
        seed,
        eval_seconds,
    )
    logger.info(
        "[4/6] Merging the adapter into the base (merge_and_unload), comparing logits (about 1 s)"
    )
    merge_error = merge_error_of(lora_model, data)
    del lora_model
    _, full = _train_run(5, FULL_RUN, base, data, output_dir, seed, eval_seconds)
    logger.info("[6/6] Plotting both training losses (a few s)")
    plot = plot_losses([lora, full], output_dir / PLOT_FILE)
    return DemoReport(before, lora, full, merge_error, plot)


def load_data(model_dir: Path, epochs: int, max_train_rows: int | None) -> DemoData:
    """Read the VADER split (no transformers needed), then import transformers and tokenise."""
    split = load_vader_sentiment()
    rows = split.train[:max_train_rows] if max_train_rows else split.train
    steps_per_epoch = -(-len(rows) // BATCH_SIZE)
    steps = epochs * steps_per_epoch
    logger.info(
        "%d training words, %d test words; batches of %d, %d epoch%s: %d steps per run",
        len(rows),
        len(split.test),
        BATCH_SIZE,
        epochs,
        "" if epochs == 1 else "s",
        steps,
    )
    logger.info("[1/6] Importing transformers, loading the tokenizer and tokenising (a few s)")
    transformers = import_optional("transformers", "demo", "lorakit demo")
    AutoTokenizer = transformers.AutoTokenizer
    transformers_logging = transformers.logging

    # The new classification head is expected to be missing from the checkpoint: no report.
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    train, test = prepare_datasets(rows, tokenizer, split.test, max_length=MAX_LENGTH)
    assert test is not None, "the demo's test split is passed to prepare_datasets"
    return DemoData(tokenizer, train, test, epochs, steps, steps_per_epoch)


def _classifier(model_dir: Path, train: TokenizedDataset, seed: int) -> nn.Module:
    """The pretrained encoder with a new 2-class head, seeded so every build is the same."""
    transformers = import_optional("transformers", "demo", "lorakit demo")
    AutoModelForSequenceClassification = transformers.AutoModelForSequenceClassification

    assert train.id_to_label is not None, "the demo data is classification data"
    id2label = {index: str(label) for index, label in train.id_to_label.items()}
    torch.manual_seed(seed)
    model: nn.Module = AutoModelForSequenceClassification.from_pretrained(
        model_dir,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={label: index for index, label in id2label.items()},
    )
    return model


def _accuracy(model: nn.Module, data: DemoData) -> float:
    loader = make_loader(data.test, data.tokenizer, batch_size=BATCH_SIZE, shuffle=False)
    return evaluate(model, loader, "SEQ_CLS", torch.device("cpu"))["eval_accuracy"]


def _train_run(
    phase: int,
    spec: RunSpec,
    build: Callable[[], nn.Module],
    data: DemoData,
    output_dir: Path,
    seed: int,
    eval_seconds: float,
) -> tuple[nn.Module, RunResult]:
    """Build and train one run through the ``Trainer``; measure time, pace and peak memory."""
    folder = output_dir / spec.folder
    expected = spec.reference_seconds_per_step * data.steps
    logger.info(
        "[%d/6] %s: %d steps at lr %g, %d evaluation%s, into %s; about %s on an idle 2-core "
        "machine (%.2f s a step, all included); the time here follows after %d steps",
        phase,
        spec.name,
        data.steps,
        spec.learning_rate,
        data.evaluations,
        "" if data.evaluations == 1 else "s",
        folder,
        format_seconds(expected),
        spec.reference_seconds_per_step,
        PACE_STEPS + 1,
    )
    config = TrainConfig(
        epochs=data.epochs,
        batch_size=BATCH_SIZE,
        learning_rate=spec.learning_rate,
        lr_scheduler="linear",
        weight_decay=0.01,
        max_grad_norm=None,
        max_length=MAX_LENGTH,
        seed=seed,
        eval_steps=data.steps_per_epoch,
        logging_steps=LOGGING_STEPS,
        output_dir=str(folder),
    )
    clock = StepClock(spec.name, data.steps, data.evaluations, eval_seconds)
    with peak_rss_above_start() as peak:
        started = time.perf_counter()
        model = build()
        trainer = Trainer(model, data.tokenizer, config, data.train, data.test, callbacks=[clock])
        summary = trainer.train()
        seconds = time.perf_counter() - started
    events = trainer.log.events if trainer.log is not None else []
    final = [event for event in events if event["event"] == "eval"][-1]
    if "model_dir" in summary:  # full fine-tuning saves the whole model
        saved = Path(summary["model_dir"]) / MODEL_FILE
    else:
        saved = Path(summary["adapter_dir"]) / ADAPTER_FILE
    result = RunResult(
        name=spec.name,
        accuracy=float(final["eval_accuracy"]),
        trainable=int(summary["trainable_params"]),
        total=int(summary["total_params"]),
        seconds=seconds,
        seconds_per_step=clock.seconds_per_step(),
        steps=int(summary["steps"]),
        peak_mib=peak[0],
        saved_file=saved,
        events=events,
    )
    logger.info(
        "      %s done in %s: test accuracy %.1f%%; saved %s",
        spec.name,
        format_seconds(seconds),
        100 * result.accuracy,
        saved.parent,
    )
    return model, result


def merge_error_of(model: Any, data: DemoData) -> float:
    """Merge the adapter into the base and return the largest logit change merging caused."""
    model.eval()
    loader = make_loader(data.test, data.tokenizer, batch_size=MERGE_BATCH_ROWS, shuffle=False)
    batch = next(iter(loader))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        unmerged = model(**inputs).logits
        merged = model.merge_and_unload()(**inputs).logits
    return float((merged - unmerged).abs().max())


def plot_losses(results: list[RunResult], path: Path) -> Path:
    """Both runs' training loss (mean of each logging window) against the step, as a PNG."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), layout="tight")  # no pyplot: the user's backend stays
    axes = figure.subplots()
    for result in results:
        train = [event for event in result.events if event["event"] == "train"]
        axes.plot(
            [event["step"] for event in train],
            [event["loss"] for event in train],
            label=f"{result.name} (test acc {100 * result.accuracy:.1f}%)",
        )
    axes.set_xlabel("optimizer step")
    axes.set_ylabel(f"training loss ({LOGGING_STEPS}-step mean)")
    axes.set_title("all-MiniLM-L6-v2 on VADER sentiment words")
    axes.legend()
    return write_file(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
