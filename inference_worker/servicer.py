"""The InferenceService servicer: gRPC in front of the replicas a replica process hosts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator

import grpc

from llmesh.common.auth import (
    ROLE_ADMIN,
    check_caller,
    check_model,
    current_principal,
    scoped_caller,
)
from llmesh.common.auth_interceptor import RefusalLog
from llmesh.common.errors import (
    AlreadyExists,
    InvalidArgument,
    PermissionDenied,
    Unauthenticated,
    error_for_code,
    rpc_handler,
    status_for,
)
from llmesh.common.metrics import RequestMetrics
from llmesh.inference_worker.chat_runs import (
    FINISH,
    ChatRun,
    Outbox,
    chat_messages,
    count_end,
    gone_how,
    new_request_id,
    sampling_params,
    stop_runs,
    usage,
)
from llmesh.inference_worker.engines.base import GenerationChunk, SamplingParams
from llmesh.inference_worker.replica_manager import HostedReplica, ReplicaManager
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc

log = logging.getLogger(__name__)
# Per-request refusals inside ChatSession streams (the interceptor logs the others).
_refusals = RefusalLog()


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """Routes each RPC to a hosted replica's engine, holding a concurrency slot meanwhile."""

    def __init__(self, manager: ReplicaManager) -> None:
        self.manager = manager
        self.open_sessions = 0  # ChatSession streams open now (GetModelMeta shows it)

    @rpc_handler
    async def Chat(
        self, request_iterator: AsyncIterator[inf.ChatRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inf.ChatResponse]:
        try:
            first = await anext(aiter(request_iterator))
        except StopAsyncIteration:
            raise InvalidArgument(
                "the Chat stream closed before a start message; send ChatRequest.start first"
            ) from None
        if first.WhichOneof("kind") != "start":
            raise InvalidArgument("the first message on a Chat stream must be a start message")
        start = first.start
        check_model(start.model)  # the token's model scope (no-op without tokens)
        if not start.request_id:
            start.request_id = new_request_id()
        outbox = Outbox()
        # The run a ChatSession uses, its output read back from the outbox: deltas merge while
        # the client lags, and the request's error becomes the call's status.
        run = ChatRun(self.manager, outbox, start)
        run.launch("chat")

        async def read_cancels() -> None:
            # The rest of the client stream: a cancel message (or half-close) ends here.
            with contextlib.suppress(Exception):
                async for msg in request_iterator:
                    if msg.WhichOneof("kind") == "cancel":
                        await run.cancel()
                        return

        reader = asyncio.create_task(read_cancels(), name=f"cancel-reader-{start.request_id}")
        try:
            while True:
                message = await outbox.take()
                # A revoke ends a stream already open, not only the next one (no-op without
                # tokens; an integer comparison while the token table is unchanged).
                check_caller()
                for delta in message.deltas:
                    yield delta
                    if delta.finished:
                        return
                if message.errors:
                    error = message.errors[0]
                    raise error_for_code(error.code, error.message)
        finally:
            reader.cancel()
            await stop_runs({start.request_id: run}, gone_how(self.manager, context))

    @rpc_handler
    async def ChatSession(
        self,
        request_iterator: AsyncIterator[inf.ChatSessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[inf.ChatSessionResponse]:
        outbox = Outbox()
        runs: dict[str, ChatRun] = {}
        reading = True

        def ended(request_id: str, run: ChatRun) -> None:
            if runs.get(request_id) is run:
                del runs[request_id]
            if not reading and not runs:
                outbox.wake()  # the client half-closed and the last request ended

        def begin(item: inf.SessionStart) -> None:
            start = item.start
            request_id = start.request_id
            if not request_id:
                outbox.fail(
                    "",
                    InvalidArgument(
                        "SessionStart.start.request_id is empty; every request on a "
                        "ChatSession needs an id, unique among the session's running requests"
                    ),
                )
                return
            if request_id in runs:
                outbox.fail(
                    request_id,
                    AlreadyExists(
                        f"request id {request_id!r} is already running on this session; "
                        "use a unique request_id"
                    ),
                )
                return
            try:
                # Still valid (the SDK keeps a session open for long; a revoke must reach it)
                # and in the token's model scope; no-op without tokens.
                check_model(start.model)
            except (PermissionDenied, Unauthenticated) as exc:
                caller = current_principal()
                _refusals.note(
                    "/llmesh.v1.InferenceService/ChatSession",
                    caller.who if caller else "no valid token",
                    context.peer() or "",
                    status_for(exc)[0],
                    str(exc),
                )
                outbox.fail(request_id, exc)
                return
            run = ChatRun(
                self.manager,
                outbox,
                start,
                timeout=item.timeout_ms / 1000 if item.timeout_ms else None,
                trace_context=item.trace_context,
            )
            runs[request_id] = run
            run.launch("session").add_done_callback(lambda _: ended(request_id, run))

        async def read() -> None:
            nonlocal reading
            try:
                async for msg in request_iterator:
                    for item in msg.starts:
                        begin(item)
                    for request_id in msg.cancels:
                        run = runs.get(request_id)
                        if run is not None:
                            try:
                                await run.cancel()
                            except Exception as exc:  # noqa: BLE001 - that request only
                                log.warning("cancelling request %s failed: %s", request_id, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a broken client stream ends the session
                log.info("a ChatSession's client stream broke: %s", exc)
            finally:
                # Half-close (or a broken stream): no new requests; the session ends once the
                # running ones did.
                reading = False
                outbox.wake()

        reader = asyncio.create_task(read(), name="session-reader")
        self.open_sessions += 1
        try:
            while True:
                message = await outbox.take()
                if message.deltas or message.errors:
                    yield message
                if not reading and not runs and not outbox.pending():
                    return
        finally:
            self.open_sessions -= 1
            reader.cancel()
            # The client went away (or the server stops): abort whatever still runs.
            await stop_runs(runs, gone_how(self.manager, context))

    async def _generate_one(
        self,
        replica: HostedReplica,
        request_id: str,
        prompt: str,
        params: SamplingParams,
        metrics: RequestMetrics,
    ) -> inf.Generation:
        """One prompt of a Generate call (slot held); a cancellation is measured by the lane."""
        assert replica.engine is not None
        text: list[str] = []
        last = GenerationChunk()
        stream = replica.engine.generate(request_id, prompt, params)
        gone = False
        try:
            async for chunk in stream:
                self.manager.progress += 1
                if chunk.delta or chunk.token_ids:
                    metrics.chunk(len(chunk.token_ids))
                text.append(chunk.delta)
                last = chunk
        except asyncio.CancelledError:
            gone = True
            raise
        except Exception as exc:
            metrics.failed(status_for(exc)[0].name)  # an engine error, a prompt that is too long
            raise
        finally:
            count_end(replica, last.finish_reason, gone)
            if last.finish_reason == "aborted" and not gone:
                metrics.aborted("abort")
            elif last.finish_reason is not None and not gone:
                metrics.finished(last.finish_reason, last.prompt_tokens, last.completion_tokens)
            await stream.aclose()
        return inf.Generation(
            text="".join(text),
            finish_reason=FINISH.get(last.finish_reason or "", 0),
            usage=usage(last),
            request_id=request_id,
        )

    @rpc_handler
    async def Generate(
        self, request: inf.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> inf.GenerateResponse:
        if not request.prompts:
            raise InvalidArgument("GenerateRequest.prompts is empty; give at least one prompt")
        replica = self.manager.find(request.model)
        params = sampling_params(request.params)
        params.lora = replica.lora
        base = request.request_id or uuid.uuid4().hex
        ids = (
            [base]
            if len(request.prompts) == 1
            else [f"{base}-{i}" for i in range(len(request.prompts))]
        )
        results: list[inf.Generation | None] = [None] * len(request.prompts)
        todo = list(enumerate(request.prompts))

        # How a prompt cancelled mid-way ended: the call went away (set below), or a sibling
        # prompt failed and the call stopped the rest of its batch.
        stopped_how = ["disconnect"]

        async def lane() -> None:
            # Each lane holds one slot and works through prompts, so a batch larger than the
            # free capacity runs in waves instead of being refused.
            while todo:
                i, prompt = todo.pop(0)
                # Made before the slot, so queue time is observed and TTFT / e2e include it.
                metrics = self.manager.metrics.request(replica.status.model, replica.status.index)
                try:
                    async with self.manager.slot(replica, ids[i]):
                        metrics.admitted()
                        results[i] = await self._generate_one(
                            replica, ids[i], prompt, params, metrics
                        )
                except asyncio.CancelledError:
                    metrics.aborted(stopped_how[0])  # queued or running; no-op once measured
                    raise
                except Exception as exc:
                    metrics.failed(status_for(exc)[0].name)  # e.g. a refused slot; idem
                    raise

        free = max(replica.status.max_concurrency - replica.inflight, 0)
        lanes = min(len(todo), free) or 1  # no free slot: the first lane raises RESOURCE_EXHAUSTED
        tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    stopped_how[0] = "cancel"  # the siblings stop because this one failed
                task.result()  # the first failure fails the call ...
        finally:
            if stopped_how[0] != "cancel":
                stopped_how[0] = gone_how(self.manager, context)
            for task in tasks:  # ... and stops the other lanes instead of finishing the batch
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return inf.GenerateResponse(generations=[r for r in results if r is not None])

    @rpc_handler
    async def Embed(
        self, request: inf.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> inf.EmbedResponse:
        if not request.texts:
            raise InvalidArgument("EmbedRequest.texts is empty; give at least one text")
        replica = self.manager.find(request.model)
        async with self.manager.slot(replica):
            assert replica.engine is not None
            vectors = await replica.engine.embed(list(request.texts), normalize=request.normalize)
            self.manager.progress += 1
        return inf.EmbedResponse(embeddings=[inf.Embedding(values=v) for v in vectors])

    @rpc_handler
    async def Rerank(
        self, request: inf.RerankRequest, context: grpc.aio.ServicerContext
    ) -> inf.RerankResponse:
        if not request.documents:
            raise InvalidArgument("RerankRequest.documents is empty; give at least one passage")
        replica = self.manager.find(request.model)
        async with self.manager.slot(replica):
            assert replica.engine is not None
            scores, method = await replica.engine.rerank(request.query, list(request.documents))
            self.manager.progress += 1
        return inf.RerankResponse(scores=scores, method=method)

    @rpc_handler
    async def Tokenize(
        self, request: inf.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> inf.TokenizeResponse:
        replica = self.manager.find(request.model)
        assert replica.engine is not None
        ids, tokens = await replica.engine.tokenize(
            request.text, add_special_tokens=request.add_special_tokens
        )
        return inf.TokenizeResponse(token_ids=ids, tokens=tokens)

    @rpc_handler
    async def ApplyChatTemplate(
        self, request: inf.ApplyChatTemplateRequest, context: grpc.aio.ServicerContext
    ) -> inf.ApplyChatTemplateResponse:
        if not request.messages:
            raise InvalidArgument("ApplyChatTemplateRequest.messages is empty")
        replica = self.manager.find(request.model)
        assert replica.engine is not None
        prompt = await replica.engine.apply_chat_template(
            chat_messages(list(request.messages)),
            add_generation_prompt=request.add_generation_prompt,
        )
        return inf.ApplyChatTemplateResponse(prompt=prompt)

    @rpc_handler
    async def GetModelMeta(
        self, request: inf.GetModelMetaRequest, context: grpc.aio.ServicerContext
    ) -> inf.GetModelMetaResponse:
        replica = self.manager.find(request.model)
        assert replica.engine is not None
        meta = replica.engine.meta()
        loras = replica.engine.loras()
        scoped = scoped_caller()
        if scoped is not None:  # a scoped token sees only the adapters it may use
            loras = [name for name in loras if scoped.may_use(name)]
        return inf.GetModelMetaResponse(
            model=request.model,
            backend=meta.backend,
            architectures=meta.architectures,
            max_model_len=meta.max_model_len,
            support_stream=meta.support_stream,
            support_chat_template=meta.support_chat_template,
            embedding_dim=meta.embedding_dim,
            model_path=replica.model.model_path,
            max_concurrency=meta.max_concurrency,
            # Counts since the replica loaded; engines do not know them, the replica does.
            # The rest shows where it runs and what it still holds (the abort tests read them).
            extra={
                **meta.extra,
                "served_requests": str(replica.served),
                "aborted_requests": str(replica.aborted),
                "inflight_requests": str(replica.inflight),
                "queued_requests": str(self.manager.queued(replica)),
                "tracked_request_ids": str(len(self.manager.requests)),
                "engine_active_requests": str(len(replica.engine.active_requests())),
                # Requests on the engine this model runs on, its adapters' included.
                "engine_load": str((replica.base or replica).engine_load),
                "loras": ",".join(loras),
                "open_sessions": str(self.open_sessions),
                "pid": str(os.getpid()),
                "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            },
        )

    @rpc_handler
    async def Abort(
        self, request: inf.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inf.AbortResponse:
        if not request.request_id:
            raise InvalidArgument("AbortRequest.request_id is empty")
        principal = current_principal()
        if (
            principal is not None
            and principal.role != ROLE_ADMIN
            and self.manager.owners.get(request.request_id) != principal.id
        ):
            # Another token's request (or none): answer as for an unknown id, so a user can
            # neither stop other users' requests nor learn which ids are running.
            return inf.AbortResponse(aborted=False)
        return inf.AbortResponse(aborted=await self.manager.abort(request.request_id))
