"""One generation request over HTTP: a whole JSON answer, or a stream of server-sent events.

Both ways end the engine's request when the client goes away: a stream is cancelled by the
ASGI server (its generator's ``finally`` cancels the handle), and a plain request races the
collection of its tokens against the client's disconnect message. A cancelled request leaves
the engine's batch at its next step, so nothing is left running for a client that is gone.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .handle import RequestHandle
from .types import TokenEvent

COMPLETION = "text_completion"
CHAT = "chat.completion"
CHAT_CHUNK = "chat.completion.chunk"


@dataclass(frozen=True)
class Reply:
    """What every response or chunk of one request repeats.

    Attributes:
        request_id: "cmpl-..." or "chatcmpl-...".
        created: Unix time of the request.
        model: The `model` field of the request.
        is_chat: A chat completion (message/delta) rather than a text completion.
        has_logprobs: Include each token's logprob.
    """

    request_id: str
    created: int
    model: str
    is_chat: bool
    has_logprobs: bool

    @classmethod
    def new(cls, model: str, is_chat: bool, has_logprobs: bool) -> Reply:
        prefix = "chatcmpl" if is_chat else "cmpl"
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, is_chat, has_logprobs)


async def collect_events(
    handle: RequestHandle, client_gone: Callable[[], Awaitable[None]]
) -> list[TokenEvent] | None:
    """Every event of `handle`, or None (the request cancelled) if the client leaves first.

    Args:
        handle: The engine's request.
        client_gone: Returns once the client has disconnected.
    """

    async def gather() -> list[TokenEvent]:
        return [event async for event in handle]

    collecting = asyncio.ensure_future(gather())
    watching = asyncio.ensure_future(client_gone())
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():  # the client left, or this handler was cancelled
            handle.cancel()
            collecting.cancel()
    return collecting.result() if not collecting.cancelled() else None


def response_body(reply: Reply, handle: RequestHandle, events: list[TokenEvent]) -> dict[str, Any]:
    """The whole answer: the text, finish_reason, logprobs if asked, and usage."""
    text = "".join(event.text for event in events)
    finish_reason = events[-1].finish_reason
    if reply.is_chat:
        choice: dict[str, Any] = {
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": chat_logprobs(events) if reply.has_logprobs else None,
        }
    else:
        choice = {
            "text": text,
            "logprobs": completion_logprobs(events) if reply.has_logprobs else None,
        }
    body = envelope(CHAT if reply.is_chat else COMPLETION, *_ids(reply), {
        **choice, "finish_reason": finish_reason
    })  # fmt: skip
    body["usage"] = usage(handle.prompt_tokens, handle.completion_tokens)
    return body


async def stream_events(
    reply: Reply, handle: RequestHandle, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per token that adds text, the finish, usage, ``[DONE]``."""
    kind = CHAT_CHUNK if reply.is_chat else COMPLETION
    try:
        if reply.is_chat:  # OpenAI opens a chat stream with the role
            opening = {"delta": {"role": "assistant", "content": ""}, "logprobs": None}
            yield sse(envelope(kind, *_ids(reply), {**opening, "finish_reason": None}))
        offset = 0
        async for event in handle:
            has_token = reply.has_logprobs and event.token_id >= 0
            if event.text or event.finish_reason is not None or has_token:
                yield sse(envelope(kind, *_ids(reply), _chunk_choice(reply, event, offset)))
            offset += len(event.text)
        if include_usage:  # OpenAI's last chunk: no choices, the counts
            last = envelope(kind, *_ids(reply), None)
            last["usage"] = usage(handle.prompt_tokens, handle.completion_tokens)
            yield sse(last)
        yield SSE_DONE
    finally:  # also when the client disconnected and the server cancelled this generator
        handle.cancel()


def _chunk_choice(reply: Reply, event: TokenEvent, offset: int) -> dict[str, Any]:
    if reply.is_chat:
        logprobs = chat_logprobs([event]) if reply.has_logprobs else None
        delta = {"content": event.text} if event.text else {}
        return {"delta": delta, "logprobs": logprobs, "finish_reason": event.finish_reason}
    logprobs = completion_logprobs([event], offset) if reply.has_logprobs else None
    return {"text": event.text, "logprobs": logprobs, "finish_reason": event.finish_reason}


def _ids(reply: Reply) -> tuple[str, int, str]:
    return reply.request_id, reply.created, reply.model


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(events: Sequence[TokenEvent], offset: int = 0) -> dict[str, Any]:
    """The legacy completions `logprobs` object: each token's text, logprob and text offset."""
    tokens = [event for event in events if event.token_id >= 0]
    offsets, position = [], offset
    for event in tokens:
        offsets.append(position)
        position += len(event.text)
    return {
        "tokens": [event.text for event in tokens],
        "token_logprobs": [event.logprob for event in tokens],
        "top_logprobs": None,
        "text_offset": offsets,
    }


def chat_logprobs(events: Sequence[TokenEvent]) -> dict[str, Any]:
    """The chat `logprobs` object: each token's text, its UTF-8 bytes and logprob."""
    return {
        "content": [
            {
                "token": event.text,
                "logprob": event.logprob,
                "bytes": list(event.text.encode("utf-8")),
                "top_logprobs": [],
            }
            for event in events
            if event.token_id >= 0
        ],
        "refusal": None,
    }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")


def envelope(
    kind: str, request_id: str, created: int, model: str, choice: dict[str, Any] | None
) -> dict[str, Any]:
    """A response or chunk: `kind` is its OpenAI object type, e.g. "chat.completion.chunk"."""
    return {
        "id": request_id,
        "object": kind,
        "created": created,
        "model": model,
        "choices": [] if choice is None else [{"index": 0, **choice}],
    }
