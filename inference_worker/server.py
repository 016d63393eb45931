"""Running an inference worker: gRPC server + etcd session + assignment reconciler."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmesh.common import tracing
from llmesh.common.devices import detect_gpus
from llmesh.common.etcd import worker_client
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE, Keys, parse_endpoint
from llmesh.common.grpc_server import Server
from llmesh.common.worker_session import WorkerSession
from llmesh.inference_worker.engines.base import Engine, EngineConfig
from llmesh.inference_worker.replica_manager import AssignmentWatcher, ReplicaManager
from llmesh.inference_worker.servicer import InferenceServicer
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)


@dataclass
class InferenceWorker:
    """A running worker; handy for tests and for `llmesh up`."""

    worker: cp.Worker
    server: Server
    session: WorkerSession
    manager: ReplicaManager
    reconciler: AssignmentWatcher

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def id(self) -> str:
        return self.worker.id


def _default_engine_factory(config: EngineConfig) -> Engine:
    from llmesh.inference_worker.engines import create_engine

    return create_engine(config)


@contextlib.asynccontextmanager
async def run_inference_worker(
    *,
    listen: str = "127.0.0.1:0",
    advertise: str | None = None,
    etcd: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    worker_id: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    lease_ttl: int = 5,
    drain_grace: float = 30.0,
    engine_factory: Callable[[EngineConfig], Engine] | None = None,
) -> AsyncIterator[InferenceWorker]:
    """Start a worker; on exit drain it in order: NOT_SERVING → DRAINING → revoke lease → stop.

    Args:
        listen: host:port to bind (port 0 picks one). Loopback unless told otherwise.
        advertise: host:port clients should dial; defaults to the bound address.
        etcd: etcd endpoint host:port.
        namespace: etcd key namespace.
        worker_id: stable id; a restarted worker with the same id picks its assignments back up.
        cpus, gpus: declared capacity (defaults: this machine's CPU count, detected GPUs).
        lease_ttl: seconds; a dead worker leaves routing within about this long.
        drain_grace: seconds in-flight requests get to finish on shutdown.
    """
    tracing.configure("llmesh-inference-worker")
    servicer = InferenceServicer(None)  # type: ignore[arg-type]  # manager set below
    server = Server(
        [
            (
                inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
                servicer,
                "llmesh.v1.InferenceService",
            )
        ],
        listen=listen,
    )
    address = advertise or server.address
    if address.startswith(("0.0.0.0:", "[::]:")):
        address = f"{socket.gethostname()}:{server.port}"
    worker = cp.Worker(
        id=worker_id or f"{socket.gethostname()}-{server.port}",
        address=address,
        cpus=float(cpus if cpus is not None else os.cpu_count() or 1),
        gpus=float(gpus if gpus is not None else detect_gpus()),
        kind="inference",
    )
    host, port = parse_endpoint(etcd)
    client = worker_client(etcd)
    keys = Keys(namespace)
    session = WorkerSession(client, keys, worker, ttl=lease_ttl)
    try:
        await session.__aenter__()
    except Exception as exc:
        await server.stop(0)
        await client.close()
        raise ConnectionError(f"cannot register with etcd at {host}:{port}: {exc}") from exc
    manager = ReplicaManager(session, engine_factory or _default_engine_factory)
    servicer.manager = manager
    # Serve only once requests have somewhere to go; replicas load after that.
    await server.start()
    reconciler = AssignmentWatcher(client, keys, worker, manager)
    reconciler.start()
    running = InferenceWorker(worker, server, session, manager, reconciler)
    try:
        yield running
    finally:
        log.info("worker %s draining", worker.id)
        await server.set_not_serving()
        await reconciler.stop()
        # Routers must stop picking us before we stop serving: publish DRAINING, then revoke.
        for hosted in list(manager.replicas.values()):
            if hosted.status.state == common_pb2.REPLICA_STATE_READY:
                hosted.status.state = common_pb2.REPLICA_STATE_DRAINING
                await session.publish_replica(hosted.status)
        await session.close()
        await manager.drain_all(drain_grace)
        await server.stop(min(drain_grace, 5.0))
        await manager.close()
        await client.close()
        log.info("worker %s stopped", worker.id)


async def serve_forever(**kwargs: object) -> None:
    """Run a worker until SIGINT or SIGTERM (the `llmesh inference-worker` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_inference_worker(**kwargs) as worker:  # type: ignore[arg-type]
        print(f"llmesh inference worker {worker.id} serving on {worker.address}", flush=True)
        await stop.wait()
