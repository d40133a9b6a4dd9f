"""The demo's step clock: which steps its per-step time counts, and when it states the pace."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lorakit.train import demo_timing
from lorakit.train.demo_timing import PACE_STEPS, StepClock


def test_per_step_time_leaves_out_the_first_step_and_steps_that_evaluated(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Step s ends at the clock reading ends[s]; step 1 warms up (5 s), step 4 also evaluated.
    ends = {1: 5.0, 2: 6.0, 3: 8.0, 4: 20.0, 5: 23.0, 6: 27.0, 7: 32.0, 8: 38.0}
    readings = iter([0.0, *ends.values()])  # the first is read when the clock is made
    monkeypatch.setattr(demo_timing, "time", SimpleNamespace(perf_counter=lambda: next(readings)))
    clock = StepClock("LoRA", total_steps=100, evaluations=2, eval_seconds=3.0)
    events: list[dict[str, Any]] = []
    trainer: Any = SimpleNamespace(
        state=SimpleNamespace(step=0), log=SimpleNamespace(events=events)
    )
    with caplog.at_level("INFO", logger="lorakit.demo"):
        for step in ends:
            trainer.state.step = step
            if step == 4:
                events.append({"event": "eval", "step": 4, "eval_loss": 0.5})
            clock(trainer)
    # steps 2, 3, 5, 6, 7, 8 took 1, 2, 3, 4, 5, 6 s
    assert clock.step_seconds == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert clock.seconds_per_step() == pytest.approx(3.5)
    (message,) = [record.getMessage() for record in caplog.records]
    # stated once, after PACE_STEPS timed steps (2, 3, 5, 6, 7): mean 3 s x 100 + 2 x 3 s
    assert PACE_STEPS == 5
    assert "3.000 s a step (steps 2-7), so LoRA should take about 5m06s" in message
