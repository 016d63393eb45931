"""Each replica is its own process: a crash or a wedge of one never takes another model down.

A real node agent (in-process) starts real replica processes with the transformers engine;
faults are real signals (SIGKILL) and a real engine that stops producing output.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh.inference_worker.replica_process import STALL_ENV
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, replica_stats

READY = common_pb2.REPLICA_STATE_READY


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _chat(address: str, model: str, max_tokens: int = 4, **kw: Any) -> list[inf.ChatResponse]:
    stub = inference_service_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    params = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0)
    params.extra.update({"ignore_eos": True})
    start = inf.ChatStart(model=model, prompt="hello", params=params)
    return list(stub.Chat(iter([inf.ChatRequest(start=start)]), **kw))


def _replica(stub: cp_grpc.ControlPlaneServiceStub, model: str) -> common_pb2.Replica:
    (replica,) = stub.GetModel(cp.GetModelRequest(name=model)).model.replicas
    return replica


def _deploy(stub: cp_grpc.ControlPlaneServiceStub, name: str, path: Path) -> cp.Model:
    model = cp.Model(name=name, model_path=str(path), backend="transformers")
    model.infer_params["max_concurrency"] = "4"
    return stub.DeployModel(
        cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=180)
    ).model


@pytest.fixture
def two_models(
    etcd_server: Any, test_model_dir: Path
) -> Iterator[tuple[Mesh, Any, cp_grpc.ControlPlaneServiceStub]]:
    """One worker, two models on it, each in its own replica process."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-rp-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        worker = mesh.start_worker("w-rp", wedge_timeout=30)
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        _deploy(stub, "chat", test_model_dir)
        _deploy(stub, "other", test_model_dir)
        yield mesh, worker, stub
    finally:
        mesh.close()


def test_each_replica_runs_in_its_own_process(two_models: Any) -> None:
    _, worker, stub = two_models
    chat, other = _replica(stub, "chat"), _replica(stub, "other")
    assert chat.pid and other.pid and chat.pid != other.pid != os.getpid()
    assert chat.address != other.address != worker.address
    assert replica_stats(chat.address, "chat")["pid"] == str(chat.pid)
    assert _chat(chat.address, "chat")[-1].finished


