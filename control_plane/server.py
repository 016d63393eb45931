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
from llmesh.common.audit import AuditLog
from llmesh.common.auth import TokenTable, auth_from_env
from llmesh.common.auth_interceptor import Authenticator
from llmesh.common.auth_store import EtcdTokenFollower, TokenFileFollower, token_follower
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE, Keys
from llmesh.common.etcd_security import EtcdSecurity, check_etcd_credentials
from llmesh.common.grpc_server import Server
from llmesh.common.metrics import (
    ControlPlaneMetrics,
    MetricsEndpoint,
    enum_name,
    metrics_address,
    start_metrics,
)
from llmesh.common.tls import TlsConfig, https_files
from llmesh.control_plane.deployments import Deployer
from llmesh.control_plane.etcd_health import EtcdHealth
from llmesh.control_plane.job_scheduler import DEFAULT_REAP_GRACE_S, JobScheduler
from llmesh.control_plane.registry import EtcdRegistry, Registry
from llmesh.control_plane.replacement import LostWorkerReplacer
from llmesh.control_plane.servicer import ControlPlaneServicer
from llmesh.control_plane.views import with_replicas
from llmesh.v1 import common_pb2
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
    metrics: MetricsEndpoint | None = None
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
    tls: TlsConfig | None = None,
    etcd_security: EtcdSecurity | None = None,
    insecure: bool = False,
    auth: bool | None = None,
    token_file: str | None = None,
    metrics_listen: str | None = None,
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
        startup_timeout: how long to wait for etcd and the initial load of the namespace
            before giving up with Unavailable.
        job_reap_grace: seconds a trainer worker may be gone before its running training
            jobs are recorded FAILED.
        tls: TLS for its server and for the channels it opens to trainer workers.
        etcd_security: TLS and user/password for etcd.
        insecure: serve beyond loopback without TLS and authentication (warns).
        auth: require bearer tokens (records followed in etcd) and write the audit log;
            None reads ``LLMESH_AUTH``.
        token_file: check tokens against this file's records instead of etcd's (None reads
            ``LLMESH_TOKEN_FILE``; unset: etcd).
        metrics_listen: HOST:PORT of /metrics; None: a free port on the listen host; "off":
            none.

    Yields:
        The running :class:`ControlPlane`.
    """
    tracing.configure("llmesh-control-plane")
    check_etcd_credentials(etcd, etcd_security, insecure=insecure)
    kv = EtcdKV(etcd, security=etcd_security)
    keys = Keys(namespace)
    registry = EtcdRegistry(kv, keys)
    reconcile_task: asyncio.Task[None] | None = None
    jobs_task: asyncio.Task[None] | None = None
    tokens: EtcdTokenFollower | TokenFileFollower | None = None
    metrics: MetricsEndpoint | None = None
    try:
        await registry.start(timeout=startup_timeout)
        authenticator = None
        if auth_from_env(auth):
            table = TokenTable()
            tokens = token_follower(table, kv=kv, keys=keys, token_file=token_file)
            await tokens.start()
            authenticator = Authenticator(table, audit=AuditLog(kv, keys, server="control-plane"))
        deployer = Deployer(registry, kv, keys)
        scheduler = JobScheduler(registry, kv, keys, reap_grace=job_reap_grace, tls=tls)
        meters = ControlPlaneMetrics()
        servicer = ControlPlaneServicer(registry, deployer, jobs=scheduler, metrics=meters)
        server = Server(
            [(cp_grpc.add_ControlPlaneServiceServicer_to_server, servicer, SERVICE_NAME)],
            listen=listen,
            tls=tls,
            insecure=insecure,
            auth=authenticator,
        )
        meters.watch_registry(asyncio.get_running_loop(), lambda: _registry_sample(registry))
        metrics = start_metrics(
            meters.registry,
            metrics_address(server.host, metrics_listen),
            insecure=insecure,
            **https_files(tls),
        )
        await server.start()
        reconciler = LostWorkerReplacer(registry, deployer, grace=reconcile_grace)
        reconcile_task = asyncio.create_task(reconciler.run(), name="reconcile")
        jobs_task = asyncio.create_task(scheduler.run(), name="job-scheduler")
        log.info(
            "control plane on %s, etcd %s, namespace %s", server.address, kv.endpoint, namespace
        )
        if metrics is not None:
            log.info("control plane metrics on %s", metrics.url)
        try:
            async with EtcdHealth(kv, server, metrics=meters).running() as etcd_health:
                yield ControlPlane(
                    address=server.address,
                    registry=registry,
                    servicer=servicer,
                    server=server,
                    metrics=metrics,
                    etcd_health=etcd_health,
                )
        finally:
            # Drain: health says NOT_SERVING first so balancers stop sending, watches end so
            # their clients move to another control plane, then unary calls get `grace`.
            await server.drain()
            servicer.close()
            await server.stop(grace)
    finally:
        try:
            for task in (reconcile_task, jobs_task):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if tokens is not None:
                await tokens.stop()
            await registry.close()
            await kv.close()
        finally:
            # Whatever failed above: the port is freed (the close joins the HTTP thread).
            if metrics is not None:
                await asyncio.to_thread(metrics.close)


def _registry_sample(
    registry: Registry,
) -> tuple[list[tuple[str, str]], list[tuple[str, int]]]:
    """(model, replica state) per replica of every model, and (kind, count) of live workers."""
    replicas: list[tuple[str, str]] = []
    for spec in list(registry.models().values()):
        replicas.append((spec.name, ""))  # counts the model even with no replica
        for r in with_replicas(registry, spec).replicas:
            # UNSPECIFIED: a placeholder for a replica whose worker is not registered.
            name = enum_name(common_pb2.ReplicaState, r.state, "REPLICA_STATE_")
            replicas.append((spec.name, "WORKER_GONE" if name == "UNSPECIFIED" else name))
    kinds: dict[str, int] = {}
    for worker in registry.workers().values():
        kind = worker.kind or "inference"
        kinds[kind] = kinds.get(kind, 0) + 1
    return replicas, sorted(kinds.items())


async def serve_forever(
    *,
    listen: str = "127.0.0.1:50051",
    etcd: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    grace: float = 5.0,
    reconcile_grace: float | None = 30.0,
    startup_timeout: float = 10.0,
    tls: TlsConfig | None = None,
    etcd_security: EtcdSecurity | None = None,
    insecure: bool = False,
    auth: bool | None = None,
    token_file: str | None = None,
    metrics_listen: str | None = None,
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
            tls=tls,
            etcd_security=etcd_security,
            insecure=insecure,
            auth=auth,
            token_file=token_file,
            metrics_listen=metrics_listen,
        ) as control_plane:
            print(f"llmesh control plane serving on {control_plane.address}", flush=True)
            if control_plane.metrics is not None:
                print(f"llmesh control plane metrics {control_plane.metrics.url}", flush=True)
            await stop.wait()
            log.info("control plane stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
