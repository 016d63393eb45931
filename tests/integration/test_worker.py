"""Inference worker against a real control plane, etcd and transformers engine.

Cancellation, abort, disconnects, deadlines, capacity and input errors, over real gRPC.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from llmesh.v1 import common_pb2, control_plane_service_pb2_grpc, inference_service_pb2_grpc
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, replica_stats, wait_replica_idle


def _params(max_tokens: int, *, ignore_eos: bool = True) -> common_pb2.GenerationParams:
    """Greedy params; ignore_eos keeps the untrained test model generating to max_tokens."""
    p = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0)
    p.extra.update({"ignore_eos": ignore_eos})
    return p


LONG = _params(1500)  # a second or more on CPU: long enough to cancel mid-stream


@pytest.fixture(scope="module")
def served(etcd_server: Any, test_model_dir: Any) -> Iterator[tuple[Mesh, Any]]:
    """One worker hosting the chat model with max_concurrency 2."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-worker-{uuid.uuid4().hex[:6]}")
    mesh.start_control_plane()
    worker = mesh.start_worker("w-a")
    stub = control_plane_service_pb2_grpc.ControlPlaneServiceStub(
        grpc.insecure_channel(mesh.address())
    )
    model = cp.Model(name="chat", model_path=str(test_model_dir), backend="transformers")
    model.infer_params["max_concurrency"] = "2"
    stub.DeployModel(cp.DeployModelRequest(model=model, wait_ready=True, timeout_seconds=120))
    yield mesh, worker
    mesh.close()


@pytest.fixture
def stub(served: tuple[Mesh, Any]) -> inference_service_pb2_grpc.InferenceServiceStub:
    _, worker = served
    return inference_service_pb2_grpc.InferenceServiceStub(
        grpc.insecure_channel(worker.replica_address("chat"))
    )


def _wait_idle(served: tuple[Mesh, Any], timeout: float = 10) -> dict[str, str]:
    _, worker = served
    return wait_replica_idle(worker.replica_address("chat"), "chat", timeout)


class ChatCall:
    """A bidi Chat call whose request side stays open until told otherwise."""

    def __init__(self, stub: Any, start: inf.ChatStart, **kwargs: Any) -> None:
        self.requests: queue.Queue[inf.ChatRequest | None] = queue.Queue()
        self.requests.put(inf.ChatRequest(start=start))
        self.call = stub.Chat(iter(self.requests.get, None), **kwargs)

    def cancel_message(self) -> None:
        self.requests.put(inf.ChatRequest(cancel=inf.ChatCancel()))

    def close_requests(self) -> None:
        self.requests.put(None)


def _start(prompt: str = "Hello there, tell me a story", **kw: Any) -> inf.ChatStart:
    kw.setdefault("params", LONG)
    return inf.ChatStart(model="chat", prompt=prompt, **kw)


def test_chat_streams_deltas_then_final(stub: Any, served: Any) -> None:
    start = inf.ChatStart(
        model="chat",
        messages=[common_pb2.ChatMessage(role="user", content="hi")],
        params=common_pb2.GenerationParams(max_tokens=12, temperature=0.0),
        request_id="r-stream",
    )
    c = ChatCall(stub, start)
    responses = list(c.call)
    c.close_requests()
    final = responses[-1]
    assert final.finished and final.request_id == "r-stream"
    assert final.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
    assert final.usage.completion_tokens == sum(len(r.token_ids) for r in responses)
    assert final.usage.prompt_tokens > 0
    assert all(not r.finished for r in responses[:-1])
    _wait_idle(served)


def test_cancel_message_frees_slot(stub: Any, served: Any) -> None:
    c = ChatCall(stub, _start(request_id="r-cancel"))
    first = next(c.call)
    assert not first.finished
    c.cancel_message()
    rest = list(c.call)
    c.close_requests()
    assert rest[-1].finished
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORTED
    _wait_idle(served)


def test_abort_by_id_from_another_client(stub: Any, served: Any) -> None:
    rid = f"r-{uuid.uuid4().hex[:6]}"
    c = ChatCall(stub, _start(request_id=rid))
    next(c.call)
    other = inference_service_pb2_grpc.InferenceServiceStub(
        grpc.insecure_channel(served[1].replica_address("chat"))
    )
    assert other.Abort(inf.AbortRequest(request_id=rid)).aborted
    rest = list(c.call)
    c.close_requests()
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORTED
    _wait_idle(served)
    assert not other.Abort(inf.AbortRequest(request_id=rid)).aborted


def test_client_disconnect_frees_slot(stub: Any, served: Any) -> None:
    c = ChatCall(stub, _start())
    next(c.call)
    c.call.cancel()
    c.close_requests()
    _wait_idle(served)


def test_deadline_frees_slot(stub: Any, served: Any) -> None:
    c = ChatCall(stub, _start(params=_params(2000)), timeout=0.3)
    with pytest.raises(grpc.RpcError) as err:
        list(c.call)
    c.close_requests()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_idle(served)


def test_over_capacity_waits_in_line_for_a_free_slot(stub: Any, served: Any) -> None:
    _, worker = served
    address = worker.replica_address("chat")
    held = [ChatCall(stub, _start()) for _ in range(2)]
    for h in held:
        next(h.call)
    extra = ChatCall(stub, _start(params=_params(4)))
    deadline = time.monotonic() + 10
    while replica_stats(address, "chat")["queued_requests"] != "1":
        assert time.monotonic() < deadline, "the third request never queued"
        time.sleep(0.05)
    held[0].cancel_message()  # a slot frees: the queued request takes it
    responses = list(extra.call)
    extra.close_requests()
    assert responses[-1].finished and responses[-1].usage.completion_tokens == 4
    for h in held:
        h.call.cancel()
        h.close_requests()
    _wait_idle(served)


