"""What a run shows and leaves behind: progress, ``metrics.jsonl``, the plot and the summary."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.atomic import write_file, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger("lorakit.train")

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
ADAPTER_FOLDER = "adapter"
MODEL_FOLDER = "model"  # a fully fine-tuned model, saved whole
SUMMARY_FILE = "summary.json"
LABELS_FILE = "labels.json"


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` (flushed at once).

    The file is (re)written whole, atomically, when the log opens; each event is then appended
    as one line (a line torn by a crash is skipped by ``read``).

    Args:
        path: The file.
        keep_until_step: On resume, drop lines of later steps first (they were written after
            the checkpoint by the interrupted run and will be written again); ``None``: start
            a new file.
    """

    def __init__(self, path: Path, keep_until_step: int | None = None) -> None:
        self.path = path
        kept = self.read(path) if keep_until_step is not None and path.is_file() else []
        self.events = [
            event for event in kept if int(event.get("step", 0)) <= (keep_until_step or 0)
        ]
        write_text(path, "".join(json.dumps(event) + "\n" for event in self.events))

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The events of a ``metrics.jsonl`` file (a torn last line is skipped)."""
        events = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return events

    def write(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(event) + "\n")


PLAIN_LINE_SECONDS = 5.0  # without a terminal, a progress line at least this often


class Progress:
    """A tqdm bar on a terminal; plain log lines otherwise.

    Without a terminal (logs, CI, a pipe) a line is logged at each logging step and, between
    logging steps, as soon as ``line_every_s`` seconds have passed since the last line, so a slow
    run never looks stuck. Each line gives the step, the mean loss since the last logging step,
    the learning rate, tokens/s and the ETA. ``is_shown=False`` (ranks other than 0 of a
    distributed run) shows nothing.

    Args:
        total_steps: Optimizer steps of the run.
        initial_step: The step the run starts from (resuming).
        is_shown: Whether this process shows progress at all.
        logging_steps: The trainer calls ``line`` at multiples of this (and the last step).
        line_every_s: Longest wait between two plain lines.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int,
        is_shown: bool = True,
        logging_steps: int = 1,
        line_every_s: float = PLAIN_LINE_SECONDS,
    ) -> None:
        self.total_steps = total_steps
        self.initial_step = initial_step
        self.is_shown = is_shown
        self.logging_steps = logging_steps
        self.line_every_s = line_every_s
        self.started = time.perf_counter()
        self.last_line = self.started
        self.losses: list[float] = []  # since the last logging step
        self.bar: Any = None
        if is_shown and sys.stderr.isatty():
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total_steps, initial=initial_step, unit="step")

    def eta_seconds(self, step: int) -> float:
        done = step - self.initial_step
        elapsed = time.perf_counter() - self.started
        return elapsed / done * (self.total_steps - step) if done > 0 else math.nan

    def is_logging_step(self, step: int) -> bool:
        return step % self.logging_steps == 0 or step == self.total_steps

    def step(self, step: int, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        """Advance the bar to ``step``; without one, log a line if the last is too old."""
        self.losses.append(loss)
        if self.bar is not None:
            self.bar.set_postfix(
                loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{tokens_per_second:.0f}"
            )
            self.bar.update(step - self.bar.n)
            return
        is_due = time.perf_counter() - self.last_line >= self.line_every_s
        if self.is_shown and is_due and not self.is_logging_step(step):
            mean_loss = sum(self.losses) / len(self.losses)
            self._log(step, mean_loss, learning_rate, tokens_per_second)

    def line(self, step: int, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        """A plain progress line at a logging step, when there is no bar."""
        self.losses = []
        if self.is_shown and self.bar is None:
            self._log(step, loss, learning_rate, tokens_per_second)

    def _log(self, step: int, loss: float, learning_rate: float, tokens_per_second: float) -> None:
        self.last_line = time.perf_counter()
        logger.info(
            "step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s  ETA %s",
            step,
            self.total_steps,
            loss,
            learning_rate,
            tokens_per_second,
            format_seconds(self.eta_seconds(step)),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_seconds(seconds: float) -> str:
    """``1h02m03s`` / ``4m05s`` / ``6s``; ``?`` when unknown."""
    if math.isnan(seconds):
        return "?"
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def peak_memory_mb() -> float | None:
    """This process's peak resident memory in MiB (``resource.getrusage``), ``None`` if unknown."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / 1024 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def format_summary(summary: Mapping[str, Any]) -> str:
    """A two-column text table of the summary's entries."""
    rows = [(key, _format_value(value)) for key, value in summary.items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4e}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,d}"
    return str(value)


TRAIN_COLOR = "#1f77b4"  # blue: training loss
EVAL_COLOR = "#ff7f0e"  # orange: evaluation loss
METRIC_COLOR = "#2ca02c"  # green: the evaluation metric
PLOT_SIZE_INCHES = (10.0, 4.0)
PLOT_DPI = 100  # 1000 x 400 pixels
PLOT_INSTALL_FIX = 'pip install "lorakit[plot]" (or pip install matplotlib)'


def build_figure(events: Sequence[Mapping[str, Any]], metric: str) -> Figure:
    """The run's plot: training and evaluation loss (left) and ``metric`` (right) by step.

    A ``matplotlib.figure.Figure`` made without pyplot, so the user's backend and open
    figures are left alone.

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train"]
    evals = [e for e in events if e.get("event") == "eval"]
    eval_loss = [(e["step"], e["eval_loss"]) for e in evals]
    scores = [(e["step"], e[metric]) for e in evals if metric in e]
    panels = [
        ("loss", [(train, "train loss", TRAIN_COLOR), (eval_loss, "eval loss", EVAL_COLOR)]),
        (metric, [(scores, metric, METRIC_COLOR)]),
    ]
    figure = Figure(figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, layout="tight")
    for axis, (y_label, series) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        for points, label, color in series:
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, "o-", label=label, color=color)
        axis.set_xlabel("step")
        axis.set_ylabel(y_label)
        if any(points for points, _, _ in series):
            axis.legend()
    return figure


def save_figure(figure: Figure, path: Path) -> Path:
    """Writes a matplotlib figure to ``path`` as a PNG at ``PLOT_DPI``, atomically."""
    return write_file(path, lambda temp: figure.savefig(temp, format="png", dpi=PLOT_DPI))


def write_plot(events: Sequence[Mapping[str, Any]], path: Path, metric: str) -> Path | None:
    """Plots the run (``build_figure``) to a PNG at ``path``.

    The plot is an optional output: without matplotlib nothing is written, a warning says how
    to install it, and ``None`` is returned (the numbers stay in ``metrics.jsonl``).

    Returns:
        ``path``, or ``None`` when matplotlib is not installed.
    """
    try:
        figure = build_figure(events, metric)
    except ImportError as error:
        logger.warning(
            "No plot written to %s: matplotlib is not installed (%s). Fix: %s; the numbers "
            "are in %s.",
            path,
            error,
            PLOT_INSTALL_FIX,
            METRICS_FILE,
        )
        return None
    return save_figure(figure, path)


def build_summary(
    model: Any, state: Any, metric: str, events: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Trainable parameters and %, steps, final losses, best evaluation, time, peak memory."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train_events = [e for e in events if e.get("event") == "train"]
    summary: dict[str, Any] = {
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
        "steps": state.step,
        "trained_tokens": state.trained_tokens,
        "final_train_loss": train_events[-1]["loss"] if train_events else None,
        f"best_{metric}": state.best_metric,
        "best_step": state.best_step,
        "wall_time_s": state.elapsed,
        "peak_memory_mb": peak_memory_mb(),
    }
    return summary


class LogWindow:
    """Loss and throughput since the last logging step."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.losses: list[float] = []
        self.tokens = 0

    def add(self, loss: float, tokens: int) -> None:
        self.losses.append(loss)
        self.tokens += tokens

    def tokens_per_second(self) -> float:
        return self.tokens / max(time.perf_counter() - self.started, 1e-9)

    def event(self, step: int, learning_rate: float, grad_norm: float) -> dict[str, Any]:
        return {
            "event": "train",
            "step": step,
            "loss": sum(self.losses) / len(self.losses),
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_second": self.tokens_per_second(),
        }


def write_run_outputs(
    model: Any,
    state: Any,
    events: Sequence[Mapping[str, Any]],
    output_dir: Path,
    metric: str,
    label_to_id: Mapping[Any, int] | None,
    saved_folder: str = ADAPTER_FOLDER,
) -> dict[str, Any]:
    """Write the label map (classification), the plot and ``summary.json``; return the summary.

    ``saved_folder`` is where the trainer saved the result: the summary names it as
    ``adapter_dir`` (``"adapter"``) or ``model_dir`` (``"model"``, full fine-tuning).
    """
    if label_to_id is not None:
        labels = {str(label): index for label, index in label_to_id.items()}
        write_text(output_dir / LABELS_FILE, json.dumps(labels, indent=2))
    plot_metric = "eval_perplexity" if metric == "eval_loss" else metric  # loss is on the left
    plot = write_plot(events, output_dir / PLOT_FILE, plot_metric)
    summary = build_summary(model, state, metric, events)
    summary[f"{saved_folder}_dir"] = str(output_dir / saved_folder)
    summary["plot"] = None if plot is None else str(plot)  # None: matplotlib is missing
    write_text(output_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    return summary
