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
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoadSpecError, LoadTestError, LorakitError
from ..extras import import_optional
from .load_report import Answer, LoadReport, percentile
from .types import BASE_ADAPTER

__all__ = [
    "Answer",
    "LoadReport",
    "LoadRequest",
    "main",
    "percentile",
    "read_mix",
    "run_load",
    "run_load_sync",
    "wait_until_ready",
]

PURPOSE = "lorakit.serve.loadgen"
COMPLETIONS_ROUTE = "/v1/completions"
STREAM_PREFIX = "data: "
STREAM_END = "[DONE]"
HEALTH_POLL_S = 0.2


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
