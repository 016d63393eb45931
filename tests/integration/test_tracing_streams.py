"""Spans of streaming calls: the server's span is current only while the handler runs, ends
with the stream's status however it ends (a client that leaves early included), and nothing
is left attached across a ``yield`` ("Failed to detach context" never appears).

A real grpc.aio server on loopback runs a servicer whose WatchModel is an endless stream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan

from llmesh.common import tracing
from llmesh.common.errors import InvalidArgument, rpc_handler
from llmesh.common.grpc_server import Server
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf

WATCH = "llmesh.v1.ControlPlaneService/WatchModel"


class Endless(cp_grpc.ControlPlaneServiceServicer):
    """WatchModel sends a message every 10 ms forever; the model "bad" is refused at once."""

    def __init__(self) -> None:
        self.seen: list[trace.SpanContext] = []  # the current span each time the handler ran
        self.ended = asyncio.Event()
        self.outgoing: dict[str, str] = {}  # what a call made by the handler would carry

    @rpc_handler
    async def WatchModel(
        self, request: cp.WatchModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cp.WatchModelResponse]:
        if request.name == "bad":
            raise InvalidArgument("model name 'bad' is refused by this test servicer")
        try:
            while True:
                self.seen.append(trace.get_current_span().get_span_context())
                self.outgoing = dict(tracing.outgoing_metadata())
                yield cp.WatchModelResponse()
                await asyncio.sleep(0.01)
        finally:
            self.ended.set()


@pytest.fixture
def exporter(span_exporter: Any) -> Iterator[Any]:
    span_exporter.clear()
    tracing.enable()
    try:
        yield span_exporter
    finally:
        tracing.disable()


def _spans(exporter: Any, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_stream_left_early_ends_its_span_cancelled_and_detaches_cleanly(
    exporter: Any, caplog: pytest.LogCaptureFixture
) -> None:
    servicer = Endless()
    server = Server([(cp_grpc.add_ControlPlaneServiceServicer_to_server, servicer, "x")])
    await server.start()
    caplog.set_level(logging.ERROR, logger="opentelemetry.context")
    outside = trace.get_current_span().get_span_context()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = cp_grpc.ControlPlaneServiceStub(channel)
            with tracing.client_span("ControlPlaneService/WatchModel", server.address) as md:
                # Baggage set by the caller travels on through the server's own calls.
                call = stub.WatchModel(
                    cp.WatchModelRequest(name="chat"), metadata=[*md, ("baggage", "tenant=acme")]
                )
                got = 0
                async for _ in call:
                    got += 1
                    # The client span is not current here: the caller's context is untouched.
                    assert trace.get_current_span().get_span_context() == outside
                    if got == 5:
                        break
                call.cancel()
            await asyncio.wait_for(servicer.ended.wait(), 5)
            # The stream raising on the server: its span says why.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async for _ in stub.WatchModel(cp.WatchModelRequest(name="bad")):
                    pass
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await server.stop(0)

    for _ in range(50):  # the server ends its span as the cancelled handler unwinds
        if len(_spans(exporter, WATCH)) == 3:  # the client's, and the two calls' on the server
            break
        await asyncio.sleep(0.02)
    by_kind = {
        (s.kind, s.attributes.get("rpc.grpc.status_code")): s for s in _spans(exporter, WATCH)
    }
    client = by_kind[(trace.SpanKind.CLIENT, grpc.StatusCode.OK.value[0])]
    server_span = by_kind[(trace.SpanKind.SERVER, grpc.StatusCode.CANCELLED.value[0])]
    refused_span = by_kind[(trace.SpanKind.SERVER, grpc.StatusCode.INVALID_ARGUMENT.value[0])]
    # One trace from the client to the server, and the handler ran under the server's span.
    assert server_span.parent is not None and server_span.parent.span_id == client.context.span_id
    assert servicer.seen and all(c.span_id == server_span.context.span_id for c in servicer.seen)
    # A caller's mistake is not the server's error (semconv), but the code is recorded.
    assert refused_span.status.is_unset
    assert not [r for r in caplog.records if "detach" in r.getMessage()]
    assert servicer.outgoing.get("baggage") == "tenant=acme"
    assert f"{server_span.context.span_id:016x}" in servicer.outgoing["traceparent"]


async def test_a_request_stream_never_read_starts_no_span(exporter: Any) -> None:
    started: list[Any] = []

    def start() -> Any:
        span = tracing.start_generation("chat", "m", "r1")
        started.append(span)
        return span

    def batches(span: Any) -> Iterator[list[inf.ChatResponse]]:
        yield [inf.ChatResponse(finished=True)]

    tracing.traced_batches(start, batches).close()
    assert not started and not exporter.get_finished_spans()

    # Read to the end, the request's span ends with the stream.
    assert len(list(tracing.traced_batches(start, batches))) == 1
    assert [s.name for s in exporter.get_finished_spans()] == ["chat m"]


async def test_a_close_that_raises_still_ends_the_request_span(exporter: Any) -> None:
    class Breaks:
        def __iter__(self) -> Breaks:
            return self

        def __next__(self) -> list[inf.ChatResponse]:
            return [inf.ChatResponse()]

        def close(self) -> None:
            raise RuntimeError("close failed")

    stream = tracing.traced_batches(
        lambda: tracing.start_generation("chat", "m", "r2"), lambda span: Breaks()
    )
    next(stream)
    with pytest.raises(RuntimeError, match="close failed"):
        stream.close()

    async def agen(span: Any) -> AsyncIterator[list[inf.ChatResponse]]:
        try:
            yield [inf.ChatResponse()]
            yield [inf.ChatResponse()]
        finally:
            raise RuntimeError("aclose failed")

    astream = tracing.atraced_batches(lambda: tracing.start_generation("chat", "m", "r3"), agen)
    await astream.__anext__()
    with pytest.raises(RuntimeError, match="aclose failed"):
        await astream.aclose()
    ended = {s.attributes["llmesh.request.id"]: s for s in exporter.get_finished_spans()}
    assert set(ended) == {"r2", "r3"}
    # The failed close is the request's error on its span.
    assert [ended[r].status.description for r in ("r2", "r3")] == [
        "close failed",
        "aclose failed",
    ]
