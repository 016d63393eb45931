"""The OpenAI-compatible HTTP API in front of the mesh: the FastAPI application.

Each request is forwarded with the SDK's async transport, on the client of the caller's
bearer token (:class:`~llmesh.gateway.pool.ClientPool`), so it gets the SDK's routing,
retries before output and mid-stream failover; the gateway itself holds no state and any
number of them can run behind a load balancer.

A streamed completion waits for its first batch of output before the HTTP response starts:
an error up to that point (unknown model, bad parameter, full queue, no replica) is still an
HTTP status with OpenAI's error body; one after it is an ``error`` event in the stream
followed by ``data: [DONE]``, as vLLM's server does.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmesh.client import ByzerLLM
from llmesh.common.errors import FailedPrecondition, LLMeshError, Unimplemented
from llmesh.gateway import shapes
from llmesh.gateway.errors import (
    GatewayError,
    bad_request,
    error_reply,
    missing_token,
    validation_reply,
)
from llmesh.gateway.metrics import ROUTES, GatewayMetrics, MetricsMiddleware
from llmesh.gateway.pool import ClientPool
from llmesh.gateway.sse import DONE, SSEResponse, TokenEvents, event
from llmesh.llm_config import GenerationConfig
from llmesh.sdk.ops import Steps, WorkerCall, steps
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import inference_service_pb2 as inf

T = TypeVar("T")

#: How long /health waits for the control plane's health check.
HEALTH_TIMEOUT_S = 2.0


@dataclass
class GatewaySettings:
    """What a gateway serves and how.

    Attributes:
        control_plane: ``host:port`` of the control plane.
        require_token: refuse requests without ``Authorization: Bearer`` (401) before they
            reach the mesh; the mesh checks the token either way when it runs with ``--auth``.
        pool: the SDK clients by token (made from ``control_plane`` when None).
        metrics: the metric set (a fresh one when None).
    """

    control_plane: str
    require_token: bool = False
    pool: ClientPool | None = None
    metrics: GatewayMetrics | None = field(default=None)


@dataclass
class _Choice:
    """One choice of a non-streamed completion, as it accumulates."""

    parts: list[str] = field(default_factory=list)
    finish: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, batch: list[inf.ChatResponse]) -> None:
        for response in batch:
            if response.delta:
                self.parts.append(response.delta)
            if response.finished:
                self.finish = response.finish_reason
                if response.HasField("usage"):
                    self.prompt_tokens = response.usage.prompt_tokens
                    self.completion_tokens = response.usage.completion_tokens

    @property
    def text(self) -> str:
        return "".join(self.parts)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class ClientGone(Exception):
    """The client disconnected before its answer was ready (nobody reads an error now)."""


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` unless the client goes away first (then it is cancelled, and with it the
    requests it runs on the replicas)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if task.cancelled():
        raise ClientGone
    return task.result()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _in_terms_of(plan: shapes.ChatPlan | None, exc: LLMeshError) -> Exception:
    """``exc`` in the caller's terms: an engine that cannot enforce the schema that tools or
    ``response_format`` asked for is the request's fault (400), not a missing replica."""
    if (
        plan is not None
        and plan.schema is not None
        and isinstance(exc, (Unimplemented, FailedPrecondition))
        and "structured" in str(exc)
    ):
        return bad_request(
            f"this model cannot enforce tools / response_format while decoding ({exc}); "
            "deploy it on an engine with structured output (transformers, vllm) or leave "
            "response_format out",
            "response_format",
        )
    return exc


