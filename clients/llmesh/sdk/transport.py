"""The sync and the async transport: the only part of the SDK that differs between them.

Both run an operation's steps (see :mod:`llmesh.sdk.ops`): they perform each op the steps
yield (a routed worker call, a control-plane call, a chat request, a job watch, a pause) and
send the result back. :class:`SyncTransport` blocks on grpc's sync stubs and waits for chat
output that the SDK's I/O loop thread receives; :class:`AsyncTransport` awaits grpc.aio calls on
the running event loop. Both pick replicas and retry through the same
:class:`~llmesh.sdk.channels.Router`, and both run chat requests on the replica's
``ChatSession`` (:mod:`llmesh.sdk.sessions`) with the same cancel path: closing a stream early
cancels the request on the worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

from llmesh.common import tracing
from llmesh.common.errors import DeadlineExceeded, FailedPrecondition, LLMeshError, Unavailable
from llmesh.common.routing import RouteDecision
from llmesh.common.tracing import client_span
from llmesh.llm_config import GenerationConfig
from llmesh.route_cache import call_unary, rpc_errors
from llmesh.sdk.calls import CANCEL_GRACE_S
from llmesh.sdk.channels import Attempts, Router
from llmesh.sdk.ops import (
    ChatStream,
    ControlCall,
    Gather,
    LiveAddresses,
    Sleep,
    Steps,
    WatchJob,
    WorkerAt,
    WorkerCall,
)
from llmesh.sdk.results import TextStream
from llmesh.sdk.sessions import AsyncInbox, ThreadInbox, remaining
from llmesh.sdk.shapes import SingleOutputMeta
from llmesh.training_watch import WatchLoop
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import trainer_service_pb2 as tr

T = TypeVar("T")

#: Most concurrent requests one batched ``chat`` call makes on the sync transport.
MAX_BATCH_THREADS = 8
#: Reconnects of a job watch in a row without a message before the outage is reported.
WATCH_RECONNECTS = 8
WATCH_BACKOFF_MAX_S = 3.0


def _advance(steps: Steps[Any], value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Send ``value`` (or throw ``error``) into ``steps``: ``(False, next op)`` or
    ``(True, result)``.

    StopIteration is turned into a return value because it cannot cross
    ``asyncio.to_thread``.
    """
    try:
        if error is not None:
            return False, steps.throw(error)
        return False, steps.send(value)
    except StopIteration as stop:
        return True, stop.value


#: How long past a request's deadline the client waits for the worker's word on it (the
#: worker enforces the deadline and reports DEADLINE_EXCEEDED itself).
DEADLINE_GRACE_S = 5.0


def _deadline(timeout: float | None, now: float) -> float | None:
    return None if timeout is None else now + timeout + DEADLINE_GRACE_S


def _left(ends: float | None, now: float, request_id: str, timeout: float | None) -> float | None:
    """Seconds left of a request's deadline (one deadline across its retries and moves)."""
    if ends is None:
        return None
    left = ends - now
    if left <= 0:
        raise DeadlineExceeded(
            f"request {request_id} ran past its deadline of {timeout:g} s while moving to "
            "another replica; allow more time (timeout_s)"
        )
    return left


def _drain(inbox: ThreadInbox) -> None:
    """Wait briefly for a cancelled request's final message (or error)."""
    deadline = time.monotonic() + CANCEL_GRACE_S
    with contextlib.suppress(LLMeshError):
        while True:
            if any(r.finished for r in inbox.next(remaining(deadline))):
                return


async def _adrain(inbox: AsyncInbox, deadline: float) -> None:
    """Wait briefly for a cancelled request's final message (or error)."""
    while True:
        if any(r.finished for r in await inbox.next(deadline)):
            return


def _operation(start: inf.ChatStart) -> str:
    """``gen_ai.operation.name`` of a request: messages are a chat, a raw prompt a completion."""
    return "text_completion" if start.prompt and not start.messages else "chat"


def _start_span(model: str, start: inf.ChatStart) -> Any:
    """The span of one generation request (None when tracing is off)."""
    return tracing.start_generation(_operation(start), model, start.request_id, start.params)


def _cause(attempts: Attempts) -> str:
    """Why a unary call picks again: a retry once a replica failed it."""
    return "retry" if attempts.tried else ""


