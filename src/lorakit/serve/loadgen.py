"""A load generator for OpenAI-compatible servers: many concurrent clients, every answer checked.

A pure HTTP client (httpx's asyncio client, nothing of the engine): `clients` coroutines loop
for `duration_s` seconds, each taking the next request of a mix in turn (one shared cycle, so
the mix is spread evenly whatever the number of clients), sending it greedy and streamed to
`/v1/completions`, and recording its latency, its time to first token (the first chunk that
carries a choice) and its completion tokens (the stream's `usage`). Requests in flight at the
deadline finish and count. Every answer is compared with the request's reference text: a
request that fails (an HTTP error, a timeout, a stream without its finish, usage or
``[DONE]``) is lost, one whose text or `model` differs is wrong, and `LoadReport.check` raises
on either. ``python -m lorakit.serve.loadgen --url URL --mix mix.jsonl`` runs it from a shell.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoadSpecError, LoadTestError, LorakitError
from ..extras import import_optional
from .types import BASE_ADAPTER

PURPOSE = "lorakit.serve.loadgen"
COMPLETIONS_ROUTE = "/v1/completions"
STREAM_PREFIX = "data: "
STREAM_END = "[DONE]"
HEALTH_POLL_S = 0.2
MAX_LISTED_FAILURES = 10  # failures named in LoadTestError's message (all are in the report)


@dataclass(frozen=True)
class LoadRequest:
    """One request of a load test's mix, with its reference answer.

    Attributes:
        prompt: The prompt text, or its token ids.
        expected: The greedy completion text the server must return (the reference).
        model: An adapter's name, or "base" (also for a blend).
        blend: {adapter: weight} sent in the `lorakit` field; needs `model` "base".
        max_tokens: Tokens to generate.
    """

    prompt: str | tuple[int, ...]
    expected: str
    model: str = BASE_ADAPTER
    blend: Mapping[str, float] | None = None
    max_tokens: int = 16

    def __post_init__(self) -> None:
        if self.blend is not None and (self.model != BASE_ADAPTER or not self.blend):
            raise LoadSpecError(
                f"a blend needs model={BASE_ADAPTER!r} and at least one adapter; got "
                f"model={self.model!r}, blend={dict(self.blend)!r}: set model={BASE_ADAPTER!r}"
            )
        if self.max_tokens < 1:
            raise LoadSpecError(f"max_tokens must be at least 1; got {self.max_tokens}")

    @property
    def label(self) -> str:
        """What the report counts requests by: the model, or ``blend(a=0.7,b=0.5)``."""
        if self.blend is None:
            return self.model
        return "blend(" + ",".join(f"{n}={w:g}" for n, w in sorted(self.blend.items())) + ")"

    def body(self) -> dict[str, Any]:
        """The JSON body: greedy, streamed, with usage in the last chunk."""
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": self.prompt if isinstance(self.prompt, str) else list(self.prompt),
            "max_tokens": self.max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.blend is not None:
            body["lorakit"] = {"blend": dict(self.blend)}
        return body


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


async def run_load(
    url: str,
    mix: Sequence[LoadRequest],
    clients: int = 8,
    duration_s: float = 10.0,
    api_key: str | None = None,
    request_timeout_s: float = 120.0,
    ramp_up_s: float = 0.0,
) -> LoadReport:
    """Load the server at `url` with `clients` concurrent clients for `duration_s` seconds.

    Args:
        url: The server's root, e.g. ``http://127.0.0.1:8000``.
        mix: The requests, taken in turn by whichever client is free next.
        clients: Concurrent clients (each one connection, one request at a time).
        duration_s: No request is sent after this many seconds; those in flight finish.
        api_key: Sent as ``Authorization: Bearer KEY`` when given.
        request_timeout_s: A request that takes longer (connecting, or between two chunks)
            is lost.
        ramp_up_s: Client c starts c / clients * ramp_up_s seconds after the first, so that
            the requests do not all start, and with equal lengths end, together.

    Returns:
        The report (call `LoadReport.check()` to fail on lost or wrong requests).

    Raises:
        LoadSpecError: An empty mix, fewer than one client, a duration or timeout not above
            0, or a ramp-up below 0 or not shorter than the duration.
        MissingDependencyError: httpx is not installed.
    """
    _check_options(mix, clients, duration_s, request_timeout_s, ramp_up_s)
    httpx = import_optional("httpx", "serve", PURPOSE)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    turns = itertools.count()
    answers: list[Answer] = []
    start = time.perf_counter()
    deadline = start + duration_s
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"), headers=headers, timeout=request_timeout_s, limits=limits
    ) as http:

        async def client_loop(client: int) -> None:
            await asyncio.sleep(client / clients * ramp_up_s)
            while time.perf_counter() < deadline:
                index = next(turns) % len(mix)
                answers.append(await _send(http, httpx, client, index, mix[index]))

        await asyncio.gather(*(client_loop(client) for client in range(clients)))
    return LoadReport.from_answers(answers, clients, time.perf_counter() - start)


def wait_until_ready(
    url: str,
    timeout_s: float = 300.0,
    api_key: str | None = None,
    process: subprocess.Popen[Any] | None = None,
) -> None:
    """Poll ``GET /health`` until it answers 200 (a server starting up takes seconds).

    Args:
        url: The server's root.
        timeout_s: Seconds to wait at most.
        api_key: Sent as ``Authorization: Bearer KEY`` when given (the server's key covers
            /health too).
        process: The server's process, if this program started it: its exit ends the wait.

    Raises:
        LoadTestError: The server is not ready in time, answers /health with another status
            than 200 or 503, or its process exited.
    """
    httpx = import_optional("httpx", "serve", PURPOSE)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    deadline = time.monotonic() + timeout_s
    status = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise LoadTestError(
                f"the server process exited with status {process.returncode} before it was "
                "ready: see its output"
            )
        try:
            status = httpx.get(url.rstrip("/") + "/health", headers=headers, timeout=5).status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        if status not in (None, 503):
            raise LoadTestError(
                f"GET {url}/health answered {status}; a 401 means the server needs api_key"
            )
        time.sleep(HEALTH_POLL_S)
    raise LoadTestError(f"the server at {url} was not ready after {timeout_s} s (last: {status})")


def run_load_sync(
    url: str,
    mix: Sequence[LoadRequest],
    clients: int = 8,
    duration_s: float = 10.0,
    api_key: str | None = None,
    request_timeout_s: float = 120.0,
    ramp_up_s: float = 0.0,
) -> LoadReport:
    """`run_load` from synchronous code (in an event loop of its own); same arguments."""
    return asyncio.run(
        run_load(url, mix, clients, duration_s, api_key, request_timeout_s, ramp_up_s)
    )


def _check_options(
    mix: Sequence[LoadRequest],
    clients: int,
    duration_s: float,
    request_timeout_s: float,
    ramp_up_s: float,
) -> None:
    if not mix:
        raise LoadSpecError("the request mix is empty: give at least one LoadRequest")
    if clients < 1:
        raise LoadSpecError(f"clients must be at least 1; got {clients}")
    if not duration_s > 0 or not request_timeout_s > 0:
        raise LoadSpecError(
            f"duration_s and request_timeout_s must be above 0; got {duration_s} and "
            f"{request_timeout_s}"
        )
    if not 0 <= ramp_up_s < duration_s:
        raise LoadSpecError(
            f"ramp_up_s must be at least 0 and less than duration_s ({duration_s}); got {ramp_up_s}"
        )


async def _send(http: Any, httpx: Any, client: int, index: int, request: LoadRequest) -> Answer:
    """Send one request and read its stream to the end; any failure makes it lost."""
    sent = time.perf_counter()
    stream = _StreamState()
    try:
        async with http.stream("POST", COMPLETIONS_ROUTE, json=request.body()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                stream.error = f"HTTP {response.status_code}: {body[:300]}"
            else:
                async for line in response.aiter_lines():
                    stream.read_line(line, time.perf_counter() - sent)
    except httpx.TimeoutException as timeout:
        stream.error = f"timed out ({type(timeout).__name__}, limit {http.timeout.read} s)"
    except httpx.HTTPError as failure:
        stream.error = f"{type(failure).__name__}: {failure}"
    error = stream.error or stream.incomplete()
    is_correct = error is None and stream.text == request.expected
    is_correct = is_correct and stream.models == {request.model}
    return Answer(
        client=client,
        index=index,
        label=request.label,
        text=stream.text,
        completion_tokens=stream.completion_tokens if error is None else 0,
        latency_s=time.perf_counter() - sent,
        ttft_s=stream.ttft_s,
        error=error,
        is_correct=is_correct,
    )


class _StreamState:
    """What a completion's server-sent events said so far."""

    def __init__(self) -> None:
        self.text = ""
        self.models: set[str] = set()
        self.ttft_s: float | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.has_usage = False
        self.is_done = False
        self.error: str | None = None

    def read_line(self, line: str, elapsed_s: float) -> None:
        if not line.startswith(STREAM_PREFIX) or self.error is not None:
            return
        data = line[len(STREAM_PREFIX) :]
        if data == STREAM_END:
            self.is_done = True
            return
        try:
            self._read_chunk(json.loads(data), elapsed_s)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self.error = f"a malformed chunk in the stream ({error!r}): {data[:200]!r}"

    def _read_chunk(self, chunk: dict[str, Any], elapsed_s: float) -> None:
        if "error" in chunk:
            self.error = f"error event: {chunk['error']}"
            return
        self.models.add(str(chunk.get("model")))
        for choice in chunk.get("choices", []):
            if self.ttft_s is None:
                self.ttft_s = elapsed_s
            self.text += choice.get("text") or ""
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        if chunk.get("usage") is not None:
            self.has_usage = True
            self.completion_tokens = int(chunk["usage"]["completion_tokens"])

    def incomplete(self) -> str | None:
        """Why the stream is not a whole answer, or None."""
        missing = [
            what
            for what, present in (
                ("finish_reason", self.finish_reason is not None),
                ("usage", self.has_usage),
                (STREAM_END, self.is_done),
            )
            if not present
        ]
        return f"the stream ended without {', '.join(missing)}" if missing else None


