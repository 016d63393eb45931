"""A replica process: one engine (plus its LoRA adapters) serving InferenceService on its port.

The node agent starts one per assigned replica::

    python -m llmesh.inference_worker.replica_process SPEC.json

``SPEC.json`` holds the model record, the assignment, the address to bind and where to write
the bound address. The agent sets ``CUDA_VISIBLE_DEVICES`` to the device ids the replica holds
before the process starts, so the engine sees only its own devices. The process has no etcd
access: it reports to its agent over ``ReplicaService.WatchReplica`` and dies with it
(PR_SET_PDEATHSIG), so no replica outlives its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from google.protobuf import json_format

from llmesh.common import tracing
from llmesh.common.grpc_server import Server
from llmesh.common.metrics import ReplicaMetrics, metrics_address, start_metrics
from llmesh.common.process import die_with_parent
from llmesh.common.tls import INSECURE_ENV, TlsConfig, env_flag, https_files
from llmesh.inference_worker.engines.base import Engine, EngineConfig
from llmesh.inference_worker.model_health import ModelHealth
from llmesh.inference_worker.remote_code import remote_code_guard
from llmesh.inference_worker.replica_control import ReplicaControlServicer, StatusBoard
from llmesh.inference_worker.replica_manager import ReplicaManager
from llmesh.inference_worker.servicer import InferenceServicer
from llmesh.v1 import common_pb2, inference_service_pb2_grpc, replica_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp

log = logging.getLogger(__name__)

# Test hook, never set in production: after this many output chunks the engine stops producing
# (its streams block), as a wedged GPU kernel or deadlocked engine thread would look to the agent.
STALL_ENV = "LLMESH_TEST_STALL_AFTER_CHUNKS"
# Backends whose infer_params take "device"; they default to CUDA when the replica holds GPUs.
_DEVICE_BACKENDS = ("transformers", "deepspeed", "embedding", "rerank")


@dataclass
class ReplicaSpec:
    """What the agent tells a replica process to serve."""

    model: cp.Model
    assignment: common_pb2.Replica
    listen: str
    address_file: Path
    advertise_host: str = ""
    # Share of one device when the replica holds a fraction of it (gpus_per_replica < 1).
    gpu_share: float = 0.0
    # Token records the agent keeps current; set when the mesh requires bearer tokens.
    token_file: Path | None = None
    # The operator allows deploys that ask for trust_remote_code (inference_worker.remote_code).
    allow_remote_code: bool = False
    # Where /metrics binds: None = a free port on the gRPC host, "off" = no endpoint.
    metrics_listen: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "model": json_format.MessageToDict(self.model, preserving_proto_field_name=True),
                "assignment": json_format.MessageToDict(
                    self.assignment, preserving_proto_field_name=True
                ),
                "listen": self.listen,
                "address_file": str(self.address_file),
                "advertise_host": self.advertise_host,
                "gpu_share": self.gpu_share,
                "token_file": str(self.token_file) if self.token_file else "",
                "allow_remote_code": self.allow_remote_code,
                "metrics_listen": self.metrics_listen,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ReplicaSpec:
        raw = json.loads(text)
        return cls(
            model=json_format.ParseDict(raw["model"], cp.Model()),
            assignment=json_format.ParseDict(raw["assignment"], common_pb2.Replica()),
            listen=raw["listen"],
            address_file=Path(raw["address_file"]),
            advertise_host=raw.get("advertise_host", ""),
            gpu_share=float(raw.get("gpu_share", 0.0)),
            token_file=Path(raw["token_file"]) if raw.get("token_file") else None,
            allow_remote_code=bool(raw.get("allow_remote_code", False)),
            metrics_listen=raw.get("metrics_listen"),
        )


def engine_params(spec: ReplicaSpec) -> dict[str, str]:
    """The model's infer_params plus the defaults that follow from the replica's devices."""
    params = dict(spec.model.infer_params)
    backend = spec.model.backend or "transformers"
    holds_gpus = bool(spec.assignment.devices)
    if holds_gpus and backend in _DEVICE_BACKENDS and "device" not in params and _cuda():
        params["device"] = "cuda"
    shared = holds_gpus and spec.gpu_share > 0
    if shared and backend == "vllm" and "gpu_memory_utilization" not in params:
        # Two replicas sharing a device must not each ask for vLLM's default 90 % of it.
        params["gpu_memory_utilization"] = f"{0.9 * spec.gpu_share:.3f}"
    return params


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch, no CUDA
        return False


class _StallingEngine:
    """Delegates to an engine, but its streams stop after ``limit`` chunks (test hook)."""

    shared: ClassVar[dict[str, int]] = {"chunks": 0}

    def __init__(self, inner: Engine, limit: int) -> None:
        self._inner = inner
        self._limit = limit

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def generate(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        stream = self._inner.generate(*args, **kwargs)
        try:
            async for chunk in stream:
                if self.shared["chunks"] >= self._limit:
                    await asyncio.Event().wait()  # stuck: no more output, ever
                self.shared["chunks"] += 1
                yield chunk
        finally:
            await stream.aclose()


def engine_factory() -> Callable[[EngineConfig], Engine]:
    from llmesh.inference_worker.engines import create_engine

    limit = os.environ.get(STALL_ENV)
    if not limit:
        return create_engine

    def stalling(config: EngineConfig) -> Engine:
        return _StallingEngine(create_engine(config), int(limit))  # type: ignore[return-value]

    return stalling


def replica_auth(spec: ReplicaSpec) -> tuple[Any, Any]:
    """The token check for a replica's servers and the follower of its agent's token file.

    The replica has no etcd access, so its records come from the file the agent keeps current
    (etcd's records plus the agent's own admin token); ``(None, None)`` without a file.
    """
    if spec.token_file is None:
        return None, None
    from llmesh.common.audit import AuditLog
    from llmesh.common.auth import TokenTable
    from llmesh.common.auth_interceptor import Authenticator
    from llmesh.common.auth_store import TokenFileFollower
    from llmesh.common.etcd_keys import Keys

    table = TokenTable()
    # No etcd here: the agent's calls (drain, adapters) are audited in this process's log.
    audit = AuditLog(None, Keys(), server=f"replica {spec.model.name}")
    return Authenticator(table, audit=audit), TokenFileFollower(spec.token_file, table)


@contextlib.asynccontextmanager
async def run_replica(spec: ReplicaSpec) -> AsyncIterator[tuple[Server, ReplicaManager]]:
    """Serve one replica; on exit drain it (bounded) and stop the engine.

    TLS comes from ``LLMESH_TLS_*`` and ``LLMESH_INSECURE``, which the agent sets to its own
    settings when it starts the process.
    """
    tls = TlsConfig.from_env()
    insecure = env_flag(os.environ.get(INSECURE_ENV))
    board = StatusBoard()
    manager = ReplicaManager(
        board,
        remote_code_guard(engine_factory(), allowed=spec.allow_remote_code),
        metrics=ReplicaMetrics(),
    )
    servicer = InferenceServicer(manager)
    auth, token_follower = replica_auth(spec)
    if token_follower is not None:
        await token_follower.start()
    server = Server(
        [
            (
                inference_service_pb2_grpc.add_InferenceServiceServicer_to_server,
                servicer,
                "llmesh.v1.InferenceService",
            )
        ],
        listen=spec.listen,
        tls=tls,
        insecure=insecure,
        auth=auth,
    )
    host = spec.advertise_host or server.host
    if host in ("0.0.0.0", "::"):
        import socket

        host = socket.gethostname()
    address = f"[{host}]:{server.port}" if ":" in host else f"{host}:{server.port}"
    control = ReplicaControlServicer(manager, board, address)
    # The agent's handle (drain, adapters) is on its own loopback-only server: clients that
    # can reach InferenceService must not be able to drain the replica or load adapters.
    control_server = Server(
        [
            (
                replica_service_pb2_grpc.add_ReplicaServiceServicer_to_server,
                control,
                "llmesh.v1.ReplicaService",
            )
        ],
        listen="127.0.0.1:0",
        tls=tls,
        auth=auth,
    )
    # grpc.health per model (service=<model>): SERVING only while it is READY here; known
    # (NOT_SERVING) before the port answers.
    model_health = ModelHealth(board, server, models=(spec.model.name,))
    await model_health.apply()
    await control_server.start()
    await server.start()
    metrics = start_metrics(
        manager.metrics.registry,
        metrics_address(server.host, spec.metrics_listen),
        advertise_host=spec.advertise_host,
        insecure=insecure,
        **https_files(tls),
    )
    model = cp.Model()
    model.CopyFrom(spec.model)
    model.infer_params.clear()
    model.infer_params.update(engine_params(spec))
    # The address file tells the agent where to watch us; written atomically.
    tmp = spec.address_file.with_suffix(".tmp")
    tmp.write_text(
        json.dumps(
            {
                "address": address,
                "control_address": control_server.address,
                "pid": os.getpid(),
                "metrics_url": metrics.url if metrics is not None else "",
            }
        )
    )
    tmp.replace(spec.address_file)
    manager.spawn(manager.load(spec.assignment, model, address), name="load-base")
    model_health.start()
    try:
        yield server, manager
    finally:
        try:
            await model_health.close()
            await server.drain()
            await manager.drain_all(5.0)
            await server.stop(1.0)
            # The engine stops before the agent's stream does: the agent waits for our exit.
            await manager.close()
            await control_server.stop(0.5)
            if token_follower is not None:
                await token_follower.stop()
        finally:
            if metrics is not None:
                await asyncio.to_thread(metrics.close)  # joins the HTTP thread


async def serve(spec: ReplicaSpec) -> None:
    """Run until SIGTERM (the agent's stop); SIGINT is ignored (see :func:`main`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with run_replica(spec):
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    # SIGKILL, not SIGTERM: a wedged engine may never run a Python signal handler.
    die_with_parent(signal.SIGKILL)
    # A terminal's Ctrl-C reaches the whole process group; the agent stops us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=os.environ.get("LLMESH_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    spec = ReplicaSpec.from_json(Path(args[0]).read_text())
    tracing.configure("llmesh-replica")
    asyncio.run(serve(spec))


if __name__ == "__main__":
    main()
