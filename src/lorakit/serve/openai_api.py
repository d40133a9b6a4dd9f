"""OpenAI's completions and chat completions: request bodies checked, response bodies built.

Plain functions on dicts (no web framework), so the rules are testable alone and any ASGI
app, or a Ray Serve deployment, can reuse them. Every field a body may hold is listed here;
a field the server does not implement is refused with a 400 naming it, unless it holds the
value that changes nothing (``n: 1``, ``presence_penalty: 0``, ``echo: false``...). Defaults
are OpenAI's: temperature 1, top_p 1, max_tokens 16 for completions (the server's limit for
chat). `top_k` (as vLLM) and the object ``"lorakit": {"blend": {adapter: weight}}`` are this
server's additions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any

from .http_errors import RequestFieldError
from .types import BASE_ADAPTER, AdapterSpec, SamplingParams

MAX_STOP_STRINGS = 4  # OpenAI's limit
# field -> the only value accepted (the one that changes nothing), for options not implemented
NO_OP_FIELDS: dict[str, object] = {
    "n": 1,
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "echo": False,
    "logit_bias": {},
}
SAMPLING_FIELDS = (
    "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "stream", "stream_options", "logprobs", "lorakit",
)  # fmt: skip
COMPLETION_FIELDS = frozenset((*SAMPLING_FIELDS, *NO_OP_FIELDS, "prompt"))
CHAT_FIELDS = frozenset(
    (*SAMPLING_FIELDS, *NO_OP_FIELDS, "messages", "top_logprobs", "max_completion_tokens")
)
CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class GenerationRequest:
    """A checked completions or chat request, ready for `Engine.submit`.

    Attributes:
        model: The `model` field as sent (echoed in responses).
        adapter: What `Engine.submit` takes: None (base), a name, or a blend {name: weight}.
        sampling: The sampling settings.
        stream: Answer with server-sent events.
        include_usage: Streaming only: send a last chunk with the token counts.
        prompt: Completions: the text, or its token ids.
        messages: Chat: the messages, for the tokenizer's chat template.
        has_max_tokens: The request set max_tokens (else the default is in `sampling`).
    """

    model: str
    adapter: AdapterSpec
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None
    has_max_tokens: bool = True


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in a request body.

    Raises:
        RequestFieldError: The body is not JSON, or not an object.
    """
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RequestFieldError(f"the request body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise RequestFieldError(
            f"the request body must be a JSON object, got {type(body).__name__}"
        )
    return body


def check_fields(body: dict[str, Any], allowed: frozenset[str], what: str) -> None:
    """Refuse unknown fields, and not-implemented ones holding anything but their no-op value."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestFieldError(
            f"{what} does not take the field(s) {unknown}; it takes {sorted(allowed)}",
            unknown[0],
        )
    for name, neutral in NO_OP_FIELDS.items():
        value = body.get(name)
        if value is not None and not _is_neutral(value, neutral):
            raise RequestFieldError(
                f"{name}={value!r} is not implemented by this server; leave it out or send "
                f"{json.dumps(neutral)}",
                name,
            )


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    """Check a `POST /v1/completions` body (see the module docstring for the fields)."""
    check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    is_token_list = isinstance(prompt, list) and all(_is_int(token) for token in prompt)
    if not (isinstance(prompt, str) or is_token_list) or not prompt:
        raise RequestFieldError(
            "prompt must be a non-empty string or list of token ids (one prompt per request), "
            f"got {_shown(prompt)}",
            "prompt",
        )
    logprobs = _optional(body, "logprobs", int, 0, 0, "0 (the chosen tokens' logprobs)")
    max_tokens = _optional(body, "max_tokens", int, 1, None, "1 or more")
    return _request(body, logprobs is not None, 16 if max_tokens is None else max_tokens, prompt)


def parse_chat(body: dict[str, Any], default_max_tokens: int) -> GenerationRequest:
    """Check a `POST /v1/chat/completions` body; `default_max_tokens` when none is given."""
    check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestFieldError(
            f"messages must be a non-empty list, got {_shown(messages)}", "messages"
        )
    checked = [_message(message, index) for index, message in enumerate(messages)]
    logprobs = _optional(body, "logprobs", bool, None, None, "true or false")
    _optional(body, "top_logprobs", int, 0, 0, "0 (alternatives are not implemented)")
    limits = [
        _optional(body, name, int, 1, None, "1 or more")
        for name in ("max_tokens", "max_completion_tokens")
    ]
    given = [limit for limit in limits if limit is not None]
    max_tokens = min(given) if given else default_max_tokens
    request = _request(body, bool(logprobs), max_tokens, None)
    return replace(request, messages=checked, has_max_tokens=bool(given))


def fit_default_max_tokens(
    request: GenerationRequest, prompt_tokens: int, max_positions: int | None
) -> GenerationRequest:
    """A chat request without max_tokens gets at most what the model's positions leave.

    OpenAI's default is "as many as fit"; the configured default may not fit after a long
    prompt, and the request would be refused for a limit its sender never set.
    """
    room = None if max_positions is None else max(max_positions - prompt_tokens, 1)
    if request.has_max_tokens or room is None or room >= request.sampling.max_tokens:
        return request
    return replace(request, sampling=replace(request.sampling, max_tokens=room))


def _request(
    body: dict[str, Any], logprobs: bool, max_tokens: int, prompt: str | list[int] | None
) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestFieldError(
            f"model must name an adapter, or {BASE_ADAPTER!r} for the base; got {_shown(model)}",
            "model",
        )
    stream = _optional(body, "stream", bool, None, None, "true or false") or False
    sampling = SamplingParams(
        temperature=_float(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_float(body, "top_p", 1.0, math.ulp(0.0), 1.0),
        top_k=_optional(body, "top_k", int, 0, None, "0 (no limit) or more") or 0,
        seed=_optional(body, "seed", int, None, None, "an integer"),
        max_tokens=max_tokens,
        stop=_stop(body.get("stop")),
        logprobs=logprobs,
    )
    return GenerationRequest(
        model=model,
        adapter=_adapter(model, body.get("lorakit")),
        sampling=sampling,
        stream=stream,
        include_usage=_include_usage(body.get("stream_options"), stream),
        prompt=prompt,
    )


def _adapter(model: str, extra: object) -> AdapterSpec:
    """None for the base, the adapter's name, or a blend from ``"lorakit": {"blend": ...}``."""
    if extra is None:
        return None if model == BASE_ADAPTER else model
    blend = extra.get("blend") if isinstance(extra, dict) and set(extra) == {"blend"} else None
    is_blend = isinstance(blend, dict) and bool(blend)
    if not is_blend or not all(_is_number(weight) for weight in blend.values()):  # type: ignore[union-attr]
        raise RequestFieldError(
            'lorakit must be {"blend": {adapter name: weight, ...}} with finite numbers as '
            f"weights, got {_shown(extra)}",
            "lorakit",
        )
    if model != BASE_ADAPTER:
        raise RequestFieldError(
            f"a blend applies to the base: send model {BASE_ADAPTER!r} with it, not {model!r}",
            "model",
        )
    return {str(name): float(weight) for name, weight in blend.items()}  # type: ignore[union-attr]


