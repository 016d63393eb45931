"""A replica process's grpc.health per model (``service=<model>``) follows the states on its
status board: SERVING only while READY; NOT_SERVING loading, draining, failed or gone.

A real status board and a real gRPC server with the replica's InferenceService; a real
replica process is checked in ``test_worker.py::test_reflection_and_health``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.grpc_server import Server
from llmesh.inference_worker.model_health import ModelHealth
from llmesh.inference_worker.replica_control import StatusBoard
from llmesh.v1 import common_pb2, inference_service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(stub: health_pb2_grpc.HealthStub, model: str) -> int | grpc.StatusCode:
    try:
        return (await stub.Check(health_pb2.HealthCheckRequest(service=model), timeout=2)).status
    except grpc.aio.AioRpcError as err:
        return err.code()


async def _until(stub: health_pb2_grpc.HealthStub, model: str, want: object) -> None:
    deadline = time.monotonic() + 5
    while (got := await _status(stub, model)) != want:
        assert time.monotonic() < deadline, f"health of {model} stayed {got}, expected {want}"
        await asyncio.sleep(0.02)


def _replica(model: str, state: int, index: int = 0) -> common_pb2.Replica:
    return common_pb2.Replica(model=model, index=index, generation=1, state=state)


async def test_model_health_follows_replica_states() -> None:
    board = StatusBoard()
    server = Server(
        [
            (
                inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
                inference_service_pb2_grpc.InferenceServiceServicer(),
                "llmesh.v1.InferenceService",
            )
        ]
    )
    await server.start()
    health = ModelHealth(board, server)
    health.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            # Unknown to the process: grpc.health's own answer for a service it never heard of.
            assert await _status(stub, "chat") == grpc.StatusCode.NOT_FOUND
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_LOADING))
            await _until(stub, "chat", NOT_SERVING)
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_READY))
            await _until(stub, "chat", SERVING)
            # An adapter in the same process has its own name and its own state.
            await board.publish_replica(_replica("chat-lora", common_pb2.REPLICA_STATE_LOADING))
            await _until(stub, "chat-lora", NOT_SERVING)
            assert await _status(stub, "chat") == SERVING
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_DRAINING))
            await _until(stub, "chat", NOT_SERVING)
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_READY))
            await _until(stub, "chat", SERVING)
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_FAILED))
            await _until(stub, "chat", NOT_SERVING)
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_READY))
            await _until(stub, "chat", SERVING)
            await board.remove_replica(_replica("chat", common_pb2.REPLICA_STATE_READY))
            await _until(stub, "chat", NOT_SERVING)
            # The process's own health is not the model's.
            assert await _status(stub, "") == SERVING
            await board.publish_replica(_replica("chat", common_pb2.REPLICA_STATE_READY))
            await _until(stub, "chat", SERVING)
            await health.close()  # the process drains: every model NOT_SERVING
            assert await _status(stub, "chat") == NOT_SERVING
            assert await _status(stub, "chat-lora") == NOT_SERVING
    finally:
        await health.close()
        await server.stop(0)
