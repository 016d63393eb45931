"""The mesh's servers as child processes, so a chaos test can SIGKILL or SIGSTOP them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.common.process import free_port


class Child:
    """``python -m llmesh ARGS --listen 127.0.0.1:PORT``, started and healthy.

    Args:
        args: the llmesh command and its options (``--listen`` is added).
        log_dir: where its output goes (``NAME-PORT.log``).
        name: the log file's prefix.
        env: extra environment variables.
    """

    def __init__(
        self, args: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None
    ) -> None:
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_dir / f"{name}-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmesh", *args, "--listen", self.address],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        channel = grpc.insecure_channel(self.address)
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 60
        try:
            while True:
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    return
                except grpc.RpcError:
                    assert self.proc.poll() is None, f"{name} exited; see {self.log_path}"
                    assert time.monotonic() < deadline, f"{name} did not come up"
                    time.sleep(0.2)
        finally:
            channel.close()

    def kill(self) -> None:
        """SIGKILL it (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()


def control_plane(etcd: str, namespace: str, log_dir: Path) -> Child:
    """``llmesh control-plane`` on a free port."""
    return Child(
        ["control-plane", "--etcd", etcd, "--namespace", namespace], log_dir, "control-plane"
    )


def inference_worker(etcd: str, namespace: str, worker_id: str, log_dir: Path) -> Child:
    """``llmesh inference-worker`` (a node agent) on a free port."""
    return Child(
        [
            "inference-worker",
            "--etcd",
            etcd,
            "--namespace",
            namespace,
            "--worker-id",
            worker_id,
            "--cpus",
            "2",
            "--lease-ttl",
            "2",
            "--run-dir",
            str(log_dir / f"run-{worker_id}"),
        ],
        log_dir,
        worker_id,
    )
