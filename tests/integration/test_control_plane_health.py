"""The control plane's grpc.health tells the truth about etcd: NOT_SERVING while its own
(private) etcd is frozen with SIGSTOP, SERVING again once it runs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.etcd import EtcdKV
from llmesh.common.grpc_server import Server
from llmesh.common.local_etcd import LocalEtcd
from llmesh.common.metrics import ControlPlaneMetrics
from llmesh.common.process import free_port
from llmesh.control_plane.etcd_health import EtcdHealth
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


async def test_one_failed_probe_does_not_flap_health_and_every_probe_is_measured(
    etcd_server: Any,
) -> None:
    """A single slow or failed probe leaves the health alone; ``failures`` in a row turn it
    NOT_SERVING. Each probe feeds ``llmesh:etcd_reachable`` and the round-trip histogram."""
    server = Server([], listen="127.0.0.1:0")
    await server.start()
    meters = ControlPlaneMetrics()
    live = EtcdKV(etcd_server.endpoint)
    dead = EtcdKV(f"127.0.0.1:{free_port()}")  # nothing listens there: refused at once
    try:
        health = EtcdHealth(live, server, failures=2, timeout=1, metrics=meters)
        assert await health.probe()
        assert meters.registry.get_sample_value("llmesh:etcd_reachable") == 1
        assert meters.registry.get_sample_value("llmesh:etcd_request_duration_seconds_count") == 1

        health.kv = dead
        assert await health.probe()  # one failure: still reachable, still SERVING
        assert meters.registry.get_sample_value("llmesh:etcd_reachable") == 0
        assert await _status(server) == SERVING
        assert not await health.probe()  # the second in a row trips it
        assert not health.reachable and health.reason
        assert await _status(server) == NOT_SERVING

        health.kv = live
        assert await health.probe()
        assert await _status(server) == SERVING
        assert meters.registry.get_sample_value("llmesh:etcd_reachable") == 1
        # A failure after a success starts the count over.
        health.kv = dead
        assert await health.probe()
        assert await _status(server) == SERVING

        assert not await health.probe()  # tripped again: NOT_SERVING
        assert await _status(server) == NOT_SERVING

        # Draining is final: the good probe that would turn it SERVING again cannot.
        await server.drain()
        health.kv = live
        assert await health.probe() and health.reachable
        assert await _status(server) == NOT_SERVING
    finally:
        await live.close()
        await dead.close()
        await server.stop(0)


async def _status(server: Server) -> int:
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status
