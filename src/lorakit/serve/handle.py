"""A submitted request as its caller sees it: events to iterate (threads or asyncio), cancel."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator

from lorakit.serve.types import TokenEvent


class RequestHandle:
    """The caller's side of one request: iterate its `TokenEvent`s, or cancel it.

    The engine's scheduler thread pushes events; `for event in handle` blocks on a condition,
    `async for event in handle` awaits an `asyncio.Event` the scheduler sets through the
    loop's `call_soon_threadsafe` (no busy wait). Iteration ends after the event carrying a
    `finish_reason`. Iterate a handle once, in one of the two ways.

    Attributes:
        request_id: The engine's number for the request.
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far.
    """

    def __init__(self, request_id: int, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self._events: deque[TokenEvent] = deque()
        self._condition = threading.Condition()
        self._is_cancelled = False
        self._is_finished = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_ready: asyncio.Event | None = None

    @property
    def is_cancelled(self) -> bool:
        """True once `cancel()` was called."""
        return self._is_cancelled

    @property
    def is_finished(self) -> bool:
        """True once the final event was pushed."""
        return self._is_finished

    def cancel(self) -> None:
        """Ask the engine to drop the request: it leaves the batch at the next step.

        Its memory (cache rows) is freed there, and a final event with finish_reason
        "cancelled" ends the iteration. Cancelling a finished request does nothing.
        """
        self._is_cancelled = True

    def push(self, event: TokenEvent) -> None:
        """Deliver one event (called by the scheduler); a finish_reason ends the stream."""
        with self._condition:
            if self._is_finished:
                return
            if event.token_id >= 0:
                self.completion_tokens += 1
            self._events.append(event)
            self._is_finished = event.finish_reason is not None
            self._condition.notify_all()
            loop, ready = self._loop, self._async_ready
        if loop is not None and ready is not None and not loop.is_closed():
            loop.call_soon_threadsafe(ready.set)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            with self._condition:
                while not self._events:
                    self._condition.wait()
                event = self._events.popleft()
            yield event
            if event.finish_reason is not None:
                return

    async def _next_event(self) -> TokenEvent:
        while True:
            with self._condition:
                if self._events:
                    return self._events.popleft()
                assert self._async_ready is not None
                self._async_ready.clear()
            await self._async_ready.wait()

    async def _aiterate(self) -> AsyncIterator[TokenEvent]:
        with self._condition:
            self._loop = asyncio.get_running_loop()
            self._async_ready = asyncio.Event()
        while True:
            event = await self._next_event()
            yield event
            if event.finish_reason is not None:
                return

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._aiterate()
