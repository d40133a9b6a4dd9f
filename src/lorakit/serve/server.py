"""`lorakit serve`'s HTTP server: OpenAI-compatible routes over an `Engine` (FastAPI, uvicorn).

Routes: `GET /health`, `GET /metrics` (Prometheus), `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (both stream with ``"stream": true``), `POST /v1/classifications`
(sequence-classification bases), and adapter management: `GET`/`POST /v1/adapters`,
`DELETE /v1/adapters/{name}`, and `GET /`, the playground page (`playground`). With an API key
every route but the page's needs ``Authorization: Bearer KEY``; without one, the management
routes are refused (403). Errors are OpenAI's JSON error object (`http_errors`), and the
server keeps serving after any.

The server keeps no state a second replica lacks: the engine and the adapters root (which may
be shared storage) are all, so replicas behind a load balancer, or a Ray Serve deployment
wrapping `create_app`, scale it. fastapi, uvicorn and prometheus-client are imported when the
app is built (`pip install "lorakit[serve]"`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AdapterNameError, LorakitError
from ..extras import import_optional
from .engine import Engine
from .http_adapters import adapter_json, parse_load, parse_wait, resolve_adapter_folder
from .http_errors import AuthError, RequestFieldError, error_body, error_payload
from .http_gate import ApiKeyGate
from .http_generation import Reply, collect_events, response_body, stream_events
from .http_metrics import ServerMetrics
from .loading import max_positions
from .openai_api import (
    GenerationRequest,
    fit_default_max_tokens,
    parse_chat,
    parse_classification,
    parse_completion,
    parse_json,
)
from .playground import mount_playground
from .types import BASE_ADAPTER

PURPOSE = "lorakit serve"
MANAGEMENT_PREFIX = "/v1/adapters"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
CLIENT_GONE = 499  # the status nginx logs for a client that closed before the answer
# Engine.task -> why the other task's routes refuse
ROUTES_OF_TASK = {
    "causal_lm": "this server's base is a causal LM: POST /v1/classifications needs a "
    "sequence-classification base; use /v1/completions or /v1/chat/completions",
    "seq_cls": "this server's base is a sequence classifier: use POST /v1/classifications",
}


@dataclass(frozen=True)
class ServerOptions:
    """How the server listens and what it allows.

    Attributes:
        host: Address to listen on (127.0.0.1: this machine only).
        port: TCP port.
        api_key: When set, every route needs ``Authorization: Bearer <api_key>``; when
            None, the adapter management routes are refused.
        adapters_root: Folder that `POST /v1/adapters` loads adapters from (paths relative
            to it); None refuses loading over HTTP.
        retry_after_seconds: The Retry-After header of a 429 (full queue).
        chat_default_max_tokens: `max_tokens` of a chat request that gives none (OpenAI's
            default is "as many as fit"; `lorakit serve` passes its --max-tokens limit).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    adapters_root: Path | None = None
    retry_after_seconds: int = 1
    chat_default_max_tokens: int = 1024


