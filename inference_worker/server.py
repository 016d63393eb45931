"""Running an inference node agent: etcd session, assignment watch, one process per replica.

The agent itself serves only health and reflection on its address; clients reach each
replica process directly at the address published in its replica record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmesh.common import tracing
from llmesh.common.auth import auth_from_env
from llmesh.common.devices import node_devices
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.metrics import (
    MetricsEndpoint,
    node_agent_registry,
)
from llmesh.common.tls import TlsConfig
from llmesh.common.worker_bootstrap import WorkerPresence, join_mesh, start_worker_metrics
from llmesh.inference_worker.agent_auth import AgentAuth
from llmesh.inference_worker.node_agent import AssignmentWatcher, NodeAgent
from llmesh.inference_worker.remote_code import allow_from_env
from llmesh.inference_worker.replica_supervisor import SupervisorSettings
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)


@dataclass
class InferenceWorker:
    """A running node agent; handy for tests and for `llmesh up`."""

    presence: WorkerPresence
    agent: NodeAgent
    watcher: AssignmentWatcher
    metrics: MetricsEndpoint | None = None

    @property
    def worker(self) -> cp.Worker:
        return self.presence.worker

    @property
    def address(self) -> str:
        return self.presence.server.address

    @property
    def id(self) -> str:
        return self.presence.worker.id

    def replica_address(self, model: str, index: int = 0) -> str:
        """Where the replica process serving ``model`` listens (raises LookupError if none)."""
        return self.agent.replica_address(model, index)


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
    gpu_ids: Sequence[str] | None = None,
    lease_ttl: int = 5,
    drain_grace: float = 30.0,
    wedge_timeout: float = 30.0,
    max_restarts: int = 5,
    run_dir: str | Path | None = None,
    replica_env: Mapping[str, str] | None = None,
    tls: TlsConfig | None = None,
    etcd_security: EtcdSecurity | None = None,
    insecure: bool = False,
    auth: bool | None = None,
    allow_remote_code: bool | None = None,
    token_file: str | None = None,
    metrics_listen: str | None = None,
) -> AsyncIterator[InferenceWorker]:
    """Start a node agent; on exit drain in order: NOT_SERVING → replicas drain and stop → revoke.

    Args:
        listen: host:port to bind (port 0 picks one). Loopback unless told otherwise; replica
            processes bind the same host.
        advertise: host:port clients should dial; its host is also what replica processes
            advertise. Defaults to the bound address.
        etcd: etcd endpoint host:port.
        namespace: etcd key namespace.
        worker_id: stable id; a restarted worker with the same id picks its assignments back up.
        cpus: declared CPUs (default: this machine's count).
        gpus: declared GPU count (ids "0".."N-1"); default: the GPUs nvidia-smi or torch finds.
        gpu_ids: declared GPU ids (e.g. ["0", "2"]); wins over ``gpus``.
        lease_ttl: seconds; a dead agent's replicas leave routing within about this long.
        drain_grace: seconds in-flight requests get to finish on shutdown.
        wedge_timeout: seconds a replica may hold requests without progress before a restart.
        max_restarts: crashes within 5 minutes before a replica is FAILED for good.
        run_dir: where replica processes keep their spec, address and log (default: a temp dir).
        replica_env: extra environment variables for every replica process.
        tls: TLS for its server and its replica processes' servers (passed to them), and
            for the agent's channels to them; None for plaintext.
        etcd_security: TLS and user/password for etcd (replica processes never reach etcd).
        insecure: serve beyond loopback without TLS and authentication (warns); replica
            processes get it too.
        auth: require bearer tokens on the agent and its replica processes; None reads
            ``LLMESH_AUTH``. The agent follows the token records in etcd and keeps a copy in
            ``run_dir/auth/tokens.json`` for its replicas (which have no etcd access), plus an
            admin token of its own that only it holds, for its calls to them.
        allow_remote_code: let replicas whose deploy asks for ``trust_remote_code`` run
            code from their model directory; None reads ``LLMESH_ALLOW_REMOTE_CODE`` (off).
        token_file: check tokens against this file's records instead of etcd's (None reads
            ``LLMESH_TOKEN_FILE``; unset: etcd).
        metrics_listen: HOST:PORT of the agent's /metrics; None: a free port on the listen
            host; "off": no metrics, for the agent and its replica processes.
    """
    tracing.configure("llmesh-inference-worker")
    # nvidia-smi or a torch import: seconds that must not hold up this loop's other tasks.
    devices = await asyncio.to_thread(node_devices, gpus=gpus, gpu_ids=gpu_ids)
    agent_auth = (
        AgentAuth(etcd, namespace, token_file, etcd_security) if auth_from_env(auth) else None
    )
    agents: list[NodeAgent] = []  # the agent, once it exists (metrics read it per scrape)
    metrics = start_worker_metrics(
        node_agent_registry(asyncio.get_running_loop(), lambda: _processes(agents)),
        listen=listen,
        advertise=advertise,
        metrics_listen=metrics_listen,
        tls=tls,
        insecure=insecure,
        authenticated=agent_auth is not None,
    )
    try:
        presence = await join_mesh(
            [],
            kind="inference",
            listen=listen,
            advertise=advertise,
            etcd=etcd,
            namespace=namespace,
            worker_id=worker_id,
            cpus=cpus,
            gpus=len(devices),
            devices=devices,
            lease_ttl=lease_ttl,
            tls=tls,
            etcd_security=etcd_security,
            insecure=insecure,
            auth=agent_auth.authenticator if agent_auth else None,
            metrics_url=metrics.url if metrics is not None else "",
        )
        worker = presence.worker
        own_dir = None
        try:
            if run_dir is None:
                own_dir = tempfile.TemporaryDirectory(prefix=f"llmesh-{worker.id}-")
                run_dir = own_dir.name
            listen_host = presence.server.host
            advertise_host = (advertise or "").rpartition(":")[0].strip("[]")
            settings = SupervisorSettings(
                run_dir=Path(run_dir).expanduser().absolute(),  # noqa: ASYNC240 - path math
                listen_host=listen_host,
                advertise_host=advertise_host,
                wedge_timeout=wedge_timeout,
                max_restarts=max_restarts,
                stop_grace=min(drain_grace, 10.0),
                env=dict(replica_env or {}),
                tls=tls,
                insecure=insecure,
                allow_remote_code=allow_from_env(allow_remote_code),
                metrics=metrics is not None,
            )
            if agent_auth is not None:
                await agent_auth.start(worker.id, settings.run_dir / "auth" / "tokens.json")
                settings.token_file = agent_auth.token_file
                settings.token = agent_auth.agent_token
            agent = NodeAgent(presence.client, presence.keys, worker, presence.session, settings)
            agents.append(agent)
            await presence.server.start()
        except BaseException:
            # A failed start leaves nothing running: the token watch, the lease, the run dir.
            if agent_auth is not None:
                with contextlib.suppress(Exception):
                    await agent_auth.close()
            await presence.close(grace=0)
            if own_dir is not None:
                own_dir.cleanup()
            raise
        watcher = AssignmentWatcher(presence.client, presence.keys, worker.id, agent)
        watcher.start()
        running = InferenceWorker(presence, agent, watcher, metrics)
        try:
            yield running
        finally:
            log.info("worker %s draining", worker.id)
            await presence.server.drain()
            await watcher.stop()
            # Each replica goes DRAINING (routers stop picking it), drains and stops; then revoke.
            await agent.close(drain=drain_grace)
            await presence.close(grace=min(drain_grace, 5.0))
            if agent_auth is not None:
                await agent_auth.close()
            if own_dir is not None:
                own_dir.cleanup()
            log.info("worker %s stopped", worker.id)
    finally:
        # Last and whatever failed before: a failed start or teardown must not leak the port.
        if metrics is not None:
            await asyncio.to_thread(metrics.close)  # joins the HTTP thread


def _processes(agents: list[NodeAgent]) -> list[tuple[str, int, int, str, int, int]]:
    """(model, generation, index, state, pid, restarts) of each replica process supervised."""
    return [
        (key[0], key[1], key[2], sup.state_name(), sup.pid, sup.restarts)
        for agent in agents
        for key, sup in agent.supervisors.items()
    ]


async def serve_forever(**kwargs: object) -> None:
    """Run a node agent until SIGINT or SIGTERM (the `llmesh inference-worker` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_inference_worker(**kwargs) as worker:  # type: ignore[arg-type]
        print(f"llmesh inference worker {worker.id} serving on {worker.address}", flush=True)
        if worker.metrics is not None:
            print(f"llmesh inference worker {worker.id} metrics {worker.metrics.url}", flush=True)
        await stop.wait()
