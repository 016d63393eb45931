"""Per-model settings and the client-wide deploy and routing settings.

Byzer-LLM kept a dozen ``mapping_*`` dicts keyed by model name (``mapping_role_mapping``,
``mapping_max_input_length``, ...). Here each model has one :class:`ModelSettings` in
``ByzerLLM.model_settings``; the ``mapping_*`` names stay as live views of one field across
models (:class:`ModelSettingsView`), so Byzer-LLM code that reads or clears them still works.
The fluent ``setup_*`` methods that write these settings are in :mod:`llmesh.sdk.setup`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, ClassVar

from llmesh.common.errors import InvalidArgument
from llmesh.common.routing import parse_policy
from llmesh.llm_config import check_max_migrations
from llmesh.sdk.shapes import InferBackend
from llmesh.templates import identity
from llmesh.v1 import control_plane_service_pb2 as cp


@dataclasses.dataclass
class ModelSettings:
    """Everything set for one model with ``setup_*``; None means not set.

    Attributes:
        role_mapping: render chats with this Byzer-LLM role mapping (None: chat template).
        extra_generation_params: default ``llm_config`` entries; per-call values win.
        clean_func: applied to every answer text.
        auto_use_apply_chat_template: ``setup_template(model, "auto")`` chose the chat template.
        max_input_length: the longest prompt, in tokens.
        max_output_length: default ``max_tokens``.
        max_model_length: the context length, in tokens.
        function_calling_format_func: builds the tools prompt.
        response_class_format_func: builds the response-class prompt.
        response_class_format_after_chat_func: builds the "restate as JSON" prompt.
        impl_func_format_func: builds the ``impl_func`` prompt.
        base_system_message: the system message ``enable_default_sys_message`` adds.
        sys_response_class_format_func: response-class prompt with the default system message.
        sys_function_calling_format_func: tools prompt with the default system message.
        sys_response_class_format_after_chat_func: kept for Byzer-LLM code; not consulted.
        sys_impl_func_format_func: ``impl_func`` prompt with the default system message.
    """

    role_mapping: dict[str, Any] | None = None
    extra_generation_params: dict[str, Any] | None = None
    clean_func: Callable[[str], str] | None = None
    auto_use_apply_chat_template: bool | None = None
    max_input_length: int | None = None
    max_output_length: int | None = None
    max_model_length: int | None = None
    function_calling_format_func: Callable[..., str] | None = None
    response_class_format_func: Callable[..., str] | None = None
    response_class_format_after_chat_func: Callable[..., str] | None = None
    impl_func_format_func: Callable[..., str] | None = None
    base_system_message: str | None = None
    sys_response_class_format_func: Callable[..., str] | None = None
    sys_function_calling_format_func: Callable[..., str] | None = None
    sys_response_class_format_after_chat_func: Callable[..., str] | None = None
    sys_impl_func_format_func: Callable[..., str] | None = None


class ModelSettingsView(MutableMapping[str, Any]):
    """One :class:`ModelSettings` field of every model, as Byzer-LLM's ``mapping_<field>`` dict.

    Reading, writing, deleting and clearing go straight to the models' settings; a model whose
    field is None is not in the view.

    Args:
        models: the client's settings by model name.
        field: the :class:`ModelSettings` field.
    """

    def __init__(self, models: dict[str, ModelSettings], field: str) -> None:
        self._models = models
        self._field = field

    def __getitem__(self, model: str) -> Any:
        settings = self._models.get(model)
        value = None if settings is None else getattr(settings, self._field)
        if value is None:
            raise KeyError(model)
        return value

    def __setitem__(self, model: str, value: Any) -> None:
        setattr(self._models.setdefault(model, ModelSettings()), self._field, value)

    def __delitem__(self, model: str) -> None:
        if model not in self:
            raise KeyError(model)
        setattr(self._models[model], self._field, None)

    def __iter__(self) -> Iterator[str]:
        return iter([m for m, s in self._models.items() if getattr(s, self._field) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return repr(dict(self))


class SettingsField:
    """A ``mapping_<field>`` attribute: a :class:`ModelSettingsView` of the instance's settings.

    Assigning a dict replaces that field for every model.

    Args:
        field: the :class:`ModelSettings` field.
    """

    def __init__(self, field: str) -> None:
        self.field = field

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return ModelSettingsView(obj.model_settings, self.field)

    def __set__(self, obj: Any, value: Mapping[str, Any]) -> None:
        view = ModelSettingsView(obj.model_settings, self.field)
        view.clear()
        view.update(value)


class Settings:
    """Client-wide settings and per-model settings, and what routing derives from them.

    The attributes are Byzer-LLM's public names; ``mapping_*`` are views of
    :attr:`model_settings`.
    """

    default_sys_conf: ClassVar[dict[str, Any]] = {
        # Replicas, in Byzer-LLM's words the number of workers.
        "maxConcurrency": 1,
        # Byzer-LLM asked for one GPU by default; most meshes here are CPU-only, so 0.
        "num_gpus": 0,
        "num_cpus": 1,
        "infer_backend": InferBackend.Transformers,
    }

    mapping_role_mapping = SettingsField("role_mapping")
    mapping_extra_generation_params = SettingsField("extra_generation_params")
    mapping_clean_func = SettingsField("clean_func")
    mapping_auto_use_apply_chat_template = SettingsField("auto_use_apply_chat_template")
    mapping_max_input_length = SettingsField("max_input_length")
    mapping_max_output_length = SettingsField("max_output_length")
    mapping_max_model_length = SettingsField("max_model_length")
    mapping_function_calling_format_func = SettingsField("function_calling_format_func")
    mapping_response_class_format_func = SettingsField("response_class_format_func")
    mapping_response_class_format_after_chat_func = SettingsField(
        "response_class_format_after_chat_func"
    )
    mapping_impl_func_format_func = SettingsField("impl_func_format_func")
    mapping_base_system_message = SettingsField("base_system_message")
    mapping_sys_response_class_format_func = SettingsField("sys_response_class_format_func")
    mapping_sys_function_calling_format_func = SettingsField("sys_function_calling_format_func")
    mapping_sys_response_class_format_after_chat_func = SettingsField(
        "sys_response_class_format_after_chat_func"
    )
    mapping_sys_impl_func_format_func = SettingsField("sys_impl_func_format_func")

    def _init_settings(self, kwargs: Mapping[str, Any]) -> None:
        """Set every setting to its default; ``kwargs`` are the client's Byzer-LLM options."""
        self.sys_conf: dict[str, Any] = dict(self.default_sys_conf)
        self.verbose = bool(kwargs.get("verbose", False))
        self.force_skip_context_length_check = bool(
            kwargs.get("force_skip_context_length_check", False)
        )
        self.default_max_output_length = int(kwargs.get("default_max_output_length", 1024))
        #: Client-wide ``max_migrations`` (None: the default); a model's
        #: ``setup_extra_generation_params`` and the call's ``llm_config`` win over it.
        self.max_migrations: int | None = None
        if kwargs.get("max_migrations") is not None:
            self.max_migrations = check_max_migrations(kwargs["max_migrations"])
        self.default_model_name: str | None = None
        self.default_emb_model_name: str | None = None
        self.default_rerank_model_name: str | None = None
        self.pin_model_worker_mapping: dict[str, int] | None = None
        self.model_settings: dict[str, ModelSettings] = {}

    def settings_of(self, model: str) -> ModelSettings:
        """The model's settings; all None (and not stored) for a model never set up.

        Args:
            model: the model name.
        """
        return self.model_settings.get(model) or ModelSettings()

    def settings_for_update(self, model: str) -> ModelSettings:
        """The model's stored settings, created on first use, to change in place.

        Args:
            model: the model name.
        """
        return self.model_settings.setdefault(model, ModelSettings())

    def get_max_model_length(self, model: str) -> int | None:
        """The context length set with :meth:`setup_max_model_length`, or None."""
        return self.settings_of(model).max_model_length

    def get_max_input_length(self, model: str) -> int | None:
        """The prompt limit set with :meth:`setup_max_input_length`, or None."""
        return self.settings_of(model).max_input_length

    def get_max_output_length(self, model: str) -> int:
        """The output length set for the model, else ``default_max_output_length``."""
        value = self.settings_of(model).max_output_length
        return self.default_max_output_length if value is None else value

    def clean_func_of(self, model: str) -> Callable[[str], str]:
        """The model's answer cleaner (``setup_template``), else the identity."""
        return self.settings_of(model).clean_func or identity

    def _model_or_default(self, model: str | None, default: str | None, setter: str) -> str:
        name = model or default
        if not name:
            raise InvalidArgument(f"model name is required: pass model=... or call {setter}()")
        return name

    def _policy(self) -> int:
        """The load-balance policy from ``setup_load_balance_way`` (least loaded by default)."""
        return parse_policy(self.sys_conf.get("load_balance"))

    def _pins(self, purpose: int) -> dict[str, int]:
        """Replica pins by purpose from ``setup_pin_model_worker_mapping``."""
        pins = dict(self.pin_model_worker_mapping or {})
        # Byzer-LLM routed rerank as an embedding request, so its "embedding" pin covered both.
        if purpose == cp.PURPOSE_RERANK and "rerank" not in pins and "embedding" in pins:
            pins["rerank"] = pins["embedding"]
        return pins

    def _config_for(self, model: str, llm_config: Mapping[str, Any] | None) -> dict[str, Any]:
        """The client's ``max_migrations``, then the model's ``setup_extra_generation_params``,
        overlaid with the call's config."""
        base = {} if self.max_migrations is None else {"max_migrations": self.max_migrations}
        model_params = self.settings_of(model).extra_generation_params or {}
        return {**base, **model_params, **(llm_config or {})}
