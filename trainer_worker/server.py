"""Running a trainer worker: gRPC server (TrainerService) + etcd session + job manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmesh.common import tracing
from llmesh.common.audit import AuditLog
from llmesh.common.auth import TokenTable, auth_from_env
from llmesh.common.auth_interceptor import Authenticator
from llmesh.common.auth_store import EtcdTokenFollower, TokenFileFollower, token_follower
from llmesh.common.devices import detect_gpus
from llmesh.common.etcd import EtcdKV
from llmesh.common.etcd_keys import DEFAULT_NAMESPACE
from llmesh.common.etcd_security import EtcdSecurity
from llmesh.common.grpc_server import Server
from llmesh.common.metrics import (
    JobSample,
    MetricsEndpoint,
    enum_name,
    trainer_registry,
)
from llmesh.common.tls import TlsConfig
from llmesh.common.worker_bootstrap import join_mesh, start_worker_metrics
from llmesh.common.worker_session import WorkerSession
from llmesh.trainer_worker.job_manager import JobManager
from llmesh.trainer_worker.path_policy import PathPolicy, roots_from_env
from llmesh.trainer_worker.servicer import TrainerServicer
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import trainer_service_pb2 as tr
from llmesh.v1 import trainer_service_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_JOBS_DIR = "~/.llmesh/jobs"


def _absolute(path: str | Path) -> Path:
    """``~`` expanded and made absolute, so a job's output_dir does not depend on the cwd."""
    return Path(path).expanduser().absolute()


@dataclass
class TrainerWorker:
    """A running trainer worker; handy for tests and for `llmesh up`."""

    worker: cp.Worker
    server: Server
    session: WorkerSession
    manager: JobManager
    metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def id(self) -> str:
        return self.worker.id


def _path_policy(roots: Sequence[str | Path] | None, jobs_dir: Path) -> PathPolicy | None:
    resolved = roots_from_env(roots)
    return PathPolicy(resolved, jobs_dir) if resolved else None


