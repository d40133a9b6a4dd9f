"""One replica of the Ray Serve app (`ray_app`): an `Engine`, and `lorakit serve`'s app over it.

The replica runs the very ASGI app `lorakit serve` runs (`server.create_app`), in its own
process: the ingress forwards each HTTP request to it (method, path, headers, body) and
streams back what the app sends, so routes, checks, errors and streaming are the server's.

Adapters are loaded on demand from the adapters root through Ray's model multiplexing. A
request's multiplexed model id is its adapter's name, or a blend's adapter names sorted and
joined by "+" (`model_id_of`); Ray's router sends it to a replica that holds that id, and a
replica holds at most `max_adapters_per_replica` ids (the least recently used is evicted).
An adapter stays loaded while anything needs it (`AdapterLeases`): every id Ray holds here
that names it, and every request running here that uses it; the last to let go unloads it.
So an eviction never unloads an adapter under a running request, a blend and its adapters
share one copy, and a replica loads exactly what its requests use.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import LorakitError, UnknownAdapterError
from ..extras import import_optional
from .engine import Engine
from .http_adapters import ADAPTER_CONFIG, ADAPTER_NAME, resolve_adapter_folder
from .http_errors import error_payload
from .server import ServerOptions, create_app
from .types import BASE_ADAPTER

if TYPE_CHECKING:  # ray_app imports this module
    from .ray_app import RayAppOptions

logger = logging.getLogger(__name__)

PURPOSE = "lorakit's Ray Serve app"
BLEND_SEPARATOR = "+"  # not allowed in adapter names, so a blend's id names no adapter
REPLICA_HEADER = "x-lorakit-replica"
ADAPTERS_HEADER = "x-lorakit-replica-adapters"
STATS_HEADER = "x-lorakit-replica-stats"
STATS_SHOWN = ("running", "queue_depth", "requests_total", "tokens_generated_total")


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it, for the replica's app.

    Attributes:
        method: "GET", "POST"...
        path: The URL path, e.g. "/v1/completions".
        query_string: The raw query string (without '?').
        headers: The request's headers, lower-case names, as ASGI gives them.
        body: The whole request body.
    """

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass(frozen=True)
class ResponseStart:
    """The first item a replica streams back: the status and headers; body chunks follow."""

    status: int
    headers: list[tuple[bytes, bytes]]


def model_id_of(body: bytes) -> str:
    """The multiplexed model id a request routes by; "" for the base or a malformed body.

    An adapter's name, or the blend's adapter names sorted and joined by "+", so a blend
    routes by its set of adapters whatever the weights and their order. Bodies the replica's
    app will refuse (not JSON, names no adapter may have) route to any replica, which
    answers the error.
    """
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(parsed, dict):
        return ""
    extra, model = parsed.get("lorakit"), parsed.get("model")
    blend = extra.get("blend") if isinstance(extra, dict) else None
    if isinstance(blend, dict):
        names = sorted(map(str, blend))
    else:
        names = [model] if isinstance(model, str) else []
    if not names or not all(ADAPTER_NAME.fullmatch(name) for name in names):
        return ""
    return "" if names == [BASE_ADAPTER] else BLEND_SEPARATOR.join(names)


def adapter_names(model_id: str) -> tuple[str, ...]:
    """The adapters a multiplexed model id needs (none for "")."""
    return tuple(model_id.split(BLEND_SEPARATOR)) if model_id else ()


def served_adapters(root: Path) -> list[str]:
    """The adapters the app can serve: the root's folders whose names adapters may have."""
    return sorted(
        path.name
        for path in root.iterdir()
        if ADAPTER_NAME.fullmatch(path.name) and (path / ADAPTER_CONFIG).is_file()
    )


class AdapterLeases:
    """Who needs each adapter of a replica's engine: loaded for the first, unloaded after the last.

    Loads and unloads run one at a time (an asyncio lock), in a thread, so the replica's
    event loop keeps streaming other answers meanwhile.
    """

    def __init__(self, engine: Engine, adapters_root: Path) -> None:
        self._engine = engine
        self._root = adapters_root
        self._counts: Counter[str] = Counter()
        self._lock = asyncio.Lock()

    async def acquire(self, names: Iterable[str]) -> None:
        """Count one more user of each adapter, loading those not loaded.

        Raises:
            UnknownAdapterError: The adapters root has no folder of that name.
            AdapterFolderError: The folder is not a safe adapter folder (`http_adapters`).
            ServeError: The engine cannot serve the adapter (named); nothing is counted.
        """
        names = sorted(set(names))
        async with self._lock:
            folders = {name: self._folder(name) for name in names}  # every check first
            loaded = self._engine.adapters()
            done: list[str] = []
            try:
                for name in names:
                    if self._counts[name] == 0 and name not in loaded:
                        await asyncio.to_thread(self._engine.load_adapter, name, folders[name])
                    self._counts[name] += 1
                    done.append(name)
            except BaseException:
                await self._release_locked(done)
                raise

    async def release(self, names: Iterable[str]) -> None:
        """Count one user less of each adapter; unload those nobody needs any more."""
        async with self._lock:
            await self._release_locked(sorted(set(names)))

    async def _release_locked(self, names: list[str]) -> None:
        for name in names:
            self._counts[name] -= 1
            if self._counts[name] <= 0:
                del self._counts[name]
                await asyncio.to_thread(self._engine.unload_adapter, name)

    def _folder(self, name: str) -> Path:
        if not (self._root / name).exists():
            raise UnknownAdapterError(
                f"Adapter {name!r} is not in the adapters root {self._root}; adapters there: "
                f"{served_adapters(self._root) or 'none'}. Fix: copy its folder there (on "
                "every node), or use one of those."
            )
        return resolve_adapter_folder(self._root, name)


