"""Chat: request building and response handling, one implementation for every transport.

A chat call becomes a ``ChatStart`` (messages, or a prompt rendered with the model's role
mapping), passes the context-length checks and the event callbacks, runs as one Chat stream
(:class:`~llmesh.sdk.ops.ChatStream`) and comes back as Byzer-LLM results. The steps here are
run by the sync transport for ``ByzerLLM`` and by the async one for ``AsyncByzerLLM`` and the
``async_*`` methods; only the stream loops of ``stream_chat_oai`` differ, and those are the
transports'.
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any

from llmesh.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    LLMeshError,
    Unimplemented,
)
from llmesh.llm_config import GenerationConfig, generation_config, strip_config_prefix
from llmesh.sdk.ops import ChatStream, Gather, Steps, async_operation, operation, steps
from llmesh.sdk.results import (
    ChatProgress,
    TextStream,
    echo_input,
    to_chat_messages,
    to_response,
)
from llmesh.sdk.settings import Settings
from llmesh.sdk.shapes import (
    EventCallback,
    EventName,
    LLMRequest,
    LLMResponse,
    SingleOutputMeta,
)
from llmesh.sdk.transport import AsyncTransport, SyncTransport
from llmesh.templates import EMPTY_ROLE_MAPPING, render_with_role_mapping
from llmesh.v1 import inference_service_pb2 as inf

log = logging.getLogger(__name__)

#: llm_config keys the SDK itself reads and never sends: ``structured_output`` (False turns
#: schema enforcement off) and ``max_tool_calls`` (most tool calls the enforced schema allows).
SDK_KEYS = frozenset({"structured_output", "max_tool_calls"})


def _structured_refused(start: inf.ChatStart, exc: LLMeshError) -> bool:
    """True when the engine refused the request because it cannot enforce the schema."""
    return start.params.HasField("structured_output") and "structured" in str(exc)


class ChatMixin(Settings):
    """The chat core: ``chat``, ``stream_chat_oai`` and the query every chat call makes.

    Needs ``get_meta``, ``tokenize`` and ``apply_chat_template`` (structured-output and
    context-length checks) and the client's two transports.
    """

    transport: SyncTransport
    aio_transport: AsyncTransport

    def _init_chat(self) -> None:
        self.event_callbacks: dict[EventName, list[EventCallback]] = {}

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

    # -- building the request -------------------------------------------------------------

    def _chat_start(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str,
        role_mapping: Mapping[str, Any] | None,
        config: GenerationConfig,
    ) -> tuple[inf.ChatStart, str | None]:
        """The Chat request for ``conversations``, and the prompt when one was rendered."""
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

    def _structured_allowed(self, model: str, flags: Mapping[str, Any]) -> Steps[bool]:
        """Whether to ask the engine for constrained decoding on this call.

        On unless the call says ``llm_config["structured_output"] = False`` or the model's
        meta says ``structured_output`` is false. Engines that cannot enforce it fall back to
        the prompt alone (see :meth:`_run_chat`).
        """
        if "structured_output" in flags:
            return bool(flags["structured_output"])
        try:
            meta = yield from steps(self.get_meta)(model)
        except LLMeshError:
            return True
        return str(meta.get("structured_output")).strip().lower() not in ("false", "0", "no")

    def _has_length_limits(self, model: str) -> bool:
        settings = self.settings_of(model)
        return not self.force_skip_context_length_check and bool(
            settings.max_input_length
            or settings.max_model_length
            or settings.max_output_length is not None
        )

    @operation
    def _check_context_length(self, model: str, start: inf.ChatStart) -> Steps[None]:
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
                text = yield from steps(self.apply_chat_template)(model, conversations)
                special = False
            tokens = yield from steps(self.tokenize)(model, text, {"add_special_tokens": special})
            ids = tokens[0].output[0]
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

    def _query_parts(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any],
        schema: Mapping[str, Any] | None,
    ) -> tuple[GenerationConfig, inf.ChatStart, list[dict[str, Any]]]:
        wire = {k: v for k, v in llm_config.items() if strip_config_prefix(str(k)) not in SDK_KEYS}
        config = generation_config(wire)
        if schema is not None:
            config.params.structured_output.json_schema = json.dumps(schema, ensure_ascii=False)
        start, prompt = self._chat_start(conversations, model, role_mapping, config)
        return config, start, [echo_input(conversations, prompt, llm_config)]

    # -- one call -------------------------------------------------------------------------

    def _query_chat(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any],
        schema: Mapping[str, Any] | None = None,
    ) -> Steps[list[LLMResponse]]:
        """One chat call with length checks, event callbacks and the model's clean_func.

        Args:
            model: the model.
            conversations: the messages to send.
            role_mapping: render a prompt with it; None sends messages (chat template).
            llm_config: the merged generation config (model defaults and the call's).
            schema: a JSON schema to enforce while decoding, or None.
        """
        flags = {strip_config_prefix(str(k)): v for k, v in llm_config.items()}
        structured = schema is not None and (yield from self._structured_allowed(model, flags))
        config, start, input_value = self._query_parts(
            model, conversations, role_mapping, llm_config, schema if structured else None
        )
        yield from steps(self._check_context_length)(model, start)
        result = self._trigger_event(EventName.BEFORE_CALL_MODEL, self, model, input_value)
        if result is None:
            progress = yield from self._run_chat(model, start, config)
            result = [
                {"predict": progress.text, "input": input_value[0], "metadata": progress.metadata()}
            ]
            replaced = self._trigger_event(EventName.AFTER_CALL_MODEL, model, result)
            result = result if replaced is None else replaced
        clean = self.clean_func_of(model)
        return [to_response(item, clean) for item in result]

    def _run_chat(
        self, model: str, start: inf.ChatStart, config: GenerationConfig
    ) -> Steps[ChatProgress]:
        progress = ChatProgress(start.request_id)
        try:
            yield ChatStream(model, start, config, progress.add, progress.migrated)
        except (Unimplemented, FailedPrecondition) as exc:
            # An engine that cannot enforce the schema: the prompt alone has to do.
            if not _structured_refused(start, exc):
                raise
            log.info("model %s cannot enforce structured output (%s); prompt only", model, exc)
            start.params.ClearField("structured_output")
            config.params.ClearField("structured_output")
            return (yield from self._run_chat(model, start, config))
        return progress

    # -- streams --------------------------------------------------------------------------

    def _stream_start(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str | None,
        role_mapping: Mapping[str, Any] | None,
        llm_config: Mapping[str, Any] | None,
    ) -> Steps[tuple[str, inf.ChatStart, GenerationConfig]]:
        """What a stream sends: ``(model, start, config)``, after the context-length checks."""
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        config = generation_config(self._config_for(name, llm_config))
        start, _ = self._chat_start(conversations, name, role_mapping, config)
        yield from steps(self._check_context_length)(name, start)
        return name, start, config

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
        name, start, config = self.transport.run(
            self._stream_start(conversations, model, role_mapping, llm_config)
        )
        return self.transport.chat_texts(name, start, config, self.clean_func_of(name))

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
        name, start, config = await self.aio_transport.run(
            self._stream_start(conversations, model, role_mapping, llm_config)
        )
        # Fed here, not through a second generator: this runs once per batch of deltas.
        texts = TextStream(start.request_id, self.clean_func_of(name))
        stream = self.aio_transport.chat_batches(name, start, config, texts.progress.migrated)
        async with contextlib.aclosing(stream) as batches:
            async for batch in batches:
                item = texts.feed(batch)
                if item is not None:
                    yield item

    async def aclose_async_channels(self) -> None:
        """Close the grpc.aio channels the running event loop used (``async_*`` calls)."""
        await self.aio_transport.close()

    # -- Byzer-LLM's completion API -------------------------------------------------------

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

    @operation
    def chat(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> Steps[list[LLMResponse]]:
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
        if len(queries) == 1:
            responses = yield from self._query_chat(*queries[0])
            return [responses[0]]
        results = yield Gather(tuple(self._query_chat(*q) for q in queries))
        return [r[0] for r in results]

    async_chat = async_operation(
        chat, ":meth:`chat` over grpc.aio (an llmesh addition); a batch runs concurrently."
    )

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

    @operation
    def raw_chat(
        self,
        model: str | None,
        request: LLMRequest | str,
        extract_params: Mapping[str, Any] | None = None,
    ) -> Steps[list[LLMResponse]]:
        """Same as :meth:`chat` (Byzer-LLM kept both names)."""
        return (yield from steps(self.chat)(model, request, extract_params))

    @operation
    def generate_instruction_from_history(
        self,
        model: str,
        conversations: Sequence[Mapping[str, Any]],
        role_mapping: Mapping[str, Any] | None = None,
    ) -> Steps[str]:
        """The prompt a conversation becomes for ``model``.

        With ``setup_template(model, "auto")`` on a model with a chat template, the worker
        renders it (``apply_chat_template``); otherwise ``role_mapping`` (default:
        ``User:`` / ``Assistant:``) renders it locally.
        """
        if self.settings_of(model).auto_use_apply_chat_template:
            meta = yield from steps(self.get_meta)(model)
            if meta.get("support_chat_template"):
                return (yield from steps(self.apply_chat_template)(model, list(conversations)))
        mapping = role_mapping or {"user_role": "User:", "assistant_role": "Assistant:"}
        return render_with_role_mapping(conversations, mapping)
