"""The CLI end to end with mTLS: `llmesh certs init`, then `llmesh up` with the certificates.

`up` serves its etcd, control plane, inference worker and trainer worker with the same
settings (every hop mTLS) and passes them to its children.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh.common.process import free_port
from llmesh.common.tls import TlsConfig, channel
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc


def test_up_with_mtls_everywhere(spawn: Any, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    init = spawn("certs", "init", str(certs), name="certs")
    assert init.proc.wait(60) == 0, init.output()
    port = free_port()
    up = spawn(
        "up",
        *("--listen", f"127.0.0.1:{port}", "--workers", "1", "--trainers", "1"),
        *("--tls-cert", str(certs / "control-plane.pem")),
        *("--tls-key", str(certs / "control-plane.key")),
        *("--tls-ca", str(certs / "ca.pem"), "--tls-require-client-cert"),
        *("--jobs-dir", str(tmp_path / "jobs")),
        name="up",
    )
    up.wait_output("ready", timeout=120)
    address = f"127.0.0.1:{port}"
    client = TlsConfig(cert=certs / "client.pem", key=certs / "client.key", ca=certs / "ca.pem")
    with channel(address, client) as ch:
        workers = cp_grpc.ControlPlaneServiceStub(ch).ListWorkers(
            cp.ListWorkersRequest(), timeout=10
        )
    assert sorted(w.kind for w in workers.workers) == ["inference", "trainer"]
    # Each worker's own server is mTLS too: a client without a certificate is refused.
    for worker in workers.workers:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with channel(worker.address, client) as ch:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        with channel(worker.address, TlsConfig(ca=certs / "ca.pem")) as ch:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with channel(address, None) as ch:
        with pytest.raises(grpc.RpcError):
            cp_grpc.ControlPlaneServiceStub(ch).ListWorkers(cp.ListWorkersRequest(), timeout=5)
    assert up.stop(signal.SIGINT, timeout=60) == 0, up.output()
