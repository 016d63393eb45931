"""LoRA adapters deployed through the control plane onto a running base replica.

Real etcd, control plane, inference worker and transformers engine; the adapter is a real PEFT
adapter written with peft on the test model (random, non-zero B, so its output differs from the
base). The train -> serve loop with a trained adapter is in test_train_serve.py.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh import ByzerLLM
from llmesh.errors import FailedPrecondition
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

from .conftest import Mesh, replica_stats

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "Tell me about the river."}]
GREEDY = {"max_length": 24, "temperature": 0}


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A PEFT LoRA adapter on q/k/v/o with random A and B (so it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(
    etcd_server: Any, test_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Mesh, cp_grpc.ControlPlaneServiceStub, ByzerLLM, Path]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-lora-{uuid.uuid4().hex[:6]}")
    mesh.start_control_plane()
    mesh.start_worker("w-a")
    stub = cp_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.address()))
    base = cp.Model(name="chat", model_path=str(test_model_dir), backend="transformers")
    stub.DeployModel(cp.DeployModelRequest(model=base, wait_ready=True, timeout_seconds=120))
    adapters = tmp_path_factory.mktemp("adapters")
    llm = ByzerLLM(control_plane=mesh.address())
    yield mesh, stub, llm, adapters
    llm.close()
    mesh.close()


def deploy_adapter(stub: Any, name: str, path: Path, **fields: Any) -> cp.Model:
    model = cp.Model(name=name, model_path=str(path), base_model="chat", **fields)
    request = cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=60)
    return stub.DeployModel(request).model


def ask(llm: ByzerLLM, model: str, **cfg: Any) -> str:
    return llm.chat_oai(HELLO, model=model, llm_config={**GREEDY, **cfg})[0].output


def test_adapter_serves_on_the_base_replica_and_base_is_unchanged(
    served: Any, test_model_dir: Path
) -> None:
    mesh, stub, llm, adapters = served
    before = ask(llm, "chat")
    path = make_adapter(test_model_dir, adapters / "a1", seed=1)
    model = deploy_adapter(stub, "chat-a1", path, backend="vllm", cpus_per_replica=3)
    # It rides on the base model's replica: same worker, base's backend, no capacity.
    assert model.base_model == "chat" and model.backend == "transformers"
    (replica,) = model.replicas
    assert replica.state == common_pb2.REPLICA_STATE_READY and replica.worker_id == "w-a"
    worker = mesh.workers["w-a"][0]
    base = replica_stats(worker.replica_address("chat"), "chat")
    # No second engine and no restart: the adapter is served by the base replica's process.
    assert replica.address == worker.replica_address("chat") and replica.pid == int(base["pid"])
    assert base["loras"] == "chat-a1"

    tuned = ask(llm, "chat-a1")
    assert tuned != before
    assert ask(llm, "chat-a1") == tuned
    assert ask(llm, "chat") == before
    stub.UndeployModel(cp.UndeployModelRequest(name="chat-a1", wait=True))
    assert replica_stats(worker.replica_address("chat"), "chat")["loras"] == ""
    assert replica_stats(worker.replica_address("chat"), "chat")["pid"] == base["pid"]
    assert ask(llm, "chat") == before


def test_two_adapters_and_base_concurrently(served: Any, test_model_dir: Path) -> None:
    _, stub, llm, adapters = served
    deploy_adapter(stub, "chat-b1", make_adapter(test_model_dir, adapters / "b1", seed=2))
    deploy_adapter(stub, "chat-b2", make_adapter(test_model_dir, adapters / "b2", seed=3))
    try:
        alone = {m: ask(llm, m) for m in ("chat", "chat-b1", "chat-b2")}
        assert len(set(alone.values())) == 3
        results: dict[str, list[str]] = {m: [] for m in alone}

        def run(m: str) -> None:
            for _ in range(2):
                results[m].append(ask(llm, m))

        threads = [threading.Thread(target=run, args=(m,)) for m in alone]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert results == {m: [text, text] for m, text in alone.items()}
    finally:
        for name in ("chat-b1", "chat-b2"):
            stub.UndeployModel(cp.UndeployModelRequest(name=name, wait=True))


def test_undeploy_drains_the_adapters_requests(served: Any, test_model_dir: Path) -> None:
    _, stub, llm, adapters = served
    deploy_adapter(stub, "chat-c", make_adapter(test_model_dir, adapters / "c", seed=4))
    chunks: list[Any] = []
    started = threading.Event()

    def stream() -> None:
        cfg = {"max_length": 400, "temperature": 0, "ignore_eos": True}
        for item in llm.stream_chat_oai(HELLO, model="chat-c", llm_config=cfg):
            chunks.append(item)
            started.set()

    t = threading.Thread(target=stream)
    t.start()
    assert started.wait(60)
    # The adapter's request counts against the engine it shares with the base replica.
    mesh = served[0]
    stats = replica_stats(mesh.workers["w-a"][0].replica_address("chat"), "chat")
    assert stats["engine_load"] == "1" and stats["inflight_requests"] == "0"
    stub.UndeployModel(cp.UndeployModelRequest(name="chat-c", wait=True, timeout_seconds=120))
    t.join(120)
    _, meta = chunks[-1]
    assert meta.get("finish_reason") == "length", meta  # finished, not aborted


def test_adapter_errors_are_clear(served: Any, test_model_dir: Path, tmp_path: Path) -> None:
    _, stub, _, adapters = served
    with pytest.raises(grpc.RpcError) as err:
        stub.DeployModel(
            cp.DeployModelRequest(
                model=cp.Model(name="x", model_path=str(tmp_path), base_model="missing")
            )
        )
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "base model 'missing'" in err.value.details()

    with pytest.raises(grpc.RpcError) as err:
        deploy_adapter(stub, "x", tmp_path, infer_params={"max_concurrency": "2"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # Not an adapter directory: the replica FAILs with the engine's reason.
    with pytest.raises(grpc.RpcError) as err:
        deploy_adapter(stub, "broken", tmp_path)
    assert "adapter_config.json" in err.value.details()
    stub.UndeployModel(cp.UndeployModelRequest(name="broken", wait=True))

    deploy_adapter(stub, "chat-d", make_adapter(test_model_dir, adapters / "d", seed=5))
    with pytest.raises(grpc.RpcError) as err:
        stub.UndeployModel(cp.UndeployModelRequest(name="chat"))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "serves adapters chat-d" in err.value.details()
    stub.UndeployModel(cp.UndeployModelRequest(name="chat-d", wait=True))


def test_adapter_comes_back_with_its_base_after_a_crash(served: Any, test_model_dir: Path) -> None:
    """kill -9 of the base replica's process: both leave routing, and after the agent's
    restart the adapter is loaded into the new process and answers as before."""
    import os
    import signal
    import time

    _, stub, llm, adapters = served
    deploy_adapter(stub, "chat-crash", make_adapter(test_model_dir, adapters / "c", seed=3))
    tuned = ask(llm, "chat-crash")
    (base,) = stub.GetModel(cp.GetModelRequest(name="chat")).model.replicas
    os.kill(base.pid, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        (b,) = stub.GetModel(cp.GetModelRequest(name="chat")).model.replicas
        (a,) = stub.GetModel(cp.GetModelRequest(name="chat-crash")).model.replicas
        if b.state == a.state == common_pb2.REPLICA_STATE_READY and b.pid != base.pid:
            break
        assert time.monotonic() < deadline, (b, a)
        time.sleep(0.1)
    assert a.pid == b.pid and a.address == b.address
    assert replica_stats(b.address, "chat")["loras"] == "chat-crash"
    # The SDK's routes (a WatchModel stream) may still show the restart for a moment.
    while True:
        try:
            answer = ask(llm, "chat-crash")
            break
        except FailedPrecondition:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert answer == tuned
    stub.UndeployModel(cp.UndeployModelRequest(name="chat-crash", wait=True))