@contextlib.asynccontextmanager
async def run_trainer_worker(
    *,
    listen: str = "127.0.0.1:0",
    advertise: str | None = None,
    etcd: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    worker_id: str | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
    jobs_dir: str | Path = DEFAULT_JOBS_DIR,
    lease_ttl: int = 5,
    cancel_grace: float = 10.0,
    progress_interval: float = 1.0,
    watch_queue_size: int = 1024,
    tls: TlsConfig | None = None,
    etcd_security: EtcdSecurity | None = None,
    insecure: bool = False,
    auth: bool | None = None,
    allowed_roots: Sequence[str | Path] | None = None,
    token_file: str | None = None,
    metrics_listen: str | None = None,
) -> AsyncIterator[TrainerWorker]:
    """Start a trainer worker; on exit stop it in order.

    Shutdown: health NOT_SERVING → stop taking jobs, stop running ones and record them FAILED
    ("trainer worker <id> shut down") → revoke the lease → stop the server (watch streams have
    their final events by then).

    Args:
        listen: host:port to bind (port 0 picks one). Loopback unless told otherwise.
        advertise: host:port clients should dial; defaults to the bound address.
        etcd: etcd endpoint host:port.
        namespace: etcd key namespace.
        worker_id: stable id; a restarted worker with the same id finds the jobs placed on it.
        cpus, gpus: declared capacity (defaults: this machine's CPU count, detected GPUs).
        jobs_dir: where jobs write when their spec names no output_dir (``{jobs_dir}/{id}``).
        lease_ttl: seconds; a dead worker leaves the registry within about this long.
        cancel_grace: seconds a job's ranks get between SIGTERM and SIGKILL.
        progress_interval: progress reaches the etcd record at most this often (seconds).
        watch_queue_size: events a WatchJob caller may lag behind before it is dropped.
        tls: TLS for its server; None for plaintext.
        etcd_security: TLS and user/password for etcd.
        insecure: serve beyond loopback without TLS and authentication (warns).
        auth: require bearer tokens (records followed in etcd); None reads ``LLMESH_AUTH``.
        allowed_roots: directories a job's data, model and output paths must lie under;
            None reads ``LLMESH_ALLOWED_ROOTS`` (``os.pathsep``-separated); without either,
            any path is allowed (as before). ``jobs_dir`` is always allowed.
        token_file: check tokens against this file's records instead of etcd's (None reads
            ``LLMESH_TOKEN_FILE``; unset: etcd).
        metrics_listen: HOST:PORT of the worker's /metrics; None: a free port on the listen
            host; "off": none.
    """
    tracing.configure("llmesh-trainer-worker")
    jobs_path = _absolute(jobs_dir)
    authenticator = Authenticator(TokenTable()) if auth_from_env(auth) else None
    tokens: EtcdTokenFollower | TokenFileFollower | None = None
    servicer = TrainerServicer(None)  # type: ignore[arg-type]  # manager set below
    if gpus is None:
        gpus = float(await asyncio.to_thread(detect_gpus))
    managers: list[JobManager] = []  # the job manager, once it exists (metrics read it)
    metrics = start_worker_metrics(
        trainer_registry(asyncio.get_running_loop(), lambda: _jobs(managers)),
        listen=listen,
        advertise=advertise,
        metrics_listen=metrics_listen,
        tls=tls,
        insecure=insecure,
        authenticated=authenticator is not None,
    )
    try:
        presence = await join_mesh(
            [
                (
                    trainer_service_pb2_grpc.add_TrainerServiceServicer_to_server,
                    servicer,
                    "llmesh.v1.TrainerService",
                )
            ],
            kind="trainer",
            listen=listen,
            advertise=advertise,
            etcd=etcd,
            namespace=namespace,
            worker_id=worker_id,
            cpus=cpus,
            gpus=gpus,
            lease_ttl=lease_ttl,
            tls=tls,
            etcd_security=etcd_security,
            insecure=insecure,
            auth=authenticator,
            metrics_url=metrics.url if metrics is not None else "",
        )
        server, worker, client, keys, session = (
            presence.server,
            presence.worker,
            presence.client,
            presence.keys,
            presence.session,
        )
        # Job records go through the shared compare-and-swap over EtcdKV; lease and watches stay on
        # the aetcd client.
        records_kv = EtcdKV(etcd, security=etcd_security)
        manager = JobManager(
            client,
            records_kv,
            keys,
            worker.id,
            jobs_path,
            progress_interval=progress_interval,
            cancel_grace=cancel_grace,
            watch_queue_size=watch_queue_size,
            path_policy=_path_policy(allowed_roots, jobs_path),
        )
        servicer.manager = manager
        if authenticator is not None:
            authenticator.audit = AuditLog(records_kv, keys, server=f"trainer {worker.id}")
            tokens = token_follower(
                authenticator.table, kv=records_kv, keys=keys, token_file=token_file
            )
            try:
                await tokens.start()
            except BaseException:
                await presence.close(grace=0)
                await records_kv.close()
                raise
        managers.append(manager)
        await server.start()
        manager.start()
        running = TrainerWorker(worker, server, session, manager, metrics)
        try:
            yield running
        finally:
            log.info("trainer worker %s stopping", worker.id)
            await server.drain()
            # Jobs first, while the lease still stands: our own "shut down" outcome is recorded
            # before the control plane could see the worker gone and fail the jobs itself.
            await manager.close()
            await presence.close(grace=5.0)
            if tokens is not None:
                await tokens.stop()
            await records_kv.close()
            log.info("trainer worker %s stopped", worker.id)
    finally:
        # Last and whatever failed before: a failed start or teardown must not leak the port.
        if metrics is not None:
            await asyncio.to_thread(metrics.close)  # joins the HTTP thread


def _jobs(managers: list[JobManager]) -> list[JobSample]:
    """What the metrics show of each job this worker knows: state, step, loss, samples/s."""
    out = []
    for manager in managers:
        for run in manager.runs.values():
            state = enum_name(tr.TrainingJobState, run.record.state, "TRAINING_JOB_STATE_")
            sample = JobSample(job_id=run.job_id, state=state)
            progress = run.progress
            # Per-job series only while it runs: finished jobs would pile up series forever.
            if progress is not None and state == "RUNNING":
                sample.step, sample.total_steps = progress.step, progress.total_steps
                sample.loss = progress.loss
                sample.samples_per_second = progress.samples_per_second
            out.append(sample)
    return out


async def serve_forever(**kwargs: object) -> None:
    """Run a trainer worker until SIGINT or SIGTERM (the `llmesh trainer-worker` command)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_trainer_worker(**kwargs) as worker:  # type: ignore[arg-type]
        print(
            f"llmesh trainer worker {worker.id} serving on {worker.address} "
            f"(jobs in {worker.manager.jobs_dir})",
            flush=True,
        )
        if worker.metrics is not None:
            print(f"llmesh trainer worker {worker.id} metrics {worker.metrics.url}", flush=True)
        await stop.wait()
