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

from collections.abc import Mapping, Sequence
from typing import Any

from llmesh.common.auth_client import token_from_env
from llmesh.common.tls import TlsConfig
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
    generation_config,
    strip_config_prefix,
)
from llmesh.sdk.admin import AdminMixin
from llmesh.sdk.calls import CANCEL_GRACE_S, iterate_in_thread
from llmesh.sdk.channels import Router
from llmesh.sdk.inference import InferenceMixin
from llmesh.sdk.prompts import PromptMixin
from llmesh.sdk.results import FINISH_REASONS, meta_dict, rerank_output, to_chat_messages
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
from llmesh.sdk.structured import StructuredChatMixin
from llmesh.sdk.training import TrainingMixin
from llmesh.sdk.transport import AsyncTransport, SyncTransport
from llmesh.templates import (
    DEFAULT_ROLE_MAPPING,
    EMPTY_ROLE_MAPPING,
    Template,
    Templates,
    render_with_role_mapping,
)
from llmesh.training import TrainingJobFailed


class ByzerLLM(
    SetupMixin,
    StructuredChatMixin,
    PromptMixin,
    InferenceMixin,
    AdminMixin,
    TrainingMixin,
):
    """Byzer-LLM's client API over an llmesh mesh.

    The methods live in :mod:`llmesh.sdk`, one module per concern: settings and ``setup_*``
    (:mod:`~llmesh.sdk.setup`), chat (:mod:`~llmesh.sdk.chat`, :mod:`~llmesh.sdk.structured`,
    :mod:`~llmesh.sdk.prompts`), embeddings, tokenizer and meta (:mod:`~llmesh.sdk.inference`),
    deployment (:mod:`~llmesh.sdk.admin`) and training jobs (:mod:`~llmesh.sdk.training`).
    Calls that reach the mesh are written once as steps; this client runs them on
    :attr:`transport` (blocking gRPC), the ``async_*`` methods and :class:`llmesh.AsyncByzerLLM`
    on :attr:`aio_transport` (grpc.aio).

    Args:
        control_plane: ``host:port`` of the control plane (Byzer-LLM's first argument was
            ``url``). Defaults to ``$LLMESH_CONTROL_PLANE``, else ``127.0.0.1:50051``.
        **kwargs: Byzer-LLM options; ``verbose``, ``force_skip_context_length_check`` and
            ``default_max_output_length`` are kept, ``first_route_timeout`` sets how long the
            first request for a model waits for its route stream, ``tls`` (a
            :class:`llmesh.common.tls.TlsConfig`) the TLS of every channel (default: from
            ``$LLMESH_TLS_CA``, ``$LLMESH_TLS_CERT`` and ``$LLMESH_TLS_KEY``; plaintext when
            unset), ``token`` the bearer token sent on every call (default ``$LLMESH_TOKEN``;
            needed when the mesh runs with ``--auth``), ``max_migrations`` how often a broken
            stream may move to another replica (default 3; see ``setup_max_migrations``).
            Others are ignored.
    """

    def __init__(self, control_plane: str | None = None, **kwargs: Any) -> None:
        self.control_plane = (control_plane or "").strip() or default_control_plane()
        self._init_settings(kwargs)
        self._init_chat()
        self._init_prompts()
        self._init_inference()
        first_route_timeout = kwargs.get("first_route_timeout")
        #: Channels, route cache and retry rules, shared by both transports.
        self.router = Router(
            self.control_plane,
            policy=self._policy,
            pins=self._pins,
            first_route_timeout=(
                float(first_route_timeout) if "first_route_timeout" in kwargs else None
            ),
            tls=kwargs["tls"] if "tls" in kwargs else TlsConfig.from_env(),
            token=token_from_env(kwargs.get("token")),
        )
        #: Runs this client's calls with blocking gRPC.
        self.transport = SyncTransport(self.router)
        #: Runs the ``async_*`` calls (and :class:`llmesh.AsyncByzerLLM`'s) over grpc.aio.
        self.aio_transport = AsyncTransport(self.router)

    def close(self) -> None:
        """Stop the route watches and close every channel. Safe to call twice."""
        self.router.close()

    def migration_counts(self) -> dict[tuple[str, str], int]:
        """Mid-stream failovers this client made, per ``(model, outcome)``.

        ``outcome`` is ``"resumed"`` (the request moved and finished on another replica) or
        ``"failed"`` (it moved at least once and still failed).
        """
        return dict(self.router.migrations)

    def __enter__(self) -> ByzerLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ByzerLLM(control_plane={self.control_plane!r})"


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
    "normalize_backend",
    "render_with_role_mapping",
    "rerank_output",
    "strip_config_prefix",
    "to_chat_messages",
]