@pytest.mark.parametrize(
    ("start", "code", "words"),
    [
        (inf.ChatStart(model="nope", prompt="x"), grpc.StatusCode.NOT_FOUND, "nope"),
        (
            inf.ChatStart(
                model="chat", prompt="x", params=common_pb2.GenerationParams(temperature=-1)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            inf.ChatStart(model="chat", prompt="word " * 5000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "token",
        ),
        (inf.ChatStart(model="chat"), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            inf.ChatStart(
                model="chat", messages=[common_pb2.ChatMessage(role="robot", content="x")]
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
    ],
    ids=["unknown-model", "bad-temperature", "over-long-prompt", "no-prompt", "bad-role"],
)
def test_bad_requests_get_clear_codes(
    stub: Any, served: Any, start: inf.ChatStart, code: grpc.StatusCode, words: str
) -> None:
    c = ChatCall(stub, start)
    with pytest.raises(grpc.RpcError) as err:
        list(c.call)
    c.close_requests()
    assert err.value.code() == code
    assert words in err.value.details()
    _wait_idle(served)


def test_empty_chat_stream_is_invalid_argument(stub: Any) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Chat(iter(())))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_generate_many_prompts_in_waves(stub: Any, served: Any) -> None:
    # Five prompts on a replica with two slots: they run two at a time, none is refused.
    resp = stub.Generate(
        inf.GenerateRequest(
            model="chat",
            prompts=[f"prompt {i}" for i in range(5)],
            params=common_pb2.GenerationParams(max_tokens=4, temperature=0.0),
        )
    )
    assert len(resp.generations) == 5
    assert all(g.usage.completion_tokens >= 1 for g in resp.generations)
    _wait_idle(served)


def test_tokenize_template_meta(stub: Any) -> None:
    tok = stub.Tokenize(inf.TokenizeRequest(model="chat", text="hello world"))
    assert tok.token_ids and len(tok.tokens) == len(tok.token_ids)
    rendered = stub.ApplyChatTemplate(
        inf.ApplyChatTemplateRequest(
            model="chat",
            messages=[common_pb2.ChatMessage(role="user", content="hello")],
            add_generation_prompt=True,
        )
    )
    assert "hello" in rendered.prompt
    meta = stub.GetModelMeta(inf.GetModelMetaRequest(model="chat"))
    assert meta.backend == "transformers"
    assert "LlamaForCausalLM" in meta.architectures
    assert meta.max_model_len > 0 and meta.support_stream and meta.support_chat_template
    assert meta.max_concurrency == 2


def test_inflight_is_published_to_etcd(served: Any, stub: Any) -> None:
    mesh, _ = served
    cps = control_plane_service_pb2_grpc.ControlPlaneServiceStub(
        grpc.insecure_channel(mesh.address())
    )
    c = ChatCall(stub, _start())
    next(c.call)
    deadline = time.monotonic() + 5
    seen = -1
    # Earlier tests' counts may still be in flight to etcd: wait for exactly this request.
    while time.monotonic() < deadline and seen != 1:
        (replica,) = cps.GetModel(cp.GetModelRequest(name="chat")).model.replicas
        seen = replica.inflight
        time.sleep(0.05)
    c.call.cancel()
    c.close_requests()
    assert seen == 1
    _wait_idle(served)


def test_reflection_and_health(served: Any) -> None:
    _, worker = served
    channel = grpc.insecure_channel(worker.replica_address("chat"))
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="llmesh.v1.InferenceService"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    # Per model: the READY model this process serves.
    status = health.Check(health_pb2.HealthCheckRequest(service="chat"))
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (resp,) = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in resp.list_services_response.service}
    assert {"llmesh.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_concurrent_streams_do_not_block_each_other(stub: Any, served: Any) -> None:
    results: list[list[inf.ChatResponse]] = []

    def run() -> None:
        c = ChatCall(
            stub, _start(params=common_pb2.GenerationParams(max_tokens=8, temperature=0.0))
        )
        results.append(list(c.call))
        c.close_requests()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and all(r[-1].finished for r in results)
    _wait_idle(served)


def test_stalled_client_gets_merged_messages_and_never_slows_another(
    stub: Any, served: Any
) -> None:
    """A client that stops reading: its stream merges deltas, other clients stream on.

    The stalled client advertises a small HTTP/2 window, so the worker's writes to it block
    after a few messages; the engine keeps generating into the request's bounded collector,
    and when the client reads again it gets the backlog merged into few messages.
    """
    _, worker = served
    stalled_channel = grpc.insecure_channel(
        worker.replica_address("chat"),
        options=[("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)],
    )
    stalled_stub = inference_service_pb2_grpc.InferenceServiceStub(stalled_channel)
    stalled = ChatCall(stalled_stub, _start(params=_params(600)))
    received = [next(stalled.call)]  # the stream is running; now stop reading
    # While the stalled client reads nothing, another client's requests stream to the end.
    for _ in range(3):
        other = ChatCall(stub, _start(params=_params(48)))
        messages = list(other.call)
        other.close_requests()
        assert messages[-1].finished and messages[-1].usage.completion_tokens == 48
    received.extend(stalled.call)
    stalled.close_requests()
    final = received[-1]
    assert final.finished and final.usage.completion_tokens == 600
    text = "".join(m.delta for m in received)
    assert text and sum(len(m.token_ids) for m in received) == 600
    # The backlog built up while the client stalled arrives merged: one message carries
    # dozens of tokens (a client that keeps reading gets one or two per message).
    biggest = max(len(m.token_ids) for m in received)
    assert biggest >= 32, f"largest message held {biggest} tokens: the backlog was not merged"
    stalled_channel.close()
    _wait_idle(served)
