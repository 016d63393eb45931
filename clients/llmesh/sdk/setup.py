"""The fluent ``setup_*`` methods of :class:`~llmesh.ByzerLLM` (Byzer-LLM's names).

Each records a setting (client-wide in ``sys_conf`` and the default model names, per model in
:class:`~llmesh.sdk.settings.ModelSettings`) and returns the client, so calls chain.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from llmesh.common.errors import InvalidArgument
from llmesh.common.routing import parse_policy
from llmesh.llm_config import check_max_migrations
from llmesh.sdk.ops import Steps, operation, steps
from llmesh.sdk.settings import Settings
from llmesh.sdk.shapes import normalize_backend
from llmesh.templates import TEMPLATE_NAMES, Template, Templates

S = TypeVar("S", bound="SetupMixin")


class SetupMixin(Settings):
    """Byzer-LLM's fluent setters; needs ``get_meta`` (for ``setup_template(model, "auto")``).

    ``setup_template`` is an operation (it may ask the model's meta), so ``AsyncByzerLLM``
    awaits it; the others only record settings.
    """

    def setup_reset(self: S) -> S:
        """Restore the deploy and load-balance settings to their defaults."""
        self.sys_conf = dict(self.default_sys_conf)
        return self

    def setup(self: S, name: str, value: Any) -> S:
        """Set one raw setting in ``sys_conf`` (Byzer-LLM's generic setter).

        Args:
            name: e.g. ``"num_gpus"``, ``"num_cpus"``, ``"maxConcurrency"``, ``"load_balance"``.
            value: the value.
        """
        self.sys_conf[name] = value
        return self

    def setup_default_model_name(self: S, model_name: str) -> S:
        """Use ``model_name`` when a chat, tokenizer or meta call names no model.

        Args:
            model_name: a deployed model's name.
        """
        self.default_model_name = model_name
        return self

    def setup_default_emb_model_name(self: S, model_name: str) -> S:
        """Use ``model_name`` when ``emb`` / ``emb_query`` names no model.

        Args:
            model_name: a deployed embedding model's name.
        """
        self.default_emb_model_name = model_name
        return self

    def setup_default_re_rank_model_name(self: S, model_name: str) -> S:
        """Use ``model_name`` when ``emb_rerank`` names no model.

        Args:
            model_name: a deployed rerank (or embedding) model's name.
        """
        self.default_rerank_model_name = model_name
        return self

    def setup_pin_model_worker_mapping(
        self: S, pin_model_worker_mapping: Mapping[Any, int] | None
    ) -> S:
        """Pin requests by purpose to one replica index.

        Args:
            pin_model_worker_mapping: purpose name (``"chat"``, ``"embedding"``, ``"rerank"``,
                ``"tokenizer"``, ``"apply_chat_template"``, ``"meta"``) to replica index; a
                negative index means no pin, as in Byzer-LLM. None clears the pins. A pin for
                ``"embedding"`` also applies to rerank unless ``"rerank"`` is given.
        """
        if pin_model_worker_mapping is None:
            self.pin_model_worker_mapping = None
            return self
        pins: dict[str, int] = {}
        for key, index in pin_model_worker_mapping.items():
            if isinstance(index, bool) or not isinstance(index, int):
                raise InvalidArgument(
                    f"pin for {key!r} must be a replica index (int), got {index!r}"
                )
            if index >= 0:
                pins[str(key)] = index
        self.pin_model_worker_mapping = pins
        return self

    def setup_load_balance_way(self: S, load_balance_way: str) -> S:
        """Choose how requests spread over a model's READY replicas.

        Args:
            load_balance_way: ``"lru"`` (Byzer-LLM's name for least loaded, the default),
                ``"least_loaded"``, ``"round_robin"`` or ``"random"``.

        Raises:
            InvalidArgument: an unknown name.
        """
        parse_policy(load_balance_way)  # fail here, not on the next request
        self.sys_conf["load_balance"] = load_balance_way
        return self

    def setup_num_workers(self: S, num_workers: int) -> S:
        """Deploy this many replicas (Byzer-LLM called them workers).

        Args:
            num_workers: replicas per deployed model, at least 1.
        """
        self.sys_conf["maxConcurrency"] = num_workers
        return self

    def setup_gpus_per_worker(self: S, num_gpus: float) -> S:
        """Reserve this many GPUs per replica on deploy.

        Args:
            num_gpus: GPUs per replica; 0 for CPU.
        """
        self.sys_conf["num_gpus"] = num_gpus
        return self

    def setup_cpus_per_worker(self: S, num_cpus: float) -> S:
        """Reserve this many CPUs per replica on deploy.

        Args:
            num_cpus: CPUs per replica.
        """
        self.sys_conf["num_cpus"] = num_cpus
        return self

    def setup_infer_backend(self: S, backend: str) -> S:
        """Choose the engine for the next deploy.

        Args:
            backend: ``"transformers"`` (default), ``"vllm"``, ``"deepspeed"``, ``"embedding"``
                or ``"rerank"``; Byzer-LLM's ``"ray/vllm"`` spelling is accepted.
        """
        self.sys_conf["infer_backend"] = normalize_backend(backend)
        return self

    def setup_worker_concurrency(self: S, num: int) -> S:
        """Let each replica serve this many requests at once (infer_params ``max_concurrency``).

        Args:
            num: concurrent requests per replica.
        """
        self.sys_conf["workerMaxConcurrency"] = num
        return self

    def setup_max_migrations(self: S, max_migrations: int) -> S:
        """How often a stream that breaks after output may move to another replica and go on,
        for every call of this client (default 3; 0 turns failover off). A model's
        ``setup_extra_generation_params`` and a call's ``llm_config`` may say otherwise.

        Args:
            max_migrations: moves allowed per request, 0 or more.

        Raises:
            InvalidArgument: not an int, or negative.
        """
        self.max_migrations = check_max_migrations(max_migrations)
        return self

    def setup_role_mapping(self: S, model: str, role_mapping: Mapping[str, Any]) -> S:
        """Render this model's chats with a Byzer-LLM role mapping instead of its chat template.

        Args:
            model: the model name.
            role_mapping: ``user_role``, ``assistant_role``, ``system_msg`` and optional
                ``*_func`` formatters, as in Byzer-LLM.
        """
        self.settings_for_update(model).role_mapping = dict(role_mapping)
        return self

    def setup_extra_generation_params(
        self: S, model: str, extra_generation_params: Mapping[str, Any]
    ) -> S:
        """Default ``llm_config`` entries for a model; per-call values win.

        Args:
            model: the model name.
            extra_generation_params: e.g. ``{"gen.repetition_penalty": 1.1}``.
        """
        settings = self.settings_for_update(model)
        current = settings.extra_generation_params or {}
        settings.extra_generation_params = {**current, **extra_generation_params}
        return self

    @operation
    def setup_template(self: S, model: str, template: Template | str) -> Steps[S]:
        """Choose how this model's chats become a prompt.

        Args:
            model: the model name.
            template: a :class:`~llmesh.templates.Template` (e.g. ``Templates.qwen()``), one
                of their names (``"qwen"``, ``"llama"``, ``"deepseek_code_chat"``, ...), or
                ``"auto"``: ask the model's meta. llmesh workers render messages with the
                tokenizer's chat template, so ``auto`` keeps messages as they are (and drops
                a role mapping set earlier); a model without message support and with a QWen
                architecture gets ``Templates.qwen()``; a model with neither a chat template
                nor message support is an error.

        Raises:
            InvalidArgument: an unknown template name, or ``auto`` for a model that cannot
                render messages.
        """
        if isinstance(template, str):
            if template == "auto":
                meta = yield from steps(self.get_meta)(model)
                self._apply_auto_template(model, meta)
                return self
            factory = TEMPLATE_NAMES.get(template)
            if factory is None:
                raise InvalidArgument(
                    f"unknown template {template!r}; use 'auto' or one of "
                    f"{', '.join(TEMPLATE_NAMES)}"
                )
            template = factory()
        self._install_template(model, template)
        return self

    def _install_template(self, model: str, template: Template) -> None:
        self.setup_extra_generation_params(model, template.generation_config)
        settings = self.settings_for_update(model)
        settings.role_mapping = dict(template.role_mapping)
        settings.clean_func = template.clean_func
        # A template without a hook drops the one an earlier template installed.
        settings.function_calling_format_func = template.function_calling_format_func
        settings.response_class_format_func = template.response_class_format_func
        settings.response_class_format_after_chat_func = (
            template.response_class_format_after_chat_func
        )

    def _apply_auto_template(self, model: str, meta: Mapping[str, Any]) -> None:
        """``setup_template(model, "auto")`` once the model's meta is known."""
        settings = self.settings_for_update(model)
        if meta.get("model_deploy_type") == "saas" or meta.get("message_format"):
            settings.role_mapping = None
            settings.auto_use_apply_chat_template = True
            return
        if "QWenLMHeadModel" in meta.get("architectures", []):
            self._install_template(model, Templates.qwen())
            return
        if not meta.get("support_chat_template"):
            raise InvalidArgument(
                f"model {model!r} has no chat template, so template 'auto' cannot render its "
                "chats; pass a template such as Templates.default()"
            )
        settings.role_mapping = None
        settings.auto_use_apply_chat_template = True

    def setup_max_model_length(self: S, model: str, max_model_length: int) -> S:
        """Refuse requests whose prompt plus output would exceed this many tokens.

        Args:
            model: the model name.
            max_model_length: the model's context length, in tokens.
        """
        self.settings_for_update(model).max_model_length = int(max_model_length)
        return self

    def setup_max_input_length(self: S, model: str, max_input_length: int) -> S:
        """Refuse prompts longer than this many tokens (checked before sending).

        Args:
            model: the model name.
            max_input_length: the longest prompt, in tokens.
        """
        self.settings_for_update(model).max_input_length = int(max_input_length)
        return self

    def setup_max_output_length(self: S, model: str, max_output_length: int) -> S:
        """Generate at most this many tokens when a call does not say (``max_tokens``).

        Args:
            model: the model name.
            max_output_length: tokens; also what the context check assumes the output needs.
        """
        self.settings_for_update(model).max_output_length = int(max_output_length)
        return self

    def setup_function_calling_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Build this model's tools prompt with ``func(prompt, tools, tool_choice) -> str``."""
        self.settings_for_update(model).function_calling_format_func = func
        return self

    def setup_response_class_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Build this model's response-class prompt with ``func(prompt, cls=...) -> str``."""
        self.settings_for_update(model).response_class_format_func = func
        return self

    def setup_impl_func_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Build this model's impl prompt with ``func(prompt, impl_func, cls=...) -> str``."""
        self.settings_for_update(model).impl_func_format_func = func
        return self

    def setup_response_class_format_after_chat_func(
        self: S, model: str, func: Callable[..., str]
    ) -> S:
        """Build this model's "restate as JSON" prompt with ``func(cls) -> str``."""
        self.settings_for_update(model).response_class_format_after_chat_func = func
        return self

    def setup_base_system_messages(self: S, model: str, base_system_message: str) -> S:
        """The system message ``enable_default_sys_message=True`` adds for this model."""
        self.settings_for_update(model).base_system_message = base_system_message
        return self

    def setup_sys_response_class_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Like :meth:`setup_response_class_format_func`, with the default system message."""
        self.settings_for_update(model).sys_response_class_format_func = func
        return self

    def setup_sys_function_calling_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Like :meth:`setup_function_calling_format_func`, with the default system message."""
        self.settings_for_update(model).sys_function_calling_format_func = func
        return self

    def setup_sys_response_class_format_after_chat_func(
        self: S, model: str, func: Callable[..., str]
    ) -> S:
        """Kept for Byzer-LLM code; like Byzer-LLM, ``chat_oai`` does not consult it."""
        self.settings_for_update(model).sys_response_class_format_after_chat_func = func
        return self

    def setup_sys_impl_func_format_func(self: S, model: str, func: Callable[..., str]) -> S:
        """Like :meth:`setup_impl_func_format_func`, with the default system message."""
        self.settings_for_update(model).sys_impl_func_format_func = func
        return self
