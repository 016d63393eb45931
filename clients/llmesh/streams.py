"""Chat streams and result shaping for :class:`~llmesh.client.ByzerLLM`.

The bidi ``InferenceService.Chat`` call with its cancel path, retry bookkeeping across
replicas, the accumulation of a stream into text plus Byzer-LLM metadata, the shapes of rerank
and meta results, and the bridge that lets asyncio code consume a blocking stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, TypeVar

import grpc

from llmesh.common.errors import (
    InvalidArgument,
    LLMeshError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
)
from llmesh.common.grpc_server import CHANNEL_OPTIONS
from llmesh.common.tracing import client_span
from llmesh.route_cache import ReplicaId, RouteCache, replica_id, rpc_errors
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long closing a stream early waits for the worker's final (ABORTED) message before the
#: RPC itself is cancelled.
CANCEL_GRACE_S = 2.0

FINISH_REASONS: dict[int, str | None] = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    # OpenAI (and so most user code) reports a matched stop string as a plain stop.
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_ABORTED: "abort",
}

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


class _ChatCall:
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


class _Attempts:
    """Retry bookkeeping for one request.

    UNAVAILABLE before any output: the worker is marked down and the request is retried once
    on another replica. RESOURCE_EXHAUSTED: every other READY replica is tried in turn. When no
    replica is left, the last worker error is raised.
    """

    def __init__(self) -> None:
        self.tried: set[ReplicaId] = set()
        self.retried_unavailable = False
        self.last_error: LLMeshError | None = None

    def failed(self, routes: RouteCache, replica: common_pb2.Replica, exc: LLMeshError) -> None:
        """Record a failed attempt; re-raise ``exc`` when no retry is allowed."""
        self.tried.add(replica_id(replica))
        if isinstance(exc, Unavailable):
            routes.mark_down(replica.address)
            if self.retried_unavailable:
                raise exc
            self.retried_unavailable = True
        elif not isinstance(exc, ResourceExhausted):
            raise exc
        log.debug("replica %s of %s failed (%s); trying another", replica.index, replica.model, exc)
        self.last_error = exc


def _name_worker(replica: common_pb2.Replica, exc: LLMeshError) -> LLMeshError:
    """Say which worker was unreachable; grpc's own message names only a socket error."""
    if not isinstance(exc, Unavailable):
        return exc
    named = Unavailable(
        f"worker {replica.worker_id or '?'} at {replica.address} "
        f"(model {replica.model!r} replica {replica.index}) is unavailable: {exc}"
    )
    named.__cause__ = exc.__cause__
    return named


class _Progress:
    """Accumulates a Chat stream into text and Byzer-LLM metadata."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.parts: list[str] = []
        self.generated = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.finished = False

    def add(self, response: inf.ChatResponse) -> None:
        if response.request_id:
            self.request_id = response.request_id
        if response.delta or response.token_ids:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.parts.append(response.delta)
            self.generated += len(response.token_ids)
        if response.finished:
            self.finished = True
            self.finish_reason = FINISH_REASONS.get(response.finish_reason)
            if response.HasField("usage"):
                self.prompt_tokens = response.usage.prompt_tokens
                self.generated = response.usage.completion_tokens or self.generated

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def metadata(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.started
        first = (self.first_token_at - self.started) if self.first_token_at is not None else 0.0
        return {
            "request_id": self.request_id,
            "input_tokens_count": self.prompt_tokens,
            "generated_tokens_count": self.generated,
            "finish_reason": self.finish_reason,
            "time_cost": elapsed,
            "first_token_time": first,
            "speed": self.generated / elapsed if elapsed > 0 else 0.0,
        }


def rerank_output(
    pairs: Sequence[tuple[str, str]], scores: Sequence[float], *, single: bool
) -> tuple[tuple[str, str], float] | list[tuple[tuple[str, str], float]]:
    """Shape rerank scores as Byzer-LLM's rerank models returned them.

    One pair gives ``((query, passage), score)``; several give a list of those, best first.
    """
    scored = [((q, p), float(s)) for (q, p), s in zip(pairs, scores, strict=True)]
    if single:
        return scored[0]
    return sorted(scored, key=lambda item: item[1], reverse=True)


def _normalize_pairs(
    sentence_pairs: Sequence[Sequence[str]] | Sequence[str],
) -> tuple[list[tuple[str, str]], bool]:
    """Return the pairs and whether one bare pair was given (Byzer-LLM accepts both)."""
    if (
        isinstance(sentence_pairs, (list, tuple))
        and len(sentence_pairs) == 2
        and all(isinstance(s, str) for s in sentence_pairs)
    ):
        query, passage = sentence_pairs
        return [(str(query), str(passage))], True
    pairs: list[tuple[str, str]] = []
    for i, pair in enumerate(sentence_pairs):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise InvalidArgument(
                f"sentence_pairs[{i}] must be a (query, passage) pair of strings, got {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    return pairs, False


def _param_str(value: Any) -> str:
    """infer_params travel as strings; non-strings are written as JSON (True -> "true")."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def meta_dict(response: inf.GetModelMetaResponse) -> dict[str, Any]:
    """Byzer-LLM's meta dict from a GetModelMeta response.

    Typed fields win over same-named keys in the free-form ``extra`` map.
    """
    meta: dict[str, Any] = dict(response.extra)
    meta.update(
        {
            "model": response.model,
            # Byzer-LLM marks self-hosted models "proprietary" and hosted APIs "saas".
            "model_deploy_type": "proprietary",
            "backend": response.backend,
            "architectures": list(response.architectures),
            "max_model_len": response.max_model_len,
            "support_stream": response.support_stream,
            "support_chat_template": response.support_chat_template,
            # chat_oai sends the messages themselves; the worker applies the chat template.
            "message_format": True,
            "embedding_dim": response.embedding_dim,
            "model_path": response.model_path,
            "max_concurrency": response.max_concurrency,
        }
    )
    return meta


