"""W3C trace context travels from the SDK to the control plane and to the worker."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmesh import ByzerLLM
from llmesh.common import tracing

from .conftest import Mesh


def test_one_trace_spans_client_control_plane_and_worker(
    etcd_server: Any, test_model_dir: Path
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-trace-{uuid.uuid4().hex[:6]}")
    try:
        address = mesh.start_control_plane()
        mesh.start_worker("w0")
        with ByzerLLM(control_plane=address) as llm:
            llm.deploy(str(test_model_dir), "custom/llama", "chat", {})
            with trace.get_tracer("test").start_as_current_span("user-request") as parent:
                assert llm.is_model_exist("chat")
                llm.chat_oai(
                    [{"role": "user", "content": "hi"}], model="chat", llm_config={"max_length": 3}
                )
        trace_id = parent.get_span_context().trace_id
        spans = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
        servers = {s.name for s in spans if s.kind == trace.SpanKind.SERVER}
        assert any("GetModel" in n for n in servers), servers
        assert any("Chat" in n for n in servers), servers
        clients = [s for s in spans if s.kind == trace.SpanKind.CLIENT]
        assert clients, [s.name for s in spans]
        # Every server span hangs off a client span of the same trace (context crossed the wire).
        client_ids = {s.context.span_id for s in clients}
        for s in spans:
            if s.kind == trace.SpanKind.SERVER:
                assert s.parent is not None and s.parent.span_id in client_ids, s.name
    finally:
        mesh.close()
        tracing.disable()
        exporter.shutdown()
