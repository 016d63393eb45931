"""One chat request's run on a replica, and the outbox that batches runs' output onto a stream.

``Chat`` (one request per stream) and ``ChatSession`` (many per stream) are served by the same
code: each request is a :class:`ChatRun` task that holds a concurrency slot, drives the
engine's ``generate`` and hands every chunk to an :class:`Outbox`. The stream's writer takes
whatever the outbox holds each time the previous write finished: one message with the new
deltas of every request that has any. There is no timer: when the client keeps up, each engine
step goes out at once; when it lags, a request's deltas merge into one entry (bounded by what
that request can still produce), never an unbounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping

import grpc
from google.protobuf import json_format

from llmesh.common import tracing
from llmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    status_for,
)
from llmesh.common.metrics import RequestMetrics
from llmesh.inference_worker.engines.base import (
    GenerationChunk,
    SamplingParams,
    StructuredOutput,
)
from llmesh.inference_worker.replica_manager import (
    AbortedWhileQueued,
    HostedReplica,
    ReplicaManager,
)
from llmesh.v1 import common_pb2
from llmesh.v1 import inference_service_pb2 as inf

log = logging.getLogger(__name__)

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop_string": common_pb2.FINISH_REASON_STOP_STRING,
    "aborted": common_pb2.FINISH_REASON_ABORTED,
}

_ROLES = frozenset({"system", "user", "assistant", "tool"})


def sampling_params(p: common_pb2.GenerationParams) -> SamplingParams:
    """GenerationParams (unset fields = engine defaults) → SamplingParams."""
    out = SamplingParams()
    for name in ("temperature", "top_p", "top_k", "max_tokens", "repetition_penalty", "seed"):
        if p.HasField(name):
            setattr(out, name, getattr(p, name))
    out.stop = [s for s in p.stop if s]
    out.stop_token_ids = list(p.stop_token_ids)
    if p.HasField("extra"):
        out.extra = json_format.MessageToDict(p.extra)
    if p.HasField("structured_output"):
        so = p.structured_output
        out.structured_output = StructuredOutput(
            json_schema=so.json_schema, regex=so.regex, choice=list(so.choice)
        )
    return out


def chat_messages(msgs: list[common_pb2.ChatMessage]) -> list[dict[str, str]]:
    """ChatMessage protos as the dicts chat templates take; refuses unknown roles."""
    out = []
    for i, m in enumerate(msgs):
        if m.role not in _ROLES:
            raise InvalidArgument(
                f"messages[{i}].role is {m.role!r}; use one of system, user, assistant, tool"
            )
        out.append({"role": m.role, "content": m.content})
    return out


async def render_prompt(
    replica: HostedReplica, messages: list[common_pb2.ChatMessage], prompt: str
) -> str:
    """The raw prompt of a request: ``prompt`` as is, or ``messages`` through the chat template."""
    if messages and prompt:
        raise InvalidArgument("give either messages or prompt, not both")
    if not messages and not prompt:
        raise InvalidArgument("the request has neither messages nor prompt; give one")
    if prompt:
        return prompt
    assert replica.engine is not None
    return await replica.engine.apply_chat_template(
        chat_messages(messages), add_generation_prompt=True
    )


def count_end(replica: HostedReplica, finish_reason: str | None, gone: bool) -> None:
    """Count a request on its replica's ``aborted`` counter if it ended aborted.

    Aborted means a final "aborted" chunk (cancel message, Abort RPC, engine stop), or no final
    chunk at all because the request went away (disconnect, deadline). A request that failed
    with an error is not an abort.
    """
    if finish_reason == "aborted" or (finish_reason is None and gone):
        replica.aborted += 1


def usage(chunk: GenerationChunk) -> common_pb2.Usage:
    """The token counts of a final chunk."""
    return common_pb2.Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


class Outbox:
    """What a stream has not written yet: new deltas per request, finished and failed requests.

    Runs :meth:`add` chunks and :meth:`fail` requests; the stream's writer awaits
    :meth:`take`, which hands over everything gathered since the previous take as one
    ``ChatSessionResponse``. Each request has at most one entry per message: a chunk added
    while the previous one is still unwritten is merged into it.
    """

    def __init__(self) -> None:
        self._message = inf.ChatSessionResponse()
        self._entries: dict[str, inf.ChatResponse] = {}
        # Text of entries that got more than one chunk, joined once when taken (appending to
        # a protobuf string would copy the whole text per token while the client lags).
        self._texts: dict[str, list[str]] = {}
        self._ready = asyncio.Event()

    def add(self, request_id: str, chunk: GenerationChunk) -> None:
        """Take one engine chunk of ``request_id`` (its final one when it has a finish reason)."""
        entry = self._entries.get(request_id)
        if entry is None:
            entry = self._message.deltas.add(request_id=request_id, delta=chunk.delta)
            self._entries[request_id] = entry
            if not self._ready.is_set():
                self._ready.set()
        elif chunk.delta:
            parts = self._texts.get(request_id)
            if parts is None:
                self._texts[request_id] = [entry.delta, chunk.delta]
            else:
                parts.append(chunk.delta)
        if chunk.token_ids:
            entry.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            entry.finish_reason = FINISH.get(chunk.finish_reason, 0)
            entry.usage.CopyFrom(usage(chunk))
            entry.finished = True

    def fail(self, request_id: str, exc: BaseException) -> None:
        """Report that ``request_id`` failed with ``exc`` (its status and sentence)."""
        code, message = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("request %s failed", request_id, exc_info=exc)
        self._message.errors.add(request_id=request_id, code=code.value[0], message=message)
        self._ready.set()

    def pending(self) -> bool:
        """True when there is something to write."""
        return self._ready.is_set()

    async def take(self) -> inf.ChatSessionResponse:
        """Wait until there is something to write and hand it over."""
        await self._ready.wait()
        message, self._message = self._message, inf.ChatSessionResponse()
        for request_id, parts in self._texts.items():
            self._entries[request_id].delta = "".join(parts)
        self._entries, self._texts = {}, {}
        self._ready.clear()
        return message

    def wake(self) -> None:
        """Wake :meth:`take` with nothing new (the writer re-checks whether to end)."""
        self._ready.set()


class ChatRun:
    """One chat or completion request, run as a task that reports to an :class:`Outbox`.

    Args:
        manager: the replicas of this process.
        outbox: where output and failure go.
        start: the request; its ``request_id`` must be set.
        timeout: seconds the request may run; None for no limit.
        trace_context: the caller's W3C trace context for this request.
    """

    def __init__(
        self,
        manager: ReplicaManager,
        outbox: Outbox,
        start: inf.ChatStart,
        *,
        timeout: float | None = None,
        trace_context: Mapping[str, str] | None = None,
    ) -> None:
        self.manager = manager
        self.outbox = outbox
        self.start = start
        self.request_id = start.request_id
        self.timeout = timeout
        self.trace_context = trace_context
        self.cancelled = False
        # How the run ends if its call goes away mid-request (set by stop_runs); None: as a
        # disconnect, or a deadline when its own timeout expired.
        self.gone_how: str | None = None
        self._deadline: asyncio.Timeout | None = None
        self._engine_started = False
        self._replica: HostedReplica | None = None
        self.metrics: RequestMetrics | None = None
        self.trace: tracing.RunTrace | tracing.NoRunTrace = tracing.NO_RUN_TRACE
        self.task: asyncio.Task[None] | None = None

    def launch(self, name: str = "chat-run") -> asyncio.Task[None]:
        """Start the run as a task."""
        self.task = asyncio.create_task(self._run(), name=f"{name}-{self.request_id}")
        return self.task

    async def cancel(self) -> None:
        """Stop the request; it ends with a final message whose finish reason is ABORTED."""
        if self.cancelled:
            return
        self.cancelled = True
        replica = self._replica
        if self._engine_started and replica is not None and replica.engine is not None:
            await replica.engine.abort(self.request_id)
        elif replica is not None:
            # Waiting in the admission queue: leave it at once, the engine never sees it.
            await self.manager.abort(self.request_id)

    async def _run(self) -> None:
        try:
            # A request on a session gets its own span in the caller's trace; a Chat call's
            # request runs inside the call's own server span already.
            span = (
                tracing.request_span("InferenceService/ChatSession.request", self.trace_context)
                if self.trace_context is not None
                else contextlib.nullcontext()
            )
            with span:
                if self.timeout is None:
                    await self._generate()
                else:
                    try:
                        async with asyncio.timeout(self.timeout) as self._deadline:
                            await self._generate()
                    except TimeoutError:
                        raise DeadlineExceeded(
                            f"request {self.request_id} ran past its deadline of "
                            f"{self.timeout:g} s and was aborted; allow more time or ask for "
                            "fewer tokens (max_length)"
                        ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported for this request only
            if self.metrics is not None:
                # A no-op when the end was measured already (a deadline counts as an abort).
                self.metrics.failed(status_for(exc)[0].name)
            self.outbox.fail(self.request_id, exc)

    async def _generate(self) -> None:
        start, manager = self.start, self.manager
        if not start.model:
            raise InvalidArgument("ChatStart.model is empty; name the model to use")
        replica = manager.find(start.model, start.replica if start.HasField("replica") else None)
        self._replica = replica
        self.metrics = manager.metrics.request(replica.status.model, replica.status.index)
        # Queue wait, prefill and decode as child spans of the request's span (no-op when off).
        self.trace = tracing.run_trace(
            start.model, self.request_id, chat=bool(start.messages), replica=replica.status.index
        )
        params = sampling_params(start.params)
        params.lora = replica.lora  # an adapter model decodes with its adapter
        if start.resume_token_ids:
            engine = replica.engine
            if engine is None or not engine.supports_resume:
                raise FailedPrecondition(
                    f"model {start.model!r} (backend {replica.model.backend or 'transformers'}) "
                    "cannot continue a request another replica started; it can only be retried "
                    "from the start"
                )
            params.resume_token_ids = list(start.resume_token_ids)
            self.metrics.migrated(len(start.resume_token_ids))
        request_id = self.request_id
        try:
            self.trace.queued()
            async with manager.slot(replica, request_id):
                self.metrics.admitted()
                await self._decode(replica, params)
        except AbortedWhileQueued:
            # Cancelled or aborted while waiting for a slot: it ends like any aborted request.
            count_end(replica, "aborted", gone=False)
            self._measure_end("aborted", False, None)
            self.outbox.add(request_id, GenerationChunk(finish_reason="aborted"))
        except asyncio.CancelledError:
            # Gone while queued (deadline, disconnect); a no-op when _decode measured the end.
            self._measure_end(None, True, None)
            raise

    async def _decode(self, replica: HostedReplica, params: SamplingParams) -> None:
        """Render the prompt and stream the engine's output into the outbox (slot held)."""
        start, manager, request_id = self.start, self.manager, self.request_id
        self.trace.admitted()
        assert replica.engine is not None
        engine = replica.engine
        try:
            prompt = await render_prompt(replica, list(start.messages), start.prompt)
        except asyncio.CancelledError:
            count_end(replica, None, gone=True)  # a deadline or disconnect while rendering
            self._measure_end(None, True, None)
            raise
        stream = engine.generate(request_id, prompt, params)
        self._engine_started = True
        aborted = False
        finish_reason: str | None = None
        gone = False
        outbox = self.outbox
        metrics = self.metrics
        assert metrics is not None
        final: GenerationChunk | None = None
        try:
            async for chunk in stream:
                manager.progress += 1
                if chunk.delta or chunk.token_ids:
                    metrics.chunk(len(chunk.token_ids))
                if self.cancelled and not aborted:
                    # A cancel that came while the prompt was still being tokenized found
                    # no request to abort; the engine knows it by now.
                    aborted = await engine.abort(request_id) or chunk.finish_reason is not None
                if chunk.finish_reason is not None:
                    finish_reason, final = chunk.finish_reason, chunk
                    self.trace.finished(chunk.prompt_tokens, chunk.completion_tokens, finish_reason)
                    outbox.add(request_id, chunk)
                    if self._deadline is not None:
                        # Answered: the clean-up below must not turn it into an error.
                        self._deadline.reschedule(None)
                    break
                if chunk.delta or chunk.token_ids:
                    self.trace.first_token()
                    outbox.add(request_id, chunk)
        except (asyncio.CancelledError, GeneratorExit):
            gone = True  # disconnect or deadline: the request went away mid-stream
            raise
        finally:
            count_end(replica, finish_reason, gone)
            self._measure_end(finish_reason, gone, final)
            # Closing the engine stream aborts the request in the engine (disconnect,
            # deadline or cancel all land here) before the slot is released.
            await stream.aclose()
        if finish_reason is None:
            raise Unavailable(
                f"the engine ended request {request_id} without a final message (it is "
                "stopping); retry on another replica"
            )

    def _measure_end(
        self, finish_reason: str | None, gone: bool, final: GenerationChunk | None
    ) -> None:
        """Report the request's end to its metrics: finished, or aborted and how."""
        metrics = self.metrics
        if metrics is None:
            return
        if finish_reason == "aborted" or (finish_reason is None and gone):
            if gone:
                expired = self._deadline is not None and self._deadline.expired()
                how = "deadline" if expired else self.gone_how or "disconnect"
            else:
                # Not our own cancel: the Abort RPC (or an engine that stopped the request).
                how = "cancel" if self.cancelled else "abort"
            metrics.aborted(how)
        elif finish_reason is not None and final is not None:
            metrics.finished(finish_reason, final.prompt_tokens, final.completion_tokens)


