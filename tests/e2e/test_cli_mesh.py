"""The CLI end to end: `llmesh up` lifecycle, and a worker SIGKILLed under a two-replica model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from llmesh.common.process import free_port
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        out += [int(x) for x in task.read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_up_starts_and_stops_cleanly(spawn: Any) -> None:
    port, gateway = free_port(), f"127.0.0.1:{free_port()}"
    up = spawn(
        "up",
        *("--listen", f"127.0.0.1:{port}", "--workers", "2", "--gateway-listen", gateway),
        name="up",
    )
    up.wait_output("ready", timeout=90)
    assert f"gateway     http://{gateway}/v1" in up.output()
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    workers = stub.ListWorkers(cp.ListWorkersRequest()).workers
    assert len(workers) == 2
    assert all(w.address.startswith("127.0.0.1:") for w in workers)
    # The OpenAI-compatible gateway `up` started answers for the mesh (no model yet).
    assert httpx.get(f"http://{gateway}/health", timeout=10).status_code == 200
    models = httpx.get(f"http://{gateway}/v1/models", timeout=10).json()
    assert models == {"object": "list", "data": []}
    descendants = _children(up.proc.pid)
    assert len(descendants) >= 4  # etcd + 2 workers + the gateway
    assert up.stop(signal.SIGINT, timeout=60) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in descendants):
        time.sleep(0.1)
    assert not [p for p in descendants if _alive(p)], up.output()
    assert "stopped" in up.output()


def _chat(address: str, text: str = "hello") -> list[inf.ChatResponse]:
    stub = inf_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    start = inf.ChatStart(
        model="chat", prompt=text, params=common_pb2.GenerationParams(max_tokens=4)
    )
    return list(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=30))


def test_sigkilled_worker_leaves_routing_and_model_keeps_serving(
    spawn: Any, etcd_server: Any, etcd_namespace: str, test_model_dir: Path
) -> None:
    ttl = 2
    cp_port = free_port()
    common = ["--etcd", etcd_server.endpoint, "--namespace", etcd_namespace]
    control = spawn("control-plane", "--listen", f"127.0.0.1:{cp_port}", *common, name="cp")
    address = f"127.0.0.1:{cp_port}"
    control.wait_healthy(address)
    workers = [
        spawn(
            "inference-worker",
            *common,
            "--worker-id",
            f"w{i}",
            "--lease-ttl",
            str(ttl),
            "--cpus",
            "2",
            name=f"w{i}",
        )
        for i in range(2)
    ]
    for w in workers:
        w.wait_output("serving on")
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))
    model = cp.Model(name="chat", model_path=str(test_model_dir), num_replicas=2)
    deployed = stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120)
    ).model
    assert sorted(r.worker_id for r in deployed.replicas) == ["w0", "w1"]
    # Each replica runs in its own process, a child of its worker's node agent.
    orphans = [r.pid for r in deployed.replicas if r.worker_id == "w0"]
    assert orphans and all(orphans) and all(_alive(p) for p in orphans)

    victim = workers[0]
    os.kill(victim.proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        replicas = stub.GetModel(cp.GetModelRequest(name="chat")).model.replicas
        ready = [r for r in replicas if r.state == common_pb2.REPLICA_STATE_READY]
        if [r.worker_id for r in ready] == ["w1"]:
            break
        assert time.monotonic() - killed_at <= ttl + 1, f"w0 still routed: {replicas}"
        time.sleep(0.05)
    for _ in range(6):
        route = stub.AssignWorker(cp.AssignWorkerRequest(model="chat")).replica
        assert route.worker_id == "w1"
        assert _chat(route.address)[-1].finished
    assert [w.id for w in stub.ListWorkers(cp.ListWorkersRequest()).workers] == ["w1"]
    # The killed agent's replica processes died with it (PR_SET_PDEATHSIG): no orphans.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in orphans):
        time.sleep(0.1)
    assert not [p for p in orphans if _alive(p)]


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_worker_sigterm_drains_in_flight(
    spawn: Any, etcd_server: Any, etcd_namespace: str, test_model_dir: Path, signum: int
) -> None:
    cp_port = free_port()
    common = ["--etcd", etcd_server.endpoint, "--namespace", etcd_namespace]
    control = spawn("control-plane", "--listen", f"127.0.0.1:{cp_port}", *common, name="cp")
    address = f"127.0.0.1:{cp_port}"
    control.wait_healthy(address)
    worker = spawn("inference-worker", *common, "--worker-id", "w0", "--cpus", "2", name="w0")
    worker.wait_output("serving on")
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))
    model = cp.Model(name="chat", model_path=str(test_model_dir))
    deployed = stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120)
    ).model
    infer = inf_grpc.InferenceServiceStub(grpc.insecure_channel(deployed.replicas[0].address))
    start = inf.ChatStart(
        model="chat",
        prompt="a long story",
        params=common_pb2.GenerationParams(max_tokens=60, temperature=0.0),
    )
    start.params.extra.update({"ignore_eos": True})
    call = infer.Chat(iter([inf.ChatRequest(start=start)]), timeout=60)
    first = next(call)
    assert not first.finished
    worker.proc.send_signal(signum)
    rest = list(call)  # the in-flight stream finishes during the drain
    assert rest[-1].finished
    assert rest[-1].finish_reason != common_pb2.FINISH_REASON_ABORTED
    assert worker.proc.wait(30) == 0
    assert not stub.ListWorkers(cp.ListWorkersRequest()).workers


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_deploy_query_tables_undeploy(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    up = spawn("up", "--listen", address, "--workers", "1", name="up")
    up.wait_output("ready", timeout=90)
    made = _cli("make-test-model", str(tmp_path / "tiny"))
    assert made.returncode == 0, made.stderr
    cp_opt = ["--control_plane", address]
    deployed = _cli(
        "deploy",
        *cp_opt,
        "--model",
        "chat",
        "--model_path",
        str(tmp_path / "tiny"),
        "--infer_params",
        "max_concurrency=3",
        'max_model_len="1024"',
    )
    assert deployed.returncode == 0, deployed.stderr
    answer = _cli("query", *cp_opt, "--model", "chat", "--query", "What is the capital of France?")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip()
    models = _cli("models", *cp_opt)
    assert models.returncode == 0 and "chat" in models.stdout and "transformers" in models.stdout
    workers = _cli("workers", *cp_opt)
    assert (
        workers.returncode == 0 and "worker-0" in workers.stdout and address not in workers.stdout
    )
    bad = _cli("deploy", *cp_opt, "--model", "x", "--model_path", "/nope", "--infer_params", "=v")
    assert bad.returncode == 2 and "'=v'" in bad.stderr and "Traceback" not in bad.stderr
    missing = _cli("query", *cp_opt, "--model", "nope", "--query", "hi")
    assert (
        missing.returncode == 1 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    )
    gone = _cli("undeploy", *cp_opt, "--model", "chat")
    assert gone.returncode == 0, gone.stderr
    assert "chat" not in _cli("models", *cp_opt).stdout
    assert up.stop(signal.SIGTERM, timeout=60) == 0
