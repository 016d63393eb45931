"""A real Prometheus (Debian's 2.42) scrapes a mesh started by `llmesh up` and reads back what
traffic did, through its own HTTP API.

`llmesh up` prints each process's /metrics URL; the replica process's URL comes from the
control plane's records, as `llmesh workers` shows it.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh.common.process import free_port, guarded, stop_child
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

PROMETHEUS = "/usr/bin/prometheus"

pytestmark = pytest.mark.skipif(
    shutil.which(PROMETHEUS) is None,
    reason="Prometheus is not installed (/usr/bin/prometheus): scripts/install.sh installs "
    "Debian's prometheus package",
)


def _target(url: str) -> tuple[str, str]:
    """(host:port, path) of a /metrics URL."""
    parsed = urllib.parse.urlparse(url)
    return parsed.netloc, parsed.path


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{base}/api/v1/query?{query}", timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def _wait_value(base: str, promql: str, want: float, timeout: float = 30) -> float:
    """Wait until ``promql`` has one series whose value is at least ``want``."""
    deadline = time.monotonic() + timeout
    got: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        got = _query(base, promql)
        if got and float(got[0]["value"][1]) >= want:
            return float(got[0]["value"][1])
        time.sleep(0.25)
    raise AssertionError(f"{promql} did not reach {want} in Prometheus: {got}")


def _wait_ready(base: str, prometheus: subprocess.Popen[bytes], log: Path) -> bool:
    """Wait for Prometheus's readiness endpoint: True once ready, False if it exited."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prometheus.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready within 30 s:\n{log.read_text()}")


# Tries at a free port: free_port() only says a port was free a moment ago.
PROMETHEUS_PORT_TRIES = 3


def _start_prometheus(config: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """Start Prometheus on a free loopback port; (process, base URL, log file).

    It runs guarded (it gets SIGTERM if pytest dies, even by SIGKILL). Another process can
    take the port between free_port() and Prometheus's bind; then Prometheus exits with
    "address already in use" and another port is tried.
    """
    for attempt in range(PROMETHEUS_PORT_TRIES):
        port = free_port()
        log = tmp_path / f"prometheus-{attempt}.log"
        with open(log, "wb") as out:
            prometheus = subprocess.Popen(
                guarded(
                    [
                        PROMETHEUS,
                        f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / f'tsdb-{attempt}'}",
                        f"--web.listen-address=127.0.0.1:{port}",
                    ]
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        base = f"http://127.0.0.1:{port}"
        if _wait_ready(base, prometheus, log):
            return prometheus, base, log
        text = log.read_text(errors="replace")
        if "address already in use" not in text:
            pytest.fail(f"prometheus exited with {prometheus.returncode}:\n{text}")
    pytest.fail(f"prometheus found no free port in {PROMETHEUS_PORT_TRIES} tries:\n{text}")


def test_prometheus_scrapes_the_mesh(
    spawn: Any,
    etcd_server: Any,
    etcd_namespace: str,
    test_model_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    up = spawn(
        "up",
        "--listen",
        address,
        "--etcd",
        etcd_server.endpoint,
        "--namespace",
        etcd_namespace,
        "--workers",
        "1",
        "--trainers",
        "1",
        name="up",
    )
    up.wait_output("ready", timeout=120)
    printed = dict(re.findall(r"^metrics\s+(.+?) (https?://\S+)$", up.output(), re.M))
    assert set(printed) == {"control plane", "worker-0", "trainer-0"}, up.output()

    cp_channel = grpc.insecure_channel(address)
    request.addfinalizer(cp_channel.close)
    stub = cp_grpc.ControlPlaneServiceStub(cp_channel)
    model = cp.Model(name="chat", model_path=str(test_model_dir), backend="transformers")
    (replica,) = stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=180)
    ).model.replicas
    assert replica.metrics_url

    # `llmesh workers` lists every scrape target: the workers' and the replica process's.
    shown = subprocess.run(
        [sys.executable, "-m", "llmesh", "--control_plane", address, "workers"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for url in (printed["worker-0"], printed["trainer-0"], replica.metrics_url):
        assert url in shown, shown

    jobs = {
        "control-plane": printed["control plane"],
        "node-agent": printed["worker-0"],
        "trainer": printed["trainer-0"],
        "replica": replica.metrics_url,
    }
    scrape_configs = [
        {
            "job_name": job,
            "metrics_path": _target(url)[1],
            "static_configs": [{"targets": [_target(url)[0]]}],
        }
        for job, url in jobs.items()
    ]
    config = tmp_path / "prometheus.yml"
    # JSON is YAML: no YAML library needed to write the config.
    config.write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": scrape_configs,
            }
        )
    )
    prometheus, base, log = _start_prometheus(config, tmp_path)
    replica_channel = grpc.insecure_channel(replica.address)
    try:
        # Traffic: chats, and AssignWorker routing decisions.
        chat = inf_grpc.InferenceServiceStub(replica_channel)
        params = common_pb2.GenerationParams(max_tokens=5, temperature=0.0)
        params.extra.update({"ignore_eos": True})
        start = inf.ChatStart(model="chat", prompt="hello", params=params)
        for _ in range(3):
            assert list(chat.Chat(iter([inf.ChatRequest(start=start)]), timeout=60))[-1].finished
            stub.AssignWorker(cp.AssignWorkerRequest(model="chat"))

        for job in jobs:
            _wait_value(base, f'up{{job="{job}"}}', 1)
        labels = 'model_name="chat",replica="0"'
        assert _wait_value(base, f"llmesh:request_success_total{{{labels}}}", 3) == 3
        assert _wait_value(base, f"llmesh:generation_tokens_total{{{labels}}}", 15) == 15
        assert _wait_value(base, f"llmesh:time_to_first_token_seconds_count{{{labels}}}", 3) == 3
        ttft = _query(
            base,
            "histogram_quantile(0.5, sum by (le) "
            f"(llmesh:time_to_first_token_seconds_bucket{{{labels}}}))",
        )
        assert 0 < float(ttft[0]["value"][1]) < 60
        _wait_value(base, 'llmesh:routing_decisions_total{policy="least_loaded"}', 3)
        _wait_value(base, 'llmesh:replicas{model_name="chat",state="READY"}', 1)
        _wait_value(base, 'llmesh:etcd_reachable{job="control-plane"}', 1)
        _wait_value(base, f'llmesh:replica_process_up{{job="node-agent",{labels}}}', 1)
        _wait_value(base, 'process_resident_memory_bytes{job="trainer"}', 1)
    except BaseException:
        print(log.read_text(errors="replace")[-3000:])
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base}/api/v1/label/__name__/values", timeout=10) as r:
                print("metric names Prometheus holds:", r.read()[:6000])
            with urllib.request.urlopen(f"{base}/api/v1/targets", timeout=10) as r:
                print("Prometheus targets:", r.read()[:6000])
        raise
    finally:
        replica_channel.close()
        stop_child(prometheus, 10)