def new_request_id() -> str:
    """An id for a request whose caller gave none."""
    return uuid.uuid4().hex


# A call cut off this close to its gRPC deadline was cut off by it: the client's deadline
# timer starts before the server's (the request's transit), so the client's cancel can reach
# the server a little before the server's own deadline passes.
DEADLINE_SLACK_S = 0.25


def gone_how(manager: ReplicaManager, context: grpc.aio.ServicerContext) -> str:
    """How the requests of a call that ended early count as aborted (``request_aborted``).

    ``shutdown`` while the replica process stops (the server cuts calls off), ``deadline``
    when the call's gRPC deadline has passed, else ``disconnect`` (the client went away).
    """
    if manager.stopping:
        return "shutdown"
    remaining = context.time_remaining()  # None: the call has no deadline
    if remaining is not None and remaining <= DEADLINE_SLACK_S:
        return "deadline"
    return "disconnect"


async def stop_runs(runs: Mapping[str, ChatRun], how: str | None = None) -> None:
    """Cancel the tasks of ``runs`` and wait for them (their engine requests are aborted).

    Args:
        runs: the runs to stop.
        how: how a run still in the middle of its request counts as aborted (see
            :func:`gone_how`); None counts it as a disconnect.
    """
    tasks = [r.task for r in runs.values() if r.task is not None and not r.task.done()]
    for run in runs.values():
        run.gone_how = how
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
