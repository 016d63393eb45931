"""OpenTelemetry tracing: a span per RPC, W3C trace context carried in gRPC metadata.

Off unless ``OTEL_TRACES_EXPORTER`` names an exporter (``console`` or ``otlp``); when off, the
API's no-op tracer makes every span a cheap no-op. Standard ``OTEL_*`` variables
(``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_ENDPOINT``, ...) configure the SDK.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

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


def disable() -> None:
    """Stop making llmesh server spans (OpenTelemetry keeps its one global provider)."""
    global _configured
    _configured = False


def _tracer() -> trace.Tracer:
    return trace.get_tracer("llmesh")


@contextlib.contextmanager
def server_span(name: str, context: Any) -> Iterator[None]:
    """Open a SERVER span for an RPC, continuing the caller's trace from its metadata."""
    if not _configured:
        yield
        return
    carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    parent = propagate.extract(carrier)
    token = otel_context.attach(parent)
    try:
        with _tracer().start_as_current_span(name, kind=trace.SpanKind.SERVER):
            yield
    finally:
        otel_context.detach(token)


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
    token = otel_context.attach(propagate.extract(dict(carrier)))
    try:
        with _tracer().start_as_current_span(name, kind=trace.SpanKind.SERVER):
            yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def client_span(name: str) -> Iterator[list[tuple[str, str]]]:
    """Open a CLIENT span and yield the metadata that carries it to the server."""
    if not _configured and not _has_active_span():
        yield []
        return
    with _tracer().start_as_current_span(name, kind=trace.SpanKind.CLIENT):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield list(carrier.items())


def _has_active_span() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata carrying the current trace context, for calls made inside a server span."""
    if not _configured and not _has_active_span():
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(carrier.items())
