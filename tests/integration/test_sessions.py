"""ChatSession: many requests on one stream, against a real worker, engine and etcd.

Per-request semantics on a shared stream (cancel, Abort from another client, deadline, a bad
request), a stalled consumer beside fast ones, the SDK's one session per (loop, replica) for
the sync and the async API, and a session whose replica process is killed.
"""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmesh import ByzerLLM
from llmesh.common.errors import AlreadyExists, Unavailable
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import inference_service_pb2 as inf

from .conftest import Mesh, replica_stats, wait_replica_idle

HELLO = [{"role": "user", "content": "Tell me a long story about the sea."}]


def _params(max_tokens: int, **kw: Any) -> common_pb2.GenerationParams:
    """Greedy params; ignore_eos keeps the untrained test model generating to max_tokens."""
    p = common_pb2.GenerationParams(max_tokens=max_tokens, temperature=0.0, **kw)
    p.extra.update({"ignore_eos": True})
    return p


@pytest.fixture(scope="module")
def session_mesh(etcd_server: Any, test_model_dir: Path) -> Iterator[tuple[Mesh, ByzerLLM]]:
    """One worker with the chat model (8 slots) and an SDK client."""
    mesh = Mesh(etcd_server.endpoint, f"/llmesh-sessions-{uuid.uuid4().hex[:6]}")
    address = mesh.start_control_plane()
    mesh.start_worker("w0")
    llm = ByzerLLM(control_plane=address)
    llm.setup_num_workers(1).setup_infer_backend("transformers")
    llm.deploy(str(test_model_dir), "custom/llama", "chat", {"max_concurrency": 8})
    yield mesh, llm
    llm.close()
    mesh.close()


def _address(mesh: Mesh) -> str:
    return mesh.workers["w0"][0].replica_address("chat")


def _reference(stub: Any, prompt: str, max_tokens: int) -> str:
    """What one Chat call alone answers (greedy)."""
    requests = iter(
        [
            inf.ChatRequest(
                start=inf.ChatStart(model="chat", prompt=prompt, params=_params(max_tokens))
            )
        ]
    )
    return "".join(r.delta for r in stub.Chat(requests, timeout=60))


