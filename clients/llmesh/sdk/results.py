"""Request messages and result shapes of the SDK, the same for every transport.

Chat messages from OpenAI-style dicts, the accumulation of a Chat stream into text plus
Byzer-LLM metadata (:class:`ChatProgress`, :class:`TextStream`), and the shapes Byzer-LLM
returns for chat, rerank and meta results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmesh.common.errors import InvalidArgument
from llmesh.sdk.shapes import LLMResponse, SingleOutputMeta
from llmesh.v1 import common_pb2
from llmesh.v1 import inference_service_pb2 as inf

FINISH_REASONS: dict[int, str | None] = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    # OpenAI (and so most user code) reports a matched stop string as a plain stop.
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_ABORTED: "abort",
}


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


def echo_input(
    conversations: Sequence[Mapping[str, Any]], prompt: str | None, llm_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``LLMResponse.input`` Byzer-LLM users see: instruction, history and the config."""
    if prompt is not None:
        return {"instruction": prompt, "history": [], **llm_config}
    history = [{k: v for k, v in item.items() if k != "metadata"} for item in conversations[:-1]]
    return {"instruction": conversations[-1].get("content", ""), "history": history, **llm_config}


def to_response(item: Any, clean: Callable[[str], str]) -> LLMResponse:
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


class ChatProgress:
    """Accumulates a Chat stream into text and Byzer-LLM metadata.

    Args:
        request_id: the request's id until the worker names it.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        # Text received since it was last joined; `_text` holds what was joined before.
        self._parts: list[str] = []
        self._text = ""
        #: Messages that carried output so far.
        self.deltas = 0
        self.generated = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.finished = False
        #: Times the request moved to another replica mid-stream (failover).
        self.migrations = 0

    def add(self, response: inf.ChatResponse) -> None:
        """Take one Chat response into account."""
        if response.request_id:
            self.request_id = response.request_id
        if response.delta or response.token_ids:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.deltas += 1
            if response.delta:
                self._parts.append(response.delta)
            self.generated += len(response.token_ids)
        if response.finished:
            self.finished = True
            self.finish_reason = FINISH_REASONS.get(response.finish_reason)
            if response.HasField("usage"):
                self.prompt_tokens = response.usage.prompt_tokens
                self.generated = response.usage.completion_tokens or self.generated

    def migrated(self) -> None:
        """The request moved to another replica and continues there."""
        self.migrations += 1

    @property
    def text(self) -> str:
        """The answer so far, joined only when asked for."""
        if self._parts:
            self._text += "".join(self._parts)
            self._parts.clear()
        return self._text

    def metadata(self) -> dict[str, Any]:
        """Byzer-LLM's metadata: request id, token counts, timings and finish reason."""
        elapsed = time.monotonic() - self.started
        first = (self.first_token_at - self.started) if self.first_token_at is not None else 0.0
        return {
            "request_id": self.request_id,
            "input_tokens_count": self.prompt_tokens,
            "generated_tokens_count": self.generated,
            "finish_reason": self.finish_reason,
            "time_cost": elapsed,
            "first_token_time": first,
            "speed": self.generated / elapsed if elapsed > 0 else 0.0,
            "migrations": self.migrations,
        }


class TextStream:
    """Turns Chat responses into ``stream_chat_oai`` items: ``(text_so_far, meta)``.

    Args:
        request_id: the request's id.
        clean: the model's answer cleaner, applied to the text so far.
    """

    def __init__(self, request_id: str, clean: Callable[[str], str]) -> None:
        self.progress = ChatProgress(request_id)
        self.clean = clean

    def feed(self, responses: Sequence[inf.ChatResponse]) -> tuple[str, SingleOutputMeta] | None:
        """The one item to yield for ``responses`` (what arrived since the previous item), or
        None when they carried no output and did not end the request."""
        progress = self.progress
        before = progress.deltas
        for response in responses:
            progress.add(response)
        if progress.deltas > before or progress.finished:
            return self.clean(progress.text), SingleOutputMeta(progress.metadata())
        return None


def rerank_output(
    pairs: Sequence[tuple[str, str]], scores: Sequence[float], *, single: bool
) -> tuple[tuple[str, str], float] | list[tuple[tuple[str, str], float]]:
    """Shape rerank scores as Byzer-LLM's rerank models returned them.

    One pair gives ``((query, passage), score)``; several give a list of those, best first.
    """
    scored = [((q, p), float(s)) for (q, p), s in zip(pairs, scores, strict=True)]
    if single:
        return scored[0]
    return sorted(scored, key=lambda item: item[1], reverse=True)


def normalize_pairs(
    sentence_pairs: Sequence[Sequence[str]] | Sequence[str],
) -> tuple[list[tuple[str, str]], bool]:
    """Return the pairs and whether one bare pair was given (Byzer-LLM accepts both).

    Raises:
        InvalidArgument: an item is not a (query, passage) pair of strings.
    """
    if (
        isinstance(sentence_pairs, (list, tuple))
        and len(sentence_pairs) == 2
        and all(isinstance(s, str) for s in sentence_pairs)
    ):
        query, passage = sentence_pairs
        return [(str(query), str(passage))], True
    pairs: list[tuple[str, str]] = []
    for i, pair in enumerate(sentence_pairs):
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(s, str) for s in pair)
        ):
            raise InvalidArgument(
                f"sentence_pairs[{i}] must be a (query, passage) pair of strings, got {pair!r}"
            )
        pairs.append((pair[0], pair[1]))
    return pairs, False


def param_str(value: Any) -> str:
    """infer_params travel as strings; non-strings are written as JSON (True -> "true")."""
    if isinstance(value, str):
        return value
    return json.dumps(value)


def meta_dict(response: inf.GetModelMetaResponse) -> dict[str, Any]:
    """Byzer-LLM's meta dict from a GetModelMeta response.

    Typed fields win over same-named keys in the free-form ``extra`` map.
    """
    meta: dict[str, Any] = dict(response.extra)
    meta.update(
        {
            "model": response.model,
            # Byzer-LLM marks self-hosted models "proprietary" and hosted APIs "saas".
            "model_deploy_type": "proprietary",
            "backend": response.backend,
            "architectures": list(response.architectures),
            "max_model_len": response.max_model_len,
            "support_stream": response.support_stream,
            "support_chat_template": response.support_chat_template,
            # chat_oai sends the messages themselves; the worker applies the chat template.
            "message_format": True,
            "embedding_dim": response.embedding_dim,
            "model_path": response.model_path,
            "max_concurrency": response.max_concurrency,
        }
    )
    return meta
