"""The one server interceptor that checks bearer tokens, roles and model scopes, and audits.

:class:`Authenticator` is what a server passes to :class:`llmesh.common.grpc_server.Server`
(``auth=``). For each call the interceptor looks the method up in
:mod:`llmesh.common.auth_policy`: open methods (health) pass untouched; any other needs a valid
token (UNAUTHENTICATED otherwise) of a role that may call it (PERMISSION_DENIED otherwise),
and for unary requests the model the request names must be in the token's scope. The handler
then runs with :func:`llmesh.common.auth.current_principal` set, so servicers can check models
inside streams and forward the caller's token. Admin calls by a valid token are recorded in the
audit log with their outcome, refused ones included.

Calls without a valid token are never written to the audit log (etcd): anyone who can reach
the port could otherwise fill etcd. They, and refusals of user-role calls, go to the server log
only, without the request body, at most one line per method, outcome and caller a minute
(:class:`RefusalLog`).

A stream is authenticated when it opens; a revoke must still end what it opened. Server
streams (the Watch RPCs) look the caller up again before each message they send
(:func:`llmesh.common.auth.check_caller`: an integer comparison unless the token table
changed) and end UNAUTHENTICATED once the token is gone. Client-streaming RPCs (``Chat``,
``ChatSession``, reflection) get their original handler, with no wrapper per message: their
servicers check each request themselves (:func:`llmesh.common.auth.check_model`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from llmesh.common.audit import AuditEntry, AuditLog, summarize
from llmesh.common.auth import (
    Principal,
    TokenTable,
    bearer_of,
    check_caller,
    current_principal,
    set_current_principal,
)
from llmesh.common.auth_policy import OPEN, Rule, role_allows, rule_for
from llmesh.common.errors import LLMeshError, PermissionDenied, Unauthenticated, status_for

log = logging.getLogger(__name__)

_REFUSAL_INTERVAL = 60.0
_REFUSAL_KEYS = 1024


class RefusalLog:
    """Logs refused calls, rate-limited: one line per (method, outcome, caller) per interval.

    The suppressed count goes into the next line, so a flood is visible without one line per
    call. No request bodies: the caller may be anyone.

    Args:
        interval: seconds between lines for the same key.
    """

    def __init__(self, interval: float = _REFUSAL_INTERVAL) -> None:
        self.interval = interval
        self._seen: dict[tuple[str, str, str], tuple[float, int]] = {}

    def note(self, method: str, who: str, peer: str, code: grpc.StatusCode, message: str) -> None:
        """Log one refusal unless the same one was logged less than ``interval`` ago."""
        key = (method, code.name, who)
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return
        if len(self._seen) >= _REFUSAL_KEYS:
            self._seen.clear()  # bounded memory: callers choose the keys
        self._seen[key] = (now, 0)
        more = f" (+{last[1]} more like it since the last line)" if last and last[1] else ""
        log.warning(
            "refused %s from %s (%s): %s: %s%s", method, peer, who, code.name, message, more
        )


class Authenticator:
    """Token checks for one server.

    Args:
        table: the token records to check against (kept current by a follower).
        audit: where admin calls are recorded; None records nothing.
    """

    def __init__(self, table: TokenTable, *, audit: AuditLog | None = None) -> None:
        self.table = table
        self.audit = audit
        self.refusals = RefusalLog()
        # Audit writes of cancelled calls run on the side; held here until done, since the
        # event loop keeps only weak references to tasks.
        self._side_tasks: set[asyncio.Future[None]] = set()

    def authenticate(self, method: str, metadata: Any) -> tuple[Rule, Principal | None]:
        """The rule for ``method`` and the caller (None for open methods).

        Raises:
            Unauthenticated: no valid token.
            PermissionDenied: the token's role may not call ``method``.
        """
        rule = rule_for(method)
        if rule.role == OPEN:
            return rule, None
        principal = self.table.verify(bearer_of(metadata))
        self.check_role(method, rule, principal)
        return rule, principal

    @staticmethod
    def check_role(method: str, rule: Rule, principal: Principal) -> None:
        """Raise PermissionDenied unless ``principal``'s role may call ``method``."""
        if not role_allows(principal.role, rule.role):
            raise PermissionDenied(
                f"{method.lstrip('/')} needs an {rule.role} token and token {principal.who} "
                f"has role {principal.role}; ask an operator for an {rule.role} token"
            )

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """The grpc.aio interceptor to install on a server."""
        return _AuthInterceptor(self)

    def record_later(
        self,
        method: str,
        principal: Principal,
        request: Any,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """:meth:`record` in a task of its own (for a cancelled call, which must not await)."""
        task = asyncio.ensure_future(
            self.record(method, principal, request, context, code, message)
        )
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def note_refusal(
        self,
        method: str,
        principal: Principal | None,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Log a refused call (rate-limited, no request body): see :class:`RefusalLog`."""
        who = principal.who if principal else "no valid token"
        self.refusals.note(method, who, _peer(context), code, message)

    async def record(
        self,
        method: str,
        principal: Principal,
        request: Any,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Append an audit entry for an admin call by a valid token."""
        if self.audit is None:
            return
        entry = AuditEntry(
            time=time.time(),
            who=principal.who,
            token_id=principal.id,
            role=principal.role,
            method=method,
            request=summarize(request),
            peer=_peer(context),
            code=code.name,
            message=message,
        )
        await self.audit.record(entry)


def _peer(context: grpc.aio.ServicerContext) -> str:
    try:
        return context.peer() or ""
    except Exception:  # noqa: BLE001 - a peer is nice to have
        return ""


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return grpc.StatusCode.CANCELLED  # the client went away (a stream closed early)
    if exc is not None and not isinstance(exc, grpc.aio.AbortError):
        return status_for(exc)[0]
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN if exc is not None else grpc.StatusCode.OK


class _AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: Authenticator) -> None:
        self.auth = auth
        # Wrapped handlers, built once per method: building them per call cost about as much
        # as the interceptor itself (measured on ListModels).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        rule = rule_for(method)
        if rule.role == OPEN:
            return handler
        principal: Principal | None = None
        try:
            principal = self.auth.table.verify(bearer_of(details.invocation_metadata))
            self.auth.check_role(method, rule, principal)
        except LLMeshError as exc:
            return _refusal(self.auth, handler, method, exc, principal, audit=rule.admin)
        # grpc.aio runs each call's interceptors and handler in one task of its own, so the
        # caller set here is what the handler (and the tasks it starts) sees, and no other call.
        set_current_principal(principal)
        if handler.request_streaming and rule.models is None and not rule.admin:
            # Nothing for a wrapper to do per message: these servicers check each request
            # themselves (check_model), so spare every message an extra generator hop.
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = (handler, _wrap(self.auth, handler, method, rule))
            self._wrapped[method] = cached
        return cached[1]


def _rebuild(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any]) -> Any:
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _original(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


def _refusal(
    auth: Authenticator,
    handler: grpc.RpcMethodHandler,
    method: str,
    exc: LLMeshError,
    principal: Principal | None,
    *,
    audit: bool,
) -> Any:
    """A handler that answers ``exc``'s status without running the method."""
    code, message = status_for(exc)

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        if audit and principal is not None:
            body = None if handler.request_streaming else request
            await auth.record(method, principal, body, context, code, message)
        else:
            # No valid token: the log only, rate-limited; never etcd (see the module docstring).
            auth.note_refusal(method, principal, context, code, message)
        await context.abort(code, message)

    if handler.response_streaming:

        async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await refuse(request, context)
            yield  # pragma: no cover - abort raised above

        return _rebuild(handler, refuse_stream)
    return _rebuild(handler, refuse)


class _AuditedContext:
    """The call's context, but an abort is audited before its status goes to the client.

    grpc.aio sends the status as soon as ``abort`` is called, so recording the outcome after
    the handler ended could land after the caller already saw it (and read the log).
    """

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        auth: Authenticator,
        method: str,
        principal: Principal,
        request: Any,
    ) -> None:
        self._context = context
        self._auth = auth
        self._method = method
        self._principal = principal
        self._request = request
        self.audited = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    async def abort(self, code: grpc.StatusCode, details: str = "", *args: Any) -> None:
        if not self.audited:
            self.audited = True
            body = self._request if isinstance(self._request, Message) else None
            await self._auth.record(
                self._method, self._principal, body, self._context, code, details
            )
        await self._context.abort(code, details, *args)


