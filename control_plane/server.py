"""Running the control plane: registry, gRPC server, reconcile loop, drain on exit.

The CLI calls ``asyncio.run(serve_forever(listen=..., etcd=..., namespace=...))``; tests and
embedders use ``async with run_control_plane(...) as control_plane``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from llmesh.common import tracing
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE, Keys
from llmesh.common.grpc_server import Server
from llmesh.control_plane.deployments import Deployer
from llmesh.control_plane.etcd_health import EtcdHealth
from llmesh.control_plane.job_scheduler import DEFAULT_REAP_GRACE_S, JobScheduler
from llmesh.control_plane.registry import EtcdRegistry, Registry
from llmesh.control_plane.replacement import LostWorkerReplacer
from llmesh.control_plane.servicer import ControlPlaneServicer
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "llmesh.v1.ControlPlaneService"


@dataclass
class ControlPlane:
    """A running control plane.

    Attributes:
        address: host:port the gRPC server listens on.
        registry: the mirror of etcd it answers from.
        servicer: the ControlPlaneService implementation.
        server: the gRPC server (with health and reflection).
    """

    address: str
    registry: Registry
    servicer: ControlPlaneServicer
    server: Server
    #: Whether etcd can take writes (the health of the server follows it).
    etcd_health: EtcdHealth | None = None


@asynccontextmanager
async def run_control_plane(
    *,
    listen: str = "127.0.0.1:50051",
    etcd: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    grace: float = 5.0,
    reconcile_grace: float | None = 30.0,
    startup_timeout: float = 10.0,
    job_reap_grace: float = DEFAULT_REAP_GRACE_S,
) -> AsyncIterator[ControlPlane]:
    """Start a control plane and stop it when the block exits.

    Args:
        listen: host:port to serve on; port 0 picks a free port (see ``.address``).
        etcd: etcd endpoint ``host:port``; None means ``LLMESH_ETCD`` or 127.0.0.1:2379.
        namespace: the etcd key prefix shared with the workers.
        grace: seconds in-flight RPCs get to finish when stopping.
        reconcile_grace: seconds a worker may be gone before its replicas move to live
            workers; None never moves them (pending replicas are still placed as room frees
            up).
        startup_timeout: how long to wait for etcd before giving up with Unavailable.
        job_reap_grace: seconds a trainer worker may be gone before its running training
            jobs are recorded FAILED.

    Yields:
        The running :class:`ControlPlane`.
    """
    tracing.configure("llmesh-control-plane")
    kv = EtcdKV(etcd)
    keys = Keys(namespace)
    registry = EtcdRegistry(kv, keys)
    reconcile_task: asyncio.Task[None] | None = None
    jobs_task: asyncio.Task[None] | None = None
    try:
        await registry.start(timeout=startup_timeout)
        deployer = Deployer(registry, kv, keys)
        scheduler = JobScheduler(registry, kv, keys, reap_grace=job_reap_grace)
        servicer = ControlPlaneServicer(registry, deployer, jobs=scheduler)
        server = Server(
            [(cp_grpc.add_ControlPlaneServiceServicer_to_server, servicer, SERVICE_NAME)],
            listen=listen,
        )
        await server.start()
        reconciler = LostWorkerReplacer(registry, deployer, grace=reconcile_grace)
        reconcile_task = asyncio.create_task(reconciler.run(), name="reconcile")
        jobs_task = asyncio.create_task(scheduler.run(), name="job-scheduler")
        log.info(
            "control plane on %s, etcd %s, namespace %s", server.address, kv.endpoint, namespace
        )
        try:
            async with EtcdHealth(kv, server).running() as etcd_health:
                yield ControlPlane(
                    address=server.address,
                    registry=registry,
                    servicer=servicer,
                    server=server,
                    etcd_health=etcd_health,
                )
        finally:
            # Drain: health says NOT_SERVING first so balancers stop sending, watches end so
            # their clients move to another control plane, then unary calls get `grace`.
            await server.set_not_serving()
            servicer.close()
            await server.stop(grace)
    finally:
        for task in (reconcile_task, jobs_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await registry.close()
        await kv.close()


async def serve_forever(
    *,
    listen: str = "127.0.0.1:50051",
    etcd: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    grace: float = 5.0,
    reconcile_grace: float | None = 30.0,
    startup_timeout: float = 10.0,
) -> None:
    """Run a control plane until SIGINT or SIGTERM, then drain and return.

    Takes the same arguments as :func:`run_control_plane`.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        async with run_control_plane(
            listen=listen,
            etcd=etcd,
            namespace=namespace,
            grace=grace,
            reconcile_grace=reconcile_grace,
            startup_timeout=startup_timeout,
        ):
            await stop.wait()
            log.info("control plane stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
