"""Building and running grpc.aio servers the same way everywhere.

Every llmesh server exposes grpc.health.v1 and server reflection, binds to loopback unless told
otherwise, refuses to share its port, and drains in the documented order: health NOT_SERVING,
then the caller's own shutdown (revoke lease), then ``server.stop(grace)``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmesh.common import reflection
from llmesh.common.tls import TlsConfig, check_bind

if TYPE_CHECKING:
    from llmesh.common.auth_interceptor import Authenticator

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]

# Control-plane reads and deploys are idempotent (a repeated deploy with the same spec is a
# no-op), so a call that meets UNAVAILABLE — a restarting control plane, a channel still in
# reconnect backoff — is retried by gRPC itself a few times before the caller sees it. Token
# streams to workers are never retried this way: the SDK decides that, before the first token.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                # Not UndeployModel: if a first attempt committed and its reply was lost, a
                # retry would answer NOT_FOUND for a model it did undeploy.
                "name": [
                    {"service": "llmesh.v1.ControlPlaneService", "method": m}
                    for m in (
                        "DeployModel",
                        "GetModel",
                        "ListModels",
                        "ListWorkers",
                        "AssignWorker",
                        "WatchModel",
                        # Cancel returns a final job as it is; create is retried by the SDK
                        # with its request_id instead (without one it is not idempotent).
                        "GetTrainingJob",
                        "ListTrainingJobs",
                        "CancelTrainingJob",
                    )
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", _SERVICE_CONFIG),
    # Peers in a mesh come back in seconds; don't sit in gRPC's default backoff (up to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


class Server:
    """A grpc.aio server with health and reflection.

    Args:
        services: pairs of (add_XServicer_to_server function, servicer instance, full service name).
        listen: host:port to bind; port 0 picks a free port.
        tls: serve TLS (mTLS when it requires client certificates); None for plaintext.
        insecure: bind beyond loopback even without TLS and authentication (warns loudly).
        authenticated: callers are authenticated some other way than ``auth`` (counts for
            the bind check). Bearer tokens (``auth``) and required client certificates
            (``tls.require_client_cert``, mTLS) count as authentication too, so a full-mTLS
            or token-checking server may bind beyond loopback.
        auth: check bearer tokens on every call but health (see
            :mod:`llmesh.common.auth_interceptor`); None serves without tokens.

    Construction blocks briefly (it may resolve the listen host's name and reads the PEM
    files): build servers at startup, before serving, never on a request path.

    Raises:
        InsecureBind: ``listen`` is beyond loopback without TLS and authentication, and
            ``insecure`` is off (see :func:`llmesh.common.tls.check_bind`).
    """

    def __init__(
        self,
        services: Iterable[tuple[Callable[[object, grpc.aio.Server], None], object, str]],
        *,
        listen: str = "127.0.0.1:0",
        tls: TlsConfig | None = None,
        insecure: bool = False,
        authenticated: bool = False,
        auth: Authenticator | None = None,
    ) -> None:
        # A server that checks bearer tokens or demands client certificates authenticates
        # its callers.
        authenticated = (
            authenticated or auth is not None or (tls is not None and tls.require_client_cert)
        )
        check_bind(listen, tls=tls, authenticated=authenticated, insecure=insecure)
        self.tls = tls
        self.auth = auth
        interceptors = [auth.interceptor()] if auth is not None else None
        self.server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors)
        self.health = (
            health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = []
        for add, servicer, name in services:
            add(servicer, self.server)
            self.service_names.append(name)
        reflection.enable_server_reflection([*self.service_names, health.SERVICE_NAME], self.server)
        host, _, port = listen.rpartition(":")
        if tls is None:
            bound = self.server.add_insecure_port(listen)
        else:
            bound = self.server.add_secure_port(listen, tls.server_credentials())
        if bound == 0:
            raise OSError(f"could not bind {listen}: the port is in use or the host is not local")
        self.host = host.strip("[]") or "127.0.0.1"
        self.port = bound
        if port not in ("0", str(bound)):
            raise OSError(f"asked for port {port} but grpc bound {bound}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6 needs brackets
        return f"{host}:{self.port}"

    async def start(self) -> None:
        await self.server.start()
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s on %s", ", ".join(self.service_names), self.address)

    async def set_not_serving(self) -> None:
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def set_serving(self) -> None:
        """Report SERVING again after :meth:`set_not_serving` (a dependency came back)."""
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)

    async def set_health(self, service: str, serving: bool) -> None:
        """Set the health of one service name (e.g. a model a replica serves).

        Args:
            service: the name clients pass in ``HealthCheckRequest.service``.
            serving: SERVING when True, NOT_SERVING otherwise.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        result = self.health.set(service, status)
        if hasattr(result, "__await__"):
            await result

    async def _set_all(self, status: int) -> None:
        for name in ["", *self.service_names]:
            result = self.health.set(name, status)
            if hasattr(result, "__await__"):
                await result

    async def drain(self) -> None:
        """Health NOT_SERVING for good, every service name included (a replica's models): a
        late :meth:`set_serving` or :meth:`set_health` (etcd answering again, a model turning
        READY) cannot undo it while the server drains."""
        result = self.health.enter_graceful_shutdown()
        if hasattr(result, "__await__"):
            await result

    async def stop(self, grace: float | None = 5.0) -> None:
        await self.drain()
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()
