"""vLLM's abort test on every generative engine, through a real mesh worker.

100 concurrent Chat streams; 10 are cancelled at random points, mixing the three ways a stream
can end early: a cancel message on the stream, ``Abort(request_id)`` from another client, and
the client dropping the call. The other 90 must finish normally, the engine must hold no state
afterwards, the replica's aborted-request counter must grow by exactly 10, and the engine must
still generate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh.v1 import common_pb2, control_plane_service_pb2_grpc, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, wait_replica_idle

STREAMS = 100
CANCELLED = 10
MAX_TOKENS = 32
# Streams picked for cancelling may not finish first: they get room for far more tokens than
# they will produce before their (early) cancel point.
VICTIM_MAX_TOKENS = 400
CANCEL_AFTER = (1, 16)  # cancel once this many tokens (random, inclusive range) have arrived
WAYS = ("message", "abort", "disconnect")

INFER_PARAMS = {
    "transformers": {"max_concurrency": str(STREAMS)},
    "deepspeed": {"max_concurrency": str(STREAMS)},
    "vllm": {
        "max_concurrency": str(STREAMS),
        "max_num_seqs": str(STREAMS),
        "max_model_len": "512",
        "gpu_memory_utilization": "0.1",
    },
}


@dataclasses.dataclass
class Outcome:
    way: str | None
    tokens: int = 0
    last: inf.ChatResponse | None = None
    code: grpc.StatusCode | None = None
    cancelled_at: int | None = None  # tokens received when the cancel was issued
    abort_found: bool | None = None  # what Abort(request_id) answered


@pytest.fixture(scope="module", params=sorted(INFER_PARAMS))
def served(
    request: pytest.FixtureRequest, etcd_server: Any, test_model_dir: Path
) -> Iterator[tuple[str, Any]]:
    """One worker hosting the test model on the given backend (one engine per module)."""
    backend = request.param
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-abort-{backend}-{uuid.uuid4().hex[:6]}")
    try:
        mesh.start_control_plane()
        worker = mesh.start_worker(f"w-{backend}", cpus=2)
        admin = control_plane_service_pb2_grpc.ControlPlaneServiceStub(
            grpc.insecure_channel(mesh.address())
        )
        model = cp.Model(name="chat", model_path=str(test_model_dir), backend=backend)
        model.infer_params.update(INFER_PARAMS[backend])
        admin.DeployModel(cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=240))
        yield backend, worker
    finally:
        mesh.close()


def _params(max_tokens: int) -> common_pb2.GenerationParams:
    p = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0)
    p.extra.update({"ignore_eos": True})  # the tiny model must not stop early on EOS
    return p


async def _stream(
    stub: Any, other: Any, i: int, way: str | None, cancel_after: int, tag: str
) -> Outcome:
    out = Outcome(way)
    rid = f"{tag}-{i}"
    call = stub.Chat()
    start = inf.ChatStart(
        model="chat",
        prompt=f"Story number {i}: once upon a time",
        request_id=rid,
        params=_params(VICTIM_MAX_TOKENS if way else MAX_TOKENS),
    )
    await call.write(inf.ChatRequest(start=start))
    while True:
        msg = await call.read()
        if msg is grpc.aio.EOF:
            break
        out.tokens += len(msg.token_ids)
        out.last = msg
        if way is None or msg.finished or out.tokens < cancel_after or out.cancelled_at:
            continue
        out.cancelled_at = out.tokens
        if way == "message":
            await call.write(inf.ChatRequest(cancel=inf.ChatCancel()))
        elif way == "abort":
            out.abort_found = (await other.Abort(inf.AbortRequest(request_id=rid))).aborted
        else:
            call.cancel()  # the client goes away: no final message, status CANCELLED
            break
    if way != "disconnect":
        await call.done_writing()
    out.code = await call.code()
    return out


async def _run_all(address: str, plan: dict[int, tuple[str, int]]) -> list[Outcome]:
    tag = uuid.uuid4().hex[:6]
    async with (
        grpc.aio.insecure_channel(address) as channel,
        grpc.aio.insecure_channel(address) as other_channel,
    ):
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        other = inference_service_pb2_grpc.InferenceServiceStub(other_channel)
        tasks = []
        for i in range(STREAMS):
            way, after = plan.get(i, (None, 0))
            tasks.append(asyncio.create_task(_stream(stub, other, i, way, after, tag)))
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)


def _counts(stub: Any) -> tuple[int, int]:
    extra = stub.GetModelMeta(inf.GetModelMetaRequest(model="chat")).extra
    return int(extra["served_requests"]), int(extra["aborted_requests"])


def test_cancel_10_of_100_streams(served: tuple[str, Any]) -> None:
    backend, worker = served
    address = worker.replica_address("chat")
    stub = inference_service_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    served_before, aborted_before = _counts(stub)

    rng = random.Random(20240611)
    victims = rng.sample(range(STREAMS), CANCELLED)
    ways = [WAYS[k % len(WAYS)] for k in range(CANCELLED)]
    rng.shuffle(ways)
    plan = {v: (way, rng.randint(*CANCEL_AFTER)) for v, way in zip(victims, ways, strict=True)}

    outcomes = asyncio.run(_run_all(address, plan))

    for i, out in enumerate(outcomes):
        where = f"{backend} stream {i} ({out.way or 'normal'})"
        if out.way == "disconnect":
            assert out.cancelled_at is not None, where
            assert out.code == grpc.StatusCode.CANCELLED, where
            continue
        assert out.code == grpc.StatusCode.OK, where
        assert out.last is not None and out.last.finished, where
        if out.way is None:
            assert out.last.finish_reason == common_pb2.FINISH_REASON_LENGTH, where
            assert out.tokens == out.last.usage.completion_tokens == MAX_TOKENS, where
        else:
            assert out.cancelled_at is not None, where
            if out.way == "abort":
                assert out.abort_found, where  # found running by the other client's Abort
            assert out.last.finish_reason == common_pb2.FINISH_REASON_ABORTED, where
            assert out.tokens < VICTIM_MAX_TOKENS, where

    # No leftover state: the slot, the request index and the engine's own bookkeeping, as the
    # replica process reports them.
    wait_replica_idle(address, "chat", timeout=30)
    # Counted before the slot is released, so the numbers are final once inflight is 0.
    assert _counts(stub) == (served_before + STREAMS, aborted_before + CANCELLED)

    fresh = inf.ChatStart(model="chat", prompt="Hello", params=_params(8))
    responses = list(stub.Chat(iter([inf.ChatRequest(start=fresh)])))
    assert responses[-1].finished
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert responses[-1].usage.completion_tokens == 8


def test_deadline_counts_as_aborted(served: tuple[str, Any]) -> None:
    backend, worker = served
    address = worker.replica_address("chat")
    stub = inference_service_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    _, aborted_before = _counts(stub)
    # Engines clamp max_tokens to the room left in the context: this runs as long as it can.
    start = inf.ChatStart(model="chat", prompt="Hello", params=_params(2000))
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(iter([inf.ChatRequest(start=start)]), timeout=0.3))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_replica_idle(address, "chat", timeout=30)
    assert _counts(stub)[1] == aborted_before + 1, backend
