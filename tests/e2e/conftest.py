"""Helpers for end-to-end tests: the CLI in subprocesses, killed as a tree afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]


class Proc:
    """A CLI child process with its output captured to a file."""

    def __init__(self, args: list[str], log_dir: Path, name: str) -> None:
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmesh", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its own process group, so the whole tree can be killed
        )

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, address: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"process exited with {self.proc.returncode}:\n{self.output()}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    channel.close()
                    return
            except grpc.RpcError:
                time.sleep(0.1)
        channel.close()
        pytest.fail(f"{address} not healthy within {timeout}s:\n{self.output()}")

    def wait_output(self, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            if self.proc.poll() is not None:
                pytest.fail(f"process exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        pytest.fail(f"{text!r} not printed within {timeout}s:\n{self.output()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode

    def kill_tree(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator:
    procs: list[Proc] = []

    def start(*args: str, name: str = "proc") -> Proc:
        p = Proc(list(args), tmp_path, f"{name}-{len(procs)}")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill_tree()