def create_app(engine: Engine, options: ServerOptions) -> Any:
    """The ASGI app; its lifespan starts the engine and, at shutdown, drains it.

    Args:
        engine: The engine to serve (started by the app's lifespan if not running).
        options: See `ServerOptions`.

    Returns:
        A FastAPI application (usable as a Ray Serve ingress too), its API-key gate and
        request counter installed as ASGI middleware.
    """
    fastapi = import_optional("fastapi", "serve", PURPOSE)
    starlette_exceptions = import_optional("starlette.exceptions", "serve", PURPOSE)

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        engine.start()
        yield
        # uvicorn has waited for the open requests already; this finishes what may remain.
        await asyncio.to_thread(engine.shutdown, True)

    app = fastapi.FastAPI(
        title="lorakit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    routes = _Routes(engine, options)
    app.add_exception_handler(starlette_exceptions.HTTPException, routes.on_http_exception)
    app.add_exception_handler(LorakitError, routes.on_error)
    app.add_exception_handler(ValueError, routes.on_error)
    app.add_exception_handler(Exception, routes.on_error)  # 500 in OpenAI's shape
    table = (
        ("/health", "GET", routes.health),
        ("/metrics", "GET", routes.metrics_text),
        ("/v1/models", "GET", routes.models),
        ("/v1/completions", "POST", routes.completions),
        ("/v1/chat/completions", "POST", routes.chat_completions),
        ("/v1/classifications", "POST", routes.classifications),
        (MANAGEMENT_PREFIX, "GET", routes.list_adapters),
        (MANAGEMENT_PREFIX, "POST", routes.load_adapter),
        (MANAGEMENT_PREFIX + "/{name}", "DELETE", routes.unload_adapter),
    )
    for path, method, endpoint in table:
        app.add_route(path, endpoint, methods=[method])
    page_paths = mount_playground(app)  # GET /: the playground page, loads without a key
    app.add_middleware(
        ApiKeyGate,
        api_key=options.api_key,
        metrics=routes.metrics,
        route_paths=frozenset(path for path, _, _ in table) | page_paths,
        public_paths=page_paths,
    )
    return app


class _Routes:
    """The endpoints: each takes a Starlette request and returns a response."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.metrics = ServerMetrics(engine)
        self.responses = import_optional("starlette.responses", "serve", PURPOSE)

    def json(self, body: dict[str, Any]) -> Any:
        return self.responses.JSONResponse(body)

    async def on_error(self, request: Any, error: Exception) -> Any:
        # An unexpected error (500) answers without details; Starlette re-raises it after
        # this answer and uvicorn logs the traceback.
        status, body = error_payload(error)
        retry = {"Retry-After": str(self.options.retry_after_seconds)}
        headers = retry if status == 429 else None
        return self.responses.JSONResponse(body, status_code=status, headers=headers)

    async def on_http_exception(self, request: Any, error: Any) -> Any:  # routing's 404/405
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return self.responses.JSONResponse(
            error_body(message, kind), status_code=error.status_code, headers=error.headers
        )

    async def health(self, request: Any) -> Any:
        return self.json({"status": "ok", "task": self.engine.task})

    async def metrics_text(self, request: Any) -> Any:
        text, content_type = self.metrics.render()
        return self.responses.Response(text, media_type=content_type)

    async def models(self, request: Any) -> Any:
        names = [BASE_ADAPTER, *sorted(self.engine.adapters())]
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "lorakit"} for name in names
        ]
        return self.json({"object": "list", "data": data})

    async def completions(self, request: Any) -> Any:
        self._check_task("causal_lm")
        parsed = parse_completion(parse_json(await request.body()))
        prompt = parsed.prompt
        ids = prompt if isinstance(prompt, list) else encode_prompt(self.engine, str(prompt))
        return await self._generate(request, parsed, ids)

    async def chat_completions(self, request: Any) -> Any:
        self._check_task("causal_lm")
        body = parse_json(await request.body())
        parsed = parse_chat(body, self.options.chat_default_max_tokens)
        assert parsed.messages is not None
        prompt = self.engine.chat_prompt(parsed.messages)
        parsed = fit_default_max_tokens(parsed, len(prompt), max_positions(self.engine.model))
        return await self._generate(request, parsed, prompt)

    async def _generate(self, request: Any, parsed: GenerationRequest, prompt: list[int]) -> Any:
        handle = self.engine.submit(prompt, adapter=parsed.adapter, sampling=parsed.sampling)
        reply = Reply.new(parsed.model, parsed.messages is not None, parsed.sampling.logprobs)
        if parsed.stream:
            events = stream_events(reply, handle, parsed.include_usage)
            return self.responses.StreamingResponse(
                events, media_type="text/event-stream", headers=SSE_HEADERS
            )
        collected = await collect_events(handle, lambda: _client_gone(request))
        if collected is None:  # nobody to answer; 499 as nginx logs it
            return self.responses.Response(status_code=CLIENT_GONE)
        return self.json(response_body(reply, handle, collected))

    async def classifications(self, request: Any) -> Any:
        model, texts = parse_classification(parse_json(await request.body()))
        self._check_task("seq_cls")
        adapter = None if model == BASE_ADAPTER else model
        results = await asyncio.to_thread(self.engine.classify, texts, adapter)
        data = [
            {"object": "classification", "index": index, "label": r.label, "scores": r.scores}
            for index, r in enumerate(results)
        ]
        return self.json({"object": "list", "model": model, "data": data})

    async def list_adapters(self, request: Any) -> Any:
        require_management(self.options)
        adapters = sorted(self.engine.adapters().items())
        return self.json({"object": "list", "data": [adapter_json(i) for _, i in adapters]})

    async def load_adapter(self, request: Any) -> Any:
        require_management(self.options)
        name, relative = parse_load(parse_json(await request.body()))
        if self.options.adapters_root is None:
            raise AuthError(
                "loading adapters over HTTP is off: start the server with --adapters-root DIR",
                403,
            )
        if name in self.engine.adapters():
            raise AdapterNameError(
                f"an adapter named {name!r} is loaded already: DELETE /v1/adapters/{name} "
                "first, or choose another name"
            )
        folder = resolve_adapter_folder(self.options.adapters_root, relative)
        info = await asyncio.to_thread(self.engine.load_adapter, name, folder)
        return self.json(adapter_json(info))

    async def unload_adapter(self, request: Any) -> Any:
        require_management(self.options)
        name = request.path_params["name"]
        wait = parse_wait(dict(request.query_params))
        await asyncio.to_thread(self.engine.unload_adapter, name, wait)
        return self.json({"id": name, "object": "adapter", "deleted": True})

    def _check_task(self, task: str) -> None:
        if self.engine.task != task:
            raise RequestFieldError(ROUTES_OF_TASK[self.engine.task])


def encode_prompt(engine: Engine, text: str) -> list[int]:
    """A text prompt's token ids, as `Engine.generate` encodes prompts."""
    if engine.tokenizer is None:
        raise RequestFieldError(
            "this server has no tokenizer: send the prompt as a list of token ids", "prompt"
        )
    ids: list[int] = engine.tokenizer(text)["input_ids"]
    return ids


def require_management(options: ServerOptions) -> None:
    """Refuse the management routes when no API key guards them (the gate checked the key)."""
    if options.api_key is None:
        raise AuthError(
            "adapter management needs an API key: start the server with --api-key KEY and "
            "send 'Authorization: Bearer KEY'",
            403,
        )


async def _client_gone(request: Any) -> None:
    """Return once the client has disconnected (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run_server(engine: Engine, options: ServerOptions) -> None:
    """Serve until SIGINT/SIGTERM; then finish the open requests and drain the engine."""
    uvicorn = import_optional("uvicorn", "serve", PURPOSE)
    app = create_app(engine, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="info")
    uvicorn.Server(config).run()
