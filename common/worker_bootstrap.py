"""What every worker does to join the mesh: bind its server, build its record, take a lease.

Inference node agents and trainer workers differ in what they serve and in how they shut
down; the start is the same and lives here once.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import aetcd
import grpc
from prometheus_client import CollectorRegistry

from llmesh.common.auth_interceptor import Authenticator
from llmesh.common.etcd import worker_client
from llmesh.common.etcd_keys import Keys, parse_endpoint
from llmesh.common.etcd_security import EtcdSecurity, check_etcd_credentials
from llmesh.common.grpc_server import Server
from llmesh.common.metrics import (
    MetricsEndpoint,
    metrics_address,
    split_host_port,
    start_metrics,
)
from llmesh.common.tls import TlsConfig, check_bind, https_files
from llmesh.common.worker_session import WorkerSession
from llmesh.v1 import control_plane_service_pb2 as cp

Service = tuple[Callable[[object, grpc.aio.Server], None], object, str]


@dataclass
class WorkerPresence:
    """A worker's bound (not yet started) server, its record, etcd client and lease session."""

    server: Server
    worker: cp.Worker
    client: aetcd.Client
    keys: Keys
    session: WorkerSession

    async def close(self, grace: float = 5.0) -> None:
        """Revoke the lease (if not done yet), stop the server, close the etcd client."""
        await self.session.close()
        await self.server.stop(grace)
        await self.client.close()


def start_worker_metrics(
    registry: CollectorRegistry,
    *,
    listen: str,
    advertise: str | None,
    metrics_listen: str | None,
    tls: TlsConfig | None,
    insecure: bool = False,
    authenticated: bool = False,
) -> MetricsEndpoint | None:
    """Serve a worker's /metrics before it joins (its record carries the URL): on the gRPC
    listen host unless ``metrics_listen`` says otherwise ("off": None), advertised under the
    ``advertise`` host, over HTTPS with the server's certificate when it has TLS.

    The gRPC server's own bind check runs first (``authenticated``: it will check tokens), so
    a refused bind names everything the server lacks rather than only what /metrics does.
    """
    if not insecure:  # with --insecure nothing is refused, and the server warns once itself
        check_bind(
            listen,
            tls=tls,
            authenticated=authenticated or (tls is not None and tls.require_client_cert),
            insecure=False,
        )
    return start_metrics(
        registry,
        metrics_address(split_host_port(listen)[0], metrics_listen),
        advertise_host=(advertise or "").rpartition(":")[0].strip("[]"),
        insecure=insecure,
        **https_files(tls),
    )


async def join_mesh(
    services: Iterable[Service],
    *,
    kind: str,
    listen: str,
    advertise: str | None,
    etcd: str | None,
    namespace: str,
    worker_id: str | None,
    cpus: float | None,
    gpus: float,
    devices: Sequence[cp.Device] = (),
    lease_ttl: int,
    tls: TlsConfig | None = None,
    etcd_security: EtcdSecurity | None = None,
    insecure: bool = False,
    auth: Authenticator | None = None,
    metrics_url: str = "",
) -> WorkerPresence:
    """Bind the server and register the worker record under a fresh lease.

    ``tls`` is the server's TLS, ``etcd_security`` how to reach etcd, ``insecure`` lets the
    server bind beyond loopback without TLS and authentication. ``auth`` makes the server check
    bearer tokens (its table is filled by the caller before the server starts).

    Raises:
        CleartextPassword: an etcd password without TLS to a non-loopback etcd, and no
            ``insecure``.
        ConnectionError: etcd is unreachable (the server is stopped again).
        OSError: the listen address cannot be bound.
    """
    check_etcd_credentials(etcd, etcd_security, insecure=insecure)
    server = Server(services, listen=listen, tls=tls, insecure=insecure, auth=auth)
    address = advertise or server.address
    if address.startswith(("0.0.0.0:", "[::]:")):
        address = f"{socket.gethostname()}:{server.port}"
    worker = cp.Worker(
        id=worker_id or f"{socket.gethostname()}-{server.port}",
        address=address,
        cpus=float(cpus if cpus is not None else os.cpu_count() or 1),
        gpus=float(gpus),
        kind=kind,
        devices=list(devices),
        metrics_url=metrics_url,
    )
    host, port = parse_endpoint(etcd)
    client = worker_client(etcd, security=etcd_security)
    keys = Keys(namespace)
    session = WorkerSession(client, keys, worker, ttl=lease_ttl)
    try:
        await session.__aenter__()
    except Exception as exc:
        await server.stop(0)
        await client.close()
        raise ConnectionError(f"cannot register with etcd at {host}:{port}: {exc}") from exc
    return WorkerPresence(server, worker, client, keys, session)
