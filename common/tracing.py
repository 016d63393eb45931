"""OpenTelemetry tracing: a span per RPC, W3C trace context carried in gRPC metadata.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``console`` or ``otlp``); when off, the
API's no-op tracer makes every span a cheap no-op. Standard ``OTEL_*`` variables
(``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ...) configure the SDK.

Spans carry the OpenTelemetry semantic conventions: ``rpc.*`` on every RPC (the v1.37 names
by default; ``OTEL_SEMCONV_STABILITY_OPT_IN=rpc`` switches to the stable ``rpc.system.name`` /
``rpc.response.status_code`` set, ``rpc/dup`` emits both, as the RPC conventions ask of
existing instrumentations), ``gen_ai.*`` on generation requests, and the SDK's routing
decision (``llmesh.route.*``). All helpers here cost one flag test when tracing is off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from llmesh.v1 import common_pb2

if TYPE_CHECKING:
    from llmesh.common.routing import RouteDecision

log = logging.getLogger(__name__)
_configured = False


def configure(service_name: str) -> bool:
    """Install an SDK tracer provider if ``OTEL_TRACES_EXPORTER`` asks for one.

    Returns True when tracing is on. Safe to call more than once.
    """
    global _configured
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if _configured or exporter_name in ("", "none"):
        return _configured
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)})
    provider = TracerProvider(resource=resource)
    for name in exporter_name.split(","):
        name = name.strip()
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                    OTLPSpanExporter,
                )
            except ImportError:
                log.warning("OTEL_TRACES_EXPORTER=otlp needs `pip install llmesh[otlp]`")
                continue
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
    install(provider)
    return True


def install(provider: trace.TracerProvider) -> None:
    """Use ``provider`` for llmesh spans from now on (tests pass one with an in-memory exporter).

    OpenTelemetry allows one global provider per process; this sets it and turns llmesh's
    server spans on.
    """
    global _configured
    trace.set_tracer_provider(provider)
    _configured = True
    _semconv_modes.cache_clear()


def enable() -> None:
    """Turn llmesh's spans back on after :func:`disable`, with the provider installed before."""
    global _configured
    _configured = True


def disable() -> None:
    """Stop making llmesh server spans (OpenTelemetry keeps its one global provider)."""
    global _configured
    _configured = False


def _tracer() -> trace.Tracer:
    return trace.get_tracer("llmesh")


def _start_server_span(
    name: str, context: Any, servicer: object | None
) -> tuple[trace.Span, otel_context.Context]:
    """The SERVER span of a call and the context to run its handler in: the caller's (with
    its baggage, which outgoing calls carry on) with the span current."""
    path = method_path(type(servicer), name) if servicer is not None else name
    attributes = dict(rpc_attributes(path))
    attributes.update(_peer_attributes(context.peer()))
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    parent = propagate.extract(carrier)
    span = _tracer().start_span(
        path, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes
    )
    return span, trace.set_span_in_context(span, parent)


def _end_server_span(span: trace.Span, context: Any, exc: BaseException | None) -> None:
    if exc is None:
        end_rpc(span, context.code() or grpc.StatusCode.OK, server=True)
    elif isinstance(exc, grpc.aio.AbortError) or (
        # Closed or cancelled from above (an auth check aborted it, grpc cancelled the call):
        # the status already sent, when there is one, says more than "cancelled".
        not isinstance(exc, Exception) and context.code() is not None
    ):
        code = context.code() or grpc.StatusCode.UNKNOWN
        end_rpc(span, code, server=True, message=context.details())
    else:
        from llmesh.common.errors import status_for

        code, message = status_for(exc) if isinstance(exc, Exception) else (_code_of(exc), "")
        end_rpc(span, code, server=True, message=message or str(exc))
    span.end()


@contextlib.contextmanager
def server_span(name: str, context: Any, servicer: object | None = None) -> Iterator[None]:
    """Open a SERVER span for a unary RPC, continuing the caller's trace from its metadata.

    Only for blocks that do not ``yield`` to someone else while the span is current; a
    streaming handler uses :func:`server_stream`.

    Args:
        name: the method's qualified name in the servicer (``ControlPlaneServicer.GetModel``).
        context: the call's ``grpc.aio.ServicerContext``.
        servicer: the servicer instance; its generated base class names the gRPC service, so
            the span is named ``llmesh.v1.ControlPlaneService/GetModel`` as semconv asks.
    """
    if not _configured:
        yield
        return
    span, span_context = _start_server_span(name, context, servicer)
    token = otel_context.attach(span_context)
    try:
        yield
    except BaseException as exc:
        otel_context.detach(token)
        _end_server_span(span, context, exc)
        raise
    otel_context.detach(token)
    _end_server_span(span, context, None)


