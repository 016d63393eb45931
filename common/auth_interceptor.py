"""The one server interceptor that checks bearer tokens, roles and model scopes, and audits.

:class:`Authenticator` is what a server passes to :class:`llmesh.common.grpc_server.Server`
(``auth=``). For each call the interceptor looks the method up in
:mod:`llmesh.common.auth_policy`: open methods (health) pass untouched; any other needs a valid
token (UNAUTHENTICATED otherwise) of a role that may call it (PERMISSION_DENIED otherwise),
and for unary requests the model the request names must be in the token's scope. The handler
then runs with :func:`llmesh.common.auth.current_principal` set, so servicers can check models
inside streams and forward the caller's token. Admin calls are recorded in the audit log with
their outcome, refused ones included.
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
    current_principal,
    set_current_principal,
)
from llmesh.common.auth_policy import OPEN, Rule, role_allows, rule_for
from llmesh.common.errors import LLMeshError, PermissionDenied, Unauthenticated, status_for

log = logging.getLogger(__name__)


class Authenticator:
    """Token checks for one server.

    Args:
        table: the token records to check against (kept current by a follower).
        audit: where admin calls are recorded; None records nothing.
    """

    def __init__(self, table: TokenTable, *, audit: AuditLog | None = None) -> None:
        self.table = table
        self.audit = audit

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

    async def record(
        self,
        method: str,
        principal: Principal | None,
        request: Any,
        context: grpc.aio.ServicerContext,
        code: grpc.StatusCode,
        message: str,
    ) -> None:
        """Append an audit entry for an admin call."""
        if self.audit is None:
            return
        try:
            peer = context.peer()
        except Exception:  # noqa: BLE001 - a peer is nice to have
            peer = ""
        entry = AuditEntry(
            time=time.time(),
            who=principal.who if principal else "(no valid token)",
            token_id=principal.id if principal else "",
            role=principal.role if principal else "",
            method=method,
            request=summarize(request),
            peer=peer or "",
            code=code.name,
            message=message,
        )
        await self.audit.record(entry)


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
        if audit:
            body = None if handler.request_streaming else request
            await auth.record(method, principal, body, context, code, message)
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
            task = asyncio.ensure_future(
                auth.record(method, principal, body, context, grpc.StatusCode.CANCELLED, "")
            )
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
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
                await context.abort(code, message)
            error: BaseException | None = None
            if rule.admin:
                context = _AuditedContext(context, auth, method, principal, request)
            try:
                result = original(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
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
