"""With no OTEL_TRACES_EXPORTER, tracing adds nothing to a call: no spans, no metadata."""

from __future__ import annotations

from llmesh.common import tracing


def test_off_by_default_adds_no_metadata(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert tracing.configure("test") is tracing._configured
    if tracing._configured:  # another test in this process turned it on
        tracing.disable()
    with tracing.client_span("llmesh.v1.X/Y") as metadata:
        assert metadata == []
    assert tracing.outgoing_metadata() == []


def test_off_makes_no_request_spans_or_route_decisions(monkeypatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    if tracing._configured:
        tracing.disable()
    assert not tracing.enabled()
    assert tracing.start_generation("chat", "m", "r1") is None
    assert tracing.start_attempt(None, "InferenceService/ChatSession", "h:1") == (None, {})
    with tracing.attempt(None, "InferenceService/ChatSession", "h:1") as carrier:
        assert carrier == {}
    # The replica's per-request recorder is one shared no-op object: nothing is allocated.
    assert tracing.run_trace("m", "r1", chat=True) is tracing.NO_RUN_TRACE
    assert tracing.current_span(None) is None
