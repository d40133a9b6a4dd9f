"""A load test's results: each request's answer, and the rates, percentiles and counts of all.

`lorakit.serve.loadgen` records an `Answer` per request it sends and aggregates them with
`LoadReport.from_answers`; `LoadReport.check` fails on lost or wrong requests.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import LoadTestError

MAX_LISTED_FAILURES = 10  # failures named in LoadTestError's message (all are in the report)


@dataclass(frozen=True)
class Answer:
    """What one sent request got back.

    Attributes:
        client: Which client sent it (0-based).
        index: The request's position in the mix.
        label: The request's `LoadRequest.label`.
        text: The streamed completion text.
        completion_tokens: From the stream's usage (0 if lost).
        latency_s: Seconds from sending to the end of the stream (or the failure).
        ttft_s: Seconds from sending to the first chunk with a choice; None if none came.
        error: Why the request was lost; None if it completed.
        is_correct: Completed, with the reference text and the requested model.
    """

    client: int
    index: int
    label: str
    text: str
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    error: str | None
    is_correct: bool


@dataclass(frozen=True)
class LoadReport:
    """Rates, percentiles and counts of one load test, and every answer.

    Rates divide by `duration_s`, the wall time from the first request sent to the last
    answer. Percentiles are nearest-rank over completed requests (NaN if none completed).

    Attributes:
        clients: Concurrent clients.
        duration_s: Wall time of the run.
        requests: Requests sent.
        completed: Requests that completed (right or wrong).
        lost: Requests that failed (error, timeout, incomplete stream).
        wrong: Completed requests whose text or model differs from the reference.
        completion_tokens: Sum of the completed requests' completion tokens.
        requests_per_s: Completed requests per second.
        tokens_per_s: Completion tokens per second.
        latency_p50_s: Median latency.
        latency_p99_s: 99th percentile latency.
        ttft_p50_s: Median time to first token.
        ttft_p99_s: 99th percentile time to first token.
        requests_per_label: Requests sent per `LoadRequest.label`.
        answers: Every answer, in the order they ended.
    """

    clients: int
    duration_s: float
    requests: int
    completed: int
    lost: int
    wrong: int
    completion_tokens: int
    requests_per_s: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    requests_per_label: dict[str, int] = field(default_factory=dict)
    answers: tuple[Answer, ...] = ()

    @classmethod
    def from_answers(cls, answers: Sequence[Answer], clients: int, duration_s: float) -> LoadReport:
        """Aggregate `answers` of a run of `duration_s` seconds with `clients` clients."""
        done = [answer for answer in answers if answer.error is None]
        tokens = sum(answer.completion_tokens for answer in done)
        latencies = [answer.latency_s for answer in done]
        ttfts = [answer.ttft_s for answer in done if answer.ttft_s is not None]
        return cls(
            clients=clients,
            duration_s=duration_s,
            requests=len(answers),
            completed=len(done),
            lost=len(answers) - len(done),
            wrong=sum(not answer.is_correct for answer in done),
            completion_tokens=tokens,
            requests_per_s=len(done) / duration_s,
            tokens_per_s=tokens / duration_s,
            latency_p50_s=percentile(latencies, 50),
            latency_p99_s=percentile(latencies, 99),
            ttft_p50_s=percentile(ttfts, 50),
            ttft_p99_s=percentile(ttfts, 99),
            requests_per_label=dict(sorted(Counter(a.label for a in answers).items())),
            answers=tuple(answers),
        )

    def failures(self) -> list[str]:
        """One line per lost or wrong request."""
        lines = []
        for answer in self.answers:
            if answer.error is not None:
                lines.append(f"lost {answer.label} (mix #{answer.index}): {answer.error}")
            elif not answer.is_correct:
                lines.append(f"wrong {answer.label} (mix #{answer.index}): got {answer.text!r}")
        return lines

    def check(self) -> None:
        """Raise `LoadTestError` if any request was lost or wrong, or none was sent."""
        failures = self.failures()
        if failures or self.requests == 0:
            shown = "\n".join(failures[:MAX_LISTED_FAILURES])
            more = len(failures) - MAX_LISTED_FAILURES
            raise LoadTestError(
                f"load test: {self.requests} requests, {self.lost} lost, {self.wrong} wrong"
                + (f":\n{shown}" if shown else " (the duration ended before any request was sent)")
                + (f"\n... and {more} more (LoadReport.failures())" if more > 0 else "")
                + "\nLost requests: check the server's log and its --max-queue (a 429 is lost);"
                " wrong ones: the server's answer differs from the reference"
            )

    def summary(self) -> str:
        """The figures as lines of text."""
        per_label = ", ".join(f"{k}: {v}" for k, v in self.requests_per_label.items())
        return "\n".join(
            [
                f"{self.clients} clients, {self.duration_s:.1f} s: {self.requests} requests, "
                f"{self.completed} completed, {self.lost} lost, {self.wrong} wrong",
                f"requests/s {self.requests_per_s:.2f}, completion tokens/s "
                f"{self.tokens_per_s:.1f} ({self.completion_tokens} tokens)",
                f"latency p50 {self.latency_p50_s * 1e3:.0f} ms, p99 "
                f"{self.latency_p99_s * 1e3:.0f} ms; TTFT p50 {self.ttft_p50_s * 1e3:.0f} ms, "
                f"p99 {self.ttft_p99_s * 1e3:.0f} ms",
                f"requests per model: {per_label}",
            ]
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank `q`-th percentile of `values` (NaN when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]
