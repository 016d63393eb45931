"""The control plane's grpc.health tells the truth about etcd: NOT_SERVING while its own
(private) etcd is frozen with SIGSTOP, SERVING again once it runs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.local_etcd import LocalEtcd
from llmesh.control_plane.server import SERVICE_NAME, run_control_plane

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _until(stub: health_pb2_grpc.HealthStub, status: int, timeout: float) -> float:
    """Seconds until both the server's and the service's health read ``status``."""
    started = time.monotonic()
    while True:
        got = [
            (await stub.Check(health_pb2.HealthCheckRequest(service=s), timeout=2)).status
            for s in ("", SERVICE_NAME)
        ]
        if got == [status, status]:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"health stayed {got}, expected {status} within {timeout} s")
        await asyncio.sleep(0.1)


async def test_health_follows_etcd_reachability(tmp_path: Path) -> None:
    etcd = LocalEtcd(tmp_path / "etcd", log_level="error")
    await asyncio.to_thread(etcd.start)
    pid = etcd.proc.pid  # type: ignore[union-attr]
    frozen = False
    try:
        async with run_control_plane(
            listen="127.0.0.1:0", etcd=etcd.endpoint, namespace="/health", grace=0
        ) as cp:
            async with grpc.aio.insecure_channel(cp.address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                await _until(stub, SERVING, 5)
                assert cp.etcd_health is not None and cp.etcd_health.reachable

                os.kill(pid, signal.SIGSTOP)
                frozen = True
                # A probe waits up to 2 s for etcd, then one interval: well within 10 s.
                await _until(stub, NOT_SERVING, 10)
                assert not cp.etcd_health.reachable
                assert "etcd" in cp.etcd_health.reason

                os.kill(pid, signal.SIGCONT)
                frozen = False
                await _until(stub, SERVING, 15)
                assert cp.etcd_health.reachable and cp.etcd_health.reason == ""
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        await asyncio.to_thread(etcd.stop)
