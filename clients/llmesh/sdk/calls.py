"""gRPC call helpers for the transports: Chat calls with their cancel path, and a bridge.

:class:`ChatCall` is one sync bidi ``InferenceService.Chat`` call whose request side stays open
for a later cancel; :func:`cancel_aio_call` is that cancel for a grpc.aio call;
:func:`iterate_in_thread` lets asyncio code consume any blocking iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from llmesh.common.errors import LLMeshError
from llmesh.route_cache import rpc_errors
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

T = TypeVar("T")

#: How long closing a stream early waits for the worker's final (ABORTED) message before the
#: RPC itself is cancelled.
CANCEL_GRACE_S = 2.0

_DONE = object()


async def iterate_in_thread(iterator: Iterator[T]) -> AsyncIterator[T]:
    """Consume a blocking iterator on a helper thread and yield its items on the event loop.

    Leaving early closes the iterator (on the helper thread, once it hands over its next
    item), so a stream is cancelled on the worker.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any, exc: BaseException | None = None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            loop.call_soon_threadsafe(items.put_nowait, (item, exc))

    def pump() -> None:
        try:
            for item in iterator:
                if stop.is_set():
                    break
                put(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
            put(_DONE, exc)
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put(_DONE)

    thread = threading.Thread(target=pump, name="llmesh-aio-stream", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = await items.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


class ChatCall:
    """One ``InferenceService.Chat`` call whose request side is fed from a queue.

    The start message goes first; a cancel can be queued later on the same stream. The request
    side stays open until :meth:`end_requests`, so the worker never mistakes the end of our
    input for the end of our interest.
    """

    def __init__(
        self,
        stub: inf_grpc.InferenceServiceStub,
        start: inf.ChatStart,
        *,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self._requests: queue.SimpleQueue[inf.ChatRequest | None] = queue.SimpleQueue()
        self._requests.put(inf.ChatRequest(start=start))
        self._ended = False
        self.call = stub.Chat(self._request_iterator(), timeout=timeout, metadata=metadata)

    def _request_iterator(self) -> Iterator[inf.ChatRequest]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def end_requests(self) -> None:
        """Half-close the request side (lets grpc's sender thread finish)."""
        if not self._ended:
            self._ended = True
            self._requests.put(None)

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Stop the request on the worker: send ChatCancel, wait briefly, then cancel the RPC.

        The cancel message lets the worker abort the engine request and answer with its final
        message; cancelling the RPC afterwards covers a worker that does not answer in time
        (the worker sees the RPC cancelled either way).
        """
        if self.call.done():
            self.end_requests()
            return
        self._requests.put(inf.ChatRequest(cancel=inf.ChatCancel()))
        timer = threading.Timer(grace, self.call.cancel)
        timer.daemon = True
        timer.start()
        try:
            with contextlib.suppress(LLMeshError), rpc_errors():
                for response in self.call:
                    if response.finished:
                        break
        finally:
            timer.cancel()
            self.end_requests()
            self.call.cancel()  # no-op when the RPC already ended


async def cancel_aio_call(call: Any, grace: float = CANCEL_GRACE_S) -> None:
    """Send ChatCancel, wait briefly for the worker's final message, then cancel the RPC."""
    if call.done():
        return

    async def final_message() -> None:
        async for response in call:
            if response.finished:
                return

    try:
        await call.write(inf.ChatRequest(cancel=inf.ChatCancel()))
        await asyncio.wait_for(final_message(), grace)
    except (grpc.RpcError, asyncio.TimeoutError, grpc.aio.UsageError):
        pass  # the RPC is cancelled below either way
    finally:
        call.cancel()
