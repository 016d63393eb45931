"""Failure behaviour of the whole mesh: control plane gone, etcd gone, undeploy under load."""

from __future__ import annotations

import queue
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh import ByzerLLM
from llmesh.common.local_etcd import LocalEtcd
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

from .conftest import Mesh

HELLO = [{"role": "user", "content": "hello"}]


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _long_chat(address: str, max_tokens: int) -> Any:
    start = inf.ChatStart(
        model="chat",
        prompt="tell me a story",
        params=common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0),
    )
    start.params.extra.update({"ignore_eos": True})
    requests: queue.Queue[inf.ChatRequest | None] = queue.Queue()
    requests.put(inf.ChatRequest(start=start))
    stub = inf_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    return stub.Chat(iter(requests.get, None), timeout=60), requests


def test_sdk_keeps_serving_from_cached_routes_while_control_plane_is_down(
    mesh: Mesh, test_model_dir: Path
) -> None:
    address = mesh.start_control_plane()
    mesh.start_worker("w0")
    with ByzerLLM(control_plane=address) as llm:
        llm.deploy(str(test_model_dir), "custom/llama", "chat", {})
        assert llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 3})[0].output
        mesh.stop_control_plane()
        # Routes are cached from WatchModel: the control plane is not on the request path.
        for _ in range(3):
            assert llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 3})[0].output
        mesh.start_control_plane(listen=address)
        assert llm.is_model_exist("chat")
        assert llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 3})[0].output


def test_undeploy_drains_in_flight_requests_then_unloads(mesh: Mesh, test_model_dir: Path) -> None:
    address = mesh.start_control_plane()
    worker = mesh.start_worker("w0")
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))
    model = cp.Model(name="chat", model_path=str(test_model_dir))
    stub.DeployModel(cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120))
    call, requests = _long_chat(worker.replica_address("chat"), 300)
    assert not next(call).finished
    stub.UndeployModel(cp.UndeployModelRequest(name="chat"))  # returns at once
    rest = list(call)
    requests.put(None)
    assert rest[-1].finished
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH  # drained, not aborted
    pid = worker.agent.supervisor_of("chat").pid
    _wait(lambda: not worker.agent.supervisors, 10, "the replica to unload")
    assert not _alive(pid), "the replica process outlived its undeploy"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(cp.GetModelRequest(name="chat"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_etcd_outage_keeps_streams_alive_and_worker_reregisters(
    tmp_path: Path, test_model_dir: Path
) -> None:
    etcd = LocalEtcd(tmp_path / "etcd", log_level="error")
    etcd.start()
    mesh = Mesh(etcd.endpoint, "/llmesh-outage")
    try:
        address = mesh.start_control_plane()
        worker = mesh.start_worker("w0", lease_ttl=2)
        stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))
        model = cp.Model(name="chat", model_path=str(test_model_dir))
        stub.DeployModel(cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120))
        call, requests = _long_chat(worker.replica_address("chat"), 200)
        assert not next(call).finished

        etcd.stop()
        # Tokens do not touch etcd: the stream in flight finishes, and new requests are served.
        rest = list(call)
        requests.put(None)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        call2, requests2 = _long_chat(worker.replica_address("chat"), 5)
        assert list(call2)[-1].finished
        requests2.put(None)
        # The control plane answers routing from its last known state.
        route = stub.AssignWorker(cp.AssignWorkerRequest(model="chat"), timeout=5).replica
        assert route.worker_id == "w0"
        time.sleep(3)  # longer than the lease TTL

        etcd.start()

        # Whether etcd kept or dropped the lease, the worker is registered and READY again.
        def ready() -> bool:
            try:
                m = stub.GetModel(cp.GetModelRequest(name="chat"), timeout=2).model
                workers = stub.ListWorkers(cp.ListWorkersRequest(), timeout=2).workers
            except grpc.RpcError:
                return False
            return [w.id for w in workers] == ["w0"] and [r.state for r in m.replicas] == [
                common_pb2.REPLICA_STATE_READY
            ]

        _wait(ready, 30, "the worker and its replica to be back in etcd")
        assert stub.AssignWorker(cp.AssignWorkerRequest(model="chat")).replica.worker_id == "w0"
    finally:
        mesh.close()
        etcd.stop()


def test_a_model_that_cannot_load_is_failed_with_its_reason(mesh: Mesh, tmp_path: Path) -> None:
    address = mesh.start_control_plane()
    worker = mesh.start_worker("w0")
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(grpc.RpcError) as err:
        stub.DeployModel(
            cp.DeployModelRequest(
                model=cp.Model(name="broken", model_path=missing),
                wait_ready=True,
                timeout_seconds=60,
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert missing in err.value.details()
    (replica,) = stub.GetModel(cp.GetModelRequest(name="broken")).model.replicas
    assert replica.state == common_pb2.REPLICA_STATE_FAILED and missing in replica.reason
    stub.UndeployModel(cp.UndeployModelRequest(name="broken", wait=True, timeout_seconds=30))
    assert not worker.agent.supervisors
