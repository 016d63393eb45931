"""The replica process's side of ReplicaService: status board, adapters and drain for its agent.

A replica process has no etcd access. Its :class:`StatusBoard` is the
:class:`~llmesh.inference_worker.replica_manager.StatusSink` of its replica manager: it keeps
the latest status of the base replica and of each adapter, and wakes the agent's
``WatchReplica`` stream on every change. The agent publishes what it reads in etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from llmesh.common.errors import InvalidArgument, NotFound, rpc_handler
from llmesh.inference_worker.replica_manager import ReplicaManager
from llmesh.v1 import common_pb2, replica_service_pb2_grpc
from llmesh.v1 import replica_service_pb2 as rs

DEFAULT_HEARTBEAT_S = 1.0


class StatusBoard:
    """The latest status of every replica in this process; watchers wake on each change."""

    def __init__(self) -> None:
        self.replicas: dict[tuple[str, int, int], common_pb2.Replica] = {}
        self._version = 0
        # Resolved by the next change; every watcher waits on the same one.
        self._next: asyncio.Future[None] | None = None

    @staticmethod
    def _key(replica: common_pb2.Replica) -> tuple[str, int, int]:
        return (replica.model, replica.generation, replica.index)

    async def publish_replica(self, replica: common_pb2.Replica) -> None:
        copy = common_pb2.Replica()
        copy.CopyFrom(replica)
        self.replicas[self._key(replica)] = copy
        self._bump()

    async def remove_replica(self, replica: common_pb2.Replica) -> None:
        self.replicas.pop(self._key(replica), None)
        self._bump()

    def _bump(self) -> None:
        self._version += 1
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    @property
    def version(self) -> int:
        return self._version

    async def wait_change(self, after: int, timeout: float) -> None:
        """Return once the version passed ``after`` or after ``timeout`` seconds."""
        if self._version != after:
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: it never cancels the shared future, and on 3.11
        # wait_for can swallow a cancellation.
        await asyncio.wait([self._next], timeout=timeout)


class ReplicaControlServicer(replica_service_pb2_grpc.ReplicaServiceServicer):
    """Serves the node agent: status stream, adapter load/unload, drain.

    Args:
        manager: the process's replica manager.
        board: its status sink.
        address: the address clients reach this process on (adapters are served there too).
    """

    def __init__(self, manager: ReplicaManager, board: StatusBoard, address: str) -> None:
        self.manager = manager
        self.board = board
        self.address = address

    def snapshot(self) -> rs.WatchReplicaResponse:
        out = rs.WatchReplicaResponse(progress=self.manager.progress)
        for hosted in self.manager.replicas.values():
            if hosted.base is None:
                out.inflight += hosted.engine_load
        for key, status in sorted(self.board.replicas.items()):
            hosted = self.manager.replicas.get(key)
            replica = out.replicas.add()
            replica.CopyFrom(status)
            if hosted is not None:
                replica.inflight = hosted.inflight
                replica.queued = self.manager.queued(hosted)
        return out

    @rpc_handler
    async def WatchReplica(
        self, request: rs.WatchReplicaRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rs.WatchReplicaResponse]:
        heartbeat = request.heartbeat_seconds or DEFAULT_HEARTBEAT_S
        if heartbeat < 0:
            raise InvalidArgument("heartbeat_seconds must be 0 (default) or positive")
        while True:
            version = self.board.version
            yield self.snapshot()
            # Next message on a status change or on the heartbeat. In-flight counts reach the
            # board through the manager's rate-limited publisher, so a busy replica does not
            # send one message per request.
            await self.board.wait_change(version, heartbeat)

    @rpc_handler
    async def LoadAdapter(
        self, request: rs.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> rs.LoadAdapterResponse:
        name = request.model.name
        if not request.model.base_model:
            raise InvalidArgument(f"model {name!r} has no base_model; only adapters load this way")
        # The replica is hosted (and found by requests) under the assignment's model name: one
        # that differs from the adapter's, or names a base model here, would take its requests.
        if not name or request.assignment.model != name:
            raise InvalidArgument(
                f"assignment.model {request.assignment.model!r} is not the adapter's name "
                f"{name!r}; send the adapter's model record with its own assignment"
            )
        if any(
            not h.model.base_model and h.status.model == name
            for h in self.manager.replicas.values()
        ):
            raise InvalidArgument(
                f"{name!r} is a base model on this replica process; an adapter needs a name "
                "of its own"
            )
        self.manager.spawn(
            self.manager.load(request.assignment, request.model, self.address),
            name=f"load-{request.model.name}",
        )
        return rs.LoadAdapterResponse()

    @rpc_handler
    async def UnloadAdapter(
        self, request: rs.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> rs.UnloadAdapterResponse:
        keys = [
            key
            for key, hosted in self.manager.replicas.items()
            if key[0] == request.model and key[1] == request.generation and hosted.model.base_model
        ]
        if not keys:
            raise NotFound(f"adapter {request.model!r} is not loaded in this replica process")
        for key in keys:
            await self.manager.unload(key)
        return rs.UnloadAdapterResponse()

    @rpc_handler
    async def Drain(
        self, request: rs.DrainRequest, context: grpc.aio.ServicerContext
    ) -> rs.DrainResponse:
        with contextlib.suppress(Exception):
            await self.manager.drain_all(max(request.timeout_seconds, 0.0))
        left = sum(h.inflight for h in self.manager.replicas.values())
        return rs.DrainResponse(inflight=left)
