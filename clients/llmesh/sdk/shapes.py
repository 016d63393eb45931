"""Byzer-LLM's data shapes as the SDK returns and accepts them, and the control-plane address."""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Callable
from typing import Any

DEFAULT_CONTROL_PLANE = "127.0.0.1:50051"
CONTROL_PLANE_ENV = "LLMESH_CONTROL_PLANE"


def default_control_plane() -> str:
    """The control-plane address from ``$LLMESH_CONTROL_PLANE``, else ``127.0.0.1:50051``."""
    return os.environ.get(CONTROL_PLANE_ENV, "").strip() or DEFAULT_CONTROL_PLANE


@dataclasses.dataclass
class LLMResponse:
    """One result, as Byzer-LLM returns it.

    Attributes:
        output: the generated text, an embedding vector, token ids or rerank pairs.
        input: what was asked, as a dict (``{"instruction": ..., ...}``) like Byzer-LLM echoes.
        metadata: request id, token counts, timings and finish reason where they apply.
    """

    output: Any
    input: Any
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class LLMRequest:
    """Byzer-LLM's request object for ``emb`` (and older ``chat`` code).

    Attributes:
        instruction: one text or a list of texts.
        embedding: kept for compatibility; ``emb`` always embeds.
        max_length: kept for compatibility; unused by embedding.
        top_p: kept for compatibility; unused by embedding.
        temperature: kept for compatibility; unused by embedding.
    """

    instruction: str | list[str]
    embedding: bool = False
    max_length: int = 4096
    top_p: float = 0.95
    temperature: float = 0.1


class Role:
    """Chat roles, as Byzer-LLM names them."""

    User = "user"
    Assistant = "assistant"
    System = "system"


class EventName(enum.Enum):
    """Points in a model call where :meth:`ByzerLLM.add_event_callback` hooks run.

    ``BEFORE_CALL_MODEL`` callbacks are called as ``callback(llm, model, input_value)`` after
    the context-length checks and before the request leaves; ``input_value`` is a list with
    one dict per prompt (``instruction``, ``history`` and the generation config).
    ``AFTER_CALL_MODEL`` callbacks are called as ``callback(model, result)`` with the raw
    result, a list of ``{"predict": text, "input": ..., "metadata": {...}}`` dicts.

    A callback returns ``(continue, value)``. ``(True, _)`` lets the call go on;
    ``(False, value)`` stops it and ``value`` (a list in the raw result shape) is used as the
    model's result: before the call the model is not asked at all, after it the result is
    replaced.
    """

    BEFORE_CALL_MODEL = "before_call_model"
    AFTER_CALL_MODEL = "after_call_model"


EventCallbackResult = tuple[bool, Any]
EventCallback = Callable[..., EventCallbackResult]


class InferBackend:
    """Engine names for ``setup_infer_backend``.

    Byzer-LLM spelled two of them ``ray/vllm`` and ``ray/deepspeed``; those spellings are still
    accepted and mean ``vllm`` and ``deepspeed``.
    """

    Transformers = "transformers"
    VLLM = "vllm"
    DeepSpeed = "deepspeed"
    Embedding = "embedding"
    Rerank = "rerank"
    Auto = "auto"


def normalize_backend(name: str) -> str:
    """Map a backend name, including Byzer-LLM's ``ray/vllm`` spelling, to llmesh's name.

    Args:
        name: the backend name as given.
    """
    value = str(name).strip().lower()
    return value.removeprefix("ray/")


class SingleOutputMeta(dict[str, Any]):
    """Metadata that ``stream_chat_oai`` yields with each text.

    Byzer-LLM code reads it both ways, so it is a dict whose keys are also attributes:
    ``meta["generated_tokens_count"] == meta.generated_tokens_count``.

    Keys: ``request_id``, ``input_tokens_count`` (known once the stream finishes),
    ``generated_tokens_count``, ``finish_reason`` (None until the end; then ``"stop"``,
    ``"length"`` or ``"abort"``), ``time_cost`` and ``first_token_time`` (seconds) and ``speed``
    (generated tokens per second).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None
