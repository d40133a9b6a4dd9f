"""Checking a request before it queues: its prompt, limits and adapter choice."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch

from lorakit.errors import RequestTooLargeError, UnknownAdapterError, closest_names
from lorakit.serve.handle import RequestHandle
from lorakit.serve.routing import RowChoice
from lorakit.serve.types import (
    BASE_ADAPTER,
    AdapterSpec,
    Classification,
    Completion,
    SamplingParams,
)


@dataclass(frozen=True)
class RequestLimits:
    """What an engine accepts.

    Attributes:
        vocab_size: Token ids must lie in [0, vocab_size).
        max_prompt_tokens: Longest prompt.
        max_new_tokens: Largest `max_tokens`.
        max_positions: Longest prompt + completion the model's positions allow (None: any).
        has_tokenizer: Whether stop strings can be matched.
    """

    vocab_size: int
    max_prompt_tokens: int
    max_new_tokens: int
    max_positions: int | None
    has_tokenizer: bool


def check_limit(value: int, limit: int, what: str, fix: str) -> None:
    """Raise `RequestTooLargeError` when `value` exceeds `limit`, naming both and the fix."""
    if value > limit:
        raise RequestTooLargeError(f"{what} is {value}, over the engine's limit of {limit}. {fix}")


def check_prompt(
    prompt_token_ids: Sequence[int], sampling: SamplingParams, limits: RequestLimits
) -> list[int]:
    """The prompt as a list of ints, checked against `limits`.

    Raises:
        ValueError: An empty prompt, ids outside the vocabulary, stop strings without a
            tokenizer.
        RequestTooLargeError: The prompt, `max_tokens` or both together are over the limits.
    """
    prompt = [int(t) for t in prompt_token_ids]
    if not prompt:
        raise ValueError("The prompt is empty; give at least one token.")
    outside = [t for t in prompt if not 0 <= t < limits.vocab_size]
    if outside:
        raise ValueError(
            f"Prompt token ids {outside[:5]} are outside the vocabulary [0, {limits.vocab_size})."
        )
    if sampling.stop and not limits.has_tokenizer:
        raise ValueError("Stop strings need a tokenizer; this engine was built without one.")
    fix = "Fix: shorten the prompt or lower max_tokens."
    check_limit(len(prompt), limits.max_prompt_tokens, "The prompt's length", fix)
    check_limit(sampling.max_tokens, limits.max_new_tokens, "max_tokens", fix)
    if limits.max_positions is not None:
        total = len(prompt) + sampling.max_tokens
        what = "The prompt's length plus max_tokens (the model's positions)"
        check_limit(total, limits.max_positions, what, fix)
    return prompt


def check_loaded(name: str, loaded: Collection[str], unloading: Collection[str]) -> None:
    """Raise `UnknownAdapterError` unless `name` is loaded and not being unloaded."""
    if name in loaded and name not in unloading:
        return
    available = sorted(set(loaded) - set(unloading))
    hint = closest_names(name, available)
    raise UnknownAdapterError(
        f"Adapter {name!r} is not loaded"
        + (" (it is being unloaded)" if name in unloading else "")
        + f". Loaded adapters: {available or 'none'}"
        + (f"; did you mean {hint[0]!r}?" if hint else ".")
        + f" Use {BASE_ADAPTER!r} or None for the base model."
    )


def row_choice(
    adapter: AdapterSpec, loaded: Collection[str], unloading: Collection[str]
) -> RowChoice:
    """The routing choice of a request's adapter spec: () base, one adapter, or a blend.

    Raises:
        UnknownAdapterError: A name is not loaded.
        ValueError: Not a name, None or a non-empty {name: finite weight} mapping.
    """
    if adapter is None or adapter == BASE_ADAPTER:
        return ()
    if isinstance(adapter, str):
        check_loaded(adapter, loaded, unloading)
        return ((adapter, 1.0),)
    if not isinstance(adapter, Mapping) or not adapter:
        raise ValueError(
            "adapter must be None, 'base', an adapter name or a non-empty blend "
            f"{{name: weight}}; got {adapter!r}."
        )
    choice = []
    for name, weight in adapter.items():
        is_number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight):
            raise ValueError(
                f"Blend weight of {name!r} is {weight!r}; weights must be finite numbers."
            )
        if name == BASE_ADAPTER:
            raise ValueError(f"A blend names adapters only; {BASE_ADAPTER!r} is the base.")
        check_loaded(name, loaded, unloading)
        choice.append((name, float(weight)))
    return tuple(choice)


def collect_completion(handle: RequestHandle) -> Completion:
    """Iterate a request's events to its end and gather them into a `Completion`."""
    tokens, texts, logprobs = [], [], []
    reason = ""
    for event in handle:
        if event.token_id >= 0:
            tokens.append(event.token_id)
            logprobs.append(event.logprob)
        texts.append(event.text)
        reason = event.finish_reason or reason
    has_logprobs = bool(logprobs) and all(lp is not None for lp in logprobs)
    return Completion(
        text="".join(texts),
        token_ids=tokens,
        finish_reason=reason,
        logprobs=[float(lp) for lp in logprobs if lp is not None] if has_logprobs else None,
    )


def classifications(logits: torch.Tensor, id2label: Mapping[int, str]) -> list[Classification]:
    """One `Classification` per row of classifier logits (rows, labels): softmax, best label."""
    probs = torch.softmax(logits.float(), dim=-1)
    return [
        Classification(
            label=id2label[int(row.argmax())],
            scores={id2label[i]: float(p) for i, p in enumerate(row)},
        )
        for row in probs
    ]
