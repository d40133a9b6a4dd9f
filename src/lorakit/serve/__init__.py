"""Serving many adapters on one base: the engine (`Engine`) and, on top, the HTTP server.

Nothing in lorakit's core imports this package; it imports transformers lazily. The engine's
interface (`Engine`, `SamplingParams`, `RequestHandle`, `TokenEvent`, `AdapterInfo`,
`Completion`, `Classification` and the errors `ServeError`, `UnknownAdapterError`,
`QueueFullError`, `RequestTooLargeError`, `AdapterInUseError` of `lorakit.errors`) is the
contract the server is written against; changes to it are noted here.

Additions to the contract (nothing in it changed):
- `TokenEvent.finish_reason` may also be "error": the engine's forward raised (it is logged)
  and the requests in that batch end; the engine keeps serving.
- `Engine.from_pretrained(..., device=...)`; `Engine.shutdown(drain, timeout=None)`;
  `Engine.is_running`, `Engine.model`, `Engine.adapter_bytes(name)`,
  `Engine.prompt_logits(prompts, adapters)` (every position's logits of a mixed batch);
  `stats()["adapters_loaded"]`.
- Without `start()`, `Engine.generate` runs the scheduler steps in the calling thread, and
  `unload_adapter(wait=True)` of an adapter in use raises `AdapterInUseError` (no thread
  would finish its requests).
"""

from lorakit.serve.engine import Engine
from lorakit.serve.handle import RequestHandle
from lorakit.serve.types import (
    BASE_ADAPTER,
    AdapterInfo,
    Classification,
    Completion,
    SamplingParams,
    TokenEvent,
)

__all__ = [
    "BASE_ADAPTER",
    "AdapterInfo",
    "Classification",
    "Completion",
    "Engine",
    "RequestHandle",
    "SamplingParams",
    "TokenEvent",
]