class _Lease:
    """What Ray's multiplexer caches for a model id: the id's hold on its adapters.

    Ray calls an evicted model's ``__del__`` (and awaits it when it is a coroutine function);
    it is set on the instance, so the garbage collector, which only calls a class's
    ``__del__``, never runs it a second time.
    """

    def __init__(self, leases: AdapterLeases, names: tuple[str, ...]) -> None:
        self._leases = leases
        self.names = names
        setattr(self, "__del__", self.release)  # noqa: B010 (see the class docstring)

    async def release(self) -> None:
        await self._leases.release(self.names)


class EngineReplica:
    """The Ray Serve deployment class: one `Engine` on the base, `create_app` over it.

    Args:
        options: The app's options (`ray_app.RayAppOptions`).
    """

    def __init__(self, options: RayAppOptions) -> None:
        serve = import_optional("ray.serve", "ray", PURPOSE)
        self._engine = options.build_engine()
        self._engine.start()
        # The ingress checks the API key; this app is reachable through Ray handles only.
        server_options = ServerOptions(chat_default_max_tokens=options.max_tokens)
        self._app = create_app(self._engine, server_options)
        self._leases = AdapterLeases(self._engine, Path(options.adapters_root))
        self.replica_id = str(serve.get_replica_context().replica_tag)

        async def open_lease(model_id: str) -> _Lease:
            names = adapter_names(model_id)
            await self._leases.acquire(names)
            return _Lease(self._leases, names)

        multiplexed = serve.multiplexed(max_num_models_per_replica=options.max_adapters_per_replica)
        self._lease = multiplexed(open_lease)
        self._get_model_id = serve.get_multiplexed_model_id

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """Answer `request` with the app: a `ResponseStart`, then the body's chunks."""
        model_id = self._get_model_id()
        names = adapter_names(model_id)
        try:
            if names:
                await self._lease(model_id)  # Ray's cache: loads on a miss, may evict another
            await self._leases.acquire(names)  # this request's own hold, until it ends
        except LorakitError as error:
            status, body = error_payload(error)
            yield ResponseStart(status, [(b"content-type", b"application/json")])
            yield json.dumps(body).encode()
            return
        try:
            async for item in run_asgi(self._app, request):
                if isinstance(item, ResponseStart):
                    item = ResponseStart(item.status, item.headers + self._identity())
                yield item
        finally:
            await asyncio.shield(self._leases.release(names))

    def _identity(self) -> list[tuple[bytes, bytes]]:
        """Which replica answers, the adapters it holds and its engine's counters, as headers."""
        adapters = ",".join(sorted(self._engine.adapters()))
        stats = self._engine.stats()
        shown = json.dumps({key: stats[key] for key in STATS_SHOWN}, separators=(",", ":"))
        return [
            (REPLICA_HEADER.encode(), self.replica_id.encode()),
            (ADAPTERS_HEADER.encode(), adapters.encode()),
            (STATS_HEADER.encode(), shown.encode()),
        ]

    def __del__(self) -> None:  # Ray Serve calls it when the replica shuts down
        engine = getattr(self, "_engine", None)
        if engine is not None and engine.is_running:
            engine.shutdown(True)


async def run_asgi(app: Any, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
    """Run an ASGI app on one request in this process; yield its start, then body chunks.

    The app's `receive` gives the body, then waits: a client that leaves cancels the whole
    chain (Ray cancels this generator), which cancels the app's task, and the app's own
    clean-up cancels the engine's request.
    """
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": None,
        "server": None,
    }
    messages: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    is_body_sent = False

    async def receive() -> dict[str, Any]:
        nonlocal is_body_sent
        if not is_body_sent:
            is_body_sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # never set: only cancellation ends this wait
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # the app answered 500 already (Starlette re-raises after it)
            logger.exception("the app raised while answering %s %s", request.method, request.path)
        finally:
            messages.put_nowait(None)

    task = asyncio.ensure_future(run())
    try:
        while (message := await messages.get()) is not None:
            if message["type"] == "http.response.start":
                yield ResponseStart(message["status"], list(message.get("headers", [])))
                continue
            # Body parts that are waiting already go as one item: under load, one Ray
            # round trip carries several tokens instead of one each (no wait is added).
            body, is_last = bytearray(message.get("body", b"")), False
            while not is_last and not messages.empty():
                waiting = messages.get_nowait()
                is_last = waiting is None
                body += b"" if waiting is None else waiting.get("body", b"")
            if body:
                yield bytes(body)
            if is_last:
                return
    finally:
        if not task.done():
            task.cancel()