def read_mix(path: Path) -> list[LoadRequest]:
    """Requests from a JSONL file: one object per line with `LoadRequest`'s fields.

    Raises:
        LoadSpecError: A line is not such an object.
    """
    mix = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
            if isinstance(fields.get("prompt"), list):
                fields["prompt"] = tuple(fields["prompt"])
            mix.append(LoadRequest(**fields))
        except (json.JSONDecodeError, TypeError, AttributeError) as error:
            raise LoadSpecError(
                f"{path}:{number} is not a request ({error}); each line needs an object with "
                "'prompt' and 'expected', and optionally 'model', 'blend', 'max_tokens'"
            ) from error
    return mix


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lorakit.serve.loadgen``: run a mix file against a server.

    Returns:
        0 when every request completed right, 1 when some were lost or wrong, 2 when the mix
        file or an option cannot be used.
    """
    parser = argparse.ArgumentParser(prog="python -m lorakit.serve.loadgen", description=__doc__)
    parser.add_argument("--url", required=True, help="server root, e.g. http://127.0.0.1:8000")
    parser.add_argument("--mix", type=Path, required=True, help="JSONL file of requests")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load (10)")
    parser.add_argument("--api-key", default=None, help="bearer key, if the server has one")
    parser.add_argument("--ramp-up", type=float, default=0.0, help="seconds to start all clients")
    args = parser.parse_args(argv)
    try:
        report = run_load_sync(
            args.url,
            read_mix(args.mix),
            clients=args.clients,
            duration_s=args.duration,
            api_key=args.api_key,
            ramp_up_s=args.ramp_up,
        )
    except (LorakitError, OSError) as error:  # a bad mix or option, no httpx, no mix file
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(report.summary())
    try:
        report.check()
    except LoadTestError as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
