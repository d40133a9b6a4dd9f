"""Serving many adapters on one base: the engine (`Engine`) and, on top, the HTTP server.

Nothing in lorakit's core imports this package; it imports transformers lazily. The engine's
interface (`Engine`, `SamplingParams`, `RequestHandle`, `TokenEvent`, `AdapterInfo`,
`Completion`, `Classification` and the errors `ServeError`, `UnknownAdapterError`,
`QueueFullError`, `RequestTooLargeError`, `AdapterInUseError` of `lorakit.errors`) is the
contract the server is written against; changes to it are noted here.
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
