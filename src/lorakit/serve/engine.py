"""`Engine`: one base model, many LoRA adapters, continuous batching of mixed requests.

The engine holds its own copy of the base with every targeted Linear/Conv1D replaced by a
`serve.bank.AdapterBank` (the loaded adapters' factors stacked per layer), so a batch whose rows
use different adapters, blends or none runs each layer once (see `lorakit.ops.gathered_lora`).
A background scheduler thread admits waiting requests into the running batch at every step,
prefills them, decodes one token for every running row with a per-row KV cache, and retires
finished or cancelled rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from lorakit.serve.handle import RequestHandle
from lorakit.serve.types import (
    AdapterInfo,
    AdapterSpec,
    Classification,
    Completion,
    SamplingParams,
)


class Engine:
    """Serve one base with many adapters (see the module docstring).

    Build it with `Engine.from_pretrained`. Requests go in with `submit` (thread-safe) and
    come out as `TokenEvent`s from their `RequestHandle`; `generate`, `classify` and
    `chat_prompt` are synchronous helpers.
    """

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike[str] | torch.nn.Module,
        tokenizer: Any = None,
        *,
        dtype: torch.dtype = torch.float32,
        load_in_4bit: bool = False,
        max_batch_size: int = 16,
        max_queue: int = 64,
        max_prompt_tokens: int = 2048,
        max_new_tokens: int = 1024,
        device: str | torch.device = "cpu",
    ) -> Engine:
        """Load a base (folder or transformers model) and build an engine around a copy of it.

        Args:
            base: A folder written by `save_pretrained`, or a transformers model (causal LM or
                sequence classification), which is copied (the caller's model is not changed).
            tokenizer: Default: `AutoTokenizer` from the folder (required for a model).
            dtype: torch.float32 or torch.bfloat16.
            load_in_4bit: Quantize the base's linear layers to NF4 (`lorakit.quant`).
            max_batch_size: Rows decoded together.
            max_queue: Waiting requests beyond this raise `QueueFullError`.
            max_prompt_tokens: Longest prompt accepted.
            max_new_tokens: Largest `max_tokens` accepted.
            device: Where the model runs.

        Raises:
            ServeError: The base is neither a causal LM nor a sequence classifier, or an
                option has a value the engine cannot use.
        """
        raise NotImplementedError

    @property
    def task(self) -> str:
        """ "causal_lm" or "seq_cls"."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded and completions decoded with."""
        raise NotImplementedError

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> AdapterInfo:
        """Load the PEFT adapter folder `path` under `name`; safe while requests run.

        Raises:
            ServeError: `name` is taken or reserved, or the adapter uses a feature the engine
                does not serve (named), or does not fit the base.
        """
        raise NotImplementedError

    def unload_adapter(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        """Remove adapter `name`; new requests for it are refused from now on.

        Args:
            name: A loaded adapter.
            wait: Wait until the running and waiting requests that use it finish; with False
                an adapter in use is not unloaded and `AdapterInUseError` is raised.
            timeout: Seconds to wait at most (None: no limit).

        Raises:
            UnknownAdapterError: `name` is not loaded.
            AdapterInUseError: Requests still use it (wait=False, or the timeout passed).
        """
        raise NotImplementedError

    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the background scheduler thread (does nothing if it runs)."""
        raise NotImplementedError

    def shutdown(self, drain: bool = True) -> None:
        """Stop the scheduler: with `drain`, running and waiting requests finish first;
        without, they end with finish_reason "cancelled"."""
        raise NotImplementedError

    def submit(
        self,
        prompt_token_ids: Sequence[int],
        adapter: AdapterSpec = None,
        sampling: SamplingParams | None = None,
    ) -> RequestHandle:
        """Queue a generation request; its tokens come from the returned handle.

        Args:
            prompt_token_ids: The prompt's token ids (at least one).
            adapter: None or "base" (no adapter), a loaded adapter's name, or a blend
                {name: weight} (the base plus Σ wᵢ·sᵢ·BᵢAᵢ).
            sampling: Default `SamplingParams()`.

        Raises:
            UnknownAdapterError: An adapter named is not loaded.
            QueueFullError: `max_queue` requests wait already.
            RequestTooLargeError: The prompt or `max_tokens` is over the limits.
            ValueError: An empty prompt, a token id outside the vocabulary, or a bad blend.
        """
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[str],
        adapters: Sequence[AdapterSpec] | None = None,
        sampling: SamplingParams | None = None,
    ) -> list[Completion]:
        """Encode, run together and decode `prompts` (one adapter spec per prompt)."""
        raise NotImplementedError

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of `messages` through the tokenizer's chat template, ready to answer."""
        raise NotImplementedError

    def classify(self, texts: Sequence[str], adapter: str | None = None) -> list[Classification]:
        """Labels and per-label probabilities of `texts` under a classification adapter."""
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """queue_depth, running, batch_size_last, tokens_generated_total, requests_total,
        per_adapter_requests {name: n}."""
        raise NotImplementedError
