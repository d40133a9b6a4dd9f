"""`lorakit serve` as a Ray Serve application: engine replicas on one base, adapters routed by name.

Run it with Ray's CLI, on one machine or a Ray cluster (``ray start --head`` / ``ray start
--address=HEAD:6379`` on the others)::

    serve run lorakit.serve.ray_app:build_app base=./my-model adapters_root=/shared/adapters \\
        replicas=4 max_adapters_per_replica=8

Two deployments. `EngineReplica` (`ray_replica`), `replicas` of them: each holds an `Engine`
on the same base and runs `lorakit serve`'s own app (`server.create_app`) over it, loading
adapters on demand from the adapters root (shared storage, or the same folders on every
node) through Ray's model multiplexing. `RayIngress`, the HTTP entry: it checks the API key,
reads the `model` field of the JSON body and calls a replica with
``handle.options(multiplexed_model_id=...)``, so Ray's router picks a replica that already
holds that adapter; it streams the replica's answer back unchanged. A blend routes by its
adapter names, sorted and joined by "+" ("polite+sql" whatever the weights), and the replica
it lands on loads each of them it lacks; base requests go to any replica.

Routes are the server's (`/v1/completions`, `/v1/chat/completions` with streaming,
`/v1/classifications`, `/health`), except three: `GET /v1/models` lists the base and every
adapter folder of the root (what the app can serve, loaded or not); adapter management
(`/v1/adapters`) and `/metrics` are refused (404), since adapters load on demand and one
replica's numbers would not be the app's (Ray Serve exports its own metrics). Each forwarded
answer carries the headers ``x-lorakit-replica`` (the replica's id),
``x-lorakit-replica-adapters`` (the adapters it held when it answered) and
``x-lorakit-replica-stats`` (its engine's counters, JSON).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ServeError
from ..extras import import_optional
from .engine import Engine
from .http_errors import error_body, error_payload
from .http_gate import is_authorized, unauthorized_response
from .playground import playground_files
from .ray_replica import (
    EngineReplica,
    ForwardedRequest,
    ResponseStart,
    model_id_of,
    served_adapters,
)
from .types import BASE_ADAPTER

logger = logging.getLogger(__name__)

PURPOSE = "lorakit's Ray Serve app"
DTYPES = ("float32", "bfloat16")
API_KEY_VARIABLE = "LORAKIT_API_KEY"  # as `lorakit serve`: keeps the key out of the process list
MANAGEMENT_PREFIX = "/v1/adapters"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
NOT_SERVED = {
    MANAGEMENT_PREFIX: "the Ray Serve app loads adapters on demand from its adapters root: send "
    "a request with model set to a folder name of the root (GET /v1/models lists them); to add "
    "an adapter, copy its folder into the root",
    "/metrics": "the Ray Serve app has no /metrics of its own (one replica's numbers would not "
    "be the app's): use Ray Serve's metrics (requests, latency, queue per deployment), which Ray "
    "exports to Prometheus",
}


@dataclass(frozen=True)
class RayAppOptions:
    """What `build_app` takes, as ``key=value`` arguments of ``serve run``.

    Attributes:
        base: Folder of the base transformers model (the same path on every node).
        adapters_root: Folder of adapter folders; a request's `model` names one of them.
        replicas: Engine replicas (each a process with its own copy of the base).
        max_adapters_per_replica: Multiplexed model ids (adapters, or blends' adapter sets)
            a replica keeps; past it the least recently used is evicted.
        cpus_per_replica: CPUs Ray reserves for each engine replica; its torch threads are
            as many (at least 1).
        api_key: Every request must send ``Authorization: Bearer KEY`` (default:
            $LORAKIT_API_KEY); None: no key.
        max_batch_size: Requests one engine decodes together.
        max_queue: Requests waiting in one engine; more are answered 429.
        max_prompt_tokens: Longest prompt; longer ones are answered 400.
        max_tokens: Largest max_tokens; also a chat request's default.
        dtype: "float32" or "bfloat16", the base's dtype.
        load_in_4bit: Quantize the base to NF4.
    """

    base: str
    adapters_root: str
    replicas: int = 2
    max_adapters_per_replica: int = 8
    cpus_per_replica: float = 1.0
    api_key: str | None = None
    max_batch_size: int = 16
    max_queue: int = 64
    max_prompt_tokens: int = 2048
    max_tokens: int = 1024
    dtype: str = "float32"
    load_in_4bit: bool = False

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> RayAppOptions:
        """Options from ``serve run``'s ``key=value`` strings, each checked.

        Raises:
            ServeError: A key is unknown or missing, or a value is not allowed (named).
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(args) - set(fields))
        if unknown:
            raise ServeError(
                f"build_app does not take {unknown}; it takes {sorted(fields)} (key=value)"
            )
        missing = [name for name in ("base", "adapters_root") if name not in args]
        if missing:
            raise ServeError(
                f"build_app needs {missing}: serve run lorakit.serve.ray_app:build_app "
                "base=DIR adapters_root=DIR"
            )
        values: dict[str, Any] = {"api_key": os.environ.get(API_KEY_VARIABLE)}
        values |= {name: _parse(name, str(fields[name].type), text) for name, text in args.items()}
        options = cls(**values)
        options.check()
        return options

    def check(self) -> None:
        """Raise `ServeError` naming the first option whose value cannot be used."""
        for name in ("base", "adapters_root"):
            if not Path(getattr(self, name)).is_dir():
                raise ServeError(f"{name}={getattr(self, name)}: not a folder; fix the path")
        counts = ("replicas", "max_adapters_per_replica", "max_batch_size", "max_queue")
        for name in (*counts, "max_prompt_tokens", "max_tokens"):
            if getattr(self, name) < 1:
                raise ServeError(f"{name}={getattr(self, name)} must be 1 or more")
        if self.cpus_per_replica <= 0:
            raise ServeError(f"cpus_per_replica={self.cpus_per_replica} must be more than 0")
        if self.dtype not in DTYPES:
            raise ServeError(f"dtype={self.dtype!r} is not served; use one of {list(DTYPES)}")
        if self.api_key == "":
            raise ServeError(f"api_key (or ${API_KEY_VARIABLE}) is empty; give a key or none")

    def build_engine(self) -> Engine:
        """The engine one replica serves with (its adapters load on demand).

        Called in the replica's own process, whose torch threads it sets to the CPUs Ray
        reserved for it (Ray sets OMP_NUM_THREADS so only where the environment does not).
        """
        import torch

        torch.set_num_threads(max(1, math.floor(self.cpus_per_replica)))
        return Engine.from_pretrained(
            self.base,
            dtype=getattr(torch, self.dtype),
            load_in_4bit=self.load_in_4bit,
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_prompt_tokens=self.max_prompt_tokens,
            max_new_tokens=self.max_tokens,
        )