class Gateway:
    """The route handlers; one per application.

    Args:
        settings: see :class:`GatewaySettings`.
    """

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.pool = (
            settings.pool if settings.pool is not None else ClientPool(settings.control_plane)
        )
        self.metrics = settings.metrics if settings.metrics is not None else GatewayMetrics()

    def token(self, request: Request) -> str | None:
        """The caller's bearer token (None: none), refused here if one is required."""
        token = _bearer(request)
        if token is None and self.settings.require_token:
            raise missing_token()
        return token

    # -- chat and text completions --------------------------------------------------------

    async def chat(self, request: Request, body: shapes.ChatCompletionRequest) -> Response:
        token = self.token(request)
        plan = shapes.ChatPlan(body)
        starts = [plan.start(body.model, i) for i in range(body.n)]
        if body.stream:
            if body.n != 1:
                raise bad_request("stream with n > 1 is not supported; stream n=1 requests", "n")
            return await self._stream(request, token, body, starts[0], plan.config, plan)
        async with self.pool.lease(token) as client:
            choices = await _until_disconnect(
                request, self._collect_all(client, body.model, starts, plan.config, plan)
            )
        created = int(time.time())
        out = []
        for i, choice in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": choice.text}
            reason = shapes.FINISH_REASONS.get(choice.finish)
            calls = plan.tool_calls(choice.text)
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
                reason = "tool_calls"
            out.append({"index": i, "message": message, "logprobs": None, "finish_reason": reason})
        return JSONResponse(
            {
                "id": f"chatcmpl-{starts[0].request_id}",
                "object": "chat.completion",
                "created": created,
                "model": body.model,
                "choices": out,
                "usage": self._total_usage(choices, body.n),
            }
        )

    async def completion(self, request: Request, body: shapes.CompletionRequest) -> Response:
        token = self.token(request)
        shapes.check_completion(body)
        prompts = shapes.completion_prompts(body.prompt)
        config = shapes.generation(body, body.max_tokens)
        starts = [
            inf.ChatStart(
                model=body.model,
                prompt=prompt,
                params=shapes.seeded(config, i),
                request_id=uuid.uuid4().hex,
            )
            for prompt in prompts
            for i in range(body.n)
        ]
        if len(starts) > shapes.MAX_CHOICES:
            raise bad_request(
                f"{len(prompts)} prompts x n={body.n} is more than {shapes.MAX_CHOICES} "
                "completions in one request; split it",
                "prompt",
            )
        if body.stream:
            if len(starts) != 1:
                raise bad_request(
                    "stream with several prompts or n > 1 is not supported; stream one "
                    "prompt per request",
                    "stream",
                )
            return await self._stream(request, token, body, starts[0], config, None)
        async with self.pool.lease(token) as client:
            choices = await _until_disconnect(
                request, self._collect_all(client, body.model, starts, config, None)
            )
        out = [
            {
                "index": i,
                "text": c.text,
                "logprobs": None,
                "finish_reason": shapes.FINISH_REASONS.get(c.finish),
            }
            for i, c in enumerate(choices)
        ]
        return JSONResponse(
            {
                "id": f"cmpl-{starts[0].request_id}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": out,
                "usage": self._total_usage(choices, body.n),
            }
        )

    @staticmethod
    def _total_usage(choices: list[_Choice], n: int) -> dict[str, int]:
        # The choices are laid out prompt by prompt, n each; every choice of a prompt reads the
        # same prompt: count it once per prompt, as OpenAI and vLLM do.
        prompt = sum(c.prompt_tokens for c in choices[::n]) if choices else 0
        completion = sum(c.completion_tokens for c in choices)
        return _usage(prompt, completion)

    async def _collect_all(
        self,
        client: ByzerLLM,
        model: str,
        starts: list[inf.ChatStart],
        config: GenerationConfig,
        plan: shapes.ChatPlan | None,
    ) -> list[_Choice]:
        if len(starts) == 1:
            return [await self._collect(client, model, starts[0], config, plan)]
        # A TaskGroup, not gather: when one choice fails, the others are cancelled (and so
        # cancelled on their replicas) before the error goes to the caller.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(self._collect(client, model, s, config, plan)) for s in starts
                ]
        except Exception as group:  # the TaskGroup's ExceptionGroup: answer with the first
            first = getattr(group, "exceptions", None)
            if first:
                raise first[0] from None
            raise
        return [t.result() for t in tasks]

    async def _collect(
        self,
        client: ByzerLLM,
        model: str,
        start: inf.ChatStart,
        config: GenerationConfig,
        plan: shapes.ChatPlan | None,
    ) -> _Choice:
        choice = _Choice()
        stream = client.aio_transport.chat_batches(model, start, config)
        try:
            async with contextlib.aclosing(stream) as batches:
                async for batch in batches:
                    choice.add(batch)
        except LLMeshError as exc:
            raise _in_terms_of(plan, exc) from None
        return choice

    async def _stream(
        self,
        request: Request,
        token: str | None,
        body: shapes._Sampling,
        start: inf.ChatStart,
        config: GenerationConfig,
        plan: shapes.ChatPlan | None,
    ) -> Response:
        chat = plan is not None
        route = "/v1/chat/completions" if chat else "/v1/completions"
        arrived = time.perf_counter()
        # The client is leased until the response ends (SSEResponse closes ``held``), so the
        # pool never closes it under the running stream.
        held = contextlib.AsyncExitStack()
        try:
            client = await held.enter_async_context(self.pool.lease(token))
            stream = client.aio_transport.chat_batches(body.model, start, config)
            held.push_async_callback(stream.aclose)
            first = await _until_disconnect(request, stream.__anext__())
        except BaseException as exc:
            await held.aclose()
            if isinstance(exc, LLMeshError):
                raise _in_terms_of(plan, exc) from None
            raise
        self.metrics.ttft.labels(route).observe(time.perf_counter() - arrived)
        kind = "chat.completion.chunk" if chat else "text_completion"
        prefix = "chatcmpl" if chat else "cmpl"
        head = (
            f'"id":"{prefix}-{start.request_id}","object":"{kind}",'
            f'"created":{int(time.time())},"model":{json.dumps(body.model)}'
        )
        events = TokenEvents(head, 0, chat=chat, token_ids=body.return_token_ids)
        usage = body.stream_options is not None and body.stream_options.include_usage
        buffered = plan is not None and bool(plan.tools)
        return SSEResponse(
            self._events(stream, first, events, usage=usage, plan=plan, buffered=buffered),
            on_close=held.aclose,
        )

    async def _events(
        self,
        stream: AsyncIterator[list[inf.ChatResponse]],
        first: list[inf.ChatResponse],
        events: TokenEvents,
        *,
        usage: bool,
        plan: shapes.ChatPlan | None,
        buffered: bool,
    ) -> AsyncIterator[bytes]:
        # The hot loop: one event per batch of deltas.
        route = "/v1/chat/completions" if events.chat else "/v1/completions"
        choice = _Choice()
        ended = False
        try:
            if events.chat:
                yield events.role()
            batch: list[inf.ChatResponse] | None = first
            while batch is not None:
                if buffered:
                    choice.add(batch)
                else:
                    last = batch[-1]
                    if last.finished:
                        choice.add([last])
                    if len(batch) == 1:
                        if last.delta or (events.token_ids and last.token_ids):
                            yield events.text(last.delta, last.token_ids)
                    else:
                        text = "".join(r.delta for r in batch)
                        ids = [i for r in batch for i in r.token_ids] if events.token_ids else None
                        if text or ids:
                            yield events.text(text, ids)
                if batch[-1].finished:
                    # Let the SDK's stream end on its own (it counts a migrated request as
                    # resumed once it ends); it yields nothing after the final message.
                    with contextlib.suppress(StopAsyncIteration):
                        await stream.__anext__()
                    break
                batch = await stream.__anext__()
            ended = True
            reason = shapes.FINISH_REASONS.get(choice.finish)
            extra: dict[str, Any] | None = None
            if buffered and plan is not None:
                calls = plan.tool_calls(choice.text)
                if calls is not None:
                    reason = "tool_calls"
                    extra = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
                elif choice.text:
                    yield events.text(choice.text)
            yield events.finish(reason, extra)
            if usage:
                yield events.usage(_usage(choice.prompt_tokens, choice.completion_tokens))
            yield DONE
        except LLMeshError as exc:
            ended = True
            yield event(error_reply(_in_terms_of(plan, exc)).body)
            yield DONE
        except GatewayError as exc:
            ended = True
            yield event(error_reply(exc).body)
            yield DONE
        except Exception as exc:  # noqa: BLE001 - a bug must not truncate the stream silently
            ended = True
            yield event(error_reply(exc).body)  # logs it with its traceback
            yield DONE
        finally:
            if not ended:
                self.metrics.disconnects.labels(route).inc()
            await stream.aclose()  # type: ignore[attr-defined]

    # -- embeddings, rerank, models, health -----------------------------------------------

    async def embeddings(self, request: Request, body: shapes.EmbeddingRequest) -> Response:
        token = self.token(request)
        texts = shapes.embedding_inputs(body)

        def call() -> Steps[inf.EmbedResponse]:
            req = inf.EmbedRequest(model=body.model, texts=texts, normalize=True)
            return (yield WorkerCall(body.model, cp.PURPOSE_EMBEDDING, "Embed", req, None))

        async with self.pool.lease(token) as client:
            response = await _until_disconnect(request, client.aio_transport.run(call()))
        data = []
        for i, vector in enumerate(response.embeddings):
            values: Any = list(vector.values)
            if body.encoding_format == "base64":
                values = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append({"object": "embedding", "index": i, "embedding": values})
        prompt = response.usage.prompt_tokens
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
        )

    async def rerank(self, request: Request, body: shapes.RerankRequest) -> Response:
        token = self.token(request)
        texts = shapes.rerank_documents(body)

        def call() -> Steps[inf.RerankResponse]:
            req = inf.RerankRequest(model=body.model, query=body.query, documents=texts)
            return (yield WorkerCall(body.model, cp.PURPOSE_RERANK, "Rerank", req, None))

        async with self.pool.lease(token) as client:
            response = await _until_disconnect(request, client.aio_transport.run(call()))
        order = sorted(range(len(texts)), key=lambda i: -response.scores[i])
        if body.top_n is not None:
            order = order[: body.top_n]
        results = []
        for i in order:
            item: dict[str, Any] = {"index": i, "relevance_score": float(response.scores[i])}
            if body.return_documents:
                item["document"] = {"text": texts[i]}
            results.append(item)
        return JSONResponse(
            {
                "id": f"rerank-{uuid.uuid4().hex}",
                "model": body.model,
                "usage": {"total_tokens": 0},
                "results": results,
            }
        )

    async def models(self, request: Request) -> Response:
        async with self.pool.lease(self.token(request)) as client:
            listed = await client.aio_transport.run(steps(client.list_models)())
        data = []
        for model in listed:
            entry: dict[str, Any] = {
                "id": model.name,
                "object": "model",
                "created": 0,
                "owned_by": "llmesh",
                "root": model.model_path,
                "parent": model.base_model or None,
                "backend": model.backend,
                "ready_replicas": sum(
                    1 for r in model.replicas if r.state == common_pb2.REPLICA_STATE_READY
                ),
            }
            data.append(entry)
        return JSONResponse({"object": "list", "data": data})

    async def health(self) -> Response:
        try:
            async with self.pool.lease(None) as client:
                channel = client.router.aio_channels.get(self.settings.control_plane)
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT_S
                )
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        except Exception as exc:  # noqa: BLE001 - any failure is "cannot reach it"
            return JSONResponse(
                {
                    "status": "unavailable",
                    "control_plane": self.settings.control_plane,
                    "reason": str(exc)[:300],
                },
                status_code=503,
            )
        if not serving:
            return JSONResponse(
                {
                    "status": "unavailable",
                    "control_plane": self.settings.control_plane,
                    "reason": "the control plane reports NOT_SERVING",
                },
                status_code=503,
            )
        return JSONResponse({"status": "ok", "control_plane": self.settings.control_plane})

    async def close(self) -> None:
        """Close the SDK clients."""
        await self.pool.close()


