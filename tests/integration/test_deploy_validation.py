"""DeployModel checks infer_params against the backend's table at once: a typo or an ill-typed
value is INVALID_ARGUMENT with a sentence saying how to fix it, and nothing is written (no model
record, no assignment), instead of a replica that goes FAILED on the worker later.

A real control plane and etcd; the worker is :class:`SimWorker` (its etcd side only).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aetcd
import grpc
import pytest

from llmesh.common.etcd_keys import Keys, decode, parse_endpoint
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc

from .test_control_plane import SimWorker, control_plane, deploy, model, rpc_error

Code = grpc.StatusCode


@pytest.fixture
async def etcd(etcd_server: Any) -> AsyncIterator[aetcd.Client]:
    host, port = parse_endpoint(etcd_server.endpoint)
    async with aetcd.Client(host=host, port=port) as client:
        yield client


@pytest.fixture
def keys(etcd_namespace: str) -> Keys:
    return Keys(etcd_namespace)


@pytest.fixture
async def stub(etcd_server: Any, etcd_namespace: str) -> AsyncIterator[Any]:
    async with control_plane(etcd_server.endpoint, etcd_namespace) as plane:
        yield plane.stub


async def snapshot(etcd: aetcd.Client, keys: Keys) -> list[tuple[bytes, int]]:
    return [(kv.key, kv.mod_revision) for kv in await etcd.get_prefix(keys.root)]


@pytest.mark.parametrize(
    ("backend", "params", "sentence"),
    [
        (
            "transformers",
            {"max_concurency": "4"},
            "unknown infer_params key 'max_concurency' for backend 'transformers' (model chat); "
            "did you mean 'max_concurrency'? Accepted keys: max_concurrency, max_model_len",
        ),
        (
            "transformers",
            {"max_concurrency": "many"},
            "infer_params max_concurrency='many' is not an integer; give a whole number >= 1. "
            "max_concurrency (backend 'transformers', model chat): requests decoded at once",
        ),
        (
            "vllm",
            {"gpu_memory_utilization": "1.5"},
            "infer_params gpu_memory_utilization=1.5 is out of range; give a number in (0, 1]",
        ),
        (
            "vllm",
            {"max_loras": "2"},
            "infer_params max_loras only applies with enable_lora=true; add enable_lora=true or "
            "drop max_loras",
        ),
        (
            "embedding",
            {"dtype": "half"},
            "unknown infer_params key 'dtype' for backend 'embedding'",
        ),
        ("auto", {"pooling": "cls"}, "unknown infer_params key 'pooling' for backend 'auto'"),
        (
            "deepspeed",
            {"tensor_parallel_size": "2"},
            "infer_params tensor_parallel_size=2 is not supported by the deepspeed backend yet",
        ),
    ],
    ids=[
        "typo",
        "not-an-int",
        "out-of-range",
        "needs-enable-lora",
        "other-backends-key",
        "auto",
        "deepspeed-tp",
    ],
)
async def test_bad_infer_params_are_refused_at_once_and_write_nothing(
    stub: cp_grpc.ControlPlaneServiceStub,
    etcd: aetcd.Client,
    keys: Keys,
    backend: str,
    params: dict[str, str],
    sentence: str,
) -> None:
    worker = await SimWorker(etcd, keys, "w1", cpus=4).start()  # room: only the params stop it
    before = await snapshot(etcd, keys)
    request = cp.DeployModelRequest(
        model=model("chat", backend=backend, infer_params=params),
        wait_ready=True,
        timeout_seconds=30,
    )
    err = await rpc_error(stub.DeployModel(request))
    assert err.code() == Code.INVALID_ARGUMENT
    assert sentence in err.details()
    assert await snapshot(etcd, keys) == before
    assert not await worker.assignments()
    missing = await rpc_error(stub.GetModel(cp.GetModelRequest(name="chat")))
    assert missing.code() == Code.NOT_FOUND


async def test_good_infer_params_are_stored_as_given(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await SimWorker(etcd, keys, "w1", cpus=4).start()
    params = {"max_concurrency": " 4 ", "dtype": "HALF", "device": "auto", "max_model_len": ""}
    deployed = await deploy(stub, "chat", infer_params=params)
    assert dict(deployed.infer_params) == params
    stored = decode((await etcd.get(keys.model("chat"))).value, cp.Model)
    assert dict(stored.infer_params) == params
    # auto takes the keys of every backend it may pick: vLLM's and the embedding engine's.
    auto = {"gpu_memory_utilization": "0.5", "batch_size": "8"}
    assert dict((await deploy(stub, "any", backend="auto", infer_params=auto)).infer_params) == auto


async def test_a_bad_redeploy_is_invalid_before_it_is_compared(
    stub: cp_grpc.ControlPlaneServiceStub, etcd: aetcd.Client, keys: Keys
) -> None:
    await SimWorker(etcd, keys, "w1", cpus=4).start()
    first = await deploy(stub, "chat", infer_params={"max_concurrency": "2"})
    before = await snapshot(etcd, keys)
    request = cp.DeployModelRequest(model=model("chat", infer_params={"max_concurrency": "0"}))
    err = await rpc_error(stub.DeployModel(request))
    assert err.code() == Code.INVALID_ARGUMENT
    assert "infer_params max_concurrency=0 is too small; it must be >= 1" in err.details()
    assert await snapshot(etcd, keys) == before
    kept = (await stub.GetModel(cp.GetModelRequest(name="chat"))).model
    assert kept.generation == first.generation
    assert dict(kept.infer_params) == {"max_concurrency": "2"}