def test_requests_on_one_session_end_or_fail_alone(session_mesh: Any) -> None:
    mesh, _ = session_mesh
    address = _address(mesh)
    channel = grpc.insecure_channel(address)
    stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
    other_client = inference_service_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(address))
    prompts = {"ok-1": ("The sea is", 24), "ok-2": ("Once upon a time", 30)}
    expected = {rid: _reference(stub, p, n) for rid, (p, n) in prompts.items()}
    before = int(replica_stats(address, "chat")["aborted_requests"])

    def start(rid: str, prompt: str, params: common_pb2.GenerationParams, **kw: Any) -> Any:
        return inf.SessionStart(
            start=inf.ChatStart(model="chat", prompt=prompt, params=params, request_id=rid), **kw
        )

    outgoing: queue.Queue[inf.ChatSessionRequest | None] = queue.Queue()
    outgoing.put(
        inf.ChatSessionRequest(
            starts=[
                start("ok-1", "The sea is", _params(24)),
                start("cancel-me", "A story:", _params(1500)),
                start("abort-me", "Another story:", _params(1500)),
                start("late", "A late story:", _params(1500), timeout_ms=400),
                start("bad", "Bad", common_pb2.GenerationParams(temperature=-1, max_tokens=4)),
            ]
        )
    )
    call = stub.ChatSession(iter(outgoing.get, None), timeout=120)
    texts: dict[str, list[str]] = {}
    tokens: dict[str, int] = {}
    finals: dict[str, inf.ChatResponse] = {}
    errors: dict[str, inf.RequestError] = {}
    started_late = False
    for message in call:
        for d in message.deltas:
            assert d.request_id not in finals and d.request_id not in errors, "output after the end"
            texts.setdefault(d.request_id, []).append(d.delta)
            tokens[d.request_id] = tokens.get(d.request_id, 0) + len(d.token_ids)
            if d.finished:
                finals[d.request_id] = d
            if d.request_id == "cancel-me" and len(texts["cancel-me"]) == 1:
                outgoing.put(inf.ChatSessionRequest(cancels=["cancel-me"]))
            if d.request_id == "abort-me" and len(texts["abort-me"]) == 1:
                assert other_client.Abort(inf.AbortRequest(request_id="abort-me")).aborted
            if not started_late and "ok-1" in finals:
                # A request started on the same stream later, while others still run.
                started_late = True
                outgoing.put(
                    inf.ChatSessionRequest(starts=[start("ok-2", "Once upon a time", _params(30))])
                )
        for e in message.errors:
            assert e.request_id not in finals and e.request_id not in errors, "two ends"
            errors[e.request_id] = e
        if len(finals) + len(errors) == 6:
            outgoing.put(None)  # half-close: the stream ends once nothing runs
    assert call.code() == grpc.StatusCode.OK
    assert set(finals) == {"ok-1", "ok-2", "cancel-me", "abort-me"}, (finals, errors)
    assert set(errors) == {"late", "bad"}
    for rid, (_, n) in prompts.items():
        assert finals[rid].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert finals[rid].usage.completion_tokens == tokens[rid] == n
        assert "".join(texts[rid]) == expected[rid]
    for rid in ("cancel-me", "abort-me"):
        assert finals[rid].finish_reason == common_pb2.FINISH_REASON_ABORTED
        assert finals[rid].usage.completion_tokens == tokens[rid] < 1500
    assert errors["late"].code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert "deadline" in errors["late"].message
    assert errors["bad"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "temperature" in errors["bad"].message
    stats = wait_replica_idle(address, "chat")
    # Cancelled, aborted and past its deadline: three confirmed aborts, nothing left running.
    assert int(stats["aborted_requests"]) - before == 3
    assert stats["engine_active_requests"] == "0" and stats["tracked_request_ids"] == "0"
    channel.close()


def test_a_stalled_request_does_not_slow_the_others(session_mesh: Any) -> None:
    mesh, llm = session_mesh
    cfg = {"temperature": 0, "ignore_eos": True}

    async def main() -> tuple[list[Any], list[tuple[str, Any]]]:
        stalled = llm.async_stream_chat_oai(
            HELLO, model="chat", llm_config={**cfg, "max_length": 160}
        )
        first = await anext(stalled)  # running; now this caller stops reading

        async def fast() -> tuple[str, Any]:
            *_, last = [
                item
                async for item in llm.async_stream_chat_oai(
                    HELLO, model="chat", llm_config={**cfg, "max_length": 24}
                )
            ]
            return last

        # The fast requests end while the stalled one is not read at all.
        done = await asyncio.wait_for(asyncio.gather(*(fast() for _ in range(3))), 60)
        # Let the stalled request finish on the worker before reading it again.
        assert await asyncio.to_thread(mesh.wait_idle, 60)
        rest = [item async for item in stalled]
        await llm.aclose_async_channels()
        return [first, *rest], done

    stalled_items, fast_items = asyncio.run(main())
    for _, meta in fast_items:
        assert meta["finish_reason"] == "length" and meta["generated_tokens_count"] == 24
    text, meta = stalled_items[-1]
    assert meta["generated_tokens_count"] == 160 and meta["finish_reason"] == "length"
    # What the stalled caller did not read waited in its own inbox and came merged: the
    # whole backlog in one item, not one item per token.
    assert len(stalled_items) == 2, len(stalled_items)
    assert all(text.startswith(t) for t, _ in stalled_items)
    assert mesh.wait_idle(10)


def test_a_request_id_already_running_fails_alone(session_mesh: Any) -> None:
    mesh, llm = session_mesh
    rid = f"dup-{uuid.uuid4().hex[:6]}"
    cfg = {"temperature": 0, "ignore_eos": True, "request_id": rid}

    async def main() -> tuple[Any, BaseException | None]:
        first = llm.async_stream_chat_oai(HELLO, model="chat", llm_config={**cfg, "max_length": 64})
        await anext(first)
        second_error: BaseException | None = None
        try:
            async for _ in llm.async_stream_chat_oai(
                HELLO, model="chat", llm_config={**cfg, "max_length": 8}
            ):
                pass
        except AlreadyExists as exc:
            second_error = exc
        *_, last = [item async for item in first]
        await llm.aclose_async_channels()
        return last, second_error

    (_, meta), error = asyncio.run(asyncio.wait_for(main(), 60))
    assert isinstance(error, AlreadyExists) and rid in str(error)
    # The request already running keeps its output to the end.
    assert meta["generated_tokens_count"] == 64 and meta["finish_reason"] == "length"
    assert mesh.wait_idle(10)


def _open_sessions(mesh: Mesh) -> int:
    return int(replica_stats(_address(mesh), "chat")["open_sessions"])


def test_async_requests_share_one_session_per_loop(session_mesh: Any) -> None:
    mesh, llm = session_mesh
    cfg = {"temperature": 0, "max_length": 16, "ignore_eos": True}

    async def main() -> tuple[list[int], int]:
        async def one() -> int:
            n = 0
            async for _, meta in llm.async_stream_chat_oai(HELLO, model="chat", llm_config=cfg):
                n = meta["generated_tokens_count"]
            return n

        counts = await asyncio.gather(*(one() for _ in range(8)))
        # Sessions stay open until the client closes them: one per replica, not per request.
        during = await asyncio.to_thread(_open_sessions, mesh)
        await llm.aclose_async_channels()
        return list(counts), during

    counts, during = asyncio.run(main())
    assert counts == [16] * 8
    assert during == 1
    deadline = time.monotonic() + 5
    while _open_sessions(mesh) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _open_sessions(mesh) == 0  # closing the client's loop channels ended it


def test_sync_requests_share_the_io_threads_session(session_mesh: Any) -> None:
    mesh, llm = session_mesh
    cfg = {"temperature": 0, "max_length": 12, "ignore_eos": True}
    results: list[str] = []
    reference = llm.chat_oai(HELLO, model="chat", llm_config=cfg)[0].output

    def one(i: int) -> None:
        if i % 2:
            results.append(llm.chat_oai(HELLO, model="chat", llm_config=cfg)[0].output)
        else:
            *_, (text, _) = llm.stream_chat_oai(HELLO, model="chat", llm_config=cfg)
            results.append(text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [reference] * 8
    assert _open_sessions(mesh) == 1


def test_a_session_whose_replica_dies_fails_its_requests_and_the_next_opens_anew(
    session_mesh: Any,
) -> None:
    """SIGKILL the replica process under two streams: both fail at once with UNAVAILABLE
    (they had output, so no retry), nothing hangs, and once the agent restarted the replica a
    new request opens a new session and succeeds."""
    mesh, llm = session_mesh
    address = _address(mesh)
    pid = int(replica_stats(address, "chat")["pid"])
    cfg = {"temperature": 0, "max_length": 1500, "ignore_eos": True}

    async def main() -> list[BaseException | None]:
        streams = [llm.async_stream_chat_oai(HELLO, model="chat", llm_config=cfg) for _ in range(2)]
        for s in streams:
            await anext(s)
        os.kill(pid, signal.SIGKILL)

        async def drain(s: Any) -> BaseException | None:
            try:
                async for _ in s:
                    pass
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                return exc
            return None

        try:
            return await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), 30)
        finally:
            await llm.aclose_async_channels()

    outcomes = asyncio.run(main())
    assert all(isinstance(e, Unavailable) for e in outcomes), outcomes
    # The node agent restarts the replica; then a new session serves the next request.
    deadline = time.monotonic() + 120
    while True:
        try:
            (resp,) = llm.chat_oai(HELLO, model="chat", llm_config={"max_length": 4})
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert resp.metadata["generated_tokens_count"] >= 1
