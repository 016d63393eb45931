"""The semantic-convention attributes llmesh's spans carry, and the opt-in to the stable set."""

from __future__ import annotations

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from llmesh.common import tracing
from llmesh.control_plane.servicer import ControlPlaneServicer
from llmesh.inference_worker.servicer import InferenceServicer


@pytest.fixture
def opt_in(monkeypatch: pytest.MonkeyPatch):
    def set_to(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("OTEL_SEMCONV_STABILITY_OPT_IN", raising=False)
        else:
            monkeypatch.setenv("OTEL_SEMCONV_STABILITY_OPT_IN", value)
        tracing._semconv_modes.cache_clear()

    yield set_to
    monkeypatch.delenv("OTEL_SEMCONV_STABILITY_OPT_IN", raising=False)
    tracing._semconv_modes.cache_clear()


def test_servicer_methods_map_to_their_grpc_paths() -> None:
    assert (
        tracing.method_path(ControlPlaneServicer, "ControlPlaneServicer.GetModel")
        == "llmesh.v1.ControlPlaneService/GetModel"
    )
    assert (
        tracing.method_path(InferenceServicer, "InferenceServicer.ChatSession")
        == "llmesh.v1.InferenceService/ChatSession"
    )
    assert tracing.full_method("InferenceService/Chat") == "llmesh.v1.InferenceService/Chat"
    assert tracing.full_method("grpc.health.v1.Health/Check") == "grpc.health.v1.Health/Check"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, {"rpc.system": "grpc", "rpc.service": "llmesh.v1.S", "rpc.method": "M"}),
        ("http,rpc", {"rpc.system.name": "grpc", "rpc.method": "llmesh.v1.S/M"}),
        (
            "rpc/dup",
            {
                "rpc.system": "grpc",
                "rpc.service": "llmesh.v1.S",
                "rpc.system.name": "grpc",
                "rpc.method": "llmesh.v1.S/M",
            },
        ),
    ],
)
def test_rpc_attributes_follow_the_stability_opt_in(opt_in, value, expected) -> None:
    opt_in(value)
    assert dict(tracing.rpc_attributes("llmesh.v1.S/M")) == expected


@pytest.mark.parametrize(
    ("value", "server", "code", "attributes", "error"),
    [
        (None, True, grpc.StatusCode.NOT_FOUND, {"rpc.grpc.status_code": 5}, False),
        (None, True, grpc.StatusCode.UNAVAILABLE, {"rpc.grpc.status_code": 14}, True),
        (None, False, grpc.StatusCode.NOT_FOUND, {"rpc.grpc.status_code": 5}, True),
        (None, False, grpc.StatusCode.OK, {"rpc.grpc.status_code": 0}, False),
        ("rpc", True, grpc.StatusCode.INTERNAL, {"rpc.response.status_code": "INTERNAL"}, True),
    ],
)
def test_status_codes_and_errors(opt_in, value, server, code, attributes, error) -> None:
    opt_in(value)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    span = provider.get_tracer("t").start_span("x")
    tracing.end_rpc(span, code, server=server, message="why")
    span.end()
    (done,) = exporter.get_finished_spans()
    got = {k: v for k, v in done.attributes.items() if k.startswith("rpc.")}
    assert got == attributes
    assert (not done.status.is_ok) is error
    assert ("error.type" in done.attributes) is error


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (
            "ipv4:127.0.0.1:4242",
            {
                "network.peer.address": "127.0.0.1",
                "network.peer.port": 4242,
                "network.type": "ipv4",
            },
        ),
        (
            "ipv6:[::1]:50051",
            {"network.peer.address": "::1", "network.peer.port": 50051, "network.type": "ipv6"},
        ),
        ("unix:/tmp/s.sock", {"network.peer.address": "/tmp/s.sock"}),
        ("", {}),
    ],
)
def test_peer_attributes(peer: str, expected: dict) -> None:
    assert tracing._peer_attributes(peer) == expected
