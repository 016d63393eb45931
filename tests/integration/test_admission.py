"""A replica's admission queue: requests over max_concurrency wait in line instead of bouncing.

One real worker, the transformers engine with 2 slots and a queue of 6, driven over a raw
ChatSession (exact order of starts) and through the SDK.
"""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh import ByzerLLM
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, replica_stats, wait_replica_idle

SLOTS, QUEUE = 2, 6


def _params(max_tokens: int) -> common_pb2.GenerationParams:
    p = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0)
    p.extra.update({"ignore_eos": True})
    return p


@pytest.fixture(scope="module")
def queued_mesh(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM, str]]:
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-admission-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0")
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(1).setup_infer_backend("transformers")
    llm.deploy(
        str(test_model_dir),
        "custom/llama",
        "chat",
        {"max_concurrency": SLOTS, "max_queue": QUEUE, "queue_timeout": 2},
    )
    yield mesh, llm, mesh.workers["w0"][0].replica_address("chat")
    llm.close()
    mesh.close()


class Session:
    """A raw ChatSession whose messages are read on demand."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        stub = inference_service_pb2_grpc.InferenceServiceStub(self.channel)
        self.outgoing: queue.Queue[inf.ChatSessionRequest | None] = queue.Queue()
        self.call = stub.ChatSession(iter(self.outgoing.get, None), timeout=120)
        self.events: list[tuple[str, str]] = []  # (request id, "delta" / "final" / "error")
        self.finals: dict[str, inf.ChatResponse] = {}
        self.errors: dict[str, inf.RequestError] = {}

    def start(self, rid: str, max_tokens: int, timeout_ms: int = 0) -> None:
        start = inf.ChatStart(model="chat", prompt="Tell me", params=_params(max_tokens))
        start.request_id = rid
        self.outgoing.put(
            inf.ChatSessionRequest(starts=[inf.SessionStart(start=start, timeout_ms=timeout_ms)])
        )

    def cancel(self, rid: str) -> None:
        self.outgoing.put(inf.ChatSessionRequest(cancels=[rid]))

    def until(self, done: Any) -> None:
        """Read messages until ``done()`` holds."""
        while not done():
            message = next(self.call)
            for d in message.deltas:
                self.events.append((d.request_id, "final" if d.finished else "delta"))
                if d.finished:
                    self.finals[d.request_id] = d
            for e in message.errors:
                self.events.append((e.request_id, "error"))
                self.errors[e.request_id] = e

    def first(self, rid: str) -> int:
        return next(i for i, (r, _) in enumerate(self.events) if r == rid)

    def close(self) -> None:
        self.outgoing.put(None)
        self.channel.close()


def _published_queue(llm: ByzerLLM) -> int:
    return sum(r.queued for r in llm.get_model("chat").replicas)


def _wait(predicate: Any, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_requests_wait_in_fifo_order_and_a_full_queue_refuses(queued_mesh: Any) -> None:
    _, llm, address = queued_mesh
    s = Session(address)
    served_before = int(replica_stats(address, "chat")["served_requests"])
    s.start("run-0", 1500)
    s.start("run-1", 1500)
    s.until(lambda: {r for r, _ in s.events} >= {"run-0", "run-1"})
    for i in range(QUEUE):
        s.start(f"q{i}", 4)
    _wait(lambda: replica_stats(address, "chat")["queued_requests"] == str(QUEUE), "queued")
    # The queue depth reaches the control plane with the in-flight counts (routing sees it).
    _wait(lambda: _published_queue(llm) == QUEUE, "queue depth published")
    s.start("one-too-many", 4)
    s.until(lambda: "one-too-many" in s.errors)
    full = s.errors["one-too-many"]
    assert full.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"max_queue {QUEUE}" in full.message and "back off about" in full.message
    # A queued request that is cancelled leaves the queue at once, without reaching the engine.
    s.cancel("q2")
    s.until(lambda: "q2" in s.finals)
    assert s.finals["q2"].finish_reason == common_pb2.FINISH_REASON_ABORTED
    assert s.finals["q2"].usage.completion_tokens == 0
    assert not any(r.startswith("q") and r != "q2" for r, _ in s.events)
    # One slot frees: the head of the line gets it, and each next one only when one frees.
    s.cancel("run-0")
    s.until(lambda: all(f"q{i}" in s.finals for i in (0, 1, 3, 4, 5)) or "run-1" in s.finals)
    s.cancel("run-1")
    s.until(lambda: "run-1" in s.finals and all(f"q{i}" in s.finals for i in (0, 1, 3, 4, 5)))
    order = ["q0", "q1", "q3", "q4", "q5"]
    firsts = [s.first(r) for r in order]
    assert firsts == sorted(firsts), s.events
    for r in order:
        assert s.finals[r].usage.completion_tokens == 4
    s.close()
    stats = wait_replica_idle(address, "chat")
    # run-0, run-1 and five of the queued requests reached the engine; q2 and the refused one
    # did not.
    assert int(stats["served_requests"]) - served_before == 7
    assert stats["queued_requests"] == "0"
    _wait(lambda: _published_queue(llm) == 0, "queue depth back to 0")


def test_a_queued_request_ends_at_its_deadline_or_the_queue_timeout(queued_mesh: Any) -> None:
    _, _, address = queued_mesh
    s = Session(address)
    s.start("run-0", 1500)
    s.start("run-1", 1500)
    s.until(lambda: {r for r, _ in s.events} >= {"run-0", "run-1"})
    # Two more long requests wait ahead of the two below, so those cannot get a slot before a
    # whole long request has run after the first two (1,500 tokens take 1.2-2 s here: the first
    # two alone may end within the 2 s queue_timeout on a fast, idle machine).
    s.start("next-0", 1500)
    s.start("next-1", 1500)
    s.start("short-deadline", 4, timeout_ms=300)
    s.start("patient", 4)  # no deadline of its own: the queue_timeout (2 s) ends its wait
    s.until(lambda: {"short-deadline", "patient"} <= set(s.errors))
    assert s.errors["short-deadline"].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    patient = s.errors["patient"]
    assert patient.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "waited 2 s in the queue" in patient.message
    # The expired two left the queue: once the long ones behind the first two are gone
    # (cancelled, or past their own 2 s in the queue), nothing waits.
    s.cancel("next-0")
    s.cancel("next-1")
    s.until(lambda: {"next-0", "next-1"} <= set(s.finals) | set(s.errors))
    assert replica_stats(address, "chat")["queued_requests"] == "0"
    s.cancel("run-0")
    s.cancel("run-1")
    s.until(lambda: {"run-0", "run-1"} <= set(s.finals))
    s.close()
    wait_replica_idle(address, "chat")


def test_four_times_the_slots_through_the_sdk_all_succeed(queued_mesh: Any) -> None:
    """4x more concurrent requests than slots, with a generous deadline: none fails."""
    _, llm, address = queued_mesh
    cfg = {"max_length": 8, "temperature": 0, "ignore_eos": True, "timeout_s": 60}

    async def one() -> int:
        items = [
            item
            async for item in llm.async_stream_chat_oai(
                [{"role": "user", "content": "hi"}], model="chat", llm_config=cfg
            )
        ]
        return int(items[-1][1]["generated_tokens_count"])

    async def main() -> list[int]:
        try:
            return await asyncio.gather(*(one() for _ in range(4 * SLOTS)))
        finally:
            await llm.aclose_async_channels()

    assert asyncio.run(main()) == [8] * (4 * SLOTS)
    wait_replica_idle(address, "chat")