def _parse(name: str, kind: str, text: str) -> Any:
    """One ``key=value`` string as the field's type (the annotation's text)."""
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ServeError(
            f"{name}={text!r} is not a {'number' if kind == 'float' else kind}"
        ) from None
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise ServeError(f"{name}={text!r}: write true or false")
        return text.lower() == "true"
    return text


def build_app(args: Mapping[str, str]) -> Any:
    """The Ray Serve application (``serve run lorakit.serve.ray_app:build_app key=value ...``).

    Args:
        args: `RayAppOptions` fields as strings (``base`` and ``adapters_root`` required).

    Returns:
        A bound Ray Serve application: the ingress over `replicas` engine replicas.

    Raises:
        ServeError: An option is unknown, missing or not allowed.
        MissingDependencyError: Ray Serve is not installed (``pip install "lorakit[ray]"``).
    """
    options = RayAppOptions.from_args(args)
    serve = import_optional("ray.serve", "ray", PURPOSE)
    # The engine queues what it cannot batch; past that Ray's router holds requests.
    per_replica = options.max_batch_size + options.max_queue
    replica = serve.deployment(EngineReplica).options(
        num_replicas=options.replicas,
        max_ongoing_requests=per_replica,
        ray_actor_options={"num_cpus": options.cpus_per_replica},
    )
    # The ingress only relays: it takes what all the replicas can (Ray's default, 5 at a
    # time, would hold the other clients back at Ray's proxy).
    ingress = serve.deployment(serve.ingress()(RayIngress)).options(
        name="RayIngress",
        num_replicas=1,
        max_ongoing_requests=options.replicas * per_replica,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(options), options)


