"""``chat_oai``: Byzer-LLM's chat with tools, response classes and generated functions.

The last message is rewritten into a prompt that asks for JSON (the per-model
``setup_*_format_func`` hooks can replace it), the matching JSON schema is enforced while
decoding, and the answer is parsed (or the chosen tools run) with :mod:`llmesh.functions`. The
model calls are the chat core's (:meth:`~llmesh.sdk.chat.ChatMixin._query_chat`), so
``chat_oai`` and ``async_chat_oai`` are one implementation.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmesh import functions as fn
from llmesh.common.errors import InvalidArgument
from llmesh.functions import LLMClassResponse, LLMFunctionCallResponse
from llmesh.llm_config import as_int, byzer_flags
from llmesh.sdk.chat import ChatMixin
from llmesh.sdk.ops import Steps, async_operation, operation
from llmesh.sdk.results import to_chat_messages
from llmesh.sdk.shapes import LLMResponse


class StructuredChatMixin(ChatMixin):
    """``chat_oai`` / ``async_chat_oai`` and Byzer-LLM's ``execute_*`` helpers."""

    @operation(offload=True)
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
    ) -> Steps[list[Any]]:
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
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        settings = self.settings_of(name)
        if role_mapping is None:
            role_mapping = settings.role_mapping
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
            base = settings.base_system_message or fn.base_ability_format()
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
                (settings.sys_function_calling_format_func or fn.sys_function_calling_format)
                if sys_hooks
                else (settings.function_calling_format_func or fn.function_calling_format)
            )
            last["content"] = hook(content, tools, tool_choice)
            flags = byzer_flags(self._config_for(name, llm_config))
            max_calls = None
            if "max_tool_calls" in flags:
                max_calls = as_int("max_tool_calls", flags["max_tool_calls"])
            schema = fn.tool_calls_schema(tools, tool_choice, max_calls)
        elif impl_func is not None:
            hook = (
                (settings.sys_impl_func_format_func or fn.sys_function_impl_format)
                if sys_hooks
                else (settings.impl_func_format_func or fn.function_impl_format)
            )
            last["content"] = hook(content, impl_func, cls=response_class)
        elif response_class is not None and not response_after_chat:
            hook = (
                (settings.sys_response_class_format_func or fn.sys_response_class_format)
                if sys_hooks
                else (settings.response_class_format_func or fn.response_class_format)
            )
            last["content"] = hook(content, cls=response_class)
            schema = fn.class_schema(response_class)
        merged = self._config_for(name, llm_config)
        responses = yield from self._query_chat(name, messages, role_mapping, merged, schema)

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
                    settings.response_class_format_after_chat_func
                    or fn.response_class_format_after_chat
                )
                restated = []
                for r in responses:
                    again = yield from self._query_chat(
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

    async_chat_oai = async_operation(
        chat_oai,
        """:meth:`chat_oai` for asyncio code (an llmesh addition); same arguments and results.

        The model is called over grpc.aio on the running loop; prompt building, parsing and
        any tool or generated code run on a worker thread, so they never block the loop.
        """,
    )

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
