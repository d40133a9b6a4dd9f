"""What the demo measures while a run goes: peak memory, the time of each step, the pace.

Both are the demo's own measurements (the trainer's summary has the process's peak memory, not
one run's); ``StepClock`` is a ``Trainer`` callback.
"""

from __future__ import annotations

import logging
import math
import resource
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from .reporting import format_seconds
from .trainer import Trainer

logger = logging.getLogger("lorakit.demo")

PACE_STEPS = 5  # steps timed (after the first, which warms up) before a run's time is restated


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


class StepClock:
    """Trainer callback: times each optimizer step and restates the run's time early.

    A step's time is the wall time between two callbacks. The first step (warm-up) and steps
    that ended with an evaluation are left out of the per-step mean. After ``PACE_STEPS``
    timed steps it logs the run's expected time at the measured pace.

    Args:
        name: The run's name, for the message.
        total_steps: Optimizer steps of the run.
        evaluations: Evaluations the run makes.
        eval_seconds: Measured time of one evaluation.
    """

    def __init__(self, name: str, total_steps: int, evaluations: int, eval_seconds: float) -> None:
        self.name = name
        self.total_steps = total_steps
        self.evaluations = evaluations
        self.eval_seconds = eval_seconds
        self.last = time.perf_counter()
        self.step_seconds: list[float] = []

    def __call__(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        step = trainer.state.step
        events = trainer.log.events if trainer.log is not None else []
        last = events[-1] if events else {}
        has_evaluated = last.get("event") == "eval" and last.get("step") == step
        if step > 1 and not has_evaluated:
            self.step_seconds.append(seconds)
            if len(self.step_seconds) == PACE_STEPS:
                pace = self.seconds_per_step()
                expected = pace * self.total_steps + self.evaluations * self.eval_seconds
                logger.info(
                    "      measured here: %.3f s a step (steps 2-%d), so %s should take about %s "
                    "(%d steps, %d evaluation%s)",
                    pace,
                    step,
                    self.name,
                    format_seconds(expected),
                    self.total_steps,
                    self.evaluations,
                    "" if self.evaluations == 1 else "s",
                )

    def seconds_per_step(self) -> float:
        """Mean time of the timed steps (NaN before any)."""
        if not self.step_seconds:
            return math.nan
        return sum(self.step_seconds) / len(self.step_seconds)