class RayIngress:
    """The HTTP entry: checks the key, lists the models, forwards the rest by adapter.

    Args:
        engine_replicas: The `EngineReplica` deployment's handle.
        options: The app's options.
    """

    def __init__(self, engine_replicas: Any, options: RayAppOptions) -> None:
        self._replicas = engine_replicas
        self._options = options

    def __serve_build_asgi_app__(self) -> Any:  # Ray Serve builds the app in the replica
        return ingress_app(self._replicas, self._options)


def ingress_app(replicas: Any, options: RayAppOptions) -> Any:
    """The ingress's ASGI app (Starlette): one endpoint for every path."""
    applications = import_optional("starlette.applications", "ray", PURPOSE)
    responses = import_optional("starlette.responses", "ray", PURPOSE)
    routing = import_optional("starlette.routing", "ray", PURPOSE)
    root = Path(options.adapters_root)
    page_paths = frozenset(file.url_path for file in playground_files())  # public, as in serve

    async def endpoint(request: Any) -> Any:
        path = _route_path(request.scope)
        if not is_authorized({**request.scope, "path": path}, options.api_key, page_paths):
            return unauthorized_response()
        refused = next((why for p, why in NOT_SERVED.items() if path.startswith(p)), None)
        if refused is not None:
            body = error_body(f"{request.method} {path}: {refused}", "not_found_error")
            return responses.JSONResponse(body, status_code=404)
        if path == "/v1/models" and request.method == "GET":
            names = [BASE_ADAPTER, *served_adapters(root)]
            data = [
                {"id": n, "object": "model", "created": 0, "owned_by": "lorakit"} for n in names
            ]
            return responses.JSONResponse({"object": "list", "data": data})
        body = await request.body()
        forwarded = ForwardedRequest(
            request.method,
            path,
            request.scope["query_string"],
            list(request.scope["headers"]),
            body,
        )
        model_id = model_id_of(body) if request.method == "POST" else ""
        call = replicas.options(method_name="forward", stream=True)
        if model_id:
            call = call.options(multiplexed_model_id=model_id)
        answer = call.remote(forwarded)
        try:
            start = await answer.__anext__()
        except Exception as error:  # a replica died, Ray refused...: a 500 in OpenAI's shape
            logger.exception("forwarding %s %s failed", request.method, path)
            status, payload = error_payload(error)
            return responses.JSONResponse(payload, status_code=status)
        assert isinstance(start, ResponseStart)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start.headers}
        return responses.StreamingResponse(
            _body_chunks(answer), status_code=start.status, headers=headers
        )

    async def on_error(request: Any, error: Exception) -> Any:  # OpenAI's shape, no details
        status, payload = error_payload(error)
        return responses.JSONResponse(payload, status_code=status)

    route = routing.Route("/{path:path}", endpoint, methods=METHODS)
    return applications.Starlette(routes=[route], exception_handlers={Exception: on_error})


def _route_path(scope: dict[str, Any]) -> str:
    """The path below the app's route prefix (``serve run --route-prefix``)."""
    path, prefix = str(scope["path"]), str(scope.get("root_path", ""))
    if prefix and path.startswith(prefix):
        return path[len(prefix) :] or "/"
    return path


async def _body_chunks(answer: Any) -> AsyncIterator[bytes]:
    """The rest of a replica's answer; a client that leaves cancels the replica's request."""
    try:
        async for chunk in answer:
            yield chunk
    finally:
        answer.cancel()
