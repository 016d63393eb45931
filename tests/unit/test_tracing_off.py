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
