"""The Byzer-LLM compatible client: ``ByzerLLM`` talks to an llmesh mesh over gRPC.

Existing Byzer-LLM code keeps working: the same method names, argument shapes and return shapes
(``chat_oai`` returns ``list[LLMResponse]``, ``stream_chat_oai`` yields ``(text_so_far,
metadata)``, ``emb`` puts the vector in ``LLMResponse.output``, ...). What changes is underneath:
instead of Ray actors, the client asks the control plane where a model runs (once, then follows a
``WatchModel`` stream) and sends requests straight to the inference workers.

The API is synchronous and thread-safe; one client can serve many threads.

Example::

    from llmesh import ByzerLLM

    llm = ByzerLLM()  # control plane at $LLMESH_CONTROL_PLANE or 127.0.0.1:50051
    llm.setup_default_model_name("chat")
    print(llm.chat_oai([{"role": "user", "content": "hello"}])[0].output)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from llmesh import decorators, training
from llmesh import functions as fn
from llmesh.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    LLMeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from llmesh.common.job_rules import is_final, kind_name, state_name, validate_spec
from llmesh.common.tracing import client_span
from llmesh.functions import (
    ExecuteCodeResponse,
    FunctionCallList,
    LLMClassResponse,
    LLMFunctionCallResponse,
)
from llmesh.llm_config import (
    CONFIG_PREFIXES,
    MAX_TOKENS_KEYS,
    GenerationConfig,
    as_float,
    as_int,
    byzer_flags,
    generation_config,
    strip_config_prefix,
)
from llmesh.route_cache import (
    CONTROL_CALL_TIMEOUT_S,
    WORKER_CALL_TIMEOUT_S,
    ChannelPool,
    RouteCache,
    call_unary,
    rpc_errors,
)
from llmesh.sdk.setup import SetupMixin
from llmesh.sdk.shapes import (
    EventCallback,
    EventCallbackResult,
    EventName,
    InferBackend,
    LLMRequest,
    LLMResponse,
    Role,
    SingleOutputMeta,
    default_control_plane,
    normalize_backend,
)
from llmesh.streams import (
    CANCEL_GRACE_S,
    FINISH_REASONS,
    AioChannels,
    _Attempts,
    _ChatCall,
    _name_worker,
    _normalize_pairs,
    _param_str,
    _Progress,
    aio_chat_stream,
    iterate_in_thread,
    meta_dict,
    rerank_output,
)
from llmesh.templates import (
    DEFAULT_ROLE_MAPPING,
    EMPTY_ROLE_MAPPING,
    Template,
    Templates,
    render_with_role_mapping,
)
from llmesh.training import TrainingJobFailed
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc
from llmesh.v1 import trainer_service_pb2 as tr

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Attempts of CreateTrainingJob on UNAVAILABLE / DEADLINE_EXCEEDED (same request_id each time).
CREATE_JOB_ATTEMPTS = 4
#: Reconnects of a job watch in a row without a message before the outage is reported.
WATCH_RECONNECTS = 8
WATCH_BACKOFF_MAX_S = 3.0


# --------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------


def to_chat_messages(conversations: Sequence[Mapping[str, Any]]) -> list[common_pb2.ChatMessage]:
    """Convert OpenAI-style ``[{"role": ..., "content": ...}]`` into ChatMessage protos.

    Extra keys (Byzer-LLM agents attach ``metadata``) are ignored.

    Raises:
        InvalidArgument: not a non-empty list of messages with a role and a string content.
    """
    if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
        raise InvalidArgument(
            "conversations must be a list of {'role': ..., 'content': ...} dicts, "
            f"got {type(conversations).__name__}"
        )
    if not conversations:
        raise InvalidArgument("conversations is empty; give at least one message")
    messages = []
    for i, item in enumerate(conversations):
        if not isinstance(item, Mapping):
            raise InvalidArgument(f"conversations[{i}] must be a dict, got {type(item).__name__}")
        role = item.get("role")
        content = item.get("content")
        if not isinstance(role, str) or not role:
            raise InvalidArgument(f"conversations[{i}] has no 'role'")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InvalidArgument(
                f"conversations[{i}]['content'] must be a string "
                f"(multi-part content is not supported yet), got {type(content).__name__}"
            )
        messages.append(common_pb2.ChatMessage(role=role, content=content))
    return messages


def _echo_input(
    conversations: Sequence[Mapping[str, Any]], prompt: str | None, llm_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``LLMResponse.input`` Byzer-LLM users see: instruction, history and the config."""
    if prompt is not None:
        return {"instruction": prompt, "history": [], **llm_config}
    history = [{k: v for k, v in item.items() if k != "metadata"} for item in conversations[:-1]]
    return {"instruction": conversations[-1].get("content", ""), "history": history, **llm_config}


def _to_response(item: Any, clean: Callable[[str], str]) -> LLMResponse:
    """A raw result item (``{"predict", "input", "metadata"}``) as an :class:`LLMResponse`.

    Event callbacks may also hand back ready :class:`LLMResponse` objects.
    """
    if isinstance(item, LLMResponse):
        output = clean(item.output) if isinstance(item.output, str) else item.output
        return LLMResponse(output=output, input=item.input, metadata=dict(item.metadata))
    if not isinstance(item, Mapping) or "predict" not in item:
        raise InvalidArgument(
            "an event callback returned a result item without 'predict'; return a list of "
            "{'predict': text, 'input': ..., 'metadata': {...}} dicts"
        )
    output = item["predict"]
    return LLMResponse(
        output=clean(output) if isinstance(output, str) else output,
        input=item.get("input", {}),
        metadata=dict(item.get("metadata") or {}),
    )


#: llm_config keys the SDK itself reads and never sends: ``structured_output`` (False turns
#: schema enforcement off) and ``max_tool_calls`` (most tool calls the enforced schema allows).
_SDK_KEYS = frozenset({"structured_output", "max_tool_calls"})


def _structured_refused(start: inf.ChatStart, exc: LLMeshError) -> bool:
    """True when the engine refused the request because it cannot enforce the schema."""
    return start.params.HasField("structured_output") and "structured" in str(exc)


def _advance(steps: Generator[Any, Any, Any], value: Any) -> tuple[bool, Any]:
    """Send ``value`` into ``steps``: ``(False, next request)`` or ``(True, final result)``.

    StopIteration is turned into a return value because it cannot cross
    ``asyncio.to_thread``.
    """
    try:
        return False, steps.send(value)
    except StopIteration as stop:
        return True, stop.value


#: Most concurrent requests one batched ``chat`` call makes.
MAX_BATCH_THREADS = 8

# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class ByzerLLM(SetupMixin):
    """Byzer-LLM's client API over an llmesh mesh.

    Args:
        control_plane: ``host:port`` of the control plane (Byzer-LLM's first argument was
            ``url``). Defaults to ``$LLMESH_CONTROL_PLANE``, else ``127.0.0.1:50051``.
        **kwargs: Byzer-LLM options; ``verbose``, ``force_skip_context_length_check`` and
            ``default_max_output_length`` are kept, ``first_route_timeout`` sets how long the
            first request for a model waits for its route stream. Others are ignored.
    """

    def __init__(self, control_plane: str | None = None, **kwargs: Any) -> None:
        self.control_plane = (control_plane or "").strip() or default_control_plane()
        self._init_settings(kwargs)
        self.func_impl_cache: dict[str, Callable[..., Any]] = {}
        self.event_callbacks: dict[EventName, list[EventCallback]] = {}
        self.meta_cache: dict[str, dict[str, Any]] = {}
        self._pool = ChannelPool()
        self._control = cp_grpc.ControlPlaneServiceStub(self._pool.get(self.control_plane))
        route_kwargs = {}
        if "first_route_timeout" in kwargs:
            route_kwargs["first_snapshot_timeout"] = float(kwargs["first_route_timeout"])
        self._routes = RouteCache(self._pool.get(self.control_plane), **route_kwargs)
        self._aio_channels = AioChannels()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the route watches and close every channel. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self._routes.close()
        self._pool.close()

    def __enter__(self) -> ByzerLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ByzerLLM(control_plane={self.control_plane!r})"

    # -- events ---------------------------------------------------------------------------

    def add_event_callback(self, event_name: EventName, callback: EventCallback) -> None:
        """Run ``callback`` at ``event_name`` on every chat call (see :class:`EventName`).

        Args:
            event_name: ``EventName.BEFORE_CALL_MODEL`` or ``EventName.AFTER_CALL_MODEL``.
            callback: returns ``(continue, value)``; ``(False, value)`` short-circuits.
        """
        self.event_callbacks.setdefault(event_name, []).append(callback)

    def _trigger_event(self, event_name: EventName, *args: Any, **kwargs: Any) -> Any:
        """Run the callbacks in order; the first that says stop gives the value (else None)."""
        for callback in self.event_callbacks.get(event_name, ()):
            keep_going, value = callback(*args, **kwargs)
            if not keep_going:
                return value
        return None

    def _pick(
        self, model: str, purpose: int, attempts: _Attempts, affinity_key: str = ""
    ) -> common_pb2.Replica:
        try:
            return self._routes.pick(
                model,
                purpose=purpose,
                policy=self._policy(),
                purpose_pins=self._pins(purpose),
                affinity_key=affinity_key,
                exclude=attempts.tried,
            )
        except LLMeshError as exc:
            # Having run out of replicas to retry on, report why the last one failed.
            if attempts.last_error is not None:
                raise attempts.last_error from None
            if isinstance(exc, Unavailable):  # only the control plane is asked while picking
                raise self._unavailable_control_plane(exc) from exc
            raise

    def _unavailable_control_plane(self, exc: Unavailable) -> Unavailable:
        return Unavailable(f"the control plane at {self.control_plane} is unavailable: {exc}")

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("this ByzerLLM client is closed; create a new one")

    def _control_call(self, method: str, request: Any, *, timeout: float) -> Any:
        """One unary control-plane call; an outage names the address that was tried."""
        self._check_open()
        try:
            return call_unary(
                getattr(self._control, method),
                request,
                name=f"ControlPlaneService/{method}",
                timeout=timeout,
            )
        except Unavailable as exc:
            raise self._unavailable_control_plane(exc) from exc

    def _worker(self, address: str) -> inf_grpc.InferenceServiceStub:
        self._check_open()
        return inf_grpc.InferenceServiceStub(self._pool.get(address))

    def _worker_call(
        self,
        model: str,
        purpose: int,
        name: str,
        invoke: Callable[[inf_grpc.InferenceServiceStub, Sequence[tuple[str, str]]], T],
    ) -> T:
        """Run one unary worker call for ``model`` with replica selection and retries."""
        attempts = _Attempts()
        while True:
            replica = self._pick(model, purpose, attempts)
            self._routes.started(replica)
            try:
                with rpc_errors(), client_span(name) as metadata:
                    return invoke(self._worker(replica.address), metadata)
            except (Unavailable, ResourceExhausted) as exc:
                attempts.failed(self._routes, replica, _name_worker(replica, exc))
            finally:
                self._routes.finished(replica)

    def _chat_stream(
        self, model: str, start: inf.ChatStart, config: GenerationConfig
    ) -> Iterator[inf.ChatResponse]:
        """Yield the worker's Chat responses, retrying on another replica before any output.

        Closing this generator early cancels the request on the worker.
        """
        attempts = _Attempts()
        while True:
            replica = self._pick(model, cp.PURPOSE_CHAT, attempts, config.affinity_key)
            start.replica = replica.index
            received = False
            self._routes.started(replica)
            try:
                # The span covers opening the call only: a span held open across yields would
                # leak its context into the caller's code between items.
                with client_span("InferenceService/Chat") as metadata:
                    chat = _ChatCall(
                        self._worker(replica.address),
                        start,
                        timeout=config.timeout,
                        metadata=metadata,
                    )
                finished = False
                try:
                    with rpc_errors():
                        for response in chat.call:
                            received = True
                            if response.finished:
                                finished = True
                            yield response
                            if finished:
                                break
                finally:
                    if finished:
                        chat.end_requests()
                    else:
                        chat.cancel()
                if not finished:
                    # _name_worker below adds which worker it was.
                    raise Unavailable("the chat stream ended without a final message")
                return
            except (Unavailable, ResourceExhausted) as exc:
                named = _name_worker(replica, exc)
                if received:
                    raise named from exc
                attempts.failed(self._routes, replica, named)
            finally:
                self._routes.finished(replica)

    def _chat_start(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str,
        role_mapping: Mapping[str, Any] | None,
        config: GenerationConfig,
    ) -> tuple[inf.ChatStart, str | None]:
        messages = to_chat_messages(conversations)
        if role_mapping is None:
            role_mapping = self.settings_of(model).role_mapping
        start = inf.ChatStart(
            model=model,
            params=config.params,
            request_id=config.request_id or uuid.uuid4().hex,
        )
        prompt = None
        if role_mapping is not None:
            prompt = render_with_role_mapping(conversations, role_mapping)
            start.prompt = prompt
        else:
            start.messages.extend(messages)
        return start, prompt

    # -- chat -----------------------------------------------------------------------------

    def _structured_allowed(self, model: str, flags: Mapping[str, Any]) -> bool:
        """Whether to ask the engine for constrained decoding on this call.

        On unless the call says ``llm_config["structured_output"] = False`` or the model's
        meta says ``structured_output`` is false. Engines that cannot enforce it fall back to
        the prompt alone (see :meth:`_query_chat`).
        """
        if "structured_output" in flags:
            return bool(flags["structured_output"])
        try:
            flag = self.get_meta(model).get("structured_output")
        except LLMeshError:
            return True
        return str(flag).strip().lower() not in ("false", "0", "no")

    def _has_length_limits(self, model: str) -> bool:
        return not self.force_skip_context_length_check and bool(
            self.get_max_input_length(model)
            or self.get_max_model_length(model)
            or self.settings_of(model).max_output_length is not None
        )

    def _check_context_length(self, model: str, start: inf.ChatStart) -> None:
        """Byzer-LLM's context-length checks, before the request leaves.

        Only runs when a limit was set for the model (``setup_max_input_length``,
        ``setup_max_model_length`` or ``setup_max_output_length``) and
        ``force_skip_context_length_check`` is off. Without an explicit ``max_tokens`` the
        call generates at most ``get_max_output_length(model)`` tokens. When the prompt
        cannot be measured (tokenizer unavailable) the checks are skipped, as in Byzer-LLM.

        Raises:
            InvalidArgument: the prompt is longer than ``max_input_length``, or prompt plus
                output would not fit ``max_model_length``.
        """
        if not self._has_length_limits(model):
            return
        max_input = self.get_max_input_length(model)
        max_model = self.get_max_model_length(model)
        if not start.params.HasField("max_tokens"):
            start.params.max_tokens = self.get_max_output_length(model)
        if not (max_input or max_model):
            return
        try:
            if start.prompt:
                text, special = start.prompt, True
            else:
                conversations = [{"role": m.role, "content": m.content} for m in start.messages]
                text, special = self.apply_chat_template(model, conversations), False
            ids = self.tokenize(model, text, {"add_special_tokens": special})[0].output[0]
        except LLMeshError as exc:
            log.debug("context-length check of %s skipped: %s", model, exc)
            return
        input_size = len(ids)
        if max_input and input_size > max_input:
            raise InvalidArgument(
                f"input length {input_size} is larger than max_input_length {max_input}"
            )
        output_size = start.params.max_tokens
        if max_model and input_size + output_size > max_model:
            raise InvalidArgument(
                f"input_size ({input_size}) + max_output_length {output_size} is larger than "
                f"model context length {max_model}"
            )

    def _query_chat(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any],
        schema: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """One chat call with length checks, event callbacks and the model's clean_func.

        Args:
            model: the model.
            conversations: the messages to send.
            role_mapping: render a prompt with it; None sends messages (chat template).
            llm_config: the merged generation config (model defaults and the call's).
            schema: a JSON schema to enforce while decoding, or None.
        """
        flags = {strip_config_prefix(str(k)): v for k, v in llm_config.items()}
        structured = schema is not None and self._structured_allowed(model, flags)
        config, start, input_value = self._query_parts(
            model, conversations, role_mapping, llm_config, schema if structured else None
        )
        self._check_context_length(model, start)
        result = self._trigger_event(EventName.BEFORE_CALL_MODEL, self, model, input_value)
        if result is None:
            result = self._after_call(model, input_value, self._run_chat(model, start, config))
        return self._responses(model, result)

    async def _aquery_chat(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any],
        schema: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """:meth:`_query_chat` over grpc.aio; blocking look-ups run on a worker thread."""
        flags = {strip_config_prefix(str(k)): v for k, v in llm_config.items()}
        structured = schema is not None and await asyncio.to_thread(
            self._structured_allowed, model, flags
        )
        config, start, input_value = self._query_parts(
            model, conversations, role_mapping, llm_config, schema if structured else None
        )
        if self._has_length_limits(model):
            await asyncio.to_thread(self._check_context_length, model, start)
        result = self._trigger_event(EventName.BEFORE_CALL_MODEL, self, model, input_value)
        if result is None:
            progress = await self._arun_chat(model, start, config)
            result = self._after_call(model, input_value, progress)
        return self._responses(model, result)

    def _query_parts(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any],
        schema: Mapping[str, Any] | None,
    ) -> tuple[GenerationConfig, inf.ChatStart, list[dict[str, Any]]]:
        wire = {k: v for k, v in llm_config.items() if strip_config_prefix(str(k)) not in _SDK_KEYS}
        config = generation_config(wire)
        if schema is not None:
            config.params.structured_output.json_schema = json.dumps(schema, ensure_ascii=False)
        start, prompt = self._chat_start(conversations, model, role_mapping, config)
        return config, start, [_echo_input(conversations, prompt, llm_config)]

    def _after_call(
        self, model: str, input_value: list[dict[str, Any]], progress: _Progress
    ) -> list[Any]:
        result = [
            {"predict": progress.text, "input": input_value[0], "metadata": progress.metadata()}
        ]
        replaced = self._trigger_event(EventName.AFTER_CALL_MODEL, model, result)
        return result if replaced is None else replaced

    def _responses(self, model: str, result: Sequence[Any]) -> list[LLMResponse]:
        clean = self.clean_func_of(model)
        return [_to_response(item, clean) for item in result]

    async def _arun_chat(
        self, model: str, start: inf.ChatStart, config: GenerationConfig
    ) -> _Progress:
        progress = _Progress(start.request_id)
        try:
            async with contextlib.aclosing(aio_chat_stream(self, model, start, config)) as stream:
                async for response in stream:
                    progress.add(response)
        except (Unimplemented, FailedPrecondition) as exc:
            if not _structured_refused(start, exc):
                raise
            log.info("model %s cannot enforce structured output (%s); prompt only", model, exc)
            start.params.ClearField("structured_output")
            config.params.ClearField("structured_output")
            return await self._arun_chat(model, start, config)
        return progress

    def _run_chat(self, model: str, start: inf.ChatStart, config: GenerationConfig) -> _Progress:
        progress = _Progress(start.request_id)
        try:
            for response in self._chat_stream(model, start, config):
                progress.add(response)
        except (Unimplemented, FailedPrecondition) as exc:
            # An engine that cannot enforce the schema: the prompt alone has to do.
            if not _structured_refused(start, exc):
                raise
            log.info("model %s cannot enforce structured output (%s); prompt only", model, exc)
            start.params.ClearField("structured_output")
            config.params.ClearField("structured_output")
            return self._run_chat(model, start, config)
        return progress

    def chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tools: Sequence[Callable[..., Any] | str] | None = None,
        tool_choice: Callable[..., Any] | str | None = None,
        execute_tool: bool = False,
        impl_func: Callable[..., Any] | None = None,
        execute_impl_func: bool = False,
        impl_func_params: Mapping[str, Any] | None = None,
        func_params: Mapping[str, Any] | None = None,
        response_class: Any = None,
        response_after_chat: Any = False,
        enable_default_sys_message: bool = False,
        model: str | None = None,
        role_mapping: Mapping[str, Any] | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Chat with a model and return the whole answer.

        With ``tools`` / ``response_class`` the last message is rewritten into a prompt that
        asks for JSON (the per-model ``setup_*_format_func`` hooks can replace it), and the
        engine is asked to enforce the matching JSON schema while decoding
        (``GenerationParams.structured_output``), so the answer parses even from a small
        model. ``llm_config["structured_output"] = False`` turns the enforcement off; engines
        without it get the prompt alone.

        Security: model output is never executed unless asked: ``execute_tool=True`` calls
        your ``tools`` (Python functions) with the arguments the model chose;
        ``execute_impl_func=True`` runs the Python code the model wrote, in this process.

        Args:
            conversations: OpenAI-style messages, ``[{"role": "user", "content": "hi"}]``;
                not modified.
            tools: Python functions (or JSON descriptions as strings) the model may call.
            tool_choice: the one tool the model must call.
            execute_tool: call the chosen tools and return :class:`LLMFunctionCallResponse`.
            impl_func: a function stub (signature + docstring) for the model to implement;
                needs ``response_class`` for its result.
            execute_impl_func: run the generated code and return :class:`LLMClassResponse`.
            impl_func_params: keyword arguments for the generated function.
            func_params: extra keyword arguments for every executed tool (and for the
                generated function when ``impl_func_params`` is not given).
            response_class: a pydantic model class or a JSON-schema string; the answer is
                parsed into it (:class:`LLMClassResponse`).
            response_after_chat: chat freely first, then ask the model to restate its answer
                as ``response_class`` (two calls).
            enable_default_sys_message: add a system message describing the JSON abilities
                (``setup_base_system_messages`` replaces it) and use the short ``sys_*``
                prompts.
            model: the model; defaults to ``setup_default_model_name``.
            role_mapping: render the prompt with this Byzer-LLM role mapping instead of the
                model's chat template.
            llm_config: generation parameters (see :func:`generation_config`).

        Returns:
            A list with one result: :class:`LLMResponse` (``output`` is the answer,
            ``metadata`` holds ``request_id``, ``input_tokens_count``,
            ``generated_tokens_count``, ``finish_reason``, ``time_cost``,
            ``first_token_time``, ``speed``); :class:`LLMClassResponse` with
            ``response_class`` (or ``impl_func`` + ``execute_impl_func``);
            :class:`LLMFunctionCallResponse` with ``tools`` + ``execute_tool``.

        Raises:
            InvalidArgument: ``response_class`` together with tools, ``impl_func`` without
                ``response_class``, or a response class that is neither pydantic nor a string.
        """
        steps = self._chat_oai_steps(
            conversations,
            tools,
            tool_choice,
            execute_tool,
            impl_func,
            execute_impl_func,
            impl_func_params,
            func_params,
            response_class,
            response_after_chat,
            enable_default_sys_message,
            model,
            role_mapping,
            llm_config,
        )
        done, value = _advance(steps, None)
        while not done:
            done, value = _advance(steps, self._query_chat(*value))
        return value

    async def async_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tools: Sequence[Callable[..., Any] | str] | None = None,
        tool_choice: Callable[..., Any] | str | None = None,
        execute_tool: bool = False,
        impl_func: Callable[..., Any] | None = None,
        execute_impl_func: bool = False,
        impl_func_params: Mapping[str, Any] | None = None,
        func_params: Mapping[str, Any] | None = None,
        response_class: Any = None,
        response_after_chat: Any = False,
        enable_default_sys_message: bool = False,
        model: str | None = None,
        role_mapping: Mapping[str, Any] | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """:meth:`chat_oai` for asyncio code (an llmesh addition); same arguments and results.

        The model is called over grpc.aio on the running loop; prompt building, parsing and
        any tool or generated code run on a worker thread, so they never block the loop.
        """
        steps = self._chat_oai_steps(
            conversations,
            tools,
            tool_choice,
            execute_tool,
            impl_func,
            execute_impl_func,
            impl_func_params,
            func_params,
            response_class,
            response_after_chat,
            enable_default_sys_message,
            model,
            role_mapping,
            llm_config,
        )
        done, value = await asyncio.to_thread(_advance, steps, None)
        while not done:
            responses = await self._aquery_chat(*value)
            done, value = await asyncio.to_thread(_advance, steps, responses)
        return value

    def _chat_oai_steps(
        self,
        conversations: Sequence[Mapping[str, Any]],
        tools: Sequence[Callable[..., Any] | str] | None,
        tool_choice: Callable[..., Any] | str | None,
        execute_tool: bool,
        impl_func: Callable[..., Any] | None,
        execute_impl_func: bool,
        impl_func_params: Mapping[str, Any] | None,
        func_params: Mapping[str, Any] | None,
        response_class: Any,
        response_after_chat: Any,
        enable_default_sys_message: bool,
        model: str | None,
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any] | None,
    ) -> Generator[tuple[Any, ...], list[LLMResponse], list[Any]]:
        """``chat_oai`` without its transport: yields the model calls it needs (the arguments
        of :meth:`_query_chat`), is sent their responses, returns the final results."""
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if role_mapping is None:
            role_mapping = self.settings_of(name).role_mapping
        tools = list(tools or [])
        if response_class is not None and (tools or tool_choice is not None):
            raise InvalidArgument("give either tools (function calling) or response_class")
        if impl_func is not None and response_class is None:
            raise InvalidArgument("impl_func needs response_class: the class its result has")
        if response_class is not None:
            fn.class_schema(response_class)  # fail early on a bad class
        to_chat_messages(conversations)  # validate before copying
        messages = [copy.copy(dict(m)) for m in conversations]
        if enable_default_sys_message:
            base = self.settings_of(name).base_system_message or fn.base_ability_format()
            if messages[0].get("role") == "system":
                messages[0]["content"] = f"{base}\n{messages[0].get('content') or ''}"
            else:
                messages.insert(0, {"role": "system", "content": base})
        last = messages[-1]
        content = str(last.get("content") or "")
        sys_hooks = enable_default_sys_message
        schema: dict[str, Any] | None = None
        if tools or tool_choice is not None:
            hook = (
                (
                    self.settings_of(name).sys_function_calling_format_func
                    or fn.sys_function_calling_format
                )
                if sys_hooks
                else (
                    self.settings_of(name).function_calling_format_func
                    or fn.function_calling_format
                )
            )
            last["content"] = hook(content, tools, tool_choice)
            flags = byzer_flags(self._config_for(name, llm_config))
            max_calls = None
            if "max_tool_calls" in flags:
                max_calls = as_int("max_tool_calls", flags["max_tool_calls"])
            schema = fn.tool_calls_schema(tools, tool_choice, max_calls)
        elif impl_func is not None:
            hook = (
                (self.settings_of(name).sys_impl_func_format_func or fn.sys_function_impl_format)
                if sys_hooks
                else (self.settings_of(name).impl_func_format_func or fn.function_impl_format)
            )
            last["content"] = hook(content, impl_func, cls=response_class)
        elif response_class is not None and not response_after_chat:
            hook = (
                (
                    self.settings_of(name).sys_response_class_format_func
                    or fn.sys_response_class_format
                )
                if sys_hooks
                else (self.settings_of(name).response_class_format_func or fn.response_class_format)
            )
            last["content"] = hook(content, cls=response_class)
            schema = fn.class_schema(response_class)
        merged = self._config_for(name, llm_config)
        responses = yield (name, messages, role_mapping, merged, schema)

        if impl_func is not None:
            if not execute_impl_func:
                return responses
            return [
                fn.execute_generate_func(
                    func_name=impl_func.__name__,
                    impl_func_params=impl_func_params or func_params,
                    response=r,
                    response_class=response_class,
                )
                for r in responses
            ]
        if response_class is not None:
            if response_after_chat:
                after = (
                    self.settings_of(name).response_class_format_after_chat_func
                    or fn.response_class_format_after_chat
                )
                restated = []
                for r in responses:
                    again = yield (
                        name,
                        [
                            *messages,
                            {"role": "assistant", "content": r.output},
                            {"role": "user", "content": after(response_class)},
                        ],
                        role_mapping,
                        merged,
                        fn.class_schema(response_class),
                    )
                    restated.append(again[0])
                responses = restated
            return [fn.execute_response_format(r, response_class) for r in responses]
        if execute_tool:
            return [fn.execute_function_calling(r, tools, func_params) for r in responses]
        return responses

    def stream_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str | None = None,
        role_mapping: Mapping[str, Any] | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[str, SingleOutputMeta]]:
        """Chat with a model and yield the answer as it grows.

        Each item is ``(text_so_far, metadata)`` as in Byzer-LLM: the text is the whole answer
        up to now (after the model's ``clean_func``), not the newest piece. The metadata
        carries ``request_id`` from the first item (for :meth:`abort`); the last item carries
        the finish reason and the token counts. Breaking out of the loop (or closing the
        generator) cancels the request on the worker.

        Args:
            conversations: OpenAI-style messages.
            model: the model; defaults to ``setup_default_model_name``.
            role_mapping: render the prompt with this Byzer-LLM role mapping instead of the
                model's chat template.
            llm_config: generation parameters (see :func:`generation_config`).

        Yields:
            ``(text_so_far, SingleOutputMeta)``.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        config = generation_config(self._config_for(name, llm_config))
        start, _ = self._chat_start(conversations, name, role_mapping, config)
        self._check_context_length(name, start)
        return self._stream_texts(name, start, config)

    def _stream_texts(
        self, model: str, start: inf.ChatStart, config: GenerationConfig
    ) -> Iterator[tuple[str, SingleOutputMeta]]:
        progress = _Progress(start.request_id)
        clean = self.clean_func_of(model)
        stream = self._chat_stream(model, start, config)
        try:
            for response in stream:
                before = len(progress.parts)
                progress.add(response)
                if len(progress.parts) > before or response.finished:
                    yield clean(progress.text), SingleOutputMeta(progress.metadata())
        finally:
            stream.close()  # cancels on the worker when the caller stopped early

    async def async_stream_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None = None,
        model: str | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[tuple[str, SingleOutputMeta]]:
        """:meth:`stream_chat_oai` for asyncio code (note Byzer-LLM's argument order).

        The stream is a grpc.aio call on the running event loop (no thread per stream).
        Leaving the ``async for`` early, closing the generator or cancelling the task cancels
        the request on the worker. Errors are the same typed exceptions as the sync calls.

        Yields:
            ``(text_so_far, SingleOutputMeta)``.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        config = generation_config(self._config_for(name, llm_config))
        start, _ = self._chat_start(conversations, name, role_mapping, config)
        if self._has_length_limits(name):  # the checks may call the tokenizer (blocking)
            await asyncio.to_thread(self._check_context_length, name, start)
        progress = _Progress(start.request_id)
        clean = self.clean_func_of(name)
        async with contextlib.aclosing(aio_chat_stream(self, name, start, config)) as stream:
            async for response in stream:
                before = len(progress.parts)
                progress.add(response)
                if len(progress.parts) > before or response.finished:
                    yield clean(progress.text), SingleOutputMeta(progress.metadata())

    async def aclose_async_channels(self) -> None:
        """Close the grpc.aio channels the running event loop used (``async_*`` calls)."""
        await self._aio_channels.close()

    def _instruction_conversations(
        self, instruction: str, role_mapping: Mapping[str, Any] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Byzer-LLM's ``chat`` prompt for one instruction: (messages, role mapping to use)."""
        user = [{"role": "user", "content": instruction}]
        if role_mapping is None:
            return user, None
        if not role_mapping.get("user_role"):
            # Byzer-LLM sent such instructions as the raw prompt.
            return user, dict(EMPTY_ROLE_MAPPING)
        system = str(role_mapping.get("system_msg", ""))
        if "system_msg_func" in role_mapping:
            # The template's system_msg is a layout, not a message: fill it with a neutral one.
            system = "You are a helpful assistant. Think carefully and answer correctly."
        return [{"role": "system", "content": system}, *user], dict(role_mapping)

    def chat(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """Byzer-LLM's older completion API: one instruction or a batch.

        Each instruction is one user turn. With a role mapping for the model (from
        :meth:`setup_role_mapping` / :meth:`setup_template`) it is rendered as Byzer-LLM did
        (a system line, the user line, the assistant opener); otherwise the model's chat
        template renders it. A batch runs concurrently, one request per instruction.

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            request: an :class:`LLMRequest` (``instruction`` is a text or a list of texts;
                ``max_length``, ``top_p``, ``temperature`` become the generation config) or
                a plain text.
            extract_params: more ``llm_config`` entries; they win over the request's fields.

        Returns:
            One :class:`LLMResponse` per instruction, in order.
        """
        queries = self._chat_queries(model, request, extract_params)

        def one(query: tuple[Any, ...]) -> LLMResponse:
            return self._query_chat(*query)[0]

        if len(queries) == 1:
            return [one(queries[0])]
        workers = min(len(queries), MAX_BATCH_THREADS)
        with concurrent.futures.ThreadPoolExecutor(workers, "llmesh-chat") as pool:
            return list(pool.map(one, queries))

    async def async_chat(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """:meth:`chat` over grpc.aio (an llmesh addition); a batch runs concurrently."""
        queries = self._chat_queries(model, request, extract_params)
        results = await asyncio.gather(*(self._aquery_chat(*q) for q in queries))
        return [r[0] for r in results]

    def _chat_queries(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None,
    ) -> list[tuple[Any, ...]]:
        """The :meth:`_query_chat` arguments for each instruction of a ``chat`` request."""
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if isinstance(request, str):
            request = LLMRequest(instruction=request)
        instructions = (
            [request.instruction] if isinstance(request.instruction, str) else request.instruction
        )
        if not instructions or not all(isinstance(i, str) for i in instructions):
            raise InvalidArgument("chat needs an instruction: a text or a non-empty list of texts")
        merged = {
            "max_length": request.max_length,
            "top_p": request.top_p,
            "temperature": request.temperature,
            **self._config_for(name, extract_params),
        }
        mapping = self.settings_of(name).role_mapping
        queries = []
        for instruction in instructions:
            messages, role_mapping = self._instruction_conversations(instruction, mapping)
            queries.append((name, messages, role_mapping, merged))
        return queries

    def raw_chat(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """Same as :meth:`chat` (Byzer-LLM kept both names)."""
        return self.chat(model, request, extract_params)

    def generate_instruction_from_history(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt a conversation becomes for ``model``.

        With ``setup_template(model, "auto")`` on a model with a chat template, the worker
        renders it (``apply_chat_template``); otherwise ``role_mapping`` (default:
        ``User:`` / ``Assistant:``) renders it locally.
        """
        if self.settings_of(model).auto_use_apply_chat_template and self.get_meta(model).get(
            "support_chat_template"
        ):
            return self.apply_chat_template(model, list(conversations))
        mapping = role_mapping or {"user_role": "User:", "assistant_role": "Assistant:"}
        return render_with_role_mapping(conversations, mapping)

    def execute_function_calling(
        self,
        response: LLMResponse,
        tools: Sequence[Callable[..., Any] | str],
        func_params: Mapping[str, Any] | None,
    ) -> LLMFunctionCallResponse:
        """Run the tools a tool-call answer chose (only the caller's own functions run)."""
        return fn.execute_function_calling(response, tools, func_params)

    def execute_generate_func(
        self,
        func_name: str,
        impl_func_params: Mapping[str, Any] | None,
        response: LLMResponse,
        response_class: Any,
    ) -> LLMClassResponse:
        """Run model-written code for ``func_name`` (executes model output: trusted models only)."""
        return fn.execute_generate_func(func_name, impl_func_params, response, response_class)

    def execute_response_format(
        self, response: LLMResponse, response_class: Any
    ) -> LLMClassResponse:
        """Parse an answer into ``response_class``."""
        return fn.execute_response_format(response, response_class)

    # -- prompt functions ---------------------------------------------------------------------

    def prompt(
        self, model: str | None = None, render: str | None = "simple", print_prompt: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the function's docstring is a prompt; calling it asks the model.

        The function returns the answer text when annotated ``-> str``, or an instance of its
        pydantic return class (asked for with ``response_class``).

        Args:
            model: the model; defaults to ``setup_default_model_name`` at call time.
            render: ``"simple"`` (``{name}`` placeholders) or ``"jinja2"``.
            print_prompt: print the rendered prompt before sending it.
        """
        return decorators.llm_prompt(self, model, render, print_prompt)

    def response(
        self,
        instruction: str | None = None,
        model: str | None = None,
        verbose: bool | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the function's one argument is the prompt, the answer its return class.

        Args:
            instruction: accepted for compatibility (Byzer-LLM ignored it too).
            model: the model; defaults to ``setup_default_model_name`` at call time.
            verbose: print how long the call took; defaults to the client's ``verbose``.
        """
        return decorators.llm_response(self, instruction, model, verbose)

    def impl(
        self,
        instruction: str | None = None,
        model: str | None = None,
        verbose: bool | None = None,
        skip_cache: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: the model writes the function's body, which then runs.

        The generated implementation is cached per (model, instruction, function) in
        ``func_impl_cache``; :meth:`clear_impl_cache` forgets it. This executes
        model-written Python in this process: use it only with models you trust.

        Args:
            instruction: what the function should do, beyond its docstring.
            model: the model; defaults to ``setup_default_model_name`` at call time.
            verbose: print the generated code and the time taken.
            skip_cache: always ask the model (and do not cache).
        """
        return decorators.llm_impl(self, instruction, model, verbose, skip_cache)

    def clear_impl_cache(
        self,
        model: str | None = None,
        full_func_name: str | None = None,
        instruction: str | None = None,
    ) -> ByzerLLM:
        """Forget cached ``impl`` implementations.

        Args:
            model: only this model's; with ``full_func_name`` also needs ``instruction``.
            full_func_name: ``module.function`` of the decorated function.
            instruction: the ``impl`` instruction.

        With no argument everything is forgotten.

        Raises:
            InvalidArgument: ``model`` and ``full_func_name`` without ``instruction``.
        """
        if model is None and full_func_name is None and instruction is None:
            self.func_impl_cache.clear()
            return self
        if model is not None and full_func_name is not None and instruction is None:
            raise InvalidArgument(
                "clear_impl_cache(model=..., full_func_name=...) also needs instruction"
            )
        if model is not None:
            prefix = f"{model}_"
            if instruction is not None:
                prefix += f"{instruction}_{full_func_name or ''}"
            for key in [k for k in self.func_impl_cache if k.startswith(prefix)]:
                del self.func_impl_cache[key]
            return self
        if full_func_name is not None:
            suffix = (
                f"_{full_func_name}" if instruction is None else f"_{instruction}_{full_func_name}"
            )
            for key in [k for k in self.func_impl_cache if k.endswith(suffix)]:
                del self.func_impl_cache[key]
        return self

    # -- embeddings and rerank --------------------------------------------------------------

    def emb(
        self,
        model: str | None,
        request: LLMRequest | Sequence[str] | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """Embed one text or several.

        Args:
            model: the embedding model; defaults to ``setup_default_emb_model_name``.
            request: an :class:`LLMRequest` (``instruction`` is one text or a list), a list of
                texts, or one text.
            extract_params: ``normalize`` / ``normalize_embeddings`` (bool) scales vectors to
                unit length; ``timeout_s`` sets a deadline. ``gen.`` prefixes are accepted.

        Returns:
            One :class:`LLMResponse` per text, in order, with the vector (list of floats) in
            ``output``.
        """
        name = self._model_or_default(
            model, self.default_emb_model_name, "setup_default_emb_model_name"
        )
        if isinstance(request, LLMRequest):
            instruction = request.instruction
        else:
            instruction = request
        texts = [instruction] if isinstance(instruction, str) else list(instruction)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgument("emb needs one text or a non-empty list of texts")
        flags = byzer_flags(self._config_for(name, extract_params))
        normalize = bool(flags.get("normalize_embeddings", flags.get("normalize", False)))
        timeout = as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
        req = inf.EmbedRequest(model=name, texts=texts, normalize=normalize)
        response = self._worker_call(
            name,
            cp.PURPOSE_EMBEDDING,
            "InferenceService/Embed",
            lambda stub, md: stub.Embed(req, metadata=md, timeout=timeout),
        )
        if len(response.embeddings) != len(texts):
            raise InvalidArgument(
                f"the worker returned {len(response.embeddings)} vectors for {len(texts)} texts"
            )
        out = []
        for text, vector in zip(texts, response.embeddings, strict=True):
            meta: dict[str, Any] = {}
            if len(texts) == 1:
                meta = {
                    "input_tokens_count": response.usage.prompt_tokens,
                    "generated_tokens_count": 0,
                }
            out.append(
                LLMResponse(
                    output=list(vector.values),
                    input={"instruction": text, "embedding": True},
                    metadata=meta,
                )
            )
        return out

    def emb_query(self, v: str, model: str | None = None) -> list[LLMResponse]:
        """Embed one text; returns ``[LLMResponse(output=vector, ...)]``.

        Args:
            v: the text.
            model: the embedding model; defaults to ``setup_default_emb_model_name``.
        """
        return self.emb(model=model, request=LLMRequest(instruction=v))

    def emb_rerank(
        self,
        model: str | None = None,
        sentence_pairs: Sequence[Sequence[str]] | Sequence[str] = (),
        extract_params: Mapping[str, Any] | None = None,
    ) -> list[LLMResponse]:
        """Score (query, passage) pairs.

        Args:
            model: the rerank model; defaults to ``setup_default_re_rank_model_name``.
            sentence_pairs: one ``(query, passage)`` pair or a list of them; pairs may have
                different queries.
            extract_params: ``timeout_s`` sets a deadline.

        Returns:
            ``[LLMResponse(output=...)]`` where output is ``((query, passage), score)`` for one
            pair, or a list of those sorted by score, best first, as Byzer-LLM's rerank models
            returned. ``metadata["method"]`` says how the worker scored.
        """
        name = self._model_or_default(
            model, self.default_rerank_model_name, "setup_default_re_rank_model_name"
        )
        if not sentence_pairs:
            raise InvalidArgument("emb_rerank needs sentence_pairs: one (query, passage) or a list")
        pairs, single = _normalize_pairs(sentence_pairs)
        flags = byzer_flags(self._config_for(name, extract_params))
        timeout = as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
        # One Rerank call per distinct query, then the scores go back to their pairs.
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        scores: list[float] = [0.0] * len(pairs)
        methods: set[str] = set()
        for query, indexes in by_query.items():
            req = inf.RerankRequest(
                model=name, query=query, documents=[pairs[i][1] for i in indexes]
            )
            response = self._worker_call(
                name,
                cp.PURPOSE_RERANK,
                "InferenceService/Rerank",
                lambda stub, md, req=req: stub.Rerank(req, metadata=md, timeout=timeout),
            )
            if len(response.scores) != len(indexes):
                raise InvalidArgument(
                    f"the worker returned {len(response.scores)} scores for {len(indexes)} passages"
                )
            for i, score in zip(indexes, response.scores, strict=True):
                scores[i] = float(score)
            if response.method:
                methods.add(response.method)
        return [
            LLMResponse(
                output=rerank_output(pairs, scores, single=single),
                input={"instruction": sentence_pairs, "embedding": True, "embed_rerank": True},
                metadata={"method": ",".join(sorted(methods))} if methods else {},
            )
        ]

    # -- tokenizer and meta -----------------------------------------------------------------

    def tokenize(
        self, model: str | None, s: str, llm_config: Mapping[str, Any] | None = None
    ) -> list[LLMResponse]:
        """Tokenize a text with the model's tokenizer.

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            s: the text.
            llm_config: ``add_special_tokens`` (default True, as the tokenizer's own default).

        Returns:
            ``[LLMResponse(output=[token_ids], ...)]`` (a batch of one, as Byzer-LLM returned),
            with the token strings in ``metadata["tokens"]``.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        flags = byzer_flags(llm_config)
        req = inf.TokenizeRequest(
            model=name, text=s, add_special_tokens=bool(flags.get("add_special_tokens", True))
        )
        response = self._worker_call(
            name,
            cp.PURPOSE_TOKENIZER,
            "InferenceService/Tokenize",
            lambda stub, md: stub.Tokenize(req, metadata=md, timeout=WORKER_CALL_TIMEOUT_S),
        )
        return [
            LLMResponse(
                output=[list(response.token_ids)],
                input={"instruction": s, "tokenizer": True},
                metadata={"tokens": list(response.tokens)},
            )
        ]

    def apply_chat_template(
        self,
        model: str | None,
        s: str | Sequence[Mapping[str, Any]],
        llm_config: Mapping[str, Any] | None = None,
    ) -> str:
        """Render messages with the model's chat template.

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            s: the messages as a JSON string (as Byzer-LLM takes them) or as a list of dicts.
            llm_config: ``add_generation_prompt`` (default True) appends the assistant opener.

        Returns:
            The rendered prompt.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if isinstance(s, str):
            try:
                conversations = json.loads(s)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(
                    f"apply_chat_template expects a JSON list of messages: {exc}"
                ) from None
        else:
            conversations = s
        flags = byzer_flags(llm_config)
        req = inf.ApplyChatTemplateRequest(
            model=name,
            messages=to_chat_messages(conversations),
            add_generation_prompt=bool(flags.get("add_generation_prompt", True)),
        )
        response = self._worker_call(
            name,
            cp.PURPOSE_APPLY_CHAT_TEMPLATE,
            "InferenceService/ApplyChatTemplate",
            lambda stub, md: stub.ApplyChatTemplate(
                req, metadata=md, timeout=WORKER_CALL_TIMEOUT_S
            ),
        )
        return response.prompt

    def get_meta(
        self, model: str | None, llm_config: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Describe a model (cached per model until it is deployed or undeployed again).

        Args:
            model: the model; defaults to ``setup_default_model_name``.
            llm_config: accepted for compatibility; unused.

        Returns:
            A dict with ``model_deploy_type``, ``backend``, ``architectures``,
            ``max_model_len``, ``support_stream``, ``support_chat_template``,
            ``message_format``, ``embedding_dim``, ``model_path``, ``max_concurrency`` and any
            engine-specific extras.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        cached = self.meta_cache.get(name)
        if cached is not None:
            return cached
        req = inf.GetModelMetaRequest(model=name)
        response = self._worker_call(
            name,
            cp.PURPOSE_META,
            "InferenceService/GetModelMeta",
            lambda stub, md: stub.GetModelMeta(req, metadata=md, timeout=WORKER_CALL_TIMEOUT_S),
        )
        meta = meta_dict(response)
        self.meta_cache[name] = meta
        return meta

    def abort(self, request_id: str, model: str | None = None) -> bool:
        """Abort a running request on every worker that hosts the model.

        Args:
            request_id: the id the request was started with (``llm_config["gen.request_id"]``,
                or ``metadata["request_id"]`` of a stream).
            model: the model; defaults to ``setup_default_model_name``.

        Returns:
            True when a worker found the request and stopped it.

        Raises:
            Unavailable (or another error): every worker hosting the model failed to answer.
        """
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        if not request_id:
            raise InvalidArgument("abort needs the request_id of a running request")
        live = (common_pb2.REPLICA_STATE_READY, common_pb2.REPLICA_STATE_DRAINING)
        try:
            replicas = self._routes.replicas(name)
        except Unavailable as exc:
            raise self._unavailable_control_plane(exc) from exc
        addresses = sorted({r.address for r in replicas if r.address and r.state in live})
        aborted = False
        errors: list[LLMeshError] = []
        for address in addresses:
            try:
                response = call_unary(
                    self._worker(address).Abort,
                    inf.AbortRequest(request_id=request_id),
                    name="InferenceService/Abort",
                    timeout=CONTROL_CALL_TIMEOUT_S,
                )
                aborted = aborted or response.aborted
            except LLMeshError as exc:
                errors.append(exc)
        if errors and len(errors) == len(addresses):
            raise errors[-1]
        return aborted

    # -- deployment -------------------------------------------------------------------------

    def deploy(
        self,
        model_path: str,
        pretrained_model_type: str,
        udf_name: str,
        infer_params: Mapping[str, Any] | None = None,
        *,
        wait: bool = True,
        timeout: float = 300.0,
        base_model: str | None = None,
    ) -> dict[str, Any]:
        """Deploy a model with the settings from ``setup_*``.

        Replicas come from ``setup_num_workers``, CPUs/GPUs per replica from
        ``setup_cpus_per_worker`` / ``setup_gpus_per_worker``, the engine from
        ``setup_infer_backend`` (default ``transformers``) and ``setup_worker_concurrency``
        becomes infer_params ``max_concurrency``.

        Args:
            model_path: the model directory (HuggingFace layout) as the workers see it.
            pretrained_model_type: Byzer-LLM's model family, e.g. ``"custom/auto"``; recorded.
            udf_name: the name clients use for the model.
            infer_params: engine parameters; non-string values are sent as JSON.
            wait: block until every replica is READY (or one fails).
            timeout: how long to wait, in seconds.
            base_model: deploy ``model_path`` as a LoRA adapter served on the replicas of this
                deployed base model (see :meth:`deploy_adapter`); the replica settings then
                come from the base model.

        Returns:
            The model's meta dict (see :meth:`get_meta`) once READY, as Byzer-LLM returned;
            ``{}`` when ``wait`` is False.
        """
        if not udf_name:
            raise InvalidArgument("deploy needs udf_name, the name clients will use")
        params = {str(k): _param_str(v) for k, v in (infer_params or {}).items()}
        concurrency = self.sys_conf.get("workerMaxConcurrency")
        if concurrency is not None and "max_concurrency" not in params:
            params["max_concurrency"] = str(int(concurrency))
        model = cp.Model(
            name=udf_name,
            model_path=model_path,
            backend=normalize_backend(self.sys_conf.get("infer_backend") or "transformers"),
            infer_params=params,
            num_replicas=int(self.sys_conf.get("maxConcurrency", 1)),
            cpus_per_replica=float(self.sys_conf.get("num_cpus", 1)),
            gpus_per_replica=float(self.sys_conf.get("num_gpus", 0)),
            pretrained_model_type=pretrained_model_type,
            base_model=base_model or "",
        )
        self._control_call(
            "DeployModel",
            cp.DeployModelRequest(model=model, wait_ready=wait, timeout_seconds=timeout),
            # The server enforces `timeout`; the deadline only guards against a hung server.
            timeout=(timeout + 30.0) if wait else CONTROL_CALL_TIMEOUT_S,
        )
        self.meta_cache.pop(udf_name, None)
        if not wait:
            return {}
        return self.get_meta(udf_name)

    def undeploy(self, udf_name: str, *, wait: bool = True, timeout: float = 60.0) -> bool:
        """Undeploy a model; a model that is not deployed is not an error (as in Byzer-LLM).

        Args:
            udf_name: the model name.
            wait: block until every replica has unloaded.
            timeout: how long to wait, in seconds.

        Returns:
            True when the model was deployed, False when there was nothing to undeploy.
        """
        self.meta_cache.pop(udf_name, None)
        try:
            self._control_call(
                "UndeployModel",
                cp.UndeployModelRequest(name=udf_name, wait=wait, timeout_seconds=timeout),
                timeout=(timeout + 30.0) if wait else CONTROL_CALL_TIMEOUT_S,
            )
        except NotFound:
            return False
        finally:
            self._routes.forget(udf_name)
        return True

    def is_model_exist(self, udf_name: str) -> bool:
        """True when a model with this name is deployed.

        Args:
            udf_name: the model name.

        Raises:
            Unavailable: the control plane cannot be reached (not reported as "absent").
        """
        try:
            self.get_model(udf_name)
        except NotFound:
            return False
        return True

    # -- mesh views (llmesh additions) -----------------------------------------------------

    def get_model(self, name: str) -> cp.Model:
        """The deployed model with its replicas.

        Args:
            name: the model name.

        Raises:
            NotFound: no such model.
        """
        return self._control_call(
            "GetModel",
            cp.GetModelRequest(name=name),
            timeout=CONTROL_CALL_TIMEOUT_S,
        ).model

    def list_models(self) -> list[cp.Model]:
        """Every deployed model with its replicas, sorted by name."""
        return list(
            self._control_call(
                "ListModels",
                cp.ListModelsRequest(),
                timeout=CONTROL_CALL_TIMEOUT_S,
            ).models
        )

    def list_workers(self) -> list[cp.Worker]:
        """Every live worker, sorted by id."""
        return list(
            self._control_call(
                "ListWorkers",
                cp.ListWorkersRequest(),
                timeout=CONTROL_CALL_TIMEOUT_S,
            ).workers
        )

    # -- training jobs (Byzer-LLM's sft / pretrain / merge_lora) ------------------------------

    def create_training_job(
        self, spec: tr.TrainingJobSpec, *, request_id: str | None = None
    ) -> tr.TrainingJob:
        """Submit a training job as it is (the building blocks of :meth:`sft` and friends).

        A lost reply or an unreachable control plane is retried with the same ``request_id``,
        so a retry never starts a second job.

        Args:
            spec: what to train; checked with :func:`llmesh.common.job_rules.validate_spec` first.
            request_id: idempotency key; a new UUID when None. A second call with the same
                key returns the first call's job.

        Returns:
            The job, QUEUED (or further along when ``request_id`` was used before).
        """
        validate_spec(spec)
        request = cp.CreateTrainingJobRequest(spec=spec, request_id=request_id or str(uuid.uuid4()))
        delay = 0.2
        for attempt in range(1, CREATE_JOB_ATTEMPTS + 1):
            try:
                return self._control_call(
                    "CreateTrainingJob", request, timeout=CONTROL_CALL_TIMEOUT_S
                ).job
            except (Unavailable, DeadlineExceeded):
                # Safe to repeat: the request_id makes the control plane answer with the job
                # the first attempt created, if it got that far.
                if attempt == CREATE_JOB_ATTEMPTS:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def get_training_job(self, job_id: str) -> tr.TrainingJob:
        """The training job with its state, latest progress and artifact.

        Args:
            job_id: the id :meth:`sft` (or ``llmesh jobs``) gave.

        Raises:
            NotFound: no such job.
        """
        if not job_id:
            raise InvalidArgument("get_training_job needs a job id (see list_training_jobs)")
        return self._control_call(
            "GetTrainingJob", cp.GetTrainingJobRequest(id=job_id), timeout=CONTROL_CALL_TIMEOUT_S
        ).job

    def list_training_jobs(
        self, states: Sequence[str | int] | str | None = None
    ) -> list[tr.TrainingJob]:
        """Training jobs, newest first.

        Args:
            states: only jobs in these states, by name (``"running"``, ``"SUCCEEDED"``) or
                ``TrainingJobState`` value; None for all.
        """
        request = cp.ListTrainingJobsRequest(states=training.parse_states(states))
        return list(
            self._control_call("ListTrainingJobs", request, timeout=CONTROL_CALL_TIMEOUT_S).jobs
        )

    def cancel_training_job(self, job_id: str) -> tr.TrainingJob:
        """Ask for a job to stop; its ranks are stopped and it ends CANCELLED.

        Cancelling a job that already ended changes nothing and is not an error.

        Returns:
            The job after the cancel was recorded (``cancel_requested`` set).

        Raises:
            NotFound: no such job.
        """
        if not job_id:
            raise InvalidArgument("cancel_training_job needs a job id (see list_training_jobs)")
        return self._control_call(
            "CancelTrainingJob",
            cp.CancelTrainingJobRequest(id=job_id),
            timeout=CONTROL_CALL_TIMEOUT_S,
        ).job

    def watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """Follow a job: yields ``(job, event)`` until the job is final and its log is read.

        ``job`` is the job as it is after ``event`` (progress, state and artifact applied);
        ``event`` is None for a message that only carries the job (the first one, for
        instance). A dropped stream (control plane restart) is resumed after the last event
        seen, so no event is lost or repeated. Closing the iterator ends the watch; the job
        keeps running.

        Args:
            job_id: the job.
            after_sequence: skip events up to this sequence number (0: the whole history).
            timeout: give up after this many seconds (the job keeps running).

        Raises:
            NotFound: no such job.
            DeadlineExceeded: ``timeout`` passed before the job ended.
        """
        loop = training.WatchLoop(
            job_id,
            after_sequence,
            timeout=timeout,
            reconnects=WATCH_RECONNECTS,
            backoff_max=WATCH_BACKOFF_MAX_S,
        )
        while True:
            self._check_open()
            request, remaining = loop.request()
            call: Any = None
            try:
                with rpc_errors(), client_span("ControlPlaneService/WatchTrainingJob") as metadata:
                    call = self._control.WatchTrainingJob(
                        request, metadata=metadata, timeout=remaining
                    )
                    for response in call:
                        item = loop.received(response)
                        if item is not None:
                            yield item
            except (Unavailable, DeadlineExceeded) as exc:
                loop.failed(
                    self._unavailable_control_plane(exc) if isinstance(exc, Unavailable) else exc
                )
            finally:
                if call is not None:
                    call.cancel()  # also when the caller left early: ends the server stream
            pause = loop.pause()
            if pause is None:
                return
            time.sleep(pause)

    async def async_watch_training_job(
        self, job_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> AsyncIterator[tuple[tr.TrainingJob, tr.TrainingJobEvent | None]]:
        """:meth:`watch_training_job` as a grpc.aio stream on the running event loop.

        Same items, resume and timeout rules; leaving the ``async for`` ends the stream.
        """
        loop = training.WatchLoop(
            job_id,
            after_sequence,
            timeout=timeout,
            reconnects=WATCH_RECONNECTS,
            backoff_max=WATCH_BACKOFF_MAX_S,
        )
        while True:
            self._check_open()
            request, remaining = loop.request()
            stub = cp_grpc.ControlPlaneServiceStub(self._aio_channels.get(self.control_plane))
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
                    self._unavailable_control_plane(exc) if isinstance(exc, Unavailable) else exc
                )
            finally:
                if call is not None:
                    call.cancel()
            pause = loop.pause()
            if pause is None:
                return
            await asyncio.sleep(pause)

    def wait_training_job(
        self,
        job_id: str,
        *,
        timeout: float | None = None,
        on_event: Callable[[tr.TrainingJob, tr.TrainingJobEvent | None], None] | None = None,
    ) -> tr.TrainingJob:
        """Wait until a job ends and return it; raise if it did not succeed.

        Args:
            job_id: the job.
            timeout: give up after this many seconds (the job keeps running).
            on_event: called with every ``(job, event)`` of :meth:`watch_training_job`.

        Raises:
            TrainingJobFailed: the job ended FAILED or CANCELLED (``exc.job.reason`` says why).
            DeadlineExceeded: ``timeout`` passed first.
        """
        job: tr.TrainingJob | None = None
        for job, event in self.watch_training_job(job_id, timeout=timeout):
            if on_event is not None:
                on_event(job, event)
        if (
            job is None
            or not is_final(job.state)
            or (job.state == tr.TRAINING_JOB_STATE_SUCCEEDED and not job.artifact.path)
        ):
            job = self.get_training_job(job_id)  # the record is the last word
        if job.state != tr.TRAINING_JOB_STATE_SUCCEEDED:
            raise training.TrainingJobFailed(job)
        return job

    def _submit(
        self,
        spec: tr.TrainingJobSpec,
        *,
        name: str,
        detached: bool,
        request_id: str | None,
        timeout: float | None,
    ) -> tr.TrainingJob:
        job = self.create_training_job(spec, request_id=request_id)
        log.info(
            "training job %s (%s%s) is %s",
            job.id,
            kind_name(job.spec.kind),
            f", {name}" if name else "",
            state_name(job.state),
        )
        if detached:
            return job
        return self.wait_training_job(job.id, timeout=timeout)

    def sft(
        self,
        sft_name: str,
        local_data_dir_path: str,
        local_model_path: str,
        local_stage_path: str = "",
        pretrained_model_type: str = "custom/auto",
        num_cpus: float = 0,
        num_gpus: float = 0,
        detached: bool = True,
        json_config: str | Mapping[str, Any] = "{}",
        model_params: Mapping[str, Any] | None = None,
        *,
        num_ranks: int = 0,
        method: str | None = None,
        template: str | None = None,
        resume: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> tr.TrainingJob:
        """Fine-tune a model on a trainer worker (Byzer-LLM's ``sft``).

        Paths are on the trainer worker's file system.

        Args:
            sft_name: a name for this run, used in log lines (the job id is the handle).
            local_data_dir_path: ``data.jsonl`` (alpaca rows, or chat rows with ``messages``)
                or a directory holding it.
            local_model_path: the base model directory (HuggingFace layout).
            local_stage_path: where the adapter / model and checkpoints go; empty lets the
                worker choose (its jobs directory / job id).
            pretrained_model_type: Byzer-LLM's model family; accepted and not needed.
            num_cpus: CPUs the job reserves (0: one per rank).
            num_gpus: GPUs the job reserves.
            detached: return the QUEUED job at once (True, Byzer-LLM's default) or wait until
                it ends and return it.
            json_config: a DeepSpeed config as JSON text (or a dict); training keys in it
                (``num_train_epochs``, ``lora_rank``, ...) count as ``model_params``, which win.
            model_params: Byzer-LLM typed keys (``sft.int.num_train_epochs``,
                ``sft.float.learning_rate``, ``sft.int.lora_rank``, ``sft.str.finetuning_type``)
                or plain names (``max_steps``, ``lora_r``, ``target_modules``, ``method``).
            num_ranks: ranks under the DeepSpeed launcher (0: one).
            method: ``"lora"`` (default) or ``"full"``.
            template: ``"auto"`` (default), ``"alpaca"`` or ``"chat"``.
            resume: resume from a checkpoint in ``local_stage_path`` (default true).
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: with ``detached=False``, how long to wait, in seconds.

        Returns:
            The ``TrainingJob`` (protobuf): QUEUED when detached, SUCCEEDED otherwise, with
            ``artifact.path`` the adapter (LoRA) or model (full) directory.

        Raises:
            InvalidArgument: an unknown ``model_params`` key or a bad value, before anything
                is sent.
            TrainingJobFailed: not detached and the job FAILED or was CANCELLED.
        """
        del pretrained_model_type  # Byzer-LLM picked a training module by it; one runner here
        spec = training.sft_spec(
            local_data_dir_path=local_data_dir_path,
            local_model_path=local_model_path,
            local_stage_path=local_stage_path,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            json_config=json_config,
            model_params=model_params,
            num_ranks=num_ranks,
            method=method,
            template=template,
            resume=resume,
        )
        return self._submit(
            spec, name=sft_name, detached=detached, request_id=request_id, timeout=timeout
        )

    def pretrain(
        self,
        name: str,
        local_data_dir_path: str,
        local_model_path: str,
        local_stage_path: str = "",
        pretrained_model_type: str = "custom/auto",
        num_cpus: float = 0,
        num_gpus: float = 0,
        detached: bool = True,
        json_config: str | Mapping[str, Any] = "{}",
        model_params: Mapping[str, Any] | None = None,
        *,
        num_ranks: int | None = None,
        resume: bool | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> tr.TrainingJob:
        """Train a causal LM from its config on raw text (Byzer-LLM's ``pretrain``).

        Args:
            name: a name for this run, used in log lines.
            local_data_dir_path: a .txt file, a directory of them, or jsonl rows with ``text``.
            local_model_path: a directory with ``config.json`` and the tokenizer; the model is
                built from that config with fresh weights.
            local_stage_path: output directory; empty lets the worker choose.
            pretrained_model_type: Byzer-LLM's model family; accepted and not needed.
            num_cpus: CPUs the job reserves (0: one per rank).
            num_gpus: GPUs the job reserves.
            detached: return at once (True) or wait until the job ends.
            json_config: the DeepSpeed config (JSON text or a dict).
            model_params: ``pretrain.<type>.<name>`` keys (Byzer-LLM's ``sfft.`` prefix too:
                ``sfft.int.max_length``, ``sfft.int.epoches``, ``sfft.int.steps_per_epoch``,
                ``sfft.str.tokenizer_path``) or plain names.
            num_ranks: ranks under the DeepSpeed launcher; None: one per whole GPU, at least 1.
            resume: resume from a checkpoint in ``local_stage_path`` (default true).
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: with ``detached=False``, how long to wait, in seconds.

        Returns:
            The ``TrainingJob``; when it SUCCEEDED, ``artifact.path`` is the model directory.

        Raises:
            InvalidArgument: an unknown key or a bad value.
            TrainingJobFailed: not detached and the job FAILED or was CANCELLED.
        """
        del pretrained_model_type
        spec = training.pretrain_spec(
            local_data_dir_path=local_data_dir_path,
            local_model_path=local_model_path,
            local_stage_path=local_stage_path,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            json_config=json_config,
            model_params=model_params,
            num_ranks=num_ranks,
            resume=resume,
        )
        return self._submit(
            spec, name=name, detached=detached, request_id=request_id, timeout=timeout
        )

    def merge_lora(
        self,
        name: str,
        local_model_path: str,
        local_adpator_model_path: str,
        local_target_path: str,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> str:
        """Merge a LoRA adapter into its base model and wait (Byzer-LLM's ``merge_lora``).

        Args:
            name: a name for this run, used in log lines.
            local_model_path: the base model directory.
            local_adpator_model_path: the adapter directory (Byzer-LLM's spelling).
            local_target_path: where the merged model goes; empty lets the worker choose.
            request_id: idempotency key for the create call; a new UUID when None.
            timeout: how long to wait, in seconds.

        Returns:
            The merged model's directory, the job's artifact: ``<local_target_path>/model``
            (the target directory also holds the job's event log), or under the worker's jobs
            directory when ``local_target_path`` was empty. Byzer-LLM returned
            ``local_target_path`` itself.

        Raises:
            TrainingJobFailed: the merge FAILED or was CANCELLED.
        """
        spec = training.merge_lora_spec(
            local_model_path=local_model_path,
            local_adapter_path=local_adpator_model_path,
            local_target_path=local_target_path,
        )
        job = self._submit(spec, name=name, detached=False, request_id=request_id, timeout=timeout)
        return job.artifact.path

    def raw_sft(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> tr.TrainingJob:
        """Byzer-LLM's ``raw_sft``: :meth:`sft` from Byzer's ``train_params`` keys.

        ``name``, ``data_dir``, ``localModelDir``, ``localPathPrefix``, ``config`` and
        ``detached`` (``"true"``; default false) are read; every other key (``sft.int.*``, ...)
        is a model parameter. ``sys_conf`` gives ``num_cpus`` and ``num_gpus``.
        """
        params = dict(train_params)
        conf = dict(sys_conf or {})
        return self.sft(
            str(params.pop("name", "")),
            _required(params, "data_dir", "raw_sft"),
            _required(params, "localModelDir", "raw_sft"),
            str(params.pop("localPathPrefix", "")),
            str(params.pop("pretrainedModelType", "")),
            float(conf.get("num_cpus", 0)),
            float(conf.get("num_gpus", 0)),
            detached=str(params.pop("detached", "false")).lower() == "true",
            json_config=params.pop("config", "{}"),
            model_params=params,
        )

    def raw_pretrain(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> tr.TrainingJob:
        """Byzer-LLM's ``raw_pretrain``: :meth:`pretrain` from Byzer's ``train_params`` keys.

        ``name``, ``localDataDir``, ``localModelDir``, ``localPathPrefix``,
        ``deepspeedConfig`` and ``detached`` are read; other keys (``sfft.int.*``, ...) are
        model parameters. ``sys_conf`` gives ``num_cpus`` and ``num_gpus``.
        """
        params = dict(train_params)
        conf = dict(sys_conf or {})
        return self.pretrain(
            str(params.pop("name", "")),
            _required(params, "localDataDir", "raw_pretrain"),
            _required(params, "localModelDir", "raw_pretrain"),
            str(params.pop("localPathPrefix", "")),
            str(params.pop("pretrainedModelType", "")),
            float(conf.get("num_cpus", 0)),
            float(conf.get("num_gpus", 0)),
            detached=str(params.pop("detached", "false")).lower() == "true",
            json_config=params.pop("deepspeedConfig", "{}"),
            model_params=params,
        )

    def raw_merge_lora(
        self, train_params: Mapping[str, Any], sys_conf: Mapping[str, Any] | None = None
    ) -> str:
        """Byzer-LLM's ``raw_merge_lora``: ``modelNameOrPath``, ``adapterNameOrPath``, ``savePath``.

        Returns:
            The merged model's directory (Byzer-LLM returned None).
        """
        del sys_conf  # Byzer-LLM ignored it too
        params = dict(train_params)
        unknown = sorted(set(params) - {"name", "modelNameOrPath", "adapterNameOrPath", "savePath"})
        if unknown:
            raise InvalidArgument(
                f"raw_merge_lora does not know {unknown[0]!r}; it reads name, modelNameOrPath, "
                "adapterNameOrPath and savePath"
            )
        return self.merge_lora(
            str(params.get("name", "")),
            _required(params, "modelNameOrPath", "raw_merge_lora"),
            _required(params, "adapterNameOrPath", "raw_merge_lora"),
            str(params.get("savePath", "")),
        )

    def deploy_adapter(
        self,
        name: str,
        job_or_path: str | tr.TrainingJob,
        base_model: str,
        *,
        infer_params: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 300.0,
    ) -> dict[str, Any]:
        """Serve a LoRA adapter on the replicas of a deployed base model.

        Args:
            name: the name clients use for the adapter model.
            job_or_path: a SUCCEEDED LoRA job (its id or the ``TrainingJob``) whose artifact
                is deployed, or an adapter directory path on the workers (anything with a
                ``/`` in it is read as a path).
            base_model: the deployed model whose replicas serve the adapter.
            infer_params: engine parameters for the adapter.
            wait: block until the adapter is READY.
            timeout: how long to wait, in seconds.

        Returns:
            As :meth:`deploy`: the adapter's meta once READY, ``{}`` when ``wait`` is False.

        Raises:
            InvalidArgument: the job did not succeed or did not produce a LoRA adapter.
            NotFound: no job with that id.
        """
        if not base_model:
            raise InvalidArgument("deploy_adapter needs base_model, the deployed model to use")
        if isinstance(job_or_path, tr.TrainingJob):
            path = _adapter_path(job_or_path)
        elif "/" in str(job_or_path) or str(job_or_path).startswith(("~", ".")):
            path = str(job_or_path)
        else:
            try:
                job = self.get_training_job(str(job_or_path))
            except NotFound:
                raise NotFound(
                    f"no training job {job_or_path!r}; to deploy an adapter directory pass its "
                    "path (with a '/', e.g. ./adapter)"
                ) from None
            path = _adapter_path(job)
        return self.deploy(
            model_path=path,
            pretrained_model_type="custom/lora",
            udf_name=name,
            infer_params=infer_params,
            wait=wait,
            timeout=timeout,
            base_model=base_model,
        )


def _required(params: dict[str, Any], key: str, method: str) -> str:
    """Pop a key Byzer-LLM's raw_* methods need, with a clear error when it is missing."""
    value = params.pop(key, None)
    if not value:
        raise InvalidArgument(f"{method} needs train_params[{key!r}]")
    return str(value)


def _adapter_path(job: tr.TrainingJob) -> str:
    """The LoRA adapter a finished job produced, or why there is none."""
    if job.state != tr.TRAINING_JOB_STATE_SUCCEEDED:
        raise InvalidArgument(
            f"training job {job.id} is {state_name(job.state)}; only a SUCCEEDED job has an "
            "adapter to deploy"
        )
    if job.artifact.kind != tr.ARTIFACT_KIND_LORA_ADAPTER:
        raise InvalidArgument(
            f"training job {job.id} produced a full model at {job.artifact.path}, not a LoRA "
            "adapter; deploy it with deploy(model_path=...)"
        )
    return job.artifact.path


def default_chat_wrapper(
    llm: ByzerLLM,
    conversations: Sequence[Mapping[str, Any]] | None = None,
    llm_config: Mapping[str, Any] | None = None,
) -> list[LLMResponse]:
    """Byzer-LLM's plain chat entry point for agents: ``llm.chat_oai(conversations, ...)``."""
    return llm.chat_oai(conversations=conversations or [], llm_config=llm_config)


__all__ = [
    "CANCEL_GRACE_S",
    "CONFIG_PREFIXES",
    "DEFAULT_ROLE_MAPPING",
    "EMPTY_ROLE_MAPPING",
    "FINISH_REASONS",
    "MAX_TOKENS_KEYS",
    "ByzerLLM",
    "EventCallback",
    "EventCallbackResult",
    "EventName",
    "ExecuteCodeResponse",
    "FunctionCallList",
    "GenerationConfig",
    "InferBackend",
    "LLMClassResponse",
    "LLMFunctionCallResponse",
    "LLMRequest",
    "LLMResponse",
    "Role",
    "SingleOutputMeta",
    "Template",
    "Templates",
    "TrainingJobFailed",
    "default_chat_wrapper",
    "default_control_plane",
    "generation_config",
    "iterate_in_thread",
    "meta_dict",
    "render_with_role_mapping",
    "rerank_output",
    "to_chat_messages",
]
