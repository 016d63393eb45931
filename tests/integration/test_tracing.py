"""W3C trace context travels from the SDK to the control plane and to the replica process, and
the spans carry the semantic conventions' attributes and the routing decision.

The control plane and the SDK run in this process (their spans reach an in-memory exporter);
the replica process is a real child process that exports its spans with the console exporter
into its log.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmesh import ByzerLLM
from llmesh.common import tracing
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, console_spans


@dataclass
class Traced:
    mesh: Mesh
    exporter: InMemorySpanExporter
    address: str
    log_path: Path


@pytest.fixture(scope="module")
def traced(etcd_server: Any, test_model_dir: Path, span_exporter: Any) -> Iterator[Traced]:
    """A control plane and a worker whose replica of ``chat`` prints its spans to its log."""
    span_exporter.clear()
    tracing.enable()
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-trace-{uuid.uuid4().hex[:6]}")
    try:
        address = mesh.start_control_plane()
        worker = mesh.start_worker(
            "w0", replica_env={"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "replica"}
        )
        with ByzerLLM(control_plane=address) as llm:
            llm.deploy(str(test_model_dir), "custom/llama", "chat", {})
        log_path = worker.agent.supervisor_of("chat").log_path
        yield Traced(mesh, span_exporter, address, log_path)
    finally:
        mesh.close()
        tracing.disable()


def _of_trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def test_one_trace_spans_client_control_plane_and_worker(traced: Traced) -> None:
    with ByzerLLM(control_plane=traced.address) as llm:
        with trace.get_tracer("test").start_as_current_span("user-request") as parent:
            assert llm.is_model_exist("chat")
            llm.chat_oai(
                [{"role": "user", "content": "hi"}], model="chat", llm_config={"max_length": 3}
            )
    trace_id = parent.get_span_context().trace_id
    spans = _of_trace(traced.exporter, trace_id)
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
    chat = _replica_spans(traced.log_path, trace_id, lambda s: "Chat" in s["name"])
    assert chat, "no Chat span of this trace in the replica's log"
    assert chat[0]["kind"] == "SpanKind.SERVER"
    assert int(chat[0]["parent_id"], 16) in client_ids


def test_spans_carry_rpc_gen_ai_and_route_attributes(traced: Traced) -> None:
    with ByzerLLM(control_plane=traced.address) as llm:
        with trace.get_tracer("test").start_as_current_span("user-request") as parent:
            assert not llm.is_model_exist("no-such-model")  # GetModel answers NOT_FOUND
            assert llm.tokenize("chat", "hello")  # a routed unary call
            items = list(
                llm.stream_chat_oai(
                    [{"role": "user", "content": "hi"}],
                    model="chat",
                    llm_config={"max_length": 4, "temperature": 0.0},
                )
            )
    assert items
    trace_id = parent.get_span_context().trace_id
    spans = _of_trace(traced.exporter, trace_id)

    # The control plane's server span of the failed GetModel: rpc.* and its status code; a
    # NOT_FOUND is the caller's business, so the server span is not an error.
    (get,) = [
        s
        for s in spans
        if s.kind == trace.SpanKind.SERVER and s.name == "llmesh.v1.ControlPlaneService/GetModel"
    ]
    assert get.attributes["rpc.system"] == "grpc"
    assert get.attributes["rpc.service"] == "llmesh.v1.ControlPlaneService"
    assert get.attributes["rpc.method"] == "GetModel"
    assert get.attributes["rpc.grpc.status_code"] == 5
    assert get.attributes["network.peer.address"] == "127.0.0.1"
    assert get.status.is_ok
    # The SDK's client span of the same call: an error there, with the server it called.
    (get_client,) = [s for s in spans if s.kind == trace.SpanKind.CLIENT and s.name == get.name]
    assert get_client.attributes["rpc.grpc.status_code"] == 5
    assert get_client.attributes["error.type"] == "NOT_FOUND"
    assert not get_client.status.is_ok

    # A routed unary call records its routing decision on its own client span.
    (tokenize,) = [s for s in spans if s.name == "llmesh.v1.InferenceService/Tokenize"]
    assert tokenize.kind == trace.SpanKind.CLIENT
    assert tokenize.attributes["llmesh.route.rule"] == "least-loaded"
    assert tokenize.attributes["llmesh.route.worker"] == "w0"
    assert tokenize.attributes["rpc.grpc.status_code"] == 0
    assert "server.port" in tokenize.attributes

    # The SDK's span of the streamed request: gen_ai.*, the routing decision, the usage.
    (request,) = [s for s in spans if s.name == "chat chat"]
    attrs = request.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "chat"
    assert attrs["gen_ai.request.max_tokens"] == 4
    request_id = attrs["llmesh.request.id"]
    assert request_id
    assert attrs["llmesh.route.policy"] == "least-loaded"
    assert attrs["llmesh.route.reason"] == attrs["llmesh.route.rule"] == "least-loaded"
    assert attrs["llmesh.route.replica"] == 0
    assert attrs["llmesh.route.worker"] == "w0"
    # One candidate with its load (the replica may not have published the last test's end).
    (candidate,) = attrs["llmesh.route.candidates"]
    assert re.fullmatch(r"w0/0 load=[01]/8", candidate), candidate
    assert [e.name for e in request.events] == ["llmesh.route"]
    assert 1 <= attrs["gen_ai.usage.output_tokens"] <= 4
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert list(attrs["gen_ai.response.finish_reasons"]) in (["length"], ["stop"])
    # It covers the whole stream: it ends after its one attempt span, which ends after output.
    (attempt,) = [s for s in spans if s.name == "llmesh.v1.InferenceService/ChatSession"]
    assert attempt.parent.span_id == request.context.span_id
    assert attempt.attributes["rpc.service"] == "llmesh.v1.InferenceService"
    assert attempt.attributes["rpc.method"] == "ChatSession"
    assert attempt.attributes["rpc.grpc.status_code"] == 0
    assert (
        f"{attempt.attributes['server.address']}:{attempt.attributes['server.port']}"
        == (attrs["llmesh.route.address"])
    )
    assert request.start_time <= attempt.start_time and attempt.end_time <= request.end_time

    # In the replica: the request's span has gen_ai.* and three phases as its children.
    (served,) = _replica_spans(
        traced.log_path,
        trace_id,
        lambda s: s["attributes"].get("llmesh.request.id") == request_id,
    )
    assert int(served["parent_id"], 16) == attempt.context.span_id
    assert served["attributes"]["gen_ai.request.model"] == "chat"
    assert served["attributes"]["gen_ai.usage.output_tokens"] == attrs["gen_ai.usage.output_tokens"]
    assert served["attributes"]["gen_ai.response.finish_reasons"] == list(
        attrs["gen_ai.response.finish_reasons"]
    )
    phases = {
        s["name"]: s
        for s in _replica_spans(
            traced.log_path, trace_id, lambda s: s["parent_id"] == served["context"]["span_id"]
        )
    }
    assert {"llmesh.queue_wait", "llmesh.prefill"} <= set(phases), phases.keys()
    assert set(phases) <= {"llmesh.queue_wait", "llmesh.prefill", "llmesh.decode"}
    assert phases["llmesh.queue_wait"]["end_time"] <= phases["llmesh.prefill"]["start_time"]
    # Decode has its own span when output came before the final chunk (the engine may hand a
    # short answer over all at once, and then prefill runs to the end).
    if "llmesh.decode" in phases:
        assert phases["llmesh.prefill"]["end_time"] <= phases["llmesh.decode"]["start_time"]
        assert (
            phases["llmesh.decode"]["attributes"]["gen_ai.usage.output_tokens"]
            == (attrs["gen_ai.usage.output_tokens"])
        )


def test_a_chat_call_on_the_replica_has_gen_ai_and_phase_spans(traced: Traced) -> None:
    """The single-request Chat RPC (grpcurl's way in): its server span is the request's."""
    address = traced.mesh.workers["w0"][0].replica_address("chat")
    stub = inference_service_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    params = common_pb2.GenerationParams(max_tokens=3, temperature=0.0)
    start = inf.ChatStart(model="chat", prompt="Once upon", params=params, request_id="r-chat")
    with trace.get_tracer("test").start_as_current_span("user-request") as parent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        replies = list(
            stub.Chat(iter([inf.ChatRequest(start=start)]), metadata=list(carrier.items()))
        )
    assert replies[-1].finished
    trace_id = parent.get_span_context().trace_id
    (call,) = _replica_spans(
        traced.log_path, trace_id, lambda s: s["name"] == "llmesh.v1.InferenceService/Chat"
    )
    assert call["kind"] == "SpanKind.SERVER"
    assert int(call["parent_id"], 16) == parent.get_span_context().span_id
    attrs = call["attributes"]
    assert attrs["rpc.system"] == "grpc" and attrs["rpc.method"] == "Chat"
    assert attrs["rpc.grpc.status_code"] == 0
    assert attrs["gen_ai.operation.name"] == "text_completion"
    assert attrs["llmesh.request.id"] == "r-chat"
    assert attrs["gen_ai.usage.output_tokens"] == replies[-1].usage.completion_tokens
    phases = _replica_spans(
        traced.log_path, trace_id, lambda s: s["parent_id"] == call["context"]["span_id"]
    )
    assert {"llmesh.queue_wait", "llmesh.prefill"} <= {p["name"] for p in phases}


def test_assign_worker_records_the_control_planes_decision(traced: Traced) -> None:
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(traced.address))
    with trace.get_tracer("test").start_as_current_span("user-request") as parent:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        reply = stub.AssignWorker(
            cp.AssignWorkerRequest(model="chat", affinity_key="user-7"),
            metadata=list(carrier.items()),
        )
    trace_id = parent.get_span_context().trace_id
    (span,) = [
        s
        for s in _of_trace(traced.exporter, trace_id)
        if s.name == "llmesh.v1.ControlPlaneService/AssignWorker"
    ]
    assert span.attributes["llmesh.route.rule"] == "affinity"
    assert span.attributes["llmesh.route.policy"] == "least-loaded"
    assert span.attributes["llmesh.route.replica"] == reply.replica.index
    assert span.attributes["llmesh.route.address"] == reply.replica.address
    (candidate,) = span.attributes["llmesh.route.candidates"]
    assert candidate.startswith("w0/0 load=")


def _replica_spans(log_path: Path, trace_id: int, keep: Any) -> list[dict[str, Any]]:
    """Spans of ``trace_id`` that ``keep`` accepts in the replica's log (waits for them)."""
    deadline = time.monotonic() + 10
    while True:
        found = [
            s
            for s in console_spans(log_path.read_text())
            if s["context"]["trace_id"] == f"0x{trace_id:032x}" and keep(s)
        ]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)