def _caller() -> Principal:
    principal = current_principal()
    if principal is None:  # never seen; refuse rather than run a call nobody checked
        raise Unauthenticated("the call's token was not checked; retry the call")
    return principal


def _revoked() -> Unauthenticated | None:
    """Why the stream's caller is no longer valid, or None while it is."""
    try:
        check_caller()
    except Unauthenticated as exc:
        return exc
    return None


def _wrap(
    auth: Authenticator,
    handler: grpc.RpcMethodHandler,
    method: str,
    rule: Rule,
) -> Any:
    """The handler with the request's models checked and admin calls audited.

    Built once per method; the caller comes from :func:`current_principal`, which the
    interceptor sets for each call.
    """
    original = _original(handler)

    def scope_error(request: Any, principal: Principal) -> PermissionDenied | None:
        if rule.models is None or handler.request_streaming:
            return None
        for model in rule.models(request):
            if model and not principal.may_use(model):
                return PermissionDenied(
                    f"token {principal.who} may use only {', '.join(principal.models)}, not "
                    f"model {model!r}; ask an operator for a token that includes it"
                )
        return None

    async def finish(
        request: Any, context: Any, exc: BaseException | None, principal: Principal
    ) -> None:
        if not rule.admin or getattr(context, "audited", False):
            return
        body = None if handler.request_streaming else request
        code = _code_of(context, exc)
        message = "" if code == grpc.StatusCode.OK else (context.details() or str(exc or ""))
        if isinstance(exc, asyncio.CancelledError):
            # Cancelled: do not await in a dying task; the entry is written on the side.
            auth.record_later(method, principal, body, context, grpc.StatusCode.CANCELLED, "")
            return
        await auth.record(method, principal, body, context, code, message)

    if handler.response_streaming:

        async def stream_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = _caller()
            denied = scope_error(request, principal)
            if denied is not None:
                code, message = status_for(denied)
                if rule.admin:
                    await auth.record(method, principal, request, context, code, message)
                else:
                    auth.note_refusal(method, principal, context, code, message)
                await context.abort(code, message)
            error: BaseException | None = None
            if rule.admin:
                context = _AuditedContext(context, auth, method, principal, request)
            try:
                result = original(request, context)
                if inspect.isasyncgen(result):
                    try:
                        async for item in result:
                            revoked = _revoked()
                            if revoked is not None:
                                code, message = status_for(revoked)
                                auth.note_refusal(method, principal, context, code, message)
                                await context.abort(code, message)
                            yield item
                    finally:  # the handler ends now, in this task, however this one ends
                        await result.aclose()
                else:
                    await result
            except BaseException as exc:
                error = exc
                raise
            finally:
                await finish(request, context, error, principal)

        return _rebuild(handler, stream_behavior)

    async def unary_behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
        principal = _caller()
        denied = scope_error(request, principal)
        if denied is not None:
            code, message = status_for(denied)
            if rule.admin:
                await auth.record(method, principal, request, context, code, message)
            else:
                auth.note_refusal(method, principal, context, code, message)
            await context.abort(code, message)
        error: BaseException | None = None
        if rule.admin:
            context = _AuditedContext(context, auth, method, principal, request)
        try:
            return await original(request, context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            await finish(request, context, error, principal)

    return _rebuild(handler, unary_behavior)