def _json_error(exc: BaseException) -> JSONResponse:
    reply = error_reply(exc)
    return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's FastAPI application.

    Args:
        settings: see :class:`GatewaySettings`. ``app.state.gateway`` holds the handlers;
            ``await app.state.gateway.close()`` closes its SDK clients.
    """
    gateway = Gateway(settings)
    app = FastAPI(title="llmesh gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reply = validation_reply(list(exc.errors()))
        return JSONResponse(reply.body, status_code=reply.status)

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(LLMeshError)
    async def _mesh_error(request: Request, exc: LLMeshError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        path = request.url.path
        gateway.metrics.disconnects.labels(path if path in ROUTES else "other").inc()
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _json_error(exc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: shapes.ChatCompletionRequest) -> Response:
        return await gateway.chat(request, body)

    @app.post("/v1/completions")
    async def completions(request: Request, body: shapes.CompletionRequest) -> Response:
        return await gateway.completion(request, body)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: shapes.EmbeddingRequest) -> Response:
        return await gateway.embeddings(request, body)

    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        app.add_api_route(path, _rerank_route(gateway), methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await gateway.models(request)

    @app.get("/health")
    async def health() -> Response:
        return await gateway.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(MetricsMiddleware, metrics=gateway.metrics)
    return app


def _rerank_route(gateway: Gateway) -> Callable[..., Awaitable[Response]]:
    async def rerank(request: Request, body: shapes.RerankRequest) -> Response:
        return await gateway.rerank(request, body)

    return rerank
