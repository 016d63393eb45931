"""Running the gateway: uvicorn on the running event loop, as an async context manager.

``run_gateway`` checks the bind the way every llmesh server does
(:func:`llmesh.common.tls.check_bind`: beyond loopback it needs TLS and authentication, or
``insecure``), serves HTTPS with the process's :class:`~llmesh.common.tls.TlsConfig` when it
has a certificate, and on exit stops accepting, lets running responses finish for a grace
period, then closes its SDK clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import uvicorn

from llmesh.common.metrics import split_host_port
from llmesh.common.tls import InsecureBind, TlsConfig, check_bind, is_loopback
from llmesh.gateway import DEFAULT_GATEWAY_LISTEN
from llmesh.gateway.app import GatewaySettings, create_app
from llmesh.gateway.pool import DEFAULT_MAX_CLIENTS, ClientPool
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

log = logging.getLogger(__name__)

#: Seconds running responses get to finish when the gateway stops.
SHUTDOWN_GRACE_S = 10.0
#: ``run_gateway(mesh_tls=...)``'s default: the gateway's own TLS for its channels too.
SAME_TLS = object()
#: How long the start waits for the control plane to say whether it checks tokens.
PROBE_TIMEOUT_S = 10.0


@dataclass
class RunningGateway:
    """A started gateway.

    Attributes:
        address: ``host:port`` it listens on (the real port when 0 was asked for).
        url: its base URL, ``http(s)://host:port``; OpenAI clients use ``url + "/v1"``.
        app: the FastAPI application.
    """

    address: str
    url: str
    app: Any


class _Server(uvicorn.Server):
    # The caller owns signals (``llmesh gateway`` stops on SIGINT/SIGTERM itself; tests and
    # ``llmesh up`` run it in a process that has its own handlers).
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def mesh_checks_tokens(pool: ClientPool, control_plane: str) -> bool:
    """Whether the mesh refuses a call without a token (it runs with ``--auth``).

    Raises:
        InsecureBind: the control plane cannot be asked (so it cannot be known).
    """
    async with pool.lease(None) as client:
        stub = cp_grpc.ControlPlaneServiceStub(client.router.aio_channels.get(control_plane))
        try:
            await stub.ListModels(cp.ListModelsRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return True
            raise InsecureBind(
                f"cannot tell whether the mesh at {control_plane} checks tokens "
                f"({exc.code().name}: {exc.details()}); start the gateway once the control "
                "plane answers, or bind loopback"
            ) from None
    return False


async def _serve(server: Any, listen: str) -> None:
    """``server.serve()``, with uvicorn's ``sys.exit`` on a failed bind turned into the
    OSError callers expect (a SystemExit raised in a task would tear down the whole loop)."""
    try:
        await server.serve()
    except SystemExit as exc:
        raise OSError(
            f"the gateway could not listen on {listen} (in use? pass another --listen)"
        ) from exc


@contextlib.asynccontextmanager
async def run_gateway(
    *,
    control_plane: str,
    listen: str = DEFAULT_GATEWAY_LISTEN,
    tls: TlsConfig | None = None,
    mesh_tls: TlsConfig | object | None = SAME_TLS,
    require_token: bool = False,
    insecure: bool = False,
    max_clients: int = DEFAULT_MAX_CLIENTS,
) -> AsyncIterator[RunningGateway]:
    """Serve the OpenAI-compatible API until the block exits.

    Args:
        control_plane: ``host:port`` of the control plane.
        listen: ``host:port`` to bind; port 0 picks a free one.
        tls: the gateway's HTTPS certificate and key (``tls.cert``/``tls.key``); with
            ``require_client_cert`` it asks clients for certificates from ``tls.ca``. None or
            no certificate: plain HTTP.
        mesh_tls: TLS of the channels into the mesh, None for plaintext (default
            :data:`SAME_TLS`: ``tls``, as every llmesh process
            uses one TlsConfig for both directions).
        require_token: refuse requests without a bearer token (401) at the gateway.
        insecure: allow a non-loopback bind without TLS and tokens (loudly).
        max_clients: how many tokens' SDK clients stay open (see :class:`ClientPool`).

    Raises:
        InsecureBind: a non-loopback ``listen`` without TLS and ``require_token`` (or mTLS).
    """
    mtls = bool(tls is not None and tls.require_client_cert)
    authenticated = require_token or mtls
    check_bind(listen, tls=tls, authenticated=authenticated, insecure=insecure)
    host, port = split_host_port(listen)
    pool = ClientPool(
        control_plane,
        tls=tls if mesh_tls is SAME_TLS else mesh_tls,  # type: ignore[arg-type]
        max_clients=max_clients,
    )
    if require_token and not mtls and not insecure and not is_loopback(host):
        # --auth here only refuses requests without a token; the mesh checks the token. A
        # mesh that checks none would make any "Bearer x" a key to it: refuse that exposure.
        try:
            checks = await mesh_checks_tokens(pool, control_plane)
        except BaseException:
            await pool.close()
            raise
        if not checks:
            await pool.close()
            raise InsecureBind(
                f"refusing to listen on {listen} (beyond loopback) with --auth: the mesh at "
                f"{control_plane} answers calls without a token, so --auth would only check "
                "that some token is sent; run the mesh with --auth, require client "
                "certificates (--tls-require-client-cert), bind loopback, or pass --insecure"
            )
    app = create_app(
        GatewaySettings(control_plane=control_plane, require_token=require_token, pool=pool)
    )
    https = tls is not None and tls.cert is not None
    options: dict[str, Any] = {}
    if https:
        assert tls is not None
        options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.ca is not None:
            options["ssl_ca_certs"] = str(tls.ca)
        if tls.require_client_cert:
            options["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S),
        # Streams end with the last token; a keep-alive connection is reused by clients.
        timeout_keep_alive=30,
        **options,
    )
    server = _Server(config)
    serving = asyncio.get_running_loop().create_task(_serve(server, listen))
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises why it could not start (port in use, bad cert)
                raise OSError(f"the gateway could not listen on {listen}")
            await asyncio.sleep(0.02)
        sock = server.servers[0].sockets[0]
        bound_host, bound_port = sock.getsockname()[:2]
        address = f"{host}:{bound_port}" if host else f"{bound_host}:{bound_port}"
        url = f"{'https' if https else 'http'}://{address}"
        log.info("gateway on %s, forwarding to the control plane at %s", url, control_plane)
        yield RunningGateway(address=address, url=url, app=app)
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await serving
        await app.state.gateway.close()


async def serve_forever(**kwargs: Any) -> None:
    """Run :func:`run_gateway` until SIGINT or SIGTERM (``llmesh gateway``)."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_gateway(**kwargs) as gateway:
        print(f"gateway     {gateway.url}/v1 (OpenAI API)", flush=True)
        await stop.wait()
