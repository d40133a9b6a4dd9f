"""Progress without a terminal: a line at each logging step and whenever the last is too old."""

from __future__ import annotations

import pytest

from lorakit.train.reporting import Progress

# Losses of steps 1..5; logging every 3 steps (and the last step).
LOSSES = [5.0, 4.0, 3.0, 2.0, 1.0]


def _run(line_every_s: float, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Drive a Progress as the trainer does: step() every step, line() at logging steps."""
    progress = Progress(5, 0, logging_steps=3, line_every_s=line_every_s)
    window: list[float] = []
    with caplog.at_level("INFO", logger="lorakit.train"):
        for step, loss in enumerate(LOSSES, start=1):
            window.append(loss)
            progress.step(step, loss, 1e-3, 100.0)
            if step % 3 == 0 or step == 5:
                progress.line(step, sum(window) / len(window), 1e-3, 100.0)
                window = []
        progress.close()
    return [record.getMessage() for record in caplog.records]


def test_a_line_between_logging_steps_once_the_last_is_too_old(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every line is "too old" at once: one line per step, never two for a step.
    lines = _run(0.0, caplog)
    assert [line.split("  ")[:2] for line in lines] == [
        ["step 1/5", "loss 5.0000"],
        ["step 2/5", "loss 4.5000"],  # mean since the last logging step: (5 + 4) / 2
        ["step 3/5", "loss 4.0000"],  # the logging step's own line: (5 + 4 + 3) / 3
        ["step 4/5", "loss 2.0000"],  # a new window after step 3
        ["step 5/5", "loss 1.5000"],
    ]
    assert all("lr 1.00e-03  100 tokens/s  ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0s")


def test_only_logging_steps_while_lines_are_recent(caplog: pytest.LogCaptureFixture) -> None:
    lines = _run(3600.0, caplog)
    assert [line.split("  ")[0] for line in lines] == ["step 3/5", "step 5/5"]
