"""The InferenceService servicer: gRPC in front of the replicas a replica process hosts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import json_format

from llmesh.common.errors import InvalidArgument, rpc_handler
from llmesh.inference_worker.engines.base import (
    GenerationChunk,
    SamplingParams,
    StructuredOutput,
)
from llmesh.inference_worker.replica_manager import HostedReplica, ReplicaManager
from llmesh.v1 import common_pb2, inference_service_pb2_grpc
from llmesh.v1 import inference_service_pb2 as inf

log = logging.getLogger(__name__)

FINISH = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop_string": common_pb2.FINISH_REASON_STOP_STRING,
    "aborted": common_pb2.FINISH_REASON_ABORTED,
}


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


def _messages(msgs: list[common_pb2.ChatMessage]) -> list[dict[str, str]]:
    roles = {"system", "user", "assistant", "tool"}
    out = []
    for i, m in enumerate(msgs):
        if m.role not in roles:
            raise InvalidArgument(
                f"messages[{i}].role is {m.role!r}; use one of system, user, assistant, tool"
            )
        out.append({"role": m.role, "content": m.content})
    return out


def _count_end(replica: HostedReplica, finish_reason: str | None, gone: bool) -> None:
    """Count a stream on its replica's ``aborted`` counter if it ended aborted.

    Aborted means a final "aborted" chunk (cancel message, Abort RPC, engine stop), or no final
    chunk at all because the call went away (disconnect, deadline). A stream that failed with
    an error is not an abort.
    """
    if finish_reason == "aborted" or (finish_reason is None and gone):
        replica.aborted += 1


def _usage(chunk: GenerationChunk) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        total_tokens=chunk.prompt_tokens + chunk.completion_tokens,
    )


class InferenceServicer(inference_service_pb2_grpc.InferenceServiceServicer):
    """Routes each RPC to a hosted replica's engine, holding a concurrency slot meanwhile."""

    def __init__(self, manager: ReplicaManager) -> None:
        self.manager = manager

    async def _prompt(
        self, replica: HostedReplica, messages: list[common_pb2.ChatMessage], prompt: str
    ) -> str:
        if messages and prompt:
            raise InvalidArgument("give either messages or prompt, not both")
        if not messages and not prompt:
            raise InvalidArgument("the request has neither messages nor prompt; give one")
        if prompt:
            return prompt
        assert replica.engine is not None
        return await replica.engine.apply_chat_template(
            _messages(list(messages)), add_generation_prompt=True
        )

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
        if not start.model:
            raise InvalidArgument("ChatStart.model is empty; name the model to use")
        replica = self.manager.find(
            start.model, start.replica if start.HasField("replica") else None
        )
        request_id = start.request_id or uuid.uuid4().hex
        params = sampling_params(start.params)
        params.lora = replica.lora  # an adapter model decodes with its adapter
        async with self.manager.slot(replica, request_id):
            assert replica.engine is not None
            engine = replica.engine
            prompt = await self._prompt(replica, list(start.messages), start.prompt)
            stream = engine.generate(request_id, prompt, params)

            cancelled = asyncio.Event()

            async def read_cancels() -> None:
                # The rest of the client stream: a cancel message (or half-close) ends here.
                with contextlib.suppress(Exception):
                    async for msg in request_iterator:
                        if msg.WhichOneof("kind") == "cancel":
                            cancelled.set()
                            await engine.abort(request_id)
                            return

            reader = asyncio.create_task(read_cancels(), name=f"cancel-reader-{request_id}")
            aborted = False
            finish_reason: str | None = None
            gone = False
            try:
                async for chunk in stream:
                    self.manager.progress += 1
                    if cancelled.is_set() and not aborted:
                        # A cancel read while the prompt was still being tokenized found no
                        # request to abort; the engine knows it by now.
                        aborted = await engine.abort(request_id) or chunk.finish_reason is not None
                    if chunk.finish_reason is not None:
                        finish_reason = chunk.finish_reason
                        yield inf.ChatResponse(
                            request_id=request_id,
                            delta=chunk.delta,
                            token_ids=chunk.token_ids,
                            finish_reason=FINISH.get(chunk.finish_reason, 0),
                            usage=_usage(chunk),
                            finished=True,
                        )
                        break
                    if chunk.delta or chunk.token_ids:
                        yield inf.ChatResponse(
                            request_id=request_id, delta=chunk.delta, token_ids=chunk.token_ids
                        )
            except (asyncio.CancelledError, GeneratorExit):
                gone = True  # client disconnect or deadline: the call went away mid-stream
                raise
            finally:
                reader.cancel()
                _count_end(replica, finish_reason, gone)
                # Closing the engine stream aborts the request in the engine (disconnect,
                # deadline or cancel all land here) before the slot is released.
                await stream.aclose()

    async def _generate_one(
        self, replica: HostedReplica, request_id: str, prompt: str, params: SamplingParams
    ) -> inf.Generation:
        assert replica.engine is not None
        text: list[str] = []
        last = GenerationChunk()
        stream = replica.engine.generate(request_id, prompt, params)
        gone = False
        try:
            async for chunk in stream:
                self.manager.progress += 1
                text.append(chunk.delta)
                last = chunk
        except asyncio.CancelledError:
            gone = True
            raise
        finally:
            _count_end(replica, last.finish_reason, gone)
            await stream.aclose()
        return inf.Generation(
            text="".join(text),
            finish_reason=FINISH.get(last.finish_reason or "", 0),
            usage=_usage(last),
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

        async def lane() -> None:
            # Each lane holds one slot and works through prompts, so a batch larger than the
            # free capacity runs in waves instead of being refused.
            while todo:
                i, prompt = todo.pop(0)
                async with self.manager.slot(replica, ids[i]):
                    results[i] = await self._generate_one(replica, ids[i], prompt, params)

        free = max(replica.status.max_concurrency - replica.inflight, 0)
        lanes = min(len(todo), free) or 1  # no free slot: the first lane raises RESOURCE_EXHAUSTED
        tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # the first failure fails the call ...
        finally:
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
            _messages(list(request.messages)), add_generation_prompt=request.add_generation_prompt
        )
        return inf.ApplyChatTemplateResponse(prompt=prompt)

    @rpc_handler
    async def GetModelMeta(
        self, request: inf.GetModelMetaRequest, context: grpc.aio.ServicerContext
    ) -> inf.GetModelMetaResponse:
        replica = self.manager.find(request.model)
        assert replica.engine is not None
        meta = replica.engine.meta()
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
                "tracked_request_ids": str(len(self.manager.requests)),
                "engine_active_requests": str(len(replica.engine.active_requests())),
                # Requests on the engine this model runs on, its adapters' included.
                "engine_load": str((replica.base or replica).engine_load),
                "loras": ",".join(replica.engine.loras()),
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
        return inf.AbortResponse(aborted=await self.manager.abort(request.request_id))