def test_replica_processes_do_not_inherit_etcd_credentials(
    etcd_server: Any, test_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent holds the etcd password (``llmesh up`` hands it over in the environment); the
    replica process, which runs the model's code, must not."""
    secret = f"etcd-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("LLMESH_ETCD_PASSWORD", secret)
    monkeypatch.setenv("LLMESH_ETCD_USER", "root")
    monkeypatch.setenv("LLMESH_ETCD_KEY", "/nonexistent/etcd-client.key")
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-env-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        mesh.start_worker("w-env")
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        _deploy(stub, "chat", test_model_dir)
        pid = _replica(stub, "chat").pid
        assert pid and pid != os.getpid()
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(v.startswith(b"CUDA_DEVICE_ORDER=") for v in environ)  # really its env
        assert not [v for v in environ if v.startswith(b"LLMESH_ETCD_")]
        assert secret.encode() not in b"\0".join(environ)
    finally:
        mesh.close()


def test_sigkill_of_one_replica_leaves_routing_at_once_and_it_comes_back(
    two_models: Any,
) -> None:
    _, worker, stub = two_models
    victim, bystander = _replica(stub, "chat"), _replica(stub, "other")
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    down = _wait(lambda: _replica(stub, "chat").state != READY, 5, "chat to leave routing")
    # The agent writes the state itself on the exit: no wait for a lease TTL.
    assert time.monotonic() - killed_at < 1.0
    assert down
    # The other model, in its own process on the same worker, never noticed.
    assert _chat(bystander.address, "other", max_tokens=8)[-1].finished
    assert _replica(stub, "other").pid == bystander.pid
    back = _wait(
        lambda: (r := _replica(stub, "chat")).state == READY and r.pid != victim.pid and r,
        120,
        "chat to come back READY in a new process",
    )
    assert not _alive(victim.pid)
    assert _chat(back.address, "chat")[-1].finished
    assert worker.agent.supervisor_of("chat").restarts == 1


def test_a_wedged_engine_is_detected_and_restarted(etcd_server: Any, test_model_dir: Path) -> None:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-wedge-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        # The test hook makes the engine stop producing after 6 chunks, as a hung kernel would.
        mesh.start_worker("w-wedge", wedge_timeout=2, replica_env={STALL_ENV: "6"})
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        _deploy(stub, "chat", test_model_dir)
        first = _replica(stub, "chat")
        with pytest.raises(grpc.RpcError) as err:
            _chat(first.address, "chat", max_tokens=50, timeout=60)
        # The stream breaks when the agent kills the wedged process; it does not hang.
        assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        replaced = _wait(
            lambda: (r := _replica(stub, "chat")).state == READY and r.pid != first.pid and r,
            120,
            "chat to be restarted in a new process",
        )
        assert not _alive(first.pid)
        assert replaced.address
    finally:
        mesh.close()


def test_repeated_crashes_end_in_failed_with_the_log(
    etcd_server: Any, test_model_dir: Path
) -> None:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-crash-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        worker = mesh.start_worker("w-crash", max_restarts=1)
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
        _deploy(stub, "chat", test_model_dir)
        for _ in range(2):
            pid = _wait(
                lambda: (r := _replica(stub, "chat")).state == READY and r.pid, 120, "READY"
            )
            os.kill(pid, signal.SIGKILL)
            _wait(lambda p=pid: _replica(stub, "chat").pid != p, 10, "the crash to be seen")
        failed = _wait(
            lambda: (r := _replica(stub, "chat")).state == common_pb2.REPLICA_STATE_FAILED and r,
            30,
            "chat to be FAILED after repeated crashes",
        )
        assert "exited with code -9" in failed.reason and "giving up" in failed.reason
        assert "READY" in failed.reason  # the last lines of its log
        assert not failed.pid
        assert worker.agent.supervisor_of("chat").restarts == 1
    finally:
        mesh.close()


def test_replicas_get_their_own_devices_and_wait_pending_for_one(
    etcd_server: Any, test_model_dir: Path
) -> None:
    """A worker declared with 4 GPUs on this CPU machine: each replica process is started
    with CUDA_VISIBLE_DEVICES set to the ids it holds, whole GPUs never collide, two halves
    share one, and a model that finds no free GPU waits PENDING until one is undeployed."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-dev-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        mesh.start_worker("w-gpu", gpus=4, cpus=8)
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))

        def deploy(name: str, gpus: float, replicas: int = 1, wait: bool = True) -> cp.Model:
            model = cp.Model(
                name=name,
                model_path=str(test_model_dir),
                backend="transformers",
                num_replicas=replicas,
                gpus_per_replica=gpus,
                cpus_per_replica=1,
            )
            return stub.DeployModel(
                cp.DeployModelRequest(model=model, wait_ready=wait, timeout_seconds=240)
            ).model

        deploy("one", 1)
        deploy("two", 2)
        deploy("half", 0.5, replicas=2)
        seen: dict[str, str] = {}
        for name in ("one", "two", "half"):
            for r in stub.GetModel(cp.GetModelRequest(name=name)).model.replicas:
                visible = replica_stats(r.address, name)["visible_devices"]
                assert visible == ",".join(r.devices), (name, r)
                seen[f"{name}/{r.index}"] = visible
        whole = [d for k in ("one/0", "two/0") for d in seen[k].split(",")]
        assert len(whole) == 3 and len(set(whole)) == 3, seen
        assert seen["half/0"] == seen["half/1"] and seen["half/0"] not in whole, seen

        waiting = deploy("late", 1, wait=False)
        (pending,) = stub.GetModel(cp.GetModelRequest(name="late")).model.replicas
        assert pending.state == common_pb2.REPLICA_STATE_PENDING, waiting
        assert "w-gpu" in pending.reason and "one/0" in pending.reason, pending.reason

        stub.UndeployModel(cp.UndeployModelRequest(name="one", wait=True, timeout_seconds=60))
        late = _wait(
            lambda: (r := _replica(stub, "late")).state == READY and r,
            240,
            "the pending model to start on the freed GPU",
        )
        assert list(late.devices) == seen["one/0"].split(",")
        assert replica_stats(late.address, "late")["visible_devices"] == seen["one/0"]
    finally:
        mesh.close()
