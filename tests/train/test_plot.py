"""The run's plot shows the run's numbers; without matplotlib the run says how to get one.

The figure is checked as data (each line's x/y against ``metrics.jsonl``, legends, axis
labels, colours) and as a picture (the PNG read back: its size, and the series colours in the
panel each belongs to).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from lorakit import LoraConfig, get_peft_model
from lorakit.train import TrainConfig, Trainer
from lorakit.train.reporting import (
    METRICS_FILE,
    PLOT_FILE,
    SUMMARY_FILE,
    MetricsLog,
    build_figure,
)
from tiny_models import tiny_llama
from train.conftest import CAUSAL_CORPUS

ROWS = [{"text": text} for text in CAUSAL_CORPUS]
PLOT_METRIC = "eval_perplexity"  # what a language-modelling run plots on the right
PLOT_PIXELS = (400, 1000)  # rows, columns: 10 x 4 inches at 100 dpi
# The colours docs/training.md gives: blue, orange, green (matplotlib's tab: colours).
TRAIN_COLOR, EVAL_COLOR, METRIC_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c"
# A PNG stores 8-bit channels: a pixel of a series colour is within half a step of it.
COLOR_ATOL = 0.5 / 255


def _train(output_dir: Path, tokenizer: Any, max_steps: int = 6) -> dict[str, Any]:
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_llama(vocab_size=len(tokenizer)), lora)
    config = TrainConfig(
        max_steps=max_steps,
        batch_size=2,
        learning_rate=1e-2,
        logging_steps=2,
        eval_steps=3,
        output_dir=str(output_dir),
    )
    return Trainer(model, tokenizer, config, ROWS, ROWS).train()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, causal_tokenizer: Any) -> Path:
    pytest.importorskip("matplotlib")
    output_dir = tmp_path_factory.mktemp("run")
    _train(output_dir, causal_tokenizer)
    return output_dir


def _series(events: list[dict[str, Any]], kind: str, key: str) -> tuple[list[Any], list[Any]]:
    chosen = [event for event in events if event["event"] == kind]
    return [event["step"] for event in chosen], [event[key] for event in chosen]


def test_the_figure_holds_the_runs_series_and_labels(run_dir: Path) -> None:
    from matplotlib.colors import to_hex

    events = MetricsLog.read(run_dir / METRICS_FILE)
    figure = build_figure(events, PLOT_METRIC)
    loss_axis, metric_axis = figure.axes
    expected = {
        loss_axis: [
            ("train loss", TRAIN_COLOR, _series(events, "train", "loss")),
            ("eval loss", EVAL_COLOR, _series(events, "eval", "eval_loss")),
        ],
        metric_axis: [(PLOT_METRIC, METRIC_COLOR, _series(events, "eval", PLOT_METRIC))],
    }
    assert _series(events, "train", "loss")[0] == [2, 4, 6]  # logging_steps=2
    assert _series(events, "eval", "eval_loss")[0] == [3, 6]  # eval_steps=3
    for axis, series in expected.items():
        lines = axis.get_lines()
        assert [line.get_label() for line in lines] == [label for label, _, _ in series]
        for line, (_, color, (steps, values)) in zip(lines, series, strict=True):
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == values
            assert to_hex(line.get_color()) == color
        legend = axis.get_legend()
        assert [text.get_text() for text in legend.get_texts()] == [label for label, _, _ in series]
        assert axis.get_xlabel() == "step"
    assert loss_axis.get_ylabel() == "loss" and metric_axis.get_ylabel() == PLOT_METRIC


def _has_color(pixels: Any, color: str) -> bool:
    import numpy
    from matplotlib.colors import to_rgb

    distance = numpy.abs(pixels[..., :3] - numpy.array(to_rgb(color)))
    return bool((distance <= COLOR_ATOL).all(axis=-1).any())


def test_the_written_png_draws_each_series_in_its_panel(run_dir: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(run_dir / PLOT_FILE)
    assert pixels.shape == (*PLOT_PIXELS, 4)
    left, right = pixels[:, : PLOT_PIXELS[1] // 2], pixels[:, PLOT_PIXELS[1] // 2 :]
    assert _has_color(left, TRAIN_COLOR) and _has_color(left, EVAL_COLOR)
    assert not _has_color(left, METRIC_COLOR)
    assert _has_color(right, METRIC_COLOR)
    assert not _has_color(right, TRAIN_COLOR) and not _has_color(right, EVAL_COLOR)
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert summary["plot"] == str(run_dir / PLOT_FILE)


def test_without_matplotlib_the_run_finishes_and_says_how_to_get_the_plot(
    tmp_path: Path,
    causal_tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in [name for name in sys.modules if name.split(".")[0] == "matplotlib"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it now fails
    with caplog.at_level("WARNING", logger="lorakit.train"):
        summary = _train(tmp_path, causal_tokenizer, max_steps=3)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1
    assert re.fullmatch(
        r"No plot written to .*training\.png: matplotlib is not installed \(.*\)\. Fix: "
        r'pip install "lorakit\[plot\]" \(or pip install matplotlib\); the numbers are in '
        r"metrics\.jsonl\.",
        warnings[0],
    )
    assert summary["plot"] is None and summary["steps"] == 3
    assert json.loads((tmp_path / SUMMARY_FILE).read_text())["plot"] is None
    assert not (tmp_path / PLOT_FILE).exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
