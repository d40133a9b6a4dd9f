"""`Engine`: one base model, many LoRA adapters, continuous batching of mixed requests.

The engine holds its own copy of the base with every targeted Linear/Conv1D replaced by a
`serve.bank.AdapterBank` (the loaded adapters' factors stacked per layer), so a batch whose rows
use different adapters, blends or none runs each layer once (see `lorakit.ops.gathered_lora`).
A background scheduler thread (`start`) admits waiting requests into the running batch at every
step, prefills them, decodes one token for every running row with a KV cache, and retires
finished or cancelled rows (`serve.scheduler`). Without the thread, `generate` runs the same
steps in the calling thread.

Two locks: the queue lock (a condition) guards the waiting queue, the adapter registry and the
counters; the model lock serialises forwards and bank changes, so adapters load and unload
between steps.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lorakit.errors import AdapterInUseError, QueueFullError, ServeError
from lorakit.extras import import_optional
from lorakit.serve.adapters import TASK_CAUSAL_LM, TASK_SEQ_CLS, LoadedAdapter, read_adapter
from lorakit.serve.bank import ModelBanks
from lorakit.serve.detokenize import TextStream
from lorakit.serve.handle import RequestHandle
from lorakit.serve.loading import PURPOSE, eos_token_ids, load_base, max_positions, text_config
from lorakit.serve.requests import (
    RequestLimits,
    check_limit,
    check_loaded,
    check_prompt,
    classifications,
    collect_completion,
    row_choice,
)
from lorakit.serve.routing import BatchRouting, RowChoice
from lorakit.serve.sampling import request_generator
from lorakit.serve.scheduler import Scheduler, Sequence_
from lorakit.serve.types import (
    BASE_ADAPTER,
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

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: str,
        *,
        max_batch_size: int,
        max_queue: int,
        max_prompt_tokens: int,
        max_new_tokens: int,
        reserve_rank: int = 0,
    ) -> None:
        if not isinstance(reserve_rank, int) or reserve_rank < 0:
            raise ServeError(
                f"reserve_rank={reserve_rank!r} is not allowed: it must be an int >= 0 (rows "
                "each adapted layer reserves for adapters, e.g. 8 adapters of r=16: 128)."
            )
        for name, value in (
            ("max_batch_size", max_batch_size),
            ("max_queue", max_queue),
            ("max_prompt_tokens", max_prompt_tokens),
            ("max_new_tokens", max_new_tokens),
        ):
            if not isinstance(value, int) or value < 1:
                raise ServeError(f"{name}={value!r} is not allowed: it must be an int >= 1.")
        self._model = model
        self._tokenizer = tokenizer
        self._task = task
        self.max_queue = max_queue
        self.max_prompt_tokens = max_prompt_tokens
        self._device = next(model.parameters()).device
        self._dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        self._limits = RequestLimits(
            vocab_size=int(text_config(model).vocab_size),
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            max_positions=max_positions(model),
            has_tokenizer=tokenizer is not None,
        )
        self._modules = dict(model.named_modules())
        self._routing = BatchRouting()
        self._banks = ModelBanks(self._modules, self._routing, reserve_rank)
        self._adapters: dict[str, LoadedAdapter] = {}
        self._unloading: set[str] = set()
        self._users: Counter[str] = Counter()
        self._per_adapter_requests: Counter[str] = Counter()
        self._requests_total = 0
        self._next_id = 0
        self._queue = threading.Condition(threading.RLock())
        self._model_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._is_stopping = False
        self._is_draining = True
        transformers = import_optional("transformers", "serve", PURPOSE)
        self._scheduler = Scheduler(
            model,
            self._routing,
            transformers.DynamicCache,
            eos_token_ids(model, tokenizer),
            max_batch_size,
            self._on_finish,
        )

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
        reserve_rank: int = 0,
    ) -> Engine:
        """Load a base (folder or transformers model) and build an engine around a copy of it.

        Args:
            base: A folder written by `save_pretrained`, or a transformers model (causal LM or
                sequence classification), which is copied (the caller's model is not changed).
            tokenizer: Default: `AutoTokenizer` from the folder. With a model and no
                tokenizer, completions carry token ids only (empty text) and `generate`,
                `chat_prompt`, `classify` and stop strings are refused.
            dtype: torch.float32, torch.bfloat16 or torch.float16.
            load_in_4bit: Quantize the base's linear layers (all but lm_head) to NF4 with
                double quantization (`lorakit.quant`), computing in `dtype`.
            max_batch_size: Rows decoded together.
            max_queue: Waiting requests beyond this raise `QueueFullError`.
            max_prompt_tokens: Longest prompt accepted.
            max_new_tokens: Largest `max_tokens` accepted.
            device: Where the model runs.
            reserve_rank: Rows every adapted layer reserves for adapters' factors at its first
                load (the sum of the ranks you plan to load there, e.g. 8 adapters of r=16:
                128): loads then write only their own rows until the reserve is full. With 0,
                a layer's stacks start at the first adapter's rank and double when full.

        Raises:
            ServeError: The base is neither a causal LM nor a sequence classifier, or an
                option has a value the engine cannot use.
        """
        model, tokenizer, task = load_base(
            base, tokenizer, dtype, load_in_4bit, torch.device(device)
        )
        return cls(
            model,
            tokenizer,
            task,
            max_batch_size=max_batch_size,
            max_queue=max_queue,
            max_prompt_tokens=max_prompt_tokens,
            max_new_tokens=max_new_tokens,
            reserve_rank=reserve_rank,
        )

    @property
    def task(self) -> str:
        """ "causal_lm" or "seq_cls"."""
        return self._task

    @property
    def tokenizer(self) -> Any:
        """The tokenizer prompts are encoded and completions decoded with (None: none)."""
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        """The engine's own copy of the base, with its adapter banks installed."""
        return self._model

    # Adapters -------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str | os.PathLike[str]) -> AdapterInfo:
        """Load the PEFT adapter folder `path` under `name`; safe while requests run.

        The folder is read and checked first (nothing changes if that fails); the banks then
        take the adapter between two scheduler steps.

        Raises:
            ServeError: `name` is empty, "base" or already loaded, or the adapter uses a
                feature the engine does not serve (named), or does not fit the base.
            AdapterFileError: The folder or its files are missing or corrupt.
        """
        if not isinstance(name, str) or not name or name == BASE_ADAPTER:
            raise ServeError(
                f"Adapter name {name!r} is not allowed: use a non-empty name other than "
                f"{BASE_ADAPTER!r} (which means the base model)."
            )
        with self._queue:
            if name in self._adapters:
                raise ServeError(
                    f"An adapter named {name!r} is loaded already (from "
                    f"{self._adapters[name].info.path}). Fix: unload it first, or pick "
                    "another name."
                )
        weights = read_adapter(name, path, self._task, self._modules, self._dtype, self._device)
        with self._model_lock, self._queue:
            if name in self._adapters:
                raise ServeError(f"An adapter named {name!r} was loaded meanwhile.")
            self._banks.add(weights)
            # The banks hold copies of the tensors: the registry keeps facts only.
            self._adapters[name] = LoadedAdapter(weights.info, weights.tensor_bytes())
        return weights.info

    def unload_adapter(self, name: str, wait: bool = True, timeout: float | None = None) -> None:
        """Remove adapter `name`; new requests for it are refused from now on.

        Args:
            name: A loaded adapter.
            wait: Wait until the running and waiting requests that use it finish (the
                scheduler thread must run); with False an adapter in use is not unloaded and
                `AdapterInUseError` is raised.
            timeout: Seconds to wait at most (None: no limit).

        Raises:
            UnknownAdapterError: `name` is not loaded.
            AdapterInUseError: Requests still use it (wait=False, the timeout passed, or the
                scheduler thread is not running to finish them).
        """
        with self._queue:
            check_loaded(name, self._adapters, self._unloading)
            users = self._users[name]
            if users and (not wait or not self.is_running):
                why = "wait=False" if not wait else "the engine is not started (call start())"
                raise AdapterInUseError(
                    f"Adapter {name!r} is used by {users} running or waiting request(s) and "
                    f"{why}. Fix: unload it with wait=True once the engine runs, or later."
                )
            self._unloading.add(name)
            is_free = self._queue.wait_for(lambda: self._users[name] == 0, timeout)
            if not is_free:
                self._unloading.discard(name)
                raise AdapterInUseError(
                    f"Adapter {name!r} is still used by {self._users[name]} request(s) after "
                    f"{timeout} s; it stays loaded. Fix: wait longer (timeout=None) or cancel them."
                )
        with self._model_lock, self._queue:
            self._banks.remove(name)
            del self._adapters[name]
            self._unloading.discard(name)

    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by name."""
        with self._queue:
            return {name: weights.info for name, weights in self._adapters.items()}

    def adapter_bytes(self, name: str) -> int:
        """Bytes of the tensors the engine holds for adapter `name`."""
        with self._queue:
            check_loaded(name, self._adapters, self._unloading)
            return self._adapters[name].tensor_bytes

    def _row_choice(self, adapter: AdapterSpec) -> RowChoice:
        return row_choice(adapter, self._adapters, self._unloading)

    def _check_prompt(self, prompt: Sequence[int], sampling: SamplingParams) -> list[int]:
        if self._task != TASK_CAUSAL_LM:
            raise ServeError(
                f"This engine's base is a {self._task} model: it classifies (Engine.classify) "
                "and does not generate."
            )
        return check_prompt(prompt, sampling, self._limits)

    # Requests ---------------------------------------------------------------------------

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
            ServeError: The engine's base is a classifier (use `classify`).
        """
        sampling = sampling if sampling is not None else SamplingParams()
        prompt = self._check_prompt(prompt_token_ids, sampling)
        with self._queue:
            choice = self._row_choice(adapter)
            if self._is_stopping:
                raise ServeError("The engine is shutting down; it takes no new requests.")
            if len(self._scheduler.waiting) >= self.max_queue:
                raise QueueFullError(
                    f"The engine's queue holds {self.max_queue} waiting requests (max_queue). "
                    "Fix: retry later, or build the engine with a larger max_queue."
                )
            handle = RequestHandle(self._next_id, len(prompt))
            self._next_id += 1
            sequence = Sequence_(
                handle=handle,
                prompt=prompt,
                choice=choice,
                params=sampling,
                generator=request_generator(sampling, self._device),
                stream=TextStream(self._tokenizer, sampling.stop),
            )
            self._scheduler.waiting.append(sequence)
            self._requests_total += 1
            for name in sequence.adapter_names or (BASE_ADAPTER,):
                self._per_adapter_requests[name] += 1
            self._users.update(sequence.adapter_names)
            self._queue.notify_all()
        return handle

    def _on_finish(self, sequence: Sequence_) -> None:
        with self._queue:
            self._users.subtract(sequence.adapter_names)
            self._queue.notify_all()

    # The scheduler loop -------------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        """True while the background scheduler thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the background scheduler thread (does nothing if it runs)."""
        with self._queue:
            if self.is_running:
                return
            self._is_stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the scheduler thread and take no new requests.

        Args:
            drain: Let running and waiting requests finish first; with False they end now
                with finish_reason "cancelled".
            timeout: Seconds to wait for the thread at most (None: no limit).
        """
        with self._queue:
            self._is_stopping = True
            self._is_draining = drain
            self._queue.notify_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        if not self.is_running:
            with self._model_lock, self._queue:
                self._scheduler.cancel_all()

    def _loop(self) -> None:
        while True:
            with self._queue:
                while not self._scheduler.has_work() and not self._is_stopping:
                    self._queue.wait()
                if self._is_stopping and not (self._is_draining and self._scheduler.has_work()):
                    return
                joined = self._scheduler.admit()
            with self._model_lock:
                self._scheduler.step(joined)

    def _run_steps(self, steps: int) -> None:
        """Run `steps` scheduler steps in this thread (no thread running; for tests)."""
        for _ in range(steps):
            with self._queue:
                joined = self._scheduler.admit()
            with self._model_lock:
                self._scheduler.step(joined)

    def _run_inline(self, handles: Sequence[RequestHandle]) -> None:
        """Run scheduler steps in this thread until `handles` finish (no thread running)."""
        while not all(h.is_finished for h in handles):
            with self._queue:
                joined = self._scheduler.admit()
            with self._model_lock:
                self._scheduler.step(joined)

    # Synchronous helpers ----------------------------------------------------------------

    def _require_tokenizer(self, what: str) -> Any:
        if self._tokenizer is None:
            raise ServeError(f"{what} needs a tokenizer; build the engine with tokenizer=...")
        return self._tokenizer

    def generate(
        self,
        prompts: Sequence[str],
        adapters: Sequence[AdapterSpec] | None = None,
        sampling: SamplingParams | None = None,
    ) -> list[Completion]:
        """Encode, run together and decode `prompts` (one adapter spec per prompt).

        With the scheduler thread running the requests join its batch; otherwise the steps
        run in this thread.
        """
        tokenizer = self._require_tokenizer("Engine.generate")
        specs = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(specs)} adapters; give one each.")
        handles = [
            self.submit(tokenizer(prompt)["input_ids"], spec, sampling)
            for prompt, spec in zip(prompts, specs, strict=True)
        ]
        if not self.is_running:
            self._run_inline(handles)
        return [collect_completion(handle) for handle in handles]

    def prompt_logits(
        self, prompts: Sequence[Sequence[int]], adapters: Sequence[AdapterSpec] | None = None
    ) -> list[torch.Tensor]:
        """Logits (len, vocab) at every position of each prompt, in one mixed-batch forward.

        Rows use their own adapter, blend or the base, as in generation (same banks, same
        left padding); useful for scoring and for checking the engine against references.
        """
        specs = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(specs)} adapters; give one each.")
        checked = [self._check_prompt(p, SamplingParams(max_tokens=1)) for p in prompts]
        with self._queue:
            choices = [self._row_choice(spec) for spec in specs]
        with self._model_lock:
            return self._scheduler.prompt_logits(checked, choices)

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> list[int]:
        """Token ids of `messages` through the tokenizer's chat template, ready to answer."""
        tokenizer = self._require_tokenizer("Engine.chat_prompt")
        if not getattr(tokenizer, "chat_template", None):
            raise ServeError(
                "The tokenizer has no chat template, so chat messages cannot be encoded. "
                "Fix: use a tokenizer with one (tokenizer.chat_template) or send plain prompts."
            )
        encoded = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True
        )
        ids = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(t) for t in ids]

    @torch.no_grad()
    def classify(self, texts: Sequence[str], adapter: str | None = None) -> list[Classification]:
        """Labels and per-label probabilities of `texts` under a classification adapter.

        Raises:
            ServeError: The base is not a sequence classifier, or there is no tokenizer.
            UnknownAdapterError: `adapter` is not loaded.
            RequestTooLargeError: A text is longer than `max_prompt_tokens` tokens.
        """
        if self._task != TASK_SEQ_CLS:
            raise ServeError(
                f"This engine's base is a {self._task} model; classify needs a sequence "
                "classification base (…ForSequenceClassification)."
            )
        if adapter is not None and not isinstance(adapter, str):
            raise ValueError(f"classify takes one adapter name or None, got {adapter!r}.")
        tokenizer = self._require_tokenizer("Engine.classify")
        encoded = tokenizer(list(texts), padding=True, return_tensors="pt")
        length = encoded["input_ids"].shape[1]
        fix = "Fix: shorten the text."
        check_limit(length, self.max_prompt_tokens, "A text's length in tokens", fix)
        inputs = {key: value.to(self._device) for key, value in encoded.items()}
        with self._queue:
            choice = self._row_choice(adapter)
            self._requests_total += len(texts)
            self._per_adapter_requests[adapter or BASE_ADAPTER] += len(texts)
        with self._model_lock:
            self._routing.set_rows([choice] * len(texts), length)
            logits = self._model(**inputs).logits
        return classifications(logits, text_config(self._model).id2label)

    def stats(self) -> dict[str, Any]:
        """queue_depth, running, batch_size_last, tokens_generated_total, requests_total,
        per_adapter_requests {name: n}, adapters_loaded."""
        with self._queue:
            return {
                "queue_depth": len(self._scheduler.waiting),
                "running": len(self._scheduler.running),
                "batch_size_last": self._scheduler.batch_size_last,
                "tokens_generated_total": self._scheduler.tokens_generated_total,
                "requests_total": self._requests_total,
                "per_adapter_requests": dict(self._per_adapter_requests),
                "adapters_loaded": len(self._adapters),
            }