def _message(message: object, index: int) -> dict[str, str]:
    """One chat message as {"role", "content"}; content parts of type text are joined."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or set(message) - {"role", "content"}:
        raise RequestFieldError(
            f"{param} must be an object with role and content only, got {_shown(message)}",
            param,
        )
    role, content = message.get("role"), message.get("content")
    if isinstance(content, list) and all(
        isinstance(part, dict)
        and set(part) == {"type", "text"}
        and part["type"] == "text"
        and isinstance(part["text"], str)
        for part in content
    ):
        content = "".join(part["text"] for part in content)
    if role not in CHAT_ROLES or not isinstance(content, str):
        raise RequestFieldError(
            f"{param} needs role in {list(CHAT_ROLES)} and content as a string or text parts, "
            f"got role={_shown(role)}, content={_shown(content)}",
            param,
        )
    return {"role": role, "content": content}


def _stop(stop: object) -> tuple[str, ...]:
    if stop is None:
        return ()
    strings = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(strings, list)
        or len(strings) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and s for s in strings)
    ):
        raise RequestFieldError(
            f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them, "
            f"got {_shown(stop)}",
            "stop",
        )
    return tuple(strings)


def _include_usage(options: object, stream: bool) -> bool:
    if options is None:
        return False
    include = options.get("include_usage") if isinstance(options, dict) else None
    if not stream or not isinstance(options, dict) or set(options) != {"include_usage"}:
        raise RequestFieldError(
            'stream_options must be {"include_usage": true|false}, with "stream": true; '
            f"got {_shown(options)}",
            "stream_options",
        )
    if not isinstance(include, bool):
        raise RequestFieldError(
            f"stream_options.include_usage must be true or false, got {_shown(include)}",
            "stream_options",
        )
    return include


def _float(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not low <= value <= high:
        raise RequestFieldError(
            f"{name} must be a number in [{low:g}, {high:g}], got {_shown(value)}", name
        )
    return float(value)


def _optional(
    body: dict[str, Any], name: str, kind: type, low: int | None, high: int | None, allowed: str
) -> Any:
    """The value of an int or bool field in [low, high], or None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    is_kind = isinstance(value, bool) if kind is bool else _is_int(value)
    in_range = (low is None or value >= low) and (high is None or value <= high)
    if not is_kind or not in_range:
        raise RequestFieldError(f"{name} must be {allowed}, got {_shown(value)}", name)
    return value


def _is_neutral(value: object, neutral: object) -> bool:
    """True when `value` is the no-op value `neutral` (1 and 1.0 alike; True is not 1)."""
    if isinstance(neutral, bool | dict):
        return type(value) is type(neutral) and value == neutral
    return _is_number(value) and value == neutral


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    is_real = isinstance(value, int | float) and not isinstance(value, bool)
    return is_real and math.isfinite(value)  # type: ignore[arg-type]


def _shown(value: object, limit: int = 80) -> str:
    """A value for an error message, cut to `limit` characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_classification(body: dict[str, Any]) -> tuple[str, list[str]]:
    """`POST /v1/classifications`'s {"model", "input": text or list of texts}."""
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    model = body.get("model")
    valid = isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)
    if set(body) != {"model", "input"} or not isinstance(model, str) or not valid:
        raise RequestFieldError(
            'POST /v1/classifications takes {"model": ADAPTER or "base", "input": TEXT or '
            f"[TEXT, ...]}}; got the fields {sorted(body)}"
        )
    return model, texts  # type: ignore[return-value]
