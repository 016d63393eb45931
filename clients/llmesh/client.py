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

import contextlib
import dataclasses
import json
import logging
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from llmesh.errors import (
    InvalidArgument,
    LLMeshError,
    NotFound,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
)
from llmesh.routes import (
    CONTROL_CALL_TIMEOUT_S,
    ChannelPool,
    ReplicaId,
    RouteCache,
    call_unary,
    replica_id,
    rpc_errors,
)
from llmesh.routing import parse_policy
from llmesh.tracing import client_span
from llmesh.v1 import common_pb2
from llmesh.v1 import control_plane_service_pb2 as cp
from llmesh.v1 import control_plane_service_pb2_grpc as cp_grpc
from llmesh.v1 import inference_service_pb2 as inf
from llmesh.v1 import inference_service_pb2_grpc as inf_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_CONTROL_PLANE = "127.0.0.1:50051"
CONTROL_PLANE_ENV = "LLMESH_CONTROL_PLANE"

#: How long closing a stream early waits for the worker's final (ABORTED) message before the
#: RPC itself is cancelled.
CANCEL_GRACE_S = 2.0


def default_control_plane() -> str:
    """The control-plane address from ``$LLMESH_CONTROL_PLANE``, else ``127.0.0.1:50051``."""
    return os.environ.get(CONTROL_PLANE_ENV, "").strip() or DEFAULT_CONTROL_PLANE


# --------------------------------------------------------------------------------------------
# Byzer-LLM data shapes
# --------------------------------------------------------------------------------------------


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


def normalize_backend(name: str) -> str:
    """Map a backend name, including Byzer-LLM's ``ray/vllm`` spelling, to llmesh's name."""
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


FINISH_REASONS: dict[int, str | None] = {
    common_pb2.FINISH_REASON_UNSPECIFIED: None,
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    # OpenAI (and so most user code) reports a matched stop string as a plain stop.
    common_pb2.FINISH_REASON_STOP_STRING: "stop",
    common_pb2.FINISH_REASON_ABORTED: "abort",
}


# --------------------------------------------------------------------------------------------
# llm_config -> GenerationParams
# --------------------------------------------------------------------------------------------

#: Byzer-LLM prefixes engine parameters with "gen." or "generation."; both are stripped.
CONFIG_PREFIXES = ("gen.", "generation.")
#: Spellings of the output-length limit, most specific first.
MAX_TOKENS_KEYS = ("max_tokens", "max_new_tokens", "max_length")
#: Byzer-LLM's internal flags that mean nothing to a worker.
_DROPPED_KEYS = frozenset({"stream", "abort"})


@dataclasses.dataclass
class GenerationConfig:
    """What an ``llm_config`` dict asks for.

    Attributes:
        params: sampling and stopping parameters for the worker.
        request_id: the caller's request id (``gen.request_id``), or "" to let the SDK make one.
        timeout: deadline for the call in seconds (``timeout_s``), or None.
        affinity_key: requests with the same key go to the same replica (``affinity_key``).
    """

    params: common_pb2.GenerationParams
    request_id: str = ""
    timeout: float | None = None
    affinity_key: str = ""


def strip_config_prefix(key: str) -> str:
    """``"gen.temperature"`` and ``"generation.temperature"`` become ``"temperature"``."""
    for prefix in CONFIG_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def _as_float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise InvalidArgument(f"llm_config[{key!r}] must be a number, got {value!r}")
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"llm_config[{key!r}] must be a number, got {value!r}") from None


def _as_int(key: str, value: Any) -> int:
    number = _as_float(key, value)
    if not number.is_integer():
        raise InvalidArgument(f"llm_config[{key!r}] must be a whole number, got {value!r}")
    return int(number)


def _as_int_list(key: str, value: Any) -> list[int]:
    items = value if isinstance(value, (list, tuple)) else [value]
    return [_as_int(key, item) for item in items]


