"""Chat sessions: many requests on one ``InferenceService.ChatSession`` stream per replica.

A :class:`Session` is one stream to one replica process, opened on first use and shared by
every concurrent request of its event loop. Its reader takes each server message as it
arrives and hands every request its own deltas (an :class:`AsyncInbox` or a
:class:`ThreadInbox`), so one slow consumer never holds up the others: a request's unread
deltas simply pile up in its inbox until it reads them all at once. Starts and cancels queued
while a write is in flight go out together in the next message.

:class:`Sessions` keeps them per (event loop, address). The async API uses the caller's loop;
the sync API drives its sessions on the SDK's one I/O loop thread (:class:`IoLoop`). A broken
stream fails only the requests on it (with the status it broke with, so the transports' retry
rules apply) and the next request opens a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol

import grpc

from llmesh.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    LLMeshError,
    Unavailable,
    error_for_code,
    from_rpc_error,
)
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

log = logging.getLogger(__name__)

#: Largest per-request timeout the wire carries (``SessionStart.timeout_ms`` is a uint32).
MAX_TIMEOUT_MS = 2**32 - 1


class Inbox(Protocol):
    """Where a session puts one request's output; called on the session's loop."""

    def put(self, response: inf.ChatResponse) -> None: ...

    def fail(self, error: LLMeshError) -> None: ...


class AsyncInbox:
    """One request's unread output, read by a coroutine on the session's own loop."""

    __slots__ = ("_waiter", "error", "items")

    def __init__(self) -> None:
        self.items: list[inf.ChatResponse] = []
        self.error: LLMeshError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, response: inf.ChatResponse) -> None:
        self.items.append(response)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fail(self, error: LLMeshError) -> None:
        if self.error is None:
            self.error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self, deadline: float | None = None) -> list[inf.ChatResponse]:
        """Everything received since the last call; waits when there is nothing yet.

        Raises:
            LLMeshError: the request failed (after its earlier output was read).
            DeadlineExceeded: nothing came before ``deadline`` (``loop.time()``).
        """
        while not self.items and self.error is None:
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            try:
                if deadline is None:
                    await waiter
                else:
                    async with asyncio.timeout_at(deadline):
                        await waiter
            except TimeoutError:
                raise DeadlineExceeded(
                    "the worker sent nothing for this request before its deadline"
                ) from None
            finally:
                self._waiter = None
        items, self.items = self.items, []
        if not items:
            assert self.error is not None
            raise self.error
        return items


class ThreadInbox:
    """One request's unread output, read by a thread while the session runs on the I/O loop."""

    __slots__ = ("_error", "_queue")

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[inf.ChatResponse | LLMeshError] = queue.SimpleQueue()
        self._error: LLMeshError | None = None

    def put(self, response: inf.ChatResponse) -> None:
        self._queue.put(response)

    def fail(self, error: LLMeshError) -> None:
        self._queue.put(error)

    def next(self, timeout: float | None = None) -> list[inf.ChatResponse]:
        """Everything received since the last call; blocks when there is nothing yet.

        Raises:
            LLMeshError: the request failed (after its earlier output was read).
            DeadlineExceeded: nothing came within ``timeout`` seconds.
        """
        if self._error is not None:
            raise self._error
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise DeadlineExceeded(
                "the worker sent nothing for this request before its deadline"
            ) from None
        items: list[inf.ChatResponse] = []
        while True:
            if isinstance(item, LLMeshError):
                self._error = item
                break
            items.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if not items:
            assert self._error is not None
            raise self._error
        return items


