"""With no OTEL_TRACES_EXPORTER, tracing adds nothing to a call: no spans, no metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from llmesh.common import tracing


def _configure_in_fresh_process(**env: str) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "from opentelemetry import trace; from llmesh.common import tracing; "
        "on = tracing.configure('test'); print(on, type(trace.get_tracer_provider()).__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_off_by_default_installs_no_provider() -> None:
    # A process of its own: this one may have a provider installed by other tests.
    assert _configure_in_fresh_process() == ["False", "ProxyTracerProvider"]
    assert _configure_in_fresh_process(OTEL_TRACES_EXPORTER="none") == [
        "False",
        "ProxyTracerProvider",
    ]
    # The contrast: asked for, the SDK provider is installed.
    assert _configure_in_fresh_process(OTEL_TRACES_EXPORTER="console") == [
        "True",
        "TracerProvider",
    ]


@pytest.fixture
def tracing_off() -> Iterator[None]:
    was_on = tracing._configured
    tracing.disable()
    try:
        yield
    finally:
        if was_on:  # another test in this process turned it on; leave it as it was
            tracing.enable()


def test_off_adds_no_metadata(tracing_off: None) -> None:
    with tracing.client_span("llmesh.v1.X/Y") as metadata:
        assert metadata == []
    assert tracing.outgoing_metadata() == []


def test_off_makes_no_request_spans_or_route_decisions(tracing_off: None) -> None:
    assert not tracing.enabled()
    assert tracing.start_generation("chat", "m", "r1") is None
    assert tracing.start_attempt(None, "InferenceService/ChatSession", "h:1") == (None, {})
    with tracing.attempt(None, "InferenceService/ChatSession", "h:1") as carrier:
        assert carrier == {}
    # The replica's per-request recorder is one shared no-op object: nothing is allocated.
    assert tracing.run_trace("m", "r1", chat=True) is tracing.NO_RUN_TRACE
    assert tracing.current_span(None) is None