def _watch_loop(job_id: str, after_sequence: int, timeout: float | None) -> WatchLoop:
    return WatchLoop(
        job_id,
        after_sequence,
        timeout=timeout,
        reconnects=WATCH_RECONNECTS,
        backoff_max=WATCH_BACKOFF_MAX_S,
    )


class SyncTransport:
    """Runs operations with blocking gRPC calls; thread-safe.

    Args:
        router: the client's channels, route cache and retry rules.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._perform: dict[type, Callable[[Any], Any]] = {
            WorkerCall: self._worker_call,
            WorkerAt: self._worker_at,
            LiveAddresses: lambda op: router.live_addresses(op.model),
            ControlCall: self._control_call,
            ChatStream: self._chat,
            WatchJob: self._watch_job,
            Sleep: lambda op: time.sleep(op.seconds),
            Gather: self._gather,
        }

    def run(self, steps: Steps[T]) -> T:
        """Run an operation's steps to their result.

        Args:
            steps: the steps; each op they yield is performed here and its result sent back.
        """
        value: Any = None
        error: BaseException | None = None
        while True:
            done, op = _advance(steps, value, error)
            if done:
                return op
            try:
                value, error = self._perform[type(op)](op), None
            except Exception as exc:  # noqa: BLE001 - thrown into the steps, which may handle it
                value, error = None, exc

    def _worker_call(self, op: WorkerCall) -> Any:
        attempts = Attempts()
        decision = RouteDecision() if tracing.enabled() else None
        while True:
            replica = self.router.pick(op.model, op.purpose, attempts, decision=decision)
            with self.router.attempt(attempts, replica):
                stub = self.router.worker(replica.address)
                name = f"InferenceService/{op.method}"
                with (
                    rpc_errors(),
                    client_span(
                        name, replica.address, decision=decision, cause=_cause(attempts)
                    ) as metadata,
                ):
                    return getattr(stub, op.method)(
                        op.request, metadata=metadata, timeout=op.timeout
                    )

    def _worker_at(self, op: WorkerAt) -> Any:
        stub = self.router.worker(op.address)
        return call_unary(
            getattr(stub, op.method),
            op.request,
            name=f"InferenceService/{op.method}",
            timeout=op.timeout,
            address=op.address,
        )

    def _control_call(self, op: ControlCall) -> Any:
        stub = self.router.control()
        try:
            return call_unary(
                getattr(stub, op.method),
                op.request,
                name=f"ControlPlaneService/{op.method}",
                timeout=op.timeout,
                address=self.router.control_plane,
            )
        except Unavailable as exc:
            raise self.router.unavailable_control_plane(exc) from exc

    def _chat(self, op: ChatStream) -> None:
        for batch in self.chat_batches(op.model, op.start, op.config, op.on_migrate):
            for response in batch:
                op.sink(response)

    def _watch_job(self, op: WatchJob) -> tr.TrainingJob | None:
        job: tr.TrainingJob | None = None
        for job, event in self.watch_training_job(op.job_id, timeout=op.timeout):
            if op.sink is not None:
                op.sink(job, event)
        return job

    def _gather(self, op: Gather) -> list[Any]:
        if len(op.steps) == 1:
            return [self.run(op.steps[0])]
        workers = min(len(op.steps), MAX_BATCH_THREADS)
        with concurrent.futures.ThreadPoolExecutor(workers, "llmesh-chat") as pool:
            return list(pool.map(self.run, op.steps))

    def chat_batches(
        self,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        on_migrate: Callable[[], None] | None = None,
    ) -> Iterator[list[inf.ChatResponse]]:
        """Yield a request's responses as they arrive. Each item holds everything that arrived
        since the previous one (several responses when the caller was slower than the worker).

        Before any output a failed try goes to another replica (see :class:`Attempts`); after
        output a stream that breaks with UNAVAILABLE moves to another replica and continues
        where it was (see :class:`~llmesh.sdk.channels.Failover`), so the caller sees one
        uninterrupted stream. The request runs on the replica's ChatSession, which the SDK's
        I/O loop thread keeps open; this thread only waits for its output. Closing this
        generator early cancels the request on the worker.

        Args:
            model: the model.
            start: the request; its ``replica`` is set to the replica chosen, its
                ``request_id`` when empty, its ``resume_token_ids`` when it moves.
            config: the call's timeout, affinity key and ``max_migrations``.
            on_migrate: called each time the request moves to another replica.
        """
        if not start.request_id:
            start.request_id = uuid.uuid4().hex
        if not tracing.enabled():
            return self._chat_batches(model, start, config, on_migrate, None)
        return tracing.traced_batches(
            functools.partial(_start_span, model, start),
            functools.partial(self._chat_batches, model, start, config, on_migrate),
        )

    def _chat_batches(
        self,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        on_migrate: Callable[[], None] | None,
        span: Any,
    ) -> Iterator[list[inf.ChatResponse]]:
        # chat_batches' generator; ``span`` is the request's span (None: tracing is off).
        attempts = Attempts()
        request_id = start.request_id
        io = self.router.io
        failover = self.router.failover(start, config.max_migrations, on_migrate)
        ends = None if config.timeout is None else time.monotonic() + config.timeout
        decision = None if span is None else RouteDecision()
        cause = ""
        while True:
            timeout = _left(ends, time.monotonic(), request_id, config.timeout)
            replica = self.router.pick(
                model, cp.PURPOSE_CHAT, attempts, config.affinity_key, decision
            )
            tracing.record_route(span, decision, cause)
            cause = "retry"
            start.replica = replica.index
            address = replica.address
            try:
                with (
                    self.router.attempt(attempts, replica) as attempt,
                    tracing.attempt(span, "InferenceService/ChatSession", address) as carrier,
                ):
                    inbox = ThreadInbox()
                    # A copy: the I/O thread sends it later, and a retry changes ``replica``.
                    sent = inf.ChatStart()
                    sent.CopyFrom(start)
                    io.call(self._session_start, address, sent, inbox, timeout, carrier)
                    deadline = _deadline(timeout, time.monotonic())
                    finished = False
                    try:
                        while not finished:
                            batch = inbox.next(remaining(deadline))
                            attempt.received = True
                            failover.received(batch)
                            finished = batch[-1].finished
                            yield batch
                    finally:
                        with contextlib.suppress(FailedPrecondition):  # the client was closed
                            if not finished:
                                io.call(self._session_call, address, "cancel", request_id, inbox)
                                _drain(inbox)
                            io.call(self._session_call, address, "forget", request_id, inbox)
                    failover.finished()
                    return
            except LLMeshError as exc:
                if not failover.move(attempts, replica, exc):
                    error = failover.refused(exc)
                    if error is exc:
                        raise
                    raise error from exc
                cause = "migration"

    def _session_start(
        self,
        address: str,
        start: inf.ChatStart,
        inbox: ThreadInbox,
        timeout: float | None,
        carrier: dict[str, str],
    ) -> None:
        # On the I/O loop: whatever goes wrong must reach the waiting thread.
        try:
            session = self.router.sessions.get(address)
            session.start(start, inbox, timeout=timeout, trace_context=carrier)
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            inbox.fail(exc if isinstance(exc, LLMeshError) else Unavailable(str(exc)))

    def _session_call(self, address: str, method: str, request_id: str, inbox: ThreadInbox) -> None:
        # On the I/O loop.
        session = self.router.sessions.existing(address)
        if session is not None:
            getattr(session, method)(request_id, inbox)

    def chat_texts(
        self,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        clean: Callable[[str], str],
    ) -> Iterator[tuple[str, SingleOutputMeta]]:
        """:meth:`chat_batches` as ``stream_chat_oai`` items (see :class:`TextStream`): one
        item per batch, so a caller slower than the worker gets the text so far at once."""
        texts = TextStream(start.request_id, clean)
        stream = self.chat_batches(model, start, config, texts.progress.migrated)
        try:
            for batch in stream:
                item = texts.feed(batch)
                if item is not None:
                    yield item
        finally:
            stream.close()  # cancels on the worker when the caller stopped early

    def watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """Follow a job (see :meth:`llmesh.ByzerLLM.watch_training_job`), resuming after drops.

        Args:
            job_id: the job.
            after_sequence: skip events up to this sequence number.
            timeout: give up after this many seconds.
        """
        loop = _watch_loop(job_id, after_sequence, timeout)
        while True:
            stub = self.router.control()
            request, remaining = loop.request()
            call: Any = None
            try:
                with rpc_errors(), client_span("ControlPlaneService/WatchTrainingJob") as metadata:
                    call = stub.WatchTrainingJob(request, metadata=metadata, timeout=remaining)
                    for response in call:
                        item = loop.received(response)
                        if item is not None:
                            yield item
            except (Unavailable, DeadlineExceeded) as exc:
                loop.failed(
                    self.router.unavailable_control_plane(exc)
                    if isinstance(exc, Unavailable)
                    else exc
                )
            finally:
                if call is not None:
                    call.cancel()  # also when the caller left early: ends the server stream
            pause = loop.pause()
            if pause is None:
                return
            time.sleep(pause)


class AsyncTransport:
    """Runs operations with grpc.aio calls on the running event loop.

    Picking a replica for a model whose routes are not cached yet may wait for its first
    route snapshot, so that one pick runs on a worker thread; everything else stays on the loop.

    Args:
        router: the client's channels, route cache and retry rules.
    """

    def __init__(self, router: Router) -> None:
        self.router = router
        self._perform: dict[type, Callable[[Any], Any]] = {
            WorkerCall: self._worker_call,
            WorkerAt: self._worker_at,
            LiveAddresses: self._live_addresses,
            ControlCall: self._control_call,
            ChatStream: self._chat,
            WatchJob: self._watch_job,
            Sleep: lambda op: asyncio.sleep(op.seconds),
            Gather: self._gather,
        }

    async def run(self, steps: Steps[T], *, offload: bool = False) -> T:
        """Run an operation's steps to their result.

        Args:
            steps: the steps; each op they yield is awaited here and its result sent back.
            offload: run the steps' own code (between ops) on a worker thread, so user code
                and parsing never block the loop.
        """
        value: Any = None
        error: BaseException | None = None
        while True:
            if offload:
                done, op = await asyncio.to_thread(_advance, steps, value, error)
            else:
                done, op = _advance(steps, value, error)
            if done:
                return op
            try:
                value, error = await self._perform[type(op)](op), None
            except Exception as exc:  # noqa: BLE001 - thrown into the steps, which may handle it
                value, error = None, exc

    async def close(self) -> None:
        """End the running event loop's chat sessions and close its grpc.aio channels."""
        await self.router.sessions.close()
        await self.router.aio_channels.close()

    async def _pick(
        self,
        model: str,
        purpose: int,
        attempts: Attempts,
        affinity: str = "",
        decision: RouteDecision | None = None,
    ) -> Any:
        if self.router.routes.settled(model):
            # Routes are cached: pick on the loop, no thread hop (this runs once per request).
            return self.router.pick(model, purpose, attempts, affinity, decision)
        # The first request for a model may wait for its route snapshot: keep that off the loop.
        picking = asyncio.ensure_future(
            asyncio.to_thread(self.router.pick, model, purpose, attempts, affinity, decision)
        )
        try:
            return await asyncio.shield(picking)
        except asyncio.CancelledError:
            # The pick counted the request on its replica; nobody will run it.
            picking.add_done_callback(self._uncount)
            raise

    def _uncount(self, picking: asyncio.Future[Any]) -> None:
        if not picking.cancelled() and picking.exception() is None:
            self.router.routes.finished(picking.result())

    async def _worker_call(self, op: WorkerCall) -> Any:
        attempts = Attempts()
        decision = RouteDecision() if tracing.enabled() else None
        while True:
            replica = await self._pick(op.model, op.purpose, attempts, decision=decision)
            with self.router.attempt(attempts, replica):
                stub = self.router.aio_worker(replica.address)
                name = f"InferenceService/{op.method}"
                with (
                    rpc_errors(),
                    client_span(
                        name, replica.address, decision=decision, cause=_cause(attempts)
                    ) as metadata,
                ):
                    return await getattr(stub, op.method)(
                        op.request, metadata=metadata, timeout=op.timeout
                    )

    async def _worker_at(self, op: WorkerAt) -> Any:
        stub = self.router.aio_worker(op.address)
        name = f"InferenceService/{op.method}"
        with rpc_errors(), client_span(name, op.address) as metadata:
            return await getattr(stub, op.method)(op.request, metadata=metadata, timeout=op.timeout)

    async def _live_addresses(self, op: LiveAddresses) -> list[str]:
        return await asyncio.to_thread(self.router.live_addresses, op.model)

    async def _control_call(self, op: ControlCall) -> Any:
        stub = self.router.aio_control()
        try:
            name = f"ControlPlaneService/{op.method}"
            with rpc_errors(), client_span(name, self.router.control_plane) as metadata:
                return await getattr(stub, op.method)(
                    op.request, metadata=metadata, timeout=op.timeout
                )
        except Unavailable as exc:
            raise self.router.unavailable_control_plane(exc) from exc

    async def _chat(self, op: ChatStream) -> None:
        batches = self.chat_batches(op.model, op.start, op.config, op.on_migrate)
        async with contextlib.aclosing(batches) as stream:
            async for batch in stream:
                for response in batch:
                    op.sink(response)

    async def _watch_job(self, op: WatchJob) -> tr.TrainingJob | None:
        job: tr.TrainingJob | None = None
        watch = self.watch_training_job(op.job_id, timeout=op.timeout)
        async with contextlib.aclosing(watch) as items:
            async for job, event in items:
                if op.sink is not None:
                    op.sink(job, event)
        return job

    async def _gather(self, op: Gather) -> list[Any]:
        return list(await asyncio.gather(*(self.run(s) for s in op.steps)))

    def chat_batches(
        self,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        on_migrate: Callable[[], None] | None = None,
    ) -> AsyncIterator[list[inf.ChatResponse]]:
        """:meth:`SyncTransport.chat_batches` on the running loop's session to the replica: the
        same replica choice, retry and failover rules and cancel path, no thread.

        Closing the generator (``aclose``) cancels the request on the worker; cancellation of
        the calling task propagates after the cancel was sent.
        """
        if not start.request_id:
            start.request_id = uuid.uuid4().hex
        if not tracing.enabled():
            return self._chat_batches(model, start, config, on_migrate, None)
        return tracing.atraced_batches(
            functools.partial(_start_span, model, start),
            functools.partial(self._chat_batches, model, start, config, on_migrate),
        )

    async def _chat_batches(
        self,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        on_migrate: Callable[[], None] | None,
        span: Any,
    ) -> AsyncIterator[list[inf.ChatResponse]]:
        # chat_batches' generator; ``span`` is the request's span (None: tracing is off).
        attempts = Attempts()
        request_id = start.request_id
        loop = asyncio.get_running_loop()
        failover = self.router.failover(start, config.max_migrations, on_migrate)
        ends = None if config.timeout is None else loop.time() + config.timeout
        decision = None if span is None else RouteDecision()
        cause = ""
        while True:
            timeout = _left(ends, loop.time(), request_id, config.timeout)
            replica = await self._pick(
                model, cp.PURPOSE_CHAT, attempts, config.affinity_key, decision
            )
            tracing.record_route(span, decision, cause)
            cause = "retry"
            start.replica = replica.index
            try:
                with (
                    self.router.attempt(attempts, replica) as attempt,
                    tracing.attempt(
                        span, "InferenceService/ChatSession", replica.address
                    ) as carrier,
                ):
                    session = self.router.sessions.get(replica.address)
                    inbox = AsyncInbox()
                    session.start(start, inbox, timeout=timeout, trace_context=carrier)
                    deadline = _deadline(timeout, loop.time())
                    finished = False
                    try:
                        while not finished:
                            batch = await inbox.next(deadline)
                            attempt.received = True
                            failover.received(batch)
                            finished = batch[-1].finished
                            yield batch
                    finally:
                        if not finished:
                            session.cancel(request_id, inbox)
                            with contextlib.suppress(Exception):
                                await _adrain(inbox, loop.time() + CANCEL_GRACE_S)
                        session.forget(request_id, inbox)
                    failover.finished()
                    return
            except LLMeshError as exc:
                if not failover.move(attempts, replica, exc):
                    error = failover.refused(exc)
                    if error is exc:
                        raise
                    raise error from exc
                cause = "migration"

    async def watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """:meth:`SyncTransport.watch_training_job` as a grpc.aio stream on the running loop."""
        loop = _watch_loop(job_id, after_sequence, timeout)
        while True:
            stub = self.router.aio_control()
            request, remaining = loop.request()
            call: Any = None
            try:
                with rpc_errors(), client_span("ControlPlaneService/WatchTrainingJob") as metadata:
                    call = stub.WatchTrainingJob(request, metadata=metadata, timeout=remaining)
                    async for response in call:
                        item = loop.received(response)
                        if item is not None:
                            yield item
            except (Unavailable, DeadlineExceeded) as exc:
                loop.failed(
                    self.router.unavailable_control_plane(exc)
                    if isinstance(exc, Unavailable)
                    else exc
                )
            finally:
                if call is not None:
                    call.cancel()
            pause = loop.pause()
            if pause is None:
                return
            await asyncio.sleep(pause)