def _as_str_list(key: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        raise InvalidArgument(
            f"llm_config[{key!r}] must be a string or a list of strings, got {value!r}"
        )
    if any(s == "" for s in items):
        raise InvalidArgument(f"llm_config[{key!r}] holds an empty stop string")
    return list(items)


def generation_config(llm_config: Mapping[str, Any] | None) -> GenerationConfig:
    """Turn a Byzer-LLM ``llm_config`` dict into a :class:`GenerationConfig`.

    Keys may carry Byzer-LLM's ``gen.`` / ``generation.`` prefix. Known keys become typed
    fields: ``temperature``, ``top_p``, ``top_k``, ``max_tokens`` (also ``max_new_tokens`` and
    ``max_length``, the first one present in that order wins), ``stop`` (string or list),
    ``stop_token_ids`` (int or list; Byzer-LLM's ``stopping_sequences`` is read as ``stop``),
    ``repetition_penalty``, ``seed``; ``request_id`` names the request (for ``abort``);
    ``timeout_s`` sets the call deadline; ``affinity_key`` keeps related requests on one
    replica. Keys set to None are skipped. Every other key goes to ``params.extra`` for engines
    that understand it.

    Args:
        llm_config: the dict given to ``chat_oai`` / ``stream_chat_oai``; None means empty.

    Raises:
        InvalidArgument: a known key has a value of the wrong type, or an unknown key's value
            cannot be carried as JSON.
    """
    params = common_pb2.GenerationParams()
    out = GenerationConfig(params=params)
    flat: dict[str, Any] = {}
    for raw_key, value in (llm_config or {}).items():
        if value is None:
            continue
        flat[strip_config_prefix(str(raw_key))] = value
    extra: dict[str, Any] = {}
    for key, value in flat.items():
        if key == "temperature":
            params.temperature = _as_float(key, value)
        elif key == "top_p":
            params.top_p = _as_float(key, value)
        elif key == "top_k":
            params.top_k = _as_int(key, value)
        elif key in MAX_TOKENS_KEYS:
            continue  # resolved below, by precedence rather than by dict order
        elif key in ("stop", "stopping_sequences"):
            params.stop.extend(s for s in _as_str_list(key, value) if s not in params.stop)
        elif key == "stop_token_ids":
            params.stop_token_ids.extend(_as_int_list(key, value))
        elif key == "repetition_penalty":
            params.repetition_penalty = _as_float(key, value)
        elif key == "seed":
            params.seed = _as_int(key, value)
        elif key == "request_id":
            out.request_id = str(value)
        elif key == "timeout_s":
            out.timeout = _as_float(key, value)
            if out.timeout <= 0:
                raise InvalidArgument(f"llm_config[{key!r}] must be positive, got {value!r}")
        elif key == "affinity_key":
            out.affinity_key = str(value)
        elif key in _DROPPED_KEYS:
            continue
        else:
            extra[key] = value
    for key in MAX_TOKENS_KEYS:
        if key in flat:
            params.max_tokens = _as_int(key, flat[key])
            if params.max_tokens <= 0:
                raise InvalidArgument(f"llm_config[{key!r}] must be positive, got {flat[key]!r}")
            break
    if extra:
        try:
            params.extra.update(extra)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(
                f"llm_config has a value that is not JSON-like ({exc}); "
                "use strings, numbers, booleans, lists and dicts"
            ) from None
    return out


def _byzer_flags(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """Flags with their ``gen.`` / ``generation.`` prefix removed, for non-generation calls."""
    return {strip_config_prefix(str(k)): v for k, v in (config or {}).items()}


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


#: Byzer-LLM's plain "User:/Assistant:" prompt format (its ``default`` template).
DEFAULT_ROLE_MAPPING: dict[str, Any] = {
    "user_role": "User:",
    "assistant_role": "Assistant:",
    "system_msg": "You are a helpful assistant.",
}
#: No role markers at all: the messages' texts, one per line (Byzer-LLM's ``empty`` template).
EMPTY_ROLE_MAPPING: dict[str, Any] = {"user_role": "", "assistant_role": "", "system_msg": ""}


def render_with_role_mapping(
    conversations: Sequence[Mapping[str, Any]], role_mapping: Mapping[str, Any]
) -> str:
    """Render a conversation into one prompt with a Byzer-LLM ``role_mapping``.

    Each message becomes a line: system messages as their text (or ``system_msg_func(t, v)``),
    user messages as ``user_role + text`` (or ``user_role_func(t, v)``), assistant messages as
    ``assistant_role + text`` (or ``assistant_role_func(t, v)``). When the last message is from
    the user, ``assistant_role`` is appended so the model answers.
    """
    user_role = str(role_mapping.get("user_role", ""))
    assistant_role = str(role_mapping.get("assistant_role", ""))
    lines: list[str] = []
    for item in conversations:
        role, content = item.get("role"), str(item.get("content") or "")
        if role == "system":
            func = role_mapping.get("system_msg_func")
            lines.append(func(t=role_mapping.get("system_msg", ""), v=content) if func else content)
        elif role == "user":
            func = role_mapping.get("user_role_func")
            lines.append(func(t=user_role, v=content) if func else f"{user_role}{content}")
        elif role == "assistant":
            func = role_mapping.get("assistant_role_func")
            lines.append(
                func(t=assistant_role, v=content) if func else f"{assistant_role}{content}"
            )
    if conversations and conversations[-1].get("role") == "user":
        lines.append(assistant_role)
    return "\n".join(lines)


def _echo_input(
    conversations: Sequence[Mapping[str, Any]], prompt: str | None, llm_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The ``LLMResponse.input`` Byzer-LLM users see: instruction, history and the config."""
    if prompt is not None:
        return {"instruction": prompt, "history": [], **llm_config}
    history = [{k: v for k, v in item.items() if k != "metadata"} for item in conversations[:-1]]
    return {"instruction": conversations[-1].get("content", ""), "history": history, **llm_config}


# --------------------------------------------------------------------------------------------
# Streams and results
# --------------------------------------------------------------------------------------------


class _ChatCall:
    """One ``InferenceService.Chat`` call whose request side is fed from a queue.

    The start message goes first; a cancel can be queued later on the same stream. The request
    side stays open until :meth:`end_requests`, so the worker never mistakes the end of our
    input for the end of our interest.
    """

    def __init__(
        self,
        stub: inf_grpc.InferenceServiceStub,
        start: inf.ChatStart,
        *,
        timeout: float | None,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self._requests: queue.SimpleQueue[inf.ChatRequest | None] = queue.SimpleQueue()
        self._requests.put(inf.ChatRequest(start=start))
        self._ended = False
        self.call = stub.Chat(self._request_iterator(), timeout=timeout, metadata=metadata)

    def _request_iterator(self) -> Iterator[inf.ChatRequest]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def end_requests(self) -> None:
        """Half-close the request side (lets grpc's sender thread finish)."""
        if not self._ended:
            self._ended = True
            self._requests.put(None)

    def cancel(self, grace: float = CANCEL_GRACE_S) -> None:
        """Stop the request on the worker: send ChatCancel, wait briefly, then cancel the RPC.

        The cancel message lets the worker abort the engine request and answer with its final
        message; cancelling the RPC afterwards covers a worker that does not answer in time
        (the worker sees the RPC cancelled either way).
        """
        if self.call.done():
            self.end_requests()
            return
        self._requests.put(inf.ChatRequest(cancel=inf.ChatCancel()))
        timer = threading.Timer(grace, self.call.cancel)
        timer.daemon = True
        timer.start()
        try:
            with contextlib.suppress(LLMeshError), rpc_errors():
                for response in self.call:
                    if response.finished:
                        break
        finally:
            timer.cancel()
            self.end_requests()
            self.call.cancel()  # no-op when the RPC already ended


class _Attempts:
    """Retry bookkeeping for one request.

    UNAVAILABLE before any output: the worker is marked down and the request is retried once
    on another replica. RESOURCE_EXHAUSTED: every other READY replica is tried in turn. When no
    replica is left, the last worker error is raised.
    """

    def __init__(self) -> None:
        self.tried: set[ReplicaId] = set()
        self.retried_unavailable = False
        self.last_error: LLMeshError | None = None

    def failed(self, routes: RouteCache, replica: common_pb2.Replica, exc: LLMeshError) -> None:
        """Record a failed attempt; re-raise ``exc`` when no retry is allowed."""
        self.tried.add(replica_id(replica))
        if isinstance(exc, Unavailable):
            routes.mark_down(replica.address)
            if self.retried_unavailable:
                raise exc
            self.retried_unavailable = True
        elif not isinstance(exc, ResourceExhausted):
            raise exc
        log.debug("replica %s of %s failed (%s); trying another", replica.index, replica.model, exc)
        self.last_error = exc


def _name_worker(replica: common_pb2.Replica, exc: LLMeshError) -> LLMeshError:
    """Say which worker was unreachable; grpc's own message names only a socket error."""
    if not isinstance(exc, Unavailable):
        return exc
    named = Unavailable(
        f"worker {replica.worker_id or '?'} at {replica.address} "
        f"(model {replica.model!r} replica {replica.index}) is unavailable: {exc}"
    )
    named.__cause__ = exc.__cause__
    return named


class _Progress:
    """Accumulates a Chat stream into text and Byzer-LLM metadata."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.monotonic()
        self.first_token_at: float | None = None
        self.parts: list[str] = []
        self.generated = 0
        self.prompt_tokens = 0
        self.finish_reason: str | None = None
        self.finished = False

    def add(self, response: inf.ChatResponse) -> None:
        if response.request_id:
            self.request_id = response.request_id
        if response.delta or response.token_ids:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
            self.parts.append(response.delta)
            self.generated += len(response.token_ids)
        if response.finished:
            self.finished = True
            self.finish_reason = FINISH_REASONS.get(response.finish_reason)
            if response.HasField("usage"):
                self.prompt_tokens = response.usage.prompt_tokens
                self.generated = response.usage.completion_tokens or self.generated

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def metadata(self) -> dict[str, Any]:
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
        }


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


def _normalize_pairs(
    sentence_pairs: Sequence[Sequence[str]] | Sequence[str],
) -> tuple[list[tuple[str, str]], bool]:
    """Return the pairs and whether one bare pair was given (Byzer-LLM accepts both)."""
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


def _param_str(value: Any) -> str:
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


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class ByzerLLM:
    """Byzer-LLM's client API over an llmesh mesh.

    Args:
        control_plane: ``host:port`` of the control plane (Byzer-LLM's first argument was
            ``url``). Defaults to ``$LLMESH_CONTROL_PLANE``, else ``127.0.0.1:50051``.
        **kwargs: Byzer-LLM options; ``verbose``, ``force_skip_context_length_check`` and
            ``default_max_output_length`` are kept, ``first_route_timeout`` sets how long the
            first request for a model waits for its route stream. Others are ignored.
    """

    default_sys_conf: ClassVar[dict[str, Any]] = {
        # Replicas, in Byzer-LLM's words the number of workers.
        "maxConcurrency": 1,
        # Byzer-LLM asked for one GPU by default; most meshes here are CPU-only, so 0.
        "num_gpus": 0,
        "num_cpus": 1,
        "infer_backend": InferBackend.Transformers,
    }

    def __init__(self, control_plane: str | None = None, **kwargs: Any) -> None:
        self.control_plane = (control_plane or "").strip() or default_control_plane()
        self.sys_conf: dict[str, Any] = dict(self.default_sys_conf)
        self.verbose = bool(kwargs.get("verbose", False))
        self.force_skip_context_length_check = bool(
            kwargs.get("force_skip_context_length_check", False)
        )
        self.default_max_output_length = int(kwargs.get("default_max_output_length", 1024))
        self.default_model_name: str | None = None
        self.default_emb_model_name: str | None = None
        self.default_rerank_model_name: str | None = None
        self.pin_model_worker_mapping: dict[str, int] | None = None
        self.mapping_role_mapping: dict[str, dict[str, Any]] = {}
        self.mapping_extra_generation_params: dict[str, dict[str, Any]] = {}
        self.meta_cache: dict[str, dict[str, Any]] = {}
        self._pool = ChannelPool()
        self._control = cp_grpc.ControlPlaneServiceStub(self._pool.get(self.control_plane))
        route_kwargs = {}
        if "first_route_timeout" in kwargs:
            route_kwargs["first_snapshot_timeout"] = float(kwargs["first_route_timeout"])
        self._routes = RouteCache(self._pool.get(self.control_plane), **route_kwargs)
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

    # -- setup_* (fluent) -----------------------------------------------------------------

    def setup_reset(self) -> ByzerLLM:
        """Restore the deploy and load-balance settings to their defaults."""
        self.sys_conf = dict(self.default_sys_conf)
        return self

    def setup(self, name: str, value: Any) -> ByzerLLM:
        """Set one raw setting in ``sys_conf`` (Byzer-LLM's generic setter).

        Args:
            name: e.g. ``"num_gpus"``, ``"num_cpus"``, ``"maxConcurrency"``, ``"load_balance"``.
            value: the value.
        """
        self.sys_conf[name] = value
        return self

    def setup_default_model_name(self, model_name: str) -> ByzerLLM:
        """Use ``model_name`` when a chat, tokenizer or meta call names no model.

        Args:
            model_name: a deployed model's name.
        """
        self.default_model_name = model_name
        return self

    def setup_default_emb_model_name(self, model_name: str) -> ByzerLLM:
        """Use ``model_name`` when ``emb`` / ``emb_query`` names no model.

        Args:
            model_name: a deployed embedding model's name.
        """
        self.default_emb_model_name = model_name
        return self

    def setup_default_re_rank_model_name(self, model_name: str) -> ByzerLLM:
        """Use ``model_name`` when ``emb_rerank`` names no model.

        Args:
            model_name: a deployed rerank (or embedding) model's name.
        """
        self.default_rerank_model_name = model_name
        return self

    def setup_pin_model_worker_mapping(
        self, pin_model_worker_mapping: Mapping[Any, int] | None
    ) -> ByzerLLM:
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

    def setup_load_balance_way(self, load_balance_way: str) -> ByzerLLM:
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

    def setup_num_workers(self, num_workers: int) -> ByzerLLM:
        """Deploy this many replicas (Byzer-LLM called them workers).

        Args:
            num_workers: replicas per deployed model, at least 1.
        """
        self.sys_conf["maxConcurrency"] = num_workers
        return self

    def setup_gpus_per_worker(self, num_gpus: float) -> ByzerLLM:
        """Reserve this many GPUs per replica on deploy.

        Args:
            num_gpus: GPUs per replica; 0 for CPU.
        """
        self.sys_conf["num_gpus"] = num_gpus
        return self

    def setup_cpus_per_worker(self, num_cpus: float) -> ByzerLLM:
        """Reserve this many CPUs per replica on deploy.

        Args:
            num_cpus: CPUs per replica.
        """
        self.sys_conf["num_cpus"] = num_cpus
        return self

    def setup_infer_backend(self, backend: str) -> ByzerLLM:
        """Choose the engine for the next deploy.

        Args:
            backend: ``"transformers"`` (default), ``"vllm"``, ``"deepspeed"``, ``"embedding"``
                or ``"rerank"``; Byzer-LLM's ``"ray/vllm"`` spelling is accepted.
        """
        self.sys_conf["infer_backend"] = normalize_backend(backend)
        return self

    def setup_worker_concurrency(self, num: int) -> ByzerLLM:
        """Let each replica serve this many requests at once (infer_params ``max_concurrency``).

        Args:
            num: concurrent requests per replica.
        """
        self.sys_conf["workerMaxConcurrency"] = num
        return self

    def setup_role_mapping(self, model: str, role_mapping: Mapping[str, Any]) -> ByzerLLM:
        """Render this model's chats with a Byzer-LLM role mapping instead of its chat template.

        Args:
            model: the model name.
            role_mapping: ``user_role``, ``assistant_role``, ``system_msg`` and optional
                ``*_func`` formatters, as in Byzer-LLM.
        """
        self.mapping_role_mapping[model] = dict(role_mapping)
        return self

    def setup_extra_generation_params(
        self, model: str, extra_generation_params: Mapping[str, Any]
    ) -> ByzerLLM:
        """Default ``llm_config`` entries for a model; per-call values win.

        Args:
            model: the model name.
            extra_generation_params: e.g. ``{"gen.repetition_penalty": 1.1}``.
        """
        current = self.mapping_extra_generation_params.get(model, {})
        self.mapping_extra_generation_params[model] = {**current, **extra_generation_params}
        return self

    # -- helpers --------------------------------------------------------------------------

    def _model_or_default(self, model: str | None, default: str | None, setter: str) -> str:
        name = model or default
        if not name:
            raise InvalidArgument(f"model name is required: pass model=... or call {setter}()")
        return name

    def _policy(self) -> int:
        return parse_policy(self.sys_conf.get("load_balance"))

    def _pins(self, purpose: int) -> dict[str, int]:
        pins = dict(self.pin_model_worker_mapping or {})
        # Byzer-LLM routed rerank as an embedding request, so its "embedding" pin covered both.
        if purpose == cp.PURPOSE_RERANK and "rerank" not in pins and "embedding" in pins:
            pins["rerank"] = pins["embedding"]
        return pins

    def _config_for(self, model: str, llm_config: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**self.mapping_extra_generation_params.get(model, {}), **(llm_config or {})}

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

    def _control_call(self, method: str, request: Any, *, timeout: float) -> Any:
        """One unary control-plane call; an outage names the address that was tried."""
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
            role_mapping = self.mapping_role_mapping.get(model)
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
    ) -> list[LLMResponse]:
        """Chat with a model and return the whole answer.

        Args:
            conversations: OpenAI-style messages, ``[{"role": "user", "content": "hi"}]``.
            tools: function calling; not available yet (raises Unimplemented).
            tool_choice: function calling; not available yet.
            execute_tool: function calling; not available yet.
            impl_func: function implementation; not available yet.
            execute_impl_func: function implementation; not available yet.
            impl_func_params: function implementation; not available yet.
            func_params: function calling; not available yet.
            response_class: structured responses; not available yet.
            response_after_chat: structured responses; not available yet.
            enable_default_sys_message: Byzer-LLM's built-in system prompt; not available yet.
            model: the model; defaults to ``setup_default_model_name``.
            role_mapping: render the prompt with this Byzer-LLM role mapping instead of the
                model's chat template.
            llm_config: generation parameters (see :func:`generation_config`).

        Returns:
            One :class:`LLMResponse` in a list: ``output`` is the answer, ``metadata`` holds
            ``request_id``, ``input_tokens_count``, ``generated_tokens_count``,
            ``finish_reason``, ``time_cost``, ``first_token_time`` and ``speed``.
        """
        unsupported = {
            "tools": bool(tools),
            "tool_choice": tool_choice is not None,
            "execute_tool": execute_tool,
            "impl_func": impl_func is not None,
            "execute_impl_func": execute_impl_func,
            "impl_func_params": impl_func_params is not None,
            "func_params": func_params is not None,
            "response_class": response_class is not None,
            "response_after_chat": bool(response_after_chat),
            "enable_default_sys_message": enable_default_sys_message,
        }
        asked = [name for name, used in unsupported.items() if used]
        if asked:
            raise Unimplemented(
                f"chat_oai({', '.join(asked)}=...) is not supported by llmesh yet; "
                "plain chat works, function calling and response classes come in a later version"
            )
        name = self._model_or_default(model, self.default_model_name, "setup_default_model_name")
        merged = self._config_for(name, llm_config)
        config = generation_config(merged)
        start, prompt = self._chat_start(conversations, name, role_mapping, config)
        progress = _Progress(start.request_id)
        for response in self._chat_stream(name, start, config):
            progress.add(response)
        return [
            LLMResponse(
                output=progress.text,
                input=_echo_input(conversations, prompt, merged),
                metadata=progress.metadata(),
            )
        ]

    def stream_chat_oai(
        self,
        conversations: Sequence[Mapping[str, Any]],
        model: str | None = None,
        role_mapping: Mapping[str, Any] | None = None,
        llm_config: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[str, SingleOutputMeta]]:
        """Chat with a model and yield the answer as it grows.

        Each item is ``(text_so_far, metadata)`` as in Byzer-LLM: the text is the whole answer
        up to now, not the newest piece. The last item carries the finish reason and the token
        counts. Breaking out of the loop (or closing the generator) cancels the request on the
        worker.

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
        return self._stream_texts(name, start, config)

    def _stream_texts(
        self, model: str, start: inf.ChatStart, config: GenerationConfig
    ) -> Iterator[tuple[str, SingleOutputMeta]]:
        progress = _Progress(start.request_id)
        stream = self._chat_stream(model, start, config)
        try:
            for response in stream:
                before = len(progress.parts)
                progress.add(response)
                if len(progress.parts) > before or response.finished:
                    yield progress.text, SingleOutputMeta(progress.metadata())
        finally:
            stream.close()  # cancels on the worker when the caller stopped early

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
        flags = _byzer_flags(self._config_for(name, extract_params))
        normalize = bool(flags.get("normalize_embeddings", flags.get("normalize", False)))
        timeout = _as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
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
        flags = _byzer_flags(self._config_for(name, extract_params))
        timeout = _as_float("timeout_s", flags["timeout_s"]) if "timeout_s" in flags else None
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
        flags = _byzer_flags(llm_config)
        req = inf.TokenizeRequest(
            model=name, text=s, add_special_tokens=bool(flags.get("add_special_tokens", True))
        )
        response = self._worker_call(
            name,
            cp.PURPOSE_TOKENIZER,
            "InferenceService/Tokenize",
            lambda stub, md: stub.Tokenize(req, metadata=md),
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
        flags = _byzer_flags(llm_config)
        req = inf.ApplyChatTemplateRequest(
            model=name,
            messages=to_chat_messages(conversations),
            add_generation_prompt=bool(flags.get("add_generation_prompt", True)),
        )
        response = self._worker_call(
            name,
            cp.PURPOSE_APPLY_CHAT_TEMPLATE,
            "InferenceService/ApplyChatTemplate",
            lambda stub, md: stub.ApplyChatTemplate(req, metadata=md),
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
            lambda stub, md: stub.GetModelMeta(req, metadata=md),
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


__all__ = [
    "DEFAULT_ROLE_MAPPING",
    "EMPTY_ROLE_MAPPING",
    "ByzerLLM",
    "GenerationConfig",
    "InferBackend",
    "LLMRequest",
    "LLMResponse",
    "Role",
    "SingleOutputMeta",
    "default_control_plane",
    "generation_config",
    "render_with_role_mapping",
    "to_chat_messages",
]
