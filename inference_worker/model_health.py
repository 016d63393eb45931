"""Per-model grpc.health in a replica process: ``service=<model>`` says whether it can serve.

The process's own health (``service=""``) says the process is up, which it is long before the
engine has loaded. A client or balancer that asks about a model by name (``grpcurl -d
'{"service": "chat"}' ... grpc.health.v1.Health/Check``) hears SERVING only while a replica of
that model in this process is READY, and NOT_SERVING while it is loading, draining or has
failed, and once it is gone. The states come from the process's
:class:`~llmesh.inference_worker.replica_control.StatusBoard`, the same ones the agent
publishes to etcd, so health and routes agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from llmesh.common.grpc_server import Server
from llmesh.inference_worker.replica_control import StatusBoard
from llmesh.v1 import common_pb2

log = logging.getLogger(__name__)

#: How long one wait for a board change lasts before it looks again (a safety net).
_RECHECK_S = 5.0


class ModelHealth:
    """Follows a status board and sets the health of each model it names on ``server``.

    Args:
        board: the process's status board.
        server: the gRPC server serving InferenceService.
        models: models to report NOT_SERVING at the first :meth:`apply`, before the board
            names them (apply before the server starts: a probe never sees them unknown).
    """

    def __init__(self, board: StatusBoard, server: Server, models: tuple[str, ...] = ()) -> None:
        self.board = board
        self.server = server
        #: Model name → whether it was last reported SERVING (None: not reported yet).
        self.serving: dict[str, bool | None] = dict.fromkeys(models)
        self._task: asyncio.Task[None] | None = None

    async def apply(self) -> None:
        """Set each model's health from the board as it is now."""
        now: dict[str, bool | None] = dict.fromkeys(self.serving, False)  # gone: NOT_SERVING
        for replica in self.board.replicas.values():
            ready = replica.state == common_pb2.REPLICA_STATE_READY
            now[replica.model] = now.get(replica.model, False) or ready
        for model, serving in now.items():
            if self.serving.get(model) != serving:
                await self.server.set_health(model, bool(serving))
                log.info("health of model %s: %s", model, "SERVING" if serving else "NOT_SERVING")
        self.serving = now

    async def _run(self) -> None:
        version = -1
        while True:
            if self.board.version != version:
                version = self.board.version
                await self.apply()
            await self.board.wait_change(version, _RECHECK_S)

    def start(self) -> None:
        """Follow the board in a task until :meth:`close`."""
        self._task = asyncio.create_task(self._run(), name="model-health")

    async def close(self) -> None:
        """Stop following the board and report every model NOT_SERVING (the process drains)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for model in self.serving:
            await self.server.set_health(model, False)
        self.serving = dict.fromkeys(self.serving, False)