# --------------------------------------------------------------------------------------------
# grpc.aio streams (asyncio callers)
# --------------------------------------------------------------------------------------------


class AioChannels:
    """grpc.aio channels per event loop and address (aio objects belong to their loop)."""

    def __init__(self) -> None:
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def get(self, address: str) -> grpc.aio.Channel:
        """The running loop's channel to ``address``, opened on first use."""
        loop = asyncio.get_running_loop()
        with self._lock:
            channels = self._by_loop.setdefault(loop, {})
            channel = channels.get(address)
            if channel is None:
                channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                channels[address] = channel
            return channel

    async def close(self) -> None:
        """Close the running loop's channels."""
        with self._lock:
            channels = self._by_loop.pop(asyncio.get_running_loop(), {})
        for channel in channels.values():
            await channel.close()


async def _cancel_aio_call(call: Any, grace: float = CANCEL_GRACE_S) -> None:
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


async def aio_chat_stream(
    llm: Any, model: str, start: inf.ChatStart, config: Any
) -> AsyncIterator[inf.ChatResponse]:
    """Yield a Chat call's responses over grpc.aio, retrying on another replica before output.

    The asyncio twin of ``ByzerLLM._chat_stream``: the same replica choice (from the client's
    route cache), retry rules and cancel path. Closing the generator (``aclose``) cancels the
    request on the worker; cancellation of the calling task propagates after the cancel was
    sent.
    """
    attempts = _Attempts()
    while True:
        # The route cache may wait for a model's first snapshot: keep that off the loop.
        replica = await asyncio.to_thread(
            llm._pick, model, cp.PURPOSE_CHAT, attempts, config.affinity_key
        )
        start.replica = replica.index
        received = False
        llm._routes.started(replica)
        try:
            with client_span("InferenceService/Chat") as metadata:
                stub = inf_grpc.InferenceServiceStub(llm._aio_channels.get(replica.address))
                call = stub.Chat(timeout=config.timeout, metadata=metadata)
            finished = False
            try:
                try:
                    await call.write(inf.ChatRequest(start=start))
                    async for response in call:
                        received = True
                        finished = response.finished
                        yield response
                        if finished:
                            break
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from err
            finally:
                if finished:
                    with contextlib.suppress(grpc.RpcError, grpc.aio.UsageError):
                        await call.done_writing()
                else:
                    await _cancel_aio_call(call)
            if not finished:
                raise Unavailable("the chat stream ended without a final message")
            return
        except (Unavailable, ResourceExhausted) as exc:
            named = _name_worker(replica, exc)
            if received:
                raise named from exc
            attempts.failed(llm._routes, replica, named)
        finally:
            llm._routes.finished(replica)
