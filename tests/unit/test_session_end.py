"""A ChatSession whose stream ends on the worker's side leaves no task of grpc's behind.

With a token, the SDK's channels carry an interceptor, and grpc.aio then writes a stream's
requests from a task of its own that reads them from an iterator. When the worker ends the
stream (its process died), that task must end with the session: left waiting, it is destroyed
by the garbage collector ("Task was destroyed but it is pending!", "aclose(): asynchronous
generator is already running"), possibly on another thread.
"""

from __future__ import annotations

import asyncio

import grpc

from llmesh.common.auth_client import aio_token_interceptors
from llmesh.common.errors import Unavailable
from llmesh.sdk.sessions import AsyncInbox, Session
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc


class _DyingWorker(inf_grpc.InferenceServiceServicer):
    """Reads the first message of a session, then ends the stream as a lost worker would."""

    async def ChatSession(self, request_iterator, context):  # type: ignore[no-untyped-def]
        async for _ in request_iterator:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the replica process died")
        yield inf.ChatSessionResponse()  # pragma: no cover - never reached


def _grpc_writers() -> list[asyncio.Task[object]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and "_consume_request_iterator" in repr(t.get_coro())
    ]


def test_a_session_ended_by_the_worker_leaves_no_grpc_writer_task() -> None:
    async def run() -> None:
        server = grpc.aio.server()
        inf_grpc.add_InferenceServiceServicer_to_server(_DyingWorker(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        address = f"127.0.0.1:{port}"
        channel = grpc.aio.insecure_channel(
            address, interceptors=aio_token_interceptors("llmesh_test_token")
        )
        closed: list[Session] = []
        try:
            session = Session(inf_grpc.InferenceServiceStub(channel), address, closed.append)
            inbox = AsyncInbox()
            session.start(inf.ChatStart(model="chat", prompt="hi", request_id="r1"), inbox)
            try:
                await inbox.next(deadline=None)
                raise AssertionError("the request should fail with the stream")
            except Unavailable:
                pass
            assert closed == [session]
            for _ in range(50):
                if not _grpc_writers():
                    break
                await asyncio.sleep(0.01)
            assert _grpc_writers() == []
        finally:
            await channel.close()
            await server.stop(None)

    asyncio.run(run())
