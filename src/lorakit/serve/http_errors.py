"""Errors of the HTTP server, and every error as an HTTP status and OpenAI's JSON error shape.

OpenAI's clients read ``{"error": {"message", "type", "param", "code"}}`` and raise their own
exception classes by status (400 BadRequestError, 401, 403, 404 NotFoundError, 409, 429
RateLimitError), so one table maps lorakit's errors onto statuses and types here.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    AdapterInUseError,
    AdapterNameError,
    LorakitError,
    QueueFullError,
    RequestTooLargeError,
    ServeError,
    UnknownAdapterError,
)


class RequestFieldError(ServeError, ValueError):
    """A request body is not JSON, or a field is missing, unknown or holds a bad value (400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class AdapterFolderError(ServeError, ValueError):
    """`POST /v1/adapters` named a folder outside the adapters root or not a safe adapter."""


class AuthError(ServeError):
    """A request lacks the API key (401), or asks for what this server does not allow (403)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# error class -> (HTTP status, OpenAI error type); the first class that matches wins.
STATUS_TABLE: tuple[tuple[type[Exception], int, str], ...] = (
    (UnknownAdapterError, 404, "not_found_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (AdapterInUseError, 409, "conflict_error"),
    (AdapterNameError, 409, "conflict_error"),
    (RequestTooLargeError, 400, "invalid_request_error"),
    (RequestFieldError, 400, "invalid_request_error"),
    (AdapterFolderError, 400, "invalid_request_error"),
    (ValueError, 400, "invalid_request_error"),
    # What remains of the engine's and lorakit's own errors: a request it cannot serve as
    # asked (a base without a chat template, an adapter that does not fit the base).
    (LorakitError, 400, "invalid_request_error"),
)
AUTH_TYPES = {401: "authentication_error", 403: "permission_error"}
INTERNAL_ERROR = (500, "server_error")


def error_status(error: Exception) -> tuple[int, str]:
    """The HTTP status and OpenAI error type for `error` (500 for anything unexpected)."""
    if isinstance(error, AuthError):
        return error.status, AUTH_TYPES[error.status]
    for error_class, status, kind in STATUS_TABLE:
        if isinstance(error, error_class):
            return status, kind
    return INTERNAL_ERROR


def error_body(message: str, kind: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_payload(error: Exception) -> tuple[int, dict[str, Any]]:
    """The status and JSON body answering `error`; unexpected errors hide their details."""
    status, kind = error_status(error)
    if status == INTERNAL_ERROR[0]:
        return status, error_body("internal server error (logged on the server)", kind)
    return status, error_body(str(error), kind, getattr(error, "param", None))
