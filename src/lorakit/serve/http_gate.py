"""The server's outer ASGI layer: the API key on every request, and answers counted by route.

A plain ASGI middleware (not a FastAPI dependency) so that it covers every path, unknown
ones included, and streamed answers without buffering them.
"""

from __future__ import annotations

import hmac
from typing import Any

from ..extras import import_optional
from .http_errors import error_body
from .http_metrics import ServerMetrics

PURPOSE = "lorakit serve"


def route_label(path: str, route_paths: frozenset[str]) -> str:
    """The route template of a path, for metric labels (a bounded set of values).

    Args:
        path: The request's path.
        route_paths: The app's route templates; one "{name}" parameter at the end at most.
    """
    if path in route_paths:
        return path
    parent = path.rpartition("/")[0]
    template = parent + "/{name}"
    return template if template in route_paths else "unmatched"


def is_authorized(scope: dict[str, Any], api_key: str | None, public_paths: frozenset[str]) -> bool:
    """Whether an HTTP request may pass the API key check.

    It may when no key is set, when it fetches a public path (GET or HEAD), or when it sends
    ``Authorization: Bearer <api_key>`` (compared in constant time). The Ray Serve app's
    ingress checks with it too.
    """
    if api_key is None:
        return True
    if scope["path"] in public_paths and scope["method"] in ("GET", "HEAD"):
        return True
    headers = dict(scope["headers"])
    given = headers.get(b"authorization", b"").decode("latin-1")
    return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())


class ApiKeyGate:
    """ASGI wrapper: checks the API key on every HTTP request and counts answers by route.

    `public_paths` (the playground page's files, which hold no data) load without the key
    on GET and HEAD; every other request needs it.
    """

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        metrics: ServerMetrics,
        route_paths: frozenset[str],
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self._api_key = api_key
        self._metrics = metrics
        self._route_paths = route_paths
        self._public_paths = public_paths

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def counted_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._is_authorized(scope):
                await self.app(scope, receive, counted_send)
            else:
                await self._refuse(scope, receive, counted_send)
        finally:
            self._metrics.count(route_label(scope["path"], self._route_paths), status["code"])

    def _is_authorized(self, scope: dict[str, Any]) -> bool:
        return is_authorized(scope, self._api_key, self._public_paths)

    async def _refuse(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await unauthorized_response()(scope, receive, send)


def unauthorized_response() -> Any:
    """The 401 answer to a request without the right key (a Starlette response)."""
    responses = import_optional("starlette.responses", "serve", PURPOSE)
    body = error_body(
        "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
        "authentication_error",
    )
    return responses.JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