class Session:
    """One ChatSession stream to one replica process, on the loop that opened it.

    Args:
        stub: a grpc.aio stub for the replica's address.
        address: ``host:port``, for messages.
        on_close: called once when the stream ends, so its pool forgets it.
    """

    def __init__(
        self,
        stub: inf_grpc.InferenceServiceStub,
        address: str,
        on_close: Callable[[Session], None],
    ) -> None:
        self.address = address
        self._on_close = on_close
        self._inboxes: dict[str, Inbox] = {}
        self._starts: list[inf.SessionStart] = []
        self._cancels: list[str] = []
        self._outgoing = asyncio.Event()
        self.closed = False
        self._closing = False  # this client ends the stream (not the worker)
        # Requests go out through an iterator that ends with the session. (With write(), a
        # channel with interceptors (a token) makes grpc.aio write from its own task, which
        # waits forever once the worker ends the stream, until the collector destroys it.)
        self._call = stub.ChatSession(self._requests())
        self._reader = asyncio.create_task(self._read(), name=f"llmesh-session-r-{address}")

    def start(
        self,
        start: inf.ChatStart,
        inbox: Inbox,
        *,
        timeout: float | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        """Start a request on the session; its output goes to ``inbox``.

        Args:
            start: the request; its ``request_id`` must be set and unique on the session.
            inbox: where its deltas, final message or error go.
            timeout: seconds the worker lets it run; None for no limit.
            trace_context: the caller's trace context for this request.
        """
        if self.closed:
            inbox.fail(Unavailable(f"the session to {self.address} is closed; retry"))
            return
        request_id = start.request_id
        if request_id in self._inboxes:
            # The server would refuse it too, under the same id as the running request: answer
            # here, so the running one keeps its output.
            inbox.fail(
                AlreadyExists(
                    f"request id {request_id!r} is already running on this client; use a "
                    "unique request_id"
                )
            )
            return
        item = inf.SessionStart(start=start)
        if trace_context:
            item.trace_context.update(trace_context)
        if timeout is not None:
            item.timeout_ms = min(max(1, int(timeout * 1000)), MAX_TIMEOUT_MS)
        self._inboxes[request_id] = inbox
        self._starts.append(item)
        self._outgoing.set()

    def cancel(self, request_id: str, inbox: Inbox) -> None:
        """Ask the worker to stop a request; it answers with a final ABORTED message.

        Args:
            request_id: the request.
            inbox: the inbox it was started with (another caller's request may use the id).
        """
        if not self.closed and self._inboxes.get(request_id) is inbox:
            self._cancels.append(request_id)
            self._outgoing.set()

    def forget(self, request_id: str, inbox: Inbox) -> None:
        """Stop delivering a request's output (it finished, failed or its caller left)."""
        if self._inboxes.get(request_id) is inbox:
            del self._inboxes[request_id]

    async def _requests(self) -> AsyncIterator[inf.ChatSessionRequest]:
        # grpc.aio's writer task consumes this; a failed write ends that task, and the reader
        # sees the stream end and fails what is left.
        while not self.closed:
            await self._outgoing.wait()
            self._outgoing.clear()
            if self.closed:
                return
            if not self._starts and not self._cancels:
                continue
            message = inf.ChatSessionRequest(starts=self._starts, cancels=self._cancels)
            self._starts, self._cancels = [], []
            yield message

    async def _read(self) -> None:
        error: LLMeshError = Unavailable(
            f"the session to {self.address} ended without final messages for its requests"
        )
        try:
            inboxes = self._inboxes
            async for message in self._call:
                for delta in message.deltas:
                    inbox = inboxes.get(delta.request_id)
                    if inbox is not None:
                        inbox.put(delta)
                        if delta.finished:
                            del inboxes[delta.request_id]
                for failure in message.errors:
                    inbox = inboxes.pop(failure.request_id, None)
                    if inbox is not None:
                        inbox.fail(error_for_code(failure.code, failure.message))
                    else:
                        log.warning("request %r failed: %s", failure.request_id, failure.message)
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, Cancelled) and not self._closing:
                # The worker ended the stream (it is stopping): as retryable as a lost worker.
                error = Unavailable(f"the worker at {self.address} closed the session: {error}")
        except asyncio.CancelledError:
            error = Cancelled("the client closed its session")
            raise
        finally:
            self._close(error)

    def _close(self, error: LLMeshError) -> None:
        if self.closed:
            return
        self.closed = True
        self._on_close(self)
        inboxes, self._inboxes = self._inboxes, {}
        for inbox in inboxes.values():
            inbox.fail(error)
        self._outgoing.set()  # ends the request iterator, and grpc's task that reads it
        self._call.cancel()

    async def aclose(self) -> None:
        """End the stream; requests still on it fail with CANCELLED."""
        self._closing = True
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._close(Cancelled("the client closed its session"))


class Sessions:
    """Sessions per (event loop, address), opened on first use.

    Args:
        stub_for: a grpc.aio stub for an address on the running loop.
    """

    def __init__(self, stub_for: Callable[[str], inf_grpc.InferenceServiceStub]) -> None:
        self._stub_for = stub_for
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Session]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, address: str) -> Session:
        """The running loop's open session to ``address``."""
        loop = asyncio.get_running_loop()
        with self._lock:
            sessions = self._by_loop.setdefault(loop, {})
            session = sessions.get(address)
        if session is None or session.closed:
            session = Session(self._stub_for(address), address, self._forget)
            with self._lock:
                sessions[address] = session
        return session

    def existing(self, address: str) -> Session | None:
        """The running loop's open session to ``address``, if there is one."""
        with self._lock:
            session = self._by_loop.get(asyncio.get_running_loop(), {}).get(address)
        return session if session is not None and not session.closed else None

    def _forget(self, session: Session) -> None:
        with self._lock:
            for sessions in self._by_loop.values():
                if sessions.get(session.address) is session:
                    del sessions[session.address]

    async def close(self) -> None:
        """End the running loop's sessions."""
        with self._lock:
            sessions = self._by_loop.pop(asyncio.get_running_loop(), {})
        for session in list(sessions.values()):
            await session.aclose()


class IoLoop:
    """The SDK's I/O thread: one event loop that runs the sync API's sessions.

    Started on first use; a daemon thread, so it never keeps a process alive.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop soon (from any thread); starts the loop on first use.

        Raises:
            FailedPrecondition: the client was closed.
        """
        with self._lock:  # held so that close() cannot stop the loop between check and call
            if self._closed:
                raise FailedPrecondition("this ByzerLLM client is closed; create a new one")
            if self._loop is None or self._pid != os.getpid():
                # First use, or a forked child: the parent's thread did not come along.
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="llmesh-io", daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
            self._loop.call_soon_threadsafe(fn, *args)

    def close(self, cleanup: Callable[[], Any] | None = None) -> None:
        """Run ``cleanup()`` (a coroutine function) on the loop, then stop it."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._closed = True
        if loop is None or thread is None:
            return
        if cleanup is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(cleanup(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        if not thread.is_alive():
            loop.close()


def remaining(deadline: float | None) -> float | None:
    """Seconds left until ``deadline`` (``time.monotonic()``), at least 0; None stays None."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


__all__ = [
    "AsyncInbox",
    "Inbox",
    "IoLoop",
    "Session",
    "Sessions",
    "ThreadInbox",
    "remaining",
]