def server_spans() -> bool:
    """Whether this process makes SERVER spans (tracing configured)."""
    return _configured


async def server_stream(
    name: str, context: Any, servicer: object | None, items: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    """A streaming handler's responses under one SERVER span (see :func:`server_span`).

    The span is current only while ``items`` runs (each step attaches and detaches it in the
    same step), never across the ``yield`` to grpc: a context attached across a suspension is
    detached in another context when the stream is closed from elsewhere, which OpenTelemetry
    reports as "Failed to detach context" and leaves the wrong span current.
    """
    span, span_context = _start_server_span(name, context, servicer)
    step = items.__anext__
    error: BaseException | None = None
    try:
        while True:
            token = otel_context.attach(span_context)
            try:
                item = await step()
            except StopAsyncIteration:
                break
            finally:
                otel_context.detach(token)
            yield item
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            close = getattr(items, "aclose", None)
            if close is not None:
                await close()
        finally:
            _end_server_span(span, context, error)


@contextlib.contextmanager
def request_span(name: str, carrier: Mapping[str, str] | None) -> Iterator[None]:
    """Open a SERVER span for one request on a multi-request stream, continuing the trace
    whose context the request carried (``SessionStart.trace_context``)."""
    if not _configured:
        yield
        return
    if not carrier:  # no context came with it: a child of whatever span is current
        with _tracer().start_as_current_span(name, kind=trace.SpanKind.SERVER):
            yield
        return
    parent = propagate.extract(dict(carrier))
    span = _tracer().start_span(name, context=parent, kind=trace.SpanKind.SERVER)
    # The caller's context (its baggage included) with the span current; attached and
    # detached in this one block, which never yields to another task.
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    try:
        yield
    finally:
        otel_context.detach(token)
        span.end()


@contextlib.contextmanager
def client_span(
    name: str,
    address: str = "",
    *,
    decision: RouteDecision | None = None,
    cause: str = "",
) -> Iterator[list[tuple[str, str]]]:
    """Open a CLIENT span and yield the metadata that carries it to the server.

    The span is a child of the current one but never becomes current itself, so a ``with``
    block may span the ``yield``s of a streaming generator: nothing is attached to the
    caller's context that a later step (or a close from elsewhere) would have to detach.

    Args:
        name: ``Service/Method`` (``llmesh.v1.`` is added) or a full ``package.Service/Method``.
        address: ``host:port`` of the server, for ``server.address`` / ``server.port``.
        decision: the routing decision that chose the server, recorded on the span (see
            :func:`record_route`).
        cause: ``retry`` when this call replaces a failed one.
    """
    if not _configured and not _has_active_span():
        yield []
        return
    path = full_method(name)
    attributes = dict(rpc_attributes(path))
    if address:
        attributes.update(_server_attributes(address))
    span = _tracer().start_span(path, kind=trace.SpanKind.CLIENT, attributes=attributes)
    record_route(span, decision, cause)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    try:
        yield list(carrier.items())
    except BaseException as exc:
        end_span(span, exc)
        raise
    end_span(span)


def _has_active_span() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata carrying the current trace context, for calls made inside a server span."""
    if not _configured and not _has_active_span():
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())


def enabled() -> bool:
    """True when llmesh makes spans here: tracing configured, or the caller's own span open."""
    return _configured or _has_active_span()


# -- semantic conventions ---------------------------------------------------------------------

#: Status codes that make a SERVER span an error (semconv: the server's fault, not the caller's).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_PACKAGE = "llmesh.v1"


@functools.cache
def _semconv_modes() -> tuple[bool, bool]:
    """(emit the v1.37 rpc attributes, emit the stable ones), from OTEL_SEMCONV_STABILITY_OPT_IN."""
    opt_in = {v.strip() for v in os.environ.get("OTEL_SEMCONV_STABILITY_OPT_IN", "").split(",")}
    if "rpc/dup" in opt_in:
        return True, True
    if "rpc" in opt_in:
        return False, True
    return True, False


def full_method(name: str) -> str:
    """``Service/Method`` → ``llmesh.v1.Service/Method``; a full path is returned as is."""
    service, _, _ = name.partition("/")
    return name if "." in service else f"{_PACKAGE}.{name}"


@functools.cache
def method_path(servicer_type: type, qualname: str) -> str:
    """The gRPC path (``llmesh.v1.ControlPlaneService/GetModel``) of a servicer method.

    The servicer's generated base class (``ControlPlaneServiceServicer`` in a ``*_pb2_grpc``
    module) names the service; its ``*_pb2`` module's descriptor names the package.
    """
    method = qualname.rpartition(".")[2]
    for cls in servicer_type.__mro__:
        if cls.__module__.endswith("_pb2_grpc") and cls.__name__.endswith("Servicer"):
            pb2 = sys.modules.get(cls.__module__[: -len("_grpc")])
            package = pb2.DESCRIPTOR.package if pb2 is not None else _PACKAGE
            return f"{package}.{cls.__name__.removesuffix('Servicer')}/{method}"
    return qualname


@functools.cache
def _rpc_attributes(path: str, old: bool, new: bool) -> Mapping[str, str]:
    service, _, method = path.rpartition("/")
    out: dict[str, str] = {}
    if old:
        out.update({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    if new:
        out.update({"rpc.system.name": "grpc", "rpc.method": path})
    return out


def rpc_attributes(path: str) -> Mapping[str, str]:
    """The ``rpc.*`` attributes of a call to ``path`` (``package.Service/Method``)."""
    return _rpc_attributes(path, *_semconv_modes())


def _split_host_port(text: str) -> tuple[str, int | None]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text, None
    return host.strip("[]"), int(port)


def _server_attributes(address: str) -> dict[str, Any]:
    host, port = _split_host_port(address)
    out: dict[str, Any] = {"server.address": host}
    if port is not None:
        out["server.port"] = port
    return out


def _peer_attributes(peer: str | None) -> dict[str, Any]:
    """``network.peer.*`` from grpc's peer string (``ipv4:127.0.0.1:4242``, ``ipv6:[::1]:42``)."""
    if not peer:
        return {}
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6"):
        return {"network.peer.address": rest or peer}
    host, port = _split_host_port(rest)
    out: dict[str, Any] = {"network.peer.address": host, "network.type": kind}
    if port is not None:
        out["network.peer.port"] = port
    return out


def _code_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception stands for (grpc errors, llmesh errors, cancellation)."""
    code = getattr(exc, "code", None)
    if callable(code):  # grpc.RpcError
        code = code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt)) or type(exc).__name__ == (
        "CancelledError"
    ):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def end_rpc(
    span: trace.Span, code: grpc.StatusCode, *, server: bool, message: str | None = None
) -> None:
    """Record an RPC's status code on its span (and an error status where semconv says so)."""
    old, new = _semconv_modes()
    if old:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
    if new:
        span.set_attribute("rpc.response.status_code", code.name)
    if code != grpc.StatusCode.OK and (not server or code in _SERVER_ERRORS):
        span.set_attribute("error.type", code.name)
        span.set_status(Status(StatusCode.ERROR, message or code.name))


# -- generation requests: the SDK side --------------------------------------------------------

#: FinishReason values as the engines name them ("stop", "length", "stop_string", "aborted").
_FINISH_NAMES = {
    v.number: v.name.removeprefix("FINISH_REASON_").lower()
    for v in common_pb2.FinishReason.DESCRIPTOR.values
    if v.number
}


def start_generation(
    operation: str, model: str, request_id: str, params: Any = None
) -> trace.Span | None:
    """A CLIENT span for one generation request over its whole stream, every attempt included;
    None when tracing is off. End it with :func:`end_span` (``rpc=False``).

    Args:
        operation: ``gen_ai.operation.name``: ``chat`` or ``text_completion``.
        model: the model asked for.
        request_id: the request's id (``llmesh.request.id``).
        params: the request's ``GenerationParams``, for ``gen_ai.request.*``.
    """
    if not enabled():
        return None
    attributes: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": "llmesh",
        "gen_ai.request.model": model,
        "llmesh.request.id": request_id,
    }
    if params is not None:
        for field, key in (
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
            ("top_p", "gen_ai.request.top_p"),
            ("top_k", "gen_ai.request.top_k"),
            ("seed", "gen_ai.request.seed"),
        ):
            if params.HasField(field):
                attributes[key] = getattr(params, field)
    return _tracer().start_span(
        f"{operation} {model}", kind=trace.SpanKind.CLIENT, attributes=attributes
    )


def start_attempt(
    parent: trace.Span | None, name: str, address: str
) -> tuple[trace.Span | None, dict[str, str]]:
    """A CLIENT span for one try of a request on one server, under ``parent``, and the trace
    context (W3C headers) that carries it there. ``(None, {})`` when ``parent`` is None."""
    if parent is None:
        return None, {}
    path = full_method(name)
    attributes = dict(rpc_attributes(path))
    attributes.update(_server_attributes(address))
    span = _tracer().start_span(
        path,
        context=trace.set_span_in_context(parent),
        kind=trace.SpanKind.CLIENT,
        attributes=attributes,
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return span, carrier


def end_span(
    span: trace.Span | None, exc: BaseException | None = None, *, rpc: bool = True
) -> None:
    """End a span from :func:`start_generation` / :func:`start_attempt`, with the status that
    ``exc`` (None: success) stands for."""
    if span is None:
        return
    code = grpc.StatusCode.OK if exc is None else _code_of(exc)
    if rpc:
        end_rpc(span, code, server=False, message=None if exc is None else str(exc))
    elif exc is not None:
        span.set_attribute("error.type", code.name)
        span.set_status(Status(StatusCode.ERROR, str(exc)))
    span.end()


@contextlib.contextmanager
def attempt(parent: trace.Span | None, name: str, address: str) -> Iterator[dict[str, str]]:
    """One try of a request on one server as a CLIENT span under ``parent`` (the request's
    span), for the whole ``with`` block: yields the trace context to send with the request
    (empty when ``parent`` is None) and ends the span with the block's status."""
    span, carrier = start_attempt(parent, name, address)
    if span is None:
        yield carrier
        return
    try:
        yield carrier
    except BaseException as exc:
        end_span(span, exc)
        raise
    end_span(span)


def _finished(span: trace.Span, batch: Sequence[Any]) -> None:
    last = batch[-1] if batch else None
    if last is not None and last.finished:
        usage = last.usage
        set_usage(span, usage.prompt_tokens, usage.completion_tokens, last.finish_reason)


def traced_batches(
    start: Callable[[], trace.Span | None],
    batches_for: Callable[[trace.Span | None], Iterator[Sequence[Any]]],
) -> Iterator[Any]:
    """A request's batches of ``ChatResponse`` under the span ``start()`` opens (see
    :func:`start_generation`), kept open for the whole stream: usage and finish reason from
    the final response, the error it ended with, and the end when the stream ends or its
    reader stops early (closing the stream).

    Nothing starts before the first ``next()``: a stream never iterated leaves no open span.

    Args:
        start: opens the request's span (None: tracing is off).
        batches_for: makes the stream, given that span.
    """
    span = start()
    batches = batches_for(span)
    if span is None:
        yield from batches
        return
    error: BaseException | None = None
    try:
        for batch in batches:
            _finished(span, batch)
            yield batch
    except GeneratorExit:
        raise  # the reader stopped early: not an error of the request
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            batches.close()  # type: ignore[attr-defined]
        except BaseException as exc:
            error = error or exc
            raise
        finally:  # a close that raises must not leave the span open
            end_span(span, error, rpc=False)


async def atraced_batches(
    start: Callable[[], trace.Span | None],
    batches_for: Callable[[trace.Span | None], AsyncIterator[Sequence[Any]]],
) -> AsyncIterator[Any]:
    """:func:`traced_batches` for an async stream."""
    span = start()
    batches = batches_for(span)
    if span is None:
        try:
            async for batch in batches:
                yield batch
        finally:  # an early stop closes the stream now, not when it is collected
            await batches.aclose()  # type: ignore[attr-defined]
        return
    error: BaseException | None = None
    try:
        async for batch in batches:
            _finished(span, batch)
            yield batch
    except GeneratorExit:
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        try:
            await batches.aclose()  # type: ignore[attr-defined]
        except BaseException as exc:
            error = error or exc
            raise
        finally:
            end_span(span, error, rpc=False)


def set_usage(
    span: trace.Span | None,
    input_tokens: int,
    output_tokens: int,
    finish_reason: int | str | None,
) -> None:
    """``gen_ai.usage.*`` and ``gen_ai.response.finish_reasons`` of a finished request.

    Args:
        span: the request's span (None: nothing to do).
        input_tokens: prompt tokens.
        output_tokens: generated tokens.
        finish_reason: a ``FinishReason`` value or the engine's name for it.
    """
    if span is None:
        return
    span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
    if isinstance(finish_reason, int):
        finish_reason = _FINISH_NAMES.get(finish_reason)
    if finish_reason:
        span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])


def current_span(decision: object | None) -> trace.Span | None:
    """The current span when a routing decision is being recorded (None otherwise)."""
    return None if decision is None else trace.get_current_span()


def record_route(span: trace.Span | None, decision: RouteDecision | None, cause: str = "") -> None:
    """Put a routing decision on a request's span: ``llmesh.route.*`` attributes (the latest
    pick) and one ``llmesh.route`` event per pick (a retry or a move picks again).

    Args:
        span: the request's span.
        decision: what the selector filled in.
        cause: ``retry`` or ``migration`` when this pick replaces an earlier one.
    """
    if span is None or decision is None:
        return
    attributes: dict[str, Any] = {
        "llmesh.route.reason": cause or decision.rule,
        "llmesh.route.rule": decision.rule,
        "llmesh.route.policy": decision.policy,
        "llmesh.route.candidates": list(decision.candidates),
        "llmesh.route.replica": decision.replica,
        "llmesh.route.worker": decision.worker,
        "llmesh.route.address": decision.address,
    }
    span.set_attributes(attributes)
    span.add_event("llmesh.route", attributes)


# -- generation requests: the replica side ----------------------------------------------------


class RunTrace:
    """One request's phases on a replica, as child spans of its request span: time in the
    admission queue, prefill (to the first token) and decode (to the end).

    The spans are made when each phase ends, from timestamps, so nothing is held open across
    the engine's awaits. :func:`run_trace` returns a no-op stand-in when tracing is off.
    """

    __slots__ = ("_admitted", "_context", "_first", "_queued", "_span")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._context = trace.set_span_in_context(span)
        self._queued = self._admitted = self._first = 0

    def queued(self) -> None:
        """The request asks for a slot."""
        self._queued = time.time_ns()

    def admitted(self) -> None:
        """The request holds a slot: the queue wait ends, prefill begins."""
        self._admitted = time.time_ns()
        if self._queued:
            self._child("llmesh.queue_wait", self._queued, self._admitted)

    def first_token(self) -> None:
        """Output arrived (cheap after the first call): prefill ends, decode begins."""
        if self._first or not self._admitted:
            return
        self._first = time.time_ns()
        self._child("llmesh.prefill", self._admitted, self._first)

    def finished(self, input_tokens: int, output_tokens: int, finish_reason: str | None) -> None:
        """The engine's final chunk: decode ends; usage and finish reason go on the request."""
        now = time.time_ns()
        if not self._first and self._admitted:
            self._child(
                "llmesh.prefill", self._admitted, now, {"gen_ai.usage.input_tokens": input_tokens}
            )
        elif self._first:
            self._child(
                "llmesh.decode", self._first, now, {"gen_ai.usage.output_tokens": output_tokens}
            )
        set_usage(self._span, input_tokens, output_tokens, finish_reason)

    def _child(
        self, name: str, start: int, end: int, attributes: Mapping[str, Any] | None = None
    ) -> None:
        span = _tracer().start_span(
            name, context=self._context, start_time=start, attributes=attributes
        )
        span.end(end_time=end)


class NoRunTrace:
    """What :func:`run_trace` returns when tracing is off: every hook does nothing."""

    __slots__ = ()

    def queued(self) -> None:
        pass

    def admitted(self) -> None:
        pass

    def first_token(self) -> None:
        pass

    def finished(self, input_tokens: int, output_tokens: int, finish_reason: str | None) -> None:
        pass


#: The shared no-op recorder.
NO_RUN_TRACE = NoRunTrace()


def run_trace(
    model: str, request_id: str, *, chat: bool, replica: int | None = None
) -> RunTrace | NoRunTrace:
    """The phase recorder of one request on a replica, its ``gen_ai.*`` attributes set on the
    current span (the request's); a shared no-op when tracing is off.

    Args:
        model: the model served.
        request_id: the request's id.
        chat: True for messages (``chat``), False for a raw prompt (``text_completion``).
        replica: the replica index serving it.
    """
    if not _configured:
        return NO_RUN_TRACE
    span = trace.get_current_span()
    if not span.is_recording():
        return NO_RUN_TRACE
    span.set_attributes(
        {
            "gen_ai.operation.name": "chat" if chat else "text_completion",
            "gen_ai.provider.name": "llmesh",
            "gen_ai.request.model": model,
            "llmesh.request.id": request_id,
        }
    )
    if replica is not None:
        span.set_attribute("llmesh.replica", replica)
    return RunTrace(span)
