"""The pieces of a ChatSession that need no server: the worker's outbox, the SDK's inboxes."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmesh.common.errors import DeadlineExceeded, InvalidArgument, Unavailable
from llmesh.inference_worker.chat_runs import Outbox
from llmesh.inference_worker.engines.base import GenerationChunk
from llmesh.sdk.sessions import AsyncInbox, ThreadInbox
from llmesh.v1 import common_pb2
from llmesh.v1 import inference_service_pb2 as inf


def test_the_outbox_merges_each_requests_deltas_until_taken() -> None:
    async def main() -> tuple[inf.ChatSessionResponse, inf.ChatSessionResponse]:
        box = Outbox()
        box.add("a", GenerationChunk(delta="He", token_ids=[1]))
        box.add("b", GenerationChunk(delta="X", token_ids=[7]))
        box.add("a", GenerationChunk(delta="llo", token_ids=[2, 3]))
        box.add("a", GenerationChunk(delta="!", token_ids=[4]))
        box.fail("c", InvalidArgument("temperature=-1 is out of range"))
        first = await box.take()
        assert not box.pending()
        box.add(
            "b",
            GenerationChunk(
                delta="Y",
                token_ids=[8],
                finish_reason="length",
                prompt_tokens=5,
                completion_tokens=2,
            ),
        )
        second = await asyncio.wait_for(box.take(), 1)
        return first, second

    first, second = asyncio.run(main())
    # One entry per request per message, in the order requests first produced output.
    assert [(d.request_id, d.delta, list(d.token_ids)) for d in first.deltas] == [
        ("a", "Hello!", [1, 2, 3, 4]),
        ("b", "X", [7]),
    ]
    assert not any(d.finished for d in first.deltas)
    (error,) = first.errors
    assert error.request_id == "c" and error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "temperature" in error.message
    (final,) = second.deltas
    assert final.finished and final.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert final.usage.completion_tokens == 2 and final.usage.total_tokens == 7


def _delta(text: str, finished: bool = False) -> inf.ChatResponse:
    return inf.ChatResponse(request_id="r", delta=text, token_ids=[1], finished=finished)


def test_an_async_inbox_hands_over_everything_then_the_error() -> None:
    async def main() -> None:
        inbox = AsyncInbox()
        inbox.put(_delta("a"))
        inbox.put(_delta("b"))
        inbox.fail(Unavailable("worker gone"))
        assert [r.delta for r in await inbox.next()] == ["a", "b"]
        with pytest.raises(Unavailable, match="worker gone"):
            await inbox.next()
        waiting = AsyncInbox()
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, waiting.put, _delta("late"))
        assert [r.delta for r in await waiting.next()] == ["late"]
        with pytest.raises(DeadlineExceeded):
            await waiting.next(loop.time() + 0.02)

    asyncio.run(main())


def test_a_thread_inbox_hands_over_everything_then_the_error() -> None:
    inbox = ThreadInbox()
    inbox.put(_delta("a"))
    inbox.put(_delta("b", finished=True))
    assert [r.delta for r in inbox.next(1)] == ["a", "b"]
    inbox.put(_delta("c"))
    inbox.fail(Unavailable("worker gone"))
    assert [r.delta for r in inbox.next(1)] == ["c"]
    with pytest.raises(Unavailable, match="worker gone"):
        inbox.next(1)
    with pytest.raises(DeadlineExceeded):
        ThreadInbox().next(0.01)
