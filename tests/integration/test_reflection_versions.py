"""Server reflection answers under grpc.reflection.v1 (what current grpcurl asks first) and
v1alpha, read with gRPC's own reflection client (``ProtoReflectionDescriptorDatabase``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from llmesh.common import reflection
from llmesh.common.grpc_server import Server
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

SERVICE = "llmesh.v1.ControlPlaneService"


@pytest.fixture(scope="module")
async def address() -> AsyncIterator[str]:
    # Reflection needs no behaviour behind the service: the generated base servicer will do.
    server = Server(
        [
            (
                cp_grpc.add_ControlPlaneServiceServicer_to_server,
                cp_grpc.ControlPlaneServiceServicer(),
                SERVICE,
            )
        ]
    )
    await server.start()
    yield server.address
    await server.stop(0)


class _V1Database(ProtoReflectionDescriptorDatabase):
    """gRPC's reflection client speaking grpc.reflection.v1 (same messages, another path)."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)
        self._stub.ServerReflectionInfo = channel.stream_stream(
            reflection.V1_METHOD,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )


def _describe(address: str, version: str) -> tuple[list[str], list[str], list[str]]:
    with grpc.insecure_channel(address) as channel:
        db = (_V1Database if version == "v1" else ProtoReflectionDescriptorDatabase)(channel)
        services = sorted(db.get_services())
        pool = DescriptorPool(db)
        methods = [m.name for m in pool.FindServiceByName(SERVICE).methods]
        own = pool.FindServiceByName(f"grpc.reflection.{version}.ServerReflection")
        return services, methods, [m.full_name for m in own.methods]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_and_describes(address: str, version: str) -> None:
    services, methods, own = await asyncio.to_thread(_describe, address, version)
    assert services == sorted(
        [
            SERVICE,
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ]
    )
    assert {"DeployModel", "GetModel", "WatchModel", "AssignWorker"} <= set(methods)
    assert own == [f"grpc.reflection.{version}.ServerReflection.ServerReflectionInfo"]
