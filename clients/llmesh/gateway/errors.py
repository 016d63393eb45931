"""The one place where the gateway's failures become OpenAI's JSON errors.

Everything that can go wrong with an HTTP request (a body that does not validate, an
:class:`~llmesh.common.errors.LLMeshError` the SDK raised from a gRPC status, a bug) ends up
here and leaves as ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
OpenAI's clients expect: they turn 400/401/403/404/429/503 into their own typed exceptions
(``openai.BadRequestError``, ``AuthenticationError``, ...), so the table below is the
contract with them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import grpc

from llmesh.common.errors import LLMeshError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Kind:
    status: int
    type: str
    code: str


#: gRPC status of an SDK error -> (HTTP status, OpenAI error type, error code).
STATUS_TABLE: dict[grpc.StatusCode, _Kind] = {
    grpc.StatusCode.INVALID_ARGUMENT: _Kind(400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.OUT_OF_RANGE: _Kind(400, "invalid_request_error", "invalid_value"),
    grpc.StatusCode.UNIMPLEMENTED: _Kind(400, "invalid_request_error", "unsupported"),
    grpc.StatusCode.UNAUTHENTICATED: _Kind(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: _Kind(403, "permission_error", "permission_denied"),
    grpc.StatusCode.NOT_FOUND: _Kind(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: _Kind(409, "invalid_request_error", "conflict"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: _Kind(429, "rate_limit_error", "queue_full"),
    # No READY replica (loading, draining): the request may succeed a little later.
    grpc.StatusCode.FAILED_PRECONDITION: _Kind(503, "service_unavailable", "no_ready_replica"),
    grpc.StatusCode.UNAVAILABLE: _Kind(503, "service_unavailable", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: _Kind(504, "timeout_error", "timeout"),
    grpc.StatusCode.CANCELLED: _Kind(499, "cancelled", "cancelled"),
}
_INTERNAL = _Kind(500, "internal_error", "internal_error")

#: Seconds a 429 or 503 tells the client to wait when the mesh named no back-off.
DEFAULT_RETRY_AFTER_S = 1
# The replica's queue-full sentence says "back off about 1.5 s and retry".
_BACK_OFF = re.compile(r"back off about ([0-9.]+) s")


class GatewayError(Exception):
    """An error the gateway itself finds in a request (before the mesh sees it).

    Args:
        message: what was wrong and how to fix it.
        status: the HTTP status.
        type: OpenAI's error type.
        param: the request field at fault, when one is.
        code: a short machine-readable code.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = "invalid_value",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code


def bad_request(message: str, param: str | None = None) -> GatewayError:
    """A 400 for a request field the gateway cannot honour.

    Args:
        message: what was wrong and how to fix it.
        param: the field, as OpenAI names it (``"n"``, ``"messages[2].content"``).
    """
    return GatewayError(message, param=param)


@dataclass(frozen=True)
class ErrorReply:
    """An error as the HTTP response carries it."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def _retry_after(message: str) -> str:
    match = _BACK_OFF.search(message)
    seconds = float(match.group(1)) if match else DEFAULT_RETRY_AFTER_S
    return str(max(1, round(seconds + 0.49)))  # whole seconds, rounded up


def _body(message: str, type_: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_reply(errors: list[dict[str, Any]]) -> ErrorReply:
    """A 400 for a body that does not validate (pydantic's ``errors()``), naming the field."""
    first = errors[0] if errors else {"loc": (), "msg": "the request body is not valid"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    where = f"{param}: " if param else ""
    message = f"{where}{first.get('msg', 'invalid value')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s) in the request body)"
    message += "; see the OpenAI API reference for this endpoint's fields"
    return ErrorReply(400, _body(message, "invalid_request_error", param, "invalid_value"), {})


def error_reply(exc: BaseException) -> ErrorReply:
    """The HTTP status, OpenAI error body and headers for ``exc``.

    Args:
        exc: a :class:`GatewayError`, an :class:`LLMeshError` from the SDK, or anything else
            (a bug: 500, logged with its traceback, the message names only its type).
    """
    if isinstance(exc, GatewayError):
        headers = {"Retry-After": _retry_after(exc.message)} if exc.status in (429, 503) else {}
        return ErrorReply(exc.status, _body(exc.message, exc.type, exc.param, exc.code), headers)
    if isinstance(exc, LLMeshError):
        kind = STATUS_TABLE.get(exc.code, _INTERNAL)
        message = str(exc) or kind.code
        headers = {"Retry-After": _retry_after(message)} if kind.status in (429, 503) else {}
        param = "model" if kind.status == 404 else None
        return ErrorReply(kind.status, _body(message, kind.type, param, kind.code), headers)
    log.error("gateway request failed unexpectedly", exc_info=exc)
    message = f"internal error in the gateway ({type(exc).__name__}); see the gateway's log"
    return ErrorReply(500, _body(message, _INTERNAL.type, None, _INTERNAL.code), {})


def missing_token() -> GatewayError:
    """The 401 for a request without a bearer token when the gateway requires one."""
    return GatewayError(
        "this gateway requires an API key: send 'Authorization: Bearer <token>' (the openai "
        "client's api_key); `llmesh tokens create` makes one",
        status=401,
        type="authentication_error",
        code="missing_api_key",
    )
