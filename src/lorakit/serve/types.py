"""The plain records the engine takes and returns: sampling settings, events, adapter facts."""

from __future__ import annotations

from dataclasses import dataclass, field

# The adapter name that means "no adapter" in requests (as in the `model` field of the API).
BASE_ADAPTER = "base"
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
# Not in the contract's list: the engine's forward raised (logged); the request ends.
FINISH_ERROR = "error"


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops.

    `temperature=0` is greedy decoding (argmax, ties to the lowest token id, as
    `transformers`' `generate`). Otherwise tokens are drawn from the softmax of the logits
    divided by `temperature`, restricted to the `top_k` most likely tokens (0: all) and to the
    smallest set whose probability reaches `top_p` (1: all). A `seed` makes a request's draws
    reproducible: each request owns a generator seeded with it.

    Args:
        temperature: 0 for greedy, else > 0.
        top_p: In (0, 1].
        top_k: 0 (no limit) or a positive number of tokens.
        seed: Seed of the request's own generator; None draws one from torch's global generator.
        max_tokens: Most tokens generated (>= 1); reaching it finishes with "length".
        stop: Strings that end the completion ("stop"); the text returned stops before them.
        logprobs: Report each chosen token's log-probability under the model (the log-softmax
            of the raw logits, before temperature and filtering).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(
                f"SamplingParams.stop must be a tuple of non-empty strings, got {self.stop!r}; "
                'write stop=("\\n",) for one string.'
            )
        object.__setattr__(self, "stop", tuple(self.stop))
        checks = (
            (self.temperature >= 0, "temperature", "0 (greedy) or more"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (self.top_k >= 0, "top_k", "0 (no limit) or more"),
            (self.max_tokens >= 1, "max_tokens", "1 or more"),
        )
        for is_valid, name, allowed in checks:
            if not is_valid:
                raise ValueError(
                    f"SamplingParams.{name}={getattr(self, name)!r} is not allowed: it must be "
                    f"{allowed}."
                )

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of a request, in order; the last event has a `finish_reason`.

    Attributes:
        token_id: The token chosen (-1 on the final event of a cancelled request, which
            carries no token).
        text: The text this token adds to the completion (may be "" while a multi-byte
            character or a possible stop string is incomplete; held text comes later).
        logprob: The token's log-probability when `SamplingParams.logprobs` is set, else None.
        finish_reason: None, or "stop" (end-of-sequence token or stop string), "length"
            (`max_tokens`), "cancelled", or "error" (the engine's forward failed; logged).
    """

    token_id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True)
class AdapterInfo:
    """What the engine knows about one loaded adapter.

    Attributes:
        name: The name requests use.
        path: The folder it was read from.
        r: Its rank (the largest one when `rank_pattern` gives others).
        lora_alpha: Its alpha.
        target_modules: The module paths of the base it adapts.
        task: "causal_lm" or "seq_cls".
    """

    name: str
    path: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    task: str


@dataclass(frozen=True)
class Completion:
    """The result of `Engine.generate` for one prompt."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None = None


@dataclass(frozen=True)
class Classification:
    """The result of `Engine.classify` for one text: the best label and every label's prob."""

    label: str
    scores: dict[str, float] = field(default_factory=dict)


AdapterSpec = str | dict[str, float] | None


__all__ = [
    "BASE_ADAPTER",
    "AdapterInfo",
    "AdapterSpec",
    "Classification",
    "Completion",
    "SamplingParams",
    "TokenEvent",
]
