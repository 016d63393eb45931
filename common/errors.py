"""Errors, translated in one place per side.

Servers raise these domain exceptions (or ``ValueError``); :func:`rpc_handler` turns them into
gRPC status codes with the message intact. Clients turn status codes back into the same classes
with :func:`from_rpc_error`, so user code catches ``llmesh.errors.NotFound`` whether the error
came from the control plane or a worker.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

log = logging.getLogger(__name__)


class LLMeshError(Exception):
    """Base of every llmesh error; ``code`` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(LLMeshError, ValueError):
    """A field is missing or wrong; the message says which and how to fix it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LLMeshError, LookupError):
    """An unknown model, worker or request id."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(LLMeshError):
    """A resource with that name exists with a different definition."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(LLMeshError):
    """The system is not in a state to do this yet (e.g. the model is not READY)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(LLMeshError):
    """At capacity: retry later or add replicas."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LLMeshError):
    """A worker, the control plane or etcd cannot be reached, or is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(LLMeshError):
    """The engine behind this model does not offer that operation."""

    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(LLMeshError, TimeoutError):
    """The call did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LLMeshError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(LLMeshError):
    """The call carried no valid bearer token (missing, malformed, unknown or revoked)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LLMeshError, PermissionError):
    """The token is valid but its role or model scope does not allow this call."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(LLMeshError):
    """A bug on the server side; the message carries the exception type."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LLMeshError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unimplemented,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}


# The most bytes a status message takes once percent-encoded into the grpc-message trailer.
# Clients refuse trailers over 16 KiB (grpc.max_metadata_size, 8 KiB soft), and then report
# RESOURCE_EXHAUSTED "received metadata size exceeds hard limit" instead of our sentence; a
# message that echoes a huge request value (a 1 MB model name) got there.
MAX_STATUS_MESSAGE_BYTES = 4096


def _encoded_len(ch: str) -> int:
    # grpc-message keeps printable ASCII but '%' as is and percent-encodes every other byte.
    if " " <= ch <= "~" and ch != "%":
        return 1
    return 3 * len(ch.encode("utf-8", "surrogatepass"))


def fit_status_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` cut in the middle (where echoed values sit) so that it fits the trailer.

    Its start (what was wrong) and its end (how to fix it) are kept.
    """
    if len(message) * 12 <= limit or sum(map(_encoded_len, message)) <= limit:
        return message
    budget = (limit - 64) // 2
    head: list[str] = []
    used = 0
    for ch in message:
        used += _encoded_len(ch)
        if used > budget:
            break
        head.append(ch)
    tail: list[str] = []
    used = 0
    for ch in reversed(message):
        used += _encoded_len(ch)
        if used > budget:
            break
        tail.append(ch)
    cut = len(message) - len(head) - len(tail)
    return f"{''.join(head)} …[{cut} characters cut]… {''.join(reversed(tail))}"


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception raised by server code to a status code and a message (its sentence,
    cut to fit a status trailer when it echoes a huge value)."""
    code, message = _status_for(exc)
    return code, fit_status_message(message)


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, LLMeshError):
        return exc.code, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc) or "the operation timed out"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, str(exc) or "not implemented"
    # etcd unreachable surfaces as aetcd connection errors; they are an outage, not a bug.
    if type(exc).__module__.startswith("aetcd") and "Connection" in type(exc).__name__:
        return grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_for_code(code: int | grpc.StatusCode, message: str) -> LLMeshError:
    """The llmesh exception for a status code and its sentence.

    For statuses carried inside messages (a ChatSession request's ``RequestError``) rather than
    as the status of a call.

    Args:
        code: a ``grpc.StatusCode`` or its number (``google.rpc.Code``).
        message: what was wrong.
    """
    status = code if isinstance(code, grpc.StatusCode) else _BY_NUMBER.get(code)
    if status is None:
        status = grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(status, LLMeshError)
    out = cls(message or status.name)
    out.code = status
    return out


def from_rpc_error(err: grpc.RpcError) -> LLMeshError:
    """Turn a gRPC error seen by a client into the matching llmesh exception."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return error_for_code(code, details)


def rpc_handler(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a grpc.aio servicer method so domain errors become gRPC statuses.

    Works for unary coroutines and for async-generator (streaming) methods. Cancellation is
    re-raised untouched so grpc can tear the call down.
    """
    from llmesh.common import tracing

    name = fn.__qualname__

    async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("internal error in %s", name, exc_info=exc)
        await context.abort(code, message)

    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def stream_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
            items = fn(self, request, context)
            if tracing.server_spans():
                items = tracing.server_stream(name, context, self, items)
            try:
                async for item in items:
                    yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - translated, never leaked
                await _abort(context, exc)
            finally:
                # Closed from above (grpc, an auth check): close the handler now, in this
                # task, rather than when the garbage collector finds it.
                await items.aclose()  # type: ignore[attr-defined]

        return stream_wrapper

    @functools.wraps(fn)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext):
        with tracing.server_span(name, context, self):
            try:
                return await fn(self, request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as exc:  # noqa: BLE001 - translated, never leaked
                await _abort(context, exc)

    return unary_wrapper
