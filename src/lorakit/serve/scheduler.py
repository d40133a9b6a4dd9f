"""Continuous batching: admit waiting requests, prefill them, decode every row, retire rows.

One `step()` is one scheduler iteration: cancelled rows leave; waiting requests (up to
`max_batch_size` rows in all) are prefilled together in one forward (left-padded prompts) and
join the batch cache; then every running row decodes one token in one forward. Rows that end
(end-of-sequence token, stop string, `max_tokens`, cancel) leave and their cache rows are freed.
The caller serialises steps (the engine's model lock); `waiting` is filled by the engine
under its queue lock.
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.serve.detokenize import TextStream
from lorakit.serve.handle import RequestHandle
from lorakit.serve.kv import BatchCache
from lorakit.serve.routing import BatchRouting, RowChoice
from lorakit.serve.sampling import choose_tokens
from lorakit.serve.types import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    TokenEvent,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Sequence_:
    """One request's state in the scheduler."""

    handle: RequestHandle
    prompt: list[int]
    choice: RowChoice
    params: SamplingParams
    generator: torch.Generator | None
    stream: TextStream
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters the request uses."""
        return tuple(name for name, _ in self.choice)


class Scheduler:
    """The batch of running sequences and the two forwards of a step.

    Args:
        model: The engine's causal LM (banks installed).
        routing: The banks' shared routing.
        cache_class: transformers' `DynamicCache`.
        eos_token_ids: Tokens that end a completion ("stop").
        max_batch_size: Most rows running together.
        on_finish: Called with each sequence that leaves (the engine's bookkeeping).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        routing: BatchRouting,
        cache_class: Any,
        eos_token_ids: Sequence[int],
        max_batch_size: int,
        on_finish: Callable[[Sequence_], None],
    ) -> None:
        self.model = model
        self.routing = routing
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self.on_finish = on_finish
        self.device = next(model.parameters()).device
        self.waiting: deque[Sequence_] = deque()
        self.running: list[Sequence_] = []
        self.batch = BatchCache(cache_class)
        self._cache_class = cache_class
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.x names the cache argument `cache`; earlier versions `past_key_values`.
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_last_logits = "logits_to_keep" in parameters
        self.batch_size_last = 0
        self.tokens_generated_total = 0

    def has_work(self) -> bool:
        """True while requests wait or run."""
        return bool(self.waiting or self.running)

    def admit(self) -> list[Sequence_]:
        """Take waiting requests into the batch as far as it has room (cancelled ones end)."""
        joined: list[Sequence_] = []
        while self.waiting and len(self.running) + len(joined) < self.max_batch_size:
            sequence = self.waiting.popleft()
            if sequence.handle.is_cancelled:
                self._finish(sequence, FINISH_CANCELLED)
            else:
                joined.append(sequence)
        return joined

    def step(self, joined: Sequence[Sequence_]) -> None:
        """One iteration: retire cancelled rows, prefill `joined`, decode all running rows."""
        try:
            self._retire([s for s in self.running if s.handle.is_cancelled], FINISH_CANCELLED)
            if joined:
                self._prefill(list(joined))
            if self.running:
                self._decode()
        except Exception:
            logger.exception("The engine's forward failed; its running requests end")
            failed = self.running + [s for s in joined if s not in self.running]
            self.running = []
            self.batch.keep_rows([])
            for sequence in failed:
                if sequence.finish_reason is None:
                    self._finish(sequence, FINISH_ERROR)

    def cancel_all(self) -> None:
        """End every waiting and running request with "cancelled"."""
        while self.waiting:
            self._finish(self.waiting.popleft(), FINISH_CANCELLED)
        self._retire(list(self.running), FINISH_CANCELLED)

    def _left_padded(
        self, prompts: Sequence[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, position ids), each (rows, longest prompt), prompts padded on the left."""
        length = max(len(prompt) for prompt in prompts)
        ids = torch.zeros(len(prompts), length, dtype=torch.long)
        mask = torch.zeros(len(prompts), length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt) :] = torch.tensor(prompt)
            mask[row, length - len(prompt) :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    @torch.no_grad()
    def prompt_logits(
        self, prompts: Sequence[list[int]], choices: Sequence[RowChoice]
    ) -> list[torch.Tensor]:
        """Every position's logits (len, vocab) of each prompt, all in one mixed forward."""
        ids, mask, positions = self._left_padded(prompts)
        self.routing.set_rows(choices, ids.shape[1])
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
        length = ids.shape[1]
        return [output.logits[row, length - len(p) :] for row, p in enumerate(prompts)]

    @torch.no_grad()
    def _prefill(self, joined: list[Sequence_]) -> None:
        # Rows of one adapter (or blend) next to each other: the banks' sliced route then
        # multiplies each adapter's rows as one slice.
        joined = sorted(joined, key=self._row_key)
        ids, mask, positions = self._left_padded([s.prompt for s in joined])
        self.routing.set_rows([s.choice for s in joined], ids.shape[1])
        output = self._forward(ids, mask, positions, self._cache_class())
        self.batch.add_rows(self._output_cache(output), mask)
        self.running += joined
        self._take_tokens(joined, output.logits[:, -1])

    def _row_key(self, sequence: Sequence_) -> tuple[tuple[int, ...], RowChoice]:
        """Adapters in stack order (`row_order_key`), then equal choices (weights) together."""
        return self.routing.row_order_key(sequence.choice), sequence.choice

    def _order_rows(self) -> None:
        """Keep the running rows grouped by adapter, in stack order (`row_order_key`), so that
        decoding reads each adapter's rows in place; reorders the cache only when a join or a
        load broke that order."""
        keys = [self._row_key(s) for s in self.running]
        order = sorted(range(len(keys)), key=keys.__getitem__)
        if order != list(range(len(keys))):
            self.running = [self.running[row] for row in order]
            self.batch.keep_rows(order)

    @torch.no_grad()
    def _decode(self) -> None:
        self._order_rows()
        last = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)
        self.routing.set_rows([s.choice for s in self.running], 1)
        self.batch_size_last = len(self.running)
        output = self._forward(
            last, self.batch.step_mask(), self.batch.positions(), self.batch.cache
        )
        self.batch.advance()
        self._take_tokens(list(self.running), output.logits[:, -1])

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> Any:
        """One forward of the model over `ids` (rows, seq) appending to `cache`."""
        kwargs: dict[str, Any] = {self._cache_keyword: cache}
        if self._keeps_last_logits:
            kwargs["logits_to_keep"] = 1
        return self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        )

    def _output_cache(self, output: Any) -> Any:
        return getattr(output, self._cache_keyword)

    def _take_tokens(self, sequences: list[Sequence_], logits: torch.Tensor) -> None:
        """Choose, send and check each row's next token; retire the rows that end."""
        tokens, logprobs = choose_tokens(
            logits, [s.params for s in sequences], [s.generator for s in sequences]
        )
        ended: list[Sequence_] = []
        for sequence, token, logprob in zip(sequences, tokens, logprobs, strict=True):
            sequence.generated.append(token)
            self.tokens_generated_total += 1
            text, is_stopped = sequence.stream.add(token)
            reason = None
            if is_stopped or token in self.eos_token_ids:
                reason = FINISH_STOP
            elif len(sequence.generated) >= sequence.params.max_tokens:
                reason = FINISH_LENGTH
            if reason is not None:
                text += sequence.stream.flush()
                sequence.finish_reason = reason
                ended.append(sequence)
            sequence.handle.push(TokenEvent(token, text, logprob, reason))
            if reason is not None:
                self.on_finish(sequence)
        if ended:
            self._drop(ended)

    def _retire(self, sequences: list[Sequence_], reason: str) -> None:
        if not sequences:
            return
        self._drop(sequences)
        for sequence in sequences:
            self._finish(sequence, reason)

    def _drop(self, sequences: list[Sequence_]) -> None:
        """Remove `sequences` from the running batch and free their cache rows."""
        leaving = set(map(id, sequences))
        kept = [row for row, s in enumerate(self.running) if id(s) not in leaving]
        self.running = [self.running[row] for row in kept]
        self.batch.keep_rows(kept)

    def _finish(self, sequence: Sequence_, reason: str) -> None:
        """End a request that generated no final token: an event with no token."""
        sequence.finish_reason = reason
        sequence.handle.push(TokenEvent(-1, sequence.stream.flush(), None, reason))
        self.on_finish(sequence)
