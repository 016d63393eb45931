"""W3C trace context travels from the SDK to the control plane and to the replica process.

The control plane runs in this process (its spans reach an in-memory exporter); the replica
process is a real child process that exports its spans with the console exporter into its log.
"""

from __future__ import annotations

import json
import time
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
        worker = mesh.start_worker(
            "w0", replica_env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "replica"}
        )
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
        clients = [s for s in spans if s.kind == trace.SpanKind.CLIENT]
        assert clients, [s.name for s in spans]
        # Every server span hangs off a client span of the same trace (context crossed the wire).
        client_ids = {s.context.span_id for s in clients}
        for s in spans:
            if s.kind == trace.SpanKind.SERVER:
                assert s.parent is not None and s.parent.span_id in client_ids, s.name
        # The Chat span, in the replica process, is in the same trace under an SDK client span.
        log_path = worker.agent.supervisor_of("chat").log_path
        deadline = time.monotonic() + 10
        chat: list[dict[str, Any]] = []
        while not chat and time.monotonic() < deadline:
            chat = [
                s
                for s in _console_spans(log_path.read_text())
                if "Chat" in s["name"] and s["context"]["trace_id"] == f"0x{trace_id:032x}"
            ]
            time.sleep(0.1)
        assert chat, "no Chat span of this trace in the replica's log"
        assert chat[0]["kind"] == "SpanKind.SERVER"
        assert int(chat[0]["parent_id"], 16) in client_ids
    finally:
        mesh.close()
        tracing.disable()
        exporter.shutdown()


def _console_spans(text: str) -> list[dict[str, Any]]:
    """The spans OpenTelemetry's console exporter printed (pretty JSON objects) in a log."""
    spans, decoder, i = [], json.JSONDecoder(), 0
    while (i := text.find('{\n    "name"', i)) != -1:
        try:
            span, end = decoder.raw_decode(text, i)
        except ValueError:
            i += 1
            continue
        spans.append(span)
        i = end
    return spans
